//! kvfabric's wire protocol: the generated `kvfabric.v1` messages and gRPC
//! service, conversions of small enums, and the one place where error kinds
//! become gRPC statuses (and back). Depends on nothing else of kvfabric.

mod error;

pub use error::{ErrorKind, from_status, status};

/// Generated `kvfabric.v1` code.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("kvfabric.v1");
}

/// Largest gRPC message either side sends or accepts (4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Default data chunk size in streams: leaves headroom under the message cap.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Largest chunk a client may ask for in `GetRequest.chunk_size`.
pub const MAX_CHUNK_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;
/// Largest frame on the local (Unix socket) control channel.
pub const MAX_LOCAL_FRAME_BYTES: usize = 4 << 20;
/// Version of the local protocol this build speaks.
pub const LOCAL_PROTOCOL_VERSION: u32 = 1;
/// Keys are 1 to this many bytes.
pub const MAX_KEY_BYTES: usize = 64;
