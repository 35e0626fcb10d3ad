//! Tombstones: the deletes a node carried out in cluster mode (at any
//! replication), remembered for `cluster.tombstone-ttl-s`, so that a node
//! still holding a copy (a replica that was down, an earlier owner or a
//! draining node not done handing over) does not bring it back (cluster
//! repair asks the owners with `Locate`, which reports a tombstone's age).
//! Storing the key again clears it.
//!
//! Clearing a whole namespace leaves one namespace tombstone, which covers
//! every key of it not stored since.
//!
//! Persisted as an append-only text file (`tombstones` in the data
//! directory; `+ NS HEXKEY MS` records a delete, `- NS HEXKEY` a later
//! store, `* NS MS` a clear), read back and compacted at start (expired and cleared entries
//! dropped) and compacted again whenever it holds more than twice the live
//! entries. Expired entries leave memory at the next call that passes the
//! time (each call first drops what expired, oldest first, through an index
//! by time) and the file at the next compaction, so both stay bounded by the
//! live tombstones, not by every delete of the last runtime. A compaction past start writes the new file on a blocking
//! thread, off the lock that puts and deletes take; lines appended meanwhile
//! go to the old file and are carried over when the new one replaces it.
//! Writes are not synced: a tombstone is lost only with the
//! machine, and then only for objects deleted in the last moments.
//! Times are this node's clock; only ages (durations) leave the node.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default of `cluster.tombstone-ttl-s`, in ms (one day).
pub(crate) const DEFAULT_TOMBSTONE_TTL_MS: u64 = 86_400_000;

/// The tombstones of one node.
#[derive(Debug)]
pub(crate) struct Tombstones {
    path: Option<PathBuf>,
    ttl_ms: u64,
    /// Most key tombstones kept (`cluster.max-tombstones`); the oldest go
    /// first.
    max_entries: usize,
    /// Live entries, read without the lock on the put path.
    live: AtomicUsize,
    /// Shared with a compaction in progress.
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<(Arc<str>, Bytes), u64>,
    /// `map`'s entries by time, oldest first: what expires next.
    by_time: BTreeSet<(u64, Arc<str>, Bytes)>,
    /// Namespaces cleared, and when.
    clears: HashMap<Arc<str>, u64>,
    file: Option<std::fs::File>,
    /// Lines in the file.
    lines: usize,
    /// While a compacted file is being written: the lines appended since
    /// its snapshot, to be carried over into it.
    compacting: Option<String>,
}

/// A compaction started under the lock: the live entries' text, to be
/// written off the lock and then swapped in ([`Compaction::finish`]).
#[derive(Debug)]
struct Compaction {
    path: PathBuf,
    text: String,
    lines: usize,
    inner: Arc<Mutex<Inner>>,
}

impl Compaction {
    /// Writes the snapshot to a temporary file (no lock held), then, under
    /// the lock, appends the lines written since, renames it over the old
    /// file and appends to it from then on.
    fn finish(self) {
        let tmp = self.path.with_extension("tmp");
        let written = std::fs::write(&tmp, &self.text);
        let mut inner = self.inner.lock();
        let since = inner.compacting.take().unwrap_or_default();
        let swapped = written.and_then(|()| {
            let mut f = std::fs::OpenOptions::new().append(true).open(&tmp)?;
            f.write_all(since.as_bytes())?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(f)
        });
        match swapped {
            Ok(f) => {
                inner.file = Some(f);
                inner.lines = self.lines + since.lines().count();
            }
            // The old file is intact and has every line; appends go on there.
            Err(e) => tracing::warn!(error = %e, "compacting the tombstone file"),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Bytes> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

impl Tombstones {
    /// Loads (and compacts) the tombstones at `path`, dropping those older
    /// than `ttl_ms` at `now_ms`; `None` keeps them in memory only.
    pub(crate) fn load(path: Option<PathBuf>, ttl_ms: u64, now_ms: u64) -> std::io::Result<Tombstones> {
        let mut map = HashMap::new();
        let mut clears: HashMap<Arc<str>, u64> = HashMap::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for line in text.lines() {
                        let f: Vec<&str> = line.split(' ').collect();
                        match f.as_slice() {
                            ["+", ns, key, ms] => {
                                if let (Some(k), Ok(ms)) = (unhex(key), ms.parse::<u64>()) {
                                    map.insert((Arc::<str>::from(*ns), k), ms);
                                }
                            }
                            ["-", ns, key] => {
                                if let Some(k) = unhex(key) {
                                    map.remove(&(Arc::<str>::from(*ns), k));
                                }
                            }
                            ["*", ns, ms] => {
                                if let Ok(ms) = ms.parse::<u64>() {
                                    clears.insert(Arc::<str>::from(*ns), ms);
                                }
                            }
                            // A torn last line (crash mid-write) or junk: skipped.
                            _ => {}
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let by_time = map.iter().map(|((ns, k), ms)| (*ms, ns.clone(), k.clone())).collect();
        let mut inner = Inner {
            map,
            by_time,
            clears,
            file: None,
            lines: 0,
            compacting: None,
        };
        Self::expire(&mut inner, ttl_ms, now_ms);
        let t = Tombstones {
            path,
            ttl_ms,
            max_entries: usize::MAX,
            live: AtomicUsize::new(inner.map.len() + inner.clears.len()),
            inner: Arc::new(Mutex::new(inner)),
        };
        t.rewrite(&mut t.inner.lock())?;
        Ok(t)
    }

    /// Keeps at most `max` key tombstones from now on (the oldest go first,
    /// at the next delete recorded).
    pub(crate) fn with_max_entries(mut self, max: usize) -> Tombstones {
        self.max_entries = max.max(1);
        self
    }

    /// Drops the entries older than `ttl_ms` at `now_ms` (oldest first; the
    /// namespace clears are few).
    fn expire(inner: &mut Inner, ttl_ms: u64, now_ms: u64) {
        let live = |ms: u64| ms.saturating_add(ttl_ms) > now_ms;
        while let Some(first) = inner.by_time.first()
            && !live(first.0)
        {
            let (_, ns, k) = inner.by_time.pop_first().expect("just seen");
            inner.map.remove(&(ns, k));
        }
        if !inner.clears.is_empty() {
            inner.clears.retain(|_, ms| live(*ms));
        }
    }

    /// [`Self::expire`], then the live count the lock-free paths read.
    fn expire_and_count(&self, inner: &mut Inner, now_ms: u64) {
        Self::expire(inner, self.ttl_ms, now_ms);
        self.live.store(inner.map.len() + inner.clears.len(), Ordering::Relaxed);
    }

    /// The entries as file text, and how many lines that is; callers expire
    /// first, so only live ones are written.
    fn snapshot(inner: &Inner) -> (String, usize) {
        let mut text: String = inner
            .map
            .iter()
            .map(|((ns, k), ms)| format!("+ {ns} {} {ms}\n", hex(k)))
            .collect();
        text.extend(inner.clears.iter().map(|(ns, ms)| format!("* {ns} {ms}\n")));
        (text, inner.map.len() + inner.clears.len())
    }

    /// Writes the live entries to a fresh file and appends from there (at
    /// load, before anyone else can append).
    fn rewrite(&self, inner: &mut Inner) -> std::io::Result<()> {
        let Some(p) = &self.path else { return Ok(()) };
        let tmp = p.with_extension("tmp");
        let (text, lines) = Self::snapshot(inner);
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, p)?;
        inner.file = Some(std::fs::OpenOptions::new().append(true).open(p)?);
        inner.lines = lines;
        Ok(())
    }

    /// Appends `text` (whole lines, `n` of them) to the file in one write;
    /// returns a compaction to run, once the lock is released, when the file
    /// has grown past twice the live entries.
    #[must_use]
    fn append(&self, inner: &mut Inner, text: &str, n: usize) -> Option<Compaction> {
        let path = self.path.as_ref()?;
        if let Some(f) = &mut inner.file
            && let Err(e) = f.write_all(text.as_bytes())
        {
            tracing::warn!(error = %e, "writing a tombstone");
        }
        inner.lines += n;
        match &mut inner.compacting {
            Some(since) => {
                since.push_str(text);
                None
            }
            None if inner.lines > 2 * (inner.map.len() + inner.clears.len()) + 1024 => {
                let (text, lines) = Self::snapshot(inner);
                inner.compacting = Some(String::new());
                Some(Compaction {
                    path: path.clone(),
                    text,
                    lines,
                    inner: self.inner.clone(),
                })
            }
            None => None,
        }
    }

    /// Runs a compaction on a blocking thread (inline without a runtime).
    fn compact(job: Option<Compaction>) {
        let Some(job) = job else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(move || job.finish())),
            Err(_) => job.finish(),
        }
    }

    /// Records that `keys` of `namespace` were deleted at `now_ms`, in one
    /// write to the file; returns how many of the oldest tombstones went to
    /// stay within the cap.
    pub(crate) fn record(&self, namespace: &Arc<str>, keys: &[Bytes], now_ms: u64) -> usize {
        if keys.is_empty() {
            return 0;
        }
        let text: String = keys
            .iter()
            .map(|k| format!("+ {namespace} {} {now_ms}\n", hex(k)))
            .collect();
        let mut evicted = 0;
        let job = {
            let mut inner = self.inner.lock();
            for k in keys {
                if let Some(old) = inner.map.insert((namespace.clone(), k.clone()), now_ms) {
                    inner.by_time.remove(&(old, namespace.clone(), k.clone()));
                }
                inner.by_time.insert((now_ms, namespace.clone(), k.clone()));
            }
            while inner.map.len() > self.max_entries
                && let Some((_, ns, k)) = inner.by_time.pop_first()
            {
                inner.map.remove(&(ns, k));
                evicted += 1;
            }
            self.expire_and_count(&mut inner, now_ms);
            self.append(&mut inner, &text, keys.len())
        };
        Self::compact(job);
        evicted
    }

    /// Forgets `key`'s tombstone (it was stored again at `now_ms`).
    pub(crate) fn clear(&self, namespace: &Arc<str>, key: &Bytes, now_ms: u64) {
        self.clear_older(namespace, key, u64::MAX, now_ms);
    }

    /// Forgets `key`'s tombstone if it was recorded at or before
    /// `stored_ms`: a copy stored at `now_ms` whose version was created at
    /// `stored_ms` (a repair copy keeps its age) does not undo a later delete.
    pub(crate) fn clear_older(&self, namespace: &Arc<str>, key: &Bytes, stored_ms: u64, now_ms: u64) {
        if self.live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let job = {
            let mut inner = self.inner.lock();
            let id = (namespace.clone(), key.clone());
            let removed = match inner.map.get(&id) {
                Some(&at) if at <= stored_ms => {
                    inner.map.remove(&id);
                    inner.by_time.remove(&(at, namespace.clone(), key.clone()));
                    true
                }
                _ => false,
            };
            self.expire_and_count(&mut inner, now_ms);
            if !removed {
                return;
            }
            self.append(&mut inner, &format!("- {namespace} {}\n", hex(key)), 1)
        };
        Self::compact(job);
    }

    /// Records that the whole of `namespace` was cleared at `now_ms` (its
    /// keys' own tombstones are subsumed).
    pub(crate) fn record_clear(&self, namespace: &Arc<str>, now_ms: u64) {
        let job = {
            let mut inner = self.inner.lock();
            inner.map.retain(|(ns, _), _| ns != namespace);
            inner.by_time.retain(|(_, ns, _)| ns != namespace);
            inner.clears.insert(namespace.clone(), now_ms);
            self.expire_and_count(&mut inner, now_ms);
            self.append(&mut inner, &format!("* {namespace} {now_ms}\n"), 1)
        };
        Self::compact(job);
    }

    /// How long ago `key` was deleted (or its namespace cleared, the
    /// younger of the two), if a live tombstone covers it. The caller asks
    /// only for keys it does not hold: a key stored after a clear is held.
    pub(crate) fn age(&self, namespace: &Arc<str>, key: &Bytes, now_ms: u64) -> Option<u64> {
        if self.live.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut inner = self.inner.lock();
        self.expire_and_count(&mut inner, now_ms);
        let key_at = inner.map.get(&(namespace.clone(), key.clone())).copied();
        let clear_at = inner.clears.get(namespace).copied();
        let at = key_at.into_iter().chain(clear_at).max()?;
        Some(now_ms.saturating_sub(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_clear_expire_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tombstones");
        let ns: Arc<str> = "w".into();
        let (k1, k2, k3) = (
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
        );
        let t = Tombstones::load(Some(p.clone()), 10_000, 1_000).unwrap();
        assert_eq!(t.age(&ns, &k1, 1_000), None);
        t.record(&ns, std::slice::from_ref(&k1), 1_000);
        t.record(&ns, std::slice::from_ref(&k2), 2_000);
        t.record(&ns, std::slice::from_ref(&k3), 2_500);
        t.clear(&ns, &k3, 2_600);
        assert_eq!(t.age(&ns, &k1, 1_500), Some(500));
        assert_eq!(t.age(&ns, &k3, 3_000), None, "stored again");
        assert_eq!(t.age(&ns, &k1, 11_000), None, "expired");
        drop(t);
        // A torn line at the end is skipped.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"+ w 6").unwrap();
        drop(f);
        let t = Tombstones::load(Some(p.clone()), 10_000, 5_000).unwrap();
        assert_eq!(t.age(&ns, &k1, 5_000), Some(4_000));
        assert_eq!(t.age(&ns, &k2, 5_000), Some(3_000));
        assert_eq!(t.age(&ns, &k3, 5_000), None);
        // Reloaded past k1's expiry: only k2 is left, and the file was compacted.
        drop(t);
        let t = Tombstones::load(Some(p.clone()), 10_000, 11_500).unwrap();
        assert_eq!(t.age(&ns, &k1, 11_500), None);
        assert_eq!(t.age(&ns, &k2, 11_500), Some(9_500));
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 1);
        assert!(unhex("0").is_none() && unhex("zz").is_none() && unhex("").is_none());
        // A clear covers every key of the namespace, and survives a reload.
        let other: Arc<str> = "x".into();
        t.record_clear(&ns, 12_000);
        assert_eq!(t.age(&ns, &Bytes::from_static(b"never"), 12_500), Some(500));
        assert_eq!(t.age(&other, &k1, 12_500), None, "other namespaces are not covered");
        drop(t);
        let t = Tombstones::load(Some(p), 10_000, 13_000).unwrap();
        assert_eq!(t.age(&ns, &k1, 13_000), Some(1_000));
        assert_eq!(t.age(&ns, &k1, 22_500), None, "expired");
    }

    #[test]
    fn a_copy_clears_only_an_older_delete() {
        let t = Tombstones::load(None, 10_000, 0).unwrap();
        let ns: Arc<str> = "w".into();
        let k = Bytes::from_static(b"k");
        t.record(&ns, std::slice::from_ref(&k), 1_000);
        t.clear_older(&ns, &k, 999, 1_500);
        assert_eq!(t.age(&ns, &k, 1_500), Some(500), "a copy of an older version");
        t.clear_older(&ns, &k, 1_000, 1_500);
        assert_eq!(t.age(&ns, &k, 1_500), None);
    }

    #[test]
    fn past_the_cap_the_oldest_go_first() {
        let t = Tombstones::load(None, 1_000_000, 0).unwrap().with_max_entries(3);
        let ns: Arc<str> = "ns".into();
        let k = |i: u8| Bytes::from(vec![i]);
        assert_eq!(t.record(&ns, &[k(1), k(2)], 10), 0);
        assert_eq!(t.record(&ns, &[k(3)], 20), 0);
        assert_eq!(t.record(&ns, &[k(4), k(5)], 30), 2);
        assert_eq!(t.age(&ns, &k(1), 40), None);
        assert_eq!(t.age(&ns, &k(2), 40), None);
        assert_eq!(t.age(&ns, &k(3), 40), Some(20));
        assert_eq!(t.age(&ns, &k(5), 40), Some(10));
        assert_eq!(t.inner.lock().by_time.len(), 3);
    }

    #[test]
    fn expired_entries_leave_memory_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tombstones");
        let (ns, other): (Arc<str>, Arc<str>) = ("w".into(), "x".into());
        let key = |i: u32| Bytes::from(i.to_be_bytes().to_vec());
        let t = Tombstones::load(Some(p.clone()), 1_000, 0).unwrap();
        let old: Vec<Bytes> = (0..3_000).map(key).collect();
        t.record(&ns, &old, 10);
        t.record_clear(&other, 10);
        // A lookup past the TTL drops what expired, not only for its key.
        assert_eq!(t.age(&ns, &key(0), 2_000), None);
        {
            let inner = t.inner.lock();
            assert!(inner.map.is_empty() && inner.by_time.is_empty() && inner.clears.is_empty());
        }
        assert_eq!(t.live.load(Ordering::Relaxed), 0);
        // The file still holds them; the next append compacts it down to
        // the live entry (the threshold counts live entries only).
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 3_001);
        t.record(&ns, &[key(5_000)], 2_000);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 1, "{}", &text[..text.len().min(200)]);
        assert_eq!(t.age(&ns, &key(5_000), 2_500), Some(500));
        // Without lookups, any write drops what expired before it.
        let fresh: Vec<Bytes> = (10_000..12_000).map(key).collect();
        t.record(&ns, &fresh, 3_000);
        t.clear(&ns, &key(10_000), 3_500);
        assert_eq!(
            t.inner.lock().map.len(),
            1_999,
            "the entry of 2 000 expired, one stored again"
        );
        t.record_clear(&other, 5_000);
        {
            let inner = t.inner.lock();
            assert!(inner.map.is_empty() && inner.by_time.is_empty());
            assert_eq!(inner.clears.len(), 1);
        }
        // A key deleted again keeps only its newest time in the index.
        t.record(&ns, &[key(1)], 5_000);
        t.record(&ns, &[key(1)], 5_500);
        assert_eq!(t.inner.lock().by_time.len(), 1);
        assert_eq!(t.age(&ns, &key(1), 6_200), Some(700), "not expired with its first time");
    }

    #[test]
    fn compaction_keeps_what_was_appended_while_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tombstones");
        let ns: Arc<str> = "w".into();
        let key = |i: u32| Bytes::from(i.to_be_bytes().to_vec());
        let t = Tombstones::load(Some(p.clone()), 1_000_000, 0).unwrap();
        // One call records a batch.
        t.record(&ns, &[key(0), key(1), key(2)], 10);
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 3);
        // Start a compaction as a long file would, but hold it back.
        let job = {
            let mut inner = t.inner.lock();
            inner.lines = 10_000;
            t.append(&mut inner, "", 0)
        };
        let job = job.expect("a compaction is due");
        // Meanwhile the lock is free and writes go on.
        t.record(&ns, &[key(3)], 20);
        t.clear(&ns, &key(0), 20);
        assert!(t.inner.lock().compacting.is_some());
        job.finish();
        assert!(t.inner.lock().compacting.is_none());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3 + 2, "{text}");
        assert_eq!(t.inner.lock().lines, 5);
        // Appends after the swap land in the new file.
        t.record(&ns, &[key(4)], 30);
        drop(t);
        let t = Tombstones::load(Some(p), 1_000_000, 40).unwrap();
        assert_eq!(t.age(&ns, &key(0), 40), None, "stored again during the compaction");
        for (i, at) in [(1, 10), (2, 10), (3, 20), (4, 30)] {
            assert_eq!(t.age(&ns, &key(i), 40), Some(40 - at), "key {i}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_runs_in_the_background_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tombstones");
        let ns: Arc<str> = "w".into();
        let t = Tombstones::load(Some(p.clone()), 1_000_000, 0).unwrap();
        let live = Bytes::from_static(b"live");
        t.record(&ns, std::slice::from_ref(&live), 1);
        // Churn on one key grows the file well past the compaction threshold.
        let churn = Bytes::from_static(b"churn");
        for i in 0..3_000 {
            t.record(&ns, std::slice::from_ref(&churn), 2 + i);
            t.clear(&ns, &churn, 2 + i);
        }
        // Lines appended while a compaction runs are carried over into the
        // new file (on a loaded machine, most of the churn), and the next
        // append past the threshold compacts again: the file ends small.
        let mut lines = usize::MAX;
        for round in 0..200 {
            if t.inner.lock().compacting.is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            lines = std::fs::read_to_string(&p).unwrap().lines().count();
            if lines < 2_000 {
                break;
            }
            t.record(&ns, std::slice::from_ref(&churn), 10_000 + round);
            t.clear(&ns, &churn, 10_000 + round);
        }
        assert!(lines < 2_000, "the file was compacted ({lines} lines)");
        drop(t);
        let t = Tombstones::load(Some(p), 1_000_000, 10_000).unwrap();
        assert_eq!(t.age(&ns, &live, 10_000), Some(9_999));
        assert_eq!(t.age(&ns, &churn, 10_000), None);
    }
}
