//! The index of the slot-based tiers (host arena, GPU memory): key to an
//! `Arc`'d slot guard. Readers clone the guard and copy outside the lock;
//! a replaced or removed slot is dropped (and its extent freed) once its last
//! reader finishes.

use crate::{BlockHeader, ObjectKey};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// A slot that knows its object's header.
pub(crate) trait HasHeader {
    fn header(&self) -> &BlockHeader;
}

/// Key -> slot guard.
#[derive(Debug)]
pub(crate) struct SlotIndex<S>(RwLock<HashMap<ObjectKey, Arc<S>>>);

impl<S: HasHeader> SlotIndex<S> {
    pub(crate) fn new() -> Self {
        Self(RwLock::new(HashMap::new()))
    }
    pub(crate) fn get(&self, key: &ObjectKey) -> Option<Arc<S>> {
        self.0.read().get(key).cloned()
    }
    /// Publishes a slot; the one it replaces is dropped outside the lock.
    pub(crate) fn insert(&self, key: &ObjectKey, slot: Arc<S>) {
        let old = self.0.write().insert(key.clone(), slot);
        drop(old);
    }
    pub(crate) fn remove(&self, key: &ObjectKey) -> bool {
        let old = self.0.write().remove(key);
        old.is_some()
    }
    pub(crate) fn contains(&self, key: &ObjectKey) -> bool {
        self.0.read().contains_key(key)
    }
    pub(crate) fn len(&self) -> usize {
        self.0.read().len()
    }
    pub(crate) fn headers(&self) -> Vec<(ObjectKey, BlockHeader)> {
        self.0
            .read()
            .iter()
            .map(|(k, s)| (k.clone(), s.header().clone()))
            .collect()
    }
}
