//! A counting TCP proxy: the bench's "wrapper around the connection".
//!
//! Coordinators under measurement connect to the proxy instead of the server. Every
//! connection is relayed byte for byte; a *round trip* is counted each time the client
//! starts sending after the server last sent something (or sends first on a fresh
//! connection). A pipelined batch — several commands written before any reply — therefore
//! counts once, and server pushes (pub/sub messages) count nothing by themselves.
//!
//! The count is deterministic for a given driver and scenario, so it holds on a noisy
//! machine, and unlike Redis `INFO commandstats` it does not count the commands a Lua
//! script runs inside the server.
//!
//! For ZooKeeper ([`Counting::ZookeeperRequests`]) the proxy counts *requests* instead: it
//! reads the client's length-prefixed frames and counts each request frame except the
//! session handshake (the first frame of a connection) and pings (xid -2). Pipelined
//! requests (the lock recipe's create and list) count one each, so the figure is the
//! number of ZooKeeper operations a call costs, not its round trips.
//!
//! For etcd ([`Counting::GrpcMessages`]) it counts gRPC *request messages*: it follows the
//! client's HTTP/2 frames (after the connection preface) and the length-prefixed gRPC
//! messages inside each stream's DATA frames. A unary call (range, put, txn) counts one;
//! on a bidirectional stream each message counts one (a lease keep-alive, a watch
//! create). HTTP/2 control frames (SETTINGS, PING, WINDOW_UPDATE, HEADERS) count nothing.
//!
//! For memcached ([`Counting::MemcachedRoundTrips`]) the main count is round trips, as for
//! Redis (a quiet `mg … q` pipeline closed by `mn` is one), and a second counter
//! ([`Proxy::commands`]) follows the client's text/meta protocol line by line: every
//! command line counts one, except `mn` (the no-op that only closes a quiet pipeline); the
//! data block after a storage command (`ms <key> <datalen>`, `set`/`add`/`replace`/
//! `append`/`prepend <key> <flags> <exptime> <bytes>`, `cas …`) is skipped, not counted.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// What a proxy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counting {
    /// Client round trips (a burst of client bytes after the server spoke).
    RoundTrips,
    /// ZooKeeper request frames, without the handshake and pings.
    ZookeeperRequests,
    /// gRPC request messages in the client's HTTP/2 stream.
    GrpcMessages,
    /// Client round trips, and memcached command lines on the side.
    MemcachedRoundTrips,
}

/// A running proxy; dropping it stops accepting (open relays end with their sockets).
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    counting: Counting,
    count: Arc<AtomicU64>,
    commands: Arc<AtomicU64>,
    /// Client connections accepted so far.
    connections: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and relays every connection to `upstream` (`host:port`),
    /// counting what `counting` says.
    pub(crate) async fn start(upstream: String, counting: Counting) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let commands = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let counters = (Arc::clone(&count), Arc::clone(&commands));
        let accepted = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                let counters = (Arc::clone(&counters.0), Arc::clone(&counters.1));
                tokio::spawn(async move {
                    // A relay ends when either side closes; errors are the peer's business.
                    let _ = relay(client, &upstream, counters, counting).await;
                });
            }
        });
        Ok(Self {
            addr,
            counting,
            count,
            commands,
            connections,
            accept,
        })
    }

    /// The address coordinators should connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What this proxy counts.
    pub(crate) fn counting(&self) -> Counting {
        self.counting
    }

    /// Round trips counted so far, over every connection.
    pub(crate) fn round_trips(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far.
    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// memcached command lines counted so far (0 in the other modes).
    pub(crate) fn commands(&self) -> u64 {
        self.commands.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Counts ZooKeeper request frames in the client's byte stream.
#[derive(Debug, Default)]
struct ZkFrames {
    pending: Vec<u8>,
    seen_handshake: bool,
}

impl ZkFrames {
    /// Feeds client bytes; returns the number of complete requests they finished.
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.pending.extend_from_slice(bytes);
        let mut n = 0;
        let mut at = 0;
        while let Some(len) = self.pending.get(at..at + 4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(frame) = self.pending.get(at + 4..at + 4 + len) else {
                break;
            };
            if !self.seen_handshake {
                self.seen_handshake = true;
            } else {
                let xid = frame
                    .get(..4)
                    .map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]));
                if xid != Some(-2) {
                    n += 1;
                }
            }
            at += 4 + len;
        }
        self.pending.drain(..at);
        n
    }
}

/// Counts memcached command lines in the client's byte stream (text and meta protocol).
#[derive(Debug, Default)]
struct McLines {
    pending: Vec<u8>,
    /// Bytes of a data block (and its `\r\n`) still to skip.
    skip: usize,
}

impl McLines {
    /// Feeds client bytes; returns the number of command lines they finished.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut n = 0;
        loop {
            if self.skip > 0 {
                let k = self.skip.min(bytes.len());
                self.skip -= k;
                bytes = &bytes[k..];
            }
            if bytes.is_empty() {
                return n;
            }
            let Some(end) = bytes.iter().position(|b| *b == b'\n') else {
                self.pending.extend_from_slice(bytes);
                return n;
            };
            self.pending.extend_from_slice(&bytes[..=end]);
            bytes = &bytes[end + 1..];
            let line = std::mem::take(&mut self.pending);
            let words: Vec<&[u8]> = line
                .split(|b| b.is_ascii_whitespace())
                .filter(|w| !w.is_empty())
                .collect();
            let Some(cmd) = words.first() else { continue };
            // Where the data length is, for commands followed by a data block.
            let len_at = match *cmd {
                b"ms" => Some(2),
                b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => Some(4),
                _ => None,
            };
            if let Some(len) = len_at
                .and_then(|i| words.get(i))
                .and_then(|w| std::str::from_utf8(w).ok()?.parse::<usize>().ok())
            {
                self.skip = len + 2;
            }
            if *cmd != b"mn" {
                n += 1;
            }
        }
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Counts gRPC request messages in a client's HTTP/2 byte stream.
#[derive(Debug, Default)]
struct GrpcFrames {
    pending: Vec<u8>,
    seen_preface: bool,
    /// Per stream: the bytes of a gRPC message prefix read so far (up to 5) and the
    /// message bytes still to skip.
    streams: std::collections::HashMap<u32, (Vec<u8>, usize)>,
}

impl GrpcFrames {
    /// Feeds client bytes; returns the number of gRPC messages they started.
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        if !self.seen_preface {
            if self.pending.len() < H2_PREFACE.len() {
                return 0;
            }
            self.seen_preface = true;
            at = H2_PREFACE.len();
        }
        let mut n = 0;
        while let Some(h) = self.pending.get(at..at + 9) {
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
            let Some(payload) = self.pending.get(at + 9..at + 9 + len) else {
                break;
            };
            if kind == 0 {
                // DATA; strip padding when PADDED is set.
                let body = if flags & 0x8 != 0 && !payload.is_empty() {
                    let pad = usize::from(payload[0]);
                    payload
                        .get(1..payload.len().saturating_sub(pad))
                        .unwrap_or(&[])
                } else {
                    payload
                };
                let state = self.streams.entry(stream).or_default();
                n += grpc_messages(state, body);
                if flags & 0x1 != 0 {
                    self.streams.remove(&stream);
                }
            } else if kind == 3 {
                // RST_STREAM
                self.streams.remove(&stream);
            }
            at += 9 + len;
        }
        self.pending.drain(..at);
        n
    }
}

/// Walks one stream's DATA bytes through gRPC's 5-byte message prefixes; returns how many
/// messages began in `body`.
fn grpc_messages(state: &mut (Vec<u8>, usize), mut body: &[u8]) -> u64 {
    let (prefix, skip) = state;
    let mut n = 0;
    while !body.is_empty() {
        if *skip > 0 {
            let k = (*skip).min(body.len());
            *skip -= k;
            body = &body[k..];
            continue;
        }
        let k = (5 - prefix.len()).min(body.len());
        prefix.extend_from_slice(&body[..k]);
        body = &body[k..];
        if prefix.len() == 5 {
            n += 1;
            *skip = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            prefix.clear();
        }
    }
    n
}

async fn relay(
    client: TcpStream,
    upstream: &str,
    (count, commands): (Arc<AtomicU64>, Arc<AtomicU64>),
    counting: Counting,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    // True when the server spoke last (or nobody has spoken yet): the client's next bytes
    // begin a new round trip.
    let server_spoke = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&server_spoke);
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = ZkFrames::default();
        let mut grpc = GrpcFrames::default();
        let mut lines = McLines::default();
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                server_tx.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            match counting {
                Counting::RoundTrips => {
                    if flag.swap(false, Ordering::SeqCst) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Counting::ZookeeperRequests => {
                    count.fetch_add(frames.feed(&buf[..n]), Ordering::SeqCst);
                }
                Counting::GrpcMessages => {
                    count.fetch_add(grpc.feed(&buf[..n]), Ordering::SeqCst);
                }
                Counting::MemcachedRoundTrips => {
                    if flag.swap(false, Ordering::SeqCst) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    commands.fetch_add(lines.feed(&buf[..n]), Ordering::SeqCst);
                }
            }
            server_tx.write_all(&buf[..n]).await?;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                client_tx.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            // Set before forwarding: the client cannot react to a reply it has not seen.
            server_spoke.store(true, Ordering::SeqCst);
            client_tx.write_all(&buf[..n]).await?;
        }
    };
    tokio::try_join!(up, down).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn zookeeper_frames_skip_handshake_and_pings() {
        let mut f = ZkFrames::default();
        let mut bytes = frame(&[0; 44]);
        let mut req = 1i32.to_be_bytes().to_vec();
        req.extend_from_slice(&15i32.to_be_bytes());
        bytes.extend(frame(&req));
        let mut ping = (-2i32).to_be_bytes().to_vec();
        ping.extend_from_slice(&11i32.to_be_bytes());
        bytes.extend(frame(&ping));
        let (a, b) = bytes.split_at(30);
        assert_eq!(f.feed(a) + f.feed(b), 1);
        let two = [frame(&req), frame(&req)].concat();
        assert_eq!(f.feed(&two[..5]), 0);
        assert_eq!(f.feed(&two[5..]), 2);
    }

    #[test]
    fn memcached_lines_skip_data_blocks_and_mn() {
        let mut f = McLines::default();
        let bytes = b"mg k1 v q\r\nmg k2 v q\r\nmn\r\nms lock 4 T30 F0 c ME\r\nab\r\n\r\nset k 0 0 3\r\nxyz\r\nmd k C12\r\n";
        let total: u64 = bytes.chunks(7).map(|c| f.feed(c)).sum();
        // mg, mg, ms (its data block holds a CRLF), set, md; not mn.
        assert_eq!(total, 5);
        assert_eq!(f.skip, 0);
        assert!(f.pending.is_empty());
    }

    fn h2(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[kind, flags]);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn msg(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn grpc_messages_are_counted_across_frames() {
        let mut f = GrpcFrames::default();
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(h2(4, 0, 0, &[0; 6])); // SETTINGS
        bytes.extend(h2(1, 4, 1, &[0x83; 10])); // HEADERS
        bytes.extend(h2(0, 1, 1, &msg(b"range"))); // unary call
        // One message split over two DATA frames, then two messages in one frame.
        let long = msg(&[7; 20]);
        bytes.extend(h2(0, 0, 3, &long[..3]));
        bytes.extend(h2(8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE
        bytes.extend(h2(0, 0, 3, &long[3..]));
        bytes.extend(h2(0, 0, 3, &[msg(b"a"), msg(b"bc")].concat()));
        let (a, b) = bytes.split_at(40);
        assert_eq!(f.feed(a) + f.feed(b), 4);
    }
}
