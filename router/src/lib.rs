//! kvfabric's KV-aware router.
//!
//! It decides which worker serves each request so that the least prefill is
//! recomputed and no worker drowns. Unlike a router that counts only blocks
//! resident in GPU memory, it sees every tier the fabric holds (HBM, host,
//! NVMe, object store) and prices each block by what it costs to load
//! against what it costs to recompute.
//!
//! - [`index`]: the concurrent prefix index (which holder has which block
//!   of a chain, in which tier), with a reference model and a conformance
//!   suite;
//! - [`events`]: vLLM KV events and fabric `Subscribe` streams into the
//!   index, with block identity recomputed from tokens and gap detection;
//! - [`score`]: the cost model and the choice between workers;
//! - [`Router`]: the three together, as the front end and the trace-replay
//!   simulator use them;
//! - [`config`], [`RouterService`]: the serving side: settings, the
//!   OpenAI-compatible HTTP front end that forwards to workers, the worker
//!   registry with health checks (configured workers, and those registered
//!   in the cluster's etcd registry), and the event transports (fabric
//!   `Subscribe` streams, vLLM ZMQ PUB), as the `kvfabric-router` binary
//!   runs them.
//!
//! The router is a client of the fabric: everything it knows about where
//! blocks live comes from events.

pub mod config;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod index;
mod ingest;
pub mod metrics;
mod registry;
mod router;
pub mod score;
mod service;
pub mod tokenize;
mod workers;

pub use router::{Decision, Router, WorkerInfo};
pub use service::{DISCOVERED_HOLDER_OFFSET, FABRIC_HOLDER_BASE, RouterHandle, RouterService, ServeError};
