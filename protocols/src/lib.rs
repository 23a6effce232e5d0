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
/// The vsock port the agent accepts port-forward streams on.
pub const AGENT_PORT_FORWARD_VSOCK_PORT: u32 = 1026;
/// The vsock port the agent serves its debug shell on, once the host sent
/// `StartDebugConsole` (only when the host's `debug_console` is on).
pub const DEBUG_CONSOLE_VSOCK_PORT: u32 = 1027;

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

/// Port-forward streams (CRI `PortForward`): the host opens one stream per
/// forwarded connection to [`crate::AGENT_PORT_FORWARD_VSOCK_PORT`] and
/// writes the TCP port as a decimal line; the agent dials `127.0.0.1` on
/// that port in the pod's network namespace and answers one line, `OK` or
/// `ERR <why>`. Everything after the answer is the connection's bytes.
pub mod port_forward {
    /// Longest request line, newline included (`65535\n`).
    pub const MAX_REQUEST_BYTES: usize = 6;
    /// Longest answer line, newline included; longer answers are refused.
    pub const MAX_REPLY_BYTES: usize = 256;

    /// The request line for TCP `port`.
    pub fn request(port: u16) -> String {
        format!("{port}\n")
    }

    /// The port a request line (without its newline) names: 1 to 65535,
    /// plain decimal digits.
    pub fn parse_request(line: &[u8]) -> Option<u16> {
        if line.is_empty() || line.len() > 5 || !line.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(line)
            .ok()?
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
    }

    /// The agent's answer when the dial succeeded.
    pub const REPLY_OK: &str = "OK\n";

    /// The agent's answer when the dial failed; `why` is cut to fit and
    /// kept on one line.
    pub fn reply_error(why: &str) -> String {
        let one_line: String = why
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut text = format!("ERR {one_line}");
        while text.len() > MAX_REPLY_BYTES - 1 {
            text.pop();
        }
        text.push('\n');
        text
    }

    /// What an answer line (without its newline) says: `Ok(())` for `OK`,
    /// `Err(why)` for `ERR why` or anything else.
    pub fn parse_reply(line: &str) -> Result<(), String> {
        match line {
            "OK" => Ok(()),
            other => Err(other
                .strip_prefix("ERR ")
                .map_or_else(|| format!("an unknown answer {other:?}"), str::to_owned)),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn requests_name_one_port_in_plain_decimal() {
            assert_eq!(request(8080), "8080\n");
            assert_eq!(parse_request(b"8080"), Some(8080));
            assert_eq!(parse_request(b"65535"), Some(65535));
            for bad in [
                &b""[..],
                b"0",
                b"65536",
                b"-1",
                b"+80",
                b" 80",
                b"123456",
                b"8o",
            ] {
                assert_eq!(parse_request(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn replies_are_one_bounded_line() {
            assert_eq!(parse_reply(REPLY_OK.trim_end()), Ok(()));
            let long = reply_error(&format!("refused\nFORGED {}", "x".repeat(1000)));
            assert!(long.len() <= MAX_REPLY_BYTES, "{}", long.len());
            assert_eq!(long.matches('\n').count(), 1);
            assert!(long.ends_with('\n'));
            let why = parse_reply(long.trim_end()).unwrap_err();
            assert!(why.starts_with("refused FORGED"), "{why}");
            assert!(parse_reply("HELLO").unwrap_err().contains("unknown answer"));
        }
    }
}
