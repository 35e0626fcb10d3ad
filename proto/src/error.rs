//! Public error kinds, which tell a caller what to do, and their mapping to
//! and from gRPC status codes. This is the only place that mapping lives.

use tonic::{Code, Status};

/// What kind of failure happened, from the caller's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or out of bounds: fix it.
    InvalidArgument,
    /// The namespace (or another named thing) does not exist.
    NotFound,
    /// Out of capacity, or over a size limit: back off or shrink.
    Capacity,
    /// Stored data failed verification.
    DataCorruption,
    /// Transient: retry.
    Unavailable,
    /// The tenant may not use this namespace, or the caller's token does
    /// not allow the call.
    PermissionDenied,
    /// The node authenticates callers and this one presented no valid
    /// token: configure one.
    Unauthenticated,
    /// The node cannot do this in its configuration (e.g. no disk tier).
    FailedPrecondition,
    /// The request was cancelled or the stream cut.
    Aborted,
    /// A bug or unexpected failure.
    Internal,
}

/// Builds the gRPC status for an error of `kind`.
pub fn status(kind: ErrorKind, message: impl Into<String>) -> Status {
    let code = match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Capacity => Code::ResourceExhausted,
        ErrorKind::DataCorruption => Code::DataLoss,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, message)
}

/// The kind a client should act on for a status it received.
pub fn from_status(status: &Status) -> ErrorKind {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::ResourceExhausted => ErrorKind::Capacity,
        Code::DataLoss => ErrorKind::DataCorruption,
        Code::Unavailable | Code::DeadlineExceeded => ErrorKind::Unavailable,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::Aborted | Code::Cancelled => ErrorKind::Aborted,
        _ => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_roundtrip_through_status() {
        for k in [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::Capacity,
            ErrorKind::DataCorruption,
            ErrorKind::Unavailable,
            ErrorKind::PermissionDenied,
            ErrorKind::Unauthenticated,
            ErrorKind::FailedPrecondition,
            ErrorKind::Aborted,
            ErrorKind::Internal,
        ] {
            assert_eq!(from_status(&status(k, "m")), k);
        }
    }
}
