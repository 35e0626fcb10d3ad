//! Object placement in cluster mode: **weighted rendezvous hashing**
//! (highest random weight). Every (node, object) pair gets a score from a
//! hash of both; an object's owners are the `replicas` nodes with the
//! highest scores. With the score `-weight / ln(u)`, `u` the pair's hash
//! mapped into (0, 1), a node is the first owner of a share of the objects
//! proportional to its weight (its capacity), and
//!
//! - a node leaving moves only the objects it owned (each to the node that
//!   was next in its order), a node joining takes only objects it now
//!   scores highest for: nothing else moves;
//! - every client computes the same owners from the same membership, with
//!   no coordination and no table to distribute.
//!
//! Cost: one 64-bit mix per node per object (the object's hash is computed
//! once). [`Placement`] is built from the serving members and shared.

use std::fmt;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Why a membership cannot be placed over.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// A node's weight is not a positive finite number.
    #[error("node {node}: weight must be a positive finite number, got {weight}")]
    BadWeight {
        /// The node.
        node: String,
        /// Its weight.
        weight: f64,
    },
    /// Two members share an id.
    #[error("node id {0} appears twice in the membership")]
    DuplicateNode(String),
    /// A node id is empty.
    #[error("a node id is empty")]
    EmptyNode,
}

#[derive(Clone, Debug)]
struct Member {
    id: String,
    seed: u64,
    weight: f64,
}

/// The owners of every object for one membership (see the module doc).
#[derive(Clone, Default)]
pub struct Placement {
    members: Vec<Member>,
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.members.iter().map(|m| (&m.id, m.weight)))
            .finish()
    }
}

/// The hash of an object, computed once for all nodes.
pub fn object_hash(namespace: &str, key: &[u8]) -> u64 {
    let ns = xxh3_64_with_seed(namespace.as_bytes(), 0x6b76_6661_6272_6963);
    xxh3_64_with_seed(key, ns)
}

/// splitmix64's finaliser: a bijective mix of a node's seed and an object's hash.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Placement {
    /// A placement over `(node id, weight)` members (weights: relative
    /// capacities, e.g. bytes of the tier objects live in).
    pub fn new<S: Into<String>>(members: impl IntoIterator<Item = (S, f64)>) -> Result<Self, PlacementError> {
        let mut out: Vec<Member> = Vec::new();
        for (id, weight) in members {
            let id = id.into();
            if id.is_empty() {
                return Err(PlacementError::EmptyNode);
            }
            if !(weight.is_finite() && weight > 0.0) {
                return Err(PlacementError::BadWeight { node: id, weight });
            }
            if out.iter().any(|m| m.id == id) {
                return Err(PlacementError::DuplicateNode(id));
            }
            let seed = xxh3_64_with_seed(id.as_bytes(), 0x6e6f_6465);
            out.push(Member { id, seed, weight });
        }
        // Order does not affect the owners; sorting makes Debug stable.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Placement { members: out })
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member ids, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = &str> + '_ {
        self.members.iter().map(|m| m.id.as_str())
    }

    /// Node `i`'s score for the object hashed `h`.
    #[inline]
    fn score(m: &Member, h: u64) -> f64 {
        // u in (0, 1): 53 random bits, never 0 or 1.
        let u = ((mix(m.seed ^ h) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -m.weight / u.ln()
    }

    /// The owners of the object hashed `h` ([`object_hash`]), best first:
    /// at most `replicas` distinct nodes.
    pub fn owners_of_hash(&self, h: u64, replicas: usize) -> Vec<&str> {
        let r = replicas.min(self.members.len());
        if r == 0 {
            return Vec::new();
        }
        // Keep the best r in a small sorted list (r is 1-3 in practice).
        let mut best: Vec<(f64, usize)> = Vec::with_capacity(r + 1);
        for (i, m) in self.members.iter().enumerate() {
            let s = Self::score(m, h);
            if best.len() == r && s <= best[r - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(b, _)| b >= s);
            best.insert(at, (s, i));
            best.truncate(r);
        }
        best.into_iter().map(|(_, i)| self.members[i].id.as_str()).collect()
    }

    /// The owners of `namespace`/`key`, best first.
    pub fn owners(&self, namespace: &str, key: &[u8], replicas: usize) -> Vec<&str> {
        self.owners_of_hash(object_hash(namespace, key), replicas)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn equal(n: usize) -> Placement {
        Placement::new((0..n).map(|i| (format!("node-{i}"), 1.0))).unwrap()
    }

    fn counts(p: &Placement, keys: usize, replicas: usize) -> HashMap<String, usize> {
        let mut c: HashMap<String, usize> = p.nodes().map(|n| (n.to_string(), 0)).collect();
        for k in 0..keys {
            for o in p.owners("ns", format!("key-{k}").as_bytes(), replicas) {
                *c.get_mut(o).unwrap() += 1;
            }
        }
        c
    }

    #[test]
    fn ten_thousand_objects_spread_within_ten_percent() {
        for (nodes, replicas) in [(3, 1), (5, 1), (5, 2), (4, 3)] {
            let p = equal(nodes);
            let c = counts(&p, 10_000, replicas);
            let mean = 10_000.0 * replicas as f64 / nodes as f64;
            for (n, &k) in &c {
                let dev = (k as f64 - mean).abs() / mean;
                assert!(dev <= 0.10, "{nodes} nodes, r={replicas}: {n} has {k}, mean {mean:.0}");
            }
        }
    }

    #[test]
    fn weights_set_the_share() {
        let p = Placement::new([("small", 1.0), ("big", 3.0)]).unwrap();
        let c = counts(&p, 20_000, 1);
        let share = c["big"] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "big's share {share}");
    }

    #[test]
    fn a_leaving_node_moves_only_its_objects_and_a_joining_one_only_takes() {
        let before = equal(5);
        let after = Placement::new((0..5).filter(|&i| i != 2).map(|i| (format!("node-{i}"), 1.0))).unwrap();
        let grown = equal(6);
        let (mut moved_leave, mut moved_join) = (0, 0);
        for k in 0..10_000 {
            let key = format!("key-{k}");
            let b = before.owners("ns", key.as_bytes(), 2);
            let a = after.owners("ns", key.as_bytes(), 2);
            if b.contains(&"node-2") {
                // The survivor keeps its place; the next in order fills in.
                let kept: Vec<&&str> = b.iter().filter(|n| **n != "node-2").collect();
                assert!(a.contains(kept[0]));
                moved_leave += 1;
            } else {
                assert_eq!(a, b, "{key} moved though its owners stayed");
            }
            let g = grown.owners("ns", key.as_bytes(), 2);
            if g != b {
                assert!(g.contains(&"node-5"), "{key} moved between old nodes");
                moved_join += 1;
            }
        }
        // node-2 was an owner of ~2/5 of the objects; node-5 takes ~2/6.
        assert!((3_500..4_500).contains(&moved_leave), "{moved_leave}");
        assert!((2_900..3_800).contains(&moved_join), "{moved_join}");
    }

    #[test]
    fn bad_memberships_are_errors() {
        assert_eq!(
            Placement::new([("a", 1.0), ("a", 2.0)]).unwrap_err(),
            PlacementError::DuplicateNode("a".into())
        );
        assert!(matches!(
            Placement::new([("a", 0.0)]).unwrap_err(),
            PlacementError::BadWeight { .. }
        ));
        assert!(matches!(
            Placement::new([("a", f64::NAN)]).unwrap_err(),
            PlacementError::BadWeight { .. }
        ));
        assert_eq!(Placement::new([("", 1.0)]).unwrap_err(), PlacementError::EmptyNode);
        let empty = Placement::new(Vec::<(String, f64)>::new()).unwrap();
        assert!(empty.owners("ns", b"k", 2).is_empty());
    }

    proptest! {
        /// Owners are distinct, at most `r`, the same whatever order the
        /// members were listed in, and the first `r` of the first `r + 1`.
        #[test]
        fn owners_are_consistent(
            weights in proptest::collection::vec(0.1f64..10.0, 1..12),
            key in proptest::collection::vec(any::<u8>(), 1..64),
            r in 1usize..5,
        ) {
            let members: Vec<(String, f64)> = weights.iter().enumerate().map(|(i, &w)| (format!("n{i}"), w)).collect();
            let p = Placement::new(members.clone()).unwrap();
            let mut rev = members.clone();
            rev.reverse();
            let q = Placement::new(rev).unwrap();
            let o = p.owners("ns", &key, r);
            prop_assert_eq!(o.len(), r.min(members.len()));
            let mut d = o.clone();
            d.sort();
            d.dedup();
            prop_assert_eq!(d.len(), o.len());
            prop_assert_eq!(&o, &q.owners("ns", &key, r));
            let more = p.owners("ns", &key, r + 1);
            prop_assert_eq!(&more[..o.len()], &o[..]);
        }
    }
}
