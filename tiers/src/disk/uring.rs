//! The io_uring engine: one ring on a dedicated thread, fed by the bounded
//! request channel. Each turn of its loop drains every queued request that
//! fits in the free submission slots, submits them all with one
//! `submit_and_wait`, then reaps completions, resubmitting the rest of any
//! short transfer, and answers callers through their oneshots.
//!
//! Writes from the bounce-buffer pool use `WriteFixed` when the pool could be
//! registered with the ring (registration pins memory against
//! RLIMIT_MEMLOCK; when the kernel refuses, writes fall back to plain `Write`
//! and a warning says so). Durable writes are followed by an `Fsync` with
//! `IORING_FSYNC_DATASYNC`.

use super::IoEngineKind;
use super::buf::{BufferPool, IoBuf};
use super::engine::{self, Channel, Completion, IoEngine, IoKind, IoOp, RegisterMode, Request};
use super::files::DataFiles;
use crate::TierResult;
use async_trait::async_trait;
use io_uring::{IoUring, opcode, register::Probe, squeue, types};
use std::io;
use std::sync::Arc;
use tokio::sync::mpsc::{self, error::TryRecvError};

/// Largest transfer one SQE asks for; longer ones continue as short transfers.
const MAX_CHUNK: usize = 1 << 30;

/// io_uring on a dedicated thread.
#[derive(Debug)]
pub(super) struct UringEngine {
    chan: Channel,
    pool: Arc<BufferPool>,
    registered: bool,
}

impl UringEngine {
    /// Sets the ring up on the calling thread (so setup errors come back here,
    /// where `Auto` can fall back), registers the pool as `register` says and
    /// starts the ring thread.
    pub(super) fn start(
        files: Arc<DataFiles>,
        queue_depth: u32,
        pool: Arc<BufferPool>,
        register: RegisterMode,
    ) -> io::Result<Self> {
        let ring: IoUring = IoUring::new(queue_depth.max(1))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::WriteFixed::CODE,
            opcode::Fsync::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel's io_uring lacks opcode {code}"),
                ));
            }
        }
        let registered = match register {
            RegisterMode::Off => false,
            RegisterMode::On => register_pool(&ring, &pool),
            #[cfg(test)]
            RegisterMode::ForceFail => {
                // A buffer over 1 GiB, which the kernel always refuses.
                let bogus = [libc::iovec {
                    iov_base: pool.iovecs()[0].iov_base,
                    iov_len: 1 << 40,
                }];
                // SAFETY: the kernel validates the length before touching memory
                // and refuses this registration (EFAULT/EINVAL/ENOMEM).
                match unsafe { ring.submitter().register_buffers(&bogus) } {
                    Ok(()) => panic!("kernel accepted a 1 TiB registered buffer"),
                    Err(e) => {
                        tracing::warn!(error = %e, "registering disk bounce buffers failed; using plain writes");
                        false
                    }
                }
            }
        };
        let slots = ring.params().sq_entries() as usize;
        let (mut chan, rx) = Channel::new(slots * 2);
        let worker = Worker {
            ring,
            rx,
            files,
            registered,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            inflight: 0,
            cqes: Vec::with_capacity(slots * 2),
            _pool: pool.clone(),
        };
        let t = std::thread::Builder::new()
            .name("kvf-disk-uring".into())
            .spawn(move || worker.run())?;
        chan.add_thread(t);
        Ok(Self { chan, pool, registered })
    }
}

/// Registers the pool's slots as the ring's fixed buffers; `false` (with a
/// warning) if the kernel refuses, typically RLIMIT_MEMLOCK.
fn register_pool(ring: &IoUring, pool: &BufferPool) -> bool {
    let iovecs = pool.iovecs();
    // SAFETY: the iovecs cover the pool's allocation, which outlives the ring
    // (the ring thread owns an `Arc` of the pool and drops the ring first).
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                bytes = iovecs.len() * pool.slot_size(),
                "registering disk bounce buffers failed (RLIMIT_MEMLOCK?); using plain writes"
            );
            false
        }
    }
}

struct InFlight {
    req: Request,
    /// Bytes transferred so far.
    done: usize,
}

/// The ring thread's state. Field order matters: the ring (and its buffer
/// registration) is dropped before the pool memory it points into.
struct Worker {
    ring: IoUring,
    rx: mpsc::Receiver<Request>,
    files: Arc<DataFiles>,
    registered: bool,
    /// In-flight requests by SQE `user_data`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    inflight: usize,
    cqes: Vec<(u64, i32)>,
    _pool: Arc<BufferPool>,
}

impl Worker {
    fn run(mut self) {
        let mut open = true;
        // Failed `io_uring_enter` calls since the last report (logged at most
        // every 10 s: a ring that keeps failing would otherwise log 1000
        // lines a second).
        let (mut failures, mut reported) = (0u64, None::<std::time::Instant>);
        loop {
            if self.inflight == 0 {
                if !open {
                    return;
                }
                match self.rx.blocking_recv() {
                    Some(r) => self.start(r),
                    None => {
                        open = false;
                        continue;
                    }
                }
            }
            // Batch: everything already queued, up to the free SQ slots.
            while open && !self.free.is_empty() {
                match self.rx.try_recv() {
                    Ok(r) => self.start(r),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if self.inflight == 0 {
                continue;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                    _ => {
                        // Requests already in the kernel still own their
                        // buffers, so they cannot be failed early; retry.
                        failures += 1;
                        if reported.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                            tracing::error!(error = %e, failures, inflight = self.inflight, "io_uring_enter failed; retrying");
                            (failures, reported) = (0, Some(std::time::Instant::now()));
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            self.reap();
        }
    }

    fn start(&mut self, req: Request) {
        if req.op.file >= self.files.count() {
            req.complete(Err(io::Error::new(io::ErrorKind::InvalidInput, "no such data file")));
            return;
        }
        let Some(slot) = self.free.pop() else {
            // Callers only start with a free slot.
            req.complete(Err(io::Error::other("io_uring submission slots exhausted")));
            return;
        };
        self.slots[slot] = Some(InFlight { req, done: 0 });
        self.inflight += 1;
        self.push(slot);
    }

    /// Queues the (rest of the) transfer of `slot`.
    fn push(&mut self, slot: usize) {
        let entry = match self.slots[slot].as_mut() {
            Some(f) => build_sqe(f, &self.files, self.registered),
            None => return,
        };
        let entry = match entry {
            Ok(e) => e.user_data(slot as u64),
            Err(e) => return self.finish(slot, Err(e)),
        };
        // SAFETY: the buffer and fd stay valid until the completion is reaped:
        // the request (owning the buffer) sits in `slots` and the files are
        // held by `self.files`. The SQ has a slot: in-flight ops never exceed
        // its size and each has at most one SQE outstanding.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.finish(slot, Err(io::Error::other("io_uring submission queue full")));
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            let slot = ud as usize;
            let Some(f) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                tracing::error!(user_data = ud, "io_uring completion for no request");
                continue;
            };
            if res < 0 {
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    self.push(slot);
                } else {
                    self.finish(slot, Err(io::Error::from_raw_os_error(-res)));
                }
                continue;
            }
            if f.req.op.kind == IoKind::DataSync {
                self.finish(slot, Ok(()));
            } else if res == 0 {
                self.finish(
                    slot,
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "data file ended early")),
                );
            } else {
                f.done += res as usize;
                if f.done >= f.req.op.len {
                    self.finish(slot, Ok(()));
                } else {
                    self.push(slot);
                }
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        if let Some(f) = self.slots[slot].take() {
            self.free.push(slot);
            self.inflight -= 1;
            f.req.complete(result);
        }
    }
}

/// The SQE for the (rest of the) transfer of `f`.
fn build_sqe(f: &mut InFlight, files: &DataFiles, registered: bool) -> io::Result<squeue::Entry> {
    let op = &mut f.req.op;
    let fd = types::Fd(files.fd(op.file));
    if op.kind == IoKind::DataSync {
        return Ok(opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build());
    }
    let buf = op
        .buf
        .as_mut()
        .ok_or_else(|| io::Error::other("I/O request without a buffer"))?;
    let fixed = if registered { buf.pool_slot() } else { None };
    // SAFETY: `done < len <= capacity`, so the pointer stays inside the buffer.
    let ptr = unsafe { buf.as_mut_ptr().add(f.done) };
    let len = (op.len - f.done).min(MAX_CHUNK) as u32;
    let off = op.offset + f.done as u64;
    Ok(match (op.kind, fixed) {
        (IoKind::Read, _) => opcode::Read::new(fd, ptr, len).offset(off).build(),
        (_, Some(idx)) => opcode::WriteFixed::new(fd, ptr, len, idx).offset(off).build(),
        (_, None) => opcode::Write::new(fd, ptr, len).offset(off).build(),
    })
}

#[async_trait]
impl IoEngine for UringEngine {
    fn kind(&self) -> IoEngineKind {
        IoEngineKind::Uring
    }
    fn registered_buffers(&self) -> bool {
        self.registered
    }
    fn write_buf(&self, len: usize) -> IoBuf {
        engine::write_buf_from(&self.pool, len)
    }
    async fn submit(&self, op: IoOp) -> TierResult<Completion> {
        self.chan.submit(op).await
    }
}
