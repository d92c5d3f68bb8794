//! Connections: one multiplexed connection per coordinator, re-established after
//! a failure (through the sentinels again when configured), with every request
//! bounded by `socket_timeout` and retried once on a dropped connection.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    RedisConnectionInfo, RedisError,
};
use tooz_core::{Result, ToozError};

use crate::config::{NAME, RedisConfig, Target};

/// Whether an error means the connection is unusable (so the request may be
/// retried on a new one).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                | redis::ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                | redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        )
}

/// Maps a client error to ours.
pub(crate) fn map_err(what: &str, e: RedisError) -> ToozError {
    if is_connection_error(&e) || e.is_timeout() {
        ToozError::connection("redis", what.to_string(), e)
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        ToozError::Connection {
            driver: "redis",
            message: format!("{what}: authentication failed ({e})"),
            source: Some(Box::new(e)),
        }
    } else {
        ToozError::backend("redis", what.to_string(), e)
    }
}

fn timed_out(what: &str, after: Duration) -> ToozError {
    ToozError::Connection {
        driver: "redis",
        message: format!("{what}: no answer within {after:?} (socket_timeout)"),
        source: None,
    }
}

/// Builds clients for the configured target.
pub(crate) struct Connector {
    config: RedisConfig,
    sentinel: tokio::sync::Mutex<Option<redis::sentinel::SentinelClient>>,
    slot: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("config", &self.config)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub(crate) fn new(config: RedisConfig) -> Self {
        Connector {
            config,
            sentinel: tokio::sync::Mutex::new(None),
            slot: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn config(&self) -> &RedisConfig {
        &self.config
    }

    fn redis_info(&self) -> RedisConnectionInfo {
        let mut r = RedisConnectionInfo::default().set_db(self.config.db);
        if let Some(u) = &self.config.username {
            r = r.set_username(u);
        }
        if let Some(p) = &self.config.password {
            r = r.set_password(p);
        }
        r
    }

    fn tcp_settings(&self) -> redis::io::tcp::TcpSettings {
        let s = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        if self.config.socket_keepalive {
            s.set_keepalive(redis::io::tcp::socket2::TcpKeepalive::new())
        } else {
            s
        }
    }

    fn async_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(self.config.socket_timeout))
    }

    /// A client for the Redis server (the current master behind the sentinels).
    pub(crate) async fn client(&self) -> Result<Client> {
        match &self.config.target {
            Target::Tcp { host, port } => {
                let addr = if self.config.tls.is_some() {
                    ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host.clone(), *port)
                };
                self.client_for(addr)
            }
            Target::Unix(path) => self.client_for(ConnectionAddr::Unix(path.clone())),
            Target::Sentinel { master, .. } => {
                let mut guard = self.sentinel.lock().await;
                if guard.is_none() {
                    *guard = Some(self.sentinel_client()?);
                }
                let Some(sc) = guard.as_mut() else {
                    return Err(ToozError::backend_msg("redis", "sentinel client missing"));
                };
                let what = format!("asking the sentinels for master {master:?}");
                match tokio::time::timeout(self.config.connect_timeout, sc.async_get_client()).await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(ToozError::connection("redis", what.to_string(), e)),
                    Err(_) => Err(timed_out(&what, self.config.connect_timeout)),
                }
            }
        }
    }

    fn client_for(&self, addr: ConnectionAddr) -> Result<Client> {
        let info: ConnectionInfo = addr
            .into_connection_info()
            .map_err(|e| map_err("building the connection address", e))?
            .set_redis_settings(self.redis_info())
            .set_tcp_settings(self.tcp_settings());
        self.open_client(info)
    }

    #[cfg(feature = "tls")]
    fn open_client(&self, info: ConnectionInfo) -> Result<Client> {
        match &self.config.tls {
            Some(t) if t.ca_certs.is_some() || t.certfile.is_some() => {
                let certs = crate::tls::certificates(t)?;
                Client::build_with_tls(info, certs).map_err(|e| map_err("configuring TLS", e))
            }
            _ => Client::open(info).map_err(|e| map_err("building the client", e)),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn open_client(&self, info: ConnectionInfo) -> Result<Client> {
        Client::open(info).map_err(|e| map_err("building the client", e))
    }

    fn sentinel_client(&self) -> Result<redis::sentinel::SentinelClient> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let Target::Sentinel {
            master,
            sentinels,
            username,
            password,
            ssl,
        } = &self.config.target
        else {
            return Err(ToozError::backend_msg("redis", "not a sentinel target"));
        };
        let addrs = sentinels.iter().map(|(h, p)| {
            if *ssl {
                ConnectionAddr::TcpTls {
                    host: h.clone(),
                    port: *p,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                ConnectionAddr::Tcp(h.clone(), *p)
            }
        });
        let bad = |e: RedisError| {
            ToozError::invalid_option(NAME, "sentinel", format!("cannot use the sentinels: {e}"))
        };
        let mut b = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
            .map_err(bad)?
            .set_client_to_redis_db(self.config.db)
            .set_client_to_redis_tcp_settings(self.tcp_settings())
            .set_client_to_sentinel_tcp_settings(self.tcp_settings());
        if let Some(u) = &self.config.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &self.config.password {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(u) = username {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = password {
            b = b.set_client_to_sentinel_password(p);
        }
        #[cfg(feature = "tls")]
        {
            if let Some(t) = &self.config.tls {
                b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                if t.ca_certs.is_some() || t.certfile.is_some() {
                    b = b.set_client_to_redis_certificates(crate::tls::certificates(t)?);
                }
            }
            if *ssl {
                b = b.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
                if let Some(t) = &self.config.tls
                    && (t.ca_certs.is_some() || t.certfile.is_some())
                {
                    b = b.set_client_to_sentinel_certificates(crate::tls::certificates(t)?);
                }
            }
        }
        b.build().map_err(bad)
    }

    /// The current connection, connecting first if there is none.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection)> {
        let mut slot = self.slot.lock().await;
        if let Some((g, c)) = slot.as_ref() {
            return Ok((*g, c.clone()));
        }
        let client = self.client().await?;
        let what = "connecting";
        let conn = match tokio::time::timeout(
            self.config.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&self.async_config()),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if matches!(self.config.target, Target::Sentinel { .. }) {
                    *self.sentinel.lock().await = None;
                }
                return Err(map_err(what, e));
            }
            Err(_) => return Err(timed_out(what, self.config.connect_timeout)),
        };
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *slot = Some((g, conn.clone()));
        Ok((g, conn))
    }

    /// Drops the connection of generation `g` (if it is still the current one), so
    /// the next request reconnects. Never waits for a connection attempt in progress.
    fn invalidate(&self, g: u64) {
        if let Ok(mut slot) = self.slot.try_lock()
            && slot.as_ref().is_some_and(|(cur, _)| *cur == g)
        {
            *slot = None;
        }
    }

    /// Forgets the connection (on stop).
    pub(crate) async fn close(&self) {
        *self.slot.lock().await = None;
    }

    /// Runs one request on the connection, bounded by `socket_timeout`. A request
    /// that fails because the connection broke (the server restarted, a failover)
    /// is retried once on a new connection; with `retry_on_timeout` a timed-out one
    /// too. Every script is written so that replaying it after an unseen success is
    /// harmless or detected (acquire and campaign recognise their own token).
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let limit = self.config.socket_timeout;
        let mut last = None;
        for attempt in 0..2 {
            let mut used = None;
            let res = tokio::time::timeout(limit, async {
                let (g, conn) = self.connection().await?;
                used = Some(g);
                Ok::<_, ToozError>(f(conn).await)
            })
            .await;
            match res {
                Ok(Ok(Ok(v))) => return Ok(v),
                Ok(Ok(Err(e))) => {
                    if !(is_connection_error(&e) || e.is_timeout()) {
                        return Err(map_err(what, e));
                    }
                    if let Some(g) = used {
                        self.invalidate(g);
                    }
                    let retry = attempt == 0 && (!e.is_timeout() || self.config.retry_on_timeout);
                    tracing::debug!(what, error = %e, retry, "redis request failed on its connection");
                    last = Some(map_err(what, e));
                    if !retry {
                        break;
                    }
                }
                // Could not connect: the server is down; retrying at once would fail
                // the same way.
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    if let Some(g) = used {
                        self.invalidate(g);
                    }
                    last = Some(timed_out(what, limit));
                    if !(attempt == 0 && self.config.retry_on_timeout) {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| ToozError::backend_msg("redis", format!("{what} failed"))))
    }
}
