//! The zero-copy local client: for an engine on the same host as its node.
//!
//! [`LocalClient`] connects to the node's Unix socket and receives the memfd
//! of the node's host-tier arena, which it maps. Block bytes never cross the
//! socket: a put reserves arena slots, copies each value in with one
//! `memcpy` and commits; a get acquires leases on slots, copies out, and
//! releases them. Every reservation and lease expires on the node, so a
//! crashed engine holds nothing for long, and ids are per connection, so a
//! client can only commit its own slots. With [`LocalOptions::write_guard`]
//! the arena is mapped read-only and only a reserved slot is made writable,
//! for the duration of its copy, so even a stray write by the engine faults
//! instead of corrupting a committed block.
//!
//! The wire protocol is in `proto/kvfabric/v1/local.proto`.

#[cfg(feature = "cuda")]
mod cuda;
mod mapping;
pub(crate) mod wire;

#[cfg(feature = "cuda")]
pub use cuda::{DeviceLink, DevicePut, PUT_CHUNK_BYTES};

use crate::client::{ClientError, Result};
use crate::proto::LOCAL_PROTOCOL_VERSION;
use crate::proto::v1::{
    self, LocalAbort, LocalAcquire, LocalCommit, LocalCommitItem, LocalHello, LocalRelease, LocalRequest, LocalReserve,
    LocalResponse, LocalWelcome, local_request, local_response,
};
use crate::validate;
use bytes::Bytes;
use mapping::Mapping;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::UnixStream;

pub use crate::proto::v1::{Durability, Layout, Tier};
pub use wire::decode_frame;

/// Where [`LocalClient::read_rounds`] copies leased objects to.
trait RoundSink {
    /// Copies (or starts copying) object `i` out of its leased slot.
    fn copy(&mut self, i: usize, lease: &v1::LocalLease) -> Result<()>;
    /// Finishes every copy started by `copy`; the leases are released next.
    fn flush(&mut self) -> impl std::future::Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
}

/// Bytes hashed per step while copying: small enough that the hash reads
/// what the copy just brought into cache.
const HASH_CHUNK: usize = 16 << 10;

/// How a [`LocalClient`] connects.
#[derive(Clone, Debug, Default)]
pub struct LocalOptions {
    /// Tenant, as on gRPC; empty means the node's default tenant.
    pub tenant: String,
    /// Map the arena read-only and make only a reserved slot writable, for
    /// the duration of its copy (`mprotect`), so a stray write by the
    /// engine faults instead of landing in a committed block. Costs two
    /// page-table updates with TLB shootdowns per put, measured at about
    /// 40% of local put throughput on the benchmark machine (see
    /// `benches/RESULTS.md`). Off by default: the client library itself
    /// only ever writes inside slots it reserved.
    pub write_guard: bool,
    /// Hash values while copying and have the node verify (see
    /// [`LocalClient::with_checksums`]). Off by default.
    pub checksums: bool,
    /// Bearer token, for a node that authenticates; it must allow the
    /// local path. Default none.
    pub token: Option<crate::auth::Token>,
}

/// One object to put through the local path.
#[derive(Clone, Copy, Debug)]
pub struct LocalPut<'a> {
    /// Key, 1 to 64 bytes.
    pub key: &'a [u8],
    /// Value bytes.
    pub value: &'a [u8],
    /// KV layout recorded with the object.
    pub layout: Option<&'a Layout>,
}

impl<'a> LocalPut<'a> {
    /// An object without layout information.
    pub fn new(key: &'a [u8], value: &'a [u8]) -> Self {
        Self {
            key,
            value,
            layout: None,
        }
    }
}

/// Arena space reserved by [`LocalClient::reserve`], writable until it is
/// committed or aborted.
#[derive(Debug)]
pub struct Reservation {
    id: u64,
    offset: u64,
    len: u64,
    /// The connection that reserved it: a slot is only meaningful in that
    /// connection's mapping, and only while it is open.
    owner: u64,
    /// When the node may expire it: the reserve was sent before this.
    expires: std::time::Instant,
}

impl Reservation {
    /// Reservation id (scoped to the connection).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Offset of the slot in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Bytes reserved.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether zero bytes were reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The socket and its (cancellation-safe) frame reader.
#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    frames: wire::FrameReader,
}

#[derive(Debug)]
struct Inner {
    checksums: std::sync::atomic::AtomicBool,
    path: PathBuf,
    conn: tokio::sync::Mutex<Conn>,
    map: Mapping,
    welcome: LocalWelcome,
    next_id: AtomicU64,
    /// Unique per connection in this process ([`LocalClient::owner`]).
    connection: u64,
}

/// A connection to a co-located node's zero-copy path. Cheap to clone;
/// clones share the connection and the mapping, and requests on one
/// connection run one at a time (open several clients for parallelism).
#[derive(Clone, Debug)]
pub struct LocalClient {
    inner: Arc<Inner>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> ClientError {
    ClientError::Local {
        context: format!("{what} ({})", path.display()),
        source: e,
    }
}

fn status_err(s: &v1::LocalStatus) -> ClientError {
    let st = tonic::Status::new(tonic::Code::from(s.code), s.message.clone());
    ClientError::from(st)
}

impl LocalClient {
    /// Connects as the default tenant with default [`LocalOptions`].
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self> {
        Self::connect_with(socket, LocalOptions::default()).await
    }

    /// Connects as `tenant`.
    pub async fn connect_as(socket: impl AsRef<Path>, tenant: &str) -> Result<Self> {
        Self::connect_with(
            socket,
            LocalOptions {
                tenant: tenant.to_string(),
                ..Default::default()
            },
        )
        .await
    }

    /// Connects with explicit options.
    pub async fn connect_with(socket: impl AsRef<Path>, options: LocalOptions) -> Result<Self> {
        let tenant = options.tenant.as_str();
        let path = socket.as_ref().to_path_buf();
        if !tenant.is_empty() {
            validate::name("tenant", tenant).map_err(ClientError::InvalidArgument)?;
        }
        let mut s = UnixStream::connect(&path)
            .await
            .map_err(|e| io_err(&path, "connecting to the node's local socket", e))?;
        let hello = LocalHello {
            version: LOCAL_PROTOCOL_VERSION,
            tenant: tenant.to_string(),
            token: options
                .token
                .as_ref()
                .map(|t| t.secret().to_string())
                .unwrap_or_default(),
        };
        wire::write_msg(&mut s, &hello)
            .await
            .map_err(|e| io_err(&path, "sending hello", e))?;
        let (body, fd) = wire::read_frame_with_fd(&mut s)
            .await
            .map_err(|e| io_err(&path, "handshake with the node", e))?;
        let Some(fd) = fd else {
            // A refused hello is answered with an error response, no arena.
            let refusal: LocalResponse =
                wire::decode(&body).map_err(|e| io_err(&path, "handshake with the node", e))?;
            return Err(match refusal.error {
                Some(e) => status_err(&e),
                None => ClientError::Protocol("the node's welcome carried no arena".into()),
            });
        };
        let welcome: LocalWelcome = wire::decode(&body).map_err(|e| io_err(&path, "handshake with the node", e))?;
        if welcome.version != LOCAL_PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "node speaks local protocol {}, this client {LOCAL_PROTOCOL_VERSION}",
                welcome.version
            )));
        }
        let map = Mapping::map(fd, welcome.arena_bytes, options.write_guard)
            .map_err(|e| io_err(&path, "mapping the arena", e))?;
        Ok(LocalClient {
            inner: Arc::new(Inner {
                checksums: std::sync::atomic::AtomicBool::new(options.checksums),
                path,
                conn: tokio::sync::Mutex::new(Conn {
                    stream: s,
                    frames: wire::FrameReader::default(),
                }),
                map,
                welcome,
                next_id: AtomicU64::new(1),
                connection: {
                    static CONNECTIONS: AtomicU64 = AtomicU64::new(1);
                    CONNECTIONS.fetch_add(1, Ordering::Relaxed)
                },
            }),
        })
    }

    /// Hash every value while copying it in and have the node verify the
    /// hash at commit (end-to-end integrity of the copy into the arena; costs
    /// a pass over the bytes on each side). Off by default: the node then
    /// computes each object's checksum when it first leaves host memory, so
    /// data on disk, in the object store and on the wire is still verified.
    /// Applies to the connection, so to every clone of this client.
    pub fn with_checksums(self, on: bool) -> Self {
        self.inner.checksums.store(on, Ordering::Relaxed);
        self
    }

    /// Identifies this connection (shared by clones), unique in the process.
    fn owner(&self) -> u64 {
        self.inner.connection
    }

    /// What the node said in the handshake (arena size, TTLs).
    pub fn welcome(&self) -> &LocalWelcome {
        &self.inner.welcome
    }

    async fn call(&self, op: local_request::Op) -> Result<local_response::Result> {
        // The id is taken under the connection's lock, so ids go out in
        // the order requests do (responses are matched by that order).
        let mut conn = self.inner.conn.lock().await;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let req = LocalRequest { id, op: Some(op) };
        let Conn { stream, frames } = &mut *conn;
        let path = &self.inner.path;
        wire::write_msg(stream, &req)
            .await
            .map_err(|e| io_err(path, "sending a request", e))?;
        // Responses come in request order. One to an earlier request whose
        // caller gave up (dropped its future after sending) is skipped; the
        // node expires whatever that request reserved or leased. (A future
        // dropped mid-send leaves half a frame, and the node closes the
        // connection: later calls fail with `Unavailable`.)
        let resp = loop {
            let resp: LocalResponse = frames
                .next(stream)
                .await
                .map_err(|e| io_err(path, "reading a response", e))?
                .ok_or_else(|| {
                    io_err(
                        path,
                        "reading a response",
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the node closed the connection"),
                    )
                })?;
            if resp.id != 0 && resp.id < id {
                continue;
            }
            break resp;
        };
        drop(conn);
        // Id 0: the node refused the connection's input as a whole.
        if resp.id != id && resp.id != 0 {
            return Err(ClientError::Protocol(format!(
                "response to request {} for request {id}",
                resp.id
            )));
        }
        if let Some(e) = &resp.error {
            return Err(status_err(e));
        }
        resp.result
            .ok_or_else(|| ClientError::Protocol("response without a result".into()))
    }

    /// Reserves one slot per length (low-level; [`Self::put_many`] does
    /// reserve, write and commit in one go).
    pub async fn reserve(&self, lengths: &[u64]) -> Result<Vec<Reservation>> {
        // The node starts each reservation's TTL after this instant.
        let expires =
            std::time::Instant::now() + std::time::Duration::from_millis(self.inner.welcome.reservation_ttl_ms);
        match self
            .call(local_request::Op::Reserve(LocalReserve {
                lengths: lengths.to_vec(),
            }))
            .await?
        {
            local_response::Result::Reserved(r) => {
                if r.slots.len() != lengths.len() {
                    return Err(ClientError::Protocol(
                        "reserve answered a different number of slots".into(),
                    ));
                }
                let mut out = Vec::with_capacity(r.slots.len());
                for s in r.slots {
                    self.inner
                        .map
                        .check_range(s.offset, s.length)
                        .map_err(ClientError::Protocol)?;
                    out.push(Reservation {
                        id: s.id,
                        offset: s.offset,
                        len: s.length,
                        owner: self.owner(),
                        expires,
                    });
                }
                Ok(out)
            }
            _ => Err(ClientError::Protocol("unexpected answer to reserve".into())),
        }
    }

    /// Copies `value` into a reservation (with the write guard on, its pages
    /// are writable only for the duration of the copy). With checksums on (see
    /// [`Self::with_checksums`]) it hashes the bytes on the way and returns
    /// the xxh3-64 to pass to [`Self::commit`]; otherwise `None`.
    ///
    /// Fails without writing when the reservation came from another client
    /// (connection) or its TTL has passed (the node may have given the
    /// space to someone else).
    pub fn write(&self, r: &Reservation, value: &[u8]) -> Result<Option<u64>> {
        if r.owner != self.owner() {
            return Err(ClientError::InvalidArgument(format!(
                "reservation {} belongs to another local connection",
                r.id
            )));
        }
        if std::time::Instant::now() >= r.expires {
            return Err(ClientError::Status {
                kind: crate::ErrorKind::FailedPrecondition,
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "reservation {} is past its {} ms TTL; reserve again",
                    r.id, self.inner.welcome.reservation_ttl_ms
                ),
            });
        }
        if value.len() as u64 != r.len {
            return Err(ClientError::InvalidArgument(format!(
                "value of {} bytes for a reservation of {}",
                value.len(),
                r.len
            )));
        }
        let map = &self.inner.map;
        let _w = map
            .writable(r.offset, r.len)
            .map_err(|e| io_err(&self.inner.path, "mprotect", e))?;
        if !self.inner.checksums.load(Ordering::Relaxed) {
            // SAFETY: [offset, offset + len) lies in a slot reserved to us
            // (checked against the mapping), made writable by `_w`.
            unsafe { map.copy_in(r.offset, value) };
            return Ok(None);
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut at = r.offset;
        for chunk in value.chunks(HASH_CHUNK) {
            // SAFETY: as above.
            unsafe { map.copy_in(at, chunk) };
            h.update(chunk);
            at += chunk.len() as u64;
        }
        Ok(Some(h.digest()))
    }

    /// Publishes written reservations under keys (low-level).
    pub async fn commit(
        &self,
        namespace: &str,
        items: Vec<(Reservation, Bytes, Option<u64>, Option<Layout>)>,
        durability: Durability,
    ) -> Result<Vec<Result<Tier>>> {
        let n = items.len();
        let items = items
            .into_iter()
            .map(|(r, key, checksum, layout)| LocalCommitItem {
                reservation: r.id,
                key,
                checksum: checksum.unwrap_or(0),
                layout,
                has_checksum: checksum.is_some(),
            })
            .collect();
        let op = local_request::Op::Commit(LocalCommit {
            namespace: namespace.to_string(),
            durability: durability as i32,
            items,
        });
        match self.call(op).await? {
            local_response::Result::Committed(c) if c.results.len() == n => Ok(c
                .results
                .into_iter()
                .map(|r| match r.error {
                    Some(e) => Err(status_err(&e)),
                    None => Ok(Tier::try_from(r.tier).unwrap_or(Tier::Unspecified)),
                })
                .collect()),
            _ => Err(ClientError::Protocol("unexpected answer to commit".into())),
        }
    }

    /// Gives reservations back without committing them.
    pub async fn abort(&self, reservations: Vec<Reservation>) -> Result<()> {
        let ids = reservations.iter().map(|r| r.id).collect();
        match self
            .call(local_request::Op::Abort(LocalAbort { reservations: ids }))
            .await?
        {
            local_response::Result::Aborted(_) => Ok(()),
            _ => Err(ClientError::Protocol("unexpected answer to abort".into())),
        }
    }

    /// Stores objects: one reserve, one copy per value straight into the
    /// node's arena, one commit. Returns the tier of each acknowledged copy;
    /// fails on the first object the node refused (the others are stored).
    pub async fn put_many(
        &self,
        namespace: &str,
        objects: &[LocalPut<'_>],
        durability: Durability,
    ) -> Result<Vec<Tier>> {
        validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)?;
        for (i, o) in objects.iter().enumerate() {
            validate::key(i, o.key).map_err(ClientError::InvalidArgument)?;
        }
        let lengths: Vec<u64> = objects.iter().map(|o| o.value.len() as u64).collect();
        let slots = self.reserve(&lengths).await?;
        let mut items: Vec<(Reservation, Bytes, Option<u64>, Option<Layout>)> = Vec::with_capacity(objects.len());
        let mut slots = slots.into_iter();
        for o in objects {
            let r = slots.next().expect("one slot per object");
            let sum = match self.write(&r, o.value) {
                Ok(s) => s,
                Err(e) => {
                    let mut rest: Vec<Reservation> = items.into_iter().map(|(r, ..)| r).collect();
                    rest.push(r);
                    rest.extend(slots);
                    let _ = self.abort(rest).await;
                    return Err(e);
                }
            };
            items.push((r, Bytes::copy_from_slice(o.key), sum, o.layout.cloned()));
        }
        let results = self.commit(namespace, items, durability).await?;
        results.into_iter().collect()
    }

    async fn acquire(&self, namespace: &str, keys: &[&[u8]]) -> Result<Vec<v1::LocalLease>> {
        validate::name("namespace", namespace).map_err(ClientError::InvalidArgument)?;
        let keys: Vec<Bytes> = keys.iter().map(|k| Bytes::copy_from_slice(k)).collect();
        validate::keys(&keys, crate::client::MAX_BATCH_KEYS).map_err(ClientError::InvalidArgument)?;
        let n = keys.len();
        let op = local_request::Op::Acquire(LocalAcquire {
            namespace: namespace.to_string(),
            keys,
        });
        match self.call(op).await? {
            local_response::Result::Acquired(a) if a.leases.len() == n => {
                for l in a.leases.iter().filter(|l| l.found) {
                    self.inner
                        .map
                        .check_range(l.offset, l.length)
                        .map_err(ClientError::Protocol)?;
                }
                Ok(a.leases)
            }
            _ => Err(ClientError::Protocol("unexpected answer to acquire".into())),
        }
    }

    /// Sends a release without waiting for its answer.
    async fn release_no_wait(&self, leases: &[v1::LocalLease]) -> Result<()> {
        let ids: Vec<u64> = leases.iter().filter(|l| l.found).map(|l| l.lease).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.inner.conn.lock().await;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let req = LocalRequest {
            id,
            op: Some(local_request::Op::Release(LocalRelease { leases: ids })),
        };
        wire::write_msg(&mut conn.stream, &req)
            .await
            .map_err(|e| io_err(&self.inner.path, "sending a release", e))
    }

    async fn release(&self, leases: &[v1::LocalLease]) -> Result<()> {
        let ids: Vec<u64> = leases.iter().filter(|l| l.found).map(|l| l.lease).collect();
        if ids.is_empty() {
            return Ok(());
        }
        match self
            .call(local_request::Op::Release(LocalRelease { leases: ids }))
            .await?
        {
            local_response::Result::Released(r) => {
                if r.held.iter().all(|h| *h) {
                    Ok(())
                } else {
                    Err(ClientError::Status {
                        kind: crate::ErrorKind::Aborted,
                        code: tonic::Code::Aborted,
                        message: "a lease expired before the copy finished; the bytes read may be stale, retry".into(),
                    })
                }
            }
            _ => Err(ClientError::Protocol("unexpected answer to release".into())),
        }
    }

    /// Pins, copies and releases in rounds: a batch larger than the arena
    /// has room to pin at once comes back in several (the node marks what
    /// did not fit as `retry`). The sink copies object `i` out of its lease
    /// and finishes its copies in `flush`, before the leases are released.
    async fn read_rounds<S: RoundSink>(&self, namespace: &str, keys: &[&[u8]], sink: &mut S) -> Result<Vec<bool>> {
        let mut found = vec![false; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let ttl = std::time::Duration::from_millis(self.inner.welcome.lease_ttl_ms);
        while !pending.is_empty() {
            let ask: Vec<&[u8]> = pending.iter().map(|&i| keys[i]).collect();
            // The node grants each lease after this instant, for `ttl`.
            let asked = std::time::Instant::now();
            let leases = self.acquire(namespace, &ask).await?;
            let mut next = Vec::new();
            let mut first_err = None;
            for (&i, l) in pending.iter().zip(&leases) {
                if l.retry {
                    next.push(i);
                } else if l.found {
                    found[i] = true;
                    if let Err(e) = sink.copy(i, l) {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Err(e) = sink.flush().await {
                first_err.get_or_insert(e);
            }
            // Copies that finished within the TTL of the request's own send
            // time ran under live leases (the node's deadline is later), so
            // the release need not be waited for: its answer is skipped by
            // the next call. Otherwise ask the node whether they held.
            if asked.elapsed() < ttl {
                self.release_no_wait(&leases).await?;
            } else {
                self.release(&leases).await?;
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if next.len() == pending.len() {
                return Err(ClientError::Status {
                    kind: crate::ErrorKind::Capacity,
                    code: tonic::Code::ResourceExhausted,
                    message: "the node's arena has no room to pin even one of these objects".into(),
                });
            }
            pending = next;
        }
        Ok(found)
    }

    /// Reads objects straight from the node's arena into `buffers` (one per
    /// key). Returns, per key, the object's length, or `None` when it is not
    /// stored. A buffer shorter than its object is an error (nothing is
    /// half-copied into it).
    pub async fn get_many_into(
        &self,
        namespace: &str,
        keys: &[&[u8]],
        buffers: &mut [&mut [u8]],
    ) -> Result<Vec<Option<usize>>> {
        if keys.len() != buffers.len() {
            return Err(ClientError::InvalidArgument(format!(
                "{} keys but {} buffers",
                keys.len(),
                buffers.len()
            )));
        }
        struct IntoBuffers<'a, 'b> {
            map: &'a Mapping,
            buffers: &'a mut [&'b mut [u8]],
            lens: Vec<usize>,
        }
        impl RoundSink for IntoBuffers<'_, '_> {
            fn copy(&mut self, i: usize, l: &v1::LocalLease) -> Result<()> {
                let len = l.length as usize;
                if self.buffers[i].len() < len {
                    return Err(ClientError::InvalidArgument(format!(
                        "buffer {i} holds {} bytes; the object has {len}",
                        self.buffers[i].len()
                    )));
                }
                // SAFETY: the range was checked against the mapping; the
                // lease keeps the slot's bytes unchanged until released.
                unsafe { self.map.copy_out(l.offset, &mut self.buffers[i][..len]) };
                self.lens[i] = len;
                Ok(())
            }
        }
        let mut sink = IntoBuffers {
            map: &self.inner.map,
            lens: vec![0; keys.len()],
            buffers,
        };
        let found = self.read_rounds(namespace, keys, &mut sink).await?;
        Ok(found.iter().zip(sink.lens).map(|(f, n)| f.then_some(n)).collect())
    }

    /// Reads objects into new buffers (one copy out of the arena each),
    /// each with the layout header it was stored with (engines check it
    /// before loading a KV block).
    pub async fn get_many_with_layout(
        &self,
        namespace: &str,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<(Vec<u8>, Layout)>>> {
        struct WithLayout<'a> {
            map: &'a Mapping,
            out: Vec<Option<(Vec<u8>, Layout)>>,
        }
        impl RoundSink for WithLayout<'_> {
            fn copy(&mut self, i: usize, l: &v1::LocalLease) -> Result<()> {
                let mut v = vec![0u8; l.length as usize];
                // SAFETY: as in `get_many_into`.
                unsafe { self.map.copy_out(l.offset, &mut v) };
                self.out[i] = Some((v, l.layout.clone().unwrap_or_default()));
                Ok(())
            }
        }
        let mut sink = WithLayout {
            map: &self.inner.map,
            out: vec![None; keys.len()],
        };
        self.read_rounds(namespace, keys, &mut sink).await?;
        Ok(sink.out)
    }

    /// Reads objects into new buffers (one copy out of the arena each).
    pub async fn get_many(&self, namespace: &str, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        struct ToVecs<'a> {
            map: &'a Mapping,
            out: Vec<Option<Vec<u8>>>,
        }
        impl RoundSink for ToVecs<'_> {
            fn copy(&mut self, i: usize, l: &v1::LocalLease) -> Result<()> {
                let mut v = vec![0u8; l.length as usize];
                // SAFETY: as in `get_many_into`.
                unsafe { self.map.copy_out(l.offset, &mut v) };
                self.out[i] = Some(v);
                Ok(())
            }
        }
        let mut sink = ToVecs {
            map: &self.inner.map,
            out: vec![None; keys.len()],
        };
        self.read_rounds(namespace, keys, &mut sink).await?;
        let out = sink.out;
        Ok(out)
    }
}
