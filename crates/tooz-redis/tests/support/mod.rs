//! Helpers for the integration tests: the backend URL (with the skip policy), a
//! private `redis-server` on a free loopback port, and a proxy counting the
//! commands a client sends.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener as TokioListener, TcpStream};
use tokio::process::{Child, Command};
use tooz_core::{ConnectOptions, Coordinator, Registry};

pub const URL_ENV: &str = "TOOZ_TEST_REDIS_URL";

fn required() -> bool {
    std::env::var("TOOZ_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
}

/// The shared server's URL, or `None` (after printing why) when the test should
/// be skipped. Panics when `TOOZ_REQUIRE_BACKENDS=1` and no URL is set.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                !required(),
                "{test}: {URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {URL_ENV} is not set");
            None
        }
    }
}

/// Whether `binary` can be run; otherwise prints a skip message (or panics when
/// backends are required).
pub fn have_binary(test: &str, binary: &str) -> bool {
    let version_flag = if binary == "openssl" {
        "version"
    } else {
        "--version"
    };
    let ok = std::process::Command::new(binary)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !required(),
            "{test}: `{binary}` is not installed and TOOZ_REQUIRE_BACKENDS=1"
        );
        eprintln!("SKIPPED {test}: `{binary}` is not installed");
    }
    ok
}

/// A namespace no other run uses.
pub fn unique_ns(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tooz-test-{label}-{}-{nanos:x}", std::process::id())
}

/// Appends query options to a URL.
pub fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

pub fn registry() -> Registry {
    Registry::new().with(tooz_redis::DRIVER)
}

/// An unstarted coordinator.
pub fn coordinator(url: &str, member: &str) -> Coordinator {
    registry()
        .connect_with(url, member, &ConnectOptions::new())
        .unwrap()
}

/// A raw client for checking what the driver wrote.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    let base = url.split('?').next().unwrap();
    redis::Client::open(base)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A loopback port nobody listens on (right now).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` (or sentinel) run by the test; killed on drop.
pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Server {
    /// Starts `redis-server` on `port` in a fresh directory with `extra` arguments
    /// (or, with `config`, from that configuration file text).
    pub async fn start(port: u16, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("tooz-redis-test-{}", unique_ns("srv")));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Server {
            port,
            dir,
            child: None,
            args,
        };
        s.spawn(None).await;
        s
    }

    /// Starts a sentinel on `port` monitoring `master_port` as `name`.
    pub async fn sentinel(port: u16, name: &str, master_port: u16) -> Server {
        let dir = std::env::temp_dir().join(format!("tooz-redis-test-{}", unique_ns("sent")));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {port}\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 1\nsentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 3000\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut s = Server {
            port,
            dir,
            child: None,
            args: vec![conf.display().to_string(), "--sentinel".into()],
        };
        s.spawn(None).await;
        s
    }

    async fn spawn(&mut self, _unused: Option<()>) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_ready(self.port).await;
    }

    /// Kills the server (SIGKILL: it saves nothing).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn(None).await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until something answers PING on `port`.
pub async fn wait_ready(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s.write_all(b"PING\r\n").await;
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
                && buf[..n].starts_with(b"+PONG")
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis on port {port} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts top-level RESP commands flowing from clients to the server.
#[derive(Default)]
struct RespCounter {
    /// Bytes not yet parsed.
    buf: Vec<u8>,
}

impl RespCounter {
    /// Feeds bytes; returns how many complete commands they finished and how
    /// many of those were script calls (`EVALSHA`/`EVAL`).
    fn feed(&mut self, data: &[u8]) -> (u64, u64) {
        self.buf.extend_from_slice(data);
        let (mut n, mut scripts) = (0, 0);
        while let Some(used) = parse_command(&self.buf) {
            if is_script_call(&self.buf[..used]) {
                scripts += 1;
            }
            self.buf.drain(..used);
            n += 1;
        }
        (n, scripts)
    }
}

/// Whether a complete command (as `parse_command` delimits it) is `EVALSHA` or `EVAL`.
fn is_script_call(cmd: &[u8]) -> bool {
    if cmd.first() != Some(&b'*') {
        return false;
    }
    let Some((_, at)) = line(cmd, 0) else {
        return false;
    };
    let Some((_, at)) = line(cmd, at) else {
        return false;
    };
    line(cmd, at).is_some_and(|(name, _)| {
        name.eq_ignore_ascii_case(b"evalsha") || name.eq_ignore_ascii_case(b"eval")
    })
}

fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = b.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

/// Length of one complete command at the start of `b` (an array of bulk strings,
/// or an inline command).
fn parse_command(b: &[u8]) -> Option<usize> {
    if b.is_empty() {
        return None;
    }
    if b[0] != b'*' {
        return line(b, 0).map(|(_, next)| next);
    }
    let (head, mut at) = line(b, 0)?;
    let count: usize = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    for _ in 0..count {
        let (h, next) = line(b, at)?;
        let len: usize = std::str::from_utf8(h.get(1..)?).ok()?.parse().ok()?;
        at = next + len + 2;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}

/// A TCP proxy in front of a Redis server that counts commands sent to it.
pub struct CountingProxy {
    pub port: u16,
    count: Arc<AtomicU64>,
    scripts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(target: (String, u16)) -> CountingProxy {
        let listener = TokioListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicU64::new(0));
        let scripts = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&count);
        let sc = Arc::clone(&scripts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                let c = Arc::clone(&c);
                let sc = Arc::clone(&sc);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect((target.0.as_str(), target.1)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut counter = RespCounter::default();
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let (cmds, scripts) = counter.feed(&buf[..n]);
                            c.fetch_add(cmds, Ordering::SeqCst);
                            sc.fetch_add(scripts, Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy {
            port,
            count,
            scripts,
            task,
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Script calls (`EVALSHA`/`EVAL`) counted so far: lock attempts, releases, …
    pub fn scripts(&self) -> u64 {
        self.scripts.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Host and port of a `redis://HOST:PORT` URL.
pub fn host_port(url: &str) -> (String, u16) {
    let u = url::Url::parse(url).unwrap();
    (
        u.host_str().unwrap_or("127.0.0.1").to_string(),
        u.port().unwrap_or(6379),
    )
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Deletes every key of namespace `ns` (end of a test on the shared server).
pub async fn purge(base: &str, ns: &str) {
    let mut r = raw(base).await;
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{ns}_*"))
        .query_async(&mut r)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut r)
            .await
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_counter() {
        let mut c = RespCounter::default();
        assert_eq!(c.feed(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET"), (1, 0));
        assert_eq!(c.feed(b"\r\n$1\r\nk\r\n"), (1, 0));
        assert_eq!(c.feed(b"PING\r\n"), (1, 0));
        assert_eq!(
            c.feed(b"*3\r\n$7\r\nevalsha\r\n$2\r\nab\r\n$1\r\n0\r\n"),
            (1, 1)
        );
        assert_eq!(c.feed(b"*2\r\n$4\r\nEVAL\r\n$1\r\nx\r\n"), (1, 1));
    }
}
