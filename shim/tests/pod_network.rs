//! The shim's side of a pod's network on a real network namespace shaped
//! like CNI's: a veth end with an address, a default route and a permanent
//! neighbour. `Attachment::attach` must read them, create the TAP and the
//! tc mirroring; `detach` must leave the namespace as CNI made it. Runs
//! as root (namespaces, veths, tc), as the shim does.

use std::path::Path;
use std::process::Command;

use husk_shim::network::{Attachment, TAP_NAME};

/// A named network namespace holding `veth-pod` (10.77.0.5/24, default
/// route via 10.77.0.1, permanent neighbour 10.77.0.9) whose peer
/// `veth-<n>-host` stays on the host; removed on drop.
struct CniLikeNamespace {
    name: String,
    host_end: String,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn output_of(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().expect(program);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl CniLikeNamespace {
    fn new(tag: &str) -> Self {
        let name = format!("husk-test-{tag}-{}", std::process::id());
        let host_end = format!(
            "vh{}{}",
            tag.chars().next().unwrap(),
            std::process::id() % 100_000
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let namespace = Self { name, host_end };
        ip(&[
            "link",
            "add",
            &namespace.host_end,
            "type",
            "veth",
            "peer",
            "name",
            "veth-pod",
            "netns",
            &namespace.name,
        ]);
        let run = |args: &[&str]| {
            let mut all = vec!["-n", namespace.name.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        run(&["link", "set", "veth-pod", "mtu", "1400", "up"]);
        run(&["addr", "add", "10.77.0.5/24", "dev", "veth-pod"]);
        run(&[
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
            "dev",
            "veth-pod",
        ]);
        run(&[
            "neigh",
            "add",
            "10.77.0.9",
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "veth-pod",
            "nud",
            "permanent",
        ]);
        namespace
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn ip_in(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        output_of("ip", &all)
    }

    fn tc_in(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        output_of("tc", &all)
    }
}

impl Drop for CniLikeNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the pod network tests need root (network namespaces, veths, tc)"
    );
}

#[test]
fn a_cni_namespace_is_read_mirrored_to_a_tap_and_left_as_it_was() {
    require_root();
    let namespace = CniLikeNamespace::new("attach");
    let qdiscs_before = namespace.tc_in(&["qdisc", "show", "dev", "veth-pod"]);
    let mut attachment = Attachment::attach(Path::new(&namespace.path())).expect("attach");

    let network = attachment.network().clone();
    assert_eq!(network.interface.name, "veth-pod");
    assert_eq!(network.interface.mtu, 1400);
    assert_eq!(
        network.interface.addresses,
        vec![("10.77.0.5".parse().unwrap(), 24)]
    );
    assert!(
        network
            .routes
            .iter()
            .any(|r| r.destination.is_none() && r.gateway == Some("10.77.0.1".parse().unwrap())),
        "{:?}",
        network.routes
    );
    assert_eq!(network.neighbors.len(), 1, "{:?}", network.neighbors);
    let request = attachment.agent_request();
    assert_eq!(request.interfaces[0].name, "veth-pod");
    assert_eq!(attachment.net_config().mtu, 1400);
    assert_eq!(attachment.net_config().mac, network.interface.mac);

    let tap = namespace.ip_in(&["link", "show", TAP_NAME]);
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    for dev in ["veth-pod", TAP_NAME] {
        let filters = namespace.tc_in(&["filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("mirred") && filters.contains("Redirect"),
            "no redirect on {dev}: {filters}"
        );
    }
    // The shim's own namespace is untouched.
    assert!(output_of("ip", &["link", "show", TAP_NAME]).is_empty());

    let tap_fd = attachment.take_tap().expect("the TAP");
    drop(tap_fd);
    attachment.detach().expect("detach");
    assert!(
        namespace.ip_in(&["link", "show", TAP_NAME]).is_empty(),
        "the TAP is still there"
    );
    assert_eq!(
        namespace.tc_in(&["qdisc", "show", "dev", "veth-pod"]),
        qdiscs_before,
        "the veth's qdiscs differ from CNI's"
    );
    assert!(namespace
        .ip_in(&["addr", "show", "veth-pod"])
        .contains("10.77.0.5/24"));
}

#[test]
fn a_namespace_without_an_interface_is_refused_and_left_empty() {
    require_root();
    let name = format!("husk-test-empty-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    ip(&["netns", "add", &name]);
    let error = Attachment::attach(Path::new(&format!("/var/run/netns/{name}")))
        .err()
        .expect("an empty namespace must be refused");
    let links = output_of("ip", &["-n", &name, "-o", "link", "show"]);
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    assert!(
        format!("{error:#}").contains("no Ethernet interface"),
        "{error:#}"
    );
    assert!(!links.contains(TAP_NAME), "{links}");
}

#[test]
fn a_missing_namespace_is_named() {
    let error = Attachment::attach(Path::new("/var/run/netns/husk-test-no-such-netns"))
        .err()
        .expect("refused");
    assert!(
        format!("{error:#}").contains("/var/run/netns/husk-test-no-such-netns"),
        "{error:#}"
    );
}

mod port_forward {
    //! CRI port-forward's host side on a real namespace: connections to
    //! 127.0.0.1 on any port, made inside the namespace as containerd
    //! makes them, reach the agent (a fake one behind a hybrid vsock
    //! socket) naming their port; a refused dial resets the connection;
    //! nothing else is steered, and nothing is left once it stops.

    use std::fs::File;
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::os::fd::AsFd;
    use std::path::{Path, PathBuf};

    use husk_shim::network::port_forward::PortForwardListener;
    use nix::sched::{setns, CloneFlags};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{ip, require_root, CniLikeNamespace};

    /// The port the fake agent refuses to dial.
    const REFUSED_PORT: u16 = 8081;

    /// Answers CONNECT 1026, reads the port line, then answers `ERR` for
    /// [`REFUSED_PORT`] or `OK` and `<port>:<DATA IN UPPER CASE>`.
    fn fake_agent(uds: &Path) {
        let listener = tokio::net::UnixListener::bind(uds).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while head.iter().filter(|b| **b == b'\n').count() < 2 {
                        let byte = stream.read_u8().await.unwrap();
                        head.push(byte);
                        if head == b"CONNECT 1026\n" {
                            stream.write_all(b"OK 1\n").await.unwrap();
                        }
                    }
                    let text = String::from_utf8(head).unwrap();
                    let port = text.lines().nth(1).unwrap().to_owned();
                    if port == REFUSED_PORT.to_string() {
                        stream.write_all(b"ERR connection refused\n").await.unwrap();
                        return;
                    }
                    stream.write_all(b"OK\n").await.unwrap();
                    let mut data = Vec::new();
                    stream.read_to_end(&mut data).await.unwrap();
                    let answer = format!("{port}:{}", String::from_utf8_lossy(&data));
                    stream
                        .write_all(answer.to_uppercase().as_bytes())
                        .await
                        .unwrap();
                });
            }
        });
    }

    /// Connects to `address` from inside `netns`, sends `data`, ends its
    /// writing and reads the answer to the end.
    fn exchange_in(netns: &File, address: SocketAddr, data: &[u8]) -> std::io::Result<String> {
        let netns = netns.try_clone()?;
        let data = data.to_vec();
        std::thread::spawn(move || {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let mut stream = TcpStream::connect(address)?;
            stream.write_all(&data)?;
            stream.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .join()
        .unwrap()
    }

    async fn exchange(netns: &File, address: &str, data: &'static [u8]) -> std::io::Result<String> {
        let netns = netns.try_clone().unwrap();
        let address: SocketAddr = address.parse().unwrap();
        tokio::task::spawn_blocking(move || exchange_in(&netns, address, data))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn loopback_connections_in_the_namespace_reach_the_guest_naming_their_port() {
        require_root();
        let namespace = CniLikeNamespace::new("portfwd");
        ip(&["-n", &namespace.name, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let uds: PathBuf = dir.path().join("vsock.sock");
        fake_agent(&uds);
        let netns = File::open(namespace.path()).unwrap();
        let listener = PortForwardListener::open(&netns).expect("open the port-forward listener");
        let forwarding = listener.serve(uds, 8).expect("serve");

        for port in [8080, 9, 65535] {
            let answer = exchange(&netns, &format!("127.0.0.1:{port}"), b"ping")
                .await
                .unwrap_or_else(|e| panic!("127.0.0.1:{port} in the namespace: {e}"));
            assert_eq!(answer, format!("{port}:PING"));
        }
        // A dial the agent refuses resets the connection: the dialler
        // sees an error, not an orderly end.
        let refused = exchange(&netns, &format!("127.0.0.1:{REFUSED_PORT}"), b"x").await;
        assert!(refused.is_err(), "{refused:?}");
        // Only loopback is steered: the pod's own address is not.
        let pod_address = exchange(&netns, "10.77.0.5:8080", b"x").await;
        assert_eq!(
            pod_address.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );

        drop(forwarding);
        // Stopped: the steering is detached with it.
        let after = exchange(&netns, "127.0.0.1:8080", b"x").await;
        assert_eq!(
            after.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "connections are still steered after the forwarding stopped"
        );
    }
}
