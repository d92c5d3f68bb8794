//! A small meta-protocol client of our own: pooled connections (TCP_NODELAY), a
//! timeout on every exchange, and **pipelines**: any number of `mg`/`ms`/`md`/`ma`
//! commands written at once and answered in order, one round trip for all of them.
//! Every command is sent without the quiet flag, so each gets exactly one reply and
//! replies pair with commands by position.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
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
    /// `ERROR`, `CLIENT_ERROR …` or `SERVER_ERROR …`, or a line we cannot read.
    Protocol(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

/// One connection.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    line: Vec<u8>,
}

impl Conn {
    async fn connect(address: &str) -> std::io::Result<Conn> {
        let s = TcpStream::connect(address).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            stream: s,
            line: Vec::new(),
        })
    }

    /// Writes every command and reads one reply each, reading while writing so that
    /// a pipeline larger than the socket buffers cannot stall.
    async fn exchange(&mut self, cmds: &[Cmd]) -> std::result::Result<Vec<Item>, Failure> {
        let mut out = Vec::with_capacity(cmds.len() * 48);
        for c in cmds {
            c.encode(&mut out);
        }
        let Conn { stream, line } = self;
        let (reader, writer) = stream.split();
        let mut reader = BufReader::new(reader);
        let write = async {
            let mut writer = writer;
            writer.write_all(&out).await?;
            writer.flush().await?;
            Ok::<_, Failure>(())
        };
        let read = async {
            let mut items = Vec::with_capacity(cmds.len());
            for _ in cmds {
                items.push(read_reply(&mut reader, line).await?);
            }
            Ok::<_, Failure>(items)
        };
        let ((), items) = tokio::try_join!(write, read)?;
        Ok(items)
    }

    /// `stats`: the server's `time`.
    async fn stats_time(&mut self) -> std::result::Result<Option<u64>, Failure> {
        let Conn { stream, line } = self;
        stream.write_all(b"stats\r\n").await?;
        let mut reader = BufReader::new(stream);
        let mut time = None;
        loop {
            read_line(&mut reader, line).await?;
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

/// Pooled connections to one server.
pub(crate) struct Pool {
    address: String,
    timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("idle", &self.idle().len())
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(address: String, timeout: Duration, max_idle: usize) -> Self {
        Pool {
            address,
            timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn close(&self) {
        self.idle().clear();
    }

    /// Runs `op` on a pooled connection within the request timeout. A connection
    /// whose exchange failed or timed out is dropped (it may hold unread replies).
    async fn with_conn<T>(
        &self,
        what: &str,
        op: impl AsyncFnOnce(&mut Conn) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let pooled = self.idle().pop();
        let res = tokio::time::timeout(self.timeout, async {
            let mut conn = match pooled {
                Some(c) => c,
                None => Conn::connect(&self.address).await.map_err(|e| {
                    ToozError::connection(
                        NAME,
                        format!("cannot connect to memcached at {}", self.address),
                        e,
                    )
                })?,
            };
            match op(&mut conn).await {
                Ok(out) => {
                    let mut idle = self.idle();
                    if idle.len() < self.max_idle {
                        idle.push(conn);
                    }
                    Ok(out)
                }
                Err(Failure::Io(e)) => {
                    Err(ToozError::connection(NAME, format!("{what} failed"), e))
                }
                Err(Failure::Protocol(s)) => Err(ToozError::backend_msg(
                    NAME,
                    format!("{what}: memcached replied {s:?}"),
                )),
            }
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => Err(ToozError::connection(
                NAME,
                format!(
                    "{what}: no reply from {} within {:?}",
                    self.address, self.timeout
                ),
                "timed out",
            )),
        }
    }

    /// Sends `cmds` in one write and returns their replies in order: one round trip.
    pub(crate) async fn pipeline(&self, what: &str, cmds: &[Cmd]) -> Result<Vec<Item>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let items = self
            .with_conn(what, async |c: &mut Conn| c.exchange(cmds).await)
            .await?;
        debug_assert_eq!(items.len(), cmds.len());
        Ok(items)
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
        self.with_conn("stats", async |c: &mut Conn| c.stats_time().await)
            .await
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
            Err(Failure::Protocol(s)) if s.contains("out of memory")
        ));
        assert!(matches!(parse(b"VA 3\r\nab").await, Err(Failure::Io(_))));
    }
}
