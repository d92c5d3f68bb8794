//! Groups, membership and capabilities.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::*;

impl Coordinator {
    // ----- groups -------------------------------------------------------------

    /// Creates a group.
    ///
    /// # Errors
    /// `GroupAlreadyExist`, `InvalidId`, `NotStarted`, backend errors.
    pub async fn create_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.create_group(&g).await
    }

    /// Deletes an empty group.
    ///
    /// # Errors
    /// `GroupNotCreated`, `GroupNotEmpty`, backend errors.
    pub async fn delete_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.delete_group(&g).await
    }

    /// Lists the groups.
    ///
    /// # Errors
    /// `NotStarted`, backend errors.
    pub async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.shared.ensure_started()?;
        let mut v = self.shared.driver.get_groups().await?;
        v.sort();
        v.dedup();
        Ok(v)
    }

    // ----- membership ---------------------------------------------------------

    /// Joins a group with capabilities (any serde value; `&()` for none).
    ///
    /// # Errors
    /// `GroupNotCreated`, `MemberAlreadyExist` (also when another coordinator uses
    /// the same member id), `Serialization`, backend errors.
    pub async fn join_group<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let caps = Capabilities::encode(capabilities)?;
        self.join_group_raw(group, caps).await
    }

    /// Joins with already-encoded capabilities.
    ///
    /// # Errors
    /// As [`Coordinator::join_group`].
    pub async fn join_group_raw(
        &self,
        group: impl Into<GroupId>,
        capabilities: Capabilities,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.join_group(&g, &capabilities).await?;
        lock(&self.shared.run).joined.insert(g, capabilities);
        Ok(())
    }

    /// Joins a group, creating it first if needed (no sleep, unlike tooz).
    ///
    /// # Errors
    /// As [`Coordinator::join_group`], except `GroupNotCreated`.
    pub async fn join_group_create<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let caps = Capabilities::encode(capabilities)?;
        self.join_group_create_raw(group, caps).await
    }

    /// Like [`Coordinator::join_group_create`] with already-encoded capabilities.
    ///
    /// # Errors
    /// As [`Coordinator::join_group`], except `GroupNotCreated`.
    pub async fn join_group_create_raw(
        &self,
        group: impl Into<GroupId>,
        caps: Capabilities,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        let mut attempts = 0;
        loop {
            match self.join_group_raw(&g, caps.clone()).await {
                Err(ToozError::GroupNotCreated(_)) if attempts < 10 => {
                    attempts += 1;
                    match self.shared.driver.create_group(&g).await {
                        Ok(()) | Err(ToozError::GroupAlreadyExist(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    /// Leaves a group.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn leave_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        let _membership = self.shared.membership.lock().await;
        let res = self.shared.driver.leave_group(&g).await;
        if matches!(res, Ok(()) | Err(ToozError::MemberNotJoined { .. })) {
            lock(&self.shared.run).joined.remove(&g);
            lock(&self.shared.restoring).remove(&g);
        }
        res
    }

    /// The live members of a group.
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn get_members(&self, group: impl Into<GroupId>) -> Result<BTreeSet<MemberId>> {
        let g = self.shared.group(group)?;
        self.shared.driver.get_members(&g).await
    }

    /// One member's capabilities ([`Capabilities::decode`] them).
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn get_member_capabilities(
        &self,
        group: impl Into<GroupId>,
        member: impl Into<MemberId>,
    ) -> Result<Capabilities> {
        let g = self.shared.group(group)?;
        let m = self.shared.member(member.into())?;
        self.shared.driver.get_member_capabilities(&g, &m).await
    }

    /// Every live member with its capabilities, in one call.
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn get_members_with_capabilities(
        &self,
        group: impl Into<GroupId>,
    ) -> Result<BTreeMap<MemberId, Capabilities>> {
        let g = self.shared.group(group)?;
        Ok(self
            .shared
            .driver
            .get_members_with_capabilities(&g)
            .await?
            .into_iter()
            .collect())
    }

    /// Capabilities plus creation and update times.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn get_member_info(
        &self,
        group: impl Into<GroupId>,
        member: impl Into<MemberId>,
    ) -> Result<MemberInfo> {
        let g = self.shared.group(group)?;
        let m = self.shared.member(member.into())?;
        self.shared.driver.get_member_info(&g, &m).await
    }

    /// Replaces this member's capabilities in a group.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn update_capabilities<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        let caps = Capabilities::encode(capabilities)?;
        self.shared.driver.update_capabilities(&g, &caps).await?;
        if let Some(c) = lock(&self.shared.run).joined.get_mut(&g) {
            *c = caps;
        }
        Ok(())
    }
}
