//! The stack's side of the zero-copy local path: reserving host-arena space
//! for a co-located writer (evicting to make room, as a put would),
//! publishing it as an object, and pinning an object in the arena for a
//! co-located reader (bringing it up from a slower tier when needed).

use super::{Durability, StackEventKind, TierStack, bit};
use crate::{
    Block, BlockHeader, CHECKSUM_PENDING, HostLease, HostReservation, HostTier, ObjectKey, TierError, TierKind,
    TierResult,
};
use std::sync::atomic::Ordering::Relaxed;

impl TierStack {
    /// The host tier and its level, if this stack has one.
    pub fn host_tier(&self) -> Option<&HostTier> {
        self.host_level().map(|(_, h)| h)
    }

    fn host_level(&self) -> Option<(usize, &HostTier)> {
        self.levels
            .iter()
            .enumerate()
            .find_map(|(i, l)| l.tier.as_host().map(|h| (i, h)))
    }

    fn no_host() -> TierError {
        TierError::Unavailable("this node has no host-memory tier, so it has no zero-copy local path".into())
    }

    /// Reserves arena space for a payload of `len` bytes, demoting victims
    /// from the host tier when it is full.
    pub async fn reserve_host(&self, len: u64) -> TierResult<HostReservation> {
        let (i, host) = self.host_level().ok_or_else(Self::no_host)?;
        loop {
            match host.reserve(len) {
                Err(TierError::Full { needed, .. }) => {
                    if !self.make_room(i, needed, None).await? {
                        return Err(TierError::Full {
                            tier: TierKind::Host,
                            needed,
                            available: host.capacity_left(),
                            capacity: host.arena_len(),
                        });
                    }
                }
                other => return other,
            }
        }
    }

    /// Publishes written arena space as `key`. `header` describes the bytes;
    /// its checksum may be [`CHECKSUM_PENDING`] (the host tier computes it
    /// when the object first leaves it). With `disk`/`object` durability the
    /// durable copy is written (synced) first, from a snapshot verified
    /// against the checksum (computed now if pending), and the arena copy is
    /// published after it.
    pub async fn commit_host(
        &self,
        key: &ObjectKey,
        reservation: HostReservation,
        header: BlockHeader,
        durability: Durability,
    ) -> TierResult<TierKind> {
        let (h, host) = self.host_level().ok_or_else(Self::no_host)?;
        TierError::check_header(key, &header)?;
        if header.length != reservation.len() {
            return Err(TierError::Invalid(format!(
                "{key}: header says {} bytes but {} were reserved",
                header.length,
                reservation.len()
            )));
        }
        let _g = self.stripe(key).lock().await;
        let mut placed = 0u8;
        let mut ack = h;
        let durable = match durability {
            Durability::Memory => None,
            Durability::Disk => Some((TierKind::Disk, "disk")),
            Durability::Object => Some((TierKind::Object, "object")),
        };
        let mut header = header;
        if let Some((kind, name)) = durable {
            let d = self.level_of(kind).ok_or(TierError::DurabilityUnavailable {
                durability: name,
                needed: kind,
            })?;
            // A copy and up to two passes over the object: off the async
            // worker when large.
            let block = crate::offload(reservation.len() as usize, || {
                let payload = reservation.snapshot();
                if header.checksum == CHECKSUM_PENDING {
                    // A durable copy always carries a real checksum.
                    header.checksum = crate::checksum(&payload);
                }
                let block = Block {
                    header: header.clone(),
                    payload,
                };
                // The snapshot is what gets stored durably, so it is what
                // must match the checksum.
                block.verify().map(|()| block)
            })
            .map_err(|e| TierError::Corrupt {
                tier: TierKind::Host,
                key: key.to_string(),
                reason: format!("committed bytes do not match their header: {e}"),
            })?;
            self.place(d, key, &block, true).await?;
            placed |= bit(d);
            ack = d;
        }
        host.commit(key, reservation, header.clone())?;
        placed |= bit(h);
        self.commit_placement(key, &header, placed).await;
        self.after_placement(placed);
        Ok(self.levels[ack].tier.kind())
    }

    /// Pins `key` in the host arena for a co-located reader. An object that
    /// is only in slower tiers is promoted into the arena, or, when it cannot
    /// be (no room, or a faster tier above the host tier takes promotions),
    /// copied into a bounce slot that no key points at. `None`: not stored.
    pub async fn acquire_host(&self, key: &ObjectKey) -> TierResult<Option<HostLease>> {
        let (h, host) = self.host_level().ok_or_else(Self::no_host)?;
        let level = &self.levels[h];
        if let Some(lease) = host.lease(key) {
            level.metrics.hits.fetch_add(1, Relaxed);
            level.metrics.bytes_out.fetch_add(lease.header().length, Relaxed);
            level.policy.lock().touch(key);
            return Ok(Some(lease));
        }
        let Some((block, _)) = self.get(key).await? else {
            return Ok(None);
        };
        if let Some(payload_lease) = self.promote_into_host(h, host, key, &block).await {
            return Ok(Some(payload_lease));
        }
        let mut r = self.reserve_host(block.header.length).await?;
        r.write(&block.payload);
        Ok(Some(host.detach(r, block.header)?))
    }

    /// Promotes a block read from another tier into the host tier, under the
    /// key's stripe; `None` when it could not.
    async fn promote_into_host(&self, h: usize, host: &HostTier, key: &ObjectKey, block: &Block) -> Option<HostLease> {
        let _g = self.stripe(key).lock().await;
        let current = self.index.lock().get(key).map(|e| (e.mask, e.checksum));
        match current {
            Some((mask, _)) if mask & bit(h) != 0 => return host.lease(key),
            Some((_, sum)) if sum == block.header.checksum => {}
            _ => return None,
        }
        if self.place(h, key, block, false).await.is_err() {
            return None;
        }
        let ok = match self.index.lock().get_mut(key) {
            Some(e) => {
                e.mask |= bit(h);
                true
            }
            None => false,
        };
        if !ok {
            let _ = host.delete_slot(key);
            return None;
        }
        let l = &self.levels[h];
        l.policy.lock().insert(key);
        l.metrics.promotions.fetch_add(1, Relaxed);
        l.metrics.bytes_in.fetch_add(block.header.length, Relaxed);
        self.emit(StackEventKind::Stored, key, h);
        host.lease(key)
    }
}
