//! husk's low-level OCI runtime: creates namespaced containers from OCI
//! bundles. The guest agent uses it for every container, and a thin
//! runc-compatible CLI over it is tested against runc.
