//! The shared conformance suite (`tooz-conformance`) against `memory://`, with no
//! server: `cargo test -p tooz-core --test conformance`. Name filters work as with
//! libtest (`-- locks::`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::Setup;
use tooz_core::Registry;

fn main() {
    // A store of its own per run (cargo-nextest makes one run per case).
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    tooz_conformance::main(Setup {
        driver: "memory".into(),
        url: format!("memory://conformance-{}-{nanos}", std::process::id()),
        registry: Registry::new().with(tooz_core::memory::DRIVER),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
