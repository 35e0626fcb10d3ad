//! kvfabric's SLO planner (a later issue): TTFT/ITL and queue metrics in,
//! prefill/decode replica decisions out, through connectors. Empty for now.
