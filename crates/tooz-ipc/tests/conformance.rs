//! The shared conformance suite (`tooz-conformance`) against the IPC driver.
//!
//! `cargo test -p tooz-ipc --test conformance` runs it with a fresh state
//! directory under the system temporary directory (locks and the group list are
//! host-wide SysV objects; the suite's names are unique per run). Set
//! `TOOZ_TEST_IPC_URL=ipc:///some/dir` to pick the directory. Name filters work as
//! with libtest (`cargo test -p tooz-ipc --test conformance -- locks::`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::Setup;
use tooz_core::Registry;

fn url() -> String {
    if let Ok(url) = std::env::var("TOOZ_TEST_IPC_URL") {
        return url;
    }
    // One fresh state directory per run, under a parent where directories of runs
    // older than an hour are pruned. The driver creates it on start.
    let parent = std::env::temp_dir().join("tooz-ipc-conformance");
    prune_older_than(&parent, Duration::from_secs(3600));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = parent.join(format!("{}-{nanos}", std::process::id()));
    format!("ipc://{}", dir.display())
}

fn prune_older_than(parent: &Path, age: Duration) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|d| d > age);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn main() {
    tooz_conformance::main(Setup {
        driver: "ipc".into(),
        url: url(),
        registry: Registry::new().with(tooz_ipc::DRIVER),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
