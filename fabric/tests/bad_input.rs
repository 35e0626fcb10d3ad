//! Bad input for every RPC: each gets a precise status whose message names
//! the problem, and the data already stored is untouched afterwards.

mod common;

use bytes::Bytes;
use common::{payload, settings, start};
use kvfabric::client::{Client, Durability};
use kvfabric::proto::v1::{
    self, DeleteRequest, ExistsPrefixRequest, GetRequest, LeaseRequest, ObjectBegin, PutOpen, PutRequest,
    SubscribeRequest, put_request::Msg,
};
use tonic::Code;

fn open(ns: &str, expected: u32) -> PutRequest {
    PutRequest {
        msg: Some(Msg::Open(PutOpen {
            tenant: String::new(),
            namespace: ns.into(),
            durability: 0,
            expected_objects: expected,
            forwarded: false,
        })),
    }
}
fn begin(key: &[u8], len: u64) -> PutRequest {
    PutRequest {
        msg: Some(Msg::Begin(ObjectBegin {
            key: Bytes::copy_from_slice(key),
            length: len,
            layout: None,
            checksum: None,
            age_ms: None,
        })),
    }
}
fn data(b: &[u8]) -> PutRequest {
    PutRequest {
        msg: Some(Msg::Data(Bytes::copy_from_slice(b))),
    }
}

async fn raw_put(c: &Client, msgs: Vec<PutRequest>) -> Result<v1::PutResponse, tonic::Status> {
    c.raw().put(futures::stream::iter(msgs)).await.map(|r| r.into_inner())
}

fn expect(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let s = r.expect_err("expected an error");
    assert_eq!(s.code(), code, "wrong code for {needle:?}: {s:?}");
    assert!(
        s.message().contains(needle),
        "message {:?} lacks {needle:?}",
        s.message()
    );
}

/// Stores a reference object and returns a checker that it is intact.
async fn reference(c: &Client) -> impl AsyncFnOnce() {
    c.put("ns", &b"keep"[..], payload(7, 300_000), Durability::Memory)
        .await
        .unwrap();
    let c = c.clone();
    async move || {
        let o = c
            .get("ns", &b"keep"[..])
            .await
            .unwrap()
            .expect("reference object survives");
        assert_eq!(o.value, payload(7, 300_000));
        let s = c.stats().await.unwrap();
        assert_eq!(s.objects, 1, "no partial object was stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_stream_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 4 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(1 << 20);
    s.limits.max_batch_keys = 8;
    let (node, c) = start(s).await;
    let intact = reference(&c).await;

    expect(
        raw_put(&c, vec![]).await,
        Code::InvalidArgument,
        "first message must be `open`",
    );
    expect(
        raw_put(&c, vec![begin(b"k", 1)]).await,
        Code::InvalidArgument,
        "first message of a put stream must be `open`",
    );
    expect(
        raw_put(&c, vec![open("", 0)]).await,
        Code::InvalidArgument,
        "namespace is empty",
    );
    expect(
        raw_put(&c, vec![open("bad/ns", 0)]).await,
        Code::InvalidArgument,
        "contains '/'",
    );
    let mut bad_d = open("ns", 0);
    if let Some(Msg::Open(o)) = bad_d.msg.as_mut() {
        o.durability = 9;
    }
    expect(
        raw_put(&c, vec![bad_d]).await,
        Code::InvalidArgument,
        "unknown durability 9",
    );
    let mut bad_t = open("ns", 0);
    if let Some(Msg::Open(o)) = bad_t.msg.as_mut() {
        o.tenant = "ten ant".into();
    }
    expect(raw_put(&c, vec![bad_t]).await, Code::InvalidArgument, "tenant");
    expect(
        raw_put(&c, vec![open("ns", 0), begin(b"", 1)]).await,
        Code::InvalidArgument,
        "key 0 is empty",
    );
    expect(
        raw_put(&c, vec![open("ns", 0), begin(&[1; 65], 1)]).await,
        Code::InvalidArgument,
        "65 bytes",
    );
    expect(
        raw_put(&c, vec![open("ns", 0), data(b"x")]).await,
        Code::InvalidArgument,
        "without a preceding begin",
    );
    expect(
        raw_put(&c, vec![open("ns", 0), open("ns", 0)]).await,
        Code::InvalidArgument,
        "only be the first",
    );
    expect(
        raw_put(&c, vec![open("ns", 0), begin(b"big", (1 << 20) + 1)]).await,
        Code::ResourceExhausted,
        "maximum object size is 1048576",
    );
    // Truncated: stream ends mid-object.
    expect(
        raw_put(&c, vec![open("ns", 0), begin(b"keep", 10), data(b"12345")]).await,
        Code::InvalidArgument,
        "got 5 of 10 bytes and was not stored",
    );
    // Too many bytes for the declared length.
    expect(
        raw_put(&c, vec![open("ns", 0), begin(b"keep", 3), data(b"1234")]).await,
        Code::InvalidArgument,
        "more than its declared length 3",
    );
    // A new begin before the previous object is complete.
    expect(
        raw_put(&c, vec![open("ns", 0), begin(b"a", 10), data(b"1"), begin(b"b", 1)]).await,
        Code::InvalidArgument,
        "incomplete: 1 of 10 bytes",
    );
    // Fewer objects than announced; the complete one before is reported.
    expect(
        raw_put(&c, vec![open("ns", 2), begin(b"x1", 1), data(b"1")]).await,
        Code::InvalidArgument,
        "announced 2",
    );
    c.delete("ns", vec![Bytes::from_static(b"x1")]).await.unwrap();
    // Batch over the limit.
    let mut many = vec![open("ns", 0)];
    for i in 0..9u8 {
        many.push(begin(&[b'm', i], 1));
        many.push(data(b"z"));
    }
    expect(raw_put(&c, many).await, Code::InvalidArgument, "more than 8 objects");
    c.delete("ns", (0..8u8).map(|i| Bytes::from(vec![b'm', i])).collect())
        .await
        .unwrap();
    // Client checksum that does not match the bytes.
    let mut bad_sum = begin(b"sum", 3);
    if let Some(Msg::Begin(b)) = bad_sum.msg.as_mut() {
        b.checksum = Some(1);
    }
    expect(
        raw_put(&c, vec![open("ns", 0), bad_sum, data(b"abc")]).await,
        Code::DataLoss,
        "checksum",
    );
    // No disk tier: disk durability is a precondition failure.
    expect(
        c.put("ns", &b"d"[..], &b"v"[..], Durability::Disk)
            .await
            .map_err(|e| tonic::Status::new(Code::FailedPrecondition, e.to_string())),
        Code::FailedPrecondition,
        "needs a disk tier",
    );
    // Capacity exhausted in every tier: 4 MiB host tier, everything leased.
    let ttl = std::time::Duration::from_secs(60);
    let fills: Vec<Bytes> = (0..3u8).map(|i| Bytes::from(vec![b'f', i])).collect();
    for f in &fills {
        c.put("ns", f.clone(), payload(1, 1 << 20), Durability::Memory)
            .await
            .unwrap();
        c.lease("ns", vec![f.clone()], ttl).await.unwrap();
    }
    c.lease("ns", vec![Bytes::from_static(b"keep")], ttl).await.unwrap();
    let e = c
        .put("ns", &b"more"[..], payload(2, 1 << 20), Durability::Memory)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), kvfabric::ErrorKind::Capacity, "{e}");
    assert!(e.to_string().contains("capacity exhausted"), "{e}");
    assert!(c.get("ns", &b"more"[..]).await.unwrap().is_none());
    c.lease("ns", fills.clone(), std::time::Duration::ZERO).await.unwrap();
    c.delete("ns", fills).await.unwrap();
    intact().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_side_rpc_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 4 << 20, 0);
    s.limits.max_batch_keys = 8;
    let (node, c) = start(s).await;
    let intact = reference(&c).await;
    let mut raw = c.raw();
    let k = |v: &[u8]| Bytes::copy_from_slice(v);

    // Get
    let get = |ns: &str, keys: Vec<Bytes>, chunk: u32| GetRequest {
        tenant: String::new(),
        namespace: ns.into(),
        keys,
        chunk_size: chunk,
        forwarded: false,
    };
    expect(
        raw.get(get("nope", vec![k(b"a")], 0)).await,
        Code::NotFound,
        "namespace \"nope\" does not exist",
    );
    expect(raw.get(get("ns", vec![], 0)).await, Code::InvalidArgument, "no keys");
    expect(
        raw.get(get("ns", vec![k(b"")], 0)).await,
        Code::InvalidArgument,
        "key 0 is empty",
    );
    expect(
        raw.get(get("ns", vec![k(b"a"), k(&[0; 65])], 0)).await,
        Code::InvalidArgument,
        "key 1 is 65 bytes",
    );
    expect(
        raw.get(get("ns", vec![k(b"a"); 9], 0)).await,
        Code::InvalidArgument,
        "limit is 8",
    );
    expect(
        raw.get(get("ns", vec![k(b"a")], 5 << 20)).await,
        Code::InvalidArgument,
        "chunk_size",
    );
    let mut other = c.clone().with_tenant("intruder").raw();
    let mut g = get("ns", vec![k(b"keep")], 0);
    g.tenant = "intruder".into();
    expect(other.get(g).await, Code::PermissionDenied, "may not use namespace");

    // ExistsPrefix
    let ex = |ns: &str, keys: Vec<Bytes>| ExistsPrefixRequest {
        tenant: String::new(),
        namespace: ns.into(),
        keys,
        forwarded: false,
    };
    expect(
        raw.exists_prefix(ex("nope", vec![k(b"a")])).await,
        Code::NotFound,
        "does not exist",
    );
    expect(
        raw.exists_prefix(ex("ns", vec![])).await,
        Code::InvalidArgument,
        "no keys",
    );
    expect(
        raw.exists_prefix(ex("ns", vec![k(&[1; 65])])).await,
        Code::InvalidArgument,
        "65 bytes",
    );

    // Delete
    let del = |ns: &str, keys: Vec<Bytes>, all: bool| DeleteRequest {
        tenant: String::new(),
        namespace: ns.into(),
        keys,
        all,
        forwarded: false,
    };
    expect(
        raw.delete(del("nope", vec![k(b"a")], false)).await,
        Code::NotFound,
        "does not exist",
    );
    expect(
        raw.delete(del("ns", vec![], false)).await,
        Code::InvalidArgument,
        "no keys",
    );
    expect(
        raw.delete(del("ns", vec![k(b"keep")], true)).await,
        Code::InvalidArgument,
        "must not list keys",
    );
    expect(
        raw.delete(del("", vec![k(b"a")], false)).await,
        Code::InvalidArgument,
        "namespace is empty",
    );

    // Lease
    let lease = |ns: &str, keys: Vec<Bytes>, ttl: u32| LeaseRequest {
        tenant: String::new(),
        namespace: ns.into(),
        keys,
        ttl_seconds: ttl,
    };
    expect(
        raw.lease(lease("nope", vec![k(b"a")], 1)).await,
        Code::NotFound,
        "does not exist",
    );
    expect(
        raw.lease(lease("ns", vec![k(b"keep")], 86_401)).await,
        Code::InvalidArgument,
        "maximum lease",
    );
    expect(
        raw.lease(lease("ns", vec![k(b"")], 1)).await,
        Code::InvalidArgument,
        "key 0 is empty",
    );

    // Subscribe
    let sub = |ns: &str, tenant: &str| SubscribeRequest {
        tenant: tenant.into(),
        namespace: ns.into(),
        snapshot: false,
    };
    expect(raw.subscribe(sub("nope", "")).await, Code::NotFound, "does not exist");
    expect(
        raw.subscribe(sub("bad ns", "")).await,
        Code::InvalidArgument,
        "namespace",
    );
    expect(raw.subscribe(sub("", "x/y")).await, Code::InvalidArgument, "tenant");

    // Stats takes no arguments; it must work after all of the above.
    raw.stats(v1::StatsRequest {}).await.unwrap();
    intact().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnecting_mid_put_stream_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 16 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(4 << 20);
    // Exactly one object's worth of in-flight budget: a leak would make the
    // next big put wait forever.
    s.limits.max_inflight_put_bytes = kvfabric::server::ByteSize(4 << 20);
    let (node, c) = start(s).await;
    let intact = reference(&c).await;
    for _ in 0..3 {
        // Its own connection, so dropping it is a real disconnect.
        let doomed = Client::connect(node.endpoint()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<PutRequest>(4);
        let mut raw = doomed.raw();
        let call = tokio::spawn(async move { raw.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        tx.send(open("ns", 1)).await.unwrap();
        tx.send(begin(b"half", 4 << 20)).await.unwrap();
        tx.send(data(&payload(1, 1 << 20))).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        call.abort();
        drop((tx, doomed));
    }
    // The budget came back: a full-size put goes through at once.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.put("ns", &b"big"[..], payload(2, 4 << 20), Durability::Memory),
    )
    .await
    .expect("in-flight budget leaked by the disconnected streams")
    .unwrap();
    assert!(
        c.get("ns", &b"half"[..]).await.unwrap().is_none(),
        "a partial object was stored"
    );
    c.delete("ns", vec![Bytes::from_static(b"big")]).await.unwrap();
    intact().await;
    node.shutdown().await;
}

/// A client that stalls mid-put (connection open, nothing sent) gets
/// ABORTED after `limits.put-idle-timeout-ms`, and the in-flight budget it
/// held goes back: it cannot hold every other put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_put_stream_times_out_and_frees_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 16 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(4 << 20);
    s.limits.max_inflight_put_bytes = kvfabric::server::ByteSize(4 << 20);
    s.limits.put_idle_timeout_ms = 300;
    let (node, c) = start(s).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<PutRequest>(4);
    let mut raw = c.raw();
    let call = tokio::spawn(async move { raw.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    tx.send(open("ns", 1)).await.unwrap();
    tx.send(begin(b"stalled", 4 << 20)).await.unwrap();
    tx.send(data(&payload(1, 1 << 20))).await.unwrap();
    // The sender stays open and silent.
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .expect("a stalled put stream was kept open")
        .unwrap();
    let e = answer.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(e.message().contains("put-idle-timeout-ms"), "{e:?}");
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.put("ns", &b"big"[..], payload(2, 4 << 20), Durability::Memory),
    )
    .await
    .expect("the stalled stream's budget was not given back")
    .unwrap();
    assert!(c.get("ns", &b"stalled"[..]).await.unwrap().is_none());
    drop(tx);
    node.shutdown().await;
}

/// A gRPC codec sending pre-encoded request frames as they are (so a test
/// can send what the generated client never would: frames over the message
/// limit, bytes that are not a `PutRequest`), decoding the `PutResponse`.
#[derive(Clone, Copy, Default)]
struct RawFrames;

impl tonic::codec::Encoder for RawFrames {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawFrames {
    type Item = v1::PutResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<v1::PutResponse>, tonic::Status> {
        let b = bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src));
        <v1::PutResponse as prost::Message>::decode(b)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawFrames {
    type Encode = Bytes;
    type Decode = v1::PutResponse;
    type Encoder = RawFrames;
    type Decoder = RawFrames;
    fn encoder(&mut self) -> RawFrames {
        RawFrames
    }
    fn decoder(&mut self) -> RawFrames {
        RawFrames
    }
}

/// A Put whose frames are sent as given, with no client-side size limit.
async fn raw_frames(endpoint: String, frames: Vec<Bytes>) -> Result<v1::PutResponse, tonic::Status> {
    let ch = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/kvfabric.v1.KvBlockService/Put");
    g.client_streaming(tonic::Request::new(futures::stream::iter(frames)), path, RawFrames)
        .await
        .map(|r| r.into_inner())
}

/// Messages of a Put stream that cannot be read (over the 4 MiB message
/// limit, or not a `PutRequest`) are INVALID_ARGUMENT with tonic's reason,
/// wherever they are in the stream, not ABORTED (which clients retry
/// forever); nothing of the object is stored. (Only a first frame got an
/// argument error; later ones came back as "put stream broke", ABORTED.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_put_messages_are_argument_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 16 << 20, 0);
    s.limits.max_object_size = kvfabric::server::ByteSize(8 << 20);
    let (node, c) = start(s).await;
    let intact = reference(&c).await;
    let enc = |m: PutRequest| Bytes::from(prost::Message::encode_to_vec(&m));
    let big = 5 << 20;
    // The second data chunk of an object is over the message limit.
    expect(
        raw_frames(
            node.endpoint(),
            vec![
                enc(open("ns", 0)),
                enc(begin(b"big", (1 << 20) + big as u64)),
                enc(data(&payload(1, 1 << 20))),
                enc(data(&payload(2, big))),
            ],
        )
        .await,
        Code::InvalidArgument,
        "decoded message length too large",
    );
    // The same message first: the same answer.
    expect(
        raw_frames(node.endpoint(), vec![enc(data(&payload(2, big)))]).await,
        Code::InvalidArgument,
        "decoded message length too large",
    );
    // Not a PutRequest after `begin`: field 3 (data, bytes) as a varint.
    expect(
        raw_frames(
            node.endpoint(),
            vec![
                enc(open("ns", 0)),
                enc(begin(b"bad", 4)),
                Bytes::from_static(&[0x18, 0x01]),
            ],
        )
        .await,
        Code::InvalidArgument,
        "failed to decode Protobuf message",
    );
    // Well-formed frames through the same raw client are stored as usual.
    raw_frames(
        node.endpoint(),
        vec![enc(open("ns", 0)), enc(begin(b"ok", 2)), enc(data(b"ok"))],
    )
    .await
    .unwrap();
    assert_eq!(c.get("ns", &b"ok"[..]).await.unwrap().unwrap().value, "ok");
    c.delete("ns", vec![Bytes::from_static(b"ok")]).await.unwrap();
    for k in [&b"big"[..], &b"bad"[..]] {
        assert!(c.get("ns", k).await.unwrap().is_none());
    }
    intact().await;
    node.shutdown().await;
}

/// A tenant past `limits.max-namespaces-per-tenant` (or the node past
/// `limits.max-namespaces`) cannot create another namespace, by a put or
/// by CreateNamespace: RESOURCE_EXHAUSTED naming the setting; what exists
/// keeps working and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_creation_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 4 << 20, 0);
    s.limits.max_namespaces = 3;
    s.limits.max_namespaces_per_tenant = 2;
    let (node, c) = start(s).await;
    let check = reference(&c).await; // namespace "ns" of the default tenant
    c.create_namespace("second", 1).await.unwrap();
    for e in [
        c.put("third", &b"k"[..], payload(1, 10), Durability::Memory)
            .await
            .unwrap_err(),
        c.create_namespace("third", 1).await.unwrap_err(),
    ] {
        assert_eq!(e.kind(), kvfabric::ErrorKind::Capacity, "{e}");
        assert!(e.to_string().contains("limits.max-namespaces-per-tenant"), "{e}");
    }
    let other = c.clone().with_tenant("other");
    other
        .put("o1", &b"k"[..], payload(2, 10), Durability::Memory)
        .await
        .unwrap();
    let e = other
        .put("o2", &b"k"[..], payload(3, 10), Durability::Memory)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limits.max-namespaces)"), "{e}");
    // Existing namespaces still take writes.
    c.put("second", &b"k"[..], payload(4, 10), Durability::Memory)
        .await
        .unwrap();
    c.delete("second", vec![Bytes::from_static(b"k")]).await.unwrap();
    other.clear("o1").await.unwrap();
    check().await;
    node.shutdown().await;
}
