//! The extent allocator shared by the host arena, the disk files and GPU
//! memory: best-fit over free ranges with immediate coalescing, all sizes
//! rounded up to a power-of-two alignment unit. Deterministic (lowest offset
//! among equal sizes), O(log n) per operation, and able to re-claim specific
//! extents when an index is recovered after a restart.

use std::collections::{BTreeMap, BTreeSet};

/// A contiguous, aligned range `[offset, offset + len)` inside a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    /// Start, a multiple of the allocator's alignment.
    pub offset: u64,
    /// Length, a multiple of the allocator's alignment.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Best-fit extent allocator with coalescing.
#[derive(Debug, Clone)]
pub struct ExtentAllocator {
    align: u64,
    capacity: u64,
    used: u64,
    /// Free ranges keyed by offset, value = length.
    by_offset: BTreeMap<u64, u64>,
    /// Free ranges ordered by (length, offset) for best fit.
    by_size: BTreeSet<(u64, u64)>,
}

impl ExtentAllocator {
    /// An allocator over `capacity` bytes (rounded down to `align`), with all
    /// extents aligned to `align`, which must be a power of two.
    pub fn new(capacity: u64, align: u64) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let capacity = capacity / align * align;
        let mut a = Self {
            align,
            capacity,
            used: 0,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    /// Alignment unit.
    pub fn align(&self) -> u64 {
        self.align
    }
    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    /// Bytes in allocated extents.
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Bytes free (possibly fragmented).
    pub fn free(&self) -> u64 {
        self.capacity - self.used
    }
    /// Largest single extent that could be allocated now.
    pub fn largest_free(&self) -> u64 {
        self.by_size.iter().next_back().map(|&(l, _)| l).unwrap_or(0)
    }
    /// Bytes an object of `size` occupies (at least one unit).
    pub fn footprint(&self, size: u64) -> u64 {
        size.max(1).div_ceil(self.align) * self.align
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
    }

    /// Allocates an extent for `size` bytes, or `None` if no free range fits.
    pub fn alloc(&mut self, size: u64) -> Option<Extent> {
        let need = self.footprint(size);
        let &(len, offset) = self.by_size.range((need, 0)..).next()?;
        self.remove_free(offset, len);
        if len > need {
            self.insert_free(offset + need, len - need);
        }
        self.used += need;
        Some(Extent { offset, len: need })
    }

    /// Like [`ExtentAllocator::alloc`] but with the tier's error: `TooLarge`
    /// if `size` can never fit, `Full` if it cannot fit now.
    pub fn alloc_for(&mut self, tier: crate::TierKind, size: u64) -> crate::TierResult<Extent> {
        let need = self.footprint(size);
        if need > self.capacity {
            return Err(crate::TierError::TooLarge {
                tier,
                size: need,
                capacity: self.capacity,
            });
        }
        self.alloc(need).ok_or(crate::TierError::Full {
            tier,
            needed: need,
            available: self.free(),
            capacity: self.capacity,
        })
    }

    /// Returns an extent. Panics on a double free or a foreign extent, which
    /// would be a bug in the caller's bookkeeping, never client input.
    pub fn free_extent(&mut self, ext: Extent) {
        assert!(ext.len > 0 && ext.offset.is_multiple_of(self.align) && ext.len.is_multiple_of(self.align));
        assert!(ext.end() <= self.capacity, "extent {ext:?} outside allocator");
        let (mut offset, mut len) = (ext.offset, ext.len);
        if let Some((&po, &pl)) = self.by_offset.range(..offset).next_back() {
            assert!(po + pl <= offset, "double free of {ext:?}");
            if po + pl == offset {
                self.remove_free(po, pl);
                offset = po;
                len += pl;
            }
        }
        if let Some((&no, &nl)) = self.by_offset.range(offset..).next() {
            assert!(no >= ext.end(), "double free of {ext:?}");
            if no == ext.end() {
                self.remove_free(no, nl);
                len += nl;
            }
        }
        self.insert_free(offset, len);
        self.used -= ext.len;
    }

    /// Claims a specific extent (index recovery). Returns `false` if any part
    /// of it is already allocated or outside the region.
    pub fn reserve(&mut self, ext: Extent) -> bool {
        if ext.len == 0
            || !ext.offset.is_multiple_of(self.align)
            || !ext.len.is_multiple_of(self.align)
            || ext.end() > self.capacity
        {
            return false;
        }
        let Some((&fo, &fl)) = self.by_offset.range(..=ext.offset).next_back() else {
            return false;
        };
        if fo + fl < ext.end() {
            return false;
        }
        self.remove_free(fo, fl);
        if fo < ext.offset {
            self.insert_free(fo, ext.offset - fo);
        }
        if fo + fl > ext.end() {
            self.insert_free(ext.end(), fo + fl - ext.end());
        }
        self.used += ext.len;
        true
    }

    /// Number of free ranges (fragmentation gauge).
    pub fn free_ranges(&self) -> usize {
        self.by_offset.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alloc_free_coalesces() {
        let mut a = ExtentAllocator::new(16 * 4096, 4096);
        let x = a.alloc(4096).unwrap();
        let y = a.alloc(5000).unwrap();
        let z = a.alloc(1).unwrap();
        assert_eq!(y.len, 8192);
        assert_eq!(a.used(), 4 * 4096);
        a.free_extent(y);
        a.free_extent(x);
        a.free_extent(z);
        assert_eq!(a.used(), 0);
        assert_eq!(a.free_ranges(), 1);
        assert_eq!(a.largest_free(), 16 * 4096);
    }

    #[test]
    fn reserve_claims_exact_ranges() {
        let mut a = ExtentAllocator::new(8 * 4096, 4096);
        assert!(a.reserve(Extent {
            offset: 4096,
            len: 8192
        }));
        assert!(!a.reserve(Extent {
            offset: 8192,
            len: 4096
        }));
        assert!(!a.reserve(Extent { offset: 100, len: 4096 }));
        assert_eq!(a.used(), 8192);
        assert_eq!(a.alloc(4096).unwrap().offset, 0);
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = ExtentAllocator::new(4096 * 2, 4096);
        assert!(a.alloc(8192).is_some());
        assert!(a.alloc(1).is_none());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
        Reserve(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u64..40_000).prop_map(Op::Alloc),
            2 => any::<usize>().prop_map(Op::Free),
            1 => (0u64..64, 1u64..8).prop_map(|(o, l)| Op::Reserve(o * 1024, l * 1024)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Against a naive byte-map model: no two live extents overlap, used
        /// bytes equal the sum of live extents, and freeing everything
        /// coalesces back to one range.
        #[test]
        fn allocator_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
            const CAP: u64 = 64 * 1024;
            let mut a = ExtentAllocator::new(CAP, 1024);
            let mut live: Vec<Extent> = Vec::new();
            let mut owner = vec![false; (CAP / 1024) as usize];
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let fits = {
                            // model: is there a run of free units big enough?
                            let need = n.div_ceil(1024) as usize;
                            let mut run = 0; let mut ok = false;
                            for &o in &owner { if o { run = 0 } else { run += 1; if run >= need { ok = true; break } } }
                            ok
                        };
                        match a.alloc(n) {
                            Some(e) => {
                                prop_assert!(e.len >= n && e.len % 1024 == 0 && e.end() <= CAP);
                                for u in e.offset / 1024..e.end() / 1024 {
                                    prop_assert!(!owner[u as usize], "overlap at unit {}", u);
                                    owner[u as usize] = true;
                                }
                                live.push(e);
                            }
                            None => prop_assert!(!fits, "alloc({}) failed but a run was free", n),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let e = live.swap_remove(i % live.len());
                        for u in e.offset / 1024..e.end() / 1024 { owner[u as usize] = false; }
                        a.free_extent(e);
                    }
                    Op::Free(_) => {}
                    Op::Reserve(o, l) => {
                        let e = Extent { offset: o, len: l };
                        let free = e.end() <= CAP && (o / 1024..e.end() / 1024).all(|u| !owner[u as usize]);
                        prop_assert_eq!(a.reserve(e), free);
                        if free {
                            for u in o / 1024..e.end() / 1024 { owner[u as usize] = true; }
                            live.push(e);
                        }
                    }
                }
                let model_used: u64 = live.iter().map(|e| e.len).sum();
                prop_assert_eq!(a.used(), model_used);
            }
            for e in live.drain(..) { a.free_extent(e); }
            prop_assert_eq!(a.used(), 0);
            prop_assert_eq!(a.free_ranges(), 1);
        }
    }
}
