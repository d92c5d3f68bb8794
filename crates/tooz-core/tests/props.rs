//! Property tests: URL and option parsing, and decoding of capabilities another
//! client wrote, never panic, give errors naming the offending value, and do not
//! allocate what a length prefix claims.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use tooz_core::options::{parse_backend_url, percent_decode, redact_url, redact_url_str};
use tooz_core::{Capabilities, Options, ToozError, Url};

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// Text drawn mostly from URL-significant characters, so the parser's corners
/// (`%`, `@`, `:`, `[`, `,`, `?`, `#`) come up often.
fn url_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-z0-9]{0,6}",
        3 => prop::sample::select(vec![
            "%", "%4", "%41", "%zz", "%+1", "@", ":", "::", "[", "]", "[::1]", ",", "/", "?",
            "#", "&", "=", " ", "\u{e9}", "\u{1F600}", "99999", "-1", "0",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn scheme() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "redis",
        "rediss",
        "etcd3+http",
        "zookeeper",
        "memcached",
        "file",
        "ipc",
        "consul",
        "postgresql",
        "mysql",
        "x",
    ])
}

fn option_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "timeout",
            "membership_timeout",
            "lock_timeout",
            "ssl",
            "db",
            "port",
        ])
        .prop_map(str::to_string),
        "[a-z_]{1,8}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "0",
            "-1",
            "1",
            "0.5",
            "1e9",
            "1e10",
            "NaN",
            "inf",
            "-inf",
            "true",
            "off",
            "yes",
            "maybe",
            " 3 ",
            "",
            "18446744073709551616",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    prop::collection::btree_map(key, value, 0..5)
}

fn query(opts: &BTreeMap<String, String>) -> String {
    let mut u = Url::parse("x://h/").expect("static URL");
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in opts {
            q.append_pair(k, v);
        }
    }
    u.query().unwrap_or_default().to_string()
}

fn assert_names(e: &ToozError, what: &str) {
    let msg = e.to_string();
    assert!(msg.contains(what), "error {msg:?} does not name {what:?}");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn backend_urls_parse_or_fail_cleanly(s in url_text(), scheme in scheme()) {
        let full = format!("{scheme}://{s}");
        for text in [s.as_str(), full.as_str()] {
            let redacted = redact_url_str(text);
            if let Ok(u) = parse_backend_url(text) {
                // A parsed URL renders, and re-parses to itself.
                let again = Url::parse(u.as_str()).expect("a rendered URL parses");
                prop_assert_eq!(&again, &u);
                let _ = redact_url(&u);
                let _ = Options::from_url(&u);
            }
            // Redaction never panics and never leaks a password it could see.
            if let Ok(u) = Url::parse(text)
                && let Some(p) = u.password()
                && p != "***"
                && !u.username().contains(p)
                && !u.host_str().unwrap_or_default().contains(p)
                && !u.path().contains(p)
                && !u.query().unwrap_or_default().contains(p)
                && !u.fragment().unwrap_or_default().contains(p)
                && !u.scheme().contains(p)
            {
                prop_assert!(!redacted.contains(p), "{redacted} leaks {p}");
            }
        }
    }

    #[test]
    fn host_lists_round_trip(
        hosts in prop::collection::vec(("[a-z][a-z0-9]{0,5}", 1u16..), 2..4),
        path in "(/[a-z]{1,4}){0,2}",
    ) {
        let list: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let text = format!("zookeeper://u:S3CRET@{}{path}?a=1", list.join(","));
        let u = parse_backend_url(&text).expect("a host list parses");
        prop_assert_eq!(
            percent_decode(u.host_str().unwrap_or_default()),
            list.join(",")
        );
        prop_assert_eq!(u.username(), "u");
        prop_assert_eq!(u.query(), Some("a=1"));
        prop_assert!(!redact_url(&u).contains("S3CRET"));
    }

    #[test]
    fn percent_decode_inverts_encoding(s in any::<String>(), junk in url_text()) {
        let encoded: String = s.bytes().map(|b| format!("%{b:02X}")).collect();
        prop_assert_eq!(percent_decode(&encoded), s.clone());
        // Text without `%` is unchanged; junk escapes never panic.
        if !s.contains('%') {
            prop_assert_eq!(percent_decode(&s), s);
        }
        let _ = percent_decode(&junk);
    }

    #[test]
    fn typed_options_ok_or_name_the_option(opts in option_map()) {
        let u = Url::parse(&format!("x://h/?{}", query(&opts))).expect("encoded query parses");
        let o = Options::from_url(&u);
        for (k, v) in &opts {
            prop_assert_eq!(o.get(k), if v.is_empty() { None } else { Some(v.as_str()) });
            match o.duration_secs("d", k) {
                Ok(Some(d)) => prop_assert!(d > Duration::ZERO),
                Ok(None) => prop_assert!(v.is_empty()),
                Err(e) => assert_names(&e, k),
            }
            match o.lease_secs("d", k) {
                Ok(Some(d)) => prop_assert!(d >= tooz_core::options::MIN_LEASE),
                Ok(None) => prop_assert!(v.is_empty()),
                Err(e) => assert_names(&e, k),
            }
            if let Err(e) = o.bool("d", k) { assert_names(&e, k) }
            if let Err(e) = o.parse::<u16>("d", k, "a port") { assert_names(&e, k) }
        }
        match o.lease_timeouts("d", Duration::from_secs(5)) {
            Ok(t) => prop_assert!(t.shortest() >= tooz_core::options::MIN_LEASE),
            Err(ToozError::InvalidOption { option, .. }) => {
                prop_assert!(opts.contains_key(&option));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        if let Err(ToozError::InvalidOption { option, .. }) = o.check_known("d", &["timeout"]) {
            prop_assert!(option != "timeout" && opts.contains_key(&option));
        }
    }

    #[test]
    fn junk_capabilities_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let c = Capabilities::from_msgpack(bytes);
        let _ = format!("{c:?}");
        prop_assert!(c.weight() >= 1 || c.to_value().is_ok());
        prop_assert!(c.weight() <= tooz_core::capabilities::MAX_WEIGHT);
        if let Err(e) = c.to_json() {
            prop_assert!(matches!(e, ToozError::Serialization { .. }), "{e}");
        }
        let _ = c.decode::<BTreeMap<String, u32>>();
        let _ = c.decode::<serde_json::Value>();
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate(
        marker in prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf, 0xc9]),
        claimed in 0x1000_0000u32..,
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        // bin32 / str32 / array32 / map32 / ext32 claiming up to 4 GiB, with a few
        // bytes behind it: decoding must fail quickly without reserving the claim.
        let mut bytes = vec![marker];
        bytes.extend_from_slice(&claimed.to_be_bytes());
        if marker == 0xc9 { bytes.push(1) }
        bytes.extend_from_slice(&tail);
        let c = Capabilities::from_msgpack(bytes);
        prop_assert!(c.to_value().is_err());
        prop_assert!(c.to_json().is_err());
        prop_assert_eq!(c.weight(), 1);
        prop_assert!(c.decode::<serde_json::Value>().is_err());
        prop_assert!(c.decode::<Vec<u8>>().is_err());
    }

    #[test]
    fn json_capabilities_round_trip(v in json_value()) {
        let c = Capabilities::from_json_str(&v.to_string()).expect("JSON encodes");
        prop_assert_eq!(c.to_json().expect("our own bytes decode"), v);
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<u64>().prop_map(J::from),
        "[a-z\u{e9}]{0,8}".prop_map(J::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            prop::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                .prop_map(|m| J::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn deeply_nested_capabilities_fail_without_overflowing_the_stack() {
    // 100 000 nested one-element arrays: the decoder must stop at its depth limit.
    let deep = Capabilities::from_msgpack(vec![0x91u8; 100_000]);
    // Nesting within the limit still decodes.
    let mut ok = vec![0x91u8; tooz_core::capabilities::MAX_DEPTH - 1];
    ok.push(0xc0);
    let ok = Capabilities::from_msgpack(ok);
    // Run on a smaller stack than a tokio worker's (2 MiB).
    std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(move || {
            assert!(deep.to_value().is_err());
            assert_eq!(deep.weight(), 1);
            assert!(deep.decode::<serde_json::Value>().is_err());
            let _ = format!("{deep:?}");
            assert!(ok.to_value().is_ok());
            assert!(ok.to_json().is_ok());
            assert!(ok.decode::<serde_json::Value>().is_ok());
            let _ = format!("{ok:?}");
        })
        .expect("spawn")
        .join()
        .expect("decoding deep nesting must not overflow the stack");
}
