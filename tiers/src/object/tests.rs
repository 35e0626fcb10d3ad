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
