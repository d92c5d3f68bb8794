//! A small meta-protocol client of our own: one multiplexed connection
//! (TCP_NODELAY) shared by every operation of a coordinator, a timeout on every
//! exchange, and **pipelines**: any number of `mg`/`ms`/`md`/`ma` commands written
//! at once and answered in order, one round trip for all of them. Requests queued
//! by concurrent operations go out in one write as well. Every command is sent
//! without the quiet flag, so each gets exactly one reply and replies pair with
//! commands by position.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tooz_core::{Result, ToozError};

const NAME: &str = "memcached";

/// One meta command.
#[derive(Debug, Clone)]
pub(crate) enum Cmd {
    /// `mg <key> <flags>`.
    Get { key: Vec<u8>, flags: Vec<String> },
    /// `ms <key> <len> <flags>` and the value.
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        flags: Vec<String>,
    },
    /// `md <key> <flags>`.
    Delete { key: Vec<u8>, flags: Vec<String> },
    /// `ma <key> <flags>`.
    Arith { key: Vec<u8>, flags: Vec<String> },
}

impl Cmd {
    pub(crate) fn get(key: &[u8], flags: &[&str]) -> Self {
        Cmd::Get {
            key: key.to_vec(),
            flags: owned(flags),
        }
    }

    pub(crate) fn set(key: &[u8], value: &[u8], flags: Vec<String>) -> Self {
        Cmd::Set {
            key: key.to_vec(),
            value: value.to_vec(),
            flags,
        }
    }

    pub(crate) fn delete(key: &[u8], flags: Vec<String>) -> Self {
        Cmd::Delete {
            key: key.to_vec(),
            flags,
        }
    }

    pub(crate) fn arith(key: &[u8], flags: Vec<String>) -> Self {
        Cmd::Arith {
            key: key.to_vec(),
            flags,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let (verb, key, flags) = match self {
            Cmd::Get { key, flags } => ("mg", key, flags),
            Cmd::Set { key, flags, .. } => ("ms", key, flags),
            Cmd::Delete { key, flags } => ("md", key, flags),
            Cmd::Arith { key, flags } => ("ma", key, flags),
        };
        out.extend_from_slice(verb.as_bytes());
        out.push(b' ');
        out.extend_from_slice(key);
        if let Cmd::Set { value, .. } = self {
            out.extend_from_slice(format!(" {}", value.len()).as_bytes());
        }
        for f in flags {
            out.push(b' ');
            out.extend_from_slice(f.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        if let Cmd::Set { value, .. } = self {
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The status code of a meta reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// `VA`: a value follows.
    Value,
    /// `HD`: success without a value.
    Done,
    /// `EN`: `mg` miss.
    Miss,
    /// `NS`: not stored (`add` found the key, `ma` autovivify raced).
    NotStored,
    /// `EX`: the CAS value did not match.
    Exists,
    /// `NF`: no such item.
    NotFound,
}

/// One reply: its status and the returned flags and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    pub(crate) status: Status,
    /// `c`: the item's CAS value.
    pub(crate) cas: Option<u64>,
    /// `f`: the client flags.
    pub(crate) flags: Option<u32>,
    /// `t`: seconds left (-1: no expiry).
    pub(crate) ttl_remaining: Option<i64>,
    /// The value (`VA`).
    pub(crate) data: Option<Vec<u8>>,
}

impl Item {
    /// A hit of `mg` or `ma` (`VA`/`HD`), `None` on a miss.
    pub(crate) fn hit(self) -> Option<Item> {
        matches!(self.status, Status::Value | Status::Done).then_some(self)
    }
}

/// The outcome of a meta set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Stored; the item's new CAS value when asked for.
    Stored(Option<u64>),
    /// `add` found the key (`NS`).
    NotStored,
    /// The CAS value did not match (`EX`).
    Exists,
    /// A CAS write found no item (`NF`).
    NotFound,
}

impl Item {
    /// This reply read as the answer to `ms`.
    pub(crate) fn stored(&self) -> Result<Reply> {
        match self.status {
            Status::Done => Ok(Reply::Stored(self.cas)),
            Status::NotStored => Ok(Reply::NotStored),
            Status::Exists => Ok(Reply::Exists),
            Status::NotFound => Ok(Reply::NotFound),
            s => Err(ToozError::backend_msg(
                NAME,
                format!("unexpected reply {s:?} to a set"),
            )),
        }
    }

    /// This reply read as the answer to `ma … v`: the counter's new value.
    pub(crate) fn counter(&self, what: &str) -> Result<u64> {
        self.data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok()?.trim().parse().ok())
            .ok_or_else(|| {
                ToozError::backend_msg(
                    NAME,
                    format!("{what}: no counter value in the reply ({:?})", self.status),
                )
            })
    }
}

/// Why an exchange failed.
#[derive(Debug)]
enum Failure {
    Io(std::io::Error),
    /// A line we cannot read: the connection is out of step and is closed.
    Protocol(String),
    /// `ERROR`, `CLIENT_ERROR …` or `SERVER_ERROR …`: one whole line, so the
    /// replies that follow still pair with their commands.
    Refused(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

/// What a request expects back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// One meta reply per command.
    Meta(usize),
    /// The lines of `stats` up to `END`.
    Stats,
}

/// The answer to a request.
#[derive(Debug)]
enum Answer {
    Items(Vec<Item>),
    Time(Option<u64>),
}

type Answered = oneshot::Sender<std::result::Result<Answer, Failure>>;

/// One request handed to a connection's writer.
#[derive(Debug)]
struct Request {
    bytes: Vec<u8>,
    expect: Expect,
    reply: Answered,
}

/// Most bytes of queued requests the writer coalesces into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// One **multiplexed** connection: any number of callers queue requests; a writer
/// task writes whatever is queued in one write, a reader task reads the replies in
/// order (memcached answers in order) and hands each caller its own. So concurrent
/// operations share round trips instead of waiting for each other or opening a
/// connection each. Dropping the last handle stops both tasks; callers still
/// waiting then get a connection error.
#[derive(Debug)]
struct Link {
    tx: mpsc::UnboundedSender<Request>,
    writer: AbortHandle,
    reader: AbortHandle,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}

impl Link {
    async fn connect(address: &str) -> std::io::Result<Link> {
        let s = TcpStream::connect(address).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, prx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(w, rx, ptx)).abort_handle();
        let reader = tokio::spawn(read_loop(BufReader::new(r), prx)).abort_handle();
        Ok(Link { tx, writer, reader })
    }

    fn is_open(&self) -> bool {
        !self.tx.is_closed() && !self.writer.is_finished() && !self.reader.is_finished()
    }
}

/// Writes queued requests, coalescing what is queued at once into one write, and
/// hands each request's expectation to the reader before its bytes go out. Ends
/// when the reader ends (a failed connection) or every handle is gone.
async fn write_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Request>,
    pending: mpsc::UnboundedSender<(Expect, Answered)>,
) {
    let mut buf = Vec::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            () = pending.closed() => None,
        };
        let Some(first) = first else { return };
        buf.clear();
        let mut next = Some(first);
        while let Some(req) = next {
            buf.extend_from_slice(&req.bytes);
            if pending.send((req.expect, req.reply)).is_err() {
                return;
            }
            next = if buf.len() < WRITE_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = w.write_all(&buf).await {
            tracing::debug!(error = %e, "memcached: write failed; the connection is closed");
            return;
        }
    }
}

/// Reads the replies of each request in order and answers its caller. Ends on an
/// I/O error or a reply it cannot read (the connection is then out of step).
async fn read_loop(
    mut r: BufReader<OwnedReadHalf>,
    mut pending: mpsc::UnboundedReceiver<(Expect, Answered)>,
) {
    let mut line = Vec::new();
    while let Some((expect, reply)) = pending.recv().await {
        let res = match expect {
            Expect::Meta(n) => read_replies(&mut r, &mut line, n).await.map(Answer::Items),
            Expect::Stats => stats_time(&mut r, &mut line).await.map(Answer::Time),
        };
        let fatal = matches!(res, Err(Failure::Io(_) | Failure::Protocol(_)));
        let _ = reply.send(res);
        if fatal {
            return;
        }
    }
}

/// `n` meta replies; a refusal of one command fails the request once all its
/// replies are read.
async fn read_replies<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    n: usize,
) -> std::result::Result<Vec<Item>, Failure> {
    let mut items = Vec::with_capacity(n);
    let mut refused = None;
    for _ in 0..n {
        match read_reply(r, line).await {
            Ok(item) => items.push(item),
            Err(Failure::Refused(s)) => {
                refused.get_or_insert(s);
            }
            Err(e) => return Err(e),
        }
    }
    match refused {
        Some(s) => Err(Failure::Refused(s)),
        None => Ok(items),
    }
}

/// The `stats` lines up to `END`: the server's `time`.
async fn stats_time<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::result::Result<Option<u64>, Failure> {
    let mut time = None;
    loop {
        read_line(r, line).await?;
        if line.as_slice() == b"END" {
            return Ok(time);
        }
        let text = String::from_utf8_lossy(line);
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("STAT"), Some("time"), Some(v)) => time = v.parse().ok(),
            (Some("STAT"), _, _) => {}
            _ => return Err(Failure::Protocol(format!("unexpected stats line {text:?}"))),
        }
    }
}

/// Reads one line without its `\r\n` into `line`.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::result::Result<(), Failure> {
    line.clear();
    let n = r.read_until(b'\n', line).await?;
    if n == 0 {
        return Err(Failure::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if line.ends_with(b"\r\n") {
        line.truncate(line.len() - 2);
        Ok(())
    } else {
        Err(Failure::Protocol("a reply line without CRLF".into()))
    }
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> std::result::Result<Item, Failure> {
    read_line(r, line).await?;
    let text = std::str::from_utf8(line)
        .map_err(|_| Failure::Protocol("a reply line that is not UTF-8".into()))?;
    let mut tokens = text.split(' ');
    let code = tokens.next().unwrap_or("");
    let status = match code {
        "VA" => Status::Value,
        "HD" => Status::Done,
        "EN" => Status::Miss,
        "NS" => Status::NotStored,
        "EX" => Status::Exists,
        "NF" => Status::NotFound,
        "ERROR" | "CLIENT_ERROR" | "SERVER_ERROR" => {
            return Err(Failure::Refused(text.to_string()));
        }
        _ => return Err(Failure::Protocol(text.to_string())),
    };
    let size = if status == Status::Value {
        let s = tokens.next().and_then(|s| s.parse::<usize>().ok());
        Some(s.ok_or_else(|| Failure::Protocol(format!("VA without a size: {text:?}")))?)
    } else {
        None
    };
    let mut item = Item {
        status,
        cas: None,
        flags: None,
        ttl_remaining: None,
        data: None,
    };
    for t in tokens {
        let (f, v) = t.split_at(t.len().min(1));
        match f {
            "c" => item.cas = v.parse().ok(),
            "f" => item.flags = v.parse().ok(),
            "t" => item.ttl_remaining = v.parse().ok(),
            _ => {}
        }
    }
    if let Some(size) = size {
        let mut data = vec![0; size + 2];
        r.read_exact(&mut data).await?;
        if !data.ends_with(b"\r\n") {
            return Err(Failure::Protocol("a value not ended by CRLF".into()));
        }
        data.truncate(size);
        item.data = Some(data);
    }
    Ok(item)
}

/// The connection to one server: one multiplexed [`Link`], opened on first use and
/// again after it failed or a request on it timed out.
pub(crate) struct Pool {
    address: String,
    timeout: Duration,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Links opened so far (for tests and debugging).
    opened: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("opened", &self.opened.load(Ordering::Relaxed))
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(address: String, timeout: Duration) -> Self {
        Pool {
            address,
            timeout,
            link: tokio::sync::Mutex::new(None),
            opened: AtomicUsize::new(0),
        }
    }

    /// Closes the connection (requests still in flight on it fail); the next
    /// request opens a new one.
    pub(crate) async fn close(&self) {
        *self.link.lock().await = None;
    }

    /// The open link, connecting when there is none.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut slot = self.link.lock().await;
        if let Some(l) = slot.as_ref().filter(|l| l.is_open()) {
            return Ok(Arc::clone(l));
        }
        let l = Arc::new(Link::connect(&self.address).await.map_err(|e| {
            ToozError::connection(
                NAME,
                format!("cannot connect to memcached at {}", self.address),
                e,
            )
        })?);
        self.opened.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Forgets `link` if it is still the current one (a request on it timed out:
    /// its replies may never come).
    async fn retire(&self, link: &Arc<Link>) {
        let mut slot = self.link.lock().await;
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }

    /// Sends `bytes` on the link and waits for the answer, within the request
    /// timeout.
    async fn request(&self, what: &str, bytes: Vec<u8>, expect: Expect) -> Result<Answer> {
        let mut used = None;
        let res = tokio::time::timeout(self.timeout, async {
            let link = self.link().await?;
            used = Some(Arc::clone(&link));
            let (reply, answer) = oneshot::channel();
            let lost = || {
                ToozError::connection(
                    NAME,
                    format!("{what} failed"),
                    "the connection to memcached closed",
                )
            };
            link.tx
                .send(Request {
                    bytes,
                    expect,
                    reply,
                })
                .map_err(|_| lost())?;
            drop(link);
            match answer.await.map_err(|_| lost())? {
                Ok(a) => Ok(a),
                Err(Failure::Io(e)) => {
                    Err(ToozError::connection(NAME, format!("{what} failed"), e))
                }
                Err(Failure::Protocol(s) | Failure::Refused(s)) => Err(ToozError::backend_msg(
                    NAME,
                    format!("{what}: memcached replied {s:?}"),
                )),
            }
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => {
                if let Some(l) = used {
                    self.retire(&l).await;
                }
                Err(ToozError::connection(
                    NAME,
                    format!(
                        "{what}: no reply from {} within {:?}",
                        self.address, self.timeout
                    ),
                    "timed out",
                ))
            }
        }
    }

    /// Sends `cmds` in one write and returns their replies in order: one round
    /// trip, shared with whatever else is in flight on the connection.
    pub(crate) async fn pipeline(&self, what: &str, cmds: &[Cmd]) -> Result<Vec<Item>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(cmds.len() * 48);
        for c in cmds {
            c.encode(&mut out);
        }
        match self.request(what, out, Expect::Meta(cmds.len())).await? {
            Answer::Items(items) if items.len() == cmds.len() => Ok(items),
            _ => Err(ToozError::backend_msg(
                NAME,
                format!("{what}: replies missing"),
            )),
        }
    }

    async fn one(&self, what: &str, cmd: Cmd) -> Result<Item> {
        self.pipeline(what, std::slice::from_ref(&cmd))
            .await?
            .pop()
            .ok_or_else(|| ToozError::backend_msg(NAME, format!("{what}: no reply")))
    }

    /// `mg <key> <flags>`: `None` on a miss.
    pub(crate) async fn get(&self, what: &str, key: &[u8], flags: &[&str]) -> Result<Option<Item>> {
        Ok(self.one(what, Cmd::get(key, flags)).await?.hit())
    }

    /// `mg` of many keys in one round trip: one entry per key, `None` on a miss.
    pub(crate) async fn get_multi(
        &self,
        what: &str,
        keys: &[Vec<u8>],
        flags: &[&str],
    ) -> Result<Vec<Option<Item>>> {
        let cmds: Vec<Cmd> = keys.iter().map(|k| Cmd::get(k, flags)).collect();
        Ok(self
            .pipeline(what, &cmds)
            .await?
            .into_iter()
            .map(Item::hit)
            .collect())
    }

    /// `ms <key> <len> <flags>`.
    pub(crate) async fn set(
        &self,
        what: &str,
        key: &[u8],
        value: &[u8],
        flags: &[String],
    ) -> Result<Reply> {
        self.one(what, Cmd::set(key, value, flags.to_vec()))
            .await?
            .stored()
    }

    /// `md <key> <flags>`: whether an item was deleted.
    pub(crate) async fn delete(&self, what: &str, key: &[u8], flags: &[String]) -> Result<bool> {
        let item = self.one(what, Cmd::delete(key, flags.to_vec())).await?;
        match item.status {
            Status::Done => Ok(true),
            Status::NotFound | Status::Exists => Ok(false),
            s => Err(ToozError::backend_msg(
                NAME,
                format!("{what}: unexpected reply {s:?} to a delete"),
            )),
        }
    }

    /// The server's clock (`stats` `time`, seconds since the epoch).
    pub(crate) async fn server_time(&self) -> Result<Option<u64>> {
        match self
            .request("stats", b"stats\r\n".to_vec(), Expect::Stats)
            .await?
        {
            Answer::Time(t) => Ok(t),
            Answer::Items(_) => Err(ToozError::backend_msg(NAME, "stats: unexpected reply")),
        }
    }
}

fn owned(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|s| (*s).to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> std::result::Result<Item, Failure> {
        let mut r = BufReader::new(bytes);
        read_reply(&mut r, &mut Vec::new()).await
    }

    #[tokio::test]
    async fn commands_encode_as_meta_lines() {
        let mut out = Vec::new();
        Cmd::set(b"k", b"v1", vec!["T5".into(), "ME".into()]).encode(&mut out);
        Cmd::get(b"k", &["v", "c"]).encode(&mut out);
        Cmd::delete(b"k", vec!["C7".into()]).encode(&mut out);
        Cmd::arith(b"n", vec!["N0".into(), "v".into()]).encode(&mut out);
        assert_eq!(
            out,
            b"ms k 2 T5 ME\r\nv1\r\nmg k v c\r\nmd k C7\r\nma n N0 v\r\n".to_vec()
        );
    }

    #[tokio::test]
    async fn replies_parse_with_their_flags_and_values() {
        let v = parse(b"VA 3 c12 f2 t-1\r\nabc\r\n").await.ok();
        assert_eq!(
            v,
            Some(Item {
                status: Status::Value,
                cas: Some(12),
                flags: Some(2),
                ttl_remaining: Some(-1),
                data: Some(b"abc".to_vec()),
            })
        );
        let hd = parse(b"HD c9\r\n").await.ok();
        assert_eq!(
            hd.and_then(|i| i.stored().ok()),
            Some(Reply::Stored(Some(9)))
        );
        assert_eq!(parse(b"EN\r\n").await.ok().and_then(Item::hit), None);
        assert!(matches!(
            parse(b"SERVER_ERROR out of memory\r\n").await,
            Err(Failure::Refused(s)) if s.contains("out of memory")
        ));
        assert!(matches!(
            parse(b"XX 3\r\n").await,
            Err(Failure::Protocol(_))
        ));
        assert!(matches!(parse(b"VA 3\r\nab").await, Err(Failure::Io(_))));
    }

    /// A fake server: counts connections, answers every `mg` line with `EN` unless
    /// `silent`, and answers nothing on a silent connection.
    async fn fake_server(
        silent_first: bool,
    ) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let silent = silent_first && n == 0;
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let mut line = Vec::new();
                    while r.read_until(b'\n', &mut line).await.is_ok_and(|n| n > 0) {
                        if !silent && line.starts_with(b"mg ") {
                            let _ = w.write_all(b"EN\r\n").await;
                        }
                        line.clear();
                    }
                });
            }
        });
        (addr, accepted, task)
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_connection() {
        let (addr, accepted, server) = fake_server(false).await;
        let pool = Pool::new(addr, Duration::from_secs(10));
        let keys: Vec<Vec<u8>> = (0..500).map(|i| format!("k{i}").into_bytes()).collect();
        let replies =
            futures_util::future::join_all(keys.iter().map(|k| pool.get("test", k, &["v"]))).await;
        assert_eq!(replies.len(), 500);
        assert!(replies.iter().all(|r| matches!(r, Ok(None))));
        let many = pool.get_multi("test", &keys, &["v"]).await.unwrap();
        assert_eq!(many.len(), 500);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.opened.load(Ordering::Relaxed), 1);
        server.abort();
    }

    #[tokio::test]
    async fn a_timed_out_connection_is_replaced() {
        let (addr, accepted, server) = fake_server(true).await;
        let pool = Pool::new(addr, Duration::from_millis(200));
        let err = pool.get("test", b"k", &["v"]).await.unwrap_err();
        assert!(err.to_string().contains("no reply"), "{err}");
        assert!(matches!(pool.get("test", b"k", &["v"]).await, Ok(None)));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        server.abort();
    }
}
