//! The disk tier's I/O engine seam: what an I/O request is ([`IoOp`]), what
//! comes back ([`Completion`]), the small [`IoEngine`] trait both engines
//! implement (io_uring in `uring.rs`, pread/pwrite threads in `psync.rs`), and
//! [`start`], which picks one from the configuration.
//!
//! Every engine runs its I/O on dedicated std threads fed by a bounded tokio
//! channel: the async side only sends a request (waiting asynchronously when
//! the queue is full) and awaits a oneshot, so no async worker thread ever
//! blocks on the disk. A request owns its buffer and a keep-alive handle (the
//! extent it touches) until the kernel is done, so a caller that gives up
//! early can never let an extent be reused under an in-flight I/O.

use super::IoEngineKind;
use super::buf::{BufferPool, IoBuf, POOL_SLOT_SIZE, POOL_SLOTS};
use super::files::DataFiles;
use super::psync::PsyncEngine;
use super::uring::UringEngine;
use crate::{TierError, TierResult};
use async_trait::async_trait;
use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Something an in-flight request keeps alive (an extent guard, a committed
/// index entry) until its completion has been handled.
pub(super) type KeepAlive = Arc<dyn Any + Send + Sync>;

/// What an [`IoOp`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IoKind {
    /// Read `len` bytes at `offset` into the buffer.
    Read,
    /// Write the buffer's first `len` bytes at `offset`.
    Write,
    /// `fdatasync` the file.
    DataSync,
}

/// One I/O request against a data file.
#[derive(Debug)]
pub(super) struct IoOp {
    /// What to do.
    pub(super) kind: IoKind,
    /// Data file index.
    pub(super) file: usize,
    /// Byte offset in the file (a multiple of the page size).
    pub(super) offset: u64,
    /// Bytes to transfer (a multiple of the page size; 0 for a sync).
    pub(super) len: usize,
    /// The memory, owned until the kernel is done with it.
    pub(super) buf: Option<IoBuf>,
    /// Dropped only after the I/O completed.
    pub(super) _keep: Option<KeepAlive>,
}

impl IoOp {
    /// A read of `buf.capacity()` bytes at `offset`.
    pub(super) fn read(file: usize, offset: u64, buf: IoBuf, keep: KeepAlive) -> Self {
        Self {
            kind: IoKind::Read,
            file,
            offset,
            len: buf.capacity(),
            buf: Some(buf),
            _keep: Some(keep),
        }
    }
    /// A write of `buf`'s first `len` bytes at `offset`.
    pub(super) fn write(file: usize, offset: u64, len: usize, buf: IoBuf, keep: KeepAlive) -> Self {
        debug_assert!(len <= buf.capacity());
        Self {
            kind: IoKind::Write,
            file,
            offset,
            len,
            buf: Some(buf),
            _keep: Some(keep),
        }
    }
    /// An `fdatasync` of the file.
    pub(super) fn data_sync(file: usize) -> Self {
        Self {
            kind: IoKind::DataSync,
            file,
            offset: 0,
            len: 0,
            buf: None,
            _keep: None,
        }
    }
}

/// A finished request: the op (with its buffer and keep-alive handed back, so
/// the caller decides when they drop) and its outcome.
#[derive(Debug)]
pub(super) struct Completion {
    /// The request as submitted.
    pub(super) op: IoOp,
    /// Whether all `len` bytes were transferred (or the sync succeeded).
    pub(super) result: io::Result<()>,
}

/// A request on its way to an engine thread.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) op: IoOp,
    pub(super) reply: oneshot::Sender<Completion>,
}

impl Request {
    /// Hands the outcome back; if the caller has gone, the op (and what it
    /// keeps alive) is dropped here, after the I/O.
    pub(super) fn complete(self, result: io::Result<()>) {
        let _ = self.reply.send(Completion { op: self.op, result });
    }
}

/// How an engine issues I/O. Built by [`start`]; used through `dyn` at the
/// tier's seam.
#[async_trait]
pub(super) trait IoEngine: Send + Sync + fmt::Debug + 'static {
    /// Which engine this is (never `Auto`).
    fn kind(&self) -> IoEngineKind;
    /// Whether writes from pool buffers go through registered (fixed) buffers.
    fn registered_buffers(&self) -> bool;
    /// A buffer for a write of `len` bytes: a pool slot when one is free and
    /// big enough, else a fresh aligned allocation.
    fn write_buf(&self, len: usize) -> IoBuf;
    /// Queues `op` and waits for it to finish. `Err` only when the engine's
    /// threads are gone; the I/O's own outcome is in the completion.
    async fn submit(&self, op: IoOp) -> TierResult<Completion>;
}

/// Whether (and how) the io_uring engine registers its bounce buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RegisterMode {
    /// Don't register; plain `Write` from the pool.
    Off,
    /// Try to register; fall back to plain `Write` if the kernel refuses.
    On,
    /// Ask the kernel for a registration it must refuse (tests the fallback).
    #[cfg(test)]
    ForceFail,
}

/// The sending half shared by both engines plus their threads: closing it
/// lets the threads drain in-flight I/O and exit, and `Drop` joins them, so
/// the files and buffers outlive every I/O.
#[derive(Debug)]
pub(super) struct Channel {
    tx: Option<mpsc::Sender<Request>>,
    threads: Vec<JoinHandle<()>>,
}

impl Channel {
    /// A channel holding at most `bound` queued requests.
    pub(super) fn new(bound: usize) -> (Self, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(bound.max(1));
        (
            Self {
                tx: Some(tx),
                threads: Vec::new(),
            },
            rx,
        )
    }

    /// Records a thread to join on drop.
    pub(super) fn add_thread(&mut self, t: JoinHandle<()>) {
        self.threads.push(t);
    }

    /// Sends `op` (waiting asynchronously for queue room) and awaits its completion.
    pub(super) async fn submit(&self, op: IoOp) -> TierResult<Completion> {
        let tx = self.tx.as_ref().ok_or_else(engine_gone)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Request { op, reply }).await.map_err(|_| engine_gone())?;
        rx.await.map_err(|_| engine_gone())
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a disk I/O thread panicked");
            }
        }
    }
}

fn engine_gone() -> TierError {
    TierError::Unavailable("disk tier I/O threads are gone".into())
}

/// A buffer for a write of `len` bytes from `pool` or a fresh allocation.
pub(super) fn write_buf_from(pool: &Arc<BufferPool>, len: usize) -> IoBuf {
    if len <= pool.slot_size()
        && let Some(p) = pool.try_acquire()
    {
        return IoBuf::Pooled(p);
    }
    IoBuf::Owned(super::buf::AlignedBuf::uninit(len))
}

/// Starts the engine the configuration asks for. `Auto` tries io_uring and
/// falls back to psync with a warning.
pub(super) fn start(
    kind: IoEngineKind,
    files: Arc<DataFiles>,
    queue_depth: u32,
    register: RegisterMode,
) -> TierResult<Box<dyn IoEngine>> {
    let pool = BufferPool::new(POOL_SLOTS, POOL_SLOT_SIZE);
    match kind {
        IoEngineKind::Uring => UringEngine::start(files, queue_depth, pool, register)
            .map(|e| Box::new(e) as Box<dyn IoEngine>)
            .map_err(|e| TierError::io("setting up io_uring for the disk tier", e)),
        IoEngineKind::Psync => Ok(Box::new(PsyncEngine::start(files, queue_depth, pool)?)),
        IoEngineKind::Auto => match UringEngine::start(files.clone(), queue_depth, pool.clone(), register) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; disk tier falls back to the psync engine");
                Ok(Box::new(PsyncEngine::start(files, queue_depth, pool)?))
            }
        },
    }
}
