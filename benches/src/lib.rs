//! kvfabric benchmarks (being written).
