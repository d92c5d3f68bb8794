//! Pub/sub: one subscriber connection per coordinator, opened on first use and
//! shared by every blocked acquirer and group watcher through a dispatcher task
//! and one broadcast channel per Redis channel.
//!
//! When the subscriber connection breaks, every subscription receives
//! [`Signal::Reset`]: a lock waiter retries its acquire, a group watcher re-reads
//! the group; both subscribe again on a new connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tooz_core::{DriverEvent, DriverEventStream, MemberId, Result, ToozError};

use crate::conn::{Connector, map_err};

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signal {
    /// A message published on the channel.
    Message(Vec<u8>),
    /// The subscriber connection broke (messages may have been missed), or the
    /// subscription fell behind.
    Reset,
}

#[derive(Debug)]
struct Channel {
    tx: broadcast::Sender<Signal>,
    refs: usize,
    /// The connection epoch this channel is subscribed on.
    subscribed: Option<u64>,
}

#[derive(Debug, Default)]
struct Link {
    sink: Option<PubSubSink>,
    epoch: u64,
    dispatcher: Option<JoinHandle<()>>,
}

/// The coordinator's subscriber connection and its channels.
#[derive(Debug)]
pub(crate) struct Hub {
    connector: Arc<Connector>,
    link: tokio::sync::Mutex<Link>,
    channels: Mutex<HashMap<Vec<u8>, Channel>>,
    /// Set by `shutdown`: no new connection is opened.
    closed: AtomicBool,
}

/// Capacity of each channel's buffer before a subscriber lags (and gets `Reset`).
const BUFFER: usize = 256;

impl Hub {
    pub(crate) fn new(connector: Arc<Connector>) -> Arc<Self> {
        Arc::new(Hub {
            connector,
            link: tokio::sync::Mutex::new(Link::default()),
            channels: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        })
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to `channel`; returns once the server confirmed, so anything
    /// published afterwards is delivered.
    pub(crate) async fn subscribe(self: &Arc<Self>, channel: &[u8]) -> Result<Subscription> {
        let rx = {
            let mut chans = self.channels();
            let c = chans.entry(channel.to_vec()).or_insert_with(|| Channel {
                tx: broadcast::channel(BUFFER).0,
                refs: 0,
                subscribed: None,
            });
            c.refs += 1;
            c.tx.subscribe()
        };
        let sub = Subscription {
            hub: Arc::downgrade(self),
            channel: channel.to_vec(),
            rx,
        };
        self.ensure(channel).await?;
        Ok(sub)
    }

    /// Makes sure `channel` is subscribed on the current connection (opening one
    /// if needed).
    pub(crate) async fn ensure(self: &Arc<Self>, channel: &[u8]) -> Result<()> {
        let limit = self.connector.config().socket_timeout;
        let mut link = self.link.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Err(ToozError::Stopped);
        }
        if link.sink.is_none() {
            let client = self.connector.client().await?;
            let pubsub = match tokio::time::timeout(
                self.connector.config().connect_timeout,
                client.get_async_pubsub(),
            )
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Err(map_err("opening the pub/sub connection", e)),
                Err(_) => {
                    return Err(ToozError::Connection {
                        driver: "redis",
                        message: "opening the pub/sub connection timed out".into(),
                        source: None,
                    });
                }
            };
            let (sink, stream) = pubsub.split();
            link.epoch += 1;
            let epoch = link.epoch;
            let hub = Arc::downgrade(self);
            link.dispatcher = Some(tokio::spawn(dispatch(hub, stream, epoch)));
            link.sink = Some(sink);
        }
        let epoch = link.epoch;
        let need = self
            .channels()
            .get(channel)
            .is_some_and(|c| c.subscribed != Some(epoch));
        if !need {
            return Ok(());
        }
        let Some(sink) = link.sink.as_mut() else {
            return Err(ToozError::backend_msg(
                "redis",
                "pub/sub connection missing",
            ));
        };
        match tokio::time::timeout(limit, sink.subscribe(channel)).await {
            Ok(Ok(())) => {
                if let Some(c) = self.channels().get_mut(channel) {
                    c.subscribed = Some(epoch);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                drop_link(&mut link);
                Err(map_err("subscribing", e))
            }
            Err(_) => {
                drop_link(&mut link);
                Err(ToozError::Connection {
                    driver: "redis",
                    message: format!("subscribing: no answer within {limit:?}"),
                    source: None,
                })
            }
        }
    }

    /// Unsubscribes from `channel` if nobody uses it any more.
    async fn release(&self, channel: Vec<u8>) {
        let mut link = self.link.lock().await;
        let subscribed = {
            let mut chans = self.channels();
            match chans.get(&channel) {
                Some(c) if c.refs == 0 => chans.remove(&channel).and_then(|c| c.subscribed),
                _ => None,
            }
        };
        if subscribed.is_some_and(|e| e == link.epoch)
            && let Some(sink) = link.sink.as_mut()
        {
            let limit = self.connector.config().socket_timeout;
            if !matches!(
                tokio::time::timeout(limit, sink.unsubscribe(&channel)).await,
                Ok(Ok(()))
            ) {
                drop_link(&mut link);
            }
        }
    }

    /// The connection of `epoch` ended: tell everyone.
    async fn lost(&self, epoch: u64) {
        {
            let mut link = self.link.lock().await;
            if link.epoch == epoch {
                link.sink = None;
                link.dispatcher = None;
            }
        }
        let mut chans = self.channels();
        for c in chans.values_mut() {
            if c.subscribed == Some(epoch) {
                c.subscribed = None;
            }
            let _ = c.tx.send(Signal::Reset);
        }
    }

    fn deliver(&self, channel: &[u8], payload: Vec<u8>) {
        if let Some(c) = self.channels().get(channel) {
            let _ = c.tx.send(Signal::Message(payload));
        }
    }

    /// Closes the subscriber connection (coordinator stop).
    pub(crate) async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let mut link = self.link.lock().await;
        drop_link(&mut link);
        let chans = self.channels();
        for c in chans.values() {
            let _ = c.tx.send(Signal::Reset);
        }
    }
}

fn drop_link(link: &mut Link) {
    link.sink = None;
    if let Some(d) = link.dispatcher.take() {
        d.abort();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(mut link) = self.link.try_lock() {
            drop_link(&mut link);
        }
    }
}

async fn dispatch(hub: Weak<Hub>, mut stream: redis::aio::PubSubStream, epoch: u64) {
    while let Some(msg) = stream.next().await {
        let Some(h) = hub.upgrade() else { return };
        let Ok(channel) = msg.get_channel::<Vec<u8>>() else {
            continue;
        };
        h.deliver(&channel, msg.get_payload_bytes().to_vec());
    }
    if let Some(h) = hub.upgrade() {
        tracing::debug!(epoch, "redis pub/sub connection ended");
        h.lost(epoch).await;
    }
}

/// One subscriber's view of a channel. Dropping it unsubscribes when it was the
/// last one.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Weak<Hub>,
    channel: Vec<u8>,
    rx: broadcast::Receiver<Signal>,
}

impl Subscription {
    /// The next signal.
    pub(crate) async fn recv(&mut self) -> Signal {
        match self.rx.recv().await {
            Ok(s) => s,
            Err(broadcast::error::RecvError::Lagged(_)) => Signal::Reset,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    /// Subscribes again after a [`Signal::Reset`].
    pub(crate) async fn resubscribe(&self) -> Result<()> {
        match self.hub.upgrade() {
            Some(h) => h.ensure(&self.channel).await,
            None => Err(ToozError::Stopped),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(hub) = self.hub.upgrade() else {
            return;
        };
        let last = {
            let mut chans = hub.channels();
            match chans.get_mut(&self.channel) {
                Some(c) => {
                    c.refs = c.refs.saturating_sub(1);
                    c.refs == 0
                }
                None => false,
            }
        };
        if last && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let channel = std::mem::take(&mut self.channel);
            rt.spawn(async move { hub.release(channel).await });
        }
    }
}

/// The driver event stream of one group: pushed joins and leaves, `Changed` for
/// anything else (leadership, capability updates, deletion, a reconnect) and a
/// tick every `tick` to notice members whose beat key expired silently.
pub(crate) fn group_events(sub: Subscription, tick: Duration) -> DriverEventStream {
    struct St {
        sub: Subscription,
        interval: tokio::time::Interval,
        resubscribe: bool,
    }
    let mut interval = tokio::time::interval(tick.max(Duration::from_millis(50)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.reset();
    let st = St {
        sub,
        interval,
        resubscribe: false,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if st.resubscribe {
                match st.sub.resubscribe().await {
                    Ok(()) => st.resubscribe = false,
                    Err(ToozError::Stopped) => return None,
                    Err(e) => {
                        tracing::debug!(error = %e, "re-subscribing to group events failed; polling meanwhile");
                    }
                }
            }
            let ev = tokio::select! {
                s = st.sub.recv() => match s {
                    Signal::Message(p) => parse_group_message(&p),
                    Signal::Reset => {
                        st.resubscribe = true;
                        Some(DriverEvent::Changed)
                    }
                },
                _ = st.interval.tick() => Some(DriverEvent::Changed),
            };
            if let Some(ev) = ev {
                return Some((ev, st));
            }
        }
    }))
}

/// `J<member>` → joined, `L<member>` → left, anything else → changed.
pub(crate) fn parse_group_message(p: &[u8]) -> Option<DriverEvent> {
    match p.split_first() {
        Some((b'J', m)) if !m.is_empty() => Some(DriverEvent::Joined(MemberId::new(m))),
        Some((b'L', m)) if !m.is_empty() => Some(DriverEvent::Left(MemberId::new(m))),
        _ => Some(DriverEvent::Changed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_messages() {
        assert_eq!(
            parse_group_message(b"Jm1"),
            Some(DriverEvent::Joined("m1".into()))
        );
        assert_eq!(
            parse_group_message(b"L\xffx"),
            Some(DriverEvent::Left(MemberId::new(b"\xffx")))
        );
        assert_eq!(parse_group_message(b"E"), Some(DriverEvent::Changed));
        assert_eq!(parse_group_message(b"Ux"), Some(DriverEvent::Changed));
        assert_eq!(parse_group_message(b""), Some(DriverEvent::Changed));
    }
}
