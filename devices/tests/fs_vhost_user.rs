//! The vhost-user transport of virtio-fs: the server answers a frontend's
//! feature negotiation with what QEMU's vhost-user-fs-device needs, and
//! `stop`/drop end the session (with or without a connected frontend),
//! join its threads and remove the socket. The frontend here speaks raw
//! vhost-user messages over the socket, as QEMU would.
//!
//! A full data-path check with a real guest kernel belongs to the guest
//! tier; the request handling itself is covered by `fs_requests`.

mod fs_support;

mod virtio_fs {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use husk_devices::fs::{serve_vhost_user, FsConfig, FsError};

    use super::fs_support::TestDir;

    /// vhost-user message ids (QEMU docs/interop/vhost-user.rst).
    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    /// Header flags: protocol version 1; the reply bit the backend sets.
    const FLAG_VERSION_1: u32 = 0x1;
    const FLAG_REPLY: u32 = 0x4;
    /// Feature bits a virtio-fs frontend relies on.
    const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
    const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    const PROTOCOL_F_MQ: u64 = 1 << 0;
    const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

    fn connect(socket: &Path) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    return stream;
                }
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot connect to {}: {error}",
                        socket.display()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Sends a payload-less request and returns the u64 the backend answers.
    fn ask_u64(stream: &mut UnixStream, request: u32) -> u64 {
        let mut message = Vec::new();
        message.extend_from_slice(&request.to_le_bytes());
        message.extend_from_slice(&FLAG_VERSION_1.to_le_bytes());
        message.extend_from_slice(&0u32.to_le_bytes());
        stream.write_all(&message).unwrap();
        let mut reply = [0u8; 20];
        stream.read_exact(&mut reply).unwrap();
        let header = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().unwrap());
        assert_eq!(header(0), request, "the reply answers the request");
        assert_eq!(header(4), FLAG_VERSION_1 | FLAG_REPLY);
        assert_eq!(header(8), 8, "a u64 payload");
        u64::from_le_bytes(reply[12..20].try_into().unwrap())
    }

    fn wait_for_socket(socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fs_vhost_user_backend_offers_the_features_a_virtio_fs_frontend_needs() {
        let dir = TestDir::new("vu-features").unwrap();
        std::fs::create_dir(dir.path().join("share")).unwrap();
        let socket = dir.path().join("fs.sock");
        let mut config = FsConfig::new(dir.path().join("share"));
        config.num_request_queues = 2;
        let server = serve_vhost_user(&socket, config).unwrap();
        assert_eq!(server.socket_path(), socket);
        let mut frontend = connect(&socket);
        let features = ask_u64(&mut frontend, GET_FEATURES);
        for (name, bit) in [
            ("VERSION_1", VIRTIO_F_VERSION_1),
            ("PROTOCOL_FEATURES", VHOST_USER_F_PROTOCOL_FEATURES),
            ("EVENT_IDX", VIRTIO_RING_F_EVENT_IDX),
            ("INDIRECT_DESC", VIRTIO_RING_F_INDIRECT_DESC),
        ] {
            assert_ne!(features & bit, 0, "{name} offered in {features:#x}");
        }
        let protocol = ask_u64(&mut frontend, GET_PROTOCOL_FEATURES);
        assert_ne!(
            protocol & PROTOCOL_F_MQ,
            0,
            "MQ lets QEMU check the queue count"
        );
        assert_ne!(protocol & PROTOCOL_F_REPLY_ACK, 0);

        // stop() with the frontend still connected ends the session.
        let started = Instant::now();
        server.stop().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stop took {:?}",
            started.elapsed()
        );
        assert!(!socket.exists(), "the socket is removed");
        let mut rest = Vec::new();
        assert_eq!(
            frontend.read_to_end(&mut rest).unwrap(),
            0,
            "the frontend sees the hang-up"
        );
    }

    #[test]
    fn fs_vhost_user_server_stops_before_any_frontend_connects_and_removes_the_socket() {
        let dir = TestDir::new("vu-idle").unwrap();
        let socket = dir.path().join("idle.sock");
        let server = serve_vhost_user(&socket, FsConfig::new(dir.path())).unwrap();
        wait_for_socket(&socket);
        assert!(!server.is_finished());
        server.stop().unwrap();
        assert!(!socket.exists());
    }

    #[test]
    fn fs_vhost_user_session_ends_when_the_frontend_hangs_up_and_drop_cleans_up() {
        let dir = TestDir::new("vu-hangup").unwrap();
        let socket = dir.path().join("hangup.sock");
        let server = serve_vhost_user(&socket, FsConfig::new(dir.path())).unwrap();
        let mut frontend = connect(&socket);
        ask_u64(&mut frontend, GET_FEATURES);
        drop(frontend);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the session outlived its frontend"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(server);
        assert!(!socket.exists());
    }

    #[test]
    fn fs_vhost_user_replaces_a_stale_socket_file() {
        let dir = TestDir::new("vu-stale").unwrap();
        let socket = dir.path().join("stale.sock");
        std::fs::write(&socket, b"left over by a crashed shim").unwrap();
        let server = serve_vhost_user(&socket, FsConfig::new(dir.path())).unwrap();
        let mut frontend = connect(&socket);
        assert_ne!(ask_u64(&mut frontend, GET_FEATURES) & VIRTIO_F_VERSION_1, 0);
        drop(frontend);
        server.stop().unwrap();
    }

    #[test]
    fn fs_vhost_user_with_a_bad_configuration_fails_before_binding() {
        let dir = TestDir::new("vu-bad").unwrap();
        let socket = dir.path().join("bad.sock");
        let mut config = FsConfig::new(dir.path());
        config.num_request_queues = 0;
        let error = serve_vhost_user(&socket, config).err().unwrap();
        assert!(matches!(error, FsError::Config(_)), "{error}");
        let missing = dir.path().join("no-such-dir");
        let error = serve_vhost_user(&socket, FsConfig::new(&missing))
            .err()
            .unwrap();
        assert!(
            error.to_string().contains(missing.to_str().unwrap()),
            "{error}"
        );
        assert!(!socket.exists(), "nothing was bound");
    }
}
