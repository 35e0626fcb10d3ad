//! The namespace registry: which namespaces exist and which tenant owns
//! each. A namespace comes into being on its owner's first put; reads of a
//! namespace nobody created are `NOT_FOUND`; another tenant's namespace is
//! `PERMISSION_DENIED`. Persisted as a small text file (`namespaces` in the
//! data directory, `name<TAB>owner` per line, replaced atomically).

use super::FabricError;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";

/// Registry of namespaces and owners.
#[derive(Debug)]
pub struct Namespaces {
    path: Option<PathBuf>,
    owners: Mutex<BTreeMap<String, String>>,
}

impl Namespaces {
    /// Loads the registry from `path` (or an in-memory one for `None`).
    pub fn load(path: Option<PathBuf>) -> std::io::Result<Self> {
        let mut owners = BTreeMap::new();
        if let Some(p) = &path {
            match std::fs::read_to_string(p) {
                Ok(text) => {
                    for line in text.lines() {
                        if let Some((ns, owner)) = line.split_once('\t') {
                            owners.insert(ns.to_string(), owner.to_string());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            path,
            owners: Mutex::new(owners),
        })
    }

    fn save(&self, owners: &BTreeMap<String, String>) -> std::io::Result<()> {
        let Some(p) = &self.path else { return Ok(()) };
        let tmp = p.with_extension("tmp");
        let text: String = owners.iter().map(|(n, o)| format!("{n}\t{o}\n")).collect();
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, p)
    }

    /// Adds namespaces found in recovered data (owner: default tenant) that
    /// the registry does not know.
    pub fn adopt(&self, names: impl IntoIterator<Item = String>) -> std::io::Result<()> {
        let mut owners = self.owners.lock();
        let mut changed = false;
        for n in names {
            if let std::collections::btree_map::Entry::Vacant(e) = owners.entry(n) {
                e.insert(DEFAULT_TENANT.to_string());
                changed = true;
            }
        }
        if changed { self.save(&owners) } else { Ok(()) }
    }

    /// For a write: creates the namespace for `tenant` if new, else checks
    /// the tenant owns it.
    pub fn for_write(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        let mut owners = self.owners.lock();
        match owners.get(namespace) {
            Some(o) if o == tenant => Ok(()),
            Some(_) => Err(FabricError::PermissionDenied {
                tenant: tenant.into(),
                namespace: namespace.into(),
            }),
            None => {
                owners.insert(namespace.to_string(), tenant.to_string());
                self.save(&owners)
                    .map_err(|e| FabricError::Internal(format!("saving namespace registry: {e}")))?;
                tracing::info!(namespace, tenant, "namespace created");
                Ok(())
            }
        }
    }

    /// For a read: the namespace must exist and belong to `tenant`.
    pub fn for_read(&self, tenant: &str, namespace: &str) -> Result<(), FabricError> {
        match self.owners.lock().get(namespace) {
            Some(o) if o == tenant => Ok(()),
            Some(_) => Err(FabricError::PermissionDenied {
                tenant: tenant.into(),
                namespace: namespace.into(),
            }),
            None => Err(FabricError::NamespaceNotFound(namespace.into())),
        }
    }

    /// Whether `tenant` may see events of `namespace`.
    pub fn visible(&self, tenant: &str, namespace: &str) -> bool {
        self.owners.lock().get(namespace).is_some_and(|o| o == tenant)
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
        let again = Namespaces::load(Some(p)).unwrap();
        again.for_read("a", "ns").unwrap();
        assert_eq!(again.names(), vec!["ns".to_string()]);
    }
}
