//! [`RdmaTransport`] (feature `rdma`): the block transport over RDMA verbs, through the system
//! libibverbs via the `rdma-sys` crate (raw bindgen bindings; it also reimplements the
//! `static inline` verbs such as `ibv_post_send` / `ibv_poll_cq`, which go through the
//! context's ops table).
//!
//! **Untested on hardware**: no RDMA device exists on the build machine or in CI. What runs
//! here without one: access-flag mapping, queue-pair state attribute building, work-request
//! planning, completion-status mapping, and `open()` reporting that there is no device. The
//! conformance suite runs automatically where a device exists.
//!
//! Design:
//!
//! - [`RdmaTransport::open`] opens one device (by name, or the first), allocates a protection
//!   domain and one completion queue shared by all connections, starts a *poller thread* that
//!   drains the CQ (busy-polling while work is outstanding, parked when idle), and binds a TCP
//!   side-channel listener.
//! - `register` is `ibv_reg_mr` with `LOCAL_WRITE` plus `REMOTE_READ` / `REMOTE_WRITE` as the
//!   region's [`Access`] allows (run on the blocking pool: pinning pages takes time); the
//!   descriptor carries the base address and the rkey.
//! - `connect` creates an RC queue pair, exchanges [`RdmaConnInfo`] (QP number, LID, GID, PSN,
//!   MTU) over the side channel, and moves the QP INIT -> RTR -> RTS; the owner's side does the
//!   same for each incoming side channel and keeps its QP until the side channel closes.
//! - Reads and writes are `IBV_WR_RDMA_READ` / `IBV_WR_RDMA_WRITE` work requests, posted as
//!   linked lists of at most `queue_depth` requests (ops over 1 GiB are split), each completion
//!   routed by `wr_id` from the poller thread to the waiting task. A local buffer inside a
//!   registered region uses that region's lkey (zero copy, no registration); any other buffer
//!   is registered for the duration of the op.
//! - Cancellation: if a batch's future is dropped while work requests are posted, the drop
//!   blocks until they complete, because the NIC may still be reading or writing the caller's
//!   buffers.
//! - A failed completion (e.g. a remote access error for a bad rkey, an out-of-bounds or
//!   deregistered region) moves the QP to the error state: the connection reports
//!   [`TransportError::Broken`] from then on; reconnect.

use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::io;
use std::net::SocketAddr;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_cq, ibv_create_cq,
    ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_cq, ibv_destroy_qp, ibv_device_attr, ibv_free_device_list,
    ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_modify_qp, ibv_mr, ibv_open_device, ibv_pd, ibv_poll_cq,
    ibv_port_attr, ibv_port_state, ibv_post_send, ibv_qp, ibv_qp_attr, ibv_qp_attr_mask, ibv_qp_init_attr,
    ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid, ibv_reg_mr, ibv_send_flags, ibv_send_wr, ibv_sge,
    ibv_wc, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode, rdma_t,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::desc::{Mtu, RdmaConnInfo, RegionDescriptor, RemoteSlice};
use super::registry::{Deregistration, Lease, Registry};
use super::{
    Access, Connection, OpKind, ReadOp, RegionHandle, RegisteredMemory, RejectReason, Result, Transport,
    TransportError, TransportKind, WriteOp, new_instance_id, validate_batch,
};

/// Largest single work request; longer ops are split.
const MAX_WR_BYTES: u64 = 1 << 30;
/// Largest side-channel message.
const MAX_SIDE_MESSAGE: usize = 256;

/// Settings of an [`RdmaTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device to open (e.g. `mlx5_0`). Default: the first device libibverbs lists.
    pub device: Option<String>,
    /// Device port. Default 1.
    pub port: u8,
    /// GID table index used when the peer has a GID (RoCE, routed InfiniBand). Default 0.
    pub gid_index: u8,
    /// Side-channel listen address; descriptors advertise the bound address. Default
    /// `127.0.0.1:0` (any free port on loopback).
    pub listen: SocketAddr,
    /// Work requests in flight per connection (send queue depth). Default 256, at least 1.
    pub queue_depth: u32,
    /// Completion queue entries shared by all connections; bounds the work requests in flight
    /// across the transport. Default 4096, at least `queue_depth`.
    pub cq_depth: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            device: None,
            port: 1,
            gid_index: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            queue_depth: 256,
            cq_depth: 4096,
        }
    }
}

impl RdmaConfig {
    fn validate(&self) -> Result<()> {
        if self.queue_depth == 0 || self.cq_depth < self.queue_depth || self.cq_depth > i32::MAX as u32 {
            return Err(TransportError::InvalidArgument(format!(
                "rdma queue_depth {} must be at least 1 and at most cq_depth {} (at most {})",
                self.queue_depth,
                self.cq_depth,
                i32::MAX
            )));
        }
        Ok(())
    }
}

/// The `ibv_access_flags` of a region registered with `access`.
pub(crate) fn access_flags(access: Access) -> ibv_access_flags {
    let mut flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
    if access.allows(OpKind::Read) {
        flags |= ibv_access_flags::IBV_ACCESS_REMOTE_READ;
    }
    if access.allows(OpKind::Write) {
        flags |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
    }
    flags
}

fn os_error(context: impl Into<String>) -> TransportError {
    TransportError::io(context, io::Error::last_os_error())
}

/// An opened device: context, protection domain, and the shared completion queue, destroyed
/// in reverse order.
struct Device {
    cq: NonNull<ibv_cq>,
    pd: NonNull<ibv_pd>,
    ctx: NonNull<ibv_context>,
    name: String,
    port: u8,
    gid_index: u8,
    lid: u16,
    gid: [u8; 16],
    mtu: Mtu,
    max_rd_atomic: u8,
}

// SAFETY: libibverbs objects may be used from any thread; its API is thread-safe.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("lid", &self.lid)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: created in `open_device`; every QP and MR holds an `Arc<Device>`, so none is
        // left, and the poller thread (which also holds one) has exited.
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
            ibv_dealloc_pd(self.pd.as_ptr());
            ibv_close_device(self.ctx.as_ptr());
        }
    }
}

/// Closes a context if device setup fails half-way.
struct CtxGuard(Option<NonNull<ibv_context>>, Option<NonNull<ibv_pd>>);

impl Drop for CtxGuard {
    fn drop(&mut self) {
        // SAFETY: whatever is still held here was created by `open_device` and not handed on.
        unsafe {
            if let Some(pd) = self.1 {
                ibv_dealloc_pd(pd.as_ptr());
            }
            if let Some(ctx) = self.0 {
                ibv_close_device(ctx.as_ptr());
            }
        }
    }
}

/// Opens the configured device (blocking).
fn open_device(config: &RdmaConfig) -> Result<Device> {
    let mut count: c_int = 0;
    // SAFETY: plain FFI call; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        let err = io::Error::last_os_error();
        return Err(TransportError::Unavailable(format!(
            "no RDMA device: ibv_get_device_list failed: {err}"
        )));
    }
    struct ListGuard(*mut *mut rdma_sys::ibv_device);
    impl Drop for ListGuard {
        fn drop(&mut self) {
            // SAFETY: returned by ibv_get_device_list; opened contexts stay valid after this.
            unsafe { ibv_free_device_list(self.0) };
        }
    }
    let _list = ListGuard(list);
    // SAFETY: the list holds `count` device pointers.
    let devices = unsafe { std::slice::from_raw_parts(list, count.max(0) as usize) };
    let names: Vec<String> = devices
        .iter()
        // SAFETY: each entry is a valid device; the name is a NUL-terminated static string.
        .map(|&d| {
            unsafe { CStr::from_ptr(ibv_get_device_name(d)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    if devices.is_empty() {
        return Err(TransportError::Unavailable(
            "no RDMA device: libibverbs lists none".into(),
        ));
    }
    let index = match &config.device {
        None => 0,
        Some(want) => names
            .iter()
            .position(|n| n == want)
            .ok_or_else(|| TransportError::Unavailable(format!("no RDMA device named {want:?}; found {names:?}")))?,
    };
    let name = names[index].clone();

    // SAFETY: a device from the list.
    let ctx = NonNull::new(unsafe { ibv_open_device(devices[index]) })
        .ok_or_else(|| os_error(format!("ibv_open_device({name})")))?;
    let mut guard = CtxGuard(Some(ctx), None);

    // SAFETY: zeroed plain C structs are valid; the context is open.
    let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
    if unsafe { ___ibv_query_port(ctx.as_ptr(), config.port, &mut port) } != 0 {
        return Err(os_error(format!("ibv_query_port({name}, {})", config.port)));
    }
    if port.state != ibv_port_state::IBV_PORT_ACTIVE {
        return Err(TransportError::Unavailable(format!(
            "RDMA device {name} port {} is not active (state {})",
            config.port, port.state
        )));
    }
    let mtu = Mtu::from_code(port.active_mtu)
        .ok_or_else(|| TransportError::Unavailable(format!("{name}: unknown active MTU {}", port.active_mtu)))?;
    // SAFETY: as above; ibv_gid is a plain union of integers.
    let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
    if unsafe { ibv_query_gid(ctx.as_ptr(), config.port, c_int::from(config.gid_index), &mut gid) } != 0 {
        return Err(os_error(format!(
            "ibv_query_gid({name}, {}, {})",
            config.port, config.gid_index
        )));
    }
    // SAFETY: every bit pattern is a valid `raw` view.
    let gid = unsafe { gid.raw };
    // SAFETY: as above.
    let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
    if unsafe { ibv_query_device(ctx.as_ptr(), &mut attr) } != 0 {
        return Err(os_error(format!("ibv_query_device({name})")));
    }
    let max_rd_atomic = attr.max_qp_rd_atom.min(attr.max_qp_init_rd_atom).clamp(1, 16) as u8;

    // SAFETY: the context is open.
    let pd = NonNull::new(unsafe { ibv_alloc_pd(ctx.as_ptr()) }).ok_or_else(|| os_error("ibv_alloc_pd"))?;
    guard.1 = Some(pd);
    // SAFETY: the context is open; no completion channel, vector 0.
    let cq = NonNull::new(unsafe {
        ibv_create_cq(
            ctx.as_ptr(),
            config.cq_depth as c_int,
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    })
    .ok_or_else(|| os_error("ibv_create_cq"))?;
    guard.0 = None;
    guard.1 = None;
    Ok(Device {
        cq,
        pd,
        ctx,
        name,
        port: config.port,
        gid_index: config.gid_index,
        lid: port.lid,
        gid,
        mtu,
        max_rd_atomic,
    })
}

/// A registered memory region; deregistered on drop.
struct Mr {
    raw: NonNull<ibv_mr>,
    _device: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Mr {}
// SAFETY: see `Device`.
unsafe impl Sync for Mr {}

impl Mr {
    /// `ibv_reg_mr` (blocking: pins the pages).
    fn register(device: &Arc<Device>, addr: *mut u8, len: usize, flags: ibv_access_flags) -> Result<Mr> {
        // SAFETY: the caller keeps `[addr, addr + len)` alive until this MR is dropped.
        let raw = unsafe { ibv_reg_mr(device.pd.as_ptr(), addr.cast::<c_void>(), len, flags.0 as c_int) };
        let raw = NonNull::new(raw).ok_or_else(|| os_error(format!("ibv_reg_mr of {len} bytes")))?;
        Ok(Mr {
            raw,
            _device: Arc::clone(device),
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { self.raw.as_ref().lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: a live MR.
        unsafe { self.raw.as_ref().rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `Mr::register`; no work request references it any more (leases
        // and in-flight guards hold the MR until their completions arrived).
        unsafe { ibv_dereg_mr(self.raw.as_ptr()) };
    }
}

impl std::fmt::Debug for Mr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mr")
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

/// What the registry keeps per region: the MR first, so it is deregistered before the memory
/// is released.
struct RdmaRegion {
    mr: Mr,
    _memory: Arc<dyn RegisteredMemory>,
}

/// A queue pair; destroyed on drop.
struct Qp {
    raw: NonNull<ibv_qp>,
    _device: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Qp {}
// SAFETY: see `Device`.
unsafe impl Sync for Qp {}

impl std::fmt::Debug for Qp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qp").field("qp_num", &self.qp_num()).finish()
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `Qp::create`; no batch is in flight (batches hold the QP borrowed).
        unsafe { ibv_destroy_qp(self.raw.as_ptr()) };
    }
}

/// Starting packet sequence number for a QP: any 24-bit value works as long as the peer is
/// told; derive it from the QP number.
pub(crate) fn initial_psn(qp_num: u32) -> u32 {
    qp_num.wrapping_mul(0x9e37_79b9) & RdmaConnInfo::MAX_24BIT
}

/// `INIT` attributes: port, pkey 0, and remote read/write permission on the QP.
pub(crate) fn init_attr(port: u8) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    // SAFETY: a zeroed plain C struct is valid.
    let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
    a.qp_state = ibv_qp_state::IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = port;
    a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_REMOTE_READ | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
    let mask = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
        | ibv_qp_attr_mask::IBV_QP_PORT
        | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
    (a, mask)
}

/// `RTR` attributes: the remote QP, its PSN, the path MTU (the smaller of both sides), and an
/// address vector by LID, with a GRH when the peer has a GID (RoCE, routed InfiniBand).
pub(crate) fn rtr_attr(
    remote: &RdmaConnInfo,
    local_mtu: Mtu,
    port: u8,
    gid_index: u8,
    max_dest_rd_atomic: u8,
) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    // SAFETY: a zeroed plain C struct is valid.
    let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
    a.qp_state = ibv_qp_state::IBV_QPS_RTR;
    a.path_mtu = u32::from(local_mtu.min(remote.mtu()).code());
    a.dest_qp_num = remote.qp_num();
    a.rq_psn = remote.psn();
    a.max_dest_rd_atomic = max_dest_rd_atomic;
    a.min_rnr_timer = 12;
    a.ah_attr.dlid = remote.lid();
    a.ah_attr.sl = 0;
    a.ah_attr.src_path_bits = 0;
    a.ah_attr.port_num = port;
    if remote.gid() != [0; 16] {
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid() };
        a.ah_attr.grh.sgid_index = gid_index;
        a.ah_attr.grh.hop_limit = 64;
    }
    let mask = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_AV
        | ibv_qp_attr_mask::IBV_QP_PATH_MTU
        | ibv_qp_attr_mask::IBV_QP_DEST_QPN
        | ibv_qp_attr_mask::IBV_QP_RQ_PSN
        | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
        | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
    (a, mask)
}

/// `RTS` attributes: our PSN, retry policy, and outstanding RDMA reads.
pub(crate) fn rts_attr(psn: u32, max_rd_atomic: u8) -> (ibv_qp_attr, ibv_qp_attr_mask) {
    // SAFETY: a zeroed plain C struct is valid.
    let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
    a.qp_state = ibv_qp_state::IBV_QPS_RTS;
    a.sq_psn = psn;
    a.timeout = 14;
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.max_rd_atomic = max_rd_atomic;
    let mask = ibv_qp_attr_mask::IBV_QP_STATE
        | ibv_qp_attr_mask::IBV_QP_SQ_PSN
        | ibv_qp_attr_mask::IBV_QP_TIMEOUT
        | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
        | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
        | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
    (a, mask)
}

impl Qp {
    /// Creates an RC queue pair on the shared CQ and moves it to INIT (blocking).
    fn create(device: &Arc<Device>, queue_depth: u32) -> Result<Qp> {
        // SAFETY: a zeroed plain C struct is valid.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = device.cq.as_ptr();
        init.recv_cq = device.cq.as_ptr();
        init.cap.max_send_wr = queue_depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: the protection domain and CQ are live.
        let raw = NonNull::new(unsafe { ibv_create_qp(device.pd.as_ptr(), &mut init) })
            .ok_or_else(|| os_error("ibv_create_qp"))?;
        let qp = Qp {
            raw,
            _device: Arc::clone(device),
        };
        qp.modify("INIT", init_attr(device.port))?;
        Ok(qp)
    }

    fn qp_num(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { self.raw.as_ref().qp_num }
    }

    fn modify(&self, state: &str, (mut attr, mask): (ibv_qp_attr, ibv_qp_attr_mask)) -> Result<()> {
        // SAFETY: a live QP and a fully initialised attribute struct.
        let rc = unsafe { ibv_modify_qp(self.raw.as_ptr(), &mut attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(TransportError::io(
                format!("ibv_modify_qp to {state}"),
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    fn local_info(&self, instance: u64, device: &Device) -> Result<RdmaConnInfo> {
        let qp_num = self.qp_num();
        RdmaConnInfo::new(
            instance,
            qp_num,
            device.lid,
            device.gid,
            initial_psn(qp_num),
            device.mtu,
        )
    }

    /// INIT -> RTR -> RTS against `remote` (blocking).
    fn connect(&self, device: &Device, remote: &RdmaConnInfo) -> Result<()> {
        self.modify(
            "RTR",
            rtr_attr(remote, device.mtu, device.port, device.gid_index, device.max_rd_atomic),
        )?;
        self.modify("RTS", rts_attr(initial_psn(self.qp_num()), device.max_rd_atomic))
    }
}

/// The completions a batch window waits for.
#[derive(Debug)]
struct Window {
    state: Mutex<WindowState>,
    cv: Condvar,
    notify: Notify,
}

#[derive(Debug)]
struct WindowState {
    remaining: usize,
    /// First failed completion: (status, vendor error).
    error: Option<(u32, u32)>,
}

impl Window {
    fn new(count: usize) -> Window {
        Window {
            state: Mutex::new(WindowState {
                remaining: count,
                error: None,
            }),
            cv: Condvar::new(),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `count` completions (unposted requests count as completed without error).
    fn complete(&self, count: usize, status: Option<(u32, u32)>) {
        let mut st = self.lock();
        st.remaining -= count;
        if let Some((code, vendor)) = status {
            let replace = match st.error {
                None => true,
                Some((old, _)) => old == ibv_wc_status::IBV_WC_WR_FLUSH_ERR && code != old,
            };
            if replace {
                st.error = Some((code, vendor));
            }
        }
        if st.remaining == 0 {
            drop(st);
            self.cv.notify_all();
            self.notify.notify_one();
        }
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.lock().remaining == 0 {
                return;
            }
            notified.await;
        }
    }

    fn wait_blocking(&self) {
        let mut st = self.lock();
        while st.remaining > 0 {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Routes completions from the poller thread to windows by `wr_id`.
#[derive(Debug, Default)]
struct Completions {
    pending: Mutex<HashMap<u64, Arc<Window>>>,
    next_wr_id: AtomicU64,
    outstanding: AtomicUsize,
    shutdown: AtomicBool,
}

impl Completions {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Window>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `count` work request ids for `window`; returns the first.
    fn register(&self, window: &Arc<Window>, count: usize) -> u64 {
        let first = self.next_wr_id.fetch_add(count as u64, Ordering::Relaxed);
        let mut pending = self.lock();
        for id in first..first + count as u64 {
            pending.insert(id, Arc::clone(window));
        }
        self.outstanding.fetch_add(count, Ordering::AcqRel);
        first
    }

    /// Forgets ids that were never posted.
    fn cancel(&self, ids: std::ops::Range<u64>, window: &Window) {
        let count = ids.clone().count();
        let mut pending = self.lock();
        for id in ids {
            pending.remove(&id);
        }
        drop(pending);
        self.outstanding.fetch_sub(count, Ordering::AcqRel);
        window.complete(count, None);
    }

    fn complete(&self, wc: &ibv_wc) {
        let Some(window) = self.lock().remove(&wc.wr_id) else {
            tracing::warn!(wr_id = wc.wr_id, "completion for an unknown work request");
            return;
        };
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        let status = (wc.status != ibv_wc_status::IBV_WC_SUCCESS).then_some((wc.status, wc.vendor_err));
        window.complete(1, status);
    }
}

/// Drains the shared CQ until shut down: spins while work is outstanding, parks when idle.
fn poll_loop(device: Arc<Device>, completions: Arc<Completions>) {
    const BATCH: usize = 32;
    // SAFETY: zeroed work completions are valid plain C structs.
    let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
    let mut empty_polls = 0u32;
    while !completions.shutdown.load(Ordering::Acquire) {
        // SAFETY: the CQ lives as long as `device`; `wcs` has room for BATCH entries.
        let n = unsafe { ibv_poll_cq(device.cq.as_ptr(), BATCH as c_int, wcs.as_mut_ptr()) };
        if n < 0 {
            tracing::error!(device = %device.name, rc = n, "ibv_poll_cq failed");
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if n == 0 {
            if completions.outstanding.load(Ordering::Acquire) == 0 {
                empty_polls = 0;
                std::thread::park_timeout(Duration::from_millis(50));
            } else if empty_polls < 10_000 {
                empty_polls += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            continue;
        }
        empty_polls = 0;
        for wc in &wcs[..n as usize] {
            completions.complete(wc);
        }
    }
}

/// The device, its completion routing and poller thread; shared by the transport and its
/// connections, and shut down when the last of them goes.
struct Engine {
    device: Arc<Device>,
    completions: Arc<Completions>,
    /// One permit per CQ entry: bounds work requests in flight across all connections.
    credits: Arc<Semaphore>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("device", &self.device).finish()
    }
}

impl Engine {
    fn start(device: Device, cq_depth: u32) -> Result<Engine> {
        let device = Arc::new(device);
        let completions = Arc::new(Completions::default());
        let poller = std::thread::Builder::new()
            .name(format!("kvfabric-rdma-{}", device.name))
            .spawn({
                let (device, completions) = (Arc::clone(&device), Arc::clone(&completions));
                move || poll_loop(device, completions)
            })
            .map_err(|e| TransportError::io("spawn the RDMA poller thread", e))?;
        Ok(Engine {
            device,
            completions,
            credits: Arc::new(Semaphore::new(cq_depth as usize)),
            poller: Some(poller),
        })
    }

    fn wake(&self) {
        if let Some(p) = &self.poller {
            p.thread().unpark();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.completions.shutdown.store(true, Ordering::Release);
        if let Some(p) = self.poller.take() {
            p.thread().unpark();
            let _ = p.join();
        }
    }
}

/// What the transport, its side-channel tasks and its connections share.
#[derive(Debug)]
struct Shared {
    instance: u64,
    config: RdmaConfig,
    engine: Arc<Engine>,
    registry: Registry<RdmaRegion>,
}

impl std::fmt::Debug for RdmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaRegion").field("mr", &self.mr).finish()
    }
}

/// The block transport over RDMA verbs (feature `rdma`). **Untested on hardware.**
#[derive(Debug)]
pub struct RdmaTransport {
    shared: Arc<Shared>,
    endpoint: SocketAddr,
    listener: JoinHandle<()>,
}

impl RdmaTransport {
    /// Opens the configured device and starts the side-channel listener. Without an RDMA device
    /// this fails with [`TransportError::Unavailable`] ("no RDMA device: ...").
    pub async fn open(config: RdmaConfig) -> Result<RdmaTransport> {
        config.validate()?;
        let device = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || open_device(&config))
                .await
                .map_err(|e| TransportError::Unavailable(format!("device open task failed: {e}")))??
        };
        let engine = Arc::new(Engine::start(device, config.cq_depth)?);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| TransportError::io(format!("bind RDMA side channel {}", config.listen), e))?;
        let endpoint = listener
            .local_addr()
            .map_err(|e| TransportError::io("side channel address", e))?;
        let shared = Arc::new(Shared {
            instance: new_instance_id(),
            config,
            engine,
            registry: Registry::new(),
        });
        let listener = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(RdmaTransport {
            shared,
            endpoint,
            listener,
        })
    }

    /// The opened device's name.
    pub fn device_name(&self) -> &str {
        &self.shared.engine.device.name
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

#[async_trait]
impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    async fn register(&self, memory: Arc<dyn RegisteredMemory>, access: Access) -> Result<RegionHandle> {
        if memory.is_empty() {
            return Err(TransportError::InvalidArgument(
                "cannot register an empty region".into(),
            ));
        }
        let device = Arc::clone(&self.shared.engine.device);
        let region = {
            let memory = Arc::clone(&memory);
            tokio::task::spawn_blocking(move || {
                let mr = Mr::register(&device, memory.as_ptr(), memory.len(), access_flags(access))?;
                Ok::<_, TransportError>(RdmaRegion { mr, _memory: memory })
            })
            .await
            .map_err(|e| TransportError::Unavailable(format!("registration task failed: {e}")))??
        };
        let (lkey, rkey) = (region.mr.lkey(), region.mr.rkey());
        let info =
            self.shared
                .registry
                .insert(memory.as_ptr() as u64, memory.len() as u64, access, lkey, rkey, region)?;
        Ok(RegionHandle::new(self.shared.instance, info.id, info.len))
    }

    async fn deregister(&self, region: RegionHandle) -> Result<()> {
        region.check_owner(self.shared.instance)?;
        match self.shared.registry.deregister(region.id())? {
            Deregistration::Done => Ok(()),
            Deregistration::Pending(done) => {
                let _ = done.await;
                Ok(())
            }
        }
    }

    fn descriptor(&self, region: &RegionHandle) -> Result<RegionDescriptor> {
        region.check_owner(self.shared.instance)?;
        let info = self.shared.registry.info(region.id())?;
        RegionDescriptor::new(
            TransportKind::Rdma,
            self.endpoint,
            self.shared.instance,
            info.id,
            info.base,
            info.len,
            info.rkey,
        )
    }

    async fn connect(&self, peer: SocketAddr) -> Result<Box<dyn Connection>> {
        let context = || format!("RDMA side channel to {peer}");
        let mut side = TcpStream::connect(peer)
            .await
            .map_err(|e| TransportError::io(context(), e))?;
        let shared = Arc::clone(&self.shared);
        let (qp, local) = blocking(move || {
            let qp = Qp::create(&shared.engine.device, shared.config.queue_depth)?;
            let local = qp.local_info(shared.instance, &shared.engine.device)?;
            Ok((qp, local))
        })
        .await?;
        send_info(&mut side, &local)
            .await
            .map_err(|e| TransportError::io(context(), e))?;
        let remote = recv_info(&mut side).await?;
        let shared = Arc::clone(&self.shared);
        let qp = blocking(move || {
            qp.connect(&shared.engine.device, &remote)?;
            Ok(qp)
        })
        .await?;
        Ok(Box::new(RdmaConnection {
            peer,
            peer_instance: remote.instance(),
            shared: Arc::clone(&self.shared),
            state: tokio::sync::Mutex::new(ConnState { qp, broken: false }),
            _side: side,
        }))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransportError::Unavailable(format!("verbs task failed: {e}")))?
}

async fn send_info(side: &mut TcpStream, info: &RdmaConnInfo) -> io::Result<()> {
    let bytes = info.encode();
    side.write_all(&(bytes.len() as u16).to_le_bytes()).await?;
    side.write_all(&bytes).await
}

async fn recv_info(side: &mut TcpStream) -> Result<RdmaConnInfo> {
    let mut len = [0u8; 2];
    side.read_exact(&mut len)
        .await
        .map_err(|e| TransportError::io("read RDMA connection info", e))?;
    let len = usize::from(u16::from_le_bytes(len));
    if len > MAX_SIDE_MESSAGE {
        return Err(TransportError::Protocol(format!("RDMA connection info of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    side.read_exact(&mut buf)
        .await
        .map_err(|e| TransportError::io("read RDMA connection info", e))?;
    RdmaConnInfo::decode(&buf)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut sides = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    sides.spawn(async move {
                        if let Err(e) = serve_side_channel(stream, shared).await {
                            tracing::debug!(%peer, error = %e, "RDMA side channel ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "RDMA side channel accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = sides.join_next(), if !sides.is_empty() => {}
        }
    }
}

/// The owner's side of a connection: a QP connected to the peer's, kept until the peer closes
/// the side channel. The peer's one-sided operations never involve this task.
async fn serve_side_channel(mut side: TcpStream, shared: Arc<Shared>) -> Result<()> {
    let remote = recv_info(&mut side).await?;
    let qp = {
        let shared = Arc::clone(&shared);
        blocking(move || {
            let qp = Qp::create(&shared.engine.device, shared.config.queue_depth)?;
            let local = qp.local_info(shared.instance, &shared.engine.device)?;
            qp.connect(&shared.engine.device, &remote)?;
            Ok((qp, local))
        })
        .await?
    };
    let (qp, local) = qp;
    send_info(&mut side, &local)
        .await
        .map_err(|e| TransportError::io("send RDMA connection info", e))?;
    let mut sink = [0u8; 64];
    while side
        .read(&mut sink)
        .await
        .map_err(|e| TransportError::io("RDMA side channel", e))?
        > 0
    {}
    blocking(move || {
        drop(qp);
        Ok(())
    })
    .await
}

/// One work request to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WrSpec {
    pub(crate) op: OpKind,
    pub(crate) local_addr: u64,
    pub(crate) lkey: u32,
    pub(crate) remote_addr: u64,
    pub(crate) rkey: u32,
    pub(crate) len: u32,
}

/// Work requests for ops `(local_addr, lkey, remote_addr, rkey, len)`: zero-length ops post
/// nothing, longer ones are split into pieces of at most `max_bytes`.
pub(crate) fn plan_work_requests(
    op: OpKind,
    ops: impl IntoIterator<Item = (u64, u32, u64, u32, u64)>,
    max_bytes: u32,
) -> Vec<WrSpec> {
    let max = u64::from(max_bytes.max(1));
    let mut out = Vec::new();
    for (local_addr, lkey, remote_addr, rkey, len) in ops {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            out.push(WrSpec {
                op,
                local_addr: local_addr + done,
                lkey,
                remote_addr: remote_addr + done,
                rkey,
                len: n as u32,
            });
            done += n;
        }
    }
    out
}

/// The error for a failed work completion.
pub(crate) fn completion_error(status: u32, vendor_err: u32) -> TransportError {
    // SAFETY: returns a pointer to a static string for any value.
    let text = unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned();
    let message = format!("{text} (status {status}, vendor error {vendor_err:#x})");
    match status {
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => TransportError::Rejected {
            reason: RejectReason::RemoteAccess,
            message,
        },
        ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => TransportError::Rejected {
            reason: RejectReason::Malformed,
            message,
        },
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR | ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => {
            TransportError::Unavailable(format!("peer unreachable: {message}"))
        }
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => TransportError::Broken,
        _ => TransportError::Protocol(format!("work completion failed: {message}")),
    }
}

/// Posts `specs` as one linked chain with ids from `first_id`; on failure returns how many were
/// posted and the error code.
fn post_send(qp: &Qp, specs: &[WrSpec], first_id: u64) -> std::result::Result<(), (usize, c_int)> {
    let mut sges: Vec<ibv_sge> = specs
        .iter()
        .map(|s| ibv_sge {
            addr: s.local_addr,
            length: s.len,
            lkey: s.lkey,
        })
        .collect();
    let mut wrs: Vec<ibv_send_wr> = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        // SAFETY: a zeroed work request (null pointers, zero unions) is valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = first_id + i as u64;
        wr.sg_list = &mut sges[i];
        wr.num_sge = 1;
        wr.opcode = match s.op {
            OpKind::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
            OpKind::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.wr.rdma = rdma_t {
            remote_addr: s.remote_addr,
            rkey: s.rkey,
        };
        wrs.push(wr);
    }
    let base = wrs.as_mut_ptr();
    for i in 1..wrs.len() {
        // SAFETY: both indices are in bounds; the vector is not resized afterwards.
        unsafe { (*base.add(i - 1)).next = base.add(i) };
    }
    let mut bad: *mut ibv_send_wr = ptr::null_mut();
    // SAFETY: a live QP; the chain and its SGEs live until the call returns (the provider copies
    // them into the send queue). The caller keeps the local buffers and their keys alive until
    // every posted request completed (`InFlight`); remote memory is guarded by the peer's MR.
    let rc = unsafe { ibv_post_send(qp.raw.as_ptr(), base, &mut bad) };
    if rc == 0 {
        return Ok(());
    }
    let posted = if bad.is_null() {
        0
    } else {
        (bad as usize - base as usize) / std::mem::size_of::<ibv_send_wr>()
    };
    Err((posted, rc))
}

/// A local buffer's key holder for the duration of a batch.
enum LocalKey {
    /// The buffer lies in a registered region.
    Region {
        /// Keeps the region registered.
        _lease: Lease<RdmaRegion>,
    },
    /// The buffer was registered for this batch.
    Temporary {
        /// Deregistered when the batch is done.
        _mr: Mr,
    },
}

/// Held while a window's work requests are posted: dropping it before they completed blocks
/// until they have, since the NIC may still be using the buffers. It owns the local keys, so
/// they outlive the work.
struct InFlight {
    window: Arc<Window>,
    _keys: Arc<Vec<LocalKey>>,
    _credits: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.window.wait_blocking();
    }
}

#[derive(Debug)]
struct ConnState {
    qp: Qp,
    /// Set while work is posted; stays set after a failed completion (the QP is in the error
    /// state) or a dropped batch.
    broken: bool,
}

/// A connection to a peer [`RdmaTransport`].
#[derive(Debug)]
struct RdmaConnection {
    peer: SocketAddr,
    peer_instance: u64,
    shared: Arc<Shared>,
    state: tokio::sync::Mutex<ConnState>,
    /// The side channel; closing it tells the owner to destroy its QP.
    _side: TcpStream,
}

impl RdmaConnection {
    /// Runs a validated batch of `(local address, remote slice)` ops.
    async fn run(&self, op: OpKind, ops: &[(u64, RemoteSlice)]) -> Result<()> {
        let mut state = self.state.lock().await;
        if state.broken {
            return Err(TransportError::Broken);
        }
        // Local keys: a registered region's, or a temporary registration.
        let mut keys = Vec::new();
        let mut lkeys = Vec::with_capacity(ops.len());
        for &(addr, remote) in ops {
            if remote.is_empty() {
                lkeys.push(0);
                continue;
            }
            if let Some(lease) = self.shared.registry.lease_containing(addr, remote.len()) {
                lkeys.push(lease.info().lkey);
                keys.push(LocalKey::Region { _lease: lease });
                continue;
            }
            let device = Arc::clone(&self.shared.engine.device);
            let len = remote.len() as usize;
            let flags = match op {
                OpKind::Read => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
                OpKind::Write => ibv_access_flags(0),
            };
            // The address travels as an integer; the caller's borrow keeps the buffer alive
            // until this batch finishes, and a registration finishing after a cancellation is
            // dropped (deregistered) by the blocking task.
            let mr = blocking(move || Mr::register(&device, addr as *mut u8, len, flags)).await?;
            lkeys.push(mr.lkey());
            keys.push(LocalKey::Temporary { _mr: mr });
        }
        let keys = Arc::new(keys);
        let specs = plan_work_requests(
            op,
            ops.iter().zip(&lkeys).map(|(&(addr, remote), &lkey)| {
                (addr, lkey, remote.remote_addr(), remote.region().rkey(), remote.len())
            }),
            MAX_WR_BYTES as u32,
        );
        state.broken = true;
        for window in specs.chunks(self.shared.config.queue_depth as usize) {
            self.post_and_wait(&state.qp, window, &keys).await?;
        }
        state.broken = false;
        Ok(())
    }

    async fn post_and_wait(&self, qp: &Qp, specs: &[WrSpec], keys: &Arc<Vec<LocalKey>>) -> Result<()> {
        let engine = &self.shared.engine;
        let credits = Arc::clone(&engine.credits)
            .acquire_many_owned(specs.len() as u32)
            .await
            .map_err(|_| TransportError::Unavailable("RDMA transport closed".into()))?;
        let window = Arc::new(Window::new(specs.len()));
        let first_id = engine.completions.register(&window, specs.len());
        let guard = InFlight {
            window: Arc::clone(&window),
            _keys: Arc::clone(keys),
            _credits: credits,
        };

        if let Err((posted, rc)) = post_send(qp, specs, first_id) {
            engine
                .completions
                .cancel(first_id + posted as u64..first_id + specs.len() as u64, &window);
            engine.wake();
            window.wait().await;
            drop(guard);
            return Err(TransportError::io("ibv_post_send", io::Error::from_raw_os_error(rc)));
        }
        engine.wake();
        window.wait().await;
        drop(guard);
        let error = window.lock().error;
        match error {
            None => Ok(()),
            Some((status, vendor)) => Err(completion_error(status, vendor)),
        }
    }
}

#[async_trait]
impl Connection for RdmaConnection {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    async fn read_many(&self, ops: &mut [ReadOp<'_>]) -> Result<()> {
        validate_batch(
            TransportKind::Rdma,
            self.peer_instance,
            ops.iter().map(|op| (&op.remote, op.local.len())),
        )?;
        let plan: Vec<(u64, RemoteSlice)> = ops
            .iter_mut()
            .map(|op| (op.local.as_mut_ptr() as u64, op.remote))
            .collect();
        self.run(OpKind::Read, &plan).await
    }

    async fn write_many(&self, ops: &[WriteOp<'_>]) -> Result<()> {
        validate_batch(
            TransportKind::Rdma,
            self.peer_instance,
            ops.iter().map(|op| (&op.remote, op.local.len())),
        )?;
        let plan: Vec<(u64, RemoteSlice)> = ops.iter().map(|op| (op.local.as_ptr() as u64, op.remote)).collect();
        self.run(OpKind::Write, &plan).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::conformance;

    #[test]
    fn access_maps_to_verbs_flags() {
        let local = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        let read = ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        let write = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        assert_eq!(access_flags(Access::LOCAL_ONLY), local);
        assert_eq!(access_flags(Access::REMOTE_READ), local | read);
        assert_eq!(access_flags(Access::REMOTE_WRITE), local | write);
        assert_eq!(access_flags(Access::REMOTE_READ_WRITE), local | read | write);
        // The values libibverbs defines.
        assert_eq!((local.0, write.0, read.0), (1, 2, 4));
    }

    #[test]
    fn qp_state_attributes() {
        let (a, mask) = init_attr(2);
        assert_eq!(
            (a.qp_state, a.port_num, a.pkey_index),
            (ibv_qp_state::IBV_QPS_INIT, 2, 0)
        );
        assert_eq!(a.qp_access_flags, 4 | 2);
        assert_eq!(mask.0, 1 | 8 | 16 | 32);

        let remote = RdmaConnInfo::new(7, 0x1234, 9, [0; 16], 0x4242, Mtu::Mtu4096).unwrap();
        let (a, mask) = rtr_attr(&remote, Mtu::Mtu1024, 1, 3, 16);
        assert_eq!(a.qp_state, ibv_qp_state::IBV_QPS_RTR);
        assert_eq!(a.path_mtu, u32::from(Mtu::Mtu1024.code()), "the smaller MTU wins");
        assert_eq!((a.dest_qp_num, a.rq_psn, a.max_dest_rd_atomic), (0x1234, 0x4242, 16));
        assert_eq!((a.ah_attr.dlid, a.ah_attr.port_num, a.ah_attr.is_global), (9, 1, 0));
        let expected = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        assert_eq!(mask, expected);

        // A peer with a GID (RoCE) gets a global route header.
        let gid = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let remote = RdmaConnInfo::new(7, 1, 0, gid, 1, Mtu::Mtu1024).unwrap();
        let (a, _) = rtr_attr(&remote, Mtu::Mtu4096, 1, 3, 1);
        assert_eq!(a.path_mtu, u32::from(Mtu::Mtu1024.code()));
        assert_eq!((a.ah_attr.is_global, a.ah_attr.grh.sgid_index), (1, 3));
        // SAFETY: reading the raw view of a union of integers.
        assert_eq!(unsafe { a.ah_attr.grh.dgid.raw }, gid);

        let (a, mask) = rts_attr(0x777, 8);
        assert_eq!(a.qp_state, ibv_qp_state::IBV_QPS_RTS);
        assert_eq!(
            (a.sq_psn, a.max_rd_atomic, a.timeout, a.retry_cnt, a.rnr_retry),
            (0x777, 8, 14, 7, 7)
        );
        assert_eq!(mask.0, 1 | 512 | 1024 | 2048 | 8192 | 65536);
    }

    #[test]
    fn psns_fit_in_24_bits() {
        for qpn in [0, 1, 0xff_ffff, 0x12_3456] {
            assert!(initial_psn(qpn) <= RdmaConnInfo::MAX_24BIT);
        }
    }

    #[test]
    fn work_request_planning_splits_and_skips() {
        let specs = plan_work_requests(
            OpKind::Write,
            [
                (0x1000, 1, 0x9000, 2, 10),
                (0x2000, 3, 0xa000, 4, 0),
                (0x3000, 5, 0xb000, 6, 25),
            ],
            10,
        );
        let got: Vec<_> = specs
            .iter()
            .map(|s| (s.local_addr, s.lkey, s.remote_addr, s.rkey, s.len))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 1, 0x9000, 2, 10),
                (0x3000, 5, 0xb000, 6, 10),
                (0x300a, 5, 0xb00a, 6, 10),
                (0x3014, 5, 0xb014, 6, 5),
            ]
        );
        assert!(specs.iter().all(|s| s.op == OpKind::Write));
        let big = plan_work_requests(OpKind::Read, [(0, 0, 0, 0, 3 * MAX_WR_BYTES + 1)], MAX_WR_BYTES as u32);
        assert_eq!(big.len(), 4);
        assert_eq!(big.iter().map(|s| u64::from(s.len)).sum::<u64>(), 3 * MAX_WR_BYTES + 1);
    }

    #[test]
    fn completion_statuses_map_to_errors() {
        let e = completion_error(ibv_wc_status::IBV_WC_REM_ACCESS_ERR, 0x88);
        assert_eq!(e.reject_reason(), Some(RejectReason::RemoteAccess), "{e}");
        assert!(e.to_string().contains("0x88"));
        assert!(matches!(
            completion_error(ibv_wc_status::IBV_WC_WR_FLUSH_ERR, 0),
            TransportError::Broken
        ));
        assert_eq!(
            completion_error(ibv_wc_status::IBV_WC_RETRY_EXC_ERR, 0).kind(),
            crate::ErrorKind::Unavailable
        );
    }

    #[test]
    fn windows_count_completions_and_keep_the_first_real_error() {
        let w = Window::new(3);
        w.complete(1, Some((ibv_wc_status::IBV_WC_WR_FLUSH_ERR, 0)));
        w.complete(1, Some((ibv_wc_status::IBV_WC_REM_ACCESS_ERR, 1)));
        w.complete(1, Some((ibv_wc_status::IBV_WC_WR_FLUSH_ERR, 0)));
        w.wait_blocking();
        assert_eq!(w.lock().error, Some((ibv_wc_status::IBV_WC_REM_ACCESS_ERR, 1)));
    }

    #[test]
    fn config_is_validated() {
        assert!(RdmaConfig::default().validate().is_ok());
        assert!(
            RdmaConfig {
                queue_depth: 0,
                ..RdmaConfig::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            RdmaConfig {
                queue_depth: 8,
                cq_depth: 4,
                ..RdmaConfig::default()
            }
            .validate()
            .is_err()
        );
    }

    /// Opens a transport, or says why there is none here.
    async fn open_or_skip() -> Option<RdmaTransport> {
        match RdmaTransport::open(RdmaConfig::default()).await {
            Ok(t) => Some(t),
            Err(TransportError::Unavailable(why)) => {
                println!("skipping: no RDMA device ({why})");
                None
            }
            Err(e) => panic!("opening an RDMA transport failed unexpectedly: {e}"),
        }
    }

    #[tokio::test]
    async fn open_reports_a_missing_device_clearly() {
        if let Some(t) = open_or_skip().await {
            println!("RDMA device present: {}", t.device_name());
        }
        let named = RdmaConfig {
            device: Some("no-such-rdma-device".into()),
            ..RdmaConfig::default()
        };
        match RdmaTransport::open(named).await {
            Err(TransportError::Unavailable(why)) => assert!(why.contains("no RDMA device"), "{why}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite_on_a_device() {
        let (Some(a), Some(b)) = (open_or_skip().await, open_or_skip().await) else {
            return;
        };
        tokio::time::timeout(Duration::from_secs(300), conformance::run_all(&a, &b))
            .await
            .expect("suite hung");
    }
}
