//! The agent's guest tier: ONE guest boots through the shim's own sandbox
//! code (`husk_shim::sandbox::Sandbox::boot`, the `qemu` backend) with the
//! product kernel, an initramfs holding only the static agent as PID 1, and
//! our vsock and virtio-fs device models served over vhost-user from this
//! process. The shim's client reaches the agent over hybrid vsock and
//! creates the sandbox (the guest mounts the share), and every check below
//! runs busybox containers whose rootfs is bind-mounted into the share.
//!
//! A TCG boot costs seconds, so the checks share the guest and run in a
//! fixed order under this file's own `main` (`harness = false`), each
//! reported as `test <name> ... ok|FAILED` under the name of the behaviour
//! it proves; the last one destroys the sandbox, proves that the guest
//! powered itself off, and that the shim's teardown left nothing on the
//! host. `cargo test --test guest_agent
//! -- <substring>` runs only the matching checks (the teardown always runs).
//! Missing artifacts fail with the command that makes them.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_agent_client::Code;
use husk_shim::hypervisor::qemu::GuestEnd;
use husk_test_support::artifacts::host_kernel_release;
use husk_test_support::bundle::container_spec;
use husk_test_support::form::announce_form;
use husk_test_support::stdio::{read_text, read_to_end, read_until, Pipes};
use husk_tests::guest::{GuestSandbox, DEFAULT_SIZE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one ordinary check may take under TCG.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the 100 MiB stream may take (TCG generates and hashes it).
const STREAM_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a single stdio stream may take to reach end of file.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The size of the big stdout stream.
const STREAM_BYTES: u64 = 100 << 20;

type CheckFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One named check against the shared guest.
struct Check {
    name: &'static str,
    timeout: Duration,
    run: fn(Arc<GuestSandbox>) -> CheckFuture,
}

fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "container_uname_reports_the_guest_kernel_not_the_hosts",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(container_uname_reports_the_guest_kernel_not_the_hosts(sb)),
        },
        Check {
            name: "stdin_is_echoed_to_stdout_and_stderr_arrives_separately",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(stdin_is_echoed_to_stdout_and_stderr_arrives_separately(sb)),
        },
        Check {
            name: "exit_codes_zero_and_three_reach_the_host",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(exit_codes_zero_and_three_reach_the_host(sb)),
        },
        Check {
            name: "container_killed_by_sigkill_reports_137_and_is_then_not_found",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(container_killed_by_sigkill_reports_137_and_is_then_not_found(sb)),
        },
        Check {
            name: "exec_runs_inside_the_running_container_and_can_be_killed",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(exec_runs_inside_the_running_container_and_can_be_killed(sb)),
        },
        Check {
            name: "stdin_half_close_gives_cat_and_wc_end_of_file_and_their_output_arrives",
            timeout: CHECK_TIMEOUT,
            run: |sb| {
                Box::pin(stdin_half_close_gives_cat_and_wc_end_of_file_and_their_output_arrives(sb))
            },
        },
        Check {
            name: "an_oom_kill_is_an_event_before_the_exit_and_the_status_is_137",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(an_oom_kill_is_an_event_before_the_exit_and_the_status_is_137(sb)),
        },
        Check {
            name: "an_oom_kill_of_a_child_is_an_event_while_the_container_runs_on",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(an_oom_kill_of_a_child_is_an_event_while_the_container_runs_on(sb)),
        },
        Check {
            name: "io_stats_report_the_guests_block_io_honestly",
            timeout: CHECK_TIMEOUT,
            run: |sb| Box::pin(io_stats_report_the_guests_block_io_honestly(sb)),
        },
        Check {
            name: "restored_sets_the_guest_clock_and_refuses_what_does_not_fit",
            timeout: CHECK_TIMEOUT,
            run: |sb| {
                Box::pin(restored_sets_the_guest_clock_and_refuses_what_does_not_fit(
                    sb,
                ))
            },
        },
        Check {
            name: "hundred_mib_of_container_stdout_arrive_intact",
            timeout: STREAM_TIMEOUT,
            run: |sb| Box::pin(hundred_mib_of_container_stdout_arrive_intact(sb)),
        },
    ]
}

/// The teardown check's name; it always runs last.
const TEARDOWN_CHECK: &str = "destroy_sandbox_powers_the_guest_off_and_leaves_nothing_on_the_host";

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let runtime = match husk_tests::guest::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot build the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(filters))
}

async fn run(filters: Vec<String>) -> ExitCode {
    let started = Instant::now();
    let sandbox = match GuestSandbox::boot(DEFAULT_SIZE).await {
        Ok(sandbox) => sandbox,
        Err(error) => {
            eprintln!("test guest_boot ... FAILED\n{error:#}");
            announce_form(
                "agent guest tier via qemu: FAILED before any check (the guest did not come up)",
            );
            return ExitCode::FAILURE;
        }
    };
    announce_form(format_args!(
        "agent guest tier via {} ({})",
        sandbox.vm().backend,
        sandbox.vm().accelerator
    ));
    println!(
        "agent answered Check {:.2} s after the VM was launched (vhost-user vsock + virtio-fs, qemu microvm, {})",
        sandbox.agent_ready_after().as_secs_f64(),
        sandbox.vm().accelerator
    );

    let sandbox = Arc::new(sandbox);
    let (mut passed, mut failed) = (0usize, Vec::new());
    for check in checks() {
        if !filters.is_empty() && !filters.iter().any(|f| check.name.contains(f.as_str())) {
            continue;
        }
        let check_started = Instant::now();
        // A task of its own, so a panic in a check fails that check only.
        let task = tokio::spawn((check.run)(sandbox.clone()));
        let outcome = match tokio::time::timeout(check.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => Err(anyhow::anyhow!("the check panicked: {join_error}")),
            Err(_) => Err(anyhow::anyhow!(
                "the check took longer than {:?}",
                check.timeout
            )),
        };
        let seconds = check_started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                println!("test {} ... ok ({seconds:.1} s)", check.name);
                passed += 1;
            }
            Err(error) => {
                println!("test {} ... FAILED ({seconds:.1} s)", check.name);
                eprintln!(
                    "---- {} ----\n{error:#}\n---- guest console (tail) ----\n{}",
                    check.name,
                    sandbox.console_tail()
                );
                failed.push(check.name);
            }
        }
    }

    let check_started = Instant::now();
    let outcome = match Arc::try_unwrap(sandbox) {
        Ok(sandbox) => {
            destroy_sandbox_powers_the_guest_off_and_leaves_nothing_on_the_host(sandbox).await
        }
        Err(_) => Err(anyhow::anyhow!("a timed-out check still holds the sandbox")),
    };
    let seconds = check_started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => {
            println!("test {TEARDOWN_CHECK} ... ok ({seconds:.1} s)");
            passed += 1;
        }
        Err(error) => {
            println!("test {TEARDOWN_CHECK} ... FAILED ({seconds:.1} s)");
            eprintln!("---- {TEARDOWN_CHECK} ----\n{error:#}");
            failed.push(TEARDOWN_CHECK);
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; one guest, {:.1} s in all",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failures: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the host clock is after 1970")
        .as_secs()
}

/// The guest's wall clock as a container reads it (`date +%s`).
async fn guest_seconds(sb: &GuestSandbox, id: &str) -> Result<u64> {
    let mut io = sb
        .run_container(id, &["date", "+%s"], Pipes::OUT_ERR)
        .await?;
    let stdout = read_text(&mut io.take_stdout()?, READ_TIMEOUT).await?;
    sb.wait(id, "").await?;
    sb.remove_container(id).await?;
    stdout
        .trim()
        .parse()
        .with_context(|| format!("date +%s printed {stdout:?}"))
}

/// The `Restored` request a VM restored from a template gets first: here
/// the guest booted, so it proves what the agent does with one. The clock
/// moves to what the host sends (an hour ahead, then back); a request
/// naming a NIC the guest does not have, or too little entropy, is refused
/// with the reason.
async fn restored_sets_the_guest_clock_and_refuses_what_does_not_fit(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    use husk_agent_client::agent::RestoredRequest;
    let request = |seconds: u64, macs: Vec<Vec<u8>>| RestoredRequest {
        realtime_unix_ns: seconds * 1_000_000_000,
        entropy: (0..64u8).collect(),
        nic_macs: macs,
        ..Default::default()
    };
    let ahead = unix_now() + 3600;
    sb.client().restored(request(ahead, vec![])).await?;
    let guest = guest_seconds(&sb, "date-ahead").await?;
    ensure!(
        guest.abs_diff(ahead) < 120,
        "after Restored with {ahead}, the guest's clock reads {guest}"
    );
    let no_nic = sb
        .client()
        .restored(request(unix_now(), vec![vec![2, 0, 0, 0, 0, 9]]))
        .await
        .expect_err("a NIC the guest does not have is refused");
    ensure!(
        no_nic
            .to_string()
            .contains("the host names 1 NICs, the guest has 0"),
        "{no_nic}"
    );
    let mut thin = request(unix_now(), vec![]);
    thin.entropy = vec![1; 8];
    let refused = sb
        .client()
        .restored(thin)
        .await
        .expect_err("8 bytes of entropy are refused");
    ensure!(
        refused.code() == Some(Code::INVALID_ARGUMENT) && refused.to_string().contains("8 bytes"),
        "{refused}"
    );
    let now = unix_now();
    sb.client().restored(request(now, vec![])).await?;
    let guest = guest_seconds(&sb, "date-now").await?;
    ensure!(
        guest.abs_diff(now) < 120,
        "after Restored with {now}, the guest's clock reads {guest}"
    );
    Ok(())
}

async fn container_uname_reports_the_guest_kernel_not_the_hosts(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    let mut io = sb
        .run_container("uname", &["uname", "-r"], Pipes::OUT_ERR)
        .await?;
    let stdout = read_text(&mut io.take_stdout()?, READ_TIMEOUT).await?;
    let exit = sb.wait("uname", "").await?;
    ensure!(exit.status == 0, "uname -r exited with {}", exit.status);
    let host = host_kernel_release()?;
    ensure!(
        stdout.trim() == sb.kernel_release(),
        "the container's uname -r printed {stdout:?}, the guest kernel is {:?}",
        sb.kernel_release()
    );
    ensure!(
        stdout.trim() != host,
        "the container printed the host's release {host:?}: it did not run in the guest"
    );
    sb.remove_container("uname").await
}

async fn stdin_is_echoed_to_stdout_and_stderr_arrives_separately(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    let mut io = sb
        .run_container(
            "echo",
            &["sh", "-c", "cat; echo out; echo err >&2"],
            Pipes::ALL,
        )
        .await?;
    let mut stdin = io.take_stdin()?;
    let mut stdout = io.take_stdout()?;
    stdin
        .write_all(b"hello from the host\n")
        .await
        .context("writing the container's stdin")?;
    let echoed = read_until(&mut stdout, "hello from the host\n", READ_TIMEOUT).await?;
    // CloseStdin is how the shim ends a process's input (containerd's
    // CloseIO); cat then sees end of file and the script goes on.
    sb.client()
        .close_stdin("echo", "")
        .await
        .context("CloseStdin echo")?;
    let rest = read_text(&mut stdout, READ_TIMEOUT).await?;
    let stderr = read_text(&mut io.take_stderr()?, READ_TIMEOUT).await?;
    let stdout = format!("{echoed}{rest}");
    ensure!(
        stdout == "hello from the host\nout\n",
        "stdout was {stdout:?}"
    );
    ensure!(stderr == "err\n", "stderr was {stderr:?}");
    let exit = sb.wait("echo", "").await?;
    ensure!(
        exit.status == 0,
        "the echo container exited with {}",
        exit.status
    );
    drop(stdin);
    sb.remove_container("echo").await
}

async fn exit_codes_zero_and_three_reach_the_host(sb: Arc<GuestSandbox>) -> Result<()> {
    for (id, script, expected) in [("exit0", "exit 0", 0), ("exit3", "exit 3", 3)] {
        sb.run_container(id, &["sh", "-c", script], Pipes::NONE)
            .await?;
        let exit = sb.wait(id, "").await?;
        ensure!(
            exit.status == expected,
            "`sh -c {script:?}` reported {} instead of {expected}",
            exit.status
        );
        ensure!(exit.exited_at_unix_ns > 0, "no exit time for {id}");
        sb.remove_container(id).await?;
    }
    Ok(())
}

async fn container_killed_by_sigkill_reports_137_and_is_then_not_found(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    let pid = {
        sb.create_container("sleeper", &["sleep", "1000"], Pipes::NONE)
            .await?;
        sb.client()
            .start_container("sleeper")
            .await
            .context("StartContainer sleeper")?
    };
    ensure!(pid > 0, "StartContainer returned pid {pid}");
    sb.client()
        .signal_process("sleeper", "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL")?;
    let exit = sb.wait("sleeper", "").await?;
    ensure!(
        exit.status == 137,
        "SIGKILL reported {} instead of 137",
        exit.status
    );
    match sb
        .client()
        .signal_process("sleeper", "", libc::SIGKILL as u32, false)
        .await
    {
        Err(error) if error.code() == Some(Code::NOT_FOUND) => {}
        other => bail!("signalling the dead init gave {other:?}, not NOT_FOUND"),
    }
    sb.remove_container("sleeper").await
}

async fn exec_runs_inside_the_running_container_and_can_be_killed(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    sb.run_container("host", &["sleep", "1000"], Pipes::NONE)
        .await?;
    let mut io = sb
        .exec(
            "host",
            "look",
            &["sh", "-c", "hostname; cat /proc/1/comm; uname -r; exit 5"],
            Pipes::OUT_ERR,
        )
        .await?;
    let stdout = read_text(&mut io.take_stdout()?, READ_TIMEOUT).await?;
    let expected = format!("husk-container\nsleep\n{}\n", sb.kernel_release());
    ensure!(
        stdout == expected,
        "the exec printed {stdout:?}, expected {expected:?} (the container's hostname, its init, the guest kernel)"
    );
    let exit = sb.wait("host", "look").await?;
    ensure!(
        exit.status == 5,
        "the exec exited with {} instead of 5",
        exit.status
    );

    sb.exec("host", "long", &["sleep", "1000"], Pipes::NONE)
        .await?;
    sb.client()
        .signal_process("host", "long", libc::SIGTERM as u32, false)
        .await
        .context("SignalProcess SIGTERM to the exec")?;
    let exit = sb.wait("host", "long").await?;
    ensure!(
        exit.status == 128 + libc::SIGTERM,
        "the killed exec reported {}",
        exit.status
    );
    let processes = sb
        .client()
        .list_processes("host")
        .await
        .context("ListProcesses")?;
    ensure!(
        processes.len() == 1,
        "the init should be alone after the exec's end: {processes:?}"
    );

    sb.client()
        .signal_process("host", "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL to the init")?;
    let exit = sb.wait("host", "").await?;
    ensure!(
        exit.status == 137,
        "the killed init reported {}",
        exit.status
    );
    sb.remove_container("host").await
}

async fn hundred_mib_of_container_stdout_arrive_intact(sb: Arc<GuestSandbox>) -> Result<()> {
    // The container hashes exactly what it writes: tee feeds a FIFO read
    // by sha256sum, whose digest goes to stderr. `wait` keeps the init (sh)
    // alive until sha256sum printed: the init's exit would kill it.
    let script = format!(
        "mkfifo /tmp/f && {{ sha256sum < /tmp/f >&2 & head -c {STREAM_BYTES} /dev/urandom | tee /tmp/f; wait; }}"
    );
    let started = Instant::now();
    let mut io = sb
        .run_container("stream", &["sh", "-c", &script], Pipes::OUT_ERR)
        .await?;
    let mut stdout = io.take_stdout()?;
    let reader = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = stdout
                .read(&mut buffer)
                .await
                .context("reading the 100 MiB stdout")?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            bytes += n as u64;
        }
        anyhow::Ok((bytes, hasher.finalize()))
    });
    let stderr = read_to_end(&mut io.take_stderr()?, STREAM_TIMEOUT).await?;
    let (bytes, digest) = reader.await.context("the stdout reader task")??;
    let seconds = started.elapsed().as_secs_f64();
    let exit = sb.wait("stream", "").await?;
    let stderr = String::from_utf8_lossy(&stderr);
    let guest_digest = stderr.split_whitespace().next().unwrap_or_default();
    let host_digest: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    ensure!(
        exit.status == 0,
        "the stream container exited with {}; stderr {stderr:?}",
        exit.status
    );
    ensure!(
        bytes == STREAM_BYTES,
        "{bytes} bytes arrived instead of {STREAM_BYTES}"
    );
    ensure!(
        guest_digest == host_digest,
        "the guest hashed {guest_digest:?} (stderr {stderr:?}), the host received {host_digest}"
    );
    println!(
        "    100 MiB of stdout in {seconds:.1} s ({:.1} MiB/s, generated and hashed in the guest), sha256 {host_digest}",
        100.0 / seconds
    );
    sb.remove_container("stream").await
}

/// Writes `data` to `stdin`, then shuts its write side down (half-close):
/// the stream stays open for the guest's side to close.
async fn write_then_half_close(
    mut stdin: tokio::net::UnixStream,
    data: Vec<u8>,
) -> Result<tokio::net::UnixStream> {
    stdin
        .write_all(&data)
        .await
        .context("writing the process's stdin")?;
    stdin
        .shutdown()
        .await
        .context("shutting down the stdin stream's write side")?;
    Ok(stdin)
}

async fn stdin_half_close_gives_cat_and_wc_end_of_file_and_their_output_arrives(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    // A container init: cat copies 256 KiB (more than a pipe, the stream's
    // credit and a socket buffer hold) back, then sees end of file. The
    // host reads while it writes, as a shim does.
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut io = sb.run_container("halfcat", &["cat"], Pipes::ALL).await?;
    let writer = tokio::spawn(write_then_half_close(io.take_stdin()?, data.clone()));
    let echoed = read_to_end(&mut io.take_stdout()?, READ_TIMEOUT).await?;
    let stdin = writer.await.context("the stdin writer task")??;
    ensure!(
        echoed == data,
        "cat echoed {} bytes, {} sent (equal prefix {} bytes)",
        echoed.len(),
        data.len(),
        echoed.iter().zip(&data).take_while(|(a, b)| a == b).count()
    );
    let exit = sb.wait("halfcat", "").await?;
    ensure!(exit.status == 0, "cat exited with {}", exit.status);
    drop(stdin);
    sb.remove_container("halfcat").await?;

    // An exec: `sh -c 'wc -c'` counts 1 MiB and prints after end of file.
    sb.run_container("halfhost", &["sleep", "1000"], Pipes::NONE)
        .await?;
    let mut io = sb
        .exec("halfhost", "wc", &["sh", "-c", "wc -c"], Pipes::ALL)
        .await?;
    let writer = tokio::spawn(write_then_half_close(io.take_stdin()?, vec![b'x'; 1 << 20]));
    let counted = read_text(&mut io.take_stdout()?, READ_TIMEOUT).await?;
    let stdin = writer.await.context("the stdin writer task")??;
    ensure!(
        counted.trim() == "1048576",
        "wc -c printed {counted:?} for 1 MiB of stdin"
    );
    let exit = sb.wait("halfhost", "wc").await?;
    ensure!(exit.status == 0, "the wc exec exited with {}", exit.status);
    drop(stdin);
    sb.client()
        .signal_process("halfhost", "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL halfhost")?;
    sb.wait("halfhost", "").await?;
    sb.remove_container("halfhost").await
}

async fn an_oom_kill_is_an_event_before_the_exit_and_the_status_is_137(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    let before = sb
        .client()
        .get_events(0, 0)
        .await
        .context("GetEvents (baseline)")?;
    let after = before.iter().map(|e| e.sequence).max().unwrap_or(0);
    // dd fills its 64 MiB block buffer from /dev/zero, touching every page,
    // under a 32 MiB limit: the cgroup's OOM killer ends it.
    let limit = 32u64 << 20;
    let mut spec = container_spec(
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        false,
    );
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": limit}});
    sb.create_container_with_spec("hog", &spec, Pipes::NONE)
        .await?;
    sb.client()
        .start_container("hog")
        .await
        .context("StartContainer hog")?;
    let exit = sb.wait("hog", "").await?;
    ensure!(
        exit.status == 137,
        "the OOM-killed init reported {} instead of 137",
        exit.status
    );
    let stats = sb
        .client()
        .stats_container("hog")
        .await
        .context("StatsContainer hog")?;
    ensure!(
        stats.memory.limit_bytes == limit && stats.memory.oom_kills >= 1,
        "stats after the OOM kill: limit {} (set {limit}), oom_kills {}",
        stats.memory.limit_bytes,
        stats.memory.oom_kills
    );
    // WaitProcess returns after the exit event is logged, and the OOM event
    // is logged before the exit it caused.
    let events = sb
        .client()
        .get_events(after, 5_000)
        .await
        .context("GetEvents")?;
    let oom = events
        .iter()
        .find(|e| e.has_oom() && e.oom().container_id == "hog");
    let exited = events
        .iter()
        .find(|e| e.has_exited() && e.exited().container_id == "hog");
    match (oom, exited) {
        (Some(oom), Some(exited)) => ensure!(
            oom.sequence < exited.sequence && exited.exited().exit_status == 137,
            "OomKilled #{} and exit #{} (status {}) for hog",
            oom.sequence,
            exited.sequence,
            exited.exited().exit_status
        ),
        _ => bail!("no OomKilled and exit events for hog in {events:?}"),
    }
    sb.remove_container("hog").await
}

async fn an_oom_kill_of_a_child_is_an_event_while_the_container_runs_on(
    sb: Arc<GuestSandbox>,
) -> Result<()> {
    let before = sb
        .client()
        .get_events(0, 0)
        .await
        .context("GetEvents (baseline)")?;
    let mut after = before.iter().map(|e| e.sequence).max().unwrap_or(0);
    // The shell (the init) outlives its OOM-killed dd: no process the
    // agent follows exits, so only the agent's watch of the cgroup's
    // memory.events can report the kill.
    let limit = 32u64 << 20;
    let mut spec = container_spec(
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=64M count=1; echo dd-ended; exec sleep 1000",
        ],
        false,
    );
    spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": limit}});
    sb.create_container_with_spec("childhog", &spec, Pipes::NONE)
        .await?;
    sb.client()
        .start_container("childhog")
        .await
        .context("StartContainer childhog")?;
    let found = loop {
        let events = sb
            .client()
            .get_events(after, 30_000)
            .await
            .context("GetEvents")?;
        ensure!(
            !events.is_empty(),
            "no event within 30 s of the OOM-killing container's start"
        );
        if let Some(event) = events
            .iter()
            .find(|e| e.has_oom() && e.oom().container_id == "childhog")
        {
            break event.clone();
        }
        ensure!(
            !events
                .iter()
                .any(|e| e.has_exited() && e.exited().container_id == "childhog"),
            "childhog exited without an OOM event: {events:?}"
        );
        after = events.iter().map(|e| e.sequence).max().unwrap_or(after);
    };
    let processes = sb
        .client()
        .list_processes("childhog")
        .await
        .context("ListProcesses childhog")?;
    ensure!(
        !processes.is_empty(),
        "the container ended although only its child was OOM-killed (event {found:?})"
    );
    sb.client()
        .signal_process("childhog", "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL childhog")?;
    let exit = sb.wait("childhog", "").await?;
    ensure!(exit.status == 137, "childhog reported {}", exit.status);
    // The kill was reported once: nothing new at the init's exit.
    let events = sb
        .client()
        .get_events(found.sequence, 0)
        .await
        .context("GetEvents after the exit")?;
    ensure!(
        !events.iter().any(|e| e.has_oom()),
        "a second OOM event after the first: {events:?}"
    );
    sb.remove_container("childhog").await
}

/// Sums `rbytes=` and `wbytes=` over the lines of an `io.stat` text.
fn io_stat_sums(text: &str) -> (u64, u64) {
    let mut sums = (0u64, 0u64);
    for word in text.split_whitespace() {
        if let Some(v) = word
            .strip_prefix("rbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            sums.0 += v;
        } else if let Some(v) = word
            .strip_prefix("wbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            sums.1 += v;
        }
    }
    sums
}

async fn io_stats_report_the_guests_block_io_honestly(sb: Arc<GuestSandbox>) -> Result<()> {
    // 8 MiB written with fsync to the rootfs (virtio-fs); then the guest's
    // block devices and the container's own io.stat, read through a
    // read-only cgroup mount (no cgroup namespace: as under runc, the
    // container's own cgroup directory is what /sys/fs/cgroup shows).
    let script = "dd if=/dev/zero of=/data bs=1M count=8 conv=fsync 2>/dev/null && echo written; \
                  echo devices: $(ls /sys/block); \
                  if [ -e /sys/fs/cgroup/io.stat ]; then echo io.stat:; cat /sys/fs/cgroup/io.stat; \
                  else echo no io.stat in /sys/fs/cgroup; fi; echo end; exec sleep 1000";
    let mut spec = container_spec(&["sh", "-c", script], false);
    spec["mounts"]
        .as_array_mut()
        .context("the spec's mounts")?
        .push(serde_json::json!({
            "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "ro"]
        }));
    let mut io = sb
        .create_container_with_spec("iowriter", &spec, Pipes::OUT_ERR)
        .await?;
    sb.client()
        .start_container("iowriter")
        .await
        .context("StartContainer iowriter")?;
    let mut stdout = io.take_stdout()?;
    let report = read_until(&mut stdout, "end\n", READ_TIMEOUT).await?;
    let mut lines = report.lines();
    ensure!(
        lines.next() == Some("written"),
        "the writer printed {report:?}"
    );
    let devices: Vec<&str> = lines
        .next()
        .and_then(|l| l.strip_prefix("devices:"))
        .map(|l| l.split_whitespace().collect())
        .with_context(|| format!("no device line in {report:?}"))?;
    ensure!(
        lines.next() == Some("io.stat:"),
        "the container's cgroup has no io.stat (is the io controller enabled?): {report:?}"
    );
    let io_stat: String = lines
        .take_while(|l| *l != "end")
        .collect::<Vec<_>>()
        .join("\n");
    let (read, written) = io_stat_sums(&io_stat);
    let stats = sb
        .client()
        .stats_container("iowriter")
        .await
        .context("StatsContainer iowriter")?;
    ensure!(
        stats.io.read_bytes >= read && stats.io.write_bytes >= written,
        "io.stat said rbytes {read} / wbytes {written} ({io_stat:?}), StatsContainer read {} / write {}",
        stats.io.read_bytes,
        stats.io.write_bytes
    );
    if devices.is_empty() {
        // Every file of this guest is on virtio-fs or tmpfs: the kernel
        // accounts no block IO, and the agent must not invent any.
        announce_form(format_args!(
            "guest IO stats: the guest has no block device; its io.stat is {io_stat:?} and both figures must be 0 (8 MiB went to virtio-fs)"
        ));
        ensure!(
            io_stat.trim().is_empty() && stats.io.read_bytes == 0 && stats.io.write_bytes == 0,
            "no block device, yet io.stat {io_stat:?} and StatsContainer read {} / write {} bytes",
            stats.io.read_bytes,
            stats.io.write_bytes
        );
    } else {
        // A block device exists but the container's files are not on it.
        announce_form(format_args!(
            "guest IO stats: block devices {devices:?} carry no container file; io.stat {io_stat:?}, figures read {} / write {} bytes",
            stats.io.read_bytes, stats.io.write_bytes
        ));
    }
    sb.client()
        .signal_process("iowriter", "", libc::SIGKILL as u32, false)
        .await
        .context("SignalProcess SIGKILL iowriter")?;
    sb.wait("iowriter", "").await?;
    sb.remove_container("iowriter").await
}

async fn destroy_sandbox_powers_the_guest_off_and_leaves_nothing_on_the_host(
    sb: GuestSandbox,
) -> Result<()> {
    let work_dir = sb.work_dir().to_path_buf();
    let qemu_pid = sb.vm().vmm_pid;
    let teardown = sb.shut_down().await?;
    ensure!(
        teardown.vm_end == format!("{:?}", GuestEnd::PoweredOff),
        "after DestroySandbox the guest ended as {} (reply {:?})",
        teardown.vm_end,
        teardown.destroy_reply
    );
    ensure!(
        teardown.destroy_reply.is_ok(),
        "DestroySandbox answered {:?}",
        teardown.destroy_reply
    );
    ensure!(
        teardown.leftovers.is_empty(),
        "left on the host after the sandbox ended (QEMU pid {qemu_pid}, work dir {}): {:?}",
        work_dir.display(),
        teardown.leftovers
    );
    println!(
        "    DestroySandbox to QEMU's exit: {:.2} s",
        teardown.destroy_to_exit.as_secs_f64()
    );
    Ok(())
}
