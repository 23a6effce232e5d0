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
/// The vsock port the agent serves its debug shell on, once the host sent
/// `StartDebugConsole` (only when the host's `debug_console` is on).
pub const DEBUG_CONSOLE_VSOCK_PORT: u32 = 1026;

/// The stdio stream preamble: the first bytes the host writes on a new
/// stream to the stdio port are the stream's id and a newline; everything
/// after is process data. The id is what `StdioStreams` names.
pub mod stdio {
    /// Longest id a stream may announce (the preamble is read byte by byte
    /// up to this length plus the newline, so data is never over-read).
    pub const MAX_STREAM_ID_LEN: usize = 128;

    /// The preamble announcing stream `id`.
    pub fn preamble(id: &str) -> String {
        format!("{id}\n")
    }

    /// Whether `id` may name a stream: 1 to [`MAX_STREAM_ID_LEN`] letters,
    /// digits, '.', '_' or '-'.
    pub fn is_valid_stream_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= MAX_STREAM_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }
}

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
    fn stream_ids_are_plain_words_of_bounded_length() {
        use crate::stdio::{is_valid_stream_id, preamble, MAX_STREAM_ID_LEN};
        assert!(is_valid_stream_id("c1-stdout.0"));
        assert!(!is_valid_stream_id(""));
        assert!(!is_valid_stream_id("a b"));
        assert!(!is_valid_stream_id("a\nb"));
        assert!(!is_valid_stream_id(&"x".repeat(MAX_STREAM_ID_LEN + 1)));
        assert_eq!(preamble("s1"), "s1\n");
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

/// Namespace paths in the OCI specs the host sends. A spec's namespace
/// paths name host namespaces, which mean nothing in the guest; the shim
/// rewrites each one a pod member joins into [`pod::SANDBOX_NAMESPACE`],
/// and the agent resolves that to the namespace of the same type of the
/// pod's sandbox (pause) container in the guest.
pub mod pod {
    /// "The pod sandbox container's namespace of this entry's type."
    pub const SANDBOX_NAMESPACE: &str = "husk:pod-sandbox";
}
