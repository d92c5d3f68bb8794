//! A fault-injecting TCP proxy, for checking lease safety through network faults.
//!
//! [`FaultProxy::start`] listens on `127.0.0.1:0` and forwards every connection it
//! accepts to a target address (a backend server). Point a coordinator at the
//! proxy instead of the server ([`proxied_url`]) and inject faults while it runs:
//!
//! | fault | what the client sees |
//! |---|---|
//! | [`freeze`](FaultProxy::freeze) / [`heal`](FaultProxy::heal) | a partition: silence in both directions, connections stay open; new connections are accepted but not forwarded |
//! | [`drop_next_reply`](FaultProxy::drop_next_reply) | its next request reaches the server, the reply is lost and the connection is reset: the outcome is unknown |
//! | [`delay`](FaultProxy::delay) | latency on every chunk, both ways |
//! | [`cut_all`](FaultProxy::cut_all) | every open connection reset at once |
//! | [`swallow_replies`](FaultProxy::swallow_replies) | requests reach the server, no reply ever comes back; connections stay open |
//! | [`refuse`](FaultProxy::refuse) | every new connection reset as soon as it is accepted (with `cut_all`: the server is gone) |
//!
//! and read [`FaultProxy::stats`] to check the faults happened.
//! [`FaultProxy::start_tapped`] also shows every chunk a client sends to a tap
//! of the test's, e.g. to count a protocol's requests.
//!
//! ```
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//! use tooz_conformance::fault::{FaultProxy, proxied_url};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // A server that echoes what it reads.
//! let server = TcpListener::bind("127.0.0.1:0").await?;
//! let target = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let mut buf = [0; 64];
//!             while let Ok(n @ 1..) = s.read(&mut buf).await {
//!                 if s.write_all(&buf[..n]).await.is_err() {
//!                     break;
//!                 }
//!             }
//!         });
//!     }
//! });
//!
//! let proxy = FaultProxy::start(target).await?;
//! let url = proxied_url(&format!("redis://{target}/0?timeout=2"), &proxy)?;
//! assert_eq!(url, format!("redis://{}/0?timeout=2", proxy.addr()));
//!
//! let mut c = TcpStream::connect(proxy.addr()).await?;
//! c.write_all(b"ping").await?;
//! let mut buf = [0; 4];
//! c.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//!
//! // A partition: the request goes nowhere...
//! proxy.freeze();
//! c.write_all(b"lost?").await?;
//! let mut buf = [0; 5];
//! let silent = tokio::time::timeout(Duration::from_millis(100), c.read_exact(&mut buf)).await;
//! assert!(silent.is_err());
//! // ...until it heals: held bytes are then delivered.
//! proxy.heal();
//! c.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"lost?");
//!
//! // The next reply is lost with its connection.
//! let n = proxy.drop_next_reply();
//! c.write_all(b"set").await?;
//! assert!(matches!(c.read(&mut buf).await, Ok(0) | Err(_)));
//! proxy.dropped(n).await;
//! assert_eq!(proxy.stats().replies_dropped, 1);
//! # Ok(())
//! # }
//! ```
//!
//! Dropping the last clone of a [`FaultProxy`] closes the listener and ends every
//! task of the proxy: the connections through it are closed.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// The largest chunk read (and forwarded) in one go.
const CHUNK: usize = 16 * 1024;

/// Chunks queued per direction of a connection (read, not yet written).
const QUEUE: usize = 64;

/// A fault-injecting TCP proxy: see the [module documentation](self).
///
/// Cheap to clone; every clone controls the same proxy, which runs until the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    owner: Arc<Owner>,
}

/// What the proxy has done so far ([`FaultProxy::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections open now.
    pub open: u64,
    /// Bytes forwarded from clients to the server.
    pub bytes_to_server: u64,
    /// Bytes forwarded from the server to clients.
    pub bytes_to_client: u64,
    /// Replies swallowed by [`FaultProxy::drop_next_reply`] (faults that fired).
    pub replies_dropped: u64,
    /// Connections reset by the proxy: by [`FaultProxy::cut_all`], by a dropped
    /// reply, by [`FaultProxy::refuse`], or because the other side failed.
    pub reset: u64,
    /// Bytes from the server discarded by [`FaultProxy::swallow_replies`].
    pub bytes_swallowed: u64,
}

/// The fault settings every connection follows.
#[derive(Debug, Clone, Copy, Default)]
struct Ctl {
    frozen: bool,
    delay: Duration,
    /// Bumped by `cut_all`: connections accepted under an older value are reset.
    cut_gen: u64,
    /// `swallow_replies`: server bytes are discarded.
    swallow: bool,
    /// `refuse`: new connections are reset at once.
    refuse: bool,
}

/// One tap per client connection, seeing each chunk the client sends.
type Tap = Box<dyn FnMut(&[u8]) + Send>;

/// Makes the tap of each new connection ([`FaultProxy::start_tapped`]).
#[derive(Clone)]
struct TapFactory(Arc<dyn Fn() -> Tap + Send + Sync>);

impl std::fmt::Debug for TapFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TapFactory")
    }
}

#[derive(Debug, Default)]
struct Arm {
    armed: bool,
    /// `drop_next_reply` faults armed so far.
    issued: u64,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    ctl: watch::Sender<Ctl>,
    arm: Mutex<Arm>,
    dropped: watch::Sender<u64>,
    accepted: AtomicU64,
    open: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
    reset: AtomicU64,
    swallowed: AtomicU64,
    tap: Option<TapFactory>,
}

impl Shared {
    fn arm(&self) -> std::sync::MutexGuard<'_, Arm> {
        self.arm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the armed `drop_next_reply` fault, if any.
    fn take_arm(&self) -> bool {
        std::mem::take(&mut self.arm().armed)
    }
}

/// Owned by the handles: the last one dropped stops the accept task, whose
/// `JoinSet` aborts every connection task as it is dropped.
#[derive(Debug)]
struct Owner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `target`
    /// (connecting once per client connection). Must be called inside a Tokio
    /// runtime; the proxy's tasks run on it.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        Self::launch(target, None).await
    }

    /// Like [`FaultProxy::start`], with a tap on what clients send: `make_tap` is
    /// called once per accepted connection, and the tap it returns sees every chunk
    /// of that client's bytes, in order, as the proxy reads it (before it is
    /// forwarded, faults permitting). A test counts a protocol's requests this way,
    /// the tap parsing the stream and adding to a counter the test holds.
    ///
    /// # Errors
    /// When the listening socket cannot be bound.
    pub async fn start_tapped<F, T>(target: SocketAddr, make_tap: F) -> io::Result<FaultProxy>
    where
        F: Fn() -> T + Send + Sync + 'static,
        T: FnMut(&[u8]) + Send + 'static,
    {
        let factory = TapFactory(Arc::new(move || -> Tap { Box::new(make_tap()) }));
        Self::launch(target, Some(factory)).await
    }

    async fn launch(target: SocketAddr, tap: Option<TapFactory>) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            ctl: watch::Sender::new(Ctl::default()),
            arm: Mutex::new(Arm::default()),
            dropped: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            swallowed: AtomicU64::new(0),
            tap,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared))).abort_handle();
        Ok(FaultProxy {
            owner: Arc::new(Owner {
                addr,
                shared,
                accept,
            }),
        })
    }

    /// Where the proxy listens (connect here instead of the target).
    pub fn addr(&self) -> SocketAddr {
        self.owner.addr
    }

    /// Where the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared().target
    }

    fn shared(&self) -> &Shared {
        &self.owner.shared
    }

    fn update(&self, f: impl FnOnce(&mut Ctl)) {
        self.shared().ctl.send_modify(f);
    }

    /// A network partition, until [`heal`](Self::heal): nothing is forwarded in
    /// either direction on any connection, existing or new. Connections stay open
    /// (clients and server see silence, not resets); bytes sent meanwhile are held,
    /// not lost. New client connections are accepted, but the proxy connects them to
    /// the server only after the heal.
    pub fn freeze(&self) {
        self.update(|c| c.frozen = true);
    }

    /// Ends a [`freeze`](Self::freeze): connections resume, and the bytes held
    /// during the freeze are delivered, as TCP's retransmissions would after a
    /// short partition. To model a partition long enough for TCP to give up, call
    /// [`cut_all`](Self::cut_all) before `heal`. Other faults (delay, an armed
    /// dropped reply) are unchanged.
    pub fn heal(&self) {
        self.update(|c| c.frozen = false);
    }

    /// Whether the proxy is frozen.
    pub fn is_frozen(&self) -> bool {
        self.shared().ctl.borrow().frozen
    }

    /// Arms a lost reply: the next chunk of client bytes, on any connection, is
    /// forwarded to the server; the next bytes the server sends on that connection
    /// (its reply) are swallowed, and the connection is reset on both sides, so the
    /// client cannot tell whether its request took effect. Bytes the client sends
    /// after that request are not forwarded.
    ///
    /// Returns the fault's number `n`: once it fired, [`replies_dropped`] is at
    /// least `n` ([`dropped(n)`](Self::dropped) waits for that). Arming while a
    /// fault is armed and not yet taken by a request changes nothing and returns
    /// the same number.
    ///
    /// A connection that ends before its reply comes (the server closes it, or
    /// [`cut_all`](Self::cut_all)) counts as fired once its request was sent. The
    /// "reply" is whatever the server sends next, which for a protocol with
    /// unsolicited messages (pings, watch events) may be one of those.
    ///
    /// [`replies_dropped`]: ProxyStats::replies_dropped
    pub fn drop_next_reply(&self) -> u64 {
        let mut arm = self.shared().arm();
        if !arm.armed {
            arm.armed = true;
            arm.issued += 1;
        }
        arm.issued
    }

    /// Disarms a [`drop_next_reply`](Self::drop_next_reply) fault that no request
    /// has taken yet. Returns whether one was armed.
    pub fn disarm(&self) -> bool {
        self.shared().take_arm()
    }

    /// Waits until at least `n` replies were dropped.
    pub async fn dropped(&self, n: u64) {
        let mut rx = self.shared().dropped.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(|&d| d >= n).await;
    }

    /// Adds `delay` to every chunk forwarded from now on, in both directions (a
    /// request/reply round trip takes at least twice as long); `Duration::ZERO`
    /// removes it. Chunks are delayed from the moment the proxy read them, so the
    /// latency is not multiplied by queueing.
    pub fn delay(&self, delay: Duration) {
        self.update(|c| c.delay = delay);
    }

    /// Resets every open connection now (both sides see a reset). Connections
    /// accepted afterwards are forwarded as usual (unless frozen).
    pub fn cut_all(&self) {
        self.update(|c| c.cut_gen += 1);
    }

    /// Lost replies, until [`clear`](Self::clear): requests are still forwarded
    /// to the server, and take effect there, but every byte the server sends, on
    /// every connection (open now or accepted later), is discarded. Connections
    /// stay open: the client waits for replies that never come. Unlike
    /// [`drop_next_reply`](Self::drop_next_reply), nothing is reset: follow with
    /// [`cut_all`](Self::cut_all) (and [`refuse`](Self::refuse)) once the request
    /// took effect to fail the client's call.
    pub fn swallow_replies(&self) {
        self.update(|c| c.swallow = true);
    }

    /// Refused connections, until [`clear`](Self::clear): every client connection
    /// accepted from now on is reset at once, before the proxy connects to the
    /// server. Open connections are left alone; with [`cut_all`](Self::cut_all)
    /// the server is gone for the client, which fails fast instead of hanging as
    /// behind a [`freeze`](Self::freeze).
    pub fn refuse(&self) {
        self.update(|c| c.refuse = true);
    }

    /// Clears every fault: heals, removes the delay, disarms a dropped reply, stops
    /// swallowing replies and refusing connections.
    pub fn clear(&self) {
        self.update(|c| {
            c.frozen = false;
            c.delay = Duration::ZERO;
            c.swallow = false;
            c.refuse = false;
        });
        self.disarm();
    }

    /// The counters.
    pub fn stats(&self) -> ProxyStats {
        let s = self.shared();
        ProxyStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            bytes_to_server: s.to_server.load(Ordering::Relaxed),
            bytes_to_client: s.to_client.load(Ordering::Relaxed),
            replies_dropped: *s.dropped.borrow(),
            reset: s.reset.load(Ordering::Relaxed),
            bytes_swallowed: s.swallowed.load(Ordering::Relaxed),
        }
    }
}

/// Rewrites the first `host:port` of a `scheme://[user[:password]@]host[:port][,host2…][/path][?query][#fragment]`
/// URL to the proxy's address, keeping everything else (a second host of a
/// multi-host URL is left alone: clients that fail over to it bypass the proxy).
///
/// # Errors
/// `InvalidInput` when the URL has no `scheme://` or no host.
pub fn proxied_url(url: &str, proxy: &FaultProxy) -> io::Result<String> {
    let (start, end) = first_host_span(url)?;
    Ok(format!("{}{}{}", &url[..start], proxy.addr(), &url[end..]))
}

/// The address of the first `host:port` of a URL (as [`proxied_url`] reads it),
/// resolved, preferring IPv4: what to give [`FaultProxy::start`] as target.
///
/// # Errors
/// `InvalidInput` for a URL without a host or port; name resolution errors.
pub fn url_target(url: &str) -> io::Result<SocketAddr> {
    let (start, end) = first_host_span(url)?;
    let host = &url[start..end];
    let addrs: Vec<SocketAddr> = host.to_socket_addrs()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| invalid(format!("{host} resolves to no address")))
}

/// Whether `url` names several servers a client may fail over between: a host list
/// (`scheme://h1:p1,h2:p2/…`) or Redis Sentinels (a `sentinel` option). A proxy in
/// front of the first one ([`proxied_url`]) does not cut such a client off.
pub fn names_several_servers(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let query = rest
        .split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or(""));
    authority.contains(',')
        || query
            .split('&')
            .any(|kv| kv.split('=').next() == Some("sentinel"))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Byte range of the first `host[:port]` in `url`.
pub(crate) fn first_host_span(url: &str) -> io::Result<(usize, usize)> {
    let after_scheme = url
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| invalid(format!("not a scheme://host URL: {url:?}")))?;
    let rest = &url[after_scheme..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let hosts_from = authority.rfind('@').map_or(0, |i| i + 1);
    let hosts = &authority[hosts_from..];
    // A bracketed IPv6 literal may hold no comma, but keep its colons.
    let first_len = hosts.find(',').unwrap_or(hosts.len());
    if first_len == 0 {
        return Err(invalid(format!("no host in {url:?}")));
    }
    let start = after_scheme + hosts_from;
    Ok((start, start + first_len))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((client, _)) => {
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    let gen0 = shared.ctl.borrow().cut_gen;
                    conns.spawn(serve(Arc::clone(&shared), client, gen0));
                }
                // Out of descriptors and the like: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Counts a connection as open while it lives (also when its task is aborted).
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a connection stands with a dropped reply.
const NORMAL: u8 = 0;
/// It took the armed fault: its request is queued, not yet written.
const TAKEN: u8 = 1;
/// The request was written to the server: the next server bytes fire the fault.
const SENT: u8 = 2;

/// How long a connection whose doomed request went out waits for the server's
/// reply before it is cut anyway (the request may have been a frame the server
/// does not answer, such as an HTTP/2 window update).
const REPLY_GRACE: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Conn {
    doom: AtomicU8,
    fire: Notify,
    /// Notified when the doomed request was written to the server.
    sent: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

enum End {
    Closed,
    Failed,
    Cut,
    Fired,
}

async fn wait_thawed(ctl: &mut watch::Receiver<Ctl>) {
    // The sender lives in `Shared`, which this task holds: no error.
    let _ = ctl.wait_for(|c| !c.frozen).await;
}

async fn wait_cut(mut ctl: watch::Receiver<Ctl>, gen0: u64) {
    let _ = ctl.wait_for(|c| c.cut_gen != gen0).await;
}

fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// One client connection, from accept to close.
async fn serve(shared: Arc<Shared>, mut client: TcpStream, gen0: u64) {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&shared.open);
    let ctl = shared.ctl.subscribe();
    if ctl.borrow().refuse {
        shared.reset.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        return;
    }
    let connect = async {
        wait_thawed(&mut ctl.clone()).await;
        TcpStream::connect(shared.target).await
    };
    let mut server = tokio::select! {
        biased;
        () = wait_cut(ctl.clone(), gen0) => {
            shared.reset.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
        res = connect => match res {
            Ok(s) => s,
            Err(_) => {
                // The server is unreachable: so is it through the proxy.
                reset(&client);
                return;
            }
        },
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let conn = Conn {
        doom: AtomicU8::new(NORMAL),
        fire: Notify::new(),
        sent: Notify::new(),
    };
    let end = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let tap = shared.tap.as_ref().map(|make| (make.0)());
        let up = pump(&shared, &conn, Dir::ToServer, cr, sw, ctl.clone(), tap);
        let down = pump(&shared, &conn, Dir::ToClient, sr, cw, ctl.clone(), None);
        tokio::select! {
            biased;
            () = wait_cut(ctl.clone(), gen0) => End::Cut,
            () = conn.fire.notified() => End::Fired,
            () = async {
                conn.sent.notified().await;
                tokio::time::sleep(REPLY_GRACE).await;
            } => End::Fired,
            res = async { tokio::try_join!(up, down) } => match res {
                Ok(_) => End::Closed,
                Err(()) => End::Failed,
            },
        }
    };
    let sent = conn.doom.load(Ordering::SeqCst) == SENT;
    if sent {
        // Counted before the client can see the reset, so that a client that got
        // an error can tell the fault fired.
        shared.dropped.send_modify(|d| *d += 1);
    }
    match end {
        End::Closed => {}
        End::Failed | End::Cut | End::Fired => {
            shared.reset.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            reset(&server);
        }
    }
    drop((client, server));
}

/// Forwards one direction of a connection: a reader queueing chunks with the time
/// they were read, and a writer sending each once its delay passed and the proxy
/// is not frozen. `Err` when either side failed; `Ok` after a clean end of stream,
/// passed on as a half-close. `tap` sees each chunk read, before anything else.
async fn pump(
    shared: &Shared,
    conn: &Conn,
    dir: Dir,
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    ctl: watch::Receiver<Ctl>,
    mut tap: Option<Tap>,
) -> Result<(), ()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>, bool)>(QUEUE);
    let mut read_ctl = ctl.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            wait_thawed(&mut read_ctl).await;
            if dir == Dir::ToServer && conn.doom.load(Ordering::SeqCst) != NORMAL {
                // Nothing after the doomed request is forwarded.
                std::future::pending::<()>().await;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => {
                    if dir == Dir::ToClient && conn.doom.load(Ordering::SeqCst) == SENT {
                        conn.fire.notify_one();
                        std::future::pending::<()>().await;
                    }
                    return Err(());
                }
            };
            let at = Instant::now();
            if let Some(tap) = tap.as_mut() {
                tap(&buf[..n]);
            }
            let doomed = match dir {
                Dir::ToServer => {
                    let take = conn.doom.load(Ordering::SeqCst) == NORMAL && shared.take_arm();
                    if take {
                        conn.doom.store(TAKEN, Ordering::SeqCst);
                    }
                    take
                }
                Dir::ToClient => {
                    if conn.doom.load(Ordering::SeqCst) == SENT {
                        // The reply to the doomed request: swallow it and cut.
                        conn.fire.notify_one();
                        std::future::pending::<()>().await;
                    }
                    if read_ctl.borrow().swallow {
                        shared.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    false
                }
            };
            if tx.send((at, buf[..n].to_vec(), doomed)).await.is_err() {
                // The writer failed (and reported it).
                return Ok(());
            }
        }
        if dir == Dir::ToClient && conn.doom.load(Ordering::SeqCst) == SENT {
            // The server closed instead of replying: the outcome is still unknown.
            conn.fire.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    };
    let mut write_ctl = ctl;
    let counter = match dir {
        Dir::ToServer => &shared.to_server,
        Dir::ToClient => &shared.to_client,
    };
    let writer = async move {
        while let Some((at, data, doomed)) = rx.recv().await {
            let delay = write_ctl.borrow().delay;
            if !delay.is_zero() {
                tokio::time::sleep_until(at + delay).await;
            }
            wait_thawed(&mut write_ctl).await;
            to.write_all(&data).await.map_err(|_| ())?;
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            if doomed {
                conn.doom.store(SENT, Ordering::SeqCst);
                conn.sent.notify_one();
            }
        }
        // End of stream: pass the half-close on.
        to.shutdown().await.map_err(|_| ())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn several_servers() {
        assert!(names_several_servers("zookeeper://a:1,b:2,c:3/x"));
        assert!(names_several_servers("etcd3+http://a:1,b:2"));
        assert!(names_several_servers(
            "redis://a:26379?sentinel=m&sentinel_fallback=b:26380"
        ));
        assert!(names_several_servers("redis://a:26379?db=0&sentinel=m"));
        assert!(!names_several_servers("redis://a:6379?sentinel_ssl=false"));
        assert!(!names_several_servers("zookeeper://a:2181/x,y?timeout=1"));
        assert!(!names_several_servers("file:///tmp/x"));
        assert!(!names_several_servers("memory://x"));
    }

    use super::*;
    use std::sync::Weak;

    /// A request/reply server: answers each chunk `c` with `re:c`, and reports
    /// every chunk it received, every connection it accepted and how each ended.
    struct Server {
        addr: SocketAddr,
        received: mpsc::UnboundedReceiver<Vec<u8>>,
        accepted: Arc<AtomicU64>,
        ended: mpsc::UnboundedReceiver<io::Result<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn server() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (rtx, received) = mpsc::unbounded_channel();
        let (etx, ended) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let acc = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (rtx, etx) = (rtx.clone(), etx.clone());
                conns.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                let _ = rtx.send(buf[..n].to_vec());
                                let mut reply = b"re:".to_vec();
                                reply.extend_from_slice(&buf[..n]);
                                if let Err(e) = s.write_all(&reply).await {
                                    break Err(e);
                                }
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    let _ = etx.send(end);
                });
            }
        });
        Server {
            addr,
            received,
            accepted,
            ended,
            task,
        }
    }

    async fn connect(p: &FaultProxy) -> TcpStream {
        TcpStream::connect(p.addr()).await.unwrap()
    }

    /// Sends `req` and reads the reply `re:req`, within `within`.
    async fn round_trip(c: &mut TcpStream, req: &[u8], within: Duration) -> io::Result<Vec<u8>> {
        c.write_all(req).await?;
        let mut buf = vec![0u8; req.len() + 3];
        tokio::time::timeout(within, c.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no reply"))??;
        Ok(buf)
    }

    /// The connection is closed or reset: a read gives end of stream or an error.
    async fn assert_closed(c: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let res = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(matches!(res, Ok(0) | Err(_)), "{res:?}");
    }

    const LONG: Duration = Duration::from_secs(5);
    const SILENCE: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn forwards_and_counts() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        assert_eq!(p.target(), srv.addr);
        let mut a = connect(&p).await;
        let mut b = connect(&p).await;
        assert_eq!(round_trip(&mut a, b"one", LONG).await.unwrap(), b"re:one");
        assert_eq!(round_trip(&mut b, b"two", LONG).await.unwrap(), b"re:two");
        let s = p.stats();
        assert_eq!((s.accepted, s.open), (2, 2));
        assert_eq!((s.bytes_to_server, s.bytes_to_client), (6, 12));
        assert_eq!((s.replies_dropped, s.reset), (0, 0));
        // A client's close is passed on as a close, not a reset.
        drop(a);
        assert!(srv.ended.recv().await.unwrap().is_ok());
        drop(b);
        assert!(srv.ended.recv().await.unwrap().is_ok());
        tokio::time::timeout(LONG, async {
            while p.stats().open > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(srv.received.recv().await.unwrap(), b"one");
    }

    #[tokio::test]
    async fn freeze_is_silence_until_heal() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        round_trip(&mut a, b"hello", LONG).await.unwrap();
        assert_eq!(srv.received.recv().await.unwrap(), b"hello");
        p.freeze();
        assert!(p.is_frozen());
        // An open connection: the request does not reach the server, no reply, no reset.
        let e = round_trip(&mut a, b"req1", SILENCE).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A new connection is accepted but not forwarded.
        let mut b = connect(&p).await;
        let e = round_trip(&mut b, b"req2", SILENCE).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            srv.received.try_recv().is_err(),
            "nothing reached the server"
        );
        assert_eq!(srv.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(p.stats().accepted, 2);
        assert_eq!(p.stats().reset, 0);
        // Heal: held requests are delivered and answered.
        p.heal();
        let mut buf = [0u8; 7];
        tokio::time::timeout(LONG, a.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"re:req1");
        tokio::time::timeout(LONG, b.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"re:req2");
        assert_eq!(srv.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(
            round_trip(&mut a, b"after", LONG).await.unwrap(),
            b"re:after"
        );
    }

    #[tokio::test]
    async fn freeze_then_cut_closes_connections() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        round_trip(&mut a, b"x", LONG).await.unwrap();
        p.freeze();
        let e = round_trip(&mut a, b"y", SILENCE).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A connection accepted during the freeze is cut too.
        let mut b = connect(&p).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        p.cut_all();
        assert_closed(&mut a).await;
        assert_closed(&mut b).await;
        assert!(
            srv.ended.recv().await.unwrap().is_err(),
            "the server side is reset"
        );
        p.heal();
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"z", LONG).await.unwrap(), b"re:z");
        assert_eq!(p.stats().reset, 2);
    }

    #[tokio::test]
    async fn drop_next_reply_forwards_then_cuts() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        let mut b = connect(&p).await;
        round_trip(&mut a, b"warm", LONG).await.unwrap();
        assert_eq!(srv.received.recv().await.unwrap(), b"warm");
        let n = p.drop_next_reply();
        assert_eq!(n, 1);
        assert_eq!(p.drop_next_reply(), 1, "arming twice is one fault");
        a.write_all(b"set k v").await.unwrap();
        // The server got the request...
        let got = tokio::time::timeout(LONG, srv.received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"set k v");
        // ...and the client gets no reply, only the end of its connection.
        assert_closed(&mut a).await;
        tokio::time::timeout(LONG, p.dropped(n)).await.unwrap();
        let s = p.stats();
        assert_eq!((s.replies_dropped, s.reset), (1, 1));
        // The server's reply was swallowed: only "re:warm" reached a client.
        assert_eq!(s.bytes_to_client, 7);
        // It fired once: other and later connections work.
        assert_eq!(round_trip(&mut b, b"get", LONG).await.unwrap(), b"re:get");
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"get", LONG).await.unwrap(), b"re:get");
        // A disarmed fault does not fire.
        assert_eq!(p.drop_next_reply(), 2);
        assert!(p.disarm());
        assert!(!p.disarm());
        assert_eq!(
            round_trip(&mut c, b"again", LONG).await.unwrap(),
            b"re:again"
        );
        assert_eq!(p.stats().replies_dropped, 1);
    }

    #[tokio::test]
    async fn delay_adds_latency_both_ways() {
        let srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        round_trip(&mut a, b"warm", LONG).await.unwrap();
        let d = Duration::from_millis(150);
        p.delay(d);
        let t = std::time::Instant::now();
        round_trip(&mut a, b"slow", LONG).await.unwrap();
        let rtt = t.elapsed();
        assert!(rtt >= 2 * d, "{rtt:?}");
        assert!(rtt < 2 * d + Duration::from_secs(2), "{rtt:?}");
        // Pipelined: ten requests sent at once take about one round trip, not ten.
        let t = std::time::Instant::now();
        for i in 0..10u8 {
            a.write_all(&[b'A' + i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Chunks may coalesce on the way ("re:AB"): count the request letters.
        let mut buf: Vec<u8> = Vec::new();
        while buf.iter().filter(|b| b.is_ascii_uppercase()).count() < 10 {
            let mut chunk = [0u8; 64];
            let n = tokio::time::timeout(LONG, a.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let all = t.elapsed();
        assert!(all >= 2 * d && all < 6 * d, "{all:?}");
        p.delay(Duration::ZERO);
        let t = std::time::Instant::now();
        round_trip(&mut a, b"fast", LONG).await.unwrap();
        assert!(t.elapsed() < d, "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn cut_all_resets_every_connection() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        let mut b = connect(&p).await;
        round_trip(&mut a, b"1", LONG).await.unwrap();
        round_trip(&mut b, b"2", LONG).await.unwrap();
        p.cut_all();
        assert_closed(&mut a).await;
        assert_closed(&mut b).await;
        for _ in 0..2 {
            assert!(srv.ended.recv().await.unwrap().is_err());
        }
        assert_eq!(p.stats().reset, 2);
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"3", LONG).await.unwrap(), b"re:3");
        assert_eq!(p.stats().open, 1);
    }

    #[tokio::test]
    async fn swallowed_replies_and_refused_connections() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let mut a = connect(&p).await;
        round_trip(&mut a, b"1", LONG).await.unwrap();
        assert_eq!(srv.received.recv().await.unwrap(), b"1");
        p.swallow_replies();
        // The request takes effect; its reply never comes, and nothing is reset.
        let lost = round_trip(&mut a, b"2", SILENCE).await.unwrap_err();
        assert_eq!(lost.kind(), io::ErrorKind::TimedOut);
        assert_eq!(srv.received.recv().await.unwrap(), b"2");
        tokio::time::timeout(LONG, async {
            while p.stats().bytes_swallowed < 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the reply re:2 was swallowed");
        assert_eq!((p.stats().reset, p.stats().open), (0, 1));
        // Refused: a new connection is reset before reaching the server; the open
        // one stays until cut.
        p.refuse();
        let mut b = connect(&p).await;
        assert_closed(&mut b).await;
        assert_eq!(p.stats().reset, 1);
        p.cut_all();
        assert_closed(&mut a).await;
        assert!(srv.ended.recv().await.unwrap().is_err());
        p.clear();
        let mut c = connect(&p).await;
        assert_eq!(round_trip(&mut c, b"3", LONG).await.unwrap(), b"re:3");
        assert_eq!(srv.accepted.load(Ordering::SeqCst), 2, "b never reached it");
    }

    #[tokio::test]
    async fn a_tap_sees_each_clients_bytes() {
        let srv = server().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let p = FaultProxy::start_tapped(srv.addr, move || {
            let s = Arc::clone(&s);
            let conn = s.lock().unwrap().len();
            s.lock().unwrap().push(Vec::new());
            move |chunk: &[u8]| s.lock().unwrap()[conn].extend_from_slice(chunk)
        })
        .await
        .unwrap();
        let mut a = connect(&p).await;
        round_trip(&mut a, b"ab", LONG).await.unwrap();
        round_trip(&mut a, b"cd", LONG).await.unwrap();
        let mut b = connect(&p).await;
        round_trip(&mut b, b"xyz", LONG).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![b"abcd".to_vec(), b"xyz".to_vec()]
        );
    }

    #[tokio::test]
    async fn unreachable_target_resets_the_client() {
        // A port nobody listens on (bound, then closed).
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = l.local_addr().unwrap();
        drop(l);
        let p = FaultProxy::start(gone).await.unwrap();
        let mut a = connect(&p).await;
        assert_closed(&mut a).await;
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_its_tasks() {
        let mut srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let addr = p.addr();
        let weak: Weak<Shared> = Arc::downgrade(&p.owner.shared);
        let mut a = connect(&p).await;
        round_trip(&mut a, b"x", LONG).await.unwrap();
        // Also a connection waiting in a freeze, and one delayed chunk in flight.
        p.freeze();
        let _b = connect(&p).await;
        p.heal();
        p.delay(Duration::from_secs(3600));
        a.write_all(b"slow").await.unwrap();
        let clone = p.clone();
        drop(p);
        assert!(weak.upgrade().is_some(), "a clone keeps it running");
        drop(clone);
        tokio::time::timeout(LONG, async {
            while weak.upgrade().is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every task holding the proxy's state ended");
        assert_closed(&mut a).await;
        assert!(srv.ended.recv().await.is_some(), "the server side closed");
        assert!(TcpStream::connect(addr).await.is_err(), "no listener");
    }

    /// Against a real Redis (`TOOZ_TEST_REDIS_URL`): a `SET` whose reply is lost
    /// took effect on the server, though its client saw only a reset.
    #[tokio::test]
    async fn lost_reply_from_a_real_redis() {
        let Some(url) =
            crate::testkit::backend_url("TOOZ_TEST_REDIS_URL", "lost_reply_from_a_real_redis")
        else {
            return;
        };
        let target = url_target(&url).unwrap();
        let p = FaultProxy::start(target).await.unwrap();
        let via = url_target(&proxied_url(&url, &p).unwrap()).unwrap();
        assert_eq!(via, p.addr());
        let mut c = TcpStream::connect(via).await.unwrap();
        let key = format!("tooz-fault-{}", std::process::id());
        let cmd = |args: &[&str]| {
            let mut out = format!("*{}\r\n", args.len());
            for a in args {
                out += &format!("${}\r\n{a}\r\n", a.len());
            }
            out.into_bytes()
        };
        async fn reply(c: &mut TcpStream) -> io::Result<Vec<u8>> {
            let mut buf = vec![0u8; 256];
            let n = tokio::time::timeout(LONG, c.read(&mut buf)).await??;
            buf.truncate(n);
            Ok(buf)
        }
        c.write_all(&cmd(&["DEL", &key])).await.unwrap();
        reply(&mut c).await.unwrap();
        let n = p.drop_next_reply();
        c.write_all(&cmd(&["SET", &key, "v"])).await.unwrap();
        match reply(&mut c).await {
            Ok(v) => assert!(v.is_empty(), "no reply, only the end: {v:?}"),
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::TimedOut, "closed, not silent"),
        }
        p.dropped(n).await;
        let mut d = TcpStream::connect(target).await.unwrap();
        d.write_all(&cmd(&["GET", &key])).await.unwrap();
        assert_eq!(reply(&mut d).await.unwrap(), b"$1\r\nv\r\n");
        d.write_all(&cmd(&["DEL", &key])).await.unwrap();
        reply(&mut d).await.unwrap();
    }

    #[tokio::test]
    async fn urls_are_rewritten_to_the_proxy() {
        let srv = server().await;
        let p = FaultProxy::start(srv.addr).await.unwrap();
        let a = p.addr().to_string();
        for (url, want) in [
            ("redis://127.0.0.1:6379", format!("redis://{a}")),
            ("redis://127.0.0.1:6379/0", format!("redis://{a}/0")),
            (
                "redis://127.0.0.1:6379?timeout=3&x=a:b",
                format!("redis://{a}?timeout=3&x=a:b"),
            ),
            (
                "redis://:secret@localhost:6379/2?timeout=3",
                format!("redis://:secret@{a}/2?timeout=3"),
            ),
            (
                "etcd3+http://user:p%40ss@127.0.0.1:2379/?api_version=v3",
                format!("etcd3+http://user:p%40ss@{a}/?api_version=v3"),
            ),
            (
                "zookeeper://127.0.0.1:2181,127.0.0.1:2182/chroot",
                format!("zookeeper://{a},127.0.0.1:2182/chroot"),
            ),
            ("zookeeper://[::1]:2181#f", format!("zookeeper://{a}#f")),
            ("memcached://host", format!("memcached://{a}")),
        ] {
            assert_eq!(proxied_url(url, &p).unwrap(), want, "{url}");
        }
        for bad in ["127.0.0.1:6379", "redis://", "redis:///db", "redis://u@/x"] {
            assert_eq!(
                proxied_url(bad, &p).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        assert_eq!(
            url_target("redis://:pw@127.0.0.1:6379/0?timeout=1").unwrap(),
            "127.0.0.1:6379".parse().unwrap()
        );
        assert!(url_target("redis://127.0.0.1/0").is_err(), "no port");
        assert!(url_target("file:///tmp/x").is_err());
    }
}
