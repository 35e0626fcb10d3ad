//! kvfabric's KV-aware router (a later issue): an event-fed prefix index per
//! worker and tier, a cost model, and an OpenAI-compatible HTTP front. It will
//! talk to the fabric only through `kvfabric::client`. Empty for now.
