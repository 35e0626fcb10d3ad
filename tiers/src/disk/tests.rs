//! Tests of the disk tier: the shared conformance suite on both engines,
//! corruption behind the tier's back, reopening (including after `kill -9`),
//! index recovery that must drop bad entries, registered-buffer fallback and
//! configuration bounds.

use super::engine::RegisterMode;
use super::index::{Index, IndexRecord, db_key, encode_value};
use super::*;
use crate::Extent;
use crate::conformance::{self, block};
use std::os::unix::fs::FileExt;

fn cfg(dir: &Path, engine: IoEngineKind) -> DiskTierConfig {
    // 8 MiB in two 4 MiB files: small enough to fill, and objects spread
    // over more than one file.
    DiskTierConfig {
        file_size: 4 << 20,
        engine,
        ..DiskTierConfig::new(dir, 8 << 20)
    }
}

fn key(i: u64) -> ObjectKey {
    ObjectKey::new("disk-test", i.to_be_bytes().to_vec())
}

async fn conformance_on(engine: IoEngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), engine);
    {
        let t = DiskTier::open(cfg.clone()).unwrap();
        assert_eq!(t.engine(), engine);
    }
    conformance::run_all(|| async { Arc::new(DiskTier::open(cfg.clone()).unwrap()) }, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_uring() {
    conformance_on(IoEngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_psync() {
    conformance_on(IoEngineKind::Psync).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_buffered_io() {
    // Where O_DIRECT is refused the tier runs buffered; same contract.
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::Auto);
    conformance::run_all(
        || async {
            let t = DiskTier::open_with(cfg.clone(), RegisterMode::On, false).unwrap();
            assert!(!t.direct_io());
            Arc::new(t)
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_bytes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Auto)).unwrap();
    for i in 0..3 {
        t.put(&key(i), &block(i, 10_000), false).await.unwrap();
    }
    // Writes `what` into `k`'s extent at `at`, on disk, behind the tier.
    let scribble = |k: u64, what: &[u8], at: u64| {
        let (path, ext) = t.location(&key(k)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(what, ext.offset + at).unwrap();
        f.sync_data().unwrap();
    };
    let corrupt = |err: TierError| {
        assert!(
            matches!(
                err,
                TierError::Corrupt {
                    tier: TierKind::Disk,
                    ..
                }
            ),
            "{err:?}"
        );
    };
    scribble(1, b"scribble", 100);
    corrupt(t.get(&key(1)).await.unwrap_err());
    // Damage past the payload (in the extent's padding) is harmless.
    scribble(2, b"padding", 10_500);
    for i in [0, 2] {
        assert_eq!(t.get(&key(i)).await.unwrap().unwrap().payload, block(i, 10_000).payload);
    }
    // The tier reports; the stack deletes. Deleting frees the space.
    assert!(t.delete(&key(1)).await.unwrap());
    assert_eq!(t.used(), 2 * t.footprint(10_000));
    // A payload above OFFLOAD_BYTES is verified off the async worker, with
    // the same outcome.
    let big = 1 << 20;
    assert!(big >= crate::OFFLOAD_BYTES);
    t.put(&key(3), &block(3, big), false).await.unwrap();
    assert_eq!(t.get(&key(3)).await.unwrap().unwrap().payload, block(3, big).payload);
    scribble(3, b"scribble", 500_000);
    corrupt(t.get(&key(3)).await.unwrap_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn reopen_keeps_objects_across_engines() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [1usize, 4096, 200_000, 1_500_000];
    {
        let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Uring)).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            t.put(&key(i as u64), &block(i as u64, n), i % 2 == 0).await.unwrap();
        }
        // Overwrite: only the new version and its extent survive.
        t.put(&key(0), &block(50, 30_000), true).await.unwrap();
    }
    let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Psync)).unwrap();
    assert_eq!(t.len(), sizes.len());
    let expect_used: u64 = sizes[1..].iter().map(|&n| t.footprint(n as u64)).sum::<u64>() + t.footprint(30_000);
    assert_eq!(t.used(), expect_used);
    assert_eq!(
        t.get(&key(0)).await.unwrap().unwrap().payload,
        block(50, 30_000).payload
    );
    for (i, &n) in sizes.iter().enumerate().skip(1) {
        let b = t.get(&key(i as u64)).await.unwrap().unwrap();
        assert_eq!(b.payload, block(i as u64, n).payload);
        assert_eq!(b.header, block(i as u64, n).header);
    }
    let mut rec = t.recover().await.unwrap();
    rec.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(rec.len(), sizes.len());
    assert_eq!(rec[1], (key(1), block(1, 4096).header));
    // New objects never land on recovered extents.
    t.put(&key(9), &block(9, 2_000_000), false).await.unwrap();
    for (i, &n) in sizes.iter().enumerate().skip(1) {
        assert_eq!(
            t.get(&key(i as u64)).await.unwrap().unwrap().payload,
            block(i as u64, n).payload
        );
    }
}

/// Objects past the configured space (capacity or file size set smaller
/// than when they were written) make the tier refuse to open, with what to
/// do; nothing is deleted, and the earlier settings find everything again.
#[tokio::test(flavor = "multi_thread")]
async fn a_smaller_space_than_the_objects_need_refuses_to_open_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), IoEngineKind::Psync);
    {
        let t = DiskTier::open(c.clone()).unwrap();
        for i in 0..6 {
            t.put(&key(i), &block(i, 1 << 20), true).await.unwrap();
        }
        assert!(
            (0..6).any(|i| t.location(&key(i)).unwrap().0 == files::data_path(dir.path(), 1)),
            "some objects in file 1"
        );
    }
    for small in [
        DiskTierConfig {
            capacity: 4 << 20,
            ..c.clone()
        },
        DiskTierConfig {
            file_size: 2 << 20,
            ..c.clone()
        },
    ] {
        let err = DiskTier::open(small).unwrap_err();
        assert!(matches!(err, TierError::Config(_)), "{err}");
        assert!(err.to_string().contains("beyond the configured disk space"), "{err}");
    }
    let t = DiskTier::open(c).unwrap();
    assert_eq!(t.len(), 6);
    for i in 0..6 {
        assert_eq!(
            t.get(&key(i)).await.unwrap().unwrap().payload,
            block(i, 1 << 20).payload
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_drops_bad_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), IoEngineKind::Psync);
    let good = {
        let t = DiskTier::open(c.clone()).unwrap();
        t.put(&key(1), &block(1, 9000), true).await.unwrap();
        t.location(&key(1)).unwrap().1
    };
    {
        let idx = Index::open(&dir.path().join("index")).unwrap();
        let rec = |file, extent, seed| IndexRecord {
            file,
            extent,
            header: block(seed, 4096).header,
        };
        // Overlaps key 1's extent.
        let k = key(2);
        idx.put(
            &k,
            &rec(
                0,
                Extent {
                    offset: good.offset + 4096,
                    len: 4096,
                },
                2,
            ),
            true,
        )
        .unwrap();
        // Extent length does not match the payload length.
        let k = key(5);
        idx.put(&k, &rec(1, Extent { offset: 0, len: 8192 }, 5), true).unwrap();
        // Undecodable, and a value stored under another object's key.
        idx.put_raw(&db_key(&key(6)), b"garbage").unwrap();
        let v = encode_value(
            &key(8),
            &rec(
                1,
                Extent {
                    offset: 8192,
                    len: 4096,
                },
                8,
            ),
        )
        .unwrap();
        idx.put_raw(&db_key(&key(7)), &v).unwrap();
    }
    let t = DiskTier::open(c.clone()).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t.used(), t.footprint(9000));
    assert_eq!(t.get(&key(1)).await.unwrap().unwrap().payload, block(1, 9000).payload);
    drop(t);
    // Dropped entries are gone from the index, not just ignored.
    let idx = Index::open(&dir.path().join("index")).unwrap();
    assert_eq!(idx.load().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_buffer_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let t = DiskTier::open_with(cfg(dir.path(), IoEngineKind::Uring), RegisterMode::ForceFail, true).unwrap();
    assert_eq!(t.engine(), IoEngineKind::Uring);
    assert!(!t.registered_buffers());
    let t = Arc::new(t);
    let mut tasks = Vec::new();
    // Small writes go through the (unregistered) pool, large ones through
    // fresh buffers; more writers than pool slots.
    for i in 0..24u64 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let n = if i % 3 == 0 { 600_000 } else { 1000 + i as usize * 5000 };
            t.put(&key(i), &block(i, n), false).await.unwrap();
            assert_eq!(t.get(&key(i)).await.unwrap().unwrap().payload, block(i, n).payload);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(t.len(), 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_buffers_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Uring)).unwrap();
    // Registration may legitimately fail (RLIMIT_MEMLOCK shared with other
    // tests); either way writes must work. Log what happened.
    eprintln!(
        "registered buffers: {}, O_DIRECT: {}",
        t.registered_buffers(),
        t.direct_io()
    );
    for i in 0..(2 * buf::POOL_SLOTS as u64) {
        t.put(&key(i), &block(i, 100_000), i % 4 == 0).await.unwrap();
    }
    for i in 0..(2 * buf::POOL_SLOTS as u64) {
        assert_eq!(
            t.get(&key(i)).await.unwrap().unwrap().payload,
            block(i, 100_000).payload
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn put_rejects_header_length_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Psync)).unwrap();
    let mut b = block(1, 100);
    b.header.length = 99;
    assert!(matches!(
        t.put(&key(1), &b, false).await,
        Err(TierError::Corrupt { .. })
    ));
    assert_eq!(t.used(), 0);
    assert!(!t.contains(&key(1)));
}

/// Readers racing overwrites and deletes on a small tier, where freed
/// extents are reused at once: a read must never see another object's bytes
/// (that would surface as `Corrupt`), and accounting must settle exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_see_reused_extents() {
    for engine in [IoEngineKind::Uring, IoEngineKind::Psync] {
        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(DiskTier::open(cfg(dir.path(), engine)).unwrap());
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..150u64 {
                    let k = key(i % 6);
                    // Seeds differ per write, so a mixed-up read cannot pass the checksum.
                    let seed = w * 1000 + i;
                    match (w + i) % 5 {
                        0 => {
                            t.delete(&k).await.unwrap();
                        }
                        1 | 2 => match t
                            .put(&k, &block(seed, 30_000 + (seed as usize % 7) * 9000), false)
                            .await
                        {
                            Ok(()) | Err(TierError::Full { .. }) => {}
                            Err(e) => panic!("put failed: {e}"),
                        },
                        _ => {
                            if let Some(b) = t.get(&k).await.unwrap() {
                                b.verify().unwrap();
                            }
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut expect = 0;
        for i in 0..6 {
            if let Some(b) = t.get(&key(i)).await.unwrap() {
                expect += t.footprint(b.payload.len() as u64);
            }
        }
        assert_eq!(t.used(), expect, "{engine}");
    }
}

/// A put dropped part-way (while its write is in flight) leaves the tier
/// consistent: either the object is fully there or its extent is freed.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_puts_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = Arc::new(DiskTier::open(cfg(dir.path(), IoEngineKind::Uring)).unwrap());
    for i in 0..20u64 {
        let b = block(i, 1_000_000);
        let k = key(i);
        let put = t.put(&k, &b, i % 2 == 0);
        // Poll once or a few times, then drop the future.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(i * 50), put).await;
    }
    // In-flight I/O finishes on the engine thread; wait for it to settle.
    let settled = |t: &DiskTier| {
        let expect: u64 = t.inner.map.read().values().map(|s| t.footprint(s.header.length)).sum();
        t.used() == expect
    };
    for _ in 0..200 {
        if settled(&t) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(settled(&t), "extents leaked: used {}", t.used());
    for i in 0..20u64 {
        if let Some(b) = t.get(&key(i)).await.unwrap() {
            assert_eq!(b.payload, block(i, 1_000_000).payload);
        }
    }
}

#[test]
fn second_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), IoEngineKind::Psync);
    let first = DiskTier::open(c.clone()).unwrap();
    let second = DiskTier::open(c.clone());
    assert!(matches!(second, Err(TierError::Index(_))), "{second:?}");
    drop(first);
    DiskTier::open(c).unwrap();
}

#[test]
fn config_bounds() {
    let ok = DiskTierConfig::new("/tmp/x", 1 << 20);
    assert!(ok.validate().is_ok());
    assert_eq!(ok.file_size, 8 << 30);
    assert_eq!(ok.queue_depth, 64);
    assert_eq!(ok.engine, IoEngineKind::Auto);
    assert!(ok.registered_buffers);
    let bad = [
        DiskTierConfig {
            capacity: (1 << 20) - 1,
            ..ok.clone()
        },
        DiskTierConfig {
            file_size: 4096,
            ..ok.clone()
        },
        DiskTierConfig {
            queue_depth: 0,
            ..ok.clone()
        },
        DiskTierConfig {
            queue_depth: 100_000,
            ..ok.clone()
        },
        DiskTierConfig {
            dir: PathBuf::new(),
            ..ok.clone()
        },
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(TierError::Config(_))), "{c:?}");
        assert!(matches!(DiskTier::open(c), Err(TierError::Config(_))));
    }
}

const KILL_DIR_ENV: &str = "KVF_DISK_KILL9_DIR";
const KILL_OBJECTS: u64 = 20;

/// Child half of `kill9_keeps_acknowledged_puts`: puts without sync, then
/// kills itself with SIGKILL. Does nothing unless the parent set the env var.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by kill9_keeps_acknowledged_puts in a child process"]
async fn kill9_child() {
    let Some(dir) = std::env::var_os(KILL_DIR_ENV) else {
        return;
    };
    let t = DiskTier::open(cfg(Path::new(&dir), IoEngineKind::Auto)).unwrap();
    for i in 0..KILL_OBJECTS {
        t.put(&key(i), &block(i, 3000 + i as usize * 7000), false)
            .await
            .unwrap();
    }
    // Overwrite one and delete one, also acknowledged.
    t.put(&key(0), &block(77, 12_345), false).await.unwrap();
    assert!(t.delete(&key(1)).await.unwrap());
    // SAFETY: plain syscall; ends this process without running destructors.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL returned");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_keeps_acknowledged_puts() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args(["disk::tests::kill9_child", "--exact", "--ignored", "--test-threads=1"])
        .env(KILL_DIR_ENV, dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "child did not die by SIGKILL: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t = DiskTier::open(cfg(dir.path(), IoEngineKind::Auto)).unwrap();
    assert_eq!(t.len(), KILL_OBJECTS as usize - 1);
    assert_eq!(
        t.get(&key(0)).await.unwrap().unwrap().payload,
        block(77, 12_345).payload
    );
    assert!(t.get(&key(1)).await.unwrap().is_none());
    for i in 2..KILL_OBJECTS {
        let b = t
            .get(&key(i))
            .await
            .unwrap()
            .expect("acknowledged put survived kill -9");
        assert_eq!(b.payload, block(i, 3000 + i as usize * 7000).payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_slots_are_written_in_place_and_read_back() {
    // A block read from the host tier is a page-aligned view of its slot; the
    // disk tier writes it without a bounce copy. Both engines.
    for engine in [IoEngineKind::Uring, IoEngineKind::Psync] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DiskTierConfig::new(dir.path().join("d"), 32 << 20);
        cfg.file_size = 16 << 20;
        cfg.engine = engine;
        let disk = match DiskTier::open(cfg) {
            Ok(d) => d,
            Err(e) if engine == IoEngineKind::Uring => {
                println!("skipping io_uring: {e}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let host = crate::HostTier::new(8 << 20).unwrap();
        for (i, len) in [(1u64, 4096usize), (2, 1 << 20), (3, 12_345)] {
            let k = ObjectKey::new("ns", vec![i as u8]);
            host.put(&k, &crate::conformance::block(i, len), false).await.unwrap();
            let b = host.get(&k).await.unwrap().unwrap();
            disk.put(&k, &b, true).await.unwrap();
            let back = disk.get(&k).await.unwrap().unwrap();
            assert_eq!(back.payload, crate::conformance::payload(i, len), "{engine:?} {len}");
        }
    }
}

/// An entry on stable storage is replaced or removed with a synced index
/// write: the entry a crash could bring back must not point at an extent
/// already reused. What was synced (or found at open) counts as durable,
/// and so does whatever replaces it.
#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_durable_entry_stays_durable() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), IoEngineKind::Psync);
    let durable = |t: &DiskTier, k: &ObjectKey| t.inner.map.read().get(k).map(|s| s.durable);
    {
        let t = DiskTier::open(c.clone()).unwrap();
        t.put(&key(1), &block(1, 5000), true).await.unwrap();
        t.put(&key(2), &block(2, 5000), false).await.unwrap();
        assert_eq!((durable(&t, &key(1)), durable(&t, &key(2))), (Some(true), Some(false)));
        t.put(&key(1), &block(3, 5000), false).await.unwrap();
        assert_eq!(durable(&t, &key(1)), Some(true), "replaced a durable entry");
        t.put(&key(2), &block(4, 5000), false).await.unwrap();
        assert_eq!(durable(&t, &key(2)), Some(false));
    }
    let t = DiskTier::open(c).unwrap();
    assert_eq!((durable(&t, &key(1)), durable(&t, &key(2))), (Some(true), Some(true)));
    assert!(t.delete(&key(1)).await.unwrap());
    assert!(t.get(&key(1)).await.unwrap().is_none());
}
