//! The namespace registry: which namespaces exist, which tenant owns each
//! and how many copies of each object it keeps. A namespace comes into
//! being on its owner's first put (replication 1) or with
//! `CreateNamespace`; reads of a namespace nobody created are `NOT_FOUND`;
//! another tenant's namespace is `PERMISSION_DENIED`. In cluster mode the
//! records of namespaces created with `CreateNamespace` come from etcd
//! ([`Namespaces::apply_cluster`]) and win over what the node knew.
//! Persisted as a small text file (`namespaces` in the data directory,
//! `name<TAB>owner<TAB>replication` per line, replaced atomically; lines
//! without a replication, from older nodes, mean 1). Creation is bounded
//! (`limits.max-namespaces`, `limits.max-namespaces-per-tenant`): each new
//! namespace rewrites the file, and Stats and Members list every name.

use super::FabricError;
use crate::cluster::NamespaceRecord;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

/// Tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";

/// What the registry knows of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceEntry {
    /// Owning tenant.
    pub owner: String,
    /// Copies of each object.
    pub replication: u32,
    /// Known from the cluster's registry in etcd.
    pub cluster_wide: bool,
    /// Created on this node while etcd could not be reached (cluster
    /// mode): to be claimed cluster-wide once it can. Saved.
    pub unclaimed: bool,
    /// The cluster's records give the namespace to another tenant (it
    /// was taken elsewhere while this node knew it locally, during an etcd
    /// outage say): the objects this node holds in it are the old owner's
    /// and are dropped first ([`Namespaces::finish_reassign`]). Until
    /// then nobody may use it. Never saved: a restart re-applies the
    /// records and drops them again.
    pub reassign_to: Option<(String, u32)>,
}

impl NamespaceEntry {
    fn local(owner: &str) -> Self {
        NamespaceEntry {
            owner: owner.to_string(),
            replication: 1,
            cluster_wide: false,
            unclaimed: false,
            reassign_to: None,
        }
    }

    /// Refuses a writer or reader other than the owner; `Reassigning` to
    /// the owner and to the tenant it is being handed to (another tenant
    /// is not told the namespace exists beyond PERMISSION_DENIED).
    fn check(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        let incoming = self.reassign_to.as_ref().is_some_and(|(o, _)| o == tenant);
        if self.owner != tenant && !incoming {
            return Err(FabricError::PermissionDenied {
                tenant: tenant.into(),
                namespace: namespace.into(),
            });
        }
        if self.reassign_to.is_some() {
            return Err(FabricError::Reassigning(namespace.into()));
        }
        Ok(())
    }
}

/// A write in flight in a namespace ([`Namespaces::writing`]): a hand-over
/// to another owner waits for it before it drops the namespace's objects.
#[derive(Debug)]
pub struct Writing {
    namespace: String,
    writers: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut w = self.writers.lock();
        if let Some(n) = w.get_mut(&self.namespace) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.namespace);
            }
        }
    }
}

/// What [`Namespaces::apply_cluster`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Names whose entry (replication, scope) changed.
    pub changed: Vec<String>,
    /// Names the records give to another tenant: drop this node's objects
    /// in them, then [`Namespaces::finish_reassign`].
    pub reassigning: Vec<String>,
}

/// Registry of namespaces, owners and replication.
#[derive(Debug)]
pub struct Namespaces {
    path: Option<PathBuf>,
    owners: Mutex<BTreeMap<String, NamespaceEntry>>,
    /// Most namespaces a client may create on this node, in all and per
    /// tenant (those adopted from data or from the cluster's records are
    /// not refused, but count).
    max_total: usize,
    max_per_tenant: usize,
    /// Writes in flight per namespace ([`Writing`]).
    writers: Arc<Mutex<HashMap<String, usize>>>,
}

impl Namespaces {
    /// Loads the registry from `path` (or an in-memory one for `None`).
    pub fn load(path: Option<PathBuf>) -> std::io::Result<Self> {
        let mut owners = BTreeMap::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for line in text.lines() {
                        let mut f = line.split('\t');
                        let (Some(ns), Some(owner)) = (f.next(), f.next()) else {
                            continue;
                        };
                        let mut e = NamespaceEntry::local(owner);
                        if let Some(r) = f.next().and_then(|r| r.parse::<u32>().ok()).filter(|r| *r >= 1) {
                            e.replication = r;
                        }
                        match f.next() {
                            Some("cluster") => e.cluster_wide = true,
                            Some("unclaimed") => e.unclaimed = true,
                            _ => {}
                        }
                        owners.insert(ns.to_string(), e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            path,
            owners: Mutex::new(owners),
            max_total: usize::MAX,
            max_per_tenant: usize::MAX,
            writers: Arc::default(),
        })
    }

    /// The registry refusing to create namespaces past `total` in all or
    /// `per_tenant` for one tenant.
    pub fn with_limits(mut self, total: usize, per_tenant: usize) -> Self {
        self.max_total = total;
        self.max_per_tenant = per_tenant;
        self
    }

    /// Whether `tenant` may create one more namespace.
    fn room(&self, owners: &BTreeMap<String, NamespaceEntry>, tenant: &str) -> Result<(), FabricError> {
        if owners.len() >= self.max_total {
            return Err(FabricError::TooManyNamespaces(format!(
                "this node holds {} namespaces, its limit (limits.max-namespaces)",
                owners.len()
            )));
        }
        if self.max_per_tenant < self.max_total {
            let n = owners.values().filter(|e| e.owner == tenant).count();
            if n >= self.max_per_tenant {
                return Err(FabricError::TooManyNamespaces(format!(
                    "tenant {tenant:?} owns {n} namespaces, the limit per tenant (limits.max-namespaces-per-tenant)"
                )));
            }
        }
        Ok(())
    }

    /// Checks, before anything else is done for it (a cluster-wide claim),
    /// that `tenant` could create `namespace` if it is new.
    pub fn check_room(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        let owners = self.owners.lock();
        if owners.contains_key(namespace) {
            return Ok(());
        }
        self.room(&owners, tenant)
    }

    fn save(&self, owners: &BTreeMap<String, NamespaceEntry>) -> std::io::Result<()> {
        let Some(p) = &self.path else { return Ok(()) };
        let tmp = p.with_extension("tmp");
        let text: String = owners
            .iter()
            .map(|(n, e)| {
                let scope = match (e.cluster_wide, e.unclaimed) {
                    (true, _) => "cluster",
                    (false, true) => "unclaimed",
                    (false, false) => "local",
                };
                format!("{n}\t{}\t{}\t{scope}\n", e.owner, e.replication)
            })
            .collect();
        // Durable before it is relied on: the temp file's bytes are synced
        // before the rename, and the directory after it, so a power loss
        // cannot bring back an older registry (or none) under objects
        // acknowledged as durable, which would then belong to `default`.
        // This is blocking I/O under the registry's lock, on whichever
        // thread (often an async one) created the namespace: rare (a new
        // namespace), but it stalls other puts for a sync or two.
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, p)?;
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }

    fn saved(&self, owners: &BTreeMap<String, NamespaceEntry>) -> Result<(), FabricError> {
        self.save(owners)
            .map_err(|e| FabricError::Internal(format!("saving namespace registry: {e}")))
    }

    /// Adds namespaces found in recovered data (owner: default tenant) that
    /// the registry does not know.
    pub fn adopt(&self, names: impl IntoIterator<Item = String>) -> std::io::Result<()> {
        let mut owners = self.owners.lock();
        let mut changed = false;
        for n in names {
            if let std::collections::btree_map::Entry::Vacant(e) = owners.entry(n) {
                e.insert(NamespaceEntry::local(DEFAULT_TENANT));
                changed = true;
            }
        }
        if changed { self.save(&owners) } else { Ok(()) }
    }

    /// Whether this node knows `namespace` (any owner).
    pub fn knows(&self, namespace: &str) -> bool {
        self.owners.lock().contains_key(namespace)
    }

    /// For a write: creates the namespace for `tenant` if new, else checks
    /// the tenant owns it.
    pub fn for_write(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        let mut owners = self.owners.lock();
        match owners.get(namespace) {
            Some(o) => o.check(tenant, namespace),
            None => {
                self.room(&owners, tenant)?;
                owners.insert(namespace.to_string(), NamespaceEntry::local(tenant));
                self.saved(&owners)?;
                tracing::info!(namespace, tenant, "namespace created");
                Ok(())
            }
        }
    }

    /// Creates `namespace` for `tenant` with `replication` copies, or
    /// changes the replication of one `tenant` owns.
    pub fn create(
        &self,
        tenant: &str,
        namespace: &str,
        replication: u32,
        cluster_wide: bool,
    ) -> Result<NamespaceEntry, FabricError> {
        let mut owners = self.owners.lock();
        match owners.get(namespace) {
            Some(o) => o.check(tenant, namespace)?,
            None => self.room(&owners, tenant)?,
        }
        let e = NamespaceEntry {
            owner: tenant.to_string(),
            replication,
            cluster_wide,
            unclaimed: false,
            reassign_to: None,
        };
        if owners.get(namespace) != Some(&e) {
            owners.insert(namespace.to_string(), e.clone());
            self.saved(&owners)?;
            tracing::info!(namespace, tenant, replication, "namespace created or updated");
        }
        Ok(e)
    }

    /// Applies the cluster's namespace records (they win over local
    /// knowledge: owner and replication). Namespaces that were cluster-wide
    /// and lost their record keep their owner and fall back to one copy.
    /// A record that names another owner than this node's entry does
    /// not hand the entry over at once: the objects this node holds in it
    /// are the old owner's, so the entry is closed to everyone
    /// ([`NamespaceEntry::reassign_to`]) until the caller has dropped them
    /// and calls [`Self::finish_reassign`].
    pub fn apply_cluster<'a>(&self, records: impl IntoIterator<Item = &'a NamespaceRecord>) -> Applied {
        let mut owners = self.owners.lock();
        let mut out = Applied::default();
        let mut seen = std::collections::BTreeSet::new();
        for r in records {
            seen.insert(r.name.clone());
            if let Some(o) = owners.get_mut(&r.name)
                && o.owner != r.owner
            {
                let to = Some((r.owner.clone(), r.replication));
                if o.reassign_to != to {
                    tracing::warn!(namespace = %r.name, local = %o.owner, cluster = %r.owner,
                        "the cluster's record gives this namespace to another tenant; dropping the objects \
                         this node holds for the old owner before handing it over");
                    o.reassign_to = to;
                    out.reassigning.push(r.name.clone());
                }
                continue;
            }
            let e = NamespaceEntry {
                owner: r.owner.clone(),
                replication: r.replication,
                cluster_wide: true,
                unclaimed: false,
                reassign_to: None,
            };
            let old = owners.insert(r.name.clone(), e.clone());
            if old.as_ref() != Some(&e) {
                out.changed.push(r.name.clone());
            }
        }
        for (n, e) in owners.iter_mut() {
            if !seen.contains(n) {
                // A hand-over whose record went away: nothing to hand over
                // (what was dropped meanwhile is a cache's loss).
                e.reassign_to = None;
                if e.cluster_wide {
                    e.cluster_wide = false;
                    e.replication = 1;
                    out.changed.push(n.clone());
                }
            }
        }
        if !out.changed.is_empty()
            && let Err(e) = self.save(&owners)
        {
            tracing::warn!(error = %e, "saving namespace registry");
        }
        out
    }

    /// A write of `tenant`'s into `namespace` begins: the namespace must be
    /// its and open. Hold the guard until the object is stored.
    pub fn writing(&self, tenant: &str, namespace: &str) -> Result<Writing, FabricError> {
        let owners = self.owners.lock();
        match owners.get(namespace) {
            Some(o) => o.check(tenant, namespace)?,
            None => return Err(FabricError::NamespaceNotFound(namespace.into())),
        }
        *self.writers.lock().entry(namespace.to_string()).or_default() += 1;
        Ok(Writing {
            namespace: namespace.to_string(),
            writers: self.writers.clone(),
        })
    }

    /// Waits until no write is in flight in `namespace` (call once it is
    /// closed, so that none can begin).
    pub async fn writes_done(&self, namespace: &str) {
        while self.writers.lock().contains_key(namespace) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Marks `namespace` as made while etcd was unreachable (cluster
    /// mode): [`Self::unclaimed`] lists it until it is claimed.
    pub fn mark_unclaimed(&self, namespace: &str) {
        let mut owners = self.owners.lock();
        if let Some(e) = owners.get_mut(namespace)
            && !e.cluster_wide
            && !e.unclaimed
        {
            e.unclaimed = true;
            if let Err(err) = self.save(&owners) {
                tracing::warn!(error = %err, "saving namespace registry");
            }
        }
    }

    /// Namespaces made while etcd was unreachable and not claimed since,
    /// with their owner (kept across restarts).
    pub fn unclaimed(&self) -> Vec<(String, String)> {
        self.owners
            .lock()
            .iter()
            .filter(|(_, e)| e.unclaimed && !e.cluster_wide && e.reassign_to.is_none())
            .map(|(n, e)| (n.clone(), e.owner.clone()))
            .collect()
    }

    /// Whether `namespace` is closed for a hand-over to another owner.
    pub fn is_reassigning(&self, namespace: &str) -> bool {
        self.owners
            .lock()
            .get(namespace)
            .is_some_and(|e| e.reassign_to.is_some())
    }

    /// Hands a namespace [`Self::apply_cluster`] closed over to the owner
    /// the cluster's record names, once the objects this node held in it
    /// were dropped. False when it is no longer being handed over.
    pub fn finish_reassign(&self, namespace: &str) -> bool {
        let mut owners = self.owners.lock();
        let Some(e) = owners.get_mut(namespace) else {
            return false;
        };
        let Some((owner, replication)) = e.reassign_to.take() else {
            return false;
        };
        tracing::info!(namespace, from = %e.owner, to = %owner, "namespace handed over");
        *e = NamespaceEntry {
            owner,
            replication,
            cluster_wide: true,
            unclaimed: false,
            reassign_to: None,
        };
        if let Err(e) = self.save(&owners) {
            tracing::warn!(error = %e, "saving namespace registry");
        }
        true
    }

    /// For a read: the namespace must exist and belong to `tenant` (every
    /// read request asks: no copy of the entry is made).
    pub fn for_read(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        Self::readable(self.owners.lock().get(namespace), tenant, namespace).map(|_| ())
    }

    /// The namespace's entry, if `tenant` may read it.
    pub fn describe(&self, tenant: &str, namespace: &str) -> Result<NamespaceEntry, FabricError> {
        Self::readable(self.owners.lock().get(namespace), tenant, namespace).cloned()
    }

    fn readable<'a>(
        entry: Option<&'a NamespaceEntry>,
        tenant: &str,
        namespace: &str,
    ) -> Result<&'a NamespaceEntry, FabricError> {
        match entry {
            Some(o) => o.check(tenant, namespace).map(|()| o),
            None => Err(FabricError::NamespaceNotFound(namespace.into())),
        }
    }

    /// Whether `tenant` may see events of `namespace`.
    pub fn visible(&self, tenant: &str, namespace: &str) -> bool {
        self.owners
            .lock()
            .get(namespace)
            .is_some_and(|o| o.owner == tenant && o.reassign_to.is_none())
    }

    /// The owner of `namespace`, if known.
    pub fn owner(&self, namespace: &str) -> Option<String> {
        self.owners.lock().get(namespace).map(|o| o.owner.clone())
    }

    /// Copies per object in `namespace` (1 when unknown).
    pub fn replication(&self, namespace: &str) -> u32 {
        self.owners.lock().get(namespace).map_or(1, |o| o.replication)
    }

    /// The cluster-wide namespaces and their replication.
    pub fn cluster_wide(&self) -> Vec<(String, u32)> {
        self.owners
            .lock()
            .iter()
            .filter(|(_, e)| e.cluster_wide)
            .map(|(n, e)| (n.clone(), e.replication))
            .collect()
    }

    /// All namespaces.
    pub fn names(&self) -> Vec<String> {
        self.owners.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("namespaces");
        let r = Namespaces::load(Some(p.clone())).unwrap();
        assert!(matches!(r.for_read("a", "ns"), Err(FabricError::NamespaceNotFound(_))));
        r.for_write("a", "ns").unwrap();
        r.for_read("a", "ns").unwrap();
        assert!(matches!(
            r.for_write("b", "ns"),
            Err(FabricError::PermissionDenied { .. })
        ));
        r.create("a", "weights", 3, false).unwrap();
        assert!(matches!(
            r.create("b", "weights", 2, false),
            Err(FabricError::PermissionDenied { .. })
        ));
        let again = Namespaces::load(Some(p.clone())).unwrap();
        again.for_read("a", "ns").unwrap();
        assert_eq!(again.names(), vec!["ns".to_string(), "weights".to_string()]);
        assert_eq!(again.replication("weights"), 3);
        assert_eq!(again.replication("ns"), 1);
        assert_eq!(again.replication("unknown"), 1);
        assert_eq!(again.owner("weights").as_deref(), Some("a"));
        // Saved by a synced temp file renamed over the registry: none left.
        assert!(!p.with_extension("tmp").exists());
        // A file from an older node (two columns) still loads.
        std::fs::write(&p, "old\tt\n").unwrap();
        let old = Namespaces::load(Some(p)).unwrap();
        assert_eq!(old.describe("t", "old").unwrap(), NamespaceEntry::local("t"));
    }

    #[test]
    fn creation_is_bounded_in_all_and_per_tenant() {
        let r = Namespaces::load(None).unwrap().with_limits(4, 2);
        r.for_write("a", "a1").unwrap();
        r.create("a", "a2", 2, false).unwrap();
        for e in [
            r.for_write("a", "a3").unwrap_err(),
            r.create("a", "a3", 1, false).unwrap_err(),
        ] {
            assert!(e.to_string().contains("max-namespaces-per-tenant"), "{e}");
            assert_eq!(e.kind(), kvfabric_proto::ErrorKind::Capacity);
        }
        assert!(r.check_room("a", "a3").is_err());
        // What exists stays usable: writes, replication changes.
        r.for_write("a", "a1").unwrap();
        r.create("a", "a1", 3, false).unwrap();
        assert!(r.check_room("a", "a1").is_ok());
        r.for_write("b", "b1").unwrap();
        r.for_write("c", "c1").unwrap();
        let e = r.for_write("d", "d1").unwrap_err();
        assert!(e.to_string().contains("limits.max-namespaces)"), "{e}");
        assert_eq!(r.names().len(), 4);
    }

    #[tokio::test]
    async fn a_hand_over_waits_for_writes_in_flight_and_refuses_new_ones() {
        let r = Arc::new(Namespaces::load(None).unwrap());
        r.for_write("a", "kv").unwrap();
        let w = r.writing("a", "kv").unwrap();
        assert!(matches!(
            r.writing("b", "kv"),
            Err(FabricError::PermissionDenied { .. })
        ));
        assert!(matches!(r.writing("a", "none"), Err(FabricError::NamespaceNotFound(_))));
        let rec = NamespaceRecord {
            name: "kv".into(),
            owner: "b".into(),
            replication: 1,
            updated_at_ms: 0,
        };
        r.apply_cluster([&rec]);
        // Closed: no new write, by either tenant; a third is not told more.
        assert!(matches!(r.writing("a", "kv"), Err(FabricError::Reassigning(_))));
        assert!(matches!(r.writing("b", "kv"), Err(FabricError::Reassigning(_))));
        assert!(matches!(
            r.for_read("c", "kv"),
            Err(FabricError::PermissionDenied { .. })
        ));
        // The write in flight holds the purge back until it is done.
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.writes_done("kv").await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "the purge did not wait for the write in flight");
        drop(w);
        waiter.await.unwrap();
        assert!(r.finish_reassign("kv"));
        drop(r.writing("b", "kv").unwrap());
    }

    #[test]
    fn namespaces_made_during_an_outage_stay_listed_until_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("namespaces");
        let r = Namespaces::load(Some(p.clone())).unwrap();
        r.for_write("a", "late").unwrap();
        r.for_write("a", "plain").unwrap();
        r.mark_unclaimed("late");
        assert_eq!(r.unclaimed(), vec![("late".to_string(), "a".to_string())]);
        // Kept across a restart.
        let again = Namespaces::load(Some(p.clone())).unwrap();
        assert_eq!(again.unclaimed(), vec![("late".to_string(), "a".to_string())]);
        again.for_read("a", "late").unwrap();
        // Claimed: off the list, cluster-wide, and saved so.
        again.create("a", "late", 1, true).unwrap();
        assert!(again.unclaimed().is_empty());
        assert!(Namespaces::load(Some(p)).unwrap().unclaimed().is_empty());
    }

    #[test]
    fn cluster_records_win_and_retire() {
        let r = Namespaces::load(None).unwrap();
        r.for_write("a", "kv").unwrap();
        let rec = |name: &str, owner: &str, replication| NamespaceRecord {
            name: name.into(),
            owner: owner.into(),
            replication,
            updated_at_ms: 0,
        };
        let recs = [rec("kv", "a", 2), rec("w", "b", 3)];
        assert_eq!(r.apply_cluster(&recs).changed, vec!["kv".to_string(), "w".to_string()]);
        assert_eq!(
            r.apply_cluster(&recs),
            Applied::default(),
            "applying twice changes nothing"
        );
        assert_eq!(r.replication("kv"), 2);
        assert!(r.describe("b", "w").unwrap().cluster_wide);
        // The record of "w" is deleted: the namespace stays, replication 1.
        assert_eq!(r.apply_cluster(&recs[..1]).changed, vec!["w".to_string()]);
        assert_eq!(r.describe("b", "w").unwrap(), NamespaceEntry::local("b"));
    }

    #[test]
    fn a_record_naming_another_owner_closes_the_namespace_until_it_is_emptied() {
        let r = Namespaces::load(None).unwrap();
        r.for_write("a", "kv").unwrap();
        let rec = NamespaceRecord {
            name: "kv".into(),
            owner: "b".into(),
            replication: 2,
            updated_at_ms: 0,
        };
        let applied = r.apply_cluster([&rec]);
        assert_eq!(applied.reassigning, vec!["kv".to_string()]);
        assert!(applied.changed.is_empty());
        assert!(r.apply_cluster([&rec]).reassigning.is_empty(), "reported once");
        // Nobody may use it meanwhile: not the old owner, not the new one.
        for t in ["a", "b"] {
            for e in [
                r.for_read(t, "kv").unwrap_err(),
                r.for_write(t, "kv").unwrap_err(),
                r.create(t, "kv", 1, true).unwrap_err(),
            ] {
                assert!(matches!(e, FabricError::Reassigning(_)), "{e}");
                assert_eq!(e.kind(), kvfabric_proto::ErrorKind::Unavailable);
            }
            assert!(!r.visible(t, "kv"));
        }
        assert!(r.finish_reassign("kv"));
        assert!(!r.finish_reassign("kv"));
        r.for_read("b", "kv").unwrap();
        assert!(matches!(
            r.for_read("a", "kv"),
            Err(FabricError::PermissionDenied { .. })
        ));
        assert_eq!(r.replication("kv"), 2);
        // A hand-over whose record goes away is called off.
        r.for_write("a", "other").unwrap();
        let rec2 = NamespaceRecord {
            name: "other".into(),
            ..rec.clone()
        };
        assert_eq!(r.apply_cluster([&rec, &rec2]).reassigning, vec!["other".to_string()]);
        r.apply_cluster([&rec]);
        r.for_read("a", "other").unwrap();
        assert!(!r.finish_reassign("other"));
    }
}
