//! Region bookkeeping shared by the transports: which memory regions are registered, with what
//! keys and access, and which operations are using them right now.
//!
//! - Regions are `[base, base + len)` address ranges with an id (never reused), access flags, and
//!   the RDMA local/remote keys (zero for TCP), plus a payload the transport keeps alive with the
//!   region (the `Arc<dyn RegisteredMemory>`, and for RDMA the `ibv_mr`).
//! - Registered ranges never overlap: registering a range that overlaps a registered (or still
//!   draining) one fails with [`TransportError::Overlap`]. Register a large region once and hand
//!   out slices of it instead. This is what makes [`Registry::lease_containing`] (which region
//!   holds `[addr, addr + len)`?) unambiguous.
//! - Every operation that touches a region holds a [`Lease`] (an in-flight reference count).
//!   Deregistration is *deferred* while leases are out: the region immediately stops accepting
//!   new leases ([`TransportError::Deregistered`]), and it is removed, and its payload dropped,
//!   when the last lease is released; the deregistering caller gets a receiver that fires then.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::{Access, OpKind, RegionId, Result, TransportError};

/// A registered region's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegionInfo {
    pub(crate) id: RegionId,
    pub(crate) base: u64,
    pub(crate) len: u64,
    pub(crate) access: Access,
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
}

/// The registry: cheap to clone (clones share state).
pub(crate) struct Registry<P> {
    inner: Arc<Mutex<Inner<P>>>,
}

struct Inner<P> {
    next_id: u64,
    regions: HashMap<RegionId, Entry<P>>,
    by_base: BTreeMap<u64, RegionId>,
}

struct Entry<P> {
    info: RegionInfo,
    payload: Arc<P>,
    inflight: usize,
    draining: bool,
    done: Option<oneshot::Sender<()>>,
}

/// The outcome of [`Registry::deregister`].
#[derive(Debug)]
pub(crate) enum Deregistration {
    /// Nothing was in flight: the region is gone and its payload dropped.
    Done,
    /// Operations are in flight; the receiver fires once the last one finished and the payload
    /// was dropped.
    Pending(oneshot::Receiver<()>),
}

impl<P> Clone for Registry<P> {
    fn clone(&self) -> Self {
        Registry {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<P> fmt::Debug for Registry<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry")
            .field("regions", &inner.regions.len())
            .field("next_id", &inner.next_id)
            .finish()
    }
}

impl<P> Default for Registry<P> {
    fn default() -> Self {
        Registry {
            inner: Arc::new(Mutex::new(Inner {
                next_id: 1,
                regions: HashMap::new(),
                by_base: BTreeMap::new(),
            })),
        }
    }
}

impl<P> Inner<P> {
    /// The region overlapping `[base, end)`, live or draining.
    fn overlapping(&self, base: u64, end: u64) -> Option<RegionId> {
        // Ranges do not overlap each other, so only the last region starting before `end` can
        // overlap `[base, end)`.
        let (&start, &id) = self.by_base.range(..end).next_back()?;
        let region_end = start + self.regions[&id].info.len;
        (region_end > base).then_some(id)
    }

    fn missing(&self, id: RegionId) -> TransportError {
        if id.0 != 0 && id.0 < self.next_id {
            TransportError::Deregistered(id)
        } else {
            TransportError::UnknownRegion(id)
        }
    }

    fn live(&self, id: RegionId) -> Result<&Entry<P>> {
        match self.regions.get(&id) {
            Some(e) if !e.draining => Ok(e),
            Some(_) => Err(TransportError::Deregistered(id)),
            None => Err(self.missing(id)),
        }
    }
}

impl<P> Registry<P> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<P>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `[base, base + len)`.
    pub(crate) fn insert(
        &self,
        base: u64,
        len: u64,
        access: Access,
        lkey: u32,
        rkey: u32,
        payload: P,
    ) -> Result<RegionInfo> {
        if len == 0 {
            return Err(TransportError::InvalidArgument(
                "cannot register an empty region".into(),
            ));
        }
        let Some(end) = base.checked_add(len) else {
            return Err(TransportError::InvalidArgument(format!(
                "region at {base:#x} of {len} bytes wraps the address space"
            )));
        };
        let mut inner = self.lock();
        if let Some(existing) = inner.overlapping(base, end) {
            return Err(TransportError::Overlap { base, len, existing });
        }
        let id = RegionId(inner.next_id);
        inner.next_id += 1;
        let info = RegionInfo {
            id,
            base,
            len,
            access,
            lkey,
            rkey,
        };
        inner.by_base.insert(base, id);
        inner.regions.insert(
            id,
            Entry {
                info,
                payload: Arc::new(payload),
                inflight: 0,
                draining: false,
                done: None,
            },
        );
        Ok(info)
    }

    /// A live region's bookkeeping.
    pub(crate) fn info(&self, id: RegionId) -> Result<RegionInfo> {
        Ok(self.lock().live(id)?.info)
    }

    /// Leases `[offset, offset + len)` of region `id` for one operation: checks the region is
    /// live, the range is inside it, and (for a remote operation `op`) that its access allows it.
    pub(crate) fn lease(&self, id: RegionId, offset: u64, len: u64, op: Option<OpKind>) -> Result<Lease<P>> {
        self.lease_in(&mut self.lock(), id, offset, len, op)
    }

    fn lease_in(
        &self,
        inner: &mut Inner<P>,
        id: RegionId,
        offset: u64,
        len: u64,
        op: Option<OpKind>,
    ) -> Result<Lease<P>> {
        let info = inner.live(id)?.info;
        match offset.checked_add(len) {
            Some(end) if end <= info.len => {}
            _ => {
                return Err(TransportError::OutOfBounds {
                    region: id,
                    offset,
                    len,
                    region_len: info.len,
                });
            }
        }
        if let Some(op) = op
            && !info.access.allows(op)
        {
            return Err(TransportError::AccessDenied { region: id, op });
        }
        let entry = inner.regions.get_mut(&id).expect("checked above");
        entry.inflight += 1;
        Ok(Lease {
            inner: Arc::clone(&self.inner),
            payload: Some(Arc::clone(&entry.payload)),
            info,
            offset,
            len,
        })
    }

    /// Leases the live region that contains `[addr, addr + len)` (`len > 0`), if any, for local
    /// use (no access check). (RDMA finds the key of a local buffer this way.)
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn lease_containing(&self, addr: u64, len: u64) -> Option<Lease<P>> {
        if len == 0 {
            return None;
        }
        let end = addr.checked_add(len)?;
        let mut inner = self.lock();
        let (&base, &id) = inner.by_base.range(..=addr).next_back()?;
        let entry = &inner.regions[&id];
        if entry.draining || end > base + entry.info.len {
            return None;
        }
        self.lease_in(&mut inner, id, addr - base, len, None).ok()
    }

    /// Deregisters region `id`: no new leases from now on; removed now if nothing is in flight,
    /// else when the last lease is released.
    pub(crate) fn deregister(&self, id: RegionId) -> Result<Deregistration> {
        let removed = {
            let mut inner = self.lock();
            inner.live(id)?;
            let entry = inner.regions.get_mut(&id).expect("live");
            if entry.inflight > 0 {
                let (tx, rx) = oneshot::channel();
                entry.draining = true;
                entry.done = Some(tx);
                return Ok(Deregistration::Pending(rx));
            }
            let entry = inner.regions.remove(&id).expect("live");
            inner.by_base.remove(&entry.info.base);
            entry
        };
        // Drop the payload (e.g. `ibv_dereg_mr`) outside the lock.
        drop(removed);
        Ok(Deregistration::Done)
    }

    /// Number of regions, draining ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().regions.len()
    }
}

/// One in-flight operation's hold on a region: the region (and its payload) stays registered
/// until every lease is dropped.
pub(crate) struct Lease<P> {
    inner: Arc<Mutex<Inner<P>>>,
    payload: Option<Arc<P>>,
    info: RegionInfo,
    offset: u64,
    len: u64,
}

impl<P> Lease<P> {
    /// The region.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn info(&self) -> &RegionInfo {
        &self.info
    }

    /// The region's payload.
    pub(crate) fn payload(&self) -> &P {
        self.payload.as_ref().expect("present until drop")
    }

    /// Start of the leased range within the region.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the leased range.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

impl<P> fmt::Debug for Lease<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("region", &self.info.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl<P> Drop for Lease<P> {
    fn drop(&mut self) {
        // Release our reference first, so that when the region is removed below its payload is
        // dropped there, before the deregistering caller is told.
        drop(self.payload.take());
        let removed = {
            let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let id = self.info.id;
            let Some(entry) = inner.regions.get_mut(&id) else {
                return;
            };
            entry.inflight -= 1;
            if !(entry.draining && entry.inflight == 0) {
                return;
            }
            let entry = inner.regions.remove(&id).expect("present");
            inner.by_base.remove(&entry.info.base);
            entry
        };
        let mut removed = removed;
        let done = removed.done.take();
        drop(removed);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proptest::prelude::*;

    use super::*;

    /// Counts drops, to check payloads are released exactly when regions go.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn reg() -> (Registry<Counted>, Arc<AtomicUsize>) {
        (Registry::new(), Arc::new(AtomicUsize::new(0)))
    }

    #[test]
    fn insert_rejects_empty_wrapping_and_overlapping_ranges() {
        let (r, drops) = reg();
        let c = || Counted(Arc::clone(&drops));
        assert!(matches!(
            r.insert(0, 0, Access::REMOTE_READ, 0, 0, c()),
            Err(TransportError::InvalidArgument(_))
        ));
        assert!(r.insert(u64::MAX, 2, Access::REMOTE_READ, 0, 0, c()).is_err());
        let a = r.insert(100, 50, Access::REMOTE_READ, 1, 2, c()).unwrap();
        assert_eq!(a.id, RegionId(1));
        for (base, len) in [(100, 50), (90, 11), (149, 1), (120, 5), (0, 1000)] {
            match r.insert(base, len, Access::REMOTE_READ, 0, 0, c()) {
                Err(TransportError::Overlap { existing, .. }) => assert_eq!(existing, a.id),
                other => panic!("[{base}, +{len}) should overlap: {other:?}"),
            }
        }
        // Adjacent ranges are fine.
        let b = r.insert(150, 10, Access::REMOTE_READ, 0, 0, c()).unwrap();
        let z = r.insert(90, 10, Access::REMOTE_READ, 0, 0, c()).unwrap();
        assert_eq!((b.id, z.id), (RegionId(2), RegionId(3)));
        assert_eq!(r.len(), 3);
        // Failed inserts dropped their payloads; ids were not consumed.
        assert_eq!(drops.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn lease_checks_bounds_access_and_liveness() {
        let (r, drops) = reg();
        let a = r
            .insert(4096, 100, Access::REMOTE_READ, 0, 0, Counted(Arc::clone(&drops)))
            .unwrap();
        assert!(r.lease(a.id, 0, 100, Some(OpKind::Read)).is_ok());
        assert!(r.lease(a.id, 100, 0, Some(OpKind::Read)).is_ok());
        assert!(matches!(
            r.lease(a.id, 1, 100, None),
            Err(TransportError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.lease(a.id, u64::MAX, 2, None),
            Err(TransportError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.lease(a.id, 0, 1, Some(OpKind::Write)),
            Err(TransportError::AccessDenied { op: OpKind::Write, .. })
        ));
        assert!(r.lease(a.id, 0, 1, None).is_ok(), "local use needs no remote access");
        assert!(matches!(
            r.lease(RegionId(2), 0, 1, None),
            Err(TransportError::UnknownRegion(_))
        ));
        assert!(matches!(
            r.lease(RegionId(0), 0, 1, None),
            Err(TransportError::UnknownRegion(_))
        ));
        assert!(matches!(r.deregister(a.id), Ok(Deregistration::Done)));
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert!(matches!(
            r.lease(a.id, 0, 1, None),
            Err(TransportError::Deregistered(_))
        ));
        assert!(matches!(r.deregister(a.id), Err(TransportError::Deregistered(_))));
        assert!(matches!(r.info(a.id), Err(TransportError::Deregistered(_))));
    }

    #[test]
    fn deregistration_waits_for_in_flight_leases() {
        let (r, drops) = reg();
        let a = r
            .insert(0, 64, Access::REMOTE_READ_WRITE, 0, 0, Counted(Arc::clone(&drops)))
            .unwrap();
        let l1 = r.lease(a.id, 0, 8, Some(OpKind::Write)).unwrap();
        let l2 = r.lease(a.id, 8, 8, Some(OpKind::Read)).unwrap();
        let Deregistration::Pending(mut rx) = r.deregister(a.id).unwrap() else {
            panic!("leases are out");
        };
        // Draining: no new leases, the range stays reserved, the payload stays alive.
        assert!(matches!(
            r.lease(a.id, 0, 1, None),
            Err(TransportError::Deregistered(_))
        ));
        assert!(r.lease_containing(0, 1).is_none());
        assert!(
            r.insert(0, 64, Access::REMOTE_READ, 0, 0, Counted(Arc::clone(&drops)))
                .is_err()
        );
        assert_eq!(drops.load(Ordering::SeqCst), 1, "only the refused insert's payload");
        drop(l1);
        assert!(rx.try_recv().is_err());
        assert_eq!(r.len(), 1);
        drop(l2);
        assert!(rx.try_recv().is_ok());
        assert_eq!(drops.load(Ordering::SeqCst), 2);
        assert_eq!(r.len(), 0);
        assert!(
            r.insert(0, 64, Access::REMOTE_READ, 0, 0, Counted(Arc::clone(&drops)))
                .is_ok()
        );
    }

    #[test]
    fn lookup_finds_the_containing_region() {
        let (r, drops) = reg();
        let c = || Counted(Arc::clone(&drops));
        let a = r.insert(1000, 100, Access::LOCAL_ONLY, 11, 0, c()).unwrap();
        let b = r.insert(1100, 100, Access::LOCAL_ONLY, 22, 0, c()).unwrap();
        let l = r.lease_containing(1050, 50).unwrap();
        assert_eq!((l.info().id, l.offset(), l.len(), l.info().lkey), (a.id, 50, 50, 11));
        assert_eq!(r.lease_containing(1100, 1).unwrap().info().id, b.id);
        assert!(r.lease_containing(1050, 51).is_none(), "straddles two regions");
        assert!(r.lease_containing(999, 2).is_none());
        assert!(r.lease_containing(1200, 1).is_none());
        assert!(r.lease_containing(1000, 0).is_none());
        assert!(r.lease_containing(u64::MAX, 2).is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Register { base: u64, len: u64, access: u8 },
        Deregister { pick: usize },
        Lease { pick: usize, offset: u64, len: u64, op: u8 },
        Release { pick: usize },
        Lookup { addr: u64, len: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..512u64, 0..64u64, 0..4u8).prop_map(|(base, len, access)| Op::Register { base, len, access }),
            2 => any::<usize>().prop_map(|pick| Op::Deregister { pick }),
            3 => (any::<usize>(), 0..80u64, 0..80u64, 0..3u8)
                .prop_map(|(pick, offset, len, op)| Op::Lease { pick, offset, len, op }),
            2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            2 => (0..600u64, 0..80u64).prop_map(|(addr, len)| Op::Lookup { addr, len }),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        Live,
        Draining,
        Gone,
    }

    /// The naive model: every region ever registered, in id order.
    #[derive(Debug)]
    struct ModelRegion {
        id: RegionId,
        base: u64,
        len: u64,
        access: Access,
        state: State,
        inflight: usize,
    }

    /// Replays `ops` against the registry and the naive model, checking they agree.
    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let (r, drops) = reg();
        let mut model: Vec<ModelRegion> = Vec::new();
        let mut leases: Vec<(usize, Lease<Counted>)> = Vec::new();
        let mut waiters: Vec<(usize, oneshot::Receiver<()>)> = Vec::new();
        let mut refused_payloads = 0usize;

        for op in ops {
            match op {
                Op::Register { base, len, access } => {
                    let access = [
                        Access::LOCAL_ONLY,
                        Access::REMOTE_READ,
                        Access::REMOTE_WRITE,
                        Access::REMOTE_READ_WRITE,
                    ][access as usize];
                    let overlapping: Vec<RegionId> = model
                        .iter()
                        .filter(|m| m.state != State::Gone && m.base < base + len && base < m.base + m.len)
                        .map(|m| m.id)
                        .collect();
                    let got = r.insert(base, len, access, 0, 0, Counted(Arc::clone(&drops)));
                    match (len, overlapping.first(), got) {
                        (0, _, Err(TransportError::InvalidArgument(_))) => refused_payloads += 1,
                        (_, Some(_), Err(TransportError::Overlap { existing, .. })) => {
                            prop_assert!(overlapping.contains(&existing));
                            refused_payloads += 1;
                        }
                        (l, None, Ok(info)) if l > 0 => {
                            prop_assert_eq!(info.id, RegionId(model.len() as u64 + 1));
                            model.push(ModelRegion {
                                id: info.id,
                                base,
                                len,
                                access,
                                state: State::Live,
                                inflight: 0,
                            });
                        }
                        (_, overlap, got) => {
                            prop_assert!(false, "register [{base}, +{len}): model {overlap:?}, got {got:?}")
                        }
                    }
                }
                Op::Deregister { pick } => {
                    if pick % (model.len() + 1) == model.len() {
                        let id = RegionId(model.len() as u64 + 1 + (pick % 3) as u64);
                        prop_assert!(matches!(r.deregister(id), Err(TransportError::UnknownRegion(_))));
                        continue;
                    }
                    let i = pick % (model.len() + 1);
                    let m = &mut model[i];
                    match (m.state, r.deregister(m.id)) {
                        (State::Live, Ok(Deregistration::Done)) if m.inflight == 0 => m.state = State::Gone,
                        (State::Live, Ok(Deregistration::Pending(rx))) if m.inflight > 0 => {
                            m.state = State::Draining;
                            waiters.push((i, rx));
                        }
                        (State::Draining | State::Gone, Err(TransportError::Deregistered(_))) => {}
                        (state, got) => prop_assert!(false, "deregister {:?} in {state:?}: {got:?}", m.id),
                    }
                }
                Op::Lease { pick, offset, len, op } => {
                    if model.is_empty() {
                        continue;
                    }
                    let i = pick % model.len();
                    let op = [None, Some(OpKind::Read), Some(OpKind::Write)][op as usize];
                    let m = &mut model[i];
                    let got = r.lease(m.id, offset, len, op);
                    match got {
                        Ok(lease) => {
                            prop_assert_eq!(m.state, State::Live);
                            prop_assert!(offset + len <= m.len);
                            prop_assert!(op.is_none_or(|op| m.access.allows(op)));
                            prop_assert_eq!((lease.offset(), lease.len(), lease.info().base), (offset, len, m.base));
                            m.inflight += 1;
                            leases.push((i, lease));
                        }
                        Err(TransportError::Deregistered(_)) => prop_assert!(m.state != State::Live),
                        Err(TransportError::OutOfBounds { .. }) => {
                            prop_assert_eq!(m.state, State::Live);
                            prop_assert!(offset + len > m.len);
                        }
                        Err(TransportError::AccessDenied { .. }) => {
                            prop_assert_eq!(m.state, State::Live);
                            prop_assert!(op.is_some_and(|op| !m.access.allows(op)));
                        }
                        Err(e) => prop_assert!(false, "lease: {e}"),
                    }
                }
                Op::Release { pick } => {
                    if leases.is_empty() {
                        continue;
                    }
                    let (i, lease) = leases.swap_remove(pick % leases.len());
                    drop(lease);
                    let m = &mut model[i];
                    m.inflight -= 1;
                    if m.state == State::Draining && m.inflight == 0 {
                        m.state = State::Gone;
                        let w = waiters
                            .iter()
                            .position(|(j, _)| *j == i)
                            .expect("draining has a waiter");
                        let (_, mut rx) = waiters.swap_remove(w);
                        prop_assert!(rx.try_recv().is_ok());
                    }
                }
                Op::Lookup { addr, len } => {
                    let want = (len > 0)
                        .then(|| {
                            model
                                .iter()
                                .find(|m| m.state == State::Live && m.base <= addr && addr + len <= m.base + m.len)
                        })
                        .flatten()
                        .map(|m| m.id);
                    let got = r.lease_containing(addr, len).map(|l| l.info().id);
                    prop_assert_eq!(got, want);
                }
            }
            let gone = model.iter().filter(|m| m.state == State::Gone).count();
            prop_assert_eq!(drops.load(Ordering::SeqCst), gone + refused_payloads);
            prop_assert_eq!(r.len(), model.len() - gone);
            for (_, rx) in &mut waiters {
                prop_assert!(rx.try_recv().is_err(), "a draining region was released early");
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn registry_matches_a_naive_model(ops in proptest::collection::vec(op(), 1..120)) {
            run_model(ops)?;
        }
    }
}
