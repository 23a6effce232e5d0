//! The agent's host tier: `husk-agent --test-mode` serves the API on Unix
//! sockets on this host (as root), and the tests drive it only through the
//! `husk-agent-client` library, with busybox containers built in temp dirs.
//!
//! Each test starts its own agent and sandbox; the harness's drop stops the
//! agent (which removes its containers), kills anything left in the
//! sandbox's cgroups, removes those cgroups, and deletes the temp dirs, so a
//! failing test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use husk_agent_client::agent::{CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest};
use husk_agent_client::{AgentClient, Code, Endpoint};
use husk_test_support::artifacts::busybox;
use husk_test_support::bundle::{
    build_busybox_rootfs, container_spec, process_json, CONTAINER_HOSTNAME,
};
use husk_test_support::form::announce_form;
use husk_test_support::stdio::{read_text, read_until, HostStdio, Pipes};
use husk_test_support::tempdir::TestDir;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any single observation may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Announces the form once per run (every test asks).
fn report_form(form: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| announce_form(form));
}

/// Whether the host tier can run; prints the form line either way.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        report_form(&format!(
            "agent host tier not run: needs root (uid {uid}) for namespaces and cgroups"
        ));
        return false;
    }
    if let Err(error) = busybox() {
        report_form(&format!("agent host tier not run: {error:#}"));
        return false;
    }
    report_form("agent host tier (unix sockets, runtime crate)");
    true
}

struct Harness {
    agent: Option<Child>,
    dir: TestDir,
    share: PathBuf,
    busybox: PathBuf,
    sandbox_id: String,
    client: AgentClient,
}

impl Harness {
    async fn start() -> Self {
        let dir = TestDir::new("hosttier").expect("a test directory");
        let busybox = busybox().expect("busybox");
        let share = dir.join("share");
        std::fs::create_dir(&share).unwrap();
        let api = dir.path().join("api.sock");
        let stdio = dir.path().join("stdio.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let agent = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .arg("--test-mode")
            .arg("--api-socket")
            .arg(&api)
            .arg("--stdio-socket")
            .arg(&stdio)
            .arg("--share-dir")
            .arg(&share)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start husk-agent --test-mode");
        let sandbox_id = format!(
            "hosttier-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let endpoint = Endpoint::Unix {
            api_socket: api,
            stdio_socket: stdio,
        };
        let mut harness = Self {
            agent: Some(agent),
            dir,
            share,
            busybox,
            sandbox_id,
            client: match AgentClient::connect(endpoint, Duration::from_secs(10)).await {
                Ok(client) => client,
                Err(error) => panic!("agent did not come up: {error}"),
            },
        };
        let request = CreateSandboxRequest {
            sandbox_id: harness.sandbox_id.clone(),
            hostname: "husk-sandbox".into(),
            dns: vec!["nameserver 10.0.2.3".into()],
            ..Default::default()
        };
        harness
            .client
            .create_sandbox(request)
            .await
            .expect("CreateSandbox");
        harness.sandbox_id = harness.sandbox_id.clone();
        harness
    }

    /// A busybox rootfs for `id` in the share; returns its share-relative path.
    fn rootfs(&self, id: &str) -> String {
        build_busybox_rootfs(&self.busybox, &self.share.join(id).join("rootfs"))
            .expect("a busybox rootfs");
        format!("{id}/rootfs")
    }

    /// Creates (not starts) container `id` running `args`.
    async fn create(&self, id: &str, args: &[&str], pipes: Pipes) -> HostStdio {
        self.create_with_spec(id, container_spec(args, pipes.terminal), pipes)
            .await
    }

    /// Creates (not starts) container `id` from the OCI spec `spec`.
    async fn create_with_spec(&self, id: &str, spec: Value, pipes: Pipes) -> HostStdio {
        let rootfs_path = self.rootfs(id);
        husk_test_support::agent::create_container(&self.client, id, &rootfs_path, &spec, pipes)
            .await
            .expect("CreateContainer")
    }

    async fn exec(&self, id: &str, exec_id: &str, args: &[&str], pipes: Pipes) -> HostStdio {
        husk_test_support::agent::exec_process(&self.client, id, exec_id, args, pipes)
            .await
            .expect("ExecProcess")
    }

    /// Every `husk-<sandbox>` cgroup directory on the host.
    fn sandbox_cgroups(&self) -> Vec<PathBuf> {
        let name = format!("husk-{}", self.sandbox_id);
        let mut found = Vec::new();
        let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if entry.file_name().to_string_lossy() == name {
                    found.push(path);
                } else if depth < 4 {
                    stack.push((path, depth + 1));
                }
            }
        }
        found
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SIGTERM: the agent removes every container, then exits.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while agent.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        // Whatever the agent could not clean up: kill, thaw, remove.
        for parent in self.sandbox_cgroups() {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&parent)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.push(parent.clone());
            for dir in &dirs {
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            for dir in &dirs {
                for _ in 0..100 {
                    if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
            eprintln!("---- agent log ----\n{log}");
        }
    }
}

fn code_of<T: std::fmt::Debug>(result: Result<T, husk_agent_client::ClientError>) -> Option<Code> {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_stdio_streams_carry_stdin_stdout_stderr_and_the_exit_code() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let mut io = h
        .create(
            "echo",
            &["sh", "-c", "cat; echo out; echo err >&2; exit 3"],
            Pipes::ALL,
        )
        .await;
    h.client
        .start_container("echo")
        .await
        .expect("StartContainer");
    let mut stdin = io.stdin.take().unwrap();
    stdin.write_all(b"hello from the host\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let stdout = read_text(io.stdout.as_mut().unwrap(), STEP_TIMEOUT)
        .await
        .unwrap();
    let stderr = read_text(io.stderr.as_mut().unwrap(), STEP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(stdout, "hello from the host\nout\n");
    assert_eq!(stderr, "err\n");
    let exit = h
        .client
        .wait_process("echo", "")
        .await
        .expect("WaitProcess");
    assert_eq!(exit.status, 3);
    assert!(exit.exited_at_unix_ns > 0);
    let events = h.client.get_events(0, 5_000).await.expect("GetEvents");
    assert!(
        events.iter().any(|e| e.has_exited()
            && e.exited().container_id == "echo"
            && e.exited().exit_status == 3),
        "no exit event in {events:?}"
    );
    h.client
        .remove_container("echo", 5)
        .await
        .expect("RemoveContainer");
    assert_eq!(
        code_of(h.client.start_container("echo").await),
        Some(Code::NOT_FOUND)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_written_just_before_exit_is_delivered_before_the_exit_is_reported() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    // 512 KiB (more than a pipe holds) written as the last act of the process.
    let mut io = h
        .create("burst", &["sh", "-c", "i=0; while [ $i -lt 8192 ]; do echo 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde; i=$((i+1)); done"], Pipes::OUT_ERR)
        .await;
    h.client.start_container("burst").await.unwrap();
    let mut stdout = io.stdout.take().unwrap();
    let reader = tokio::spawn(async move { read_text(&mut stdout, STEP_TIMEOUT).await.unwrap() });
    let exit = h.client.wait_process("burst", "").await.unwrap();
    assert_eq!(exit.status, 0);
    // The stream ended before WaitProcess returned: the reader is done or
    // finishes from what is already buffered.
    let output = reader.await.unwrap();
    assert_eq!(output.len(), 8192 * 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn death_by_signal_reads_as_128_plus_the_signal_and_a_gone_process_is_not_found() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    h.create("sleeper", &["sleep", "1000"], Pipes::NONE).await;
    let pid = h.client.start_container("sleeper").await.unwrap();
    assert!(pid > 0);
    // The init is listed by pid: its command may still be the runtime's
    // until its exec of `sleep` completes (StartContainer, like runc's
    // start, returns once the init was released, not once it exec'd).
    let processes = h.client.list_processes("sleeper").await.unwrap();
    assert!(
        processes.iter().any(|p| p.pid == pid),
        "init pid {pid} not in {processes:?}"
    );
    h.client
        .signal_process("sleeper", "", 9, false)
        .await
        .expect("SignalProcess");
    let exit = h.client.wait_process("sleeper", "").await.unwrap();
    assert_eq!(exit.status, 137);
    assert_eq!(
        code_of(h.client.signal_process("sleeper", "", 9, false).await),
        Some(Code::NOT_FOUND)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_runs_inside_the_running_container_and_can_be_signalled() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    h.create("host", &["sleep", "1000"], Pipes::NONE).await;
    h.client.start_container("host").await.unwrap();
    let mut io = h
        .exec(
            "host",
            "who",
            &["sh", "-c", "hostname; echo pid1=$(cat /proc/1/comm)"],
            Pipes::OUT_ERR,
        )
        .await;
    let output = read_text(io.stdout.as_mut().unwrap(), STEP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(output, format!("{CONTAINER_HOSTNAME}\npid1=sleep\n"));
    assert_eq!(
        h.client.wait_process("host", "who").await.unwrap().status,
        0
    );

    h.exec("host", "long", &["sleep", "1000"], Pipes::NONE)
        .await;
    h.client
        .signal_process("host", "long", 15, false)
        .await
        .unwrap();
    assert_eq!(
        h.client.wait_process("host", "long").await.unwrap().status,
        128 + 15
    );
    // The init is untouched by the exec's end.
    let processes = h.client.list_processes("host").await.unwrap();
    assert_eq!(processes.len(), 1, "{processes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminal_exec_carries_both_directions_on_one_stream_and_sees_the_resize() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    h.create("tty", &["sleep", "1000"], Pipes::NONE).await;
    h.client.start_container("tty").await.unwrap();
    let mut io = h
        .exec(
            "tty",
            "shell",
            &["sh", "-c", "read line; stty size; echo got:$line"],
            Pipes::TERMINAL,
        )
        .await;
    h.client
        .tty_win_resize("tty", "shell", 40, 100)
        .await
        .expect("TtyWinResize");
    let mut pty = io.stdout.take().unwrap();
    pty.write_all(b"typed\n").await.unwrap();
    let output = read_until(&mut pty, "got:typed", STEP_TIMEOUT)
        .await
        .unwrap();
    assert!(output.contains("40 100"), "{output:?}");
    assert_eq!(
        h.client.wait_process("tty", "shell").await.unwrap().status,
        0
    );
    // A process without a terminal cannot be resized.
    h.exec("tty", "plain", &["true"], Pipes::NONE).await;
    assert_eq!(
        code_of(h.client.tty_win_resize("tty", "plain", 1, 1).await),
        Some(Code::FAILED_PRECONDITION)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminal_container_init_uses_the_pty_stream() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let mut io = h
        .create(
            "ttyinit",
            &[
                "sh",
                "-c",
                "stty size; echo tty:$(ls /proc/self/fd/0 -l | grep -c pts)",
            ],
            Pipes::TERMINAL,
        )
        .await;
    h.client.start_container("ttyinit").await.unwrap();
    let output = read_until(io.stdout.as_mut().unwrap(), "tty:", STEP_TIMEOUT)
        .await
        .unwrap();
    assert!(output.contains("tty:"), "{output:?}");
    assert_eq!(
        h.client.wait_process("ttyinit", "").await.unwrap().status,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_container_makes_no_progress_until_resumed() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let mut io = h
        .create(
            "ticker",
            &["sh", "-c", "while true; do echo tick; sleep 0.05; done"],
            Pipes::OUT_ERR,
        )
        .await;
    h.client.start_container("ticker").await.unwrap();
    let mut stdout = io.stdout.take().unwrap();
    read_until(&mut stdout, "tick", STEP_TIMEOUT).await.unwrap();
    h.client
        .pause_container("ticker")
        .await
        .expect("PauseContainer");
    // Drain what was written before the freeze took effect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut buf = [0u8; 65536];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(50), stdout.read(&mut buf)).await
    {
        assert!(n > 0);
    }
    let quiet = tokio::time::timeout(Duration::from_millis(500), stdout.read(&mut buf)).await;
    assert!(quiet.is_err(), "output while paused");
    h.client
        .resume_container("ticker")
        .await
        .expect("ResumeContainer");
    read_until(&mut stdout, "tick", STEP_TIMEOUT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_show_usage_and_the_updated_memory_limit() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    h.create("stats", &["sleep", "1000"], Pipes::NONE).await;
    h.client.start_container("stats").await.unwrap();
    let limit = 64u64 << 20;
    h.client
        .update_container("stats", &json!({"memory": {"limit": limit}}).to_string())
        .await
        .expect("UpdateContainer");
    let stats = h
        .client
        .stats_container("stats")
        .await
        .expect("StatsContainer");
    assert_eq!(stats.memory.limit_bytes, limit);
    assert!(stats.memory.usage_bytes > 0);
    assert_eq!(stats.pids.current, 1);
    // Resources the guest does not have are refused, clearly.
    let error = h
        .client
        .update_container("stats", &json!({"cpu": {"cpus": "0-4000"}}).to_string())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::OUT_OF_RANGE));
    assert!(error.to_string().contains("not online"), "{error}");
    let error = h
        .client
        .update_container("stats", &json!({"memory": {"limit": i64::MAX}}).to_string())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::OUT_OF_RANGE), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_containers_run_at_once() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let runs = (0..20).map(|i| {
        let h = &h;
        async move {
            let id = format!("many{i}");
            let mut io = h
                .create(
                    &id,
                    &["sh", "-c", &format!("echo I am {i}")],
                    Pipes::OUT_ERR,
                )
                .await;
            h.client.start_container(&id).await.unwrap();
            let output = read_text(io.stdout.as_mut().unwrap(), STEP_TIMEOUT)
                .await
                .unwrap();
            let exit = h.client.wait_process(&id, "").await.unwrap();
            (output, exit.status)
        }
    });
    let results = futures_join_all(runs).await;
    for (i, (output, status)) in results.into_iter().enumerate() {
        assert_eq!(output, format!("I am {i}\n"));
        assert_eq!(status, 0);
    }
}

/// Runs futures concurrently (no extra crate for `join_all`).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_their_status_codes_and_the_agent_keeps_serving() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    // Bad ids.
    for bad in ["", "..", "a/b", "-rf", "x y"] {
        let request = CreateContainerRequest {
            container_id: bad.into(),
            oci_spec_json: container_spec(&["true"], false).to_string().into_bytes(),
            rootfs_path: "whatever".into(),
            ..Default::default()
        };
        assert_eq!(
            code_of(h.client.create_container(request).await),
            Some(Code::INVALID_ARGUMENT),
            "{bad:?}"
        );
        assert_eq!(
            code_of(h.client.start_container(bad).await),
            Some(Code::INVALID_ARGUMENT),
            "{bad:?}"
        );
    }
    // Unknown container and process.
    assert_eq!(
        code_of(h.client.start_container("ghost").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.wait_process("ghost", "").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.signal_process("ghost", "", 9, false).await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.stats_container("ghost").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.pause_container("ghost").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.remove_container("ghost", 1).await),
        Some(Code::NOT_FOUND)
    );
    h.create("real", &["sleep", "1000"], Pipes::NONE).await;
    assert_eq!(
        code_of(h.client.wait_process("real", "no-such-exec").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(h.client.close_stdin("real", "no-such-exec").await),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code_of(
            h.client
                .exec_process(ExecProcessRequest {
                    container_id: "real".into(),
                    exec_id: "../escape".into(),
                    process_json: process_json(&["true"], false).to_string().into_bytes(),
                    ..Default::default()
                })
                .await
        ),
        Some(Code::INVALID_ARGUMENT)
    );
    // Duplicates.
    let duplicate = CreateContainerRequest {
        container_id: "real".into(),
        oci_spec_json: container_spec(&["true"], false).to_string().into_bytes(),
        rootfs_path: "real/rootfs".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.create_container(duplicate).await),
        Some(Code::ALREADY_EXISTS)
    );
    h.client.start_container("real").await.unwrap();
    h.exec("real", "once", &["true"], Pipes::NONE).await;
    let again = ExecProcessRequest {
        container_id: "real".into(),
        exec_id: "once".into(),
        process_json: process_json(&["true"], false).to_string().into_bytes(),
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.exec_process(again).await),
        Some(Code::ALREADY_EXISTS)
    );
    let sandbox_again = CreateSandboxRequest {
        sandbox_id: h.sandbox_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.create_sandbox(sandbox_again).await),
        Some(Code::ALREADY_EXISTS)
    );
    // Paths escaping the share: dot-dot, absolute, symlink out, bind mount from outside.
    std::os::unix::fs::symlink("/", h.share.join("to-host-root")).unwrap();
    for rootfs in ["../..", "/etc", "real/../../..", "to-host-root"] {
        let request = CreateContainerRequest {
            container_id: "escapee".into(),
            oci_spec_json: container_spec(&["true"], false).to_string().into_bytes(),
            rootfs_path: rootfs.into(),
            ..Default::default()
        };
        let error = h.client.create_container(request).await.unwrap_err();
        assert_eq!(
            error.code(),
            Some(Code::INVALID_ARGUMENT),
            "{rootfs:?}: {error}"
        );
        assert!(
            error.to_string().contains("escapes the shared directory"),
            "{error}"
        );
    }
    let mut with_bind = container_spec(&["true"], false);
    with_bind["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["rbind"]}),
    );
    let rootfs_path = h.rootfs("binder");
    let request = CreateContainerRequest {
        container_id: "binder".into(),
        oci_spec_json: with_bind.to_string().into_bytes(),
        rootfs_path,
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.create_container(request).await),
        Some(Code::INVALID_ARGUMENT)
    );
    // A malformed spec and a bad signal.
    let request = CreateContainerRequest {
        container_id: "garbage".into(),
        oci_spec_json: b"{not json".to_vec(),
        rootfs_path: "real/rootfs".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.create_container(request).await),
        Some(Code::INVALID_ARGUMENT)
    );
    assert_eq!(
        code_of(h.client.signal_process("real", "", 4242, false).await),
        Some(Code::INVALID_ARGUMENT)
    );
    // The failed creates left no container behind, and the agent still serves.
    assert_eq!(
        code_of(h.client.start_container("escapee").await),
        Some(Code::NOT_FOUND)
    );
    assert!(h.client.check().await.unwrap());
    // Only the init is left once the exec has ended.
    assert_eq!(
        h.client.wait_process("real", "once").await.unwrap().status,
        0
    );
    let processes = h.client.list_processes("real").await.unwrap();
    assert_eq!(processes.len(), 1, "{processes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guest_details_health_and_the_agent_log_are_served() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    assert!(h.client.check().await.unwrap());
    let details = h.client.guest_details().await.unwrap();
    assert!(details.online_cpus >= 1);
    assert!(details.memory_total_bytes > 0);
    assert!(!details.kernel_release.is_empty());
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));
    let _ = h.client.start_container("not-there").await;
    let (log, next) = h.client.read_log(0, 1 << 20).await.unwrap();
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("sandbox created"), "{log}");
    assert!(log.contains("container not-there not found"), "{log}");
    assert_eq!(next as usize, log.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_sandbox_stops_every_container_and_ends_the_agent() {
    if !can_run() {
        return;
    }
    let mut h = Harness::start().await;
    h.create("doomed", &["sleep", "1000"], Pipes::NONE).await;
    let pid = h.client.start_container("doomed").await.unwrap();
    let sandbox_id = h.sandbox_id.clone();
    h.client
        .destroy_sandbox(&sandbox_id)
        .await
        .expect("DestroySandbox");
    let mut agent = h.agent.take().unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after DestroySandbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "container process {pid} survived"
    );
    assert!(
        h.sandbox_cgroups().is_empty(),
        "cgroups left: {:?}",
        h.sandbox_cgroups()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_stdin_ends_the_input_of_an_exec_while_the_host_keeps_its_stream() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    h.create("reader", &["sleep", "1000"], Pipes::NONE).await;
    h.client.start_container("reader").await.unwrap();
    let mut io = h.exec("reader", "cat", &["cat"], Pipes::ALL).await;
    let stdin = io.stdin.as_mut().unwrap();
    stdin.write_all(b"before close\n").await.unwrap();
    read_until(io.stdout.as_mut().unwrap(), "before close", STEP_TIMEOUT)
        .await
        .unwrap();
    h.client
        .close_stdin("reader", "cat")
        .await
        .expect("CloseStdin");
    // cat saw end of file although the host never shut its stream down.
    assert_eq!(
        h.client.wait_process("reader", "cat").await.unwrap().status,
        0
    );
    assert_eq!(
        read_text(io.stdout.as_mut().unwrap(), STEP_TIMEOUT)
            .await
            .unwrap(),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_megabyte_of_stdin_then_half_close_reaches_wc_and_its_count_comes_back() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let mut io = h
        .create("counter", &["sh", "-c", "wc -c"], Pipes::ALL)
        .await;
    h.client.start_container("counter").await.unwrap();
    let mut stdin = io.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        stdin.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        // Half-close: the process must see end of file while the host's
        // stream stays open for reading.
        stdin.shutdown().await.unwrap();
        stdin
    });
    let stdout = read_text(io.stdout.as_mut().unwrap(), STEP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(stdout.trim(), "1048576");
    let exit = h.client.wait_process("counter", "").await.unwrap();
    assert_eq!(exit.status, 0);
    drop(writer.await.unwrap());
}

/// `linux.resources.memory.limit` of `bytes` on a spec running `args`.
fn spec_with_memory_limit(args: &[&str], bytes: u64) -> Value {
    let mut spec = container_spec(args, false);
    spec["linux"]["resources"] = json!({"memory": {"limit": bytes}});
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oom_kill_is_an_event_before_the_exit_and_the_status_is_137() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let before = h.client.get_events(0, 0).await.expect("GetEvents");
    let after = before.iter().map(|e| e.sequence).max().unwrap_or(0);
    // dd's 64 MiB block buffer is filled from /dev/zero: 64 MiB touched
    // under a 32 MiB limit.
    let limit = 32u64 << 20;
    h.create_with_spec(
        "hog",
        spec_with_memory_limit(
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
            limit,
        ),
        Pipes::NONE,
    )
    .await;
    h.client.start_container("hog").await.unwrap();
    let exit = h.client.wait_process("hog", "").await.unwrap();
    assert_eq!(exit.status, 137, "the OOM-killed init's status");
    let stats = h.client.stats_container("hog").await.unwrap();
    assert_eq!(stats.memory.limit_bytes, limit);
    assert!(stats.memory.oom_kills >= 1, "{stats:?}");
    let events = h.client.get_events(after, 5_000).await.expect("GetEvents");
    let oom = events
        .iter()
        .find(|e| e.has_oom() && e.oom().container_id == "hog")
        .unwrap_or_else(|| panic!("no OomKilled event for hog in {events:?}"));
    let exited = events
        .iter()
        .find(|e| e.has_exited() && e.exited().container_id == "hog")
        .unwrap_or_else(|| panic!("no exit event for hog in {events:?}"));
    assert!(oom.sequence < exited.sequence, "{events:?}");
    assert_eq!(exited.exited().exit_status, 137);
}

/// The whole disk (`major`, `minor`) holding `path`, if it is on one.
fn disk_of(path: &Path) -> Option<(u64, u64)> {
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path).ok()?);
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    if !sys.join("partition").exists() {
        return Some((major, minor));
    }
    let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
    let (major, minor) = parent.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_count_the_bytes_a_container_wrote_to_disk() {
    if !can_run() {
        return;
    }
    let h = Harness::start().await;
    let Some((major, minor)) = disk_of(h.dir.path()) else {
        announce_form("agent host tier IO stats not run: the temp dir is on no block device");
        return;
    };
    // The rootfs lives in a temp dir on that disk; conv=fsync makes dd
    // itself submit the writes, so they are charged to its cgroup. The
    // (never reached) throttle rule matters on cgroup v1: since Linux 6.10
    // blkio counts bytes only on a disk where some throttle rule exists.
    let mut spec = container_spec(
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/data bs=1M count=8 conv=fsync 2>/dev/null && echo written; sleep 1000",
        ],
        false,
    );
    spec["linux"]["resources"] = json!({"blockIO": {"throttleWriteBpsDevice": [
        {"major": major, "minor": minor, "rate": 1u64 << 40}
    ]}});
    let mut io = h.create_with_spec("writer", spec, Pipes::OUT_ERR).await;
    h.client.start_container("writer").await.unwrap();
    read_until(io.stdout.as_mut().unwrap(), "written", STEP_TIMEOUT)
        .await
        .unwrap();
    let stats = h.client.stats_container("writer").await.unwrap();
    assert!(
        stats.io.write_bytes >= 8 << 20,
        "8 MiB written with fsync to {major}:{minor}, stats say {} bytes",
        stats.io.write_bytes
    );
}
