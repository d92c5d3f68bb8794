//! Property tests of URL and option parsing, for every driver: any text, and
//! well-formed URLs with any options, give a coordinator or an `InvalidUrl` /
//! `InvalidOption` / `InvalidId` error naming what is wrong; nothing panics.
//! Nothing here connects to a backend.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use tooz_core::{ToozError, Url};

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis+sentinel",
    "etcd3+http",
    "etcd3+https",
    "etcd",
    "zookeeper",
    "kazoo",
    "memcached",
    "file",
    "ipc",
    "consul",
    "postgresql",
    "mysql",
    "memory",
];

/// Option names every driver knows of, and a few nobody does.
const KEYS: &[&str] = &[
    "timeout",
    "membership_timeout",
    "lock_timeout",
    "leader_timeout",
    "namespace",
    "db",
    "ssl",
    "sentinel",
    "sentinel_fallback",
    "socket_timeout",
    "password",
    "port",
    "host",
    "dbname",
    "ttl",
    "max_pool_size",
    "poll_interval",
    "api_version",
    "heartbeat_interval",
    "executor",
    "container_parents",
    "retry_on_timeout",
    "zzz",
    "",
];

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "1e9",
    "1e300",
    "NaN",
    "inf",
    "true",
    "off",
    "maybe",
    " 3 ",
    "",
    "65536",
    "18446744073709551616",
    "v3",
    "/",
    "..",
    "%00",
    "a,b",
    "\u{e9}",
];

/// Text drawn mostly from URL-significant pieces.
fn url_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-z0-9.]{0,6}",
        3 => prop::sample::select(vec![
            "%", "%4", "%zz", "@", ":", "::", "[", "]", "[::1]", ",", "/", "//", "?", "#", "&",
            "=", " ", "\u{e9}", "99999", "-1", "0", "localhost:", "h1:1,h2:2", "..", ";",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn options() -> impl Strategy<Value = BTreeMap<String, String>> {
    let key = prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => "[a-z_]{1,8}",
    ];
    let value = prop_oneof![
        4 => prop::sample::select(VALUES).prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop::collection::btree_map(key, value, 0..5)
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("localhost".to_string()),
        Just("127.0.0.1:1".to_string()),
        Just("[::1]:2".to_string()),
        Just("u:p@h:3".to_string()),
        Just("h1:1,h2:2,[::1]:3".to_string()),
        ("[a-z]{1,8}", prop::option::of(any::<u16>())).prop_map(|(h, p)| match p {
            Some(p) => format!("{h}:{p}"),
            None => h,
        }),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("/".to_string()),
        Just("/0".to_string()),
        Just("/tmp/tooz-url-props".to_string()),
        "(/[a-z0-9.]{1,6}){1,3}",
    ]
}

fn query(opts: &BTreeMap<String, String>) -> String {
    let mut u = Url::parse("x://h/").unwrap();
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in opts {
            q.append_pair(k, v);
        }
    }
    u.query().unwrap_or_default().to_string()
}

/// The error a bad URL may give: one about the URL, an option, or the id.
fn check_error(url: &str, e: &ToozError, opts: Option<&BTreeMap<String, String>>) {
    match e {
        ToozError::InvalidUrl { .. } | ToozError::InvalidId { .. } => {}
        ToozError::InvalidOption { option, .. } => {
            if let Some(opts) = opts {
                // The option named is one given (or one derived from the URL's
                // parts or scheme, which some drivers read as options: host,
                // port, path, `rediss` meaning `ssl`).
                assert!(
                    opts.contains_key(option)
                        || [
                            "host", "port", "path", "db", "dbname", "password", "user", "ssl",
                            "sentinel", "scheme",
                        ]
                        .contains(&option.as_str()),
                    "{url}: option {option:?} was not given: {e}"
                );
            }
        }
        other => panic!("{url}: unexpected error kind {other:?}"),
    }
    assert!(!e.to_string().is_empty());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// Any text after any scheme: a coordinator or a clear error.
    #[test]
    fn any_url_text(scheme in prop::sample::select(SCHEMES), rest in url_text()) {
        let rt = runtime();
        let _guard = rt.enter();
        let registry = tooz::registry();
        for url in [format!("{scheme}://{rest}"), rest.clone()] {
            if let Err(e) = registry.connect(&url, "member-1") {
                check_error(&url, &e, None);
            }
        }
    }

    /// Well-formed URLs with any options: a coordinator, or an error naming a
    /// given option (or the URL).
    #[test]
    fn any_options(
        scheme in prop::sample::select(SCHEMES),
        auth in authority(),
        path in path(),
        opts in options(),
    ) {
        let rt = runtime();
        let _guard = rt.enter();
        let url = format!("{scheme}://{auth}{path}?{}", query(&opts));
        if let Err(e) = tooz::registry().connect(&url, "member-1") {
            check_error(&url, &e, Some(&opts));
        }
    }

    /// Each driver's own config parser agrees with the registry: no panics on
    /// any text.
    #[test]
    fn driver_config_parsers(scheme in prop::sample::select(SCHEMES), rest in url_text(), opts in options()) {
        for url in [format!("{scheme}://{rest}"), format!("{scheme}://{rest}?{}", query(&opts))] {
            let results: Vec<Result<(), ToozError>> = vec![
                tooz_redis::RedisConfig::from_url_str(&url).map(drop),
                tooz_etcd::EtcdConfig::from_url_str(&url).map(drop),
                tooz_zookeeper::ZookeeperConfig::from_url_str(&url).map(drop),
                tooz_memcached::MemcachedConfig::from_url_str(&url).map(drop),
                tooz_consul::ConsulConfig::from_url_str(&url).map(drop),
                tooz_file::FileConfig::from_url_str(&url).map(drop),
                tooz_ipc::IpcConfig::from_url_str(&url).map(drop),
                tooz_sql::PgConfig::from_url_str(&url).map(drop),
                tooz_sql::MySqlConfig::from_url_str(&url).map(drop),
            ];
            for r in results {
                if let Err(e) = r {
                    check_error(&url, &e, None);
                }
            }
        }
    }

    /// ZooKeeper host lists: every host given is in the connect string, in order.
    #[test]
    fn zookeeper_host_lists_round_trip(
        hosts in prop::collection::vec(("[a-z][a-z0-9]{0,6}", 1u16..), 1..5),
        chroot in "(/[a-z]{1,5}){0,2}",
    ) {
        let list: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        let url = format!("zookeeper://{}{chroot}", list.join(","));
        let c = tooz_zookeeper::ZookeeperConfig::from_url_str(&url).unwrap();
        prop_assert_eq!(c.connect_string(), list.join(","));
        prop_assert_eq!(c.chroot, chroot);
    }

    /// Redis: a URL's host, port and database come back as given.
    #[test]
    fn redis_url_round_trip(host in "[a-z][a-z0-9]{0,8}", port in 1u16.., db in 0u8..16) {
        let url = format!("redis://{host}:{port}/{db}");
        let c = tooz_redis::RedisConfig::from_url_str(&url).unwrap();
        let shown = format!("{c:?}");
        prop_assert!(shown.contains(&host) && shown.contains(&port.to_string()), "{}", shown);
    }
}
