//! The agent API (our own `.proto`) and its generated ttrpc code, shared by
//! the guest agent and the shim's agent client.
