//! Object tier tests: conformance on local, bounded and in-memory stores,
//! corruption detection, recovery of damaged objects, multipart aborts, config.

use super::*;
use crate::conformance;

fn file_cfg(dir: &std::path::Path) -> ObjectTierConfig {
    ObjectTierConfig::new(format!("file://{}", dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_file_unbounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_cfg(&dir.path().join("store"));
    conformance::run_all(
        || async { Arc::new(ObjectTier::open(cfg.clone()).await.unwrap()) },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_file_bounded_multipart() {
    // Small capacity exercises Full/TooLarge; a tiny threshold and part
    // size push most objects through the multipart path.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = file_cfg(dir.path());
    cfg.capacity = 4 * MIB;
    cfg.multipart_threshold = 64 * KIB;
    cfg.part_size = 20 * KIB;
    conformance::run_all(
        || async { Arc::new(ObjectTier::open(cfg.clone()).await.unwrap()) },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_in_memory_store_with_prefix() {
    let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let mut cfg = ObjectTierConfig::new("s3://unused");
    cfg.capacity = 2 * MIB;
    conformance::run_all(
        || async {
            Arc::new(
                ObjectTier::with_store(store.clone(), "some/prefix", cfg.clone())
                    .await
                    .unwrap(),
            )
        },
        true,
    )
    .await;
    // Everything it wrote was under the prefix.
    let outside: Vec<_> = store.list(None).try_collect().await.unwrap();
    assert!(
        outside.iter().all(|m| m.location.as_ref().starts_with("some/prefix/")),
        "{outside:?}"
    );
}

fn object_file(dir: &std::path::Path, key: &ObjectKey) -> std::path::PathBuf {
    dir.join(key.namespace()).join(hex::encode(key.key()))
}

#[tokio::test]
async fn flipped_byte_reads_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let t = ObjectTier::open(file_cfg(dir.path())).await.unwrap();
    let key = ObjectKey::new("ns", vec![1u8, 2, 3]);
    let block = conformance::block(7, 10_000);
    t.put(&key, &block, true).await.unwrap();
    let file = object_file(dir.path(), &key);
    let pristine = std::fs::read(&file).unwrap();
    let hlen = pristine.len() - 10_000;
    // A payload byte, then a header byte.
    for pos in [hlen + 5_000, 20] {
        let mut bad = pristine.clone();
        bad[pos] ^= 0x01;
        std::fs::write(&file, &bad).unwrap();
        match t.get(&key).await {
            Err(TierError::Corrupt {
                tier: TierKind::Object, ..
            }) => {}
            other => panic!("flip at {pos}: expected Corrupt, got {other:?}"),
        }
    }
    std::fs::write(&file, &pristine).unwrap();
    assert_eq!(t.get(&key).await.unwrap().unwrap().payload, block.payload);
}

#[tokio::test]
async fn object_under_another_keys_name_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let t = ObjectTier::open(file_cfg(dir.path())).await.unwrap();
    let (a, b) = (ObjectKey::new("ns", vec![0xa]), ObjectKey::new("ns", vec![0xb]));
    t.put(&a, &conformance::block(1, 100), false).await.unwrap();
    t.put(&b, &conformance::block(2, 100), false).await.unwrap();
    std::fs::copy(object_file(dir.path(), &a), object_file(dir.path(), &b)).unwrap();
    assert!(matches!(t.get(&b).await, Err(TierError::Corrupt { .. })));
    // Reopening skips the misnamed object instead of indexing it.
    drop(t);
    let t = ObjectTier::open(file_cfg(dir.path())).await.unwrap();
    assert!(t.contains(&a) && !t.contains(&b));
}

#[tokio::test]
async fn recovery_skips_foreign_and_truncated_objects() {
    let dir = tempfile::tempdir().unwrap();
    let key = ObjectKey::new("ns", vec![9u8]);
    let trunc = ObjectKey::new("ns", vec![10u8]);
    {
        let t = ObjectTier::open(file_cfg(dir.path())).await.unwrap();
        t.put(&key, &conformance::block(9, 3000), true).await.unwrap();
        t.put(&trunc, &conformance::block(10, 3000), true).await.unwrap();
    }
    std::fs::write(dir.path().join("ns").join("garbage"), b"not a block").unwrap();
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    std::fs::write(dir.path().join("other").join("00"), vec![0u8; 100]).unwrap();
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    let f = object_file(dir.path(), &trunc);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 1)
        .unwrap();

    let t = ObjectTier::open(file_cfg(dir.path())).await.unwrap();
    let rec = t.recover().await.unwrap();
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0].0, key);
    assert_eq!(rec[0].1, conformance::block(9, 3000).header);
    assert_eq!(t.used(), 3000);
    assert!(t.contains(&key) && !t.contains(&trunc));
}

#[tokio::test]
async fn failed_multipart_upload_is_aborted_and_leaves_old_object() {
    // A store whose multipart parts always fail.
    let inner = Arc::new(object_store::memory::InMemory::new());
    let store: Arc<dyn ObjectStore> = Arc::new(FailingParts(inner.clone()));
    let mut cfg = ObjectTierConfig::new("s3://unused");
    cfg.multipart_threshold = 5 * MIB;
    cfg.part_size = 5 * MIB;
    let t = ObjectTier::with_store(store, "", cfg).await.unwrap();
    let key = ObjectKey::new("ns", vec![1u8]);
    let small = conformance::block(1, 1000);
    t.put(&key, &small, false).await.unwrap();
    let err = t
        .put(&key, &conformance::block(2, 12 * MIB as usize), false)
        .await
        .unwrap_err();
    assert!(matches!(err, TierError::ObjectStore(_)), "{err:?}");
    assert_eq!(t.get(&key).await.unwrap().unwrap().payload, small.payload);
    assert_eq!(t.used(), 1000);
    assert_eq!(t.len(), 1);
}

/// A put dropped mid-upload (its client went away) gives back the room it
/// reserved: a bounded tier is not left smaller for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_dropped_mid_upload_gives_its_room_back() {
    use futures::FutureExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = file_cfg(dir.path());
    cfg.capacity = 2000;
    let t = ObjectTier::open(cfg).await.unwrap();
    let block = conformance::block(1, 1000);
    // One poll: the file store's write runs on the blocking pool, so the
    // put is (almost always) still uploading when it is dropped.
    let doomed = ObjectKey::new("ns", vec![1u8]);
    let mut dropped = false;
    for _ in 0..100 {
        match t.put(&doomed, &block, false).now_or_never() {
            None => {
                dropped = true;
                break;
            }
            Some(r) => {
                r.unwrap();
                t.delete(&doomed).await.unwrap();
            }
        }
    }
    assert!(dropped, "every put finished in one poll; nothing was dropped");
    for i in [2u8, 3] {
        t.put(&ObjectKey::new("ns", vec![i]), &block, false).await.unwrap();
    }
    assert_eq!(t.used(), 2000);
}

/// A get that finds an indexed object gone from the store (removed behind
/// the tier's back) drops it from the index and gives its bytes back.
#[tokio::test]
async fn a_get_that_finds_the_object_gone_drops_it_from_the_index() {
    let store = Arc::new(FaultyStore::default());
    let mut cfg = ObjectTierConfig::new("s3://unused");
    cfg.capacity = 1500;
    let t = ObjectTier::with_store(store.clone(), "p", cfg).await.unwrap();
    let (gone, kept) = (ObjectKey::new("ns", vec![1u8]), ObjectKey::new("ns", vec![2u8]));
    t.put(&gone, &conformance::block(1, 1000), false).await.unwrap();
    t.put(&kept, &conformance::block(2, 500), false).await.unwrap();
    store
        .inner
        .delete(&Path::from(format!("p/{}", gone.path())))
        .await
        .unwrap();

    assert!(t.get(&gone).await.unwrap().is_none());
    assert!(!t.contains(&gone));
    assert_eq!((t.len(), t.used()), (1, 500));
    assert_eq!(t.recover().await.unwrap().len(), 1);
    // Its room is usable again.
    let again = conformance::block(3, 1000);
    t.put(&gone, &again, false).await.unwrap();
    assert_eq!(t.get(&gone).await.unwrap().unwrap().payload, again.payload);
    assert!(t.get(&kept).await.unwrap().is_some());
}

/// A get that found the object gone keeps the entry a put stored while the
/// get was reading, even a put of the identical block.
#[tokio::test]
async fn a_get_that_finds_the_object_gone_keeps_a_version_put_meanwhile() {
    let store = Arc::new(FaultyStore::default());
    let t = ObjectTier::with_store(store.clone(), "", ObjectTierConfig::new("s3://unused"))
        .await
        .unwrap();
    let key = ObjectKey::new("ns", vec![1u8]);
    let block = conformance::block(1, 1000);
    t.put(&key, &block, false).await.unwrap();

    store.faults.state.lock().hold_next_read = true;
    let get = t.get(&key);
    tokio::pin!(get);
    tokio::select! {
        r = &mut get => panic!("get finished while its read was held: {r:?}"),
        () = store.faults.read_held.notified() => {}
    }
    t.put(&key, &block, false).await.unwrap();
    store.faults.release_read.notify_one();
    assert!(get.await.unwrap().is_none(), "the held read answers NotFound");

    assert!(t.contains(&key));
    assert_eq!((t.len(), t.used()), (1, 1000));
    assert_eq!(t.get(&key).await.unwrap().unwrap().payload, block.payload);
}

/// Recovery retries list and header reads that fail transiently instead of
/// failing the open.
#[tokio::test]
async fn recovery_retries_transient_list_and_read_errors() {
    let store = Arc::new(FaultyStore::default());
    let cfg = ObjectTierConfig::new("s3://unused");
    let (a, b) = (ObjectKey::new("ns", vec![1u8]), ObjectKey::new("ns", vec![2u8]));
    {
        let t = ObjectTier::with_store(store.clone(), "p", cfg.clone()).await.unwrap();
        t.put(&a, &conformance::block(1, 1000), false).await.unwrap();
        t.put(&b, &conformance::block(2, 500), false).await.unwrap();
    }
    let path_a = Path::from(format!("p/{}", a.path()));
    {
        let mut st = store.faults.state.lock();
        st.list_errors = 2;
        st.read_errors.insert(path_a.clone(), 2);
        st.lists = 0;
        st.reads.clear();
    }
    let t = ObjectTier::with_store(store.clone(), "p", cfg).await.unwrap();
    assert!(t.contains(&a) && t.contains(&b));
    assert_eq!(t.used(), 1500);
    let st = store.faults.state.lock();
    assert_eq!(st.lists, 3);
    assert_eq!(st.reads[&path_a], 3);
}

/// An object whose header stays unreadable fails the open after
/// [`SCAN_ATTEMPTS`] tries, naming the object and the tries; an error that
/// cannot be transient is not retried.
#[tokio::test]
async fn recovery_fails_on_a_persistent_error_naming_the_object() {
    let store = Arc::new(FaultyStore::default());
    let cfg = ObjectTierConfig::new("s3://unused");
    let key = ObjectKey::new("ns", vec![1u8]);
    ObjectTier::with_store(store.clone(), "p", cfg.clone())
        .await
        .unwrap()
        .put(&key, &conformance::block(1, 1000), false)
        .await
        .unwrap();
    let path = Path::from(format!("p/{}", key.path()));
    for (permanent, attempts) in [(false, SCAN_ATTEMPTS), (true, 1)] {
        {
            let mut st = store.faults.state.lock();
            st.permanent = permanent;
            st.read_errors.insert(path.clone(), u32::MAX);
            st.reads.clear();
        }
        let err = ObjectTier::with_store(store.clone(), "p", cfg.clone())
            .await
            .expect_err("opened over an unreadable object");
        let msg = err.to_string();
        assert!(msg.contains(path.as_ref()), "{msg}");
        let plural = if attempts == 1 { "" } else { "s" };
        assert!(msg.contains(&format!("after {attempts} attempt{plural}")), "{msg}");
        assert_eq!(
            store.faults.state.lock().reads[&path],
            attempts,
            "permanent: {permanent}"
        );
    }
}

/// A put dropped in the middle of a multipart upload (its client went
/// away) aborts the upload instead of leaving it in the store.
#[tokio::test]
async fn a_put_dropped_mid_multipart_upload_aborts_it() {
    let store = Arc::new(FaultyStore::default());
    store.faults.state.lock().hang_parts = true;
    let mut cfg = ObjectTierConfig::new("s3://unused");
    cfg.multipart_threshold = 5 * MIB;
    cfg.part_size = 5 * MIB;
    let t = ObjectTier::with_store(store.clone(), "", cfg).await.unwrap();
    let key = ObjectKey::new("ns", vec![1u8]);
    let block = conformance::block(1, 6 * MIB as usize);
    {
        let put = t.put(&key, &block, false);
        tokio::pin!(put);
        tokio::select! {
            r = &mut put => panic!("put finished with its parts hanging: {r:?}"),
            () = store.faults.part_started.notified() => {}
        }
    }
    // The abort runs on a spawned task: let it.
    for _ in 0..100 {
        if store.faults.aborts.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(store.faults.aborts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(!t.contains(&key));
    assert_eq!(t.used(), 0);
}

/// Test double: an in-memory store that injects the faults [`Faults`] asks
/// for and counts the calls it gets.
#[derive(Debug, Default)]
struct FaultyStore {
    inner: object_store::memory::InMemory,
    faults: Arc<Faults>,
}

#[derive(Debug, Default)]
struct Faults {
    state: Mutex<FaultState>,
    /// Signalled when a read is held by [`FaultState::hold_next_read`].
    read_held: tokio::sync::Notify,
    /// Lets the held read go on (to answer NotFound).
    release_read: tokio::sync::Notify,
    /// Signalled when a part of a hanging multipart upload starts.
    part_started: tokio::sync::Notify,
    /// Multipart uploads aborted.
    aborts: std::sync::atomic::AtomicU32,
}

#[derive(Debug, Default)]
struct FaultState {
    /// Errors still to inject into reads of each path.
    read_errors: HashMap<Path, u32>,
    /// Errors still to inject into listings.
    list_errors: u32,
    /// Inject PermissionDenied (never transient) instead of a generic error.
    permanent: bool,
    /// The next read waits for [`Faults::release_read`], then answers NotFound.
    hold_next_read: bool,
    /// Multipart uploads whose parts never finish.
    hang_parts: bool,
    /// Reads made, per path.
    reads: HashMap<Path, u32>,
    /// Listings made.
    lists: u32,
}

impl FaultState {
    fn injected(&self, path: &str) -> object_store::Error {
        if self.permanent {
            object_store::Error::PermissionDenied {
                path: path.into(),
                source: "injected permanent fault".into(),
            }
        } else {
            object_store::Error::Generic {
                store: "FaultyStore",
                source: "injected transient fault".into(),
            }
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

/// A multipart upload whose parts never finish; counts its aborts.
#[derive(Debug)]
struct HangingUpload(Arc<Faults>);

#[async_trait]
impl object_store::MultipartUpload for HangingUpload {
    fn put_part(&mut self, _data: PutPayload) -> object_store::UploadPart {
        self.0.part_started.notify_one();
        Box::pin(futures::future::pending())
    }
    async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
        panic!("complete with parts that never finish");
    }
    async fn abort(&mut self) -> object_store::Result<()> {
        self.0.aborts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        if self.faults.state.lock().hang_parts {
            return Ok(Box::new(HangingUpload(self.faults.clone())));
        }
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        let (hold, fault) = {
            let mut st = self.faults.state.lock();
            *st.reads.entry(location.clone()).or_default() += 1;
            let hold = std::mem::take(&mut st.hold_next_read);
            let fault = match st.read_errors.get_mut(location) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Some(st.injected(location.as_ref()))
                }
                _ => None,
            };
            (hold, fault)
        };
        if hold {
            self.faults.read_held.notify_one();
            self.faults.release_read.notified().await;
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: "injected: gone".into(),
            });
        }
        match fault {
            Some(e) => Err(e),
            None => self.inner.get_opts(location, options).await,
        }
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        let mut st = self.faults.state.lock();
        st.lists += 1;
        if st.list_errors > 0 {
            st.list_errors -= 1;
            let e = st.injected(prefix.map_or("", |p| p.as_ref()));
            // Some objects, then the error: a listing that breaks part-way.
            return self
                .inner
                .list(prefix)
                .take(1)
                .chain(futures::stream::iter([Err(e)]))
                .boxed();
        }
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[derive(Debug)]
struct FailingParts(Arc<object_store::memory::InMemory>);

impl fmt::Display for FailingParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FailingParts({})", self.0)
    }
}

#[derive(Debug)]
struct FailingUpload;

#[async_trait]
impl object_store::MultipartUpload for FailingUpload {
    fn put_part(&mut self, _data: PutPayload) -> object_store::UploadPart {
        Box::pin(async {
            Err(object_store::Error::Generic {
                store: "FailingParts",
                source: "injected part failure".into(),
            })
        })
    }
    async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
        panic!("complete after a failed part");
    }
    async fn abort(&mut self) -> object_store::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FailingParts {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        Ok(Box::new(FailingUpload))
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: object_store::CopyOptions) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

#[test]
fn config_validation() {
    assert!(ObjectTierConfig::new("file:///tmp/x").validate().is_ok());
    assert!(ObjectTierConfig::new("s3://bucket/p/q").validate().is_ok());
    for bad in ["http://x/y", "s3:///nobucket", "file://host/x", "not a url", "gs://b"] {
        let r = ObjectTierConfig::new(bad).validate();
        assert!(matches!(r, Err(TierError::Config(_))), "{bad}: {r:?}");
    }
    let mut c = ObjectTierConfig::new("s3://b");
    c.part_size = 4 * MIB;
    assert!(matches!(c.validate(), Err(TierError::Config(m)) if m.contains("part-size")));
    let mut c = ObjectTierConfig::new("file:///tmp/x");
    c.part_size = 4 * MIB; // fine for a directory
    assert!(c.validate().is_ok());
    c.capacity = 0;
    assert!(c.validate().is_err());
    let mut c = ObjectTierConfig::new("s3://b");
    c.endpoint = Some("ftp://x".into());
    assert!(c.validate().is_err());
    c.endpoint = Some("http://127.0.0.1:9000".into());
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("allow-http"), "{e}");
    c.allow_http = true;
    c.access_key_id = Some("id".into());
    assert!(c.validate().is_err(), "key id without secret");
    c.secret_access_key = Some("hunter2".into());
    assert!(c.validate().is_ok());
    assert!(!format!("{c:?}").contains("hunter2"), "secret leaked into Debug");
}

#[test]
fn config_deserializes_human_sizes() {
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, MapDeserializer};
    let fields = [("url", "s3://b/p"), ("part-size", "6MiB"), ("capacity", "1000")];
    let c = ObjectTierConfig::deserialize(MapDeserializer::<_, DeError>::new(fields.into_iter())).unwrap();
    assert_eq!(c.part_size, 6 * MIB);
    assert_eq!(c.capacity, 1000);
    assert_eq!(c.multipart_threshold, ObjectTierConfig::DEFAULT_MULTIPART_THRESHOLD);
    let unknown = [("url", "s3://b/p"), ("part_size", "6MiB")];
    assert!(ObjectTierConfig::deserialize(MapDeserializer::<_, DeError>::new(unknown.into_iter())).is_err());
    let n: Result<u64, DeError> = size::deserialize(7u64.into_deserializer());
    assert_eq!(n.unwrap(), 7);
    assert_eq!(size::parse("unbounded"), Some(u64::MAX));
    assert_eq!(size::parse("16 MB"), Some(16_000_000));
    assert_eq!(size::parse("2GiB"), Some(2 * GIB));
    assert_eq!(size::parse("12x"), None);
    assert_eq!(size::parse("MiB"), None);
}

#[test]
fn slices_span_header_and_payload() {
    let (a, b) = (Bytes::from_static(b"head"), Bytes::from_static(b"payload!"));
    let all: Vec<u8> = [&a[..], &b[..]].concat();
    for start in 0..all.len() {
        for end in start + 1..=all.len() {
            let got: Vec<u8> = slice_concat(&a, &b, start as u64, end as u64)
                .iter()
                .flatten()
                .copied()
                .collect();
            assert_eq!(got, &all[start..end]);
        }
    }
}
