//! Tracing spans and metrics of every backend operation.
//!
//! ```sh
//! cargo run -p tooz --example observability                 # memory://, no server
//! cargo run -p tooz --example observability -- redis://127.0.0.1:6379
//! ```
//!
//! Each backend call runs in a `tooz.backend` span (level debug) with the driver, the
//! operation, the member, the group or lock, the fencing token and `elapsed_us`; the
//! subscriber below prints each span when it closes. The same calls feed the `metrics`
//! facade: here a debugging recorder collects them and the example prints its
//! snapshot (a real service installs a Prometheus or StatsD exporter instead).

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tooz::Wait;
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main(flavor = "current_thread")]
async fn main() -> tooz::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tooz_core=debug".into()),
        )
        .with_span_events(FmtSpan::CLOSE)
        .with_target(false)
        .init();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    if recorder.install().is_err() {
        eprintln!("a metrics recorder was already installed");
    }

    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://observability-example".to_string());
    let a = tooz::connect(&url, "worker-a")?;
    let b = tooz::connect(&url, "worker-b")?;
    a.start(true).await?;
    b.start(true).await?;

    a.join_group_create("workers", &()).await?;
    println!("members: {:?}", a.get_members("workers").await?);

    // B waits for the lock A holds: one acquisition counted as a wait.
    let guard = a.get_lock("report")?.guard(Wait::No).await?;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            let lock = b.get_lock("report")?;
            let g = lock.guard(Wait::For(Duration::from_secs(5))).await?;
            if let Some(g) = g {
                println!("B got the lock with token {:?}", g.token());
                g.release().await?;
            }
            Ok::<_, tooz::ToozError>(())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(g) = guard {
        println!("A releases the lock with token {:?}", g.token());
        g.release().await?;
    }
    waiter.await.expect("the waiter task")?;
    a.heartbeat().await?;
    a.leave_group("workers").await?;
    a.stop().await?;
    b.stop().await?;

    println!("\nmetrics:");
    let mut rows: Vec<String> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let value = match value {
                DebugValue::Counter(n) => format!("{n}"),
                DebugValue::Gauge(g) => format!("{}", g.into_inner()),
                DebugValue::Histogram(h) => {
                    let n = h.len();
                    let total: f64 = h.iter().map(|v| v.into_inner()).sum();
                    format!("{n} samples, mean {:.1} µs", total / n.max(1) as f64 * 1e6)
                }
            };
            format!("  {}{{{}}} {value}", key.key().name(), labels.join(","))
        })
        .collect();
    rows.sort();
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
