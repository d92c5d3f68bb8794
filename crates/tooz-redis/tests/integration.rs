//! Redis-specific behaviour: the key layout shared with Python tooz (simulated with
//! raw commands as Python's driver issues them), requests per operation, wake-up
//! latency, a server restart, replies lost after the server applied a request (a
//! test-local proxy swallows them) and Redis Sentinel.
//!
//! Tests needing the shared server read `TOOZ_TEST_REDIS_URL`; the restart and
//! sentinel tests start their own `redis-server` on free loopback ports. Without
//! them the tests print why and pass, unless `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use support::*;
use tooz_core::{Capabilities, MemberId, ToozError, Wait};

fn ns_url(base: &str, label: &str) -> (String, String) {
    let ns = unique_ns(label);
    (with_query(base, &format!("namespace={ns}&timeout=2")), ns)
}

#[tokio::test]
async fn python_layout_and_interop() {
    let Some(base) = server_url("python_layout_and_interop") else {
        return;
    };
    let (url, ns) = ns_url(&base, "layout");
    let mut r = raw(&base).await;
    let a = coordinator(&url, "m1");
    a.start(false).await.unwrap();
    a.create_group("g1").await.unwrap();
    a.join_group("g1", &BTreeMap::from([("weight", 5)]))
        .await
        .unwrap();

    // Exactly Python's keys and values.
    let groups: Vec<Vec<u8>> = r.smembers(format!("{ns}_groups")).await.unwrap();
    assert_eq!(groups, vec![b"g1".to_vec()]);
    let hash: BTreeMap<Vec<u8>, Vec<u8>> = r.hgetall(format!("{ns}_group:g1")).await.unwrap();
    assert_eq!(
        hash.get(&b"__created__"[..]).map(Vec::as_slice),
        Some(&b"1"[..])
    );
    assert_eq!(
        hash.get(&b"m1"[..]).map(Vec::as_slice),
        Some(&b"\x81\xa6weight\x05"[..])
    );
    let beat: Vec<u8> = r.get(format!("{ns}_beats:m1")).await.unwrap();
    assert_eq!(beat, b"Not dead!");
    let pttl: i64 = r.pttl(format!("{ns}_beats:m1")).await.unwrap();
    assert!(pttl > 0 && pttl <= 2000, "{pttl}");

    // A Python member (caps written by Python, beat key alive) is listed with its caps.
    let _: () = r
        .hset(format!("{ns}_group:g1"), "py1", &b"\x81\xa1a\x01"[..])
        .await
        .unwrap();
    let _: () = r
        .pset_ex(format!("{ns}_beats:py1"), "Not dead!", 5000)
        .await
        .unwrap();
    let members = a.get_members_with_capabilities("g1").await.unwrap();
    assert_eq!(
        members
            .get(&MemberId::from("py1"))
            .map(Capabilities::as_msgpack),
        Some(&b"\x81\xa1a\x01"[..])
    );
    // A dead one (no beat key) is pruned from the hash by get_members, as Python does.
    let _: () = r
        .hset(format!("{ns}_group:g1"), "ghost", &b"\xc0"[..])
        .await
        .unwrap();
    let m = a.get_members("g1").await.unwrap();
    assert!(!m.contains(&MemberId::from("ghost")), "{m:?}");
    let still: bool = r.hexists(format!("{ns}_group:g1"), "ghost").await.unwrap();
    assert!(!still, "the dead member was not pruned");

    // Joining as an existing member fails without touching its capabilities
    // (Python overwrites them before raising).
    let twin = coordinator(&url, "m1");
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group("g1", &BTreeMap::from([("weight", 9)]))
            .await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    let caps: Vec<u8> = r.hget(format!("{ns}_group:g1"), "m1").await.unwrap();
    assert_eq!(caps, b"\x81\xa6weight\x05");

    // Reserved names.
    assert!(matches!(
        a.get_lock("leader_of_g1"),
        Err(ToozError::InvalidId { .. })
    ));
    assert!(matches!(
        registry().connect(&url, "__created__"),
        Err(ToozError::InvalidId { .. })
    ));

    // Member info comes from our side hash.
    let info = a.get_member_info("g1", "m1").await.unwrap();
    assert!(info.created_at.is_some() && info.updated_at.is_some());
    let py = a.get_member_info("g1", "py1").await.unwrap();
    assert_eq!(py.created_at, None);

    a.leave_group("g1").await.unwrap();
    let _: () = r.hdel(format!("{ns}_group:g1"), "py1").await.unwrap();
    a.delete_group("g1").await.unwrap();
    let left: bool = r.exists(format!("{ns}_group:g1")).await.unwrap();
    assert!(!left);
    twin.stop().await.unwrap();
    a.stop().await.unwrap();
    let beat: bool = r.exists(format!("{ns}_beats:m1")).await.unwrap();
    assert!(!beat, "stop did not delete the beat key");
    purge(&base, &ns).await;
}

#[tokio::test]
async fn python_lock_holders_and_leaders() {
    let Some(base) = server_url("python_lock_holders_and_leaders") else {
        return;
    };
    let (url, ns) = ns_url(&base, "pylock");
    let mut r = raw(&base).await;
    let a = coordinator(&url, "rust");
    a.start(true).await.unwrap();
    let key = format!("{ns}_job_lock");

    // A Python holder (uuid1 hex token, SET NX PX) excludes us...
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("0123456789abcdef0123456789abcdef")
        .arg("NX")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ok.is_some());
    let l = a.get_lock("job").unwrap();
    assert!(!l.acquire(Wait::No).await.unwrap());
    // ...and a waiter gets the lock soon after Python's release (a DEL, no publish).
    let waiter = {
        let l = l.clone();
        tokio::spawn(async move { l.acquire(Wait::For(Duration::from_secs(5))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: () = r.del(&key).await.unwrap();
    let t0 = Instant::now();
    assert!(waiter.await.unwrap().unwrap());
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    // Our token, with a TTL: Python's SET NX fails while we hold it.
    let v: String = r.get(&key).await.unwrap();
    assert!(v.starts_with("tooz-rs:"), "{v}");
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("py")
        .arg("NX")
        .arg("PX")
        .arg(1000)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ok.is_none());
    assert!(l.release().await.unwrap());

    // Shared holders keep Python out with the marker.
    let s1 = a.get_lock("job").unwrap();
    assert!(s1.acquire_shared(Wait::No).await.unwrap());
    let v: String = r.get(&key).await.unwrap();
    assert_eq!(v, "tooz-rs:shared");
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("py")
        .arg("NX")
        .arg("PX")
        .arg(1000)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ok.is_none(), "Python got a lock held shared");
    assert!(s1.release().await.unwrap());
    let gone: bool = r.exists(&key).await.unwrap();
    assert!(!gone, "the last reader left the marker behind");

    // A Python leader: the key holds its token, no owner side key.
    let lkey = format!("{ns}_leader_of_grp_lock");
    let _: () = r
        .pset_ex(&lkey, "fedcba9876543210fedcba9876543210", 10_000)
        .await
        .unwrap();
    a.create_group("grp").await.unwrap();
    assert_eq!(
        a.get_leader("grp").await.unwrap(),
        Some(MemberId::from("python-tooz-leader"))
    );
    assert!(a.try_become_leader("grp").await.unwrap().is_none());
    let _: () = r.del(&lkey).await.unwrap();
    assert!(a.try_become_leader("grp").await.unwrap().is_some());
    assert_eq!(
        a.get_leader("grp").await.unwrap(),
        Some(MemberId::from("rust"))
    );
    // Python's election (SET NX PX on the same key) sees it taken.
    let ok: Option<String> = redis::cmd("SET")
        .arg(&lkey)
        .arg("py")
        .arg("NX")
        .arg("PX")
        .arg(1000)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(ok.is_none(), "a Python candidate won while we lead");
    a.stop().await.unwrap();
    let gone: bool = r.exists(&lkey).await.unwrap();
    assert!(!gone, "stop left the leader key");
    purge(&base, &ns).await;
}

#[tokio::test]
async fn requests_per_operation() {
    let Some(base) = server_url("requests_per_operation") else {
        return;
    };
    let proxy = CountingProxy::start(host_port(&base)).await;
    let (url, _) = ns_url(&format!("redis://127.0.0.1:{}", proxy.port), "count");
    let a = coordinator(&url, "counted");
    a.start(false).await.unwrap();
    let mut b_conns = Vec::new();
    a.create_group("g").await.unwrap();
    for i in 0..3 {
        let c = coordinator(&url, &format!("other-{i}"));
        c.start(false).await.unwrap();
        c.join_group("g", &()).await.unwrap();
        b_conns.push(c);
    }
    // And 200 Python members, written as Python's driver writes them.
    let (_, ns) = url.split_once("namespace=").unwrap();
    let ns = ns.split('&').next().unwrap().to_string();
    let mut r = raw(&base).await;
    let mut p = redis::pipe();
    for i in 0..200 {
        p.hset(format!("{ns}_group:g"), format!("py-{i}"), &b"\xc0"[..])
            .ignore();
        p.pset_ex(format!("{ns}_beats:py-{i}"), "Not dead!", 60_000)
            .ignore();
    }
    let _: () = p.query_async(&mut r).await.unwrap();
    let measure = |label: &'static str, expected: u64| {
        let before = proxy.count();
        (label, expected, before)
    };
    let check = |(label, expected, before): (&str, u64, u64)| {
        let n = proxy.count() - before;
        assert_eq!(n, expected, "{label}: {n} requests");
    };

    // Warm: scripts are loaded at start.
    let m = measure("join", 1);
    a.join_group("g", &BTreeMap::from([("k", 1)]))
        .await
        .unwrap();
    check(m);
    let m = measure("get_members", 1);
    assert_eq!(a.get_members("g").await.unwrap().len(), 204);
    check(m);
    let m = measure("get_members_with_capabilities", 1);
    a.get_members_with_capabilities("g").await.unwrap();
    check(m);
    let m = measure("update_capabilities", 1);
    a.update_capabilities("g", &()).await.unwrap();
    check(m);

    let locks: Vec<_> = (0..5)
        .map(|i| a.get_lock(format!("l{i}")).unwrap())
        .collect();
    for l in &locks {
        let m = measure("acquire", 1);
        assert!(l.acquire(Wait::No).await.unwrap());
        check(m);
    }
    let shared = a.get_lock("shared").unwrap();
    assert!(shared.acquire_shared(Wait::No).await.unwrap());
    assert!(a.try_become_leader("g").await.unwrap().is_some());
    let m = measure("heartbeat with 6 holds, a leadership, a group", 1);
    a.heartbeat().await.unwrap();
    check(m);
    for l in &locks {
        let m = measure("release", 1);
        assert!(l.release().await.unwrap());
        check(m);
    }
    let m = measure("leave", 1);
    a.leave_group("g").await.unwrap();
    check(m);
    for c in b_conns {
        c.stop().await.unwrap();
    }
    a.stop().await.unwrap();
    purge(&base, &ns).await;
}

#[tokio::test]
async fn blocked_waiter_wakes_on_release() {
    let Some(base) = server_url("blocked_waiter_wakes_on_release") else {
        return;
    };
    let (url, ns) = ns_url(&base, "wake");
    let a = coordinator(&url, "a");
    let b = coordinator(&url, "b");
    a.start(true).await.unwrap();
    b.start(true).await.unwrap();
    let la = a.get_lock("hot").unwrap();
    let lb = b.get_lock("hot").unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        assert!(la.acquire(Wait::No).await.unwrap());
        let waiter = {
            let lb = lb.clone();
            tokio::spawn(async move {
                let r = lb.acquire(Wait::Forever).await;
                (r, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        assert!(la.release().await.unwrap());
        let (r, at) = waiter.await.unwrap();
        assert!(r.unwrap());
        worst = worst.max(at - t0);
        assert!(lb.release().await.unwrap());
    }
    eprintln!("worst release-to-acquire latency: {worst:?}");
    // The lock's TTL is 2 s: anything near that would be expiry, not a wake-up.
    // (Pushed wake-ups take about a millisecond; the bound leaves room for a
    // loaded CI machine.)
    assert!(worst < Duration::from_millis(200), "{worst:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    purge(&base, &ns).await;
}

#[tokio::test]
async fn server_restart_is_a_connection_error_then_recovers() {
    if !have_binary("server_restart", "redis-server") {
        return;
    }
    let port = free_port();
    let mut server = Server::start(port, &[]).await;
    let url = format!("{}?timeout=2&namespace=restart", server.url());
    let a = coordinator(&url, "a");
    a.start(false).await.unwrap();
    a.create_group("g").await.unwrap();
    a.join_group("g", &()).await.unwrap();
    let lock = a.get_lock("l").unwrap();
    // Make the pub/sub connection exist too.
    let mut events = a.events("g").await.unwrap();

    server.kill().await;
    let t0 = Instant::now();
    let e = a.get_groups().await.unwrap_err();
    assert!(matches!(e, ToozError::Connection { .. }), "{e:?}");
    assert!(e.is_retryable());
    let e = lock.acquire(Wait::No).await.unwrap_err();
    assert!(matches!(e, ToozError::Connection { .. }), "{e:?}");
    assert!(matches!(
        a.heartbeat().await,
        Err(ToozError::Connection { .. })
    ));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "failing during the outage took {:?}",
        t0.elapsed()
    );

    server.restart().await;
    // The very next operation succeeds (the dropped connection is replaced).
    assert_eq!(
        a.get_groups().await.unwrap(),
        Vec::<tooz_core::GroupId>::new()
    );
    // The first heartbeat finds the membership gone with the server's data, and the
    // coordinator creates the group again and re-joins it.
    a.heartbeat().await.unwrap();
    assert!(
        a.get_members("g")
            .await
            .unwrap()
            .contains(&MemberId::from("a"))
    );
    assert!(lock.acquire(Wait::No).await.unwrap());
    // Fencing tokens never go backwards, even though the server forgot the counter.
    let t1 = lock.fencing_token().unwrap();
    assert!(lock.release().await.unwrap());
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(lock.fencing_token().unwrap() > t1);
    assert!(lock.release().await.unwrap());

    // Pub/sub resubscribes: the event stream sees a join after the restart.
    let b = coordinator(&url, "b");
    b.start(false).await.unwrap();
    b.join_group("g", &()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.next_event()).await {
            Ok(Some(tooz_core::GroupEvent::MemberJoined { member, .. }))
                if member == MemberId::from("b") =>
            {
                seen = true;
                break;
            }
            Ok(None) => break,
            _ => {}
        }
    }
    assert!(seen, "no MemberJoined(b) after the restart");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn fencing_survives_restart_of_empty_server() {
    if !have_binary("fencing_survives_restart", "redis-server") {
        return;
    }
    let port = free_port();
    let mut server = Server::start(port, &[]).await;
    let url = format!("{}?timeout=2", server.url());
    let a = coordinator(&url, "a");
    a.start(false).await.unwrap();
    let l = a.get_lock("f").unwrap();
    let mut last = 0;
    for _ in 0..3 {
        assert!(l.acquire(Wait::No).await.unwrap());
        let t = l.fencing_token().unwrap().0;
        assert!(t > last);
        last = t;
        assert!(l.release().await.unwrap());
    }
    server.restart().await;
    let _ = a.get_groups().await;
    assert!(l.acquire(Wait::No).await.unwrap());
    assert!(l.fencing_token().unwrap().0 > last);
    assert!(l.release().await.unwrap());
    a.stop().await.unwrap();
}

#[tokio::test]
async fn sentinel_finds_the_master() {
    if !have_binary("sentinel_finds_the_master", "redis-server") {
        return;
    }
    let master_port = free_port();
    let master = Server::start(master_port, &[]).await;
    let sentinel_port = free_port();
    let _sentinel = Server::sentinel(sentinel_port, "tooz-master", master_port).await;
    let dead_port = free_port();
    let url = format!(
        "redis://127.0.0.1:{dead_port}?sentinel=tooz-master&sentinel_fallback=127.0.0.1:{sentinel_port}&timeout=2"
    );
    let a = coordinator(&url, "a");
    // The first sentinel is down; the fallback answers.
    a.start(true).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    let l = a.get_lock("l").unwrap();
    assert!(l.acquire(Wait::No).await.unwrap());
    // The data went to the master.
    let mut r = raw(&master.url()).await;
    let v: Option<String> = r.get("_tooz_l_lock").await.unwrap();
    assert!(v.is_some_and(|v| v.starts_with("tooz-rs:")));
    assert!(l.release().await.unwrap());
    a.stop().await.unwrap();

    // A sentinel that does not know the name.
    let bad = coordinator(
        &format!("redis://127.0.0.1:{sentinel_port}?sentinel=nosuchmaster&timeout=1"),
        "b",
    );
    let e = bad.start(false).await.unwrap_err();
    assert!(matches!(e, ToozError::Connection { .. }), "{e:?}");
}

#[tokio::test]
async fn unix_socket() {
    if !have_binary("unix_socket", "redis-server") {
        return;
    }
    let port = free_port();
    let sock = std::env::temp_dir().join(format!("{}.sock", unique_ns("sock")));
    let sock_s = sock.display().to_string();
    let _server = Server::start(port, &["--unixsocket", &sock_s, "--unixsocketperm", "700"]).await;
    let a = coordinator(&format!("redis://{sock_s}?timeout=2"), "a");
    a.start(false).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    assert_eq!(a.get_members("g").await.unwrap().len(), 1);
    a.stop().await.unwrap();
    let _ = std::fs::remove_file(&sock);
}

#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn tls_not_built_is_a_clear_error() {
    let e = registry().connect("rediss://127.0.0.1:1", "a").unwrap_err();
    assert!(matches!(e, ToozError::InvalidUrl { .. }), "{e:?}");
    let c = coordinator("redis://127.0.0.1:1?ssl=true", "a");
    let e = c.start(false).await.unwrap_err();
    assert!(
        matches!(&e, ToozError::InvalidOption { option, reason, .. } if option == "ssl" && reason.contains("tls")),
        "{e:?}"
    );
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate.
#[cfg(feature = "tls")]
fn make_certs(dir: &std::path::Path) -> bool {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=tooz-test-ca",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=tooz-client",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "1",
        "-extfile",
        "client.ext",
    ])
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_with_client_certificate() {
    if !have_binary("tls_with_client_certificate", "redis-server")
        || !have_binary("tls_with_client_certificate", "openssl")
    {
        return;
    }
    let certs = std::env::temp_dir().join(unique_ns("certs"));
    std::fs::create_dir_all(&certs).unwrap();
    assert!(
        make_certs(&certs),
        "openssl could not make test certificates"
    );
    let p = |f: &str| certs.join(f).display().to_string();
    let tls_port = free_port();
    let tls_port_s = tls_port.to_string();
    let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let plain = free_port();
    let _server = Server::start(
        plain,
        &[
            "--tls-port",
            &tls_port_s,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ],
    )
    .await;
    let url = format!(
        "rediss://127.0.0.1:{tls_port}?timeout=2&ssl_ca_certs={}&ssl_certfile={}&ssl_keyfile={}",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let a = coordinator(&url, "a");
    a.start(true).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    let l = a.get_lock("l").unwrap();
    assert!(l.acquire(Wait::No).await.unwrap());
    assert!(l.release().await.unwrap());
    // Pub/sub over TLS too.
    let mut events = a.events("g").await.unwrap();
    let b = coordinator(&url, "b");
    b.start(false).await.unwrap();
    b.join_group("g", &()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next_event())
        .await
        .unwrap();
    assert!(
        matches!(ev, Some(tooz_core::GroupEvent::MemberJoined { .. })),
        "{ev:?}"
    );
    b.stop().await.unwrap();
    a.stop().await.unwrap();

    // Without the client certificate the server refuses us: a connection error.
    let bare = coordinator(
        &format!(
            "rediss://127.0.0.1:{tls_port}?timeout=2&ssl_ca_certs={}",
            p("ca.pem")
        ),
        "c",
    );
    assert!(bare.start(false).await.is_err());
    // A missing certificate file names the option.
    let missing = coordinator(
        &format!("rediss://127.0.0.1:{tls_port}?timeout=2&ssl_ca_certs=/nonexistent/ca.pem"),
        "d",
    );
    let e = missing.start(false).await.unwrap_err();
    assert!(
        matches!(&e, ToozError::InvalidOption { option, .. } if option == "ssl_ca_certs"),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&certs);
}

// ----- lost replies ------------------------------------------------------------

/// Forward everything.
const FORWARD: u8 = 0;
/// Forward requests, drop the server's replies.
const SWALLOW: u8 = 1;
/// Close new connections at once.
const REFUSE: u8 = 2;

/// A TCP proxy in front of the server that can lose replies: in `SWALLOW` mode a
/// request reaches the server but its reply never comes back; `cut` then breaks
/// every open connection.
struct LossyProxy {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    async fn start(target: (String, u16)) -> LossyProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, cs) = (std::sync::Arc::clone(&mode), std::sync::Arc::clone(&conns));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == REFUSE {
                    continue;
                }
                let (target, m) = (target.clone(), std::sync::Arc::clone(&m));
                let conn = tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect((target.0.as_str(), target.1)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if m.load(Ordering::SeqCst) == FORWARD
                                && cw.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
                cs.lock().unwrap().push(conn.abort_handle());
            }
        });
        LossyProxy {
            port,
            mode,
            conns,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    /// Breaks every open connection (and refuses new ones until `set(FORWARD)`).
    fn cut(&self) {
        self.set(REFUSE);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Polls observable server state until `f` holds (at most `limit`).
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t0.elapsed()
}

async fn key_exists(r: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    r.exists::<_, bool>(key).await.unwrap()
}

/// Runs `op` with the server's reply swallowed, breaks the connection once `key`
/// shows that the server applied the request, and returns what `op` returned.
async fn with_lost_reply<T: Send + 'static>(
    proxy: &LossyProxy,
    r: &mut redis::aio::MultiplexedConnection,
    key: &str,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    proxy.set(SWALLOW);
    let task = tokio::spawn(op);
    eventually("the request to be applied", Duration::from_secs(10), || {
        let (mut r, key) = (r.clone(), key.to_string());
        async move { key_exists(&mut r, &key).await }
    })
    .await;
    proxy.cut();
    let out = task.await.unwrap();
    proxy.set(FORWARD);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_leave_no_hold_behind() {
    let Some(base) = server_url("lost_replies_leave_no_hold_behind") else {
        return;
    };
    let ns = unique_ns("lost");
    let proxy = LossyProxy::start(host_port(&base)).await;
    // A 30 s TTL: whatever is gone within a few seconds was freed, not expired.
    let opts = format!("namespace={ns}&timeout=30");
    let url = format!("redis://127.0.0.1:{}?{opts}", proxy.port);
    let direct = with_query(&base, &opts);
    let a = coordinator(&url, "a");
    a.start(false).await.unwrap();
    let b = coordinator(&direct, "b");
    b.start(false).await.unwrap();
    let mut r = raw(&base).await;
    let gone_within = Duration::from_secs(5);
    let r0 = r.clone();
    let gone = |key: String| {
        let r = r0.clone();
        move || {
            let (mut r, key) = (r.clone(), key.clone());
            async move { !key_exists(&mut r, &key).await }
        }
    };

    // Exclusive lock.
    let key = format!("{ns}_x_lock");
    let lock = a.get_lock("x").unwrap();
    let l = lock.clone();
    let res = with_lost_reply(
        &proxy,
        &mut r,
        &key,
        async move { l.acquire(Wait::No).await },
    )
    .await;
    assert!(res.is_err(), "{res:?}");
    assert!(!lock.is_held());
    let took = eventually("the exclusive hold to be freed", gone_within, gone(key)).await;
    eprintln!("exclusive hold freed {took:?} after the acquire failed");
    let theirs = b.get_lock("x").unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(theirs.release().await.unwrap());

    // Shared lock: the reader entry and the marker.
    let key = format!("{ns}_s_lock:readers");
    let lock = a.get_lock("s").unwrap();
    let l = lock.clone();
    let res = with_lost_reply(&proxy, &mut r, &key, async move {
        l.acquire_shared(Wait::No).await
    })
    .await;
    assert!(res.is_err(), "{res:?}");
    eventually("the reader entry to be freed", gone_within, gone(key)).await;
    eventually(
        "the shared marker to be freed",
        gone_within,
        gone(format!("{ns}_s_lock")),
    )
    .await;
    let theirs = b.get_lock("s").unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(theirs.release().await.unwrap());

    // Leadership.
    let key = format!("{ns}_leader_of_g_lock");
    let c = a.clone();
    let res = with_lost_reply(&proxy, &mut r, &key, async move {
        c.try_become_leader("g").await
    })
    .await;
    assert!(res.is_err(), "{res:?}");
    eventually("the leadership to be freed", gone_within, gone(key)).await;
    assert!(b.try_become_leader("g").await.unwrap().is_some());
    assert!(b.stand_down_group_leader("g").await.unwrap());

    // A release whose request cannot be sent is retried until it goes through.
    let key = format!("{ns}_x_lock");
    let lock = a.get_lock("x").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    proxy.cut();
    assert!(lock.release().await.is_err());
    assert!(key_exists(&mut r, &key).await);
    proxy.set(FORWARD);
    eventually("the failed release to be retried", gone_within, gone(key)).await;

    a.stop().await.unwrap();
    b.stop().await.unwrap();
    purge(&base, &ns).await;
}

/// The server lost a membership the driver had acknowledged (here: its field,
/// and another group's whole hash, deleted behind the driver's back, as a
/// failover with asynchronous replication or a restart without persistence
/// does): the next heartbeat notices it in its own request and the coordinator
/// re-joins with the member's last capabilities, re-creating the group it lost
/// with the member.
#[tokio::test]
async fn lost_membership_comes_back_after_one_heartbeat() {
    let Some(base) = server_url("lost_membership_comes_back_after_one_heartbeat") else {
        return;
    };
    let (url, ns) = ns_url(&base, "lostm");
    let mut r = raw(&base).await;
    let a = coordinator(&url, "m1");
    a.start(false).await.unwrap();
    let caps = BTreeMap::from([("weight", 7)]);
    for g in ["g1", "g2", "g3"] {
        a.create_group(g).await.unwrap();
        a.join_group(g, &caps).await.unwrap();
    }
    a.update_capabilities("g1", &BTreeMap::from([("weight", 9)]))
        .await
        .unwrap();
    let _: () = r.hdel(format!("{ns}_group:g1"), "m1").await.unwrap();
    let _: () = r.del(format!("{ns}_group:g2")).await.unwrap();
    assert!(
        !a.get_members("g1")
            .await
            .unwrap()
            .contains(&MemberId::from("m1"))
    );

    a.heartbeat().await.unwrap();

    let g1 = a.get_members_with_capabilities("g1").await.unwrap();
    assert_eq!(
        g1.get(&MemberId::from("m1")).map(Capabilities::as_msgpack),
        Some(&b"\x81\xa6weight\x09"[..]),
        "g1 after one heartbeat: {g1:?}"
    );
    let g2 = a.get_members_with_capabilities("g2").await.unwrap();
    assert_eq!(
        g2.get(&MemberId::from("m1")).map(Capabilities::as_msgpack),
        Some(&b"\x81\xa6weight\x07"[..]),
        "g2 after one heartbeat: {g2:?}"
    );
    assert!(
        a.get_members("g3")
            .await
            .unwrap()
            .contains(&MemberId::from("m1"))
    );
    assert_eq!(a.joined_groups().len(), 3);

    // A group left is not re-joined, even if a heartbeat raced the leave.
    a.leave_group("g1").await.unwrap();
    a.heartbeat().await.unwrap();
    assert!(
        !a.get_members("g1")
            .await
            .unwrap()
            .contains(&MemberId::from("m1"))
    );
    a.stop().await.unwrap();
    purge(&base, &ns).await;
}

/// A server restarted empty (no persistence) forgets every group: the heartbeat
/// task notices on its own, and the member is listed again.
#[tokio::test]
async fn membership_returns_after_restart_of_empty_server() {
    if !have_binary("membership_returns_after_restart", "redis-server") {
        return;
    }
    let port = free_port();
    let mut server = Server::start(port, &[]).await;
    let url = format!("{}?timeout=2", server.url());
    let a = coordinator(&url, "a");
    a.start(true).await.unwrap();
    a.join_group_create("g", &BTreeMap::from([("k", 1)]))
        .await
        .unwrap();
    server.restart().await;
    let b = coordinator(&url, "b");
    b.start(false).await.unwrap();
    let took = eventually(
        "a listed again after the restart",
        Duration::from_secs(10),
        || {
            let b = b.clone();
            async move {
                b.get_members("g")
                    .await
                    .is_ok_and(|m| m.contains(&MemberId::from("a")))
            }
        },
    )
    .await;
    let caps = b.get_member_capabilities("g", "a").await.unwrap();
    assert_eq!(caps.as_msgpack(), &b"\x81\xa1k\x01"[..]);
    eprintln!("membership back {took:?} after the restart");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// A large heartbeat is split into script calls of at most 500 keys, pipelined
/// in one round trip: 600 holds (1,200 keys) and a group make three calls, and
/// every hold is still renewed.
#[tokio::test]
async fn large_heartbeat_is_split_into_bounded_script_calls() {
    let Some(base) = server_url("large_heartbeat_is_split_into_bounded_script_calls") else {
        return;
    };
    let proxy = CountingProxy::start(host_port(&base)).await;
    let (url, ns) = ns_url(&format!("redis://127.0.0.1:{}", proxy.port), "split");
    let a = coordinator(&url, "big");
    a.start(false).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    let locks: Vec<_> = (0..600)
        .map(|i| a.get_lock(format!("l{i}")).unwrap())
        .collect();
    for l in &locks {
        assert!(l.acquire(Wait::No).await.unwrap());
    }
    // Every lock key gets a TTL far above the lock timeout (2 s): only a renewal
    // by this heartbeat brings it back under.
    let mut r = raw(&base).await;
    let mut p = redis::pipe();
    for i in 0..locks.len() {
        p.pexpire(format!("{ns}_l{i}_lock"), 600_000).ignore();
    }
    let _: () = p.query_async(&mut r).await.unwrap();
    let before = proxy.count();
    a.heartbeat().await.unwrap();
    assert_eq!(
        proxy.count() - before,
        3,
        "script calls for 600 holds and a group"
    );
    for (i, l) in locks.iter().enumerate() {
        let pttl: i64 = r.pttl(format!("{ns}_l{i}_lock")).await.unwrap();
        assert!(pttl > 0 && pttl <= 2000, "l{i}: pttl {pttl}, not renewed");
        assert!(l.is_held(), "l{i} lost by the split heartbeat");
    }
    // After the server forgot its scripts, the beat loads it and succeeds.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    a.heartbeat().await.unwrap();
    assert!(locks.iter().all(|l| l.is_held()));
    for l in &locks {
        assert!(l.release().await.unwrap());
    }
    a.stop().await.unwrap();
}

/// Coordinators whose requests go through `proxy` (no heartbeat: nothing but
/// their lock calls is counted), with a lock TTL long enough that no waiter's
/// timer fires during a test.
async fn counted_waiters(proxy: &CountingProxy, ns: &str, n: usize) -> Vec<tooz_core::Coordinator> {
    let url = format!("redis://127.0.0.1:{}?namespace={ns}&timeout=30", proxy.port);
    let mut out = Vec::new();
    for i in 0..n {
        let c = coordinator(&url, &format!("w{i}"));
        c.start(false).await.unwrap();
        out.push(c);
    }
    out
}

async fn zcard(r: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    r.zcard::<_, usize>(key).await.unwrap()
}

/// One release wakes one waiter: with several coordinators blocked on a lock,
/// each handoff costs exactly one attempt (plus the releasing holder's own
/// release), not one per waiter. Counted as script calls through a proxy only
/// the waiters use.
#[tokio::test]
async fn one_release_wakes_one_waiter() {
    let Some(base) = server_url("one_release_wakes_one_waiter") else {
        return;
    };
    const N: usize = 6;
    let ns = unique_ns("herd");
    let proxy = CountingProxy::start(host_port(&base)).await;
    let holder = coordinator(
        &with_query(&base, &format!("namespace={ns}&timeout=30")),
        "h",
    );
    holder.start(false).await.unwrap();
    let held = holder.get_lock("hot").unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    let waiters = counted_waiters(&proxy, &ns, N).await;
    let start = proxy.scripts();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (i, c) in waiters.iter().enumerate() {
        let lock = c.get_lock("hot").unwrap();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let got = lock.acquire(Wait::Forever).await.unwrap();
            let (go, wait) = tokio::sync::oneshot::channel::<()>();
            tx.send((i, got, go)).unwrap();
            wait.await.unwrap();
            assert!(lock.release().await.unwrap());
        }));
    }
    // Every waiter tried, subscribed and tried again (two script calls each)...
    eventually(
        "every waiter's second attempt",
        Duration::from_secs(10),
        || {
            let n = proxy.scripts() - start;
            async move { n >= 2 * N as u64 }
        },
    )
    .await;
    assert_eq!(proxy.scripts() - start, 2 * N as u64);
    // ... and the server ran those attempts (each waiter's requests share one
    // connection, in order).
    for c in &waiters {
        c.get_groups().await.unwrap();
    }
    let mut r = raw(&base).await;
    assert_eq!(zcard(&mut r, &format!("{ns}_hot_lock:queue")).await, N);

    let before = proxy.scripts();
    assert!(held.release().await.unwrap());
    let mut order = Vec::new();
    for _ in 0..N {
        let (i, got, go) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no waiter got the lock after a release")
            .unwrap();
        assert!(got, "waiter {i} gave up");
        order.push(i);
        go.send(()).unwrap();
    }
    for t in tasks {
        t.await.unwrap();
    }
    let used = proxy.scripts() - before;
    // One attempt per handoff and one release per waiter; a herd costs
    // N + (N - 1) + ... + 1 attempts instead.
    assert_eq!(
        used,
        2 * N as u64,
        "{used} script calls for {N} handoffs (order {order:?})"
    );
    assert_eq!(zcard(&mut r, &format!("{ns}_hot_lock:queue")).await, 0);
    holder.stop().await.unwrap();
    for c in waiters {
        c.stop().await.unwrap();
    }
    purge(&base, &ns).await;
}

/// Readers queued behind a writer are all woken by the writer's release (the
/// release names every sharing waiter at the head of the queue), each with one
/// attempt; a writer queued behind them is not woken.
#[tokio::test]
async fn release_wakes_the_queued_readers_together() {
    let Some(base) = server_url("release_wakes_the_queued_readers_together") else {
        return;
    };
    const READERS: usize = 3;
    let ns = unique_ns("readers");
    let proxy = CountingProxy::start(host_port(&base)).await;
    let holder = coordinator(
        &with_query(&base, &format!("namespace={ns}&timeout=30")),
        "h",
    );
    holder.start(false).await.unwrap();
    let held = holder.get_lock("rw").unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    let cs = counted_waiters(&proxy, &ns, READERS + 1).await;
    let mut r = raw(&base).await;
    let queue = format!("{ns}_rw_lock:queue");
    let start = proxy.scripts();
    let mut readers = Vec::new();
    for (i, c) in cs[..READERS].iter().enumerate() {
        let lock = c.get_lock("rw").unwrap();
        readers.push(tokio::spawn(async move {
            assert!(lock.acquire_shared(Wait::Forever).await.unwrap());
            lock
        }));
        eventually("a queued reader", Duration::from_secs(10), || {
            let q = queue.clone();
            let mut r = r.clone();
            async move { zcard(&mut r, &q).await == i + 1 }
        })
        .await;
    }
    let writer = cs[READERS].get_lock("rw").unwrap();
    let w = {
        let writer = writer.clone();
        tokio::spawn(async move { writer.acquire(Wait::Forever).await.unwrap() })
    };
    eventually("the queued writer", Duration::from_secs(10), || {
        let q = queue.clone();
        let mut r = r.clone();
        async move { zcard(&mut r, &q).await == READERS + 1 }
    })
    .await;
    assert_eq!(proxy.scripts() - start, 2 * (READERS as u64 + 1));

    let before = proxy.scripts();
    assert!(held.release().await.unwrap());
    let mut locks = Vec::new();
    for t in readers {
        locks.push(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a queued reader was not woken")
                .unwrap(),
        );
    }
    assert_eq!(
        proxy.scripts() - before,
        READERS as u64,
        "one attempt per reader"
    );
    assert!(!w.is_finished());
    assert_eq!(zcard(&mut r, &queue).await, 1, "the writer still queues");
    for l in &locks {
        assert!(l.release().await.unwrap());
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("the writer was not woken by the last reader's release")
            .unwrap()
    );
    assert!(writer.release().await.unwrap());
    holder.stop().await.unwrap();
    for c in cs {
        c.stop().await.unwrap();
    }
    purge(&base, &ns).await;
}

/// A waiter that gives up (its acquire dropped, or its deadline passed) leaves
/// the queue, so the next release wakes the one behind it.
#[tokio::test]
async fn waiters_that_give_up_leave_the_queue() {
    let Some(base) = server_url("waiters_that_give_up_leave_the_queue") else {
        return;
    };
    let ns = unique_ns("giveup");
    let proxy = CountingProxy::start(host_port(&base)).await;
    let holder = coordinator(
        &with_query(&base, &format!("namespace={ns}&timeout=30")),
        "h",
    );
    holder.start(false).await.unwrap();
    let held = holder.get_lock("q").unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    let cs = counted_waiters(&proxy, &ns, 3).await;
    let mut r = raw(&base).await;
    let queue = format!("{ns}_q_lock:queue");
    let queued = |n: usize| {
        let q = queue.clone();
        let r = r.clone();
        move || {
            let q = q.clone();
            let mut r = r.clone();
            async move { zcard(&mut r, &q).await == n }
        }
    };
    // First in the queue: a caller that goes away.
    let dropped = {
        let l = cs[0].get_lock("q").unwrap();
        tokio::spawn(async move { l.acquire(Wait::Forever).await })
    };
    eventually(
        "the first waiter queued",
        Duration::from_secs(10),
        queued(1),
    )
    .await;
    // Second: a short deadline.
    let short = cs[1].get_lock("q").unwrap();
    let timed = {
        let l = short.clone();
        tokio::spawn(async move { l.acquire(Wait::For(Duration::from_millis(300))).await })
    };
    eventually(
        "the second waiter queued",
        Duration::from_secs(10),
        queued(2),
    )
    .await;
    // Third: waits for good.
    let last = cs[2].get_lock("q").unwrap();
    let patient = {
        let l = last.clone();
        tokio::spawn(async move { l.acquire(Wait::Forever).await })
    };
    eventually(
        "the third waiter queued",
        Duration::from_secs(10),
        queued(3),
    )
    .await;

    dropped.abort();
    assert!(!timed.await.unwrap().unwrap(), "the deadline passed");
    eventually(
        "the two leaving the queue",
        Duration::from_secs(10),
        queued(1),
    )
    .await;
    assert!(held.release().await.unwrap());
    assert!(
        tokio::time::timeout(Duration::from_secs(10), patient)
            .await
            .expect("the remaining waiter was not woken")
            .unwrap()
            .unwrap()
    );
    assert_eq!(zcard(&mut r, &queue).await, 0);
    assert!(last.release().await.unwrap());
    holder.stop().await.unwrap();
    for c in cs {
        c.stop().await.unwrap();
    }
    purge(&base, &ns).await;
}

/// A waiter that crashed stalls nobody once its registration expired: the
/// release skips (and removes) it and wakes the live waiter behind it.
#[tokio::test]
async fn expired_registrations_are_skipped() {
    let Some(base) = server_url("expired_registrations_are_skipped") else {
        return;
    };
    let ns = unique_ns("expired");
    let url = with_query(&base, &format!("namespace={ns}&timeout=30"));
    let holder = coordinator(&url, "h");
    let waiter = coordinator(&url, "w");
    holder.start(false).await.unwrap();
    waiter.start(false).await.unwrap();
    let held = holder.get_lock("crash").unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    let mut r = raw(&base).await;
    let queue = format!("{ns}_crash_lock:queue");
    // A waiter from long ago, first in line, whose registration expired.
    let _: () = r.zadd(&queue, "0123456789abcdef01234567", 1).await.unwrap();
    let _: () = r
        .hset(
            format!("{ns}_crash_lock:waiters"),
            "0123456789abcdef01234567",
            "x1",
        )
        .await
        .unwrap();
    let lock = waiter.get_lock("crash").unwrap();
    let blocked = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire(Wait::For(Duration::from_secs(20))).await })
    };
    eventually("the live waiter queued", Duration::from_secs(10), || {
        let q = queue.clone();
        let mut r = r.clone();
        async move { zcard(&mut r, &q).await == 2 }
    })
    .await;
    assert!(held.release().await.unwrap());
    // Its own timer would fire only when the 30 s hold would have expired.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("the live waiter was not woken")
            .unwrap()
            .unwrap()
    );
    assert_eq!(zcard(&mut r, &queue).await, 0);
    assert!(lock.release().await.unwrap());
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
    purge(&base, &ns).await;
}
