//! The agent bench over the guest path: median figures from real guests
//! booted through the shim's own sandbox code on the `qemu` backend
//! (product kernel, the static agent as PID 1, our vsock and virtio-fs
//! device models over vhost-user).
//!
//! - VM launch -> agent `Check` answered, over `HUSK_BENCH_BOOTS` boots (5);
//! - CreateContainer + StartContainer latency (the busybox rootfs is put in
//!   the share beforehand, outside the timing), over `HUSK_BENCH_OPS` (20);
//! - exec latency: ExecProcess of `true` until WaitProcess returns;
//! - stdio throughput: MiB/s of a container's stdout (`head -c` of
//!   /dev/zero) read on the host, over 3 runs of 64 MiB.
//!
//! Each line names the transport and the accelerator. Run it with
//! `cargo run --release -p husk-tests --example agent_bench`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_test_support::bundle::container_spec;
use husk_test_support::stdio::Pipes;
use husk_tests::bench::{count_from_env, median};
use husk_tests::guest::{GuestSandbox, DEFAULT_SIZE};
use tokio::io::AsyncReadExt;

const DEFAULT_BOOTS: usize = 5;
const DEFAULT_OPS: usize = 20;
const STREAM_RUNS: usize = 3;
const STREAM_BYTES: u64 = 64 << 20;

fn summary(samples: &mut [f64]) -> String {
    let med = median(samples);
    format!(
        "median {med:.1} (min {:.1}, max {:.1}, n={})",
        samples[0],
        samples[samples.len() - 1],
        samples.len()
    )
}

fn main() -> ExitCode {
    let runtime = match husk_tests::guest::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot build the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("agent bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether every figure was measured.
async fn run() -> Result<bool> {
    let boots = count_from_env("HUSK_BENCH_BOOTS", DEFAULT_BOOTS);
    let ops = count_from_env("HUSK_BENCH_OPS", DEFAULT_OPS);
    let mut boot_ms = Vec::new();
    let mut sandbox = None;
    for boot in 0..boots {
        let guest = GuestSandbox::boot(DEFAULT_SIZE)
            .await
            .with_context(|| format!("boot {} of {boots}", boot + 1))?;
        boot_ms.push(guest.agent_ready_after().as_secs_f64() * 1000.0);
        if boot + 1 < boots {
            let teardown = guest.shut_down().await?;
            ensure!(
                teardown.leftovers.is_empty(),
                "boot {} left {:?}",
                boot + 1,
                teardown.leftovers
            );
        } else {
            sandbox = Some(guest);
        }
    }
    let sandbox = sandbox.context("no guest was booted")?;
    let label = format!(
        "[vhost-user vsock + virtio-fs in {} microvm, {}]",
        sandbox.vm().backend,
        sandbox.vm().accelerator
    );
    println!(
        "agent bench {label}: VM launch -> agent Check answered: ms {}",
        summary(&mut boot_ms)
    );

    let mut complete = true;
    let figures: [(&str, Result<String>); 3] = [
        (
            "CreateContainer+StartContainer",
            create_start_ms(&sandbox, ops)
                .await
                .map(|mut s| format!("ms {}", summary(&mut s))),
        ),
        (
            "exec of `true` until WaitProcess returns",
            exec_ms(&sandbox, ops)
                .await
                .map(|mut s| format!("ms {}", summary(&mut s))),
        ),
        (
            "container stdout to the host",
            stdout_mib_per_s(&sandbox).await.map(|mut s| {
                format!(
                    "MiB/s {} of {} MiB runs",
                    summary(&mut s),
                    STREAM_BYTES >> 20
                )
            }),
        ),
    ];
    for (what, figure) in figures {
        match figure {
            Ok(text) => println!("agent bench {label}: {what}: {text}"),
            Err(error) => {
                complete = false;
                println!("agent bench {label}: {what}: NOT MEASURED: {error:#}");
            }
        }
    }
    let teardown = sandbox.shut_down().await?;
    ensure!(
        teardown.leftovers.is_empty(),
        "the last guest left {:?}",
        teardown.leftovers
    );
    Ok(complete)
}

async fn create_start_ms(sb: &GuestSandbox, ops: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::new();
    for op in 0..ops {
        let id = format!("bench-create-{op}");
        let rootfs = sb.add_rootfs(&id)?;
        let started = Instant::now();
        sb.create_container_in(&id, &rootfs, &container_spec(&["true"], false), Pipes::NONE)
            .await?;
        sb.client()
            .start_container(&id)
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        let exit = sb.wait(&id, "").await?;
        ensure!(exit.status == 0, "{id} exited with {}", exit.status);
        sb.remove_container(&id).await?;
    }
    Ok(samples)
}

async fn exec_ms(sb: &GuestSandbox, ops: usize) -> Result<Vec<f64>> {
    let id = "bench-exec";
    sb.run_container(id, &["sleep", "100000"], Pipes::NONE)
        .await?;
    let mut samples = Vec::new();
    for op in 0..ops {
        let exec_id = format!("true-{op}");
        let started = Instant::now();
        sb.exec(id, &exec_id, &["true"], Pipes::NONE).await?;
        let exit = sb.wait(id, &exec_id).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        ensure!(
            exit.status == 0,
            "exec {exec_id} exited with {}",
            exit.status
        );
    }
    sb.client()
        .signal_process(id, "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL")?;
    sb.wait(id, "").await?;
    sb.remove_container(id).await?;
    Ok(samples)
}

async fn stdout_mib_per_s(sb: &GuestSandbox) -> Result<Vec<f64>> {
    let mut samples = Vec::new();
    for run in 0..STREAM_RUNS {
        let id = format!("bench-stream-{run}");
        let count = STREAM_BYTES.to_string();
        let args = ["head", "-c", count.as_str(), "/dev/zero"];
        let mut io = sb.create_container(&id, &args, Pipes::OUT_ERR).await?;
        let mut stdout = io.take_stdout()?;
        let started = Instant::now();
        sb.client()
            .start_container(&id)
            .await
            .with_context(|| format!("StartContainer {id}"))?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(300), stdout.read(&mut buffer))
                .await
                .context("the stdout stream stalled for 300 s")?
                .context("reading the container's stdout")?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        ensure!(
            bytes == STREAM_BYTES,
            "{id}: {bytes} bytes arrived instead of {STREAM_BYTES}"
        );
        samples.push(bytes as f64 / (1 << 20) as f64 / seconds);
        sb.wait(&id, "").await?;
        sb.remove_container(&id).await?;
    }
    Ok(samples)
}
