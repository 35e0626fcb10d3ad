//! The psync engine: a few dedicated threads that take requests from the
//! bounded channel and run them with `pread` / `pwrite` / `fdatasync`. The
//! fallback where io_uring is unavailable (old kernels, seccomp, containers
//! that disable it), and the reference the io_uring engine is tested against.

use super::IoEngineKind;
use super::buf::{BufferPool, IoBuf};
use super::engine::{self, Channel, Completion, IoEngine, IoKind, IoOp, Request};
use super::files::DataFiles;
use crate::{TierError, TierResult};
use async_trait::async_trait;
use std::io;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Worker threads of the psync engine.
const THREADS: usize = 4;

/// pread/pwrite on dedicated threads.
#[derive(Debug)]
pub(super) struct PsyncEngine {
    chan: Channel,
    pool: Arc<BufferPool>,
}

impl PsyncEngine {
    /// Starts the worker threads; at most `queue_depth` requests wait in the queue.
    pub(super) fn start(files: Arc<DataFiles>, queue_depth: u32, pool: Arc<BufferPool>) -> TierResult<Self> {
        let (mut chan, rx) = Channel::new(queue_depth as usize);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let (rx, files) = (rx.clone(), files.clone());
            let t = std::thread::Builder::new()
                .name(format!("kvf-disk-psync-{i}"))
                .spawn(move || worker(&rx, &files))
                .map_err(|e| TierError::io("spawning a disk I/O thread", e))?;
            chan.add_thread(t);
        }
        Ok(Self { chan, pool })
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Request>>, files: &DataFiles) {
    loop {
        // One idle worker waits on the queue at a time; the others wait for
        // the lock. A poisoned lock means a sibling panicked: stop too.
        let next = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        let Some(mut req) = next else { return };
        let result = run(files, &mut req.op);
        req.complete(result);
    }
}

/// Runs one op synchronously, retrying short transfers and EINTR.
fn run(files: &DataFiles, op: &mut IoOp) -> io::Result<()> {
    let fd = files.fd(op.file);
    if op.kind == IoKind::DataSync {
        loop {
            // SAFETY: plain syscall on a descriptor the engine keeps open.
            if unsafe { libc::fdatasync(fd) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    let buf: &mut IoBuf = op
        .buf
        .as_mut()
        .ok_or_else(|| io::Error::other("I/O request without a buffer"))?;
    let base = buf.as_mut_ptr();
    let mut done = 0usize;
    while done < op.len {
        let off = (op.offset + done as u64) as libc::off_t;
        // SAFETY: the buffer is valid for `op.len` bytes and owned by the op
        // for the duration of the call.
        let n = unsafe {
            let p = base.add(done);
            match op.kind {
                IoKind::Read => libc::pread(fd, p as *mut libc::c_void, op.len - done, off),
                _ => libc::pwrite(fd, p as *const libc::c_void, op.len - done, off),
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "data file ended early"));
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl IoEngine for PsyncEngine {
    fn kind(&self) -> IoEngineKind {
        IoEngineKind::Psync
    }
    fn registered_buffers(&self) -> bool {
        false
    }
    fn write_buf(&self, len: usize) -> IoBuf {
        engine::write_buf_from(&self.pool, len)
    }
    async fn submit(&self, op: IoOp) -> TierResult<Completion> {
        self.chan.submit(op).await
    }
}
