//! A leader-elected scheduler that stops work the moment it loses leadership.
//!
//! ```sh
//! cargo run -p tooz --example scheduler                       # memory://, one process
//! cargo run -p tooz --example scheduler -- etcd3+http://127.0.0.1:2379
//! ```
//!
//! Two scheduler instances campaign for the group `scheduler`. The leader runs
//! scheduling ticks, each stamped with its leadership's fencing token (a downstream
//! system keeps the highest token it has seen and rejects lower ones), and races
//! every tick against `Leadership::lost()`: when the lease behind the leadership
//! is lost (a partition, an expired session) or the leader stands down, the loop
//! stops before another instance can be elected. Here the first leader stands down
//! after three ticks and the standby, blocked in `become_leader`, takes over with a
//! higher token.

use std::time::Duration;

use tooz::Coordinator;

async fn run_scheduler(coord: Coordinator, name: &str, ticks: u32) -> tooz::Result<()> {
    let leadership = coord.become_leader("scheduler").await?;
    let token = leadership.token();
    println!("{name}: elected with token {token:?}");
    let lost = leadership.lost();
    let work = async {
        for tick in 1..=ticks {
            println!("{name}: tick {tick}, stamped {token:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = work => {
            println!("{name}: done, standing down");
            coord.stand_down_group_leader("scheduler").await?;
        }
        () = lost.lost() => {
            println!("{name}: leadership lost; stopped at once");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> tooz::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://scheduler-example".to_string());
    let first = tooz::connect(&url, "scheduler-1")?;
    let second = tooz::connect(&url, "scheduler-2")?;
    first.start(true).await?;
    second.start(true).await?;
    if let Err(e) = first.create_group("scheduler").await
        && !matches!(e, tooz::ToozError::GroupAlreadyExist(_))
    {
        return Err(e);
    }

    let one = tokio::spawn(run_scheduler(first.clone(), "scheduler-1", 3));
    // The standby campaigns once the first is elected, and waits for its turn.
    while first.leadership("scheduler").is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let two = tokio::spawn(run_scheduler(second.clone(), "scheduler-2", 2));
    one.await.expect("scheduler-1 task")?;
    two.await.expect("scheduler-2 task")?;
    first.stop().await?;
    second.stop().await?;
    Ok(())
}
