//! The agent API (`protos/agent.proto`, our own design) and its generated
//! ttrpc code, shared by the guest agent (server) and the shim's agent client.
//!
//! Well-known endpoints of the API live here too, so both sides agree.

/// Generated protobuf messages of `husk.agent.v1`.
#[allow(
    clippy::all,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    unused_mut,
    unused_qualifications,
    unused_imports,
    dead_code
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated async ttrpc client and server of the `Agent` service.
#[allow(
    clippy::all,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    unused_mut,
    unused_qualifications,
    unused_imports,
    dead_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// The vsock port the agent serves the ttrpc API on.
pub const AGENT_API_VSOCK_PORT: u32 = 1024;
/// The vsock port the agent accepts per-pipe stdio streams on.
pub const AGENT_STDIO_VSOCK_PORT: u32 = 1025;

#[cfg(test)]
mod tests {
    use super::agent::*;
    use protobuf::Message;

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let mut request = CreateContainerRequest::new();
        request.container_id = "c1".into();
        request.rootfs_path = "c1/rootfs".into();
        request.oci_spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        let mut stdio = StdioStreams::new();
        stdio.stdout_id = "s-out".into();
        stdio.terminal = true;
        request.stdio = protobuf::MessageField::some(stdio);
        let bytes = request.write_to_bytes().unwrap();
        let decoded = CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded, request);
        assert!(decoded.stdio.terminal);
    }

    #[test]
    fn events_carry_exits_and_ooms_as_alternatives() {
        let mut event = Event::new();
        event.sequence = 7;
        let mut exited = ProcessExited::new();
        exited.container_id = "c1".into();
        exited.exit_status = 137;
        event.set_exited(exited);
        let decoded = Event::parse_from_bytes(&event.write_to_bytes().unwrap()).unwrap();
        assert_eq!(decoded.exited().exit_status, 137);
        assert!(!decoded.has_oom());
    }
}
