//! A pool of workers sharing objects with the partitioner, reacting to joins and
//! leaves.
//!
//! ```sh
//! cargo run -p tooz --example worker_pool                       # memory://, one process
//! cargo run -p tooz --example worker_pool -- redis://127.0.0.1:6379
//! ```
//!
//! Three workers join the group `pool` (with a `weight` capability, as Python tooz's
//! partitioner reads it) and each asks the partitioner which of twelve jobs are its
//! own. Then one worker leaves: `run_watchers` feeds the leave to the others'
//! partitioners, and its jobs move to them, while every other job stays put. Every
//! worker computes the same assignment without talking to the others, and a Python
//! tooz process hashing the same group would agree.

use std::collections::BTreeMap;

use tooz::{Coordinator, Partitioner};

const JOBS: usize = 12;

struct Worker {
    name: &'static str,
    coord: Coordinator,
    part: Partitioner,
}

impl Worker {
    async fn start(url: &str, name: &'static str, weight: u32) -> tooz::Result<Worker> {
        let coord = tooz::connect(url, name)?;
        coord.start(true).await?;
        if let Err(e) = coord.create_group("pool").await
            && !matches!(e, tooz::ToozError::GroupAlreadyExist(_))
        {
            return Err(e);
        }
        // Joins with {"weight": N} and builds the ring from the members.
        let part = coord.join_partitioned_group("pool", weight, 32).await?;
        Ok(Worker { name, coord, part })
    }

    /// The jobs this worker owns, as its partitioner sees the group now.
    async fn mine(&self) -> tooz::Result<Vec<usize>> {
        // Applies the joins and leaves seen since the last call to the ring.
        self.coord.run_watchers(None).await?;
        Ok((0..JOBS)
            .filter(|j| self.part.belongs_to_self(&format!("job-{j}"), 1))
            .collect())
    }
}

async fn show(workers: &[&Worker]) -> tooz::Result<BTreeMap<usize, &'static str>> {
    let mut owner = BTreeMap::new();
    for w in workers {
        let mine = w.mine().await?;
        println!("  {:<9} owns {mine:?}", w.name);
        for j in mine {
            if let Some(other) = owner.insert(j, w.name) {
                panic!("job-{j} owned by both {other} and {}", w.name);
            }
        }
    }
    assert_eq!(owner.len(), JOBS, "every job has exactly one owner");
    Ok(owner)
}

#[tokio::main]
async fn main() -> tooz::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://worker-pool-example".to_string());
    let a = Worker::start(&url, "worker-a", 1).await?;
    let b = Worker::start(&url, "worker-b", 1).await?;
    let c = Worker::start(&url, "worker-c", 2).await?;

    println!("three workers (worker-c has twice the weight):");
    let before = show(&[&a, &b, &c]).await?;

    println!("worker-b leaves:");
    b.coord.leave_partitioned_group(b.part).await?;
    b.coord.stop().await?;
    let after = show(&[&a, &c]).await?;

    let moved: Vec<usize> = (0..JOBS).filter(|j| before[j] != after[j]).collect();
    println!("moved: {moved:?} (only worker-b's jobs)");
    assert!(moved.iter().all(|j| before[j] == "worker-b"));

    for w in [a, c] {
        w.coord.leave_partitioned_group(w.part).await?;
        w.coord.stop().await?;
    }
    Ok(())
}
