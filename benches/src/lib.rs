//! kvfabric benchmarks: the pieces shared by the criterion benches
//! (`benches/tiers.rs`) and the `kvfabric-bench` workload driver
//! (`src/main.rs`, whose own modules live in `src/driver/`):
//!
//! - [`payload`]: deterministic payloads, made once before anything is timed;
//! - [`memcpy`]: the memory-bandwidth limit every data path is compared with;
//! - [`latency`]: the hdrhistogram settings every latency is recorded with.
//!
//! Results are reported in `benches/RESULTS.md` with the command and the
//! machine that produced them.

pub mod latency;
pub mod memcpy;
pub mod payload;
