//! `make bench` for the device models: vsock throughput and latency, and
//! virtio-fs throughput and metadata rates, in a real guest under the
//! `qemu` backend with our devices served over vhost-user from this
//! process.
//!
//! Peers measured in the same run: rust-vmm's `vhost-device-vsock` serving
//! the same guest and script (vsock), and the same busybox operations on a
//! host directory (virtio-fs). Every line names the transport and the
//! accelerator.
//!
//! The peer serves guest-to-host streams with its credit window
//! (`--tx-buffer-size`) at [`PEER_TX_BUFFER_BYTES`], not its 64 KiB
//! default. The guest kernel (Debian's 6.12.117) builds a TX packet whose
//! payload exceeds about 32 KiB as a non-linear skb of page fragments of at
//! most 32 KiB (order-3 pages) each, so a 64 KiB packet reaches the device
//! as a header descriptor plus two or more data descriptors, which virtio
//! allows. The peer's `virtio-vsock` 0.10 parser wants the whole payload in
//! one descriptor and fails with `DescriptorLengthTooSmall`; its TX loop
//! then drops the packet without returning the descriptor, and the stream
//! stalls at 0 bytes with the guest's credit spent. A 32 KiB window keeps
//! every payload within one descriptor (one fragment, or a linear skb), so
//! the peer can be measured; the bench still counts the peer's dropped TX
//! packets and prints them. Our device advertises
//! [`vsock::CONN_BUF_ALLOC`] and gathers payloads across descriptors.
//!
//! Usage: device_bench BZIMAGE GUEST_INITRD WORK_DIR [PEER_VSOCK_BINARY]
//! where GUEST_INITRD holds the agent, busybox, `/bench/husk-guest-probe`,
//! `/bench/fs-ops.sh` and `/bench/run` (tests/run-bench.sh packs it).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_devices::{fs, vsock};
use husk_shim::hypervisor::qemu::{QemuVm, QemuVmConfig};
use husk_shim::hypervisor::{GUEST_CID, SHARED_FS_TAG};

/// Bytes moved each way over vsock.
const VSOCK_BYTES: usize = 64 << 20;
/// Round trips of a small message for the latency figure.
const PING_PONGS: usize = 200;
const PING_BYTES: usize = 64;
/// How long the guest may take to finish its script after the last
/// vsock step.
const SCRIPT_END_DEADLINE: Duration = Duration::from_secs(120);
/// The longest the vsock peer's whole run may take.
const PEER_DEADLINE: Duration = Duration::from_secs(300);
/// The peer's credit window for guest-to-host data (see the module doc);
/// `HUSK_PEER_TX_BUFFER_BYTES` overrides it (65536, the peer's default,
/// reproduces the stall).
const PEER_TX_BUFFER_BYTES: u32 = 32 << 10;

fn peer_tx_buffer_bytes() -> u32 {
    std::env::var("HUSK_PEER_TX_BUFFER_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PEER_TX_BUFFER_BYTES)
}
/// What the peer logs when a guest packet's payload is split across
/// descriptors (its `vsock: error reading TX packet: ...`).
const PEER_TX_ERROR: &str = "error reading TX packet";
/// How long the host waits for the guest to listen on a vsock port.
const CONNECT_DEADLINE: Duration = Duration::from_secs(180);

fn connect_guest(uds: &Path, port: u32, deadline: Instant) -> Result<UnixStream, String> {
    loop {
        if let Ok(mut stream) = UnixStream::connect(uds) {
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .unwrap();
            if stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .is_ok()
            {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while line.last() != Some(&b'\n') {
                    match stream.read(&mut byte) {
                        Ok(1) => line.push(byte[0]),
                        _ => break,
                    }
                }
                if line.starts_with(b"OK ") {
                    return Ok(stream);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the guest never listened on vsock port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Accepts one connection, giving up at `deadline`.
fn accept_until(listener: &UnixListener, deadline: Instant) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("the guest never connected to the host: {e}")),
        }
    }
}

/// Host side of the three vsock measurements; returns (host->guest MiB/s,
/// guest->host MiB/s, median round trip in microseconds).
fn drive_vsock(uds: &Path) -> Result<(f64, f64, f64), String> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let guest_to_host = UnixListener::bind(format!("{}_6001", uds.display()))
        .expect("bind the guest-to-host listener");

    // Host -> guest: the guest receives until EOF, then closes.
    let mut stream = connect_guest(uds, 6000, deadline)?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..VSOCK_BYTES / chunk.len() {
        stream
            .write_all(&chunk)
            .map_err(|e| format!("sending to the guest stalled: {e}"))?;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
    let host_to_guest = VSOCK_BYTES as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();

    // Guest -> host: the guest connects to port 6001 and sends.
    let mut stream = accept_until(&guest_to_host, deadline)?;
    let started = Instant::now();
    let mut buffer = vec![0u8; 1 << 20];
    let mut received = 0usize;
    while received < VSOCK_BYTES {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
    }
    // The guest's probe receives until end-of-stream before it exits.
    stream.shutdown(Shutdown::Write).unwrap();
    let guest_to_host_rate = received as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64();
    if received != VSOCK_BYTES {
        return Err(format!("the guest sent {received} of {VSOCK_BYTES} bytes"));
    }
    drop(guest_to_host);
    let _ = std::fs::remove_file(format!("{}_6001", uds.display()));

    // Round trips through the guest's echo server.
    let mut stream = connect_guest(uds, 6002, deadline)?;
    let ping = [0x42u8; PING_BYTES];
    let mut pong = [0u8; PING_BYTES];
    let mut samples = Vec::with_capacity(PING_PONGS);
    for _ in 0..PING_PONGS {
        let sent = Instant::now();
        stream.write_all(&ping).unwrap();
        stream
            .read_exact(&mut pong)
            .map_err(|e| format!("the echo did not come back: {e}"))?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    stream.shutdown(Shutdown::Write).unwrap();
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((
        host_to_guest,
        guest_to_host_rate,
        samples[samples.len() / 2],
    ))
}

/// `BENCH <name> <seconds>` lines from a console log or a script's output.
fn bench_lines(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = &line[line.find("BENCH ")? + 6..];
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect()
}

struct GuestRun {
    vsock: Result<(f64, f64, f64), String>,
    fs: Vec<(String, f64)>,
    accel: String,
}

fn run_guest(
    bzimage: &Path,
    initrd: &Path,
    work: &Path,
    vsock_socket: &Path,
    uds: &Path,
    fs_socket: Option<&Path>,
) -> GuestRun {
    let console = work.join("console.log");
    let mut config = QemuVmConfig::new(bzimage, initrd, &console)
        .with_memory_mib(512)
        .with_vsock(vsock_socket)
        .with_work_dir(work)
        .append_cmdline(&format!(
            "quiet husk.exec=/bench/run husk.bench_bytes={VSOCK_BYTES}"
        ));
    if let Some(socket) = fs_socket {
        config = config
            .with_fs(socket, SHARED_FS_TAG)
            .append_cmdline("husk.bench_fs=1");
    }
    let mut vm = QemuVm::start(config).expect("QEMU starts");
    let accel = format!("{}", vm.accel().accel);
    let vsock = drive_vsock(uds);
    // After the vsock steps the script has nothing left but to exit.
    let end = match &vsock {
        Ok(_) => vm.wait(SCRIPT_END_DEADLINE).unwrap_or_else(|| vm.stop()),
        Err(_) => vm.stop(),
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let script_failed = !log.contains("HUSK_EXEC_EXIT code=0") || log.contains("BENCH_ERROR");
    let guest_errors = || {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("BENCH_ERROR") || l.contains("husk-guest-probe"))
            .collect();
        if lines.is_empty() {
            "nothing (its probe was still waiting)".to_owned()
        } else {
            lines.join("; ")
        }
    };
    let vsock = match vsock {
        Ok(_) if script_failed => Err(format!(
            "the guest's side failed ({end:?}): {}",
            guest_errors()
        )),
        Err(why) => Err(format!("{why}; the guest said: {}", guest_errors())),
        other => other,
    };
    GuestRun {
        vsock,
        fs: bench_lines(&log),
        accel,
    }
}

fn spawn_peer_vsock(binary: &Path, socket: &Path, uds: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("create the peer's log");
    let child = Command::new(binary)
        .arg("--socket")
        .arg(socket)
        .arg("--uds-path")
        .arg(uds)
        .arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--tx-buffer-size")
        .arg(peer_tx_buffer_bytes().to_string())
        .env(
            "RUST_LOG",
            std::env::var("HUSK_PEER_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("vhost-device-vsock starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "vhost-device-vsock never created {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn ratio(ours: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.2}", ours / peer)
    } else {
        "n/a".to_owned()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: device_bench BZIMAGE GUEST_INITRD WORK_DIR [PEER_VSOCK_BINARY]");
        std::process::exit(2);
    }
    let (bzimage, initrd, work) = (
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
    );
    let peer_binary = args.get(4).map(PathBuf::from);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("share")).unwrap();

    // husk's own devices.
    let vsock_socket = work.join("vsock-vhost.sock");
    let uds = work.join("vsock.uds");
    let fs_socket = work.join("fs-vhost.sock");
    let vsock_server = vsock::serve_vhost_user(
        &vsock_socket,
        vsock::VsockConfig::new(GUEST_CID, uds.clone()),
    )
    .expect("the vsock vhost-user server starts");
    let fs_server = fs::serve_vhost_user(&fs_socket, fs::FsConfig::new(work.join("share")))
        .expect("the fs vhost-user server starts");
    let ours = run_guest(
        &bzimage,
        &initrd,
        &work,
        &vsock_socket,
        &uds,
        Some(&fs_socket),
    );
    vsock_server.stop();
    if let Err(error) = fs_server.stop() {
        eprintln!("device_bench: stopping the virtio-fs server: {error}");
    }

    match &ours.vsock {
        Ok((h2g, g2h, rtt)) => println!(
            "husk vsock over vhost-user in qemu microvm ({}): host->guest {h2g:.1} MiB/s, guest->host {g2h:.1} MiB/s, round trip {rtt:.0} us",
            ours.accel
        ),
        Err(why) => println!("husk vsock could not be measured: {why}"),
    }

    // The file-system peer: the same script on a host directory.
    let host_dir = work.join("host-dir");
    std::fs::create_dir_all(&host_dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bench/fs-ops.sh");
    let output = Command::new("busybox")
        .arg("sh")
        .arg(&script)
        .arg(&host_dir)
        .args(["128", "1000"])
        .output()
        .expect("busybox runs the host file-system peer");
    let host_fs = bench_lines(&String::from_utf8_lossy(&output.stdout));

    let accel = &ours.accel;
    println!("devices over vhost-user in qemu microvm (accelerator: {accel})");
    let seconds = |lines: &[(String, f64)], name: &str| {
        lines.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    };
    for (name, label, amount, unit) in [
        ("fs_seq_write", "sequential write 128 MiB", 128.0, "MiB/s"),
        ("fs_seq_read", "sequential read 128 MiB", 128.0, "MiB/s"),
        ("fs_create", "create 1000 files", 1000.0, "ops/s"),
        ("fs_stat", "stat 1000 files (ls -l)", 1000.0, "ops/s"),
        ("fs_unlink", "unlink 1000 files", 1000.0, "ops/s"),
    ] {
        let rate = |s: Option<f64>| s.map(|s| amount / s.max(0.01));
        match (rate(seconds(&ours.fs, name)), rate(seconds(&host_fs, name))) {
            (Some(guest), Some(host)) => println!(
                "  virtio-fs {label}: guest {guest:.0} {unit}, host directory {host:.0} {unit}, ratio {} (the guest runs under {accel})",
                ratio(guest, host)
            ),
            _ => println!("  virtio-fs {label}: not measured (no figure in the guest or host output)"),
        }
    }
    // The vsock peer, same guest and script, no file system.
    let peer = peer_binary.as_ref().filter(|p| p.exists()).map(|binary| {
        let socket = work.join("peer-vhost.sock");
        let peer_uds = work.join("peer.uds");
        let mut child = spawn_peer_vsock(binary, &socket, &peer_uds, &work.join("peer-vsock.log"));
        // The peer must not hang the bench: past the deadline its process
        // is killed, which fails its pending transfers with an error.
        let peer_pid = child.id() as i32;
        std::thread::spawn(move || {
            std::thread::sleep(PEER_DEADLINE);
            // SAFETY: plain kill(2) of the peer process we spawned.
            unsafe { libc::kill(peer_pid, libc::SIGKILL) };
        });
        let run = run_guest(&bzimage, &initrd, &work, &socket, &peer_uds, None);
        let _ = child.kill();
        let _ = child.wait();
        run
    });

    println!(
        "  vsock: 64 MiB transfers each way, 200 round trips of 64 B; guest->host credit window: husk {} KiB, vhost-device-vsock {} KiB (--tx-buffer-size)",
        vsock::CONN_BUF_ALLOC >> 10,
        peer_tx_buffer_bytes() >> 10
    );
    let Ok((h2g, g2h, rtt)) = ours.vsock.clone() else {
        std::process::exit(1);
    };
    let peer_log = std::fs::read_to_string(work.join("peer-vsock.log")).unwrap_or_default();
    let peer_tx_errors: Vec<&str> = peer_log
        .lines()
        .filter(|l| l.contains(PEER_TX_ERROR))
        .collect();
    match peer.as_ref().map(|p| &p.vsock) {
        Some(Ok((p_h2g, p_g2h, p_rtt))) => {
            println!("  vsock host->guest: husk {h2g:.1} MiB/s, vhost-device-vsock {p_h2g:.1} MiB/s, ratio {}", ratio(h2g, *p_h2g));
            println!("  vsock guest->host: husk {g2h:.1} MiB/s, vhost-device-vsock {p_g2h:.1} MiB/s, ratio {}", ratio(g2h, *p_g2h));
            println!(
                "  vsock round trip (median): husk {rtt:.0} us, vhost-device-vsock {p_rtt:.0} us, ratio {} (lower is better)",
                ratio(rtt, *p_rtt)
            );
        }
        Some(Err(why)) => {
            println!("  vsock host->guest {h2g:.1} MiB/s, guest->host {g2h:.1} MiB/s, round trip {rtt:.0} us");
            println!("  peer vhost-device-vsock could not be measured: {why}");
        }
        None => {
            println!("  vsock host->guest {h2g:.1} MiB/s, guest->host {g2h:.1} MiB/s, round trip {rtt:.0} us");
            println!("  peer vhost-device-vsock not measured: its binary is missing (tests/run-bench.sh installs it)");
        }
    }
    if let Some(first) = peer_tx_errors.first() {
        println!(
            "  peer vhost-device-vsock dropped {} guest TX packet(s); first: {first}",
            peer_tx_errors.len()
        );
    }
    if std::env::var_os("HUSK_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
}
