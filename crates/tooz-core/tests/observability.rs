//! Every backend operation is measured through the `metrics` facade (see
//! `tooz_core::observe`): a recorder sees each operation, its errors, the grants and
//! a lock wait.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tooz_core::{Registry, Wait, memory};

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

#[tokio::test(flavor = "current_thread")]
async fn operations_grants_waits_and_errors_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Local to this thread: the current-thread runtime runs every task here.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let registry = Registry::new().with(memory::DRIVER);
    let url = format!("memory://observe-{}", std::process::id());
    let a = registry.connect(&url, "a").unwrap();
    let b = registry.connect(&url, "b").unwrap();
    a.start(false).await.unwrap();
    b.start(false).await.unwrap();
    a.create_group("g").await.unwrap();
    assert!(a.create_group("g").await.is_err());
    a.join_group("g", &()).await.unwrap();

    let held = a
        .get_lock("l")
        .unwrap()
        .guard(Wait::No)
        .await
        .unwrap()
        .unwrap();
    let lb = b.get_lock("l").unwrap();
    let waiter = tokio::spawn(async move {
        let g = lb.guard(Wait::For(Duration::from_secs(10))).await.unwrap();
        g.unwrap().release().await.unwrap();
    });
    // Let the waiter's tasks run to their first attempt, which finds the lock held
    // (on a current-thread runtime each yield polls every ready task once).
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    held.release().await.unwrap();
    waiter.await.unwrap();

    let mut counters = HashMap::new();
    let mut histograms = HashMap::new();
    for (k, _, _, v) in snapshotter.snapshot().into_vec() {
        let labels: Vec<(&str, &str)> = k.key().labels().map(|l| (l.key(), l.value())).collect();
        let name = key(k.key().name(), &labels);
        match v {
            DebugValue::Counter(n) => {
                counters.insert(name, n);
            }
            DebugValue::Histogram(h) => {
                histograms.insert(name, h.len());
            }
            DebugValue::Gauge(_) => {}
        }
    }
    let d = ("driver", "memory");
    assert_eq!(
        counters.get(&key(
            "tooz_lock_acquisitions_total",
            &[d, ("mode", "exclusive")]
        )),
        Some(&2),
        "{counters:?}"
    );
    assert_eq!(
        counters.get(&key("tooz_lock_waits_total", &[d])),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        histograms.get(&key("tooz_lock_wait_seconds", &[d])),
        Some(&1)
    );
    assert_eq!(
        counters.get(&key(
            "tooz_backend_errors_total",
            &[d, ("op", "create_group")]
        )),
        Some(&1)
    );
    assert_eq!(
        histograms.get(&key(
            "tooz_backend_op_seconds",
            &[d, ("op", "create_group")]
        )),
        Some(&2)
    );
    assert_eq!(
        histograms.get(&key("tooz_backend_op_seconds", &[d, ("op", "join_group")])),
        Some(&1)
    );
    assert_eq!(
        histograms.get(&key("tooz_backend_op_seconds", &[d, ("op", "release")])),
        Some(&2),
        "{histograms:?}"
    );
}
