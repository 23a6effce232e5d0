//! The CRI bench: what kubelet waits for and what a pod's network gives,
//! husk (the `kata` handler) beside runc in the same run, through the CRI
//! plugin of a private containerd with the CRI tier's CNI bridge.
//!
//! - RunPodSandbox → ready (the call returns once the sandbox is ready) and
//!   pod start → first container output (RunPodSandbox, CreateContainer,
//!   StartContainer of `echo`, until the line is in the CRI log file),
//!   `HUSK_BENCH_PODS` (10) pods per handler, interleaved: medians;
//! - TCP host→pod throughput: `HUSK_BENCH_TCP_MIB` (256) MiB sent to a
//!   container's `nc -l` at the pod IP, timed until the container closed
//!   the connection (it has read everything);
//! - TCP connect latency host→pod IP: the median of 50 connects to a
//!   listening container (the guest kernel's SYN-ACK round trip).
//!
//! Figures only: nothing passes or fails on a number. Run it with
//! `cargo run --release -p husk-tests --example cri_bench`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_test_support::tempdir::TestDir;
use husk_tests::bench::{count_from_env, median};
use husk_tests::containerd::{
    cri_network, Options, PrivateContainerd, CRI_NAMESPACE, IMAGE, PAUSE_IMAGE,
};
use husk_tests::cri::{self, CriClient};
use k8s_cri::v1::{ContainerConfig, LinuxPodSandboxConfig, PodSandboxConfig};

const HANDLERS: [&str; 2] = ["runc", "kata"];
const DEFAULT_PODS: usize = 10;
const DEFAULT_TCP_MIB: usize = 256;
const CONNECTS: usize = 50;
/// How long a first output or a listener may take to appear.
const WAIT: Duration = Duration::from_secs(60);

struct Bench {
    client: CriClient,
    logs: std::path::PathBuf,
    next: usize,
}

impl Bench {
    fn pod_config(&mut self, handler: &str, what: &str) -> PodSandboxConfig {
        self.next += 1;
        let name = format!("bench-{what}-{handler}-{}", self.next);
        let log_directory = self.logs.join(&name);
        let _ = std::fs::create_dir_all(&log_directory);
        let mut config = cri::pod_config(&name, "husk-bench", &log_directory);
        config.linux = Some(LinuxPodSandboxConfig::default());
        config
    }

    fn container(&self, name: &str, command: &[&str]) -> ContainerConfig {
        cri::container_config(name, IMAGE, command)
    }

    fn remove_pod(&self, pod: &str) {
        if let Err(error) = self
            .client
            .stop_pod(pod)
            .and_then(|()| self.client.remove_pod(pod))
        {
            eprintln!("cri bench: removing pod {pod}: {error:#}");
        }
    }

    /// One pod: (RunPodSandbox → ready, start → first output), in ms.
    fn start_to_output(&mut self, handler: &str) -> Result<(f64, f64)> {
        let config = self.pod_config(handler, "start");
        let started = Instant::now();
        let pod = self.client.run_pod(&config, handler)?;
        let ready = started.elapsed();
        let result = (|| {
            let container = self.container("first", &["echo", "first-output"]);
            let id = self.client.create_container(&pod, &container, &config)?;
            self.client.start_container(&id)?;
            let log = Path::new(&config.log_directory).join("first.log");
            loop {
                if std::fs::read_to_string(&log).is_ok_and(|text| text.contains("first-output")) {
                    return Ok(started.elapsed());
                }
                ensure!(
                    started.elapsed() < WAIT,
                    "no first output in {} within {WAIT:?}",
                    log.display()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        })();
        self.remove_pod(&pod);
        let output = result?;
        Ok((ready.as_secs_f64() * 1000.0, output.as_secs_f64() * 1000.0))
    }

    /// A pod whose container runs `command`; (pod id, pod IP).
    fn network_pod(&mut self, handler: &str, command: &[&str]) -> Result<(String, Ipv4Addr)> {
        let config = self.pod_config(handler, "net");
        let pod = self.client.run_pod(&config, handler)?;
        let result = (|| {
            let id =
                self.client
                    .create_container(&pod, &self.container("server", command), &config)?;
            self.client.start_container(&id)?;
            self.client.pod_ip(&pod)
        })();
        match result {
            Ok(ip) => Ok((pod, ip)),
            Err(error) => {
                self.remove_pod(&pod);
                Err(error)
            }
        }
    }
}

/// Connects to `address`, retrying until the listener is up.
fn connect(address: SocketAddr) -> Result<TcpStream> {
    let started = Instant::now();
    loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
            Ok(stream) => return Ok(stream),
            Err(error) if started.elapsed() < WAIT => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => bail!("cannot connect to {address} within {WAIT:?}: {error}"),
        }
    }
}

/// MiB/s of `mib` MiB host→pod, until the container closed the connection.
fn throughput(ip: Ipv4Addr, mib: usize) -> Result<f64> {
    let mut stream = connect(SocketAddr::from((ip, 9000)))?;
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for word in block.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    let started = Instant::now();
    for _ in 0..mib {
        stream.write_all(&block).context("sending")?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("waiting for the container to close the connection")?;
    Ok(mib as f64 / started.elapsed().as_secs_f64())
}

/// The median TCP connect time to `ip`:9001, in ms.
fn connect_latency(ip: Ipv4Addr) -> Result<f64> {
    let address = SocketAddr::from((ip, 9001));
    drop(connect(address)?);
    let mut samples = Vec::with_capacity(CONNECTS);
    for _ in 0..CONNECTS {
        let started = Instant::now();
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .with_context(|| format!("connecting to {address}"))?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(stream);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(median(&mut samples))
}

fn run() -> Result<()> {
    let pods = count_from_env("HUSK_BENCH_PODS", DEFAULT_PODS);
    let mib = count_from_env("HUSK_BENCH_TCP_MIB", DEFAULT_TCP_MIB);
    let work = TestDir::new_in(Path::new("/tmp"), "cri-bench")?;
    let mut options = Options::for_tests(work.path())?;
    options.cri = true;
    let mut daemon = PrivateContainerd::start(&work.join("containerd"), &options)
        .context("starting the private containerd with its CRI plugin")?;
    let result = (|| -> Result<()> {
        daemon.import_test_image_into(CRI_NAMESPACE)?;
        let client = CriClient::connect(&daemon.address())?;
        let waited = Instant::now();
        while !client.has_image(PAUSE_IMAGE)? {
            ensure!(
                waited.elapsed() < WAIT,
                "the CRI plugin does not see {PAUSE_IMAGE}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut bench = Bench {
            client,
            logs: work.join("logs"),
            next: 0,
        };
        for handler in HANDLERS {
            bench.start_to_output(handler)?; // warm-up
        }
        let mut ready = [Vec::new(), Vec::new()];
        let mut output = [Vec::new(), Vec::new()];
        for _ in 0..pods {
            for (i, handler) in HANDLERS.iter().enumerate() {
                let (r, o) = bench.start_to_output(handler)?;
                ready[i].push(r);
                output[i].push(o);
            }
        }
        println!(
            "CRI pods, {pods} per handler, interleaved (containerd's CRI plugin, CNI bridge {} on {}):",
            cri_network::BRIDGE,
            cri_network::SUBNET
        );
        let mut medians = [[0.0; 2]; 2];
        for (i, handler) in HANDLERS.iter().enumerate() {
            medians[i] = [median(&mut ready[i]), median(&mut output[i])];
            println!(
                "  {handler:<5} RunPodSandbox → ready median {:8.1} ms   pod start → first output median {:8.1} ms",
                medians[i][0], medians[i][1]
            );
        }
        println!(
            "  kata / runc: ready {:.2}, first output {:.2}",
            medians[1][0] / medians[0][0],
            medians[1][1] / medians[0][1]
        );

        println!("TCP host → pod IP ({mib} MiB to a container's nc; connect latency over {CONNECTS} connects):");
        let mut figures = [[0.0; 2]; 2];
        for (i, handler) in HANDLERS.iter().enumerate() {
            let (pod, ip) = bench.network_pod(
                handler,
                &[
                    "sh",
                    "-c",
                    "nc -ll -p 9001 -e true & nc -l -p 9000 > /dev/null; sleep 1000",
                ],
            )?;
            let measured =
                connect_latency(ip).and_then(|latency| Ok((latency, throughput(ip, mib)?)));
            bench.remove_pod(&pod);
            let (latency, rate) =
                measured.with_context(|| format!("the {handler} pod's network"))?;
            figures[i] = [rate, latency];
            println!(
                "  {handler:<5} throughput {rate:8.1} MiB/s   connect latency median {latency:6.3} ms"
            );
        }
        println!(
            "  kata / runc: throughput {:.3}, connect latency {:.2}",
            figures[1][0] / figures[0][0],
            figures[1][1] / figures[0][1]
        );
        println!(
            "  (husk pods run under QEMU; under TCG the guest's CPU is emulated, see the README)"
        );
        Ok(())
    })();
    let forced = daemon
        .stop()
        .unwrap_or_else(|error| vec![format!("{error:#}")]);
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", cri_network::BRIDGE])
        .output();
    if !forced.is_empty() {
        eprintln!("cri bench: the clean-up had to force: {forced:?}");
    }
    result
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cri bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}
