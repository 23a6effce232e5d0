//! The pod network as a Kubernetes user meets it (issue #13): the CNI
//! interface is in the pod with the address and default route CNI gave
//! it, every container of the pod serves on the pod IP, the host reaches
//! those ports, the pod reaches the host through its gateway, two pods
//! reach each other, 1 GiB crosses from the host into a pod intact, and
//! CRI port-forward reaches a server that listens on the pod's localhost
//! only.
//!
//! Each function runs under one handler and returns what a user observes,
//! with the per-pod address replaced by what it is (`<pod IP>`), so the
//! tier can compare runc and husk.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_tests::containerd::cri_network;
use husk_tests::cri_stream::run_port_forward;
use k8s_cri::v1::ContainerState;

use super::Tier;

/// How long a port may take to answer once its container started (the
/// server loop starts, the guest brings its interface up).
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A shell command that answers every connection on `port` with `line`:
/// busybox's persistent `nc -ll`, so the port never stops listening
/// between connections.
fn serve_line(port: u16, line: &str) -> String {
    format!("nc -ll -p {port} -e echo {line}")
}

/// Connects to `address` until it answers with one line, or the timeout.
fn fetch_line(address: SocketAddr) -> Result<String> {
    let started = Instant::now();
    let mut last_error = String::new();
    while started.elapsed() < SERVE_TIMEOUT {
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
            Ok(stream) => match read_line(stream) {
                Ok(line) => return Ok(line),
                Err(error) => last_error = format!("{error:#}"),
            },
            Err(error) => last_error = format!("connecting: {error}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("{address} gave no line within {SERVE_TIMEOUT:?}: {last_error}")
}

/// Reads from `stream` until the first full line and returns it.
fn read_line(mut stream: TcpStream) -> Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 256];
    while !received.contains(&b'\n') {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(error) => bail!("reading: {error}"),
        }
    }
    let text = String::from_utf8_lossy(&received);
    match text.lines().next().filter(|line| !line.is_empty()) {
        Some(line) => Ok(line.to_owned()),
        None => bail!("the connection closed without a line"),
    }
}

/// A pod with two containers, each serving its own port: the pod's
/// interface holds the IP CRI reports, with CNI's prefix and default
/// route; the host fetches a line from each port at the pod IP; each
/// container reaches the other's port at the pod IP; and a container
/// reaches a host listener at the gateway.
pub(super) fn pod_ip_serves_each_container(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "net")?;
    let pod_ip = tier.client.pod_ip(&pod.id)?;
    let web = tier.start_container(
        &pod,
        "web",
        &["sh", "-c", &serve_line(8080, "served-by-web")],
    )?;
    let api = tier.start_container(
        &pod,
        "api",
        &["sh", "-c", &serve_line(8081, "served-by-api")],
    )?;
    for id in [&web, &api] {
        tier.wait_container_state(id, ContainerState::ContainerRunning)?;
    }

    let addresses = tier.exec_out(&web, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])?;
    let pod_address = format!("{pod_ip}/24");
    ensure!(
        addresses.split_whitespace().any(|word| word == pod_address),
        "eth0 in the pod does not hold {pod_address}: {addresses:?}"
    );
    let routes = tier.exec_out(&web, &["ip", "route", "show", "default"])?;
    let want_route = format!("default via {} dev eth0", cri_network::GATEWAY);
    ensure!(
        routes
            .lines()
            .any(|line| line.trim().starts_with(&want_route)),
        "the pod's default route is not {want_route:?}: {routes:?}"
    );

    let from_host_web = fetch_line(SocketAddr::from((pod_ip, 8080)))?;
    let from_host_api = fetch_line(SocketAddr::from((pod_ip, 8081)))?;

    let across = tier.exec_out(
        &web,
        &[
            "sh",
            "-c",
            &format!("timeout 10 nc {pod_ip} 8081 </dev/null"),
        ],
    )?;

    let to_host = pod_reaches_host(tier, &api)?;

    for id in [&web, &api] {
        tier.client.stop_container(id, 0)?;
        tier.client.remove_container(id)?;
    }
    Ok(format!(
        "eth0 <pod IP>/24, {want_route}; host got {from_host_web:?} and {from_host_api:?}; \
         web got {:?} from api at <pod IP>; host got {to_host:?} from the pod",
        across.trim()
    ))
}

/// Has `container` send a line to a listener on the gateway address and
/// returns what the host received.
fn pod_reaches_host(tier: &Tier, container: &str) -> Result<String> {
    let listener = TcpListener::bind((cri_network::GATEWAY, 0))
        .with_context(|| format!("cannot listen on the gateway {}", cri_network::GATEWAY))?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let receiver = std::thread::spawn(move || -> Result<String> {
        let started = Instant::now();
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return read_line(stream);
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    ensure!(
                        started.elapsed() < SERVE_TIMEOUT,
                        "no connection from the pod within {SERVE_TIMEOUT:?}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => bail!("accepting the pod's connection: {error}"),
            }
        }
    });
    let sent = tier.client.exec_sync(
        container,
        &[
            "sh",
            "-c",
            &format!(
                "echo from-the-pod | timeout 10 nc {} {port}",
                cri_network::GATEWAY
            ),
        ],
    );
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the host listener panicked"))?;
    let (code, _, err) = sent?;
    let received = received?;
    ensure!(code == 0, "nc to the host exited {code}: {err}");
    Ok(received)
}

/// Two pods of the same network: a container of the second reaches a
/// server in the first at the first's pod IP.
pub(super) fn two_pods_reach_each_other(tier: &Tier, handler: &str) -> Result<String> {
    let server_pod = tier.run_pod(handler, "peer-a")?;
    let client_pod = tier.run_pod(handler, "peer-b")?;
    let server_ip = tier.client.pod_ip(&server_pod.id)?;
    let client_ip = tier.client.pod_ip(&client_pod.id)?;
    ensure!(
        server_ip != client_ip,
        "both pods report the IP {server_ip}"
    );
    let server = tier.start_container(
        &server_pod,
        "server",
        &["sh", "-c", &serve_line(8080, "served-by-pod-a")],
    )?;
    let client = tier.start_container(&client_pod, "client", &["sleep", "1000"])?;
    for id in [&server, &client] {
        tier.wait_container_state(id, ContainerState::ContainerRunning)?;
    }
    // The server may not listen yet: retry within the timeout.
    let started = Instant::now();
    let answer = loop {
        let (code, out, err) = tier.client.exec_sync(
            &client,
            &[
                "sh",
                "-c",
                &format!("timeout 10 nc {server_ip} 8080 </dev/null"),
            ],
        )?;
        if code == 0 && !out.trim().is_empty() {
            break out.trim().to_owned();
        }
        ensure!(
            started.elapsed() < SERVE_TIMEOUT,
            "pod b got no answer from {server_ip}:8080 within {SERVE_TIMEOUT:?}: exit {code}, {err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for id in [&server, &client] {
        tier.client.stop_container(id, 0)?;
        tier.client.remove_container(id)?;
    }
    Ok(format!("pod b got {answer:?} from pod a at its IP"))
}

/// The bytes sent host→pod by [`one_gib_host_to_pod`].
const BULK_BYTES: u64 = 1 << 30;

/// 1 GiB of pseudo-random bytes sent from the host to a container at the
/// pod IP: the container's `sha256sum` of what it received is the one the
/// host computed of what it sent.
pub(super) fn one_gib_host_to_pod(tier: &Tier, handler: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    let pod = tier.run_pod(handler, "bulk")?;
    let ip = tier.client.pod_ip(&pod.id)?;
    let sink = tier.start_container(
        &pod,
        "sink",
        &[
            "sh",
            "-c",
            "nc -l -p 9000 | sha256sum > /tmp/received.sha256.part && \
             mv /tmp/received.sha256.part /tmp/received.sha256; sleep 1000",
        ],
    )?;
    tier.wait_container_state(&sink, ContainerState::ContainerRunning)?;
    let address = SocketAddr::from((ip, 9000));
    let started = Instant::now();
    let mut stream = loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
            Ok(stream) => break stream,
            Err(error) => {
                ensure!(
                    started.elapsed() < SERVE_TIMEOUT,
                    "cannot connect to {address} within {SERVE_TIMEOUT:?}: {error}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    };
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let sending = Instant::now();
    for _ in 0..BULK_BYTES / block.len() as u64 {
        for word in block.chunks_exact_mut(8) {
            // xorshift64: cheap bytes no compressor or cache can shortcut.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        hasher.update(&block);
        std::io::Write::write_all(&mut stream, &block).context("sending the bulk data")?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let sent_for = sending.elapsed();
    let sent_sum = format!("{:x}", hasher.finalize());
    let waited = Instant::now();
    let received_sum = loop {
        let (code, out, _) = tier
            .client
            .exec_sync(&sink, &["cat", "/tmp/received.sha256"])?;
        if code == 0 {
            break out.split_whitespace().next().unwrap_or("").to_owned();
        }
        ensure!(
            waited.elapsed() < Duration::from_secs(300),
            "the container has no checksum 300 s after the host sent everything"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    drop(stream);
    // Informational only (no assertion): how the copy went under this handler.
    eprintln!(
        "  {handler}: 1 GiB host→pod sent in {:.1} s ({:.0} MiB/s as the sender saw it)",
        sent_for.as_secs_f64(),
        1024.0 / sent_for.as_secs_f64()
    );
    tier.client.stop_container(&sink, 0)?;
    tier.client.remove_container(&sink)?;
    ensure!(
        received_sum == sent_sum,
        "the container's sha256 of what it received is {received_sum}, the host sent {sent_sum}"
    );
    Ok("1 GiB host→pod, the container's sha256 matches the host's".to_owned())
}

/// CRI `PortForward`, as `kubectl port-forward` uses it: a container
/// serves HTTP on 127.0.0.1:8080 only (not at the pod IP); a forward to
/// 8080 carries a request in and the server's response out; a forward to
/// a port nothing listens on reports an error on the error channel and no
/// data.
pub(super) fn port_forward_reaches_localhost_in_the_pod(
    tier: &Tier,
    handler: &str,
) -> Result<String> {
    let pod = tier.run_pod(handler, "portfwd")?;
    let pod_ip = tier.client.pod_ip(&pod.id)?;
    let server = tier.start_container(
        &pod,
        "local",
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo served-on-the-pods-localhost > /tmp/www/index.html \
             && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www",
        ],
    )?;
    tier.wait_container_state(&server, ContainerState::ContainerRunning)?;

    // The server may not listen yet: retry within the timeout.
    let started = Instant::now();
    let answer = loop {
        let url = tier.client.port_forward_url(&pod.id, 8080)?;
        let forwarded = run_port_forward(&url, 8080, b"GET /index.html HTTP/1.0\r\n\r\n")?;
        if !forwarded.data.is_empty() {
            let response = String::from_utf8_lossy(&forwarded.data).into_owned();
            let status = response.lines().next().unwrap_or("").trim().to_owned();
            let body = response
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_owned();
            break format!("{status}, body {body:?}");
        }
        ensure!(
            started.elapsed() < SERVE_TIMEOUT,
            "port-forward to 8080 gave no data within {SERVE_TIMEOUT:?}; error channel: {:?}",
            forwarded.error
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let at_pod_ip =
        match TcpStream::connect_timeout(&SocketAddr::from((pod_ip, 8080)), Duration::from_secs(5))
        {
            Ok(_) => "accepted".to_owned(),
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => "refused".to_owned(),
            Err(error) => format!("failed: {error}"),
        };

    let url = tier.client.port_forward_url(&pod.id, 8082)?;
    let unserved = run_port_forward(&url, 8082, b"anyone?\n")?;
    let names_the_port = unserved
        .error
        .starts_with("error forwarding port 8082 to pod");
    ensure!(
        names_the_port && unserved.data.is_empty(),
        "port-forward to 8082, where nothing listens: data {:?}, error channel {:?}",
        String::from_utf8_lossy(&unserved.data),
        unserved.error
    );

    tier.client.stop_container(&server, 0)?;
    tier.client.remove_container(&server)?;
    Ok(format!(
        "port-forward to 8080 answered {answer:?}; <pod IP>:8080 from the host {at_pod_ip}; \
         port-forward to 8082 (no listener): no data, the error channel names port 8082"
    ))
}
