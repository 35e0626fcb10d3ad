//! [`TcpTransport`]: the block transport over TCP, with the same one-sided semantics as RDMA.
//!
//! Each transport runs a listener task. A peer's read or write of a [`RemoteSlice`] is a request
//! on a connection to the owner's listener, which validates it against the region registry
//! (instance, region, bounds, access; see [`RejectReason`]) and copies out of or into the
//! registered memory with raw pointer copies through a bounce buffer, holding a registry lease
//! for the duration so a concurrent deregistration waits (a peer that stops reading mid-transfer
//! therefore delays deregistration of that region until its connection closes). A refused request
//! gets an error response and the connection stays usable.
//!
//! Wire protocol (little-endian):
//!
//! ```text
//! hello     client -> owner: magic "KVFT" | version u16
//!           owner -> client: magic "KVFT" | version u16 | instance u64  (instance 0: refused)
//! request   op u8 (1 read, 2 write) | request id u64 | instance u64 | region u64 | offset u64
//!           | len u64 (41 bytes), then `len` payload bytes for a write
//! response  status u8 (0 ok, else a reject code) | request id u64 | len u64 (17 bytes), then
//!           `len` payload bytes for a successful read, or a `len`-byte UTF-8 message for an error
//! ```
//!
//! Requests are pipelined: a batch sends all its requests while it reads the responses, which
//! the owner sends in request order; request ids are checked.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

use super::desc::RegionDescriptor;
use super::registry::{Deregistration, Lease, Registry};
use super::{
    Access, Connection, HostRegion, OpKind, ReadOp, RegionHandle, RegionId, RegisteredMemory, RejectReason,
    RemoteSlice, Result, Transport, TransportError, TransportKind, WriteOp, new_instance_id, validate_batch,
};

const MAGIC: &[u8; 4] = b"KVFT";
const PROTOCOL_VERSION: u16 = 1;
const HELLO_LEN: usize = 6;
const HELLO_REPLY_LEN: usize = 14;
const REQUEST_LEN: usize = 41;
const RESPONSE_LEN: usize = 17;
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const STATUS_OK: u8 = 0;
/// Size of the owner's per-connection bounce buffer, and so of its copies.
const CHUNK: usize = 1 << 20;
/// Longest error message a client accepts.
const MAX_MESSAGE: u64 = 64 << 10;
const IO_BUFFER: usize = 64 << 10;

/// What the listener task and its connections share with the transport.
#[derive(Debug)]
struct Shared {
    instance: u64,
    registry: Registry<Arc<dyn RegisteredMemory>>,
}

/// The block transport over TCP. Dropping it stops its listener and the connections it serves.
#[derive(Debug)]
pub struct TcpTransport {
    shared: Arc<Shared>,
    endpoint: SocketAddr,
    listener: JoinHandle<()>,
}

impl TcpTransport {
    /// Binds the listener at `listen` (port 0 picks one) and starts serving peers. Bind a
    /// concrete address: descriptors advertise the bound address as the endpoint.
    pub async fn bind(listen: SocketAddr) -> Result<TcpTransport> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| TransportError::io(format!("bind {listen}"), e))?;
        let endpoint = listener
            .local_addr()
            .map_err(|e| TransportError::io("listener address", e))?;
        let shared = Arc::new(Shared {
            instance: new_instance_id(),
            registry: Registry::new(),
        });
        let listener = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(TcpTransport {
            shared,
            endpoint,
            listener,
        })
    }

    /// This transport instance's id (in its descriptors).
    pub fn instance(&self) -> u64 {
        self.shared.instance
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    async fn register(&self, memory: Arc<dyn RegisteredMemory>, access: Access) -> Result<RegionHandle> {
        let (base, len) = (memory.as_ptr() as u64, memory.len() as u64);
        let info = self.shared.registry.insert(base, len, access, 0, 0, memory)?;
        Ok(RegionHandle::new(self.shared.instance, info.id, info.len))
    }

    async fn deregister(&self, region: RegionHandle) -> Result<()> {
        region.check_owner(self.shared.instance)?;
        match self.shared.registry.deregister(region.id())? {
            Deregistration::Done => Ok(()),
            Deregistration::Pending(done) => {
                // The sender only goes away after the region is released.
                let _ = done.await;
                Ok(())
            }
        }
    }

    fn descriptor(&self, region: &RegionHandle) -> Result<RegionDescriptor> {
        region.check_owner(self.shared.instance)?;
        let info = self.shared.registry.info(region.id())?;
        // TCP addresses regions by id and offset; the base address stays private.
        RegionDescriptor::new(
            TransportKind::Tcp,
            self.endpoint,
            self.shared.instance,
            info.id,
            0,
            info.len,
            0,
        )
    }

    async fn connect(&self, peer: SocketAddr) -> Result<Box<dyn Connection>> {
        Ok(Box::new(TcpConnection::open(peer).await?))
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when the transport aborts this task) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        if let Err(e) = serve(stream, &shared).await {
                            tracing::debug!(%peer, error = %e, "block transport connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "block transport accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A parsed request header.
#[derive(Debug, Clone, Copy)]
struct Request {
    op: u8,
    id: u64,
    instance: u64,
    region: RegionId,
    offset: u64,
    len: u64,
}

impl Request {
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(self.op);
        out.put_u64_le(self.id);
        out.put_u64_le(self.instance);
        out.put_u64_le(self.region.0);
        out.put_u64_le(self.offset);
        out.put_u64_le(self.len);
    }

    fn parse(b: &[u8; REQUEST_LEN]) -> Request {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Request {
            op: b[0],
            id: u64_at(1),
            instance: u64_at(9),
            region: RegionId(u64_at(17)),
            offset: u64_at(25),
            len: u64_at(33),
        }
    }

    fn for_slice(op: u8, id: u64, slice: &RemoteSlice) -> Request {
        let region = slice.region();
        Request {
            op,
            id,
            instance: region.instance(),
            region: region.region(),
            offset: slice.offset(),
            len: slice.len(),
        }
    }
}

fn response_header(status: u8, id: u64, len: u64) -> [u8; RESPONSE_LEN] {
    let mut out = [0u8; RESPONSE_LEN];
    out[0] = status;
    out[1..9].copy_from_slice(&id.to_le_bytes());
    out[9..17].copy_from_slice(&len.to_le_bytes());
    out
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        filled += n;
    }
    Ok(true)
}

async fn send_error<W: AsyncWrite + Unpin>(w: &mut W, id: u64, e: &TransportError) -> io::Result<()> {
    let reason = e.reject_reason().unwrap_or(RejectReason::Internal);
    let message = e.to_string();
    w.write_all(&response_header(reason.code(), id, message.len() as u64))
        .await?;
    w.write_all(message.as_bytes()).await
}

type MemoryLease = Lease<Arc<dyn RegisteredMemory>>;

/// Whether `[at, at + len)` (offsets from the region start) lies in the leased range.
fn in_lease(lease: &MemoryLease, at: usize, len: usize) -> bool {
    let (start, end) = (lease.offset(), lease.offset() + lease.len());
    (at as u64) >= start && at.checked_add(len).is_some_and(|e| e as u64 <= end)
}

/// Copies region bytes `[at, at + dst.len())` into `dst`.
fn copy_out(lease: &MemoryLease, at: usize, dst: &mut [u8]) {
    assert!(in_lease(lease, at, dst.len()), "copy outside the leased range");
    // SAFETY: the lease keeps the region registered and its memory alive, and the range lies
    // inside the leased range, which lies inside the region; `dst` is our own buffer. Only raw
    // copies touch registered memory; the owner coordinates its own access (module docs).
    unsafe { std::ptr::copy_nonoverlapping(lease.payload().as_ptr().add(at), dst.as_mut_ptr(), dst.len()) };
}

/// Copies `src` into region bytes `[at, at + src.len())`.
fn copy_in(lease: &MemoryLease, at: usize, src: &[u8]) {
    assert!(in_lease(lease, at, src.len()), "copy outside the leased range");
    // SAFETY: as in `copy_out`, with the copy going into the region.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), lease.payload().as_ptr().add(at), src.len()) };
}

/// Serves one peer connection until it closes.
async fn serve(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    serve_io(rd, wr, shared).await
}

/// The owner's side of the protocol over any byte stream: hello, then requests until the
/// client closes.
async fn serve_io<R, W>(rd: R, wr: W, shared: &Shared) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut rd = BufReader::with_capacity(IO_BUFFER, rd);
    let mut wr = BufWriter::with_capacity(IO_BUFFER, wr);

    let mut hello = [0u8; HELLO_LEN];
    rd.read_exact(&mut hello).await?;
    if &hello[..4] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a kvfabric block transport client",
        ));
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    let accepted = version == PROTOCOL_VERSION;
    wr.write_all(MAGIC).await?;
    wr.write_all(&PROTOCOL_VERSION.to_le_bytes()).await?;
    wr.write_all(&(if accepted { shared.instance } else { 0 }).to_le_bytes())
        .await?;
    wr.flush().await?;
    if !accepted {
        return Ok(());
    }

    let mut bounce = vec![0u8; CHUNK];
    loop {
        let mut header = [0u8; REQUEST_LEN];
        if !read_exact_or_eof(&mut rd, &mut header).await? {
            return Ok(());
        }
        let req = Request::parse(&header);
        let op = match req.op {
            OP_READ => OpKind::Read,
            OP_WRITE => OpKind::Write,
            other => {
                // Without a known op we cannot tell whether a payload follows: answer and hang up.
                let e = TransportError::Rejected {
                    reason: RejectReason::Malformed,
                    message: format!("unknown operation {other}"),
                };
                send_error(&mut wr, req.id, &e).await?;
                wr.flush().await?;
                return Ok(());
            }
        };
        let lease = if req.instance == shared.instance {
            shared.registry.lease(req.region, req.offset, req.len, Some(op))
        } else {
            Err(TransportError::WrongPeer {
                slice: req.instance,
                peer: shared.instance,
            })
        };
        match (op, lease) {
            (OpKind::Read, Ok(lease)) => {
                wr.write_all(&response_header(STATUS_OK, req.id, req.len)).await?;
                let mut at = lease.offset() as usize;
                let mut left = req.len as usize;
                while left > 0 {
                    let n = left.min(CHUNK);
                    copy_out(&lease, at, &mut bounce[..n]);
                    wr.write_all(&bounce[..n]).await?;
                    at += n;
                    left -= n;
                }
            }
            (OpKind::Write, Ok(lease)) => {
                let mut at = lease.offset() as usize;
                let mut left = req.len as usize;
                while left > 0 {
                    let n = left.min(CHUNK);
                    rd.read_exact(&mut bounce[..n]).await?;
                    copy_in(&lease, at, &bounce[..n]);
                    at += n;
                    left -= n;
                }
                drop(lease);
                wr.write_all(&response_header(STATUS_OK, req.id, 0)).await?;
            }
            (op, Err(e)) => {
                if op == OpKind::Write {
                    // Consume the refused payload so the next request header lines up.
                    let skipped = tokio::io::copy(&mut (&mut rd).take(req.len), &mut tokio::io::sink()).await?;
                    if skipped != req.len {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                send_error(&mut wr, req.id, &e).await?;
            }
        }
        // Answer in bursts: flush once no further pipelined request is already buffered.
        if rd.buffer().is_empty() {
            wr.flush().await?;
        }
    }
}

/// One response as [`ServeHarness::responses`] splits it: status, request id, payload.
#[doc(hidden)]
pub type RawResponse = (u8, u64, Vec<u8>);

/// The owner's side of the protocol over bytes in memory, for the fuzz target
/// (`fuzz/fuzz_targets/tcp_transport.rs`) and tests. Not part of the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct ServeHarness {
    shared: Shared,
    regions: Vec<(Arc<HostRegion>, RegionId)>,
}

impl ServeHarness {
    /// An owner with transport instance `instance` and one zeroed region per `(len, access)`,
    /// registered in that order (region ids 1, 2, ...).
    pub fn new(instance: u64, regions: &[(usize, Access)]) -> Result<ServeHarness> {
        let shared = Shared {
            instance,
            registry: Registry::new(),
        };
        let mut held = Vec::with_capacity(regions.len());
        for &(len, access) in regions {
            let memory = Arc::new(HostRegion::zeroed(len)?);
            let payload: Arc<dyn RegisteredMemory> = memory.clone();
            let info = shared
                .registry
                .insert(memory.as_ptr() as u64, len as u64, access, 0, 0, payload)?;
            held.push((memory, info.id));
        }
        Ok(ServeHarness { shared, regions: held })
    }

    /// The id of the `i`th region.
    pub fn region(&self, i: usize) -> RegionId {
        self.regions[i].1
    }

    /// Fills the `i`th region with `byte`.
    pub fn fill(&self, i: usize, byte: u8) {
        let memory = &self.regions[i].0;
        // SAFETY: nothing else touches the harness's regions while it is not serving.
        unsafe { memory.write_at(0, &vec![byte; memory.len()]) }.expect("in bounds");
    }

    /// A copy of the `i`th region's bytes.
    pub fn contents(&self, i: usize) -> Vec<u8> {
        let memory = &self.regions[i].0;
        let mut out = vec![0u8; memory.len()];
        // SAFETY: as in `fill`.
        unsafe { memory.read_at(0, &mut out) }.expect("in bounds");
        out
    }

    /// Serves `input` as one connection's bytes from the client; returns what the owner
    /// answered and how serving ended.
    pub async fn serve(&self, input: &[u8]) -> (Vec<u8>, io::Result<()>) {
        let mut out = Vec::new();
        let ended = serve_io(input, &mut out, &self.shared).await;
        (out, ended)
    }

    /// Splits an owner's answer into its hello reply's instance (0: refused) and its responses
    /// `(status, request id, payload)`; fails on bytes that are not a whole answer.
    pub fn responses(out: &[u8]) -> std::result::Result<(u64, Vec<RawResponse>), String> {
        if out.len() < HELLO_REPLY_LEN || &out[..4] != MAGIC {
            return Err(format!("no hello reply in {} bytes", out.len()));
        }
        let instance = u64::from_le_bytes(out[6..14].try_into().expect("8 bytes"));
        let mut rest = &out[HELLO_REPLY_LEN..];
        let mut responses = Vec::new();
        while !rest.is_empty() {
            if rest.len() < RESPONSE_LEN {
                return Err(format!("{} bytes of a response header", rest.len()));
            }
            let id = u64::from_le_bytes(rest[1..9].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(rest[9..17].try_into().expect("8 bytes"));
            let body = &rest[RESPONSE_LEN..];
            let len = usize::try_from(len).ok().filter(|&n| n <= body.len());
            let Some(len) = len else {
                return Err(format!("response {id} claims more bytes than follow"));
            };
            responses.push((rest[0], id, body[..len].to_vec()));
            rest = &body[len..];
        }
        Ok((instance, responses))
    }
}

/// A client connection to a [`TcpTransport`]'s listener.
#[derive(Debug)]
struct TcpConnection {
    peer: SocketAddr,
    instance: u64,
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    stream: TcpStream,
    /// Set while a batch is on the wire; still set afterwards if it did not finish cleanly
    /// (an I/O error, or the batch's future was dropped), which leaves the stream out of step.
    broken: bool,
    next_request: u64,
}

impl TcpConnection {
    async fn open(peer: SocketAddr) -> Result<TcpConnection> {
        let context = || format!("connect to block transport at {peer}");
        let mut stream = TcpStream::connect(peer)
            .await
            .map_err(|e| TransportError::io(context(), e))?;
        stream.set_nodelay(true).map_err(|e| TransportError::io(context(), e))?;
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(MAGIC);
        hello[4..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        stream
            .write_all(&hello)
            .await
            .map_err(|e| TransportError::io(context(), e))?;
        let mut reply = [0u8; HELLO_REPLY_LEN];
        stream
            .read_exact(&mut reply)
            .await
            .map_err(|e| TransportError::io(context(), e))?;
        if &reply[..4] != MAGIC {
            return Err(TransportError::Protocol(format!(
                "{peer} is not a kvfabric block transport"
            )));
        }
        let version = u16::from_le_bytes([reply[4], reply[5]]);
        let instance = u64::from_le_bytes(reply[6..14].try_into().expect("8 bytes"));
        if version != PROTOCOL_VERSION || instance == 0 {
            return Err(TransportError::Protocol(format!(
                "{peer} speaks block transport protocol {version}, this build speaks {PROTOCOL_VERSION}"
            )));
        }
        Ok(TcpConnection {
            peer,
            instance,
            state: Mutex::new(ConnState {
                stream,
                broken: false,
                next_request: 1,
            }),
        })
    }
}

impl ConnState {
    /// Starts a batch of `count` requests: fails if the stream is out of step, else marks it busy
    /// and returns the first request id.
    fn begin(&mut self, count: usize) -> Result<u64> {
        if self.broken {
            return Err(TransportError::Broken);
        }
        self.broken = true;
        let first = self.next_request;
        self.next_request += count as u64;
        Ok(first)
    }
}

#[async_trait]
impl Connection for TcpConnection {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    async fn read_many(&self, ops: &mut [ReadOp<'_>]) -> Result<()> {
        validate_batch(
            TransportKind::Tcp,
            self.instance,
            ops.iter().map(|op| (&op.remote, op.local.len())),
        )?;
        if ops.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let first = state.begin(ops.len())?;
        let mut requests = BytesMut::with_capacity(ops.len() * REQUEST_LEN);
        for (i, op) in ops.iter().enumerate() {
            Request::for_slice(OP_READ, first + i as u64, &op.remote).put(&mut requests);
        }
        let (rd, mut wr) = state.stream.split();
        let send = async {
            wr.write_all(&requests)
                .await
                .map_err(|e| TransportError::io("send read requests", e))
        };
        let recv = async {
            let mut rd = BufReader::with_capacity(IO_BUFFER, rd);
            let mut rejected = None;
            for (i, op) in ops.iter_mut().enumerate() {
                match read_response(&mut rd, first + i as u64).await? {
                    Ok(len) if len == op.local.len() as u64 => {
                        rd.read_exact(op.local)
                            .await
                            .map_err(|e| TransportError::io("read payload", e))?;
                    }
                    Ok(len) => {
                        return Err(TransportError::Protocol(format!(
                            "read of {} bytes answered with {len}",
                            op.local.len()
                        )));
                    }
                    Err(e) => {
                        rejected.get_or_insert(e);
                    }
                }
            }
            Ok(rejected)
        };
        let ((), rejected) = tokio::try_join!(send, recv)?;
        state.broken = false;
        rejected.map_or(Ok(()), Err)
    }

    async fn write_many(&self, ops: &[WriteOp<'_>]) -> Result<()> {
        validate_batch(
            TransportKind::Tcp,
            self.instance,
            ops.iter().map(|op| (&op.remote, op.local.len())),
        )?;
        if ops.is_empty() {
            return Ok(());
        }
        let mut state = self.state.lock().await;
        let first = state.begin(ops.len())?;
        let (rd, wr) = state.stream.split();
        let send = async {
            let mut wr = BufWriter::with_capacity(IO_BUFFER, wr);
            let mut header = BytesMut::with_capacity(REQUEST_LEN);
            for (i, op) in ops.iter().enumerate() {
                header.clear();
                Request::for_slice(OP_WRITE, first + i as u64, &op.remote).put(&mut header);
                wr.write_all(&header).await?;
                wr.write_all(op.local).await?;
            }
            wr.flush().await
        };
        let send = async { send.await.map_err(|e| TransportError::io("send writes", e)) };
        let recv = async {
            let mut rd = BufReader::with_capacity(IO_BUFFER, rd);
            let mut rejected = None;
            for i in 0..ops.len() {
                match read_response(&mut rd, first + i as u64).await? {
                    Ok(0) => {}
                    Ok(len) => return Err(TransportError::Protocol(format!("write answered with {len} bytes"))),
                    Err(e) => {
                        rejected.get_or_insert(e);
                    }
                }
            }
            Ok(rejected)
        };
        let ((), rejected) = tokio::try_join!(send, recv)?;
        state.broken = false;
        rejected.map_or(Ok(()), Err)
    }
}

/// Reads one response header, checks its request id, and returns `Ok(len)` for success or the
/// peer's rejection.
async fn read_response<R: AsyncRead + Unpin>(
    rd: &mut R,
    expected_id: u64,
) -> Result<std::result::Result<u64, TransportError>> {
    let mut header = [0u8; RESPONSE_LEN];
    rd.read_exact(&mut header)
        .await
        .map_err(|e| TransportError::io("read response", e))?;
    let status = header[0];
    let id = u64::from_le_bytes(header[1..9].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(header[9..17].try_into().expect("8 bytes"));
    if id != expected_id {
        return Err(TransportError::Protocol(format!(
            "response to request {id}, expected {expected_id}"
        )));
    }
    if status == STATUS_OK {
        return Ok(Ok(len));
    }
    let reason = RejectReason::from_code(status)
        .ok_or_else(|| TransportError::Protocol(format!("unknown response status {status}")))?;
    if len > MAX_MESSAGE {
        return Err(TransportError::Protocol(format!("error message of {len} bytes")));
    }
    let mut message = vec![0u8; len as usize];
    rd.read_exact(&mut message)
        .await
        .map_err(|e| TransportError::io("read error message", e))?;
    Ok(Err(TransportError::Rejected {
        reason,
        message: String::from_utf8_lossy(&message).into_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::{ConnectionExt, HostRegion, conformance};

    async fn pair() -> (TcpTransport, TcpTransport) {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        (
            TcpTransport::bind(loopback).await.unwrap(),
            TcpTransport::bind(loopback).await.unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite() {
        let (a, b) = pair().await;
        tokio::time::timeout(Duration::from_secs(300), conformance::run_all(&a, &b))
            .await
            .expect("suite hung");
    }

    #[tokio::test]
    async fn conformance_suite_on_one_thread() {
        let (a, b) = pair().await;
        tokio::time::timeout(Duration::from_secs(300), conformance::run_all(&b, &a))
            .await
            .expect("suite hung");
    }

    fn hello() -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b
    }

    fn request(op: u8, id: u64, instance: u64, region: RegionId, offset: u64, len: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        Request {
            op,
            id,
            instance,
            region,
            offset,
            len,
        }
        .put(&mut out);
        out.to_vec()
    }

    #[tokio::test]
    async fn harness_serves_bytes_and_checks_every_request() {
        let h = ServeHarness::new(7, &[(4096, Access::REMOTE_READ), (4096, Access::REMOTE_READ_WRITE)]).unwrap();
        h.fill(0, 0xab);
        let (ro, rw) = (h.region(0), h.region(1));
        let mut input = hello();
        input.extend(request(OP_READ, 1, 7, ro, 10, 5));
        input.extend(request(OP_WRITE, 2, 7, ro, 0, 3)); // read-only: refused, payload skipped
        input.extend([1, 2, 3]);
        input.extend(request(OP_WRITE, 3, 7, rw, 4094, 2));
        input.extend([9, 9]);
        input.extend(request(OP_READ, 4, 8, rw, 0, 1)); // another instance
        input.extend(request(OP_READ, 5, 7, rw, 4095, 2)); // past the end
        input.extend(request(OP_READ, 6, 7, RegionId(99), 0, 1)); // no such region
        input.extend(request(9, 7, 7, rw, 0, 0)); // unknown op: answered, then hung up
        input.extend(request(OP_READ, 8, 7, ro, 0, 1)); // never read
        let (out, ended) = h.serve(&input).await;
        ended.unwrap();
        let (instance, responses) = ServeHarness::responses(&out).unwrap();
        assert_eq!(instance, 7);
        let summary: Vec<(u8, u64)> = responses.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            summary,
            vec![
                (STATUS_OK, 1),
                (RejectReason::AccessDenied.code(), 2),
                (STATUS_OK, 3),
                (RejectReason::WrongInstance.code(), 4),
                (RejectReason::OutOfBounds.code(), 5),
                (RejectReason::UnknownRegion.code(), 6),
                (RejectReason::Malformed.code(), 7),
            ]
        );
        assert_eq!(responses[0].2, vec![0xab; 5]);
        assert_eq!(h.contents(0), vec![0xab; 4096], "a read-only region is never written");
        assert_eq!(&h.contents(1)[4094..], &[9, 9]);

        // A wrong protocol version gets instance 0 and nothing more.
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        old.extend(request(OP_READ, 1, 7, ro, 0, 1));
        let (out, ended) = h.serve(&old).await;
        ended.unwrap();
        assert_eq!(ServeHarness::responses(&out).unwrap(), (0, vec![]));
        // A truncated write payload ends the connection with an error, writing nothing.
        let mut cut = hello();
        cut.extend(request(OP_WRITE, 1, 7, rw, 0, 100));
        cut.extend([5; 10]);
        let (_, ended) = h.serve(&cut).await;
        assert!(ended.is_err());
        assert_eq!(h.contents(1)[..10], [0; 10]);
    }

    async fn raw_client(t: &TcpTransport, version: u16) -> (TcpStream, u64) {
        let mut s = TcpStream::connect(t.endpoint()).await.unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&version.to_le_bytes());
        s.write_all(&hello).await.unwrap();
        let mut reply = [0u8; HELLO_REPLY_LEN];
        s.read_exact(&mut reply).await.unwrap();
        (s, u64::from_le_bytes(reply[6..].try_into().unwrap()))
    }

    #[tokio::test]
    async fn other_protocol_versions_are_refused() {
        let (a, _) = pair().await;
        let (mut s, instance) = raw_client(&a, PROTOCOL_VERSION + 1).await;
        assert_eq!(instance, 0);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the owner hangs up");
    }

    #[tokio::test]
    async fn malformed_requests_get_an_answer_and_the_listener_survives() {
        let (a, _) = pair().await;
        let region = a
            .register(Arc::new(HostRegion::zeroed(4096).unwrap()), Access::REMOTE_READ_WRITE)
            .await
            .unwrap();
        let desc = a.descriptor(&region).unwrap();

        // An unknown op: an error response, then the owner hangs up.
        let (mut s, instance) = raw_client(&a, PROTOCOL_VERSION).await;
        assert_eq!(instance, a.instance());
        let mut req = BytesMut::new();
        Request {
            op: 9,
            id: 5,
            instance,
            region: desc.region(),
            offset: 0,
            len: 1,
        }
        .put(&mut req);
        s.write_all(&req).await.unwrap();
        let got = read_response(&mut s, 5).await.unwrap();
        assert!(
            matches!(
                got,
                Err(TransportError::Rejected {
                    reason: RejectReason::Malformed,
                    ..
                })
            ),
            "{got:?}"
        );
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        // A write claiming a huge payload to an unknown region, then a hang-up mid-payload: the
        // owner only loses that connection.
        let (mut s, instance) = raw_client(&a, PROTOCOL_VERSION).await;
        let mut req = BytesMut::new();
        Request {
            op: OP_WRITE,
            id: 1,
            instance,
            region: RegionId(999),
            offset: 0,
            len: u64::MAX,
        }
        .put(&mut req);
        s.write_all(&req).await.unwrap();
        s.write_all(&[1, 2, 3]).await.unwrap();
        drop(s);

        // A truncated header, then a hang-up.
        let (mut s, _) = raw_client(&a, PROTOCOL_VERSION).await;
        s.write_all(&[OP_READ, 0, 0]).await.unwrap();
        drop(s);

        // Garbage instead of a hello.
        let mut s = TcpStream::connect(a.endpoint()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;

        // Still serving.
        let conn = a.connect(a.endpoint()).await.unwrap();
        conn.write(&desc.slice(10, 3).unwrap(), &[1, 2, 3]).await.unwrap();
        let mut back = [0u8; 3];
        conn.read(&desc.slice(10, 3).unwrap(), &mut back).await.unwrap();
        assert_eq!(back, [1, 2, 3]);
        a.deregister(region).await.unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_batch_breaks_only_its_connection() {
        let (a, b) = pair().await;
        let region = a
            .register(Arc::new(HostRegion::zeroed(32 << 20).unwrap()), Access::REMOTE_READ)
            .await
            .unwrap();
        let desc = a.descriptor(&region).unwrap();
        let conn = b.connect(a.endpoint()).await.unwrap();
        let mut buf = vec![0u8; 32 << 20];
        let whole = desc.whole();
        tokio::select! {
            biased;
            _ = conn.read(&whole, &mut buf) => panic!("a 32 MiB read finished in one poll"),
            _ = std::future::ready(()) => {}
        }
        let e = conn.read(&desc.slice(0, 1).unwrap(), &mut buf[..1]).await.unwrap_err();
        assert!(matches!(e, TransportError::Broken), "{e}");
        let fresh = b.connect(a.endpoint()).await.unwrap();
        fresh.read(&desc.slice(0, 1).unwrap(), &mut buf[..1]).await.unwrap();
        drop(conn);
        drop(fresh);
        a.deregister(region).await.unwrap();
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_unavailable() {
        let (a, _) = pair().await;
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = a.connect(dead).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unavailable, "{e}");
    }
}
