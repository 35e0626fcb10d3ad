//! The records kvfabric keeps in etcd: one [`Member`] per live node and the
//! cluster's [`ClusterRecord`], both JSON with kebab-case fields. Decoding
//! tolerates unknown fields (a newer node may add some) but checks that a
//! member record's node and cluster ids match the key it is stored under.

use super::ClusterError;
use serde::{Deserialize, Serialize};

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Registered, not yet serving requests.
    Joining,
    /// Listening and serving.
    Serving,
    /// Leaving: takes no new data.
    Draining,
}

impl MemberState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Serving => "serving",
            MemberState::Draining => "draining",
        }
    }
}

/// Capacity and use of one tier of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TierUsage {
    /// `hbm`, `host`, `disk` or `object`.
    pub tier: String,
    /// Capacity in bytes (`u64::MAX` = unbounded).
    pub capacity_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Objects stored.
    pub objects: u64,
}

/// One node's membership record, at `/kvfabric/<cluster-id>/members/<node-id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Member {
    /// Node id (the last key segment).
    pub node_id: String,
    /// Cluster id (the key's second segment).
    pub cluster_id: String,
    /// gRPC endpoint clients and peers use, `http://HOST:PORT` (`https://` with TLS on).
    pub endpoint: String,
    /// Prometheus endpoint, `http://HOST:PORT/metrics`.
    pub metrics_endpoint: String,
    /// Life-cycle state.
    pub state: MemberState,
    /// Tiers, fastest first.
    pub tiers: Vec<TierUsage>,
    /// When the node process started, ms since the Unix epoch (node's clock).
    pub started_at_ms: u64,
    /// When the record was last written, ms since the Unix epoch (node's clock).
    pub updated_at_ms: u64,
    /// kvfabric version of the node.
    pub version: String,
    /// Unique per node process: tells a node's own earlier record (to
    /// replace after etcd lost its lease) from another process's.
    pub incarnation: String,
    /// Objects this node is responsible for that have fewer copies than
    /// their namespace's replication asks for, as its last repair pass
    /// left them (0 from nodes that predate the field).
    #[serde(default)]
    pub under_replicated: u64,
    /// The placement epoch ([`placement_epoch`](crate::client::placement_epoch)
    /// of the serving set) under which this node's last repair pass left
    /// every object it holds at all of its owners; 0 while a pass has not
    /// (or from nodes that predate the field). Once every serving and
    /// draining node reports the current epoch, the hand-off after a
    /// membership change is done ([`Membership::settled_epoch`](super::Membership::settled_epoch)).
    #[serde(default)]
    pub settled: u64,
}

impl Member {
    /// JSON bytes for etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a member record always serializes")
    }

    /// Decodes the value stored at `key` and checks it against the key.
    pub fn decode(key: &str, value: &[u8]) -> Result<Member, ClusterError> {
        let malformed = |reason: String| ClusterError::Malformed {
            key: key.to_string(),
            reason,
        };
        let m: Member = serde_json::from_slice(value).map_err(|e| malformed(e.to_string()))?;
        let expected = super::member_key(&m.cluster_id, &m.node_id);
        if expected != key {
            return Err(malformed(format!(
                "record is for node {:?} of cluster {:?} (key would be {expected})",
                m.node_id, m.cluster_id
            )));
        }
        Ok(m)
    }

    /// Total used bytes over all tiers.
    pub fn used_bytes(&self) -> u64 {
        self.tiers.iter().map(|t| t.used_bytes).sum()
    }
}

/// The cluster's identity record, at `/kvfabric/<cluster-id>/cluster`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterRecord {
    /// Cluster id.
    pub id: String,
    /// Node that created the record.
    pub created_by: String,
    /// When, ms since the Unix epoch (that node's clock).
    pub created_at_ms: u64,
    /// kvfabric version of that node.
    pub version: String,
}

impl ClusterRecord {
    /// JSON bytes for etcd.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a cluster record always serializes")
    }

    /// Decodes the value stored at `key`.
    pub fn decode(key: &str, value: &[u8]) -> Result<ClusterRecord, ClusterError> {
        serde_json::from_slice(value).map_err(|e| ClusterError::Malformed {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> Member {
        Member {
            node_id: "n1".into(),
            cluster_id: "c".into(),
            endpoint: "http://127.0.0.1:7000".into(),
            metrics_endpoint: "http://127.0.0.1:7001/metrics".into(),
            state: MemberState::Serving,
            tiers: vec![TierUsage {
                tier: "host".into(),
                capacity_bytes: 1 << 20,
                used_bytes: 4096,
                objects: 1,
            }],
            started_at_ms: 1,
            updated_at_ms: 2,
            version: "0.1.0".into(),
            incarnation: "1-1-0".into(),
            under_replicated: 0,
            settled: 7,
        }
    }

    #[test]
    fn member_roundtrip_and_format() {
        let m = member();
        let bytes = m.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"node-id\":\"n1\""), "{text}");
        assert!(text.contains("\"state\":\"serving\""), "{text}");
        assert!(text.contains("\"used-bytes\":4096"), "{text}");
        assert_eq!(Member::decode("/kvfabric/c/members/n1", &bytes).unwrap(), m);
        assert_eq!(m.used_bytes(), 4096);
        // Unknown fields from a newer node are ignored.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["future-field"] = serde_json::json!(1);
        assert_eq!(
            Member::decode("/kvfabric/c/members/n1", &serde_json::to_vec(&v).unwrap()).unwrap(),
            m
        );
    }

    #[test]
    fn malformed_members_are_rejected() {
        let m = member();
        let e = Member::decode("/kvfabric/c/members/n2", &m.encode()).unwrap_err();
        assert!(
            matches!(&e, ClusterError::Malformed { reason, .. } if reason.contains("\"n1\"")),
            "{e}"
        );
        assert!(Member::decode("/kvfabric/other/members/n1", &m.encode()).is_err());
        assert!(Member::decode("/kvfabric/c/members/n1", b"not json").is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&m.encode()).unwrap();
        v["state"] = serde_json::json!("sleeping");
        let e = Member::decode("/kvfabric/c/members/n1", &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("sleeping"), "{e}");
    }

    #[test]
    fn cluster_record_roundtrip() {
        let r = ClusterRecord {
            id: "c".into(),
            created_by: "n1".into(),
            created_at_ms: 5,
            version: "0.1.0".into(),
        };
        assert_eq!(ClusterRecord::decode("k", &r.encode()).unwrap(), r);
        assert!(ClusterRecord::decode("k", b"{}").is_err());
    }
}
