//! Typed errors of the storage engine. The fabric maps them to its public
//! error kinds (and from there to gRPC status codes) in one place.

use crate::TierKind;

/// Result alias for tier operations.
pub type TierResult<T> = Result<T, TierError>;

/// What can go wrong inside a tier or the tier stack.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The tier has no room for the object right now (eviction may make room).
    #[error("{tier} tier is full: need {needed} bytes, {available} free of {capacity}")]
    Full {
        /// Tier that is full.
        tier: TierKind,
        /// Bytes the object needs in this tier.
        needed: u64,
        /// Bytes free right now.
        available: u64,
        /// Tier capacity.
        capacity: u64,
    },
    /// The object can never fit in this tier.
    #[error("object of {size} bytes exceeds the {tier} tier's capacity of {capacity} bytes")]
    TooLarge {
        /// Tier.
        tier: TierKind,
        /// Object size.
        size: u64,
        /// Tier capacity.
        capacity: u64,
    },
    /// Every tier that could take the object is full of leased objects.
    #[error("capacity exhausted: no tier can take an object of {size} bytes ({detail})")]
    CapacityExhausted {
        /// Object size.
        size: u64,
        /// Per-tier explanation.
        detail: String,
    },
    /// Stored bytes failed verification (checksum, header or key mismatch).
    #[error("corrupt object {key} in {tier} tier: {reason}")]
    Corrupt {
        /// Tier that held it.
        tier: TierKind,
        /// Key, printable.
        key: String,
        /// What failed.
        reason: String,
    },
    /// The durability asked for needs a tier this node does not have.
    #[error("durability {durability} needs a {needed} tier, which this node does not have")]
    DurabilityUnavailable {
        /// Durability requested.
        durability: &'static str,
        /// Tier kind needed.
        needed: TierKind,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The persistent index failed.
    #[error("disk index: {0}")]
    Index(String),
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// A tier's configuration is invalid.
    #[error("invalid tier configuration: {0}")]
    Config(String),
    /// The caller asked for something inconsistent (a commit whose header
    /// does not match its reservation, say).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The object's header could not be stored so that it decodes again
    /// (a layout string too long, say); nothing was stored.
    #[error("object {key} not stored: {source}")]
    InvalidHeader {
        /// Key, printable.
        key: String,
        /// What is wrong with the header.
        #[source]
        source: crate::HeaderError,
    },
    /// The tier cannot serve (device lost, I/O thread gone, GPU error).
    #[error("{0}")]
    Unavailable(String),
}

impl TierError {
    /// Checks that `header` can be stored for `key` ([`crate::BlockHeader::check`]).
    pub fn check_header(key: &crate::ObjectKey, header: &crate::BlockHeader) -> TierResult<()> {
        header.check(key).map_err(|source| TierError::InvalidHeader {
            key: key.to_string(),
            source,
        })
    }

    /// Builds an [`TierError::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TierError::Io {
            context: context.into(),
            source,
        }
    }
}
