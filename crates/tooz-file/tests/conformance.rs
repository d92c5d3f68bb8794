//! The shared conformance suite (`tooz-conformance`) against the file driver.
//!
//! `cargo test -p tooz-file --test conformance` runs it in a fresh directory under
//! the system temporary directory; set `TOOZ_TEST_FILE_URL=file:///some/dir` to
//! pick the directory. Name filters work as with libtest
//! (`cargo test -p tooz-file --test conformance -- locks::`).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::Setup;
use tooz_core::Registry;

fn url() -> String {
    if let Ok(url) = std::env::var("TOOZ_TEST_FILE_URL") {
        return url;
    }
    // One fresh directory per run (cargo-nextest makes one run per case), under a
    // common parent where directories of runs older than an hour are pruned. The
    // driver creates the directory on start; worker processes get the URL from the
    // suite, so nothing is created here.
    let parent = std::env::temp_dir().join("tooz-file-conformance");
    prune_older_than(&parent, Duration::from_secs(3600));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = parent.join(format!("{}-{nanos}", std::process::id()));
    format!("file://{}", dir.display())
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
        driver: "file".into(),
        url: url(),
        registry: Registry::new().with(tooz_file::DRIVER),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
