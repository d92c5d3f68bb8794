//! Lock handles: kazoo's `Lock` recipe under `/<namespace>/locks/<name>`, with
//! `__lock__` nodes for exclusive holders (excluding every contender, like
//! kazoo's `WriteLock`) and `__rlock__` nodes for shared ones (kazoo's
//! `ReadLock`). The fencing token is the holder node's czxid.

use std::sync::{Arc, Mutex, MutexGuard};

use tooz_core::util::deadline_of;
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, Wait};
use zookeeper_client::Error as ZkError;

use crate::contend::{self, Node, Parent, Spot};
use crate::driver::Inner;
use crate::error::zk_err;
use crate::layout::contenders;

/// One lock handle.
#[derive(Debug)]
pub(crate) struct ZkLock {
    name: LockName,
    dir: String,
    inner: Arc<Inner>,
    hold: Mutex<Option<Node>>,
}

impl ZkLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        let dir = inner.layout.lock_dir(&name);
        ZkLock {
            name,
            dir,
            inner,
            hold: Mutex::new(None),
        }
    }

    fn hold(&self) -> MutexGuard<'_, Option<Node>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tooz_core::async_trait]
impl DriverLock for ZkLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let spot = Spot {
            dir: self.dir.clone(),
            shared: mode == Mode::Shared,
            data: self.inner.member.as_bytes().to_vec(),
            parent: Parent::Make,
        };
        let won = contend::acquire(
            Arc::clone(&self.inner.sessions),
            spot,
            deadline_of(wait),
            wait == Wait::No,
        )
        .await?;
        Ok(won.map(|node| {
            let token = FencingToken(node.czxid);
            *self.hold() = Some(node);
            token
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(node) = self.hold().take() else {
            return Ok(false);
        };
        contend::delete_node(&self.inner.sessions, &node).await
    }

    async fn heartbeat(&self) -> Result<bool> {
        // The session is the lease: nothing to renew.
        Ok(self
            .hold()
            .as_ref()
            .is_some_and(|n| self.inner.sessions.is_current(n.epoch)))
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let Some(node) = self.hold().clone() else {
            return Ok(false);
        };
        if !self.inner.sessions.is_current(node.epoch) {
            return Ok(false);
        }
        let s = self.inner.sessions.get()?;
        match s.client.get_data(&node.path).await {
            Ok((data, stat)) => {
                Ok(data == self.inner.member.as_bytes() && stat.ephemeral_owner == s.id())
            }
            Err(ZkError::NoNode) => Ok(false),
            Err(e) => Err(zk_err("is_still_owner", e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn break_lock(&self) -> Result<bool> {
        let s = self
            .inner
            .sessions
            .get_within(self.inner.sessions.request_timeout())
            .await?;
        let children = match s.client.get_children(&self.dir).await {
            Ok((c, _)) => c,
            Err(ZkError::NoNode) => return Ok(false),
            Err(e) => return Err(zk_err("listing lock contenders", e)),
        };
        // The holders: the first contender, and with it every shared contender
        // before the first exclusive one.
        let all = contenders(&children);
        let mut holders = Vec::new();
        for c in &all {
            if holders.is_empty() {
                holders.push(c.name);
                if !c.shared {
                    break;
                }
            } else if c.shared {
                holders.push(c.name);
            } else {
                break;
            }
        }
        let mut broke = false;
        for h in holders {
            match s.client.delete(&format!("{}/{h}", self.dir), None).await {
                Ok(()) => broke = true,
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(zk_err("break_lock", e)),
            }
        }
        Ok(broke)
    }
}
