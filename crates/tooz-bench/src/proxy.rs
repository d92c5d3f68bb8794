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

/// A running proxy; dropping it stops accepting (open relays end with their sockets).
#[derive(Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and relays every connection to `upstream` (`host:port`).
    pub(crate) async fn start(upstream: String) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&count);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    // A relay ends when either side closes; errors are the peer's business.
                    let _ = relay(client, &upstream, counter).await;
                });
            }
        });
        Ok(Self {
            addr,
            count,
            accept,
        })
    }

    /// The address coordinators should connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Round trips counted so far, over every connection.
    pub(crate) fn round_trips(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, upstream: &str, count: Arc<AtomicU64>) -> io::Result<()> {
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
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                server_tx.shutdown().await?;
                return Ok::<_, io::Error>(());
            }
            if flag.swap(false, Ordering::SeqCst) {
                count.fetch_add(1, Ordering::SeqCst);
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
