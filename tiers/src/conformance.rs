//! The one conformance suite every [`Tier`] implementation runs. Each tier's
//! tests call [`run_all`] with a factory that opens the tier over the same
//! backing store (so persistence can be checked by reopening).

use crate::{Block, Layout, ObjectKey, Tier, TierError};
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;

/// Deterministic payload of `len` bytes derived from `seed`.
pub fn payload(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// A block with a deterministic payload and a small layout.
pub fn block(seed: u64, len: usize) -> Block {
    let layout = Layout {
        model: "conformance".into(),
        dtype: "u8".into(),
        num_layers: 2,
        ..Default::default()
    };
    Block::new(payload(seed, len), layout, 1_700_000_000_000 + seed)
}

fn key(i: u64) -> ObjectKey {
    ObjectKey::new("conf", i.to_be_bytes().to_vec())
}

/// Runs every check. `open` opens the tier; calling it again after dropping
/// the previous instance must reopen the same storage. `capacity` is what the
/// factory configures; `persistent` says whether data survives a reopen.
pub async fn run_all<F, Fut, T>(open: F, persistent: bool)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<T>>,
    T: Tier,
{
    put_get_roundtrip(&*open().await).await;
    overwrite_replaces(&*open().await).await;
    delete_frees_space(&*open().await).await;
    full_and_too_large(&*open().await).await;
    concurrent_mixed(open().await).await;
    if persistent {
        persistence(&open).await;
    }
}

async fn clear<T: Tier + ?Sized>(t: &T) {
    for (k, _) in t.recover().await.unwrap() {
        t.delete(&k).await.unwrap();
    }
    for i in 0..2000 {
        t.delete(&key(i)).await.unwrap();
    }
}

/// Put then get returns identical bytes and header; accounting matches.
pub async fn put_get_roundtrip<T: Tier + ?Sized>(t: &T) {
    clear(t).await;
    assert_eq!(t.used(), 0, "{}: used not zero after clear", t.kind());
    let sizes = [1usize, 4095, 4096, 65_536, 300_001];
    let mut expect_used = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let b = block(i as u64, n);
        t.put(&key(i as u64), &b, false).await.unwrap();
        expect_used += t.footprint(n as u64);
    }
    assert_eq!(t.used(), expect_used, "{}: used drifted", t.kind());
    assert_eq!(t.len(), sizes.len());
    for (i, &n) in sizes.iter().enumerate() {
        let got = t.get(&key(i as u64)).await.unwrap().expect("present");
        let want = block(i as u64, n);
        assert_eq!(got.payload, want.payload, "{}: payload {i} differs", t.kind());
        assert_eq!(got.header, want.header, "{}: header {i} differs", t.kind());
        assert!(t.contains(&key(i as u64)));
    }
    assert!(t.get(&key(999)).await.unwrap().is_none());
    assert!(!t.contains(&key(999)));
    clear(t).await;
}

/// A second put under the same key replaces the first and keeps accounting.
pub async fn overwrite_replaces<T: Tier + ?Sized>(t: &T) {
    clear(t).await;
    t.put(&key(1), &block(1, 10_000), false).await.unwrap();
    t.put(&key(1), &block(2, 70_000), false).await.unwrap();
    let got = t.get(&key(1)).await.unwrap().unwrap();
    assert_eq!(got.payload, block(2, 70_000).payload);
    assert_eq!(t.len(), 1);
    assert_eq!(t.used(), t.footprint(70_000));
    clear(t).await;
}

/// Delete removes and returns the space.
pub async fn delete_frees_space<T: Tier + ?Sized>(t: &T) {
    clear(t).await;
    t.put(&key(5), &block(5, 50_000), false).await.unwrap();
    assert!(t.delete(&key(5)).await.unwrap());
    assert!(!t.delete(&key(5)).await.unwrap());
    assert!(t.get(&key(5)).await.unwrap().is_none());
    assert_eq!(t.used(), 0);
    assert_eq!(t.len(), 0);
}

/// A tier with finite capacity refuses what does not fit, keeping its data.
pub async fn full_and_too_large<T: Tier + ?Sized>(t: &T) {
    clear(t).await;
    let cap = t.capacity();
    if cap == u64::MAX || cap > 64 << 20 {
        return; // effectively unbounded (object store) or too big to fill in a test
    }
    let too_large = t.put(&key(1), &block(1, cap as usize + 1), false).await;
    assert!(
        matches!(too_large, Err(TierError::TooLarge { .. })),
        "{}: {too_large:?}",
        t.kind()
    );
    let chunk = (cap / 4) as usize;
    let mut stored = 0u64;
    let mut full = None;
    for i in 0..16 {
        match t.put(&key(i), &block(i, chunk), false).await {
            Ok(()) => stored += 1,
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(full, Some(TierError::Full { .. })),
        "{}: expected Full, got {full:?}",
        t.kind()
    );
    for i in 0..stored {
        assert_eq!(t.get(&key(i)).await.unwrap().unwrap().payload, block(i, chunk).payload);
    }
    assert_eq!(t.used(), stored * t.footprint(chunk as u64));
    clear(t).await;
}

/// Many tasks putting, getting and deleting distinct and shared keys; every
/// read returns some whole object that was written, never a mix.
pub async fn concurrent_mixed<T: Tier>(t: Arc<T>) {
    clear(&*t).await;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let k = key(100 + (w * 7 + i) % 24);
                let seed = 1000 + (w * 7 + i) % 24; // same key -> same content
                match i % 4 {
                    0 | 1 => {
                        let _ = t
                            .put(&k, &block(seed, 20_000 + (seed as usize % 5) * 1000), false)
                            .await;
                    }
                    2 => {
                        if let Some(b) = t.get(&k).await.unwrap() {
                            assert_eq!(b.payload, block(seed, b.payload.len()).payload);
                            b.verify().unwrap();
                        }
                    }
                    _ => {
                        t.delete(&k).await.unwrap();
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut expect = 0;
    for i in 0..24 {
        if let Some(b) = t.get(&key(100 + i)).await.unwrap() {
            expect += t.footprint(b.payload.len() as u64);
        }
    }
    assert_eq!(t.used(), expect, "{}: used drifted under concurrency", t.kind());
    clear(&*t).await;
}

/// Objects survive closing and reopening the tier, and `recover` lists them.
pub async fn persistence<F, Fut, T>(open: &F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<T>>,
    T: Tier,
{
    {
        let t = open().await;
        clear(&*t).await;
        for i in 0..10 {
            t.put(&key(i), &block(i, 5000 + i as usize * 999), true).await.unwrap();
        }
        t.delete(&key(3)).await.unwrap();
    }
    let t = open().await;
    let mut rec = t.recover().await.unwrap();
    rec.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(rec.len(), 9, "{}: recovered {} objects", t.kind(), rec.len());
    for i in (0..10).filter(|&i| i != 3) {
        let b = t.get(&key(i)).await.unwrap().expect("survived reopen");
        assert_eq!(b.payload, block(i, 5000 + i as usize * 999).payload);
    }
    assert!(t.get(&key(3)).await.unwrap().is_none());
    clear(&*t).await;
}

/// An in-memory tier of any kind with a hard capacity: the reference
/// implementation of the trait, used to test the stack in isolation.
#[derive(Debug)]
pub struct MemTier {
    kind: crate::TierKind,
    capacity: u64,
    map: parking_lot::Mutex<std::collections::HashMap<ObjectKey, Block>>,
    failing: std::sync::atomic::AtomicBool,
    synced: std::sync::atomic::AtomicU64,
}

impl MemTier {
    /// A tier of `kind` holding at most `capacity` payload bytes.
    pub fn new(kind: crate::TierKind, capacity: u64) -> Self {
        Self {
            kind,
            capacity,
            map: Default::default(),
            failing: Default::default(),
            synced: Default::default(),
        }
    }
    /// Puts so far that asked for `sync`.
    pub fn synced_puts(&self) -> u64 {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// While set, every put fails with an I/O error (a device or object
    /// store that is down).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, std::sync::atomic::Ordering::Relaxed);
    }
    /// Flips a byte of a stored payload behind the tier's back.
    pub fn corrupt(&self, key: &ObjectKey) {
        let mut m = self.map.lock();
        if let Some(b) = m.get_mut(key) {
            let mut v = b.payload.to_vec();
            if let Some(x) = v.first_mut() {
                *x ^= 0xff;
            }
            b.payload = Bytes::from(v);
        }
    }
}

#[async_trait::async_trait]
impl Tier for MemTier {
    fn kind(&self) -> crate::TierKind {
        self.kind
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn used(&self) -> u64 {
        self.map.lock().values().map(|b| b.header.length.max(1)).sum()
    }
    fn len(&self) -> usize {
        self.map.lock().len()
    }
    fn footprint(&self, len: u64) -> u64 {
        len.max(1)
    }
    async fn put(&self, key: &ObjectKey, block: &Block, sync: bool) -> crate::TierResult<()> {
        if sync {
            self.synced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(TierError::Unavailable(format!("{} tier is down", self.kind)));
        }
        let need = self.footprint(block.header.length);
        if need > self.capacity {
            return Err(TierError::TooLarge {
                tier: self.kind,
                size: need,
                capacity: self.capacity,
            });
        }
        let mut m = self.map.lock();
        let used: u64 = m
            .iter()
            .filter(|(k, _)| *k != key)
            .map(|(_, b)| b.header.length.max(1))
            .sum();
        if used + need > self.capacity {
            return Err(TierError::Full {
                tier: self.kind,
                needed: need,
                available: self.capacity - used,
                capacity: self.capacity,
            });
        }
        // Never keep the caller's payload: it may be a view of a host-arena
        // slot (see the `Tier::put` contract).
        let owned = Block {
            header: block.header.clone(),
            payload: bytes::Bytes::copy_from_slice(&block.payload),
        };
        m.insert(key.clone(), owned);
        Ok(())
    }
    async fn get(&self, key: &ObjectKey) -> crate::TierResult<Option<Block>> {
        let b = self.map.lock().get(key).cloned();
        match b {
            Some(b) if self.kind.is_persistent() => match b.verify() {
                Ok(()) => Ok(Some(b)),
                Err(e) => Err(TierError::Corrupt {
                    tier: self.kind,
                    key: key.to_string(),
                    reason: e.to_string(),
                }),
            },
            other => Ok(other),
        }
    }
    async fn delete(&self, key: &ObjectKey) -> crate::TierResult<bool> {
        Ok(self.map.lock().remove(key).is_some())
    }
    fn contains(&self, key: &ObjectKey) -> bool {
        self.map.lock().contains_key(key)
    }
    async fn recover(&self) -> crate::TierResult<Vec<(ObjectKey, crate::BlockHeader)>> {
        Ok(self
            .map
            .lock()
            .iter()
            .map(|(k, b)| (k.clone(), b.header.clone()))
            .collect())
    }
}

#[cfg(test)]
mod mem_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mem_tier_conformance() {
        let t = Arc::new(MemTier::new(crate::TierKind::Disk, 4 << 20));
        run_all(
            || {
                let t = t.clone();
                async move { t }
            },
            true,
        )
        .await;
    }
}
