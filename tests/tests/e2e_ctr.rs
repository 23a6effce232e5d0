//! The e2e tier: `ctr` against a private containerd, the same scenarios
//! under Debian's runc shim (`io.containerd.runc.v2`) and under husk
//! (`io.containerd.kata.v2`), compared line by line.
//!
//! One private containerd (see `husk_tests::containerd`) serves the whole
//! run with the test image of `rootfs-image/mkociimage.py` imported. Each
//! scenario runs under every selected runtime in turn and reduces what a
//! `ctr` user sees to one observation; the suite prints
//! `e2e <scenario> runc=<...> husk=<...> same|DIFFERENT`, and a scenario
//! passes when its own assertions hold under each runtime and, when both
//! ran, the observations are identical. The bad-input scenarios are husk's
//! alone: each must make `ctr run` fail with a message naming the problem
//! and leave nothing behind. They name their configuration with
//! `ctr run --runtime-config-path`, which ctr 1.6 sends for non-runc
//! runtimes as `runtimeoptions.v1.Options{ConfigPath}`: containerd hands it
//! to the shim's `start` (stdin) and in `CreateTaskRequest.options`, and
//! husk prefers it to `$HUSK_CONFIG`, so no containerd restart is needed.
//! The last check proves that nothing is left: no shim or QEMU process, no
//! mount under the private root, state or `/run/husk`, no shim socket, no
//! husk state or share directory, no bundle.
//!
//! `HUSK_E2E_RUNTIMES=runc` (or `husk`, or `runc,husk`, the default)
//! selects the runtimes; the run says which form it took. Arguments that
//! do not start with `-` select scenarios by substring (the leak check
//! always runs). Output follows libtest's `test <name> ... ok|FAILED` and
//! `test result:` lines, which `tests/run-tiers.sh` counts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use husk_test_support::artifacts::{guest_artifacts, guest_kernel, host_kernel_release};
use husk_test_support::form::announce_form;
use husk_test_support::mounts::mounts_under;
use husk_test_support::tempdir::TestDir;
use husk_tests::containerd::{
    self, leftovers, run_with_timeout, test_husk_config, toml_string, Options, PrivateContainerd,
    Snapshot, HUSK_RUNTIME, IMAGE, IMAGE_UID1000, RUNC_RUNTIME,
};

/// How long one `ctr` command may take (a husk pod boots a TCG guest).
const CTR_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a task may take to reach a state after a request.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shims may take to exit once their last container is gone.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Runc,
    Husk,
}

impl Runtime {
    fn label(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Husk => "husk",
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            Runtime::Runc => RUNC_RUNTIME,
            Runtime::Husk => HUSK_RUNTIME,
        }
    }
}

/// Everything a scenario needs.
struct Suite {
    daemon: PrivateContainerd,
    options: Options,
    work: PathBuf,
    next_id: AtomicU32,
}

impl Suite {
    /// A container id unique in the run.
    fn id(&self, runtime: Runtime, what: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("e2e-{}-{what}-{n}", runtime.label())
    }

    /// `ctr run --runtime <type> <flags> <image> <id> <args>`.
    fn run_command(
        &self,
        runtime: Runtime,
        flags: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Command {
        let mut command = self.daemon.ctr();
        command
            .args(["run", "--runtime", runtime.type_name()])
            .args(flags)
            .args([image, id])
            .args(args);
        command
    }

    fn ctr_run(
        &self,
        runtime: Runtime,
        flags: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Result<Output> {
        run_with_timeout(
            &mut self.run_command(runtime, flags, image, id, args),
            CTR_TIMEOUT,
        )
    }

    /// `ctr <args>`, which must succeed; its stdout.
    fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = run_with_timeout(self.daemon.ctr().args(args), CTR_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "`ctr {}` failed ({}): {}",
            args.join(" "),
            out.status,
            text(&out.stderr).trim()
        );
        Ok(text(&out.stdout))
    }

    /// The STATUS column of `ctr task ls` for `id`.
    fn task_status(&self, id: &str) -> Result<Option<String>> {
        let listing = self.ctr_ok(&["task", "ls"])?;
        Ok(listing.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(2).unwrap_or(&"").to_string())
        }))
    }

    fn wait_status(&self, id: &str, wanted: &str) -> Result<()> {
        let started = Instant::now();
        loop {
            let status = self.task_status(id)?;
            if status.as_deref() == Some(wanted) {
                return Ok(());
            }
            if started.elapsed() > STATE_TIMEOUT {
                bail!("task {id} is {status:?}, not {wanted}, after {STATE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `command` under `script` so it gets a terminal, feeding it
    /// `input` once its output contains `prompt` (when given).
    fn in_terminal(
        &self,
        command: &Command,
        prompt: Option<&str>,
        input: &[u8],
    ) -> Result<(i32, String)> {
        let line = shell_line(command);
        let mut child = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run script (util-linux)")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buffer[..n]);
                }
            })
        };
        let mut stderr = child.stderr.take().context("no stderr pipe")?;
        let err_reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = stderr.read_to_end(&mut bytes);
            bytes
        });
        let started = Instant::now();
        let mut stdin = child.stdin.take();
        let mut fed = false;
        let status = loop {
            if !fed {
                let ready = match prompt {
                    Some(prompt) => text(&seen.lock().unwrap()).contains(prompt),
                    None => true,
                };
                if ready {
                    if let Some(mut pipe) = stdin.take() {
                        pipe.write_all(input).context("writing to the terminal")?;
                        // Keep stdin open: script ends the session at EOF.
                        stdin = Some(pipe);
                    }
                    fed = true;
                }
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > CTR_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{line}` in a terminal did not finish within {CTR_TIMEOUT:?}; it printed: {}",
                    text(&seen.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(stdin);
        let _ = reader.join();
        let stderr = err_reader.join().unwrap_or_default();
        let output = text(&seen.lock().unwrap()) + &text(&stderr);
        Ok((status.code().unwrap_or(-1), output.replace('\r', "")))
    }

    /// Waits until no shim serves `id`, and checks that containerd keeps
    /// no container or task of that name.
    fn nothing_left_of(&self, id: &str) -> Result<()> {
        let started = Instant::now();
        while self
            .daemon
            .shim_processes()
            .iter()
            .any(|p| p.args.iter().any(|a| a == id))
        {
            if started.elapsed() > SHIM_EXIT_TIMEOUT {
                bail!("a shim for {id} still runs {SHIM_EXIT_TIMEOUT:?} after ctr returned");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let containers = self.ctr_ok(&["containers", "ls", "-q"])?;
        if containers.lines().any(|l| l.trim() == id) {
            let _ = self.ctr_ok(&["containers", "rm", id]);
            bail!("container {id} was left in containerd");
        }
        ensure!(
            self.task_status(id)?.is_none(),
            "task {id} was left in containerd"
        );
        Ok(())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command as one `sh -c` line (single-quoted words).
fn shell_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| format!("'{}'", word.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `ctr` did, for messages.
fn describe(out: &Output) -> String {
    format!(
        "{}; stdout {:?}; stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

type ScenarioFn = fn(&Suite, Runtime) -> Result<String>;

struct Scenario {
    name: &'static str,
    /// Bad-input scenarios exercise husk's own configuration.
    husk_only: bool,
    run: ScenarioFn,
}

fn scenarios() -> Vec<Scenario> {
    let both = |name, run| Scenario {
        name,
        husk_only: false,
        run,
    };
    let husk = |name, run| Scenario {
        name,
        husk_only: true,
        run,
    };
    vec![
        both("run_echo_hello", run_echo_hello),
        both("run_env_is_the_image_env", run_env_is_the_image_env),
        both("run_cwd_tmp_pwd", run_cwd_tmp_pwd),
        both("run_as_image_user_1000", run_as_image_user_1000),
        both("run_exit_codes_0_3_137", run_exit_codes_0_3_137),
        both(
            "detached_exec_ps_metrics_pause_kill_delete",
            detached_lifecycle,
        ),
        both("tty_session_computes_42", tty_session_computes_42),
        both("stdin_piped_reaches_the_container", stdin_piped),
        both("output_complete_at_exit", output_complete_at_exit),
        both("task_events_published", task_events_published),
        both("log_uri_file_and_binary", log_uri_file_and_binary),
        both(
            "pod_containers_share_one_shim",
            pod_containers_share_one_shim,
        ),
        both("cri_64_hex_ids_pod_of_two", cri_64_hex_ids_pod_of_two),
        both("oom_kill_reported", oom_kill_reported),
        both(
            "containerd_restart_reconnects_to_the_shim",
            containerd_restart_reconnects,
        ),
        both("five_containers_in_parallel", five_containers_in_parallel),
        both("twenty_runs_in_sequence", twenty_runs_in_sequence),
        husk(
            "guest_kernel_and_vm_size_from_config_and_annotations",
            guest_kernel_and_vm_size,
        ),
        husk("vm_death_reports_the_task_exited", vm_death_reports_exit),
        husk("shim_sigkill_leaves_nothing", shim_sigkill_leaves_nothing),
        husk(
            "guest_reached_forbidden_syscall_kills_the_shim",
            guest_reached_forbidden_syscall_kills_the_shim,
        ),
        husk(
            "shim_killed_at_each_create_step_leaves_nothing",
            shim_killed_at_each_create_step,
        ),
        husk(
            "binary_logger_never_ready_fails_create_and_leaves_nothing",
            binary_logger_never_ready,
        ),
        husk(
            "hung_guest_is_declared_dead_and_kill_delete_finish",
            hung_guest_is_declared_dead,
        ),
        husk(
            "run_dir_full_during_create_leaves_nothing",
            run_dir_full_during_create,
        ),
        husk(
            "confinement_and_cgroup_of_a_running_pod",
            confinement_and_cgroup_of_a_running_pod,
        ),
        husk(
            "vm_above_the_pod_cgroup_limit_is_refused",
            vm_above_the_pod_cgroup_limit_is_refused,
        ),
        husk(
            "ops_list_metrics_logs_and_root_only_socket",
            ops_list_metrics_logs_and_root_only_socket,
        ),
        husk(
            "ops_monitor_two_pods_and_a_prometheus_scrape",
            ops_monitor_two_pods_and_a_prometheus_scrape,
        ),
        husk(
            "ops_exec_runs_uname_in_the_guest",
            ops_exec_runs_uname_in_the_guest,
        ),
        husk("bad_unknown_hypervisor_kind", bad_unknown_hypervisor_kind),
        husk("bad_missing_kernel", bad_missing_kernel),
        husk("bad_10000_vcpus_annotation", bad_10000_vcpus_annotation),
        husk("bad_unreadable_config", bad_unreadable_config),
    ]
}

fn run_echo_hello(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "echo");
    let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, &["echo", "hello"])?;
    ensure!(
        out.status.success() && text(&out.stdout) == "hello\n",
        "ctr run echo hello: {}",
        describe(&out)
    );
    Ok(format!("{:?}", text(&out.stdout)))
}

fn run_env_is_the_image_env(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "env");
    let out = suite.ctr_run(rt, &["--rm", "--env", "E2E_FLAG=on"], IMAGE, &id, &["env"])?;
    ensure!(out.status.success(), "ctr run env: {}", describe(&out));
    let mut lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    lines.sort();
    for wanted in [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HUSK_IMAGE=busybox",
        "E2E_FLAG=on",
        "HOME=/root",
    ] {
        ensure!(
            lines.iter().any(|l| l == wanted),
            "env lacks {wanted}: {lines:?}"
        );
    }
    Ok(lines.join(" "))
}

fn run_cwd_tmp_pwd(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "pwd");
    let out = suite.ctr_run(rt, &["--rm", "--cwd", "/tmp"], IMAGE, &id, &["pwd"])?;
    ensure!(
        out.status.success() && text(&out.stdout) == "/tmp\n",
        "ctr run --cwd /tmp pwd: {}",
        describe(&out)
    );
    Ok(text(&out.stdout).trim().to_owned())
}

fn run_as_image_user_1000(suite: &Suite, rt: Runtime) -> Result<String> {
    // ctr 1.6's `run` has no --user: the image config's User says 1000:1000.
    let id = suite.id(rt, "id");
    let out = suite.ctr_run(rt, &["--rm"], IMAGE_UID1000, &id, &["id"])?;
    let shown = text(&out.stdout);
    ensure!(
        out.status.success() && shown.starts_with("uid=1000(user) gid=1000(user)"),
        "ctr run of the uid1000 image, id: {}",
        describe(&out)
    );
    Ok(shown.trim().to_owned())
}

fn run_exit_codes_0_3_137(suite: &Suite, rt: Runtime) -> Result<String> {
    let mut codes = Vec::new();
    // `kill -9 $$` in the container's init is ignored (the kernel shields a
    // PID namespace's init from its own signals), so 137 comes from a child
    // shell killed that way, and from SIGKILL sent with `ctr task kill`.
    for (args, wanted) in [
        (&["true"][..], 0),
        (&["sh", "-c", "exit 3"][..], 3),
        (&["sh", "-c", "sh -c 'kill -9 $$'; exit $?"][..], 137),
        (&["sh", "-c", "kill -9 $$; echo init-survived"][..], 0),
    ] {
        let id = suite.id(rt, "exit");
        let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, args)?;
        let code = out.status.code().unwrap_or(-1);
        ensure!(
            code == wanted,
            "ctr run {args:?} exited {code}, not {wanted}: {}",
            describe(&out)
        );
        codes.push(code.to_string());
    }
    let id = suite.id(rt, "sigkill");
    let mut command = suite.run_command(rt, &["--rm"], IMAGE, &id, &["sleep", "1000"]);
    let waiter = std::thread::spawn(move || run_with_timeout(&mut command, CTR_TIMEOUT));
    let killed = suite
        .wait_status(&id, "RUNNING")
        .and_then(|()| suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]));
    let out = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the ctr run thread panicked"))??;
    killed?;
    let code = out.status.code().unwrap_or(-1);
    ensure!(
        code == 137,
        "ctr run of sleep killed by `ctr task kill -s SIGKILL` exited {code}, not 137: {}",
        describe(&out)
    );
    codes.push(code.to_string());
    suite.nothing_left_of(&id)?;
    Ok(format!(
        "true={} exit3={} child-kill9={} init-kill9-ignored={} task-kill-SIGKILL={}",
        codes[0], codes[1], codes[2], codes[3], codes[4]
    ))
}

fn detached_lifecycle(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "life");
    let mut seen = Vec::new();
    let out = suite.ctr_run(
        rt,
        &["-d"],
        IMAGE,
        &id,
        &["sh", "-c", "trap 'exit 7' TERM; sleep 1000 & wait"],
    )?;
    let result = (|| -> Result<()> {
        ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
        suite.wait_status(&id, "RUNNING")?;
        seen.push("RUNNING".to_owned());

        let exec = run_with_timeout(
            suite.daemon.ctr().args([
                "task",
                "exec",
                "--exec-id",
                "plain",
                &id,
                "sh",
                "-c",
                "echo out; echo err >&2; exit 5",
            ]),
            CTR_TIMEOUT,
        )?;
        let code = exec.status.code().unwrap_or(-1);
        ensure!(
            code == 5 && text(&exec.stdout) == "out\n" && text(&exec.stderr).contains("err\n"),
            "ctr task exec: {}",
            describe(&exec)
        );
        seen.push(format!("exec=out/err/{code}"));

        let mut tty_exec = suite.daemon.ctr();
        tty_exec.args([
            "task",
            "exec",
            "-t",
            "--exec-id",
            "tty",
            &id,
            "sh",
            "-c",
            "tty; exit 4",
        ]);
        let (code, shown) = suite.in_terminal(&tty_exec, None, b"")?;
        let tty = shown
            .lines()
            .find(|l| l.starts_with("/dev/"))
            .unwrap_or("")
            .trim()
            .to_owned();
        ensure!(
            code == 4 && tty.starts_with("/dev/pts/"),
            "ctr task exec -t: exit {code}, printed {shown:?}"
        );
        seen.push(format!("exec-t=/dev/pts/N/{code}"));

        let ps = suite.ctr_ok(&["task", "ps", &id])?;
        let pids = ps
            .lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|p| p.parse::<u32>().is_ok())
            })
            .count();
        ensure!(
            ps.starts_with("PID") && pids == 2,
            "ctr task ps shows {pids} processes, not 2 (sh and sleep): {ps:?}"
        );
        seen.push(format!("ps={pids}"));

        let metrics = suite.ctr_ok(&["task", "metrics", &id])?;
        let memory = metrics.lines().find(|l| {
            l.to_lowercase().contains("memory")
                && l.split_whitespace().any(|w| w.parse::<u64>().is_ok())
        });
        ensure!(
            memory.is_some(),
            "ctr task metrics names no memory figure: {metrics:?}"
        );
        seen.push("metrics=memory".to_owned());

        suite.ctr_ok(&["task", "pause", &id])?;
        suite.wait_status(&id, "PAUSED")?;
        suite.ctr_ok(&["task", "resume", &id])?;
        suite.wait_status(&id, "RUNNING")?;
        seen.push("PAUSED,RUNNING".to_owned());

        suite.ctr_ok(&["task", "kill", &id])?;
        suite.wait_status(&id, "STOPPED")?;
        let deleted = run_with_timeout(
            suite.daemon.ctr().args(["task", "delete", &id]),
            CTR_TIMEOUT,
        )?;
        ensure!(
            deleted.status.success() && text(&deleted.stderr).contains("exit code 7"),
            "ctr task delete after SIGTERM (the trap exits 7): {}",
            describe(&deleted)
        );
        seen.push("SIGTERM->STOPPED,exit=7".to_owned());
        suite.ctr_ok(&["container", "rm", &id])?;
        suite.nothing_left_of(&id)?;
        seen.push("removed".to_owned());
        Ok(())
    })();
    if result.is_err() {
        let _ = suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
        let _ = suite.ctr_ok(&["task", "delete", "-f", &id]);
        let _ = suite.ctr_ok(&["container", "rm", &id]);
    }
    result.map(|()| seen.join(" "))
}

fn tty_session_computes_42(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "tty");
    let command = suite.run_command(rt, &["-t", "--rm"], IMAGE, &id, &["sh"]);
    let (code, shown) = suite.in_terminal(&command, Some("# "), b"echo $((6*7)); exit\n")?;
    ensure!(
        code == 0 && shown.lines().any(|l| l.trim() == "42"),
        "ctr run -t sh, sent `echo $((6*7)); exit`: exit {code}, the terminal showed {shown:?}"
    );
    suite.nothing_left_of(&id)?;
    Ok(format!("42,exit={code}"))
}

/// Lines piped into `ctr run` reach the container, then EOF. The input is
/// written once the container runs: containerd 1.6's runc shim loses the
/// EOF of a client that wrote and closed stdin before the shim opened the
/// FIFO (seen here: `ctr run` then hangs for good under runc).
fn stdin_piped(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "stdin");
    let run = suite.run_command(rt, &["--rm"], IMAGE, &id, &["sh", "-c", "wc -l; echo end"]);
    let feed = format!(
        "(while ! {ctr} task ls | grep -q '^{id} .*RUNNING'; do sleep 0.1; done; printf 'a\\nb\\nc\\n') | {run}",
        ctr = shell_line(&suite.daemon.ctr()),
        run = shell_line(&run)
    );
    let out = run_with_timeout(Command::new("sh").args(["-c", &feed]), CTR_TIMEOUT)?;
    let shown = text(&out.stdout);
    ensure!(
        out.status.success() && shown.split_whitespace().collect::<Vec<_>>() == ["3", "end"],
        "three lines piped into `ctr run` then EOF: {}",
        describe(&out)
    );
    suite.nothing_left_of(&id)?;
    Ok(shown.split_whitespace().collect::<Vec<_>>().join(","))
}

fn output_complete_at_exit(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "output");
    let script =
        "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done; echo to-stderr >&2";
    let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, &["sh", "-c", script])?;
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    ensure!(
        out.status.success()
            && lines.len() == 3000
            && lines.last() == Some(&"line-2999")
            && text(&out.stderr).contains("to-stderr"),
        "3000 lines then exit: got {} lines, last {:?}, stderr {:?}",
        lines.len(),
        lines.last(),
        text(&out.stderr)
    );
    Ok(format!("{} lines,{} bytes", lines.len(), stdout.len()))
}

fn containerd_restart_reconnects(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "restart");
    let out = suite.ctr_run(rt, &["-d"], IMAGE, &id, &["sleep", "1000"])?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<String> {
        suite.wait_status(&id, "RUNNING")?;
        suite
            .daemon
            .restart(&suite.options)
            .context("restarting containerd")?;
        suite.wait_status(&id, "RUNNING")?;
        let echoed = suite.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            &id,
            "echo",
            "after-restart",
        ])?;
        ensure!(
            echoed.trim() == "after-restart",
            "exec after the restart printed {echoed:?}"
        );
        suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id])?;
        suite.wait_status(&id, "STOPPED")?;
        Ok("RUNNING,restart,RUNNING,exec-ok,STOPPED".to_owned())
    })();
    let _ = suite.ctr_ok(&["task", "delete", &id]);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let observed = result?;
    suite.nothing_left_of(&id)?;
    Ok(observed)
}

/// The pid of the husk shim serving container `id`.
fn husk_shim_of(suite: &Suite, id: &str) -> Result<u32> {
    suite
        .daemon
        .shim_processes()
        .into_iter()
        .find(|p| p.args.iter().any(|a| a == id))
        .map(|p| p.pid)
        .with_context(|| format!("no shim serves {id}"))
}

/// The QEMU process the husk shim `shim` of container `id` started.
fn qemu_child_of(shim: u32, id: &str) -> Result<husk_test_support::host::Process> {
    containerd::qemu_processes()
        .into_iter()
        .find(|p| p.ppid == shim)
        .with_context(|| format!("the shim {shim} of {id} has no QEMU child"))
}

fn husk_sandbox_dir(id: &str) -> PathBuf {
    Path::new("/run/husk/sandboxes").join(id)
}

/// The VM directory (sockets, QEMU's run directory) of sandbox `id`, named
/// by a digest of the id; QEMU's command line names it.
fn husk_vm_dir(id: &str) -> PathBuf {
    husk_shim::paths::SandboxPaths::under(Path::new("/run/husk/sandboxes"), id).vm_dir
}

/// QEMU processes whose command line names the VM directory of `id`.
fn qemu_processes_of(id: &str) -> Vec<husk_test_support::host::Process> {
    let vm_dir = husk_vm_dir(id).to_string_lossy().into_owned();
    containerd::qemu_processes()
        .into_iter()
        .filter(|p| p.args.iter().any(|a| a.contains(&vm_dir)))
        .collect()
}

fn vm_death_reports_exit(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "vmdeath");
    let out = suite.ctr_run(rt, &["-d"], IMAGE, &id, &["sleep", "1000"])?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<String> {
        suite.wait_status(&id, "RUNNING")?;
        let shim = husk_shim_of(suite, &id)?;
        let vm = qemu_child_of(shim, &id)?;
        // SAFETY: plain kill of the VM process the test found.
        unsafe { libc::kill(vm.pid as i32, libc::SIGKILL) };
        suite.wait_status(&id, "STOPPED")?;
        let deleted = run_with_timeout(
            suite.daemon.ctr().args(["task", "delete", &id]),
            CTR_TIMEOUT,
        )?;
        let said = text(&deleted.stderr) + &text(&deleted.stdout);
        ensure!(
            said.contains("exit code 255") || deleted.status.success(),
            "ctr task delete after the VM died: {}",
            describe(&deleted)
        );
        Ok(format!(
            "STOPPED,delete:{}",
            if said.contains("255") { "255" } else { "ok" }
        ))
    })();
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let observed = result?;
    suite.nothing_left_of(&id)?;
    ensure!(
        !husk_sandbox_dir(&id).exists(),
        "{} is left after the VM died and the task was deleted",
        husk_sandbox_dir(&id).display()
    );
    Ok(observed)
}

fn shim_sigkill_leaves_nothing(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "shimkill");
    let out = suite.ctr_run(rt, &["-d"], IMAGE, &id, &["sleep", "1000"])?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<()> {
        suite.wait_status(&id, "RUNNING")?;
        let shim = husk_shim_of(suite, &id)?;
        // SAFETY: plain kill of the shim process the test found.
        unsafe { libc::kill(shim as i32, libc::SIGKILL) };
        // containerd notices the shim's end and runs `shim delete`.
        let started = Instant::now();
        while suite.task_status(&id)?.is_some_and(|s| s != "STOPPED") {
            ensure!(
                started.elapsed() < STATE_TIMEOUT,
                "task {id} still listed after its shim was killed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })();
    let _ = suite.ctr_ok(&["task", "delete", &id]);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    result?;
    nothing_left_after_a_dead_shim(suite, &id)?;
    Ok("nothing left".to_owned())
}

/// A guest-reachable code path makes a call outside its thread's seccomp
/// allowlist: a container LOOKUPs the name the test-only shim's virtio-fs
/// hook answers with `socket(AF_INET)` (`husk_devices::fs::test_hooks`).
/// The kernel kills the shim with SIGSYS (its audit line names the shim
/// and the call), containerd sees the task end, and nothing is left.
fn guest_reached_forbidden_syscall_kills_the_shim(suite: &Suite, rt: Runtime) -> Result<String> {
    let hooked = containerd::hooked_shim_dir().join("containerd-shim-huskhooks-v2");
    ensure!(
        hooked.exists(),
        "{} is missing: `make hooked-shim` builds the test-only shim with guest-reachable hooks",
        hooked.display()
    );
    let id = suite.id(rt, "sigsys");
    let mut run = suite.daemon.ctr();
    run.args(["run", "-d", "--runtime", containerd::HOOKED_RUNTIME])
        .args([IMAGE, &id, "sleep", "1000"]);
    let out = run_with_timeout(&mut run, CTR_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "ctr run -d (hooked shim): {}",
        describe(&out)
    );
    let result = (|| -> Result<String> {
        suite.wait_status(&id, "RUNNING")?;
        let shim = husk_shim_of(suite, &id)?;
        let exec = run_with_timeout(
            suite.daemon.ctr().args([
                "task",
                "exec",
                "--exec-id",
                "lookup",
                &id,
                "stat",
                "/.husk-test-forbidden-syscall",
            ]),
            CTR_TIMEOUT,
        )?;
        ensure!(
            !exec.status.success(),
            "the exec that reached the hook succeeded: {}",
            describe(&exec)
        );
        let started = Instant::now();
        while Path::new(&format!("/proc/{shim}")).exists() {
            ensure!(
                started.elapsed() < STATE_TIMEOUT,
                "the shim {shim} still runs after its fs thread made a forbidden call"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let kernel_log = run_with_timeout(Command::new("dmesg").arg("--notime"), CTR_TIMEOUT)?;
        let audit = text(&kernel_log.stdout)
            .lines()
            .rev()
            .find(|line| {
                line.contains("type=1326")
                    && line.contains(&format!(" pid={shim} "))
                    && line.contains(" sig=31 ")
            })
            .map(str::to_owned)
            .with_context(|| format!("no seccomp audit line for the shim {shim} in dmesg"))?;
        ensure!(
            audit.contains(" syscall=41 "),
            "the shim died on another call than socket (41): {audit}"
        );
        // containerd noticed: the task is stopped or gone.
        let started = Instant::now();
        while suite.task_status(&id)?.is_some_and(|s| s != "STOPPED") {
            ensure!(
                started.elapsed() < STATE_TIMEOUT,
                "task {id} still listed as running after its shim died"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let thread = audit
            .split_whitespace()
            .find(|field| field.starts_with("comm="))
            .unwrap_or("comm=?")
            .to_owned();
        Ok(format!("SIGSYS on socket(41) in {thread}, task ended"))
    })();
    let _ = suite.ctr_ok(&["task", "delete", &id]);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let observed = result?;
    nothing_left_after_a_dead_shim(suite, &id)?;
    Ok(observed + ", nothing left")
}

/// After a shim died and containerd cleaned up: no sandbox directory, VM
/// or mount of `id` is left.
fn nothing_left_after_a_dead_shim(suite: &Suite, id: &str) -> Result<()> {
    suite.nothing_left_of(id)?;
    let dir = husk_sandbox_dir(id);
    let started = Instant::now();
    while dir.exists() && started.elapsed() < STATE_TIMEOUT {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        !dir.exists(),
        "{} is left after the shim was killed",
        dir.display()
    );
    let vms = qemu_processes_of(id);
    ensure!(vms.is_empty(), "the killed shim's VM still runs: {vms:?}");
    ensure!(
        !husk_vm_dir(id).exists(),
        "{} is left after the shim was killed",
        husk_vm_dir(id).display()
    );
    let mounts = mounts_under(&dir);
    ensure!(
        mounts.is_empty(),
        "mounts left under {}: {mounts:?}",
        dir.display()
    );
    Ok(())
}

/// The shim killed (SIGKILL) at each step of a Create that has a crash
/// point (`husk_shim::fault::CREATE_STEPS`): `ctr run` fails, and once
/// containerd's cleanup ran and the container is removed nothing is left:
/// no VM, mount, sandbox directory or shim.
fn shim_killed_at_each_create_step(suite: &Suite, rt: Runtime) -> Result<String> {
    let faults = suite.daemon.fault_dir();
    std::fs::create_dir_all(&faults)?;
    let mut observed = Vec::new();
    for (n, step) in husk_shim::fault::CREATE_STEPS.iter().enumerate() {
        let trigger = faults.join(format!("kill-at-{step}"));
        std::fs::write(&trigger, b"")?;
        let id = suite.id(rt, &format!("killat{n}"));
        let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, &["echo", "hello"]);
        std::fs::remove_file(&trigger)?;
        let out = out?;
        ensure!(
            !out.status.success(),
            "ctr run succeeded although the shim was killed at {step}: {}",
            describe(&out)
        );
        let _ = suite.ctr_ok(&["task", "delete", &id]);
        let _ = suite.ctr_ok(&["containers", "rm", &id]);
        suite.nothing_left_of(&id)?;
        let dir = husk_sandbox_dir(&id);
        let started = Instant::now();
        while dir.exists() && started.elapsed() < STATE_TIMEOUT {
            std::thread::sleep(Duration::from_millis(100));
        }
        ensure!(
            !dir.exists(),
            "{} is left after a kill at {step}",
            dir.display()
        );
        let vms = qemu_processes_of(&id);
        ensure!(
            !husk_vm_dir(&id).exists(),
            "{} is left after a kill at {step}",
            husk_vm_dir(&id).display()
        );
        ensure!(
            vms.is_empty(),
            "a VM outlived the shim killed at {step}: {vms:?}"
        );
        observed.push(format!("{step}:clean"));
    }
    Ok(observed.join(","))
}

/// A `binary://` logging program that never signals readiness (never
/// closes its fd 5): Create fails within `timeouts.logger_ready_ms` naming
/// the program and the setting, and neither the program nor anything of
/// the container is left.
fn binary_logger_never_ready(suite: &Suite, rt: Runtime) -> Result<String> {
    let dir = suite.work.join("never-ready-logger");
    std::fs::create_dir_all(&dir)?;
    let logger = dir.join("never-ready.sh");
    std::fs::write(&logger, "#!/bin/sh\nexec sleep 1000\n")?;
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let config = bad_config(
        suite,
        "logger-ready.toml",
        &[("logger_ready_ms", "3000".to_owned())],
    )?;
    let config = config.to_string_lossy().into_owned();
    let uri = format!("binary://{}", logger.display());
    let id = suite.id(rt, "neverready");
    let started = Instant::now();
    let out = suite.ctr_run(
        rt,
        &["--rm", "--runtime-config-path", &config, "--log-uri", &uri],
        IMAGE,
        &id,
        &["echo", "hello"],
    )?;
    let took = started.elapsed();
    let message = text(&out.stderr);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let left = suite.nothing_left_of(&id);
    let loggers: Vec<_> = husk_test_support::host::processes_mentioning(&logger);
    ensure!(
        !out.status.success(),
        "ctr run succeeded: {}",
        describe(&out)
    );
    for needle in [logger.to_string_lossy().as_ref(), "logger_ready_ms"] {
        ensure!(
            message.contains(needle),
            "the error does not name {needle:?}: {message:?}"
        );
    }
    left?;
    ensure!(
        loggers.is_empty(),
        "the logging program was left running: {loggers:?}"
    );
    println!(
        "never-ready logger: ctr run failed after {:.1} s",
        took.as_secs_f64()
    );
    Ok("refused, logger killed".to_owned())
}

/// A guest that stops answering (its QEMU stopped with SIGSTOP: vCPUs and
/// devices frozen; SIGSTOP inside the guest cannot stop the agent, which
/// is PID 1): `ctr task kill` returns within the agent-call deadline, the
/// health check declares the guest dead (STOPPED, exit 255), and delete
/// leaves nothing.
fn hung_guest_is_declared_dead(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "hung");
    let config = bad_config(
        suite,
        "hung-guest.toml",
        &[
            ("agent_call_ms", "5000".to_owned()),
            ("health_interval_ms", "1000".to_owned()),
            ("health_probe_ms", "1000".to_owned()),
            ("health_failures", "3".to_owned()),
        ],
    )?;
    let config = config.to_string_lossy().into_owned();
    let out = suite.ctr_run(
        rt,
        &["-d", "--runtime-config-path", &config],
        IMAGE,
        &id,
        &["sleep", "1000"],
    )?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<String> {
        suite.wait_status(&id, "RUNNING")?;
        let shim = husk_shim_of(suite, &id)?;
        let vm = qemu_child_of(shim, &id)?;
        // SAFETY: plain kill of the VM process the test found.
        unsafe { libc::kill(vm.pid as i32, libc::SIGSTOP) };
        let started = Instant::now();
        let killed = run_with_timeout(
            suite
                .daemon
                .ctr()
                .args(["task", "kill", "-s", "SIGTERM", &id]),
            CTR_TIMEOUT,
        )?;
        let kill_took = started.elapsed();
        suite.wait_status(&id, "STOPPED")?;
        let dead_after = started.elapsed();
        let deleted = run_with_timeout(
            suite.daemon.ctr().args(["task", "delete", &id]),
            CTR_TIMEOUT,
        )?;
        let said = text(&deleted.stderr) + &text(&deleted.stdout);
        ensure!(
            said.contains("exit code 255") || deleted.status.success(),
            "ctr task delete of the dead guest: {}",
            describe(&deleted)
        );
        println!(
            "hung guest: kill returned in {:.1} s ({}), STOPPED after {:.1} s, delete: {}",
            kill_took.as_secs_f64(),
            if killed.status.success() {
                "ok"
            } else {
                "error"
            },
            dead_after.as_secs_f64(),
            said.trim()
        );
        Ok("kill returned,STOPPED,deleted".to_owned())
    })();
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let observed = result?;
    suite.nothing_left_of(&id)?;
    ensure!(
        !husk_sandbox_dir(&id).exists(),
        "{} is left after the dead guest was deleted",
        husk_sandbox_dir(&id).display()
    );
    Ok(observed)
}

/// `/run/husk/sandboxes` out of inodes at different points of a Create
/// (a tmpfs with 2 to 16 inodes over it): each Create either fails
/// with a message naming the problem or succeeds, and nothing is left.
fn run_dir_full_during_create(suite: &Suite, rt: Runtime) -> Result<String> {
    let run_dir = Path::new("/run/husk/sandboxes");
    std::fs::create_dir_all(run_dir)?;
    let mut observed = Vec::new();
    for inodes in [2, 4, 6, 8, 10, 12, 16] {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size=1m,nr_inodes={inodes},mode=0755"))
            .args(["tmpfs"])
            .arg(run_dir)
            .status()?;
        ensure!(
            status.success(),
            "cannot mount a small tmpfs on {}",
            run_dir.display()
        );
        let id = suite.id(rt, &format!("runfull{inodes}"));
        let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, &["echo", "hello"]);
        let left = suite.nothing_left_of(&id);
        let entries: Vec<_> = std::fs::read_dir(run_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let mounts: Vec<_> = mounts_under(run_dir)
            .into_iter()
            .filter(|m| Path::new(m) != run_dir)
            .collect();
        let unmounted = Command::new("umount").arg("-l").arg(run_dir).status();
        let out = out?;
        left?;
        ensure!(
            unmounted.is_ok_and(|s| s.success()),
            "cannot unmount the small tmpfs"
        );
        ensure!(
            mounts.is_empty(),
            "mounts left under {}: {mounts:?}",
            run_dir.display()
        );
        ensure!(
            entries.is_empty(),
            "left in {}: {entries:?}",
            run_dir.display()
        );
        if out.status.success() {
            ensure!(
                text(&out.stdout) == "hello\n",
                "ran, but said {:?}",
                text(&out.stdout)
            );
            observed.push(format!("{inodes}:ran"));
        } else {
            let message = text(&out.stderr);
            ensure!(
                message.contains("No space left on device"),
                "the failure does not say the space ran out: {message:?}"
            );
            observed.push(format!("{inodes}:ENOSPC"));
        }
    }
    Ok(observed.join(","))
}

/// `ctr events` running in the background, for one scenario.
struct EventWatch {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl EventWatch {
    fn start(suite: &Suite) -> Result<Self> {
        let mut child = suite
            .daemon
            .ctr()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run ctr events")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        // ctr events subscribes asynchronously; give it a moment to be
        // listening before the scenario acts (an event published before
        // would be missed, which the assertions would report).
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// The task topics seen for container `id`, in order.
    fn topics_for(&self, id: &str) -> Vec<String> {
        let needle = format!("\"container_id\":\"{id}\"");
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(&needle))
            .filter_map(|line| line.split_whitespace().find(|w| w.starts_with("/tasks/")))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `topic` was seen for `id`.
    fn wait_for(&self, id: &str, topic: &str) -> Result<()> {
        let started = Instant::now();
        while !self.topics_for(id).iter().any(|t| t == topic) {
            ensure!(
                started.elapsed() < STATE_TIMEOUT,
                "no {topic} event for {id}; saw {:?}",
                self.topics_for(id)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The task events a run -d / exec / pause / resume / kill / delete cycle
/// publishes, by topic and in order.
fn task_events_published(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "events");
    let watch = EventWatch::start(suite)?;
    let out = suite.ctr_run(rt, &["-d"], IMAGE, &id, &["sleep", "1000"])?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<()> {
        suite.wait_status(&id, "RUNNING")?;
        suite.ctr_ok(&["task", "exec", "--exec-id", "ev", &id, "true"])?;
        suite.ctr_ok(&["task", "pause", &id])?;
        suite.ctr_ok(&["task", "resume", &id])?;
        suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id])?;
        suite.wait_status(&id, "STOPPED")?;
        suite.ctr_ok(&["task", "delete", &id])?;
        watch.wait_for(&id, "/tasks/delete")
    })();
    let _ = suite.ctr_ok(&["task", "delete", &id]);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    result?;
    let topics = watch.topics_for(&id);
    for wanted in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        ensure!(
            topics.iter().any(|t| t == wanted),
            "no {wanted} event for {id}; saw {topics:?}"
        );
    }
    suite.nothing_left_of(&id)?;
    Ok(topics.join(","))
}

/// A container that allocates past its memory limit is OOM-killed: exit
/// 137 and a /tasks/oom event naming it.
fn oom_kill_reported(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "oom");
    let watch = EventWatch::start(suite)?;
    let out = suite.ctr_run(
        rt,
        &["--rm", "--memory-limit", "33554432"],
        IMAGE,
        &id,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    )?;
    let code = out.status.code().unwrap_or(-1);
    ensure!(
        code == 137,
        "dd of a 64 MiB block under a 32 MiB limit: {}",
        describe(&out)
    );
    watch.wait_for(&id, "/tasks/oom")?;
    suite.nothing_left_of(&id)?;
    Ok(format!("exit={code},oom-event"))
}

/// `ctr run -d --log-uri`: the container's stdout and stderr reach a
/// `file://` log, and a `binary://` logging program (containerd's protocol:
/// stdout on fd 3, stderr on fd 4, fd 5 closed when ready).
fn log_uri_file_and_binary(suite: &Suite, rt: Runtime) -> Result<String> {
    let dir = suite.work.join(format!("logs-{}", rt.label()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let logger = dir.join("logger.sh");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\ncat <&3 > {d}/binary-out &\ncat <&4 > {d}/binary-err\nwait\n",
            d = dir.display()
        ),
    )?;
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut seen = Vec::new();
    for (kind, uri) in [
        ("file", format!("file://{}/file.log", dir.display())),
        ("binary", format!("binary://{}", logger.display())),
    ] {
        let id = suite.id(rt, &format!("log{kind}"));
        let out = suite.ctr_run(
            rt,
            &["-d", "--log-uri", &uri],
            IMAGE,
            &id,
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
        )?;
        let result = (|| -> Result<()> {
            ensure!(
                out.status.success(),
                "ctr run -d --log-uri {uri}: {}",
                describe(&out)
            );
            suite.wait_status(&id, "STOPPED")?;
            Ok(())
        })();
        let _ = suite.ctr_ok(&["task", "delete", &id]);
        let _ = suite.ctr_ok(&["containers", "rm", &id]);
        result?;
        suite.nothing_left_of(&id)?;
        let logged = if kind == "file" {
            let text = std::fs::read_to_string(dir.join("file.log")).unwrap_or_default();
            let mut lines: Vec<&str> = text.lines().collect();
            lines.sort();
            lines.join("+")
        } else {
            let started = Instant::now();
            // The logging program ends when both pipes closed.
            while !dir.join("binary-err").exists() && started.elapsed() < STATE_TIMEOUT {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(200));
            let out = std::fs::read_to_string(dir.join("binary-out")).unwrap_or_default();
            let err = std::fs::read_to_string(dir.join("binary-err")).unwrap_or_default();
            format!("out:{}|err:{}", out.trim(), err.trim())
        };
        seen.push(format!("{kind}={logged}"));
    }
    let observed = seen.join(",");
    ensure!(
        observed == "file=to-stderr+to-stdout,binary=out:to-stdout|err:to-stderr",
        "what the logs received: {observed}"
    );
    Ok(observed)
}

/// Two containers of one CRI pod (annotation `io.kubernetes.cri.sandbox-id`)
/// are served by one shim process (and, under husk, one VM).
fn pod_containers_share_one_shim(suite: &Suite, rt: Runtime) -> Result<String> {
    two_containers_in_one_pod(suite, rt, suite.id(rt, "pod"), suite.id(rt, "member"))
}

/// A 64-hex id as CRI makes them, unique in this run.
fn cri_id(suite: &Suite, rt: Runtime, what: &str) -> String {
    use sha2::{Digest, Sha256};
    let seed = format!("{}-{}", suite.id(rt, what), std::process::id());
    Sha256::digest(seed.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The pod scenario with CRI-shaped ids: a 64-hex sandbox id and a 64-hex
/// container id (every socket path of the pod must still fit).
fn cri_64_hex_ids_pod_of_two(suite: &Suite, rt: Runtime) -> Result<String> {
    let pod = cri_id(suite, rt, "pod");
    let member = cri_id(suite, rt, "member");
    ensure!(pod.len() == 64 && member.len() == 64);
    let observed = two_containers_in_one_pod(suite, rt, pod, member)?;
    Ok(format!("{observed} (ids of 64 hex)"))
}

fn two_containers_in_one_pod(
    suite: &Suite,
    rt: Runtime,
    pod: String,
    member: String,
) -> Result<String> {
    let sandbox_annotation = format!("io.kubernetes.cri.sandbox-id={pod}");
    let mut started = Vec::new();
    let result = (|| -> Result<String> {
        for (id, kind) in [(&pod, "sandbox"), (&member, "container")] {
            let type_annotation = format!("io.kubernetes.cri.container-type={kind}");
            let out = suite.ctr_run(
                rt,
                &[
                    "-d",
                    "--annotation",
                    &sandbox_annotation,
                    "--annotation",
                    &type_annotation,
                ],
                IMAGE,
                id,
                &["sleep", "1000"],
            )?;
            ensure!(out.status.success(), "ctr run -d {id}: {}", describe(&out));
            started.push(id.clone());
            suite.wait_status(id, "RUNNING")?;
        }
        let shims: Vec<u32> = suite
            .daemon
            .shim_processes()
            .into_iter()
            .filter(|p| p.args.iter().any(|a| a == &pod || a == &member))
            .map(|p| p.pid)
            .collect();
        ensure!(
            shims.len() == 1,
            "the pod's two containers have shims {shims:?}"
        );
        let vms = containerd::qemu_processes()
            .into_iter()
            .filter(|p| p.ppid == shims[0])
            .count();
        if rt == Runtime::Husk {
            ensure!(vms <= 1, "the pod's shim runs {vms} VMs");
        }
        let echoed = suite.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "m",
            &member,
            "echo",
            "member-ok",
        ])?;
        ensure!(
            echoed.trim() == "member-ok",
            "exec in the pod's second container printed {echoed:?}"
        );
        Ok(format!("shims=1,exec={}", echoed.trim()))
    })();
    for id in started.iter().rev() {
        let _ = suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = suite.wait_status(id, "STOPPED");
        let _ = suite.ctr_ok(&["task", "delete", id]);
        let _ = suite.ctr_ok(&["containers", "rm", id]);
    }
    let observed = result?;
    suite.nothing_left_of(&pod)?;
    suite.nothing_left_of(&member)?;
    Ok(observed)
}

fn five_containers_in_parallel(suite: &Suite, rt: Runtime) -> Result<String> {
    let runs: Vec<_> = (0..5)
        .map(|n| {
            let id = suite.id(rt, "par");
            let script = format!("echo parallel-{n}; exit {}", 10 + n);
            let mut command = suite.run_command(rt, &["--rm"], IMAGE, &id, &["sh", "-c", &script]);
            std::thread::spawn(move || {
                (
                    n,
                    id,
                    run_with_timeout(&mut command, CTR_TIMEOUT).map_err(|e| format!("{e:#}")),
                )
            })
        })
        .collect();
    let mut problems = Vec::new();
    let mut lost_output = Vec::new();
    for run in runs {
        let (n, id, out) = run.join().map_err(|_| anyhow::anyhow!("a run panicked"))?;
        match out {
            Ok(out) if out.status.code() != Some(10 + n) => {
                problems.push(format!("{id}: not exit {}: {}", 10 + n, describe(&out)))
            }
            Ok(out) if text(&out.stdout) == format!("parallel-{n}\n") => {}
            // Debian's runc shim sometimes loses the output of a process
            // that exits at once under load (the containerd 1.6 shim's FIFO
            // copy race); husk's shim has no such excuse.
            Ok(out) if rt == Runtime::Runc && out.stdout.is_empty() => lost_output.push(id.clone()),
            Ok(out) => problems.push(format!("{id}: {}", describe(&out))),
            Err(error) => problems.push(format!("{id}: {error}")),
        }
        suite.nothing_left_of(&id)?;
    }
    ensure!(problems.is_empty(), "parallel runs failed: {problems:?}");
    if !lost_output.is_empty() {
        println!(
            "  runc: the runc shim lost the output of {lost_output:?} (exit codes were right); a known race of containerd 1.6's runc shim, not counted"
        );
    }
    Ok("5/5 exit 10..14, each printed its own word".to_owned())
}

fn twenty_runs_in_sequence(suite: &Suite, rt: Runtime) -> Result<String> {
    let mut times = Vec::new();
    for n in 0..20 {
        let id = suite.id(rt, "seq");
        let word = format!("run-{n}");
        let started = Instant::now();
        let out = suite.ctr_run(rt, &["--rm"], IMAGE, &id, &["echo", &word])?;
        times.push(started.elapsed());
        ensure!(
            out.status.success() && text(&out.stdout) == format!("{word}\n"),
            "run {n} of 20: {}",
            describe(&out)
        );
    }
    times.sort();
    println!(
        "  {}: 20 sequential `ctr run --rm` took median {:.0} ms, max {:.0} ms",
        rt.label(),
        times[10].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3
    );
    Ok("20/20 printed their word, exit 0".to_owned())
}

/// `uname -r`, the processors and the memory a container sees, for a pod
/// with the test configuration's size (1 vCPU, 256 MiB from
/// `shim/configuration.toml`, named by containerd's `$HUSK_CONFIG`) and for
/// one whose annotations ask for 2 vCPUs and 512 MiB within the limits.
fn guest_kernel_and_vm_size(suite: &Suite, rt: Runtime) -> Result<String> {
    // The release the product kernel's bzImage header names; the pod
    // boots the same build's vmlinux.
    let guest_release = guest_kernel()?.release;
    let host_release = host_kernel_release()?;
    let probe = [
        "sh",
        "-c",
        "uname -r; grep -c ^processor /proc/cpuinfo; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
    ];
    let mut seen = Vec::new();
    for (annotations, vcpus, memory_mib) in [
        (&[][..], 1u32, 256u64),
        (
            &[
                "--annotation",
                "io.katacontainers.config.hypervisor.default_vcpus=2",
                "--annotation",
                "io.katacontainers.config.hypervisor.default_memory=512",
            ][..],
            2,
            512,
        ),
    ] {
        let id = suite.id(rt, "size");
        let mut flags = vec!["--rm"];
        flags.extend_from_slice(annotations);
        let out = suite.ctr_run(rt, &flags, IMAGE, &id, &probe)?;
        ensure!(out.status.success(), "the probe failed: {}", describe(&out));
        let shown = text(&out.stdout);
        let lines: Vec<&str> = shown.lines().collect();
        ensure!(lines.len() == 3, "the probe printed {shown:?}");
        ensure!(
            lines[0] == guest_release && lines[0] != host_release,
            "uname -r in the container is {:?}: not the guest kernel {guest_release} (host {host_release})",
            lines[0]
        );
        ensure!(
            lines[1] == vcpus.to_string(),
            "the container sees {} processors, not {vcpus} ({annotations:?})",
            lines[1]
        );
        let total_kib: u64 = lines[2].parse().context("MemTotal")?;
        // The kernel keeps some memory for itself: MemTotal is a little
        // below the VM's size, never above it.
        ensure!(
            total_kib <= memory_mib * 1024 && total_kib > memory_mib * 1024 * 3 / 4,
            "MemTotal {total_kib} kB does not fit a {memory_mib} MiB VM ({annotations:?})"
        );
        seen.push(format!("{vcpus} vCPU/{memory_mib} MiB ok"));
        suite.nothing_left_of(&id)?;
        // The shim logs through containerd's log FIFO, naming the pod and
        // the container.
        let log = std::fs::read_to_string(suite.daemon.log_path()).unwrap_or_default();
        let started = format!("container started sandbox_id={id} container_id={id}");
        ensure!(
            log.lines()
                .any(|l| l.contains("husk_shim") && l.contains(&started)),
            "containerd's log has no shim line {started:?}"
        );
    }
    Ok(format!(
        "guest kernel {guest_release} (host {host_release}); {}",
        seen.join(", ")
    ))
}

/// The v1 memory hierarchy, or the v2 root: where the pod's memory shows.
fn memory_cgroup_root() -> (PathBuf, &'static str) {
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        return (
            PathBuf::from("/sys/fs/cgroup/memory"),
            "memory.usage_in_bytes",
        );
    }
    (PathBuf::from("/sys/fs/cgroup"), "memory.current")
}

/// The `memory` (v1) or unified (v2) cgroup of `pid`, as in /proc/PID/cgroup.
fn memory_cgroup_of(pid: u32) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let v1 = text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then(|| path.to_owned())
    });
    let v2 = text
        .lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned));
    v1.or(v2)
        .with_context(|| format!("no memory cgroup in /proc/{pid}/cgroup: {text}"))
}

/// QEMU `pid` (its `/proc` status in `status`) runs as one uid of the
/// default `hypervisor.qemu_id_*` range, real, effective, saved and file
/// system alike, with the gid of the same number, no supplementary group
/// but `/dev/kvm`'s, and no capabilities. Returns what it saw.
fn qemu_runs_unprivileged(pid: u32, status: &str) -> Result<String> {
    use husk_shim::hypervisor::qemu::{DEFAULT_QEMU_ID_COUNT, DEFAULT_QEMU_ID_FIRST};
    let ids = |key: &str| -> Result<Vec<u32>> {
        status_field(status, key)
            .split_whitespace()
            .map(|id| {
                id.parse()
                    .with_context(|| format!("{key} {id} of QEMU {pid}"))
            })
            .collect()
    };
    let uids = ids("Uid:")?;
    let gids = ids("Gid:")?;
    let uid = uids.first().copied().unwrap_or(0);
    let range = u64::from(DEFAULT_QEMU_ID_FIRST)
        ..u64::from(DEFAULT_QEMU_ID_FIRST) + u64::from(DEFAULT_QEMU_ID_COUNT);
    ensure!(
        uids.len() == 4
            && uids.iter().all(|&id| id == uid)
            && range.contains(&u64::from(uid))
            && gids == uids,
        "QEMU {pid} runs as Uid {uids:?} Gid {gids:?}, not one unprivileged id of {range:?}"
    );
    let groups = ids("Groups:")?;
    let kvm_group = std::fs::metadata("/dev/kvm")
        .ok()
        .map(|meta| std::os::unix::fs::MetadataExt::gid(&meta));
    ensure!(
        groups.is_empty() || kvm_group.is_some_and(|kvm| groups == [kvm]),
        "QEMU {pid} has the supplementary groups {groups:?} (at most /dev/kvm's, {kvm_group:?})"
    );
    for key in ["CapEff:", "CapPrm:", "CapAmb:"] {
        let caps = u64::from_str_radix(&status_field(status, key), 16)?;
        ensure!(caps == 0, "QEMU {pid} holds capabilities: {key} {caps:#x}");
    }
    Ok(format!("uid=gid={uid} CapEff 0"))
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key).map(|rest| rest.trim().to_owned()))
        .unwrap_or_default()
}

fn status_kib(status: &str, key: &str) -> u64 {
    status_field(status, key)
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// What the virtio-fs threads may keep (husk-confine's FS_WORKER_CAPS):
/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP.
const FS_CAPS_MASK: u64 =
    (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 27) | (1 << 31);

/// A running pod, read from /proc: every thread that serves a device runs
/// under a seccomp filter with no_new_privs; the vsock threads hold no
/// capability, the virtio-fs threads only the passthrough's, in a mount
/// namespace of their own whose root holds the share; QEMU runs
/// under its own seccomp sandbox, as an unprivileged uid and gid of the
/// default range with no capabilities; the shim and QEMU sit in the pod's
/// cgroup, which pays for the VM's memory; the cgroup goes with the pod.
fn confinement_and_cgroup_of_a_running_pod(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "confined");
    let cgroup = format!("/husk-e2e/{id}");
    let (memory_root, usage_file) = memory_cgroup_root();
    let cgroup_dir = memory_root.join(cgroup.trim_start_matches('/'));
    let out = suite.ctr_run(
        rt,
        &["-d", "--cgroup", &cgroup],
        IMAGE,
        &id,
        &["sleep", "1000"],
    )?;
    ensure!(out.status.success(), "ctr run -d: {}", describe(&out));
    let result = (|| -> Result<String> {
        suite.wait_status(&id, "RUNNING")?;
        let shim = husk_shim_of(suite, &id)?;
        let vm = qemu_child_of(shim, &id)?;
        let mut classes: Vec<String> = Vec::new();
        let mut rpc_seccomp = Vec::new();
        let shim_namespace = std::fs::read_link(format!("/proc/{shim}/ns/mnt"))?;
        for entry in std::fs::read_dir(format!("/proc/{shim}/task"))? {
            let dir = entry?.path();
            let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            let name = name.trim().to_owned();
            let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
                continue;
            };
            let seccomp = status_field(&status, "Seccomp:");
            let no_new_privs = status_field(&status, "NoNewPrivs:");
            let effective = u64::from_str_radix(&status_field(&status, "CapEff:"), 16)?;
            let bounding = u64::from_str_radix(&status_field(&status, "CapBnd:"), 16)?;
            let class = if name.starts_with("vhost-user-vsoc") {
                "vsock"
            } else if name.starts_with("vhost-user-fs") {
                "fs"
            } else if name == "vring_worker" {
                "vring"
            } else {
                if name.starts_with("tokio") {
                    rpc_seccomp.push(seccomp);
                }
                continue;
            };
            ensure!(
                seccomp == "2" && no_new_privs == "1",
                "{class} thread {name} ({}) has Seccomp {seccomp}, NoNewPrivs {no_new_privs}",
                dir.display()
            );
            let allowed = if class == "vsock" { 0 } else { FS_CAPS_MASK };
            ensure!(
                effective & !allowed == 0 && bounding & !allowed == 0,
                "{class} thread {name} holds capabilities beyond {allowed:#x}: CapEff {effective:#x} CapBnd {bounding:#x}"
            );
            if class == "fs" {
                ensure!(
                    effective != 0,
                    "the fs thread {name} lost the passthrough's capabilities"
                );
                // Its own mount namespace, whose root holds the share
                // (with this container in it) and not the host's /etc.
                let namespace = std::fs::read_link(dir.join("ns/mnt"))?;
                ensure!(
                    namespace != shim_namespace,
                    "the fs thread {name} shares the shim's mount namespace {}",
                    shim_namespace.display()
                );
                let root = dir.join("root");
                ensure!(
                    root.join("share").join(&id).exists() && !root.join("etc").exists(),
                    "the fs thread {name}'s root is not the private root holding the share: {:?}",
                    std::fs::read_dir(&root).map(|entries| entries
                        .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
                        .collect::<Vec<_>>())
                );
            }
            let namespace = std::fs::read_link(dir.join("ns/mnt"))?;
            classes.push(format!(
                "{class}({name}) seccomp=2 nnp=1 capeff={effective:#x} {}",
                namespace.display()
            ));
        }
        ensure!(
            classes.iter().any(|c| c.starts_with("vsock"))
                && classes.iter().any(|c| c.starts_with("fs")),
            "no vsock or no fs device thread among the shim's threads: {classes:?}"
        );
        let qemu_status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid))?;
        ensure!(
            status_field(&qemu_status, "Seccomp:") == "2",
            "QEMU {} runs without a seccomp filter (-sandbox)",
            vm.pid
        );
        let qemu_ids = qemu_runs_unprivileged(vm.pid, &qemu_status)?;
        for (what, pid) in [("shim", shim), ("QEMU", vm.pid)] {
            let placed = memory_cgroup_of(pid)?;
            ensure!(
                placed == cgroup,
                "the {what} {pid} is in memory cgroup {placed}, not the pod's {cgroup}"
            );
        }
        let usage: u64 = std::fs::read_to_string(cgroup_dir.join(usage_file))
            .with_context(|| format!("cannot read {}", cgroup_dir.join(usage_file).display()))?
            .trim()
            .parse()?;
        let qemu_anon_kib = status_kib(&qemu_status, "RssAnon:");
        ensure!(
            usage >= qemu_anon_kib * 1024,
            "the pod's cgroup is charged {usage} bytes, less than QEMU's {qemu_anon_kib} KiB of anonymous memory"
        );
        // The control threads run under the process-wide deny list.
        ensure!(
            !rpc_seccomp.is_empty() && rpc_seccomp.iter().all(|mode| mode == "2"),
            "the shim's tokio RPC threads are not all filtered: Seccomp {rpc_seccomp:?}"
        );
        Ok(format!(
            "{} device threads confined; {} tokio RPC threads under the deny list (Seccomp 2); QEMU Seccomp 2, {qemu_ids}; shim+QEMU in {cgroup}, charged {} MiB (QEMU anon {} MiB)",
            classes.len(),
            rpc_seccomp.len(),
            usage >> 20,
            qemu_anon_kib >> 10
        ))
    })();
    let _ = suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let _ = suite.wait_status(&id, "STOPPED");
    let _ = suite.ctr_ok(&["task", "delete", &id]);
    let _ = suite.ctr_ok(&["containers", "rm", &id]);
    let observed = result?;
    suite.nothing_left_of(&id)?;
    ensure!(
        !cgroup_dir.exists(),
        "the pod's cgroup {} is left after delete",
        cgroup_dir.display()
    );
    let _ = std::fs::remove_dir(memory_root.join("husk-e2e"));
    Ok(observed)
}

/// A pod whose annotations ask for more memory than its cgroup's parent
/// allows is refused at Create, naming both numbers; nothing is left.
fn vm_above_the_pod_cgroup_limit_is_refused(suite: &Suite, _rt: Runtime) -> Result<String> {
    let (memory_root, _) = memory_cgroup_root();
    let parent = memory_root.join("husk-e2e-limit");
    let _ = std::fs::create_dir(&parent);
    let limit_file = if memory_root.join("memory.limit_in_bytes").exists() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    std::fs::write(parent.join(limit_file), (300u64 << 20).to_string())
        .with_context(|| format!("cannot limit {}", parent.display()))?;
    let result = refused(
        suite,
        "cglimit",
        &[
            "--cgroup",
            "/husk-e2e-limit/pod",
            "--annotation",
            "io.katacontainers.config.hypervisor.default_memory=512",
        ],
        &[
            "512 MiB",
            "300 MiB",
            "io.katacontainers.config.hypervisor.default_memory",
        ],
    );
    let left = parent.join("pod").exists();
    let _ = std::fs::remove_dir(parent.join("pod"));
    let _ = std::fs::remove_dir(&parent);
    ensure!(!left, "the refused pod's cgroup was created and left");
    result
}

/// Runs `/bin/true` with `flags` and checks that `ctr run` fails with a
/// message containing every one of `needles`, and that nothing is left.
fn refused(suite: &Suite, what: &str, flags: &[&str], needles: &[&str]) -> Result<String> {
    let id = suite.id(Runtime::Husk, what);
    let mut all_flags = vec!["--rm"];
    all_flags.extend_from_slice(flags);
    let out = suite.ctr_run(Runtime::Husk, &all_flags, IMAGE, &id, &["true"])?;
    let message = text(&out.stderr);
    let result = (|| {
        ensure!(
            !out.status.success(),
            "ctr run succeeded: {}",
            describe(&out)
        );
        for needle in needles {
            ensure!(
                message.contains(needle),
                "ctr's message does not name {needle:?}: {message:?}"
            );
        }
        Ok(())
    })();
    let left = suite.nothing_left_of(&id);
    result?;
    left?;
    let first_line = message.lines().last().unwrap_or("").trim();
    Ok(format!("refused: {first_line}"))
}

/// Writes a husk configuration with `overrides` into the work directory.
fn bad_config(suite: &Suite, name: &str, overrides: &[(&str, String)]) -> Result<PathBuf> {
    let path = suite.work.join(name);
    std::fs::write(&path, test_husk_config(overrides)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn bad_unknown_hypervisor_kind(suite: &Suite, _rt: Runtime) -> Result<String> {
    let config = bad_config(
        suite,
        "kind-ghostvisor.toml",
        &[("kind", toml_string("ghostvisor"))],
    )?;
    let config = config.to_string_lossy().into_owned();
    refused(
        suite,
        "kind",
        &["--runtime-config-path", &config],
        &["ghostvisor"],
    )
}

fn bad_missing_kernel(suite: &Suite, _rt: Runtime) -> Result<String> {
    let missing = "/nonexistent/husk-e2e-missing";
    let config = bad_config(
        suite,
        "missing-kernel.toml",
        &[
            ("kernel", toml_string(&format!("{missing}/vmlinux"))),
            ("qemu_kernel", toml_string(&format!("{missing}/bzImage"))),
        ],
    )?;
    let config = config.to_string_lossy().into_owned();
    refused(
        suite,
        "nokernel",
        &["--runtime-config-path", &config],
        &[missing],
    )
}

fn bad_10000_vcpus_annotation(suite: &Suite, _rt: Runtime) -> Result<String> {
    refused(
        suite,
        "vcpus",
        &[
            "--annotation",
            "io.katacontainers.config.hypervisor.default_vcpus=10000",
        ],
        &["default_vcpus", "10000"],
    )
}

fn bad_unreadable_config(suite: &Suite, _rt: Runtime) -> Result<String> {
    // Root reads a mode-000 file, so "unreadable" is a directory where the
    // file should be, and a path in a directory that does not exist.
    let directory = suite.work.join("config-is-a-directory.toml");
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("cannot create {}", directory.display()))?;
    let directory = directory.to_string_lossy().into_owned();
    let first = refused(
        suite,
        "cfgdir",
        &["--runtime-config-path", &directory],
        &[&directory],
    )?;
    let absent = "/nonexistent/husk-e2e-missing/configuration.toml";
    let second = refused(
        suite,
        "cfgabsent",
        &["--runtime-config-path", absent],
        &[absent],
    )?;
    Ok(format!("{first} / {second}"))
}

fn selected_runtimes() -> Result<Vec<Runtime>> {
    let wanted = std::env::var("HUSK_E2E_RUNTIMES").unwrap_or_else(|_| "runc,husk".to_owned());
    let mut runtimes = Vec::new();
    for name in wanted.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        runtimes.push(match name {
            "runc" => Runtime::Runc,
            "husk" => Runtime::Husk,
            other => bail!("HUSK_E2E_RUNTIMES names {other:?}; use runc, husk or runc,husk"),
        });
    }
    ensure!(!runtimes.is_empty(), "HUSK_E2E_RUNTIMES selects no runtime");
    Ok(runtimes)
}

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    match run(&filters) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            println!("test e2e_setup ... FAILED\n{error:#}");
            announce_form("e2e via ctr: FAILED before any scenario");
            println!(
                "\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"
            );
            ExitCode::FAILURE
        }
    }
}

fn run(filters: &[String]) -> Result<bool> {
    let started = Instant::now();
    let runtimes = selected_runtimes()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the e2e tier needs root (containerd, mounts, cgroups)"
    );
    let form = match runtimes.as_slice() {
        [Runtime::Runc, Runtime::Husk] | [Runtime::Husk, Runtime::Runc] => {
            "runc and husk compared".to_owned()
        }
        [only] => format!(
            "{} only (HUSK_E2E_RUNTIMES={}); the other runtime's half did not run",
            only.label(),
            only.label()
        ),
        _ => "runtimes as listed in HUSK_E2E_RUNTIMES".to_owned(),
    };
    let before = Snapshot::take();
    // Short, under /tmp: the Unix socket paths inside must fit.
    let work = TestDir::new_in(Path::new("/tmp"), "e2e")?;
    let options = Options::for_tests(work.path())?;
    if runtimes.contains(&Runtime::Husk) {
        let shim = options.shim_dir.join("containerd-shim-kata-v2");
        ensure!(
            shim.is_file(),
            "{} is missing: run `make build` (or set HUSK_SHIM_DIR), or HUSK_E2E_RUNTIMES=runc",
            shim.display()
        );
        for (key, path) in guest_artifacts() {
            ensure!(
                path.is_file(),
                "the husk configuration's {key} {} is missing: run `make kernel initrd`",
                path.display()
            );
        }
    }
    let daemon = PrivateContainerd::start(&work.join("containerd"), &options)
        .context("starting the private containerd")?;
    daemon
        .import_test_image()
        .context("importing the test image")?;
    announce_form(format_args!(
        "e2e via ctr 1.6 against a private containerd: {form}; image {IMAGE}"
    ));
    println!(
        "private containerd pid {} at {} (husk config {})",
        daemon.pid(),
        daemon.address().display(),
        options.husk_config.display()
    );
    let suite = Suite {
        daemon,
        options: options.clone(),
        work: work.path().to_path_buf(),
        next_id: AtomicU32::new(0),
    };

    let (mut passed, mut failed) = (0usize, Vec::new());
    let (mut filtered_out, mut ignored) = (0usize, 0usize);
    for scenario in scenarios() {
        if !filters.is_empty() && !filters.iter().any(|f| scenario.name.contains(f.as_str())) {
            filtered_out += 1;
            continue;
        }
        let scenario_started = Instant::now();
        let mut results: Vec<(Runtime, Option<Result<String>>)> = Vec::new();
        for runtime in [Runtime::Runc, Runtime::Husk] {
            let runs =
                runtimes.contains(&runtime) && !(scenario.husk_only && runtime == Runtime::Runc);
            let result = runs.then(|| (scenario.run)(&suite, runtime));
            results.push((runtime, result));
        }
        let shown = |runtime: Runtime, result: &Option<Result<String>>| match result {
            Some(Ok(observation)) => observation.clone(),
            Some(Err(_)) => "FAILED".to_owned(),
            None if scenario.husk_only && runtime == Runtime::Runc => "n/a".to_owned(),
            None => "not-run".to_owned(),
        };
        let observations: Vec<&String> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref()?.as_ref().ok())
            .collect();
        let errors: Vec<String> = results
            .iter()
            .filter_map(|(rt, r)| match r {
                Some(Err(e)) => Some(format!("{}: {e:#}", rt.label())),
                _ => None,
            })
            .collect();
        let ran = results.iter().filter(|(_, r)| r.is_some()).count();
        let verdict = if ran == 0 {
            "not-run"
        } else if !errors.is_empty() {
            "FAILED"
        } else if ran == 2 && observations[0] != observations[1] {
            "DIFFERENT"
        } else if ran == 2 {
            "same"
        } else {
            "one-runtime"
        };
        println!(
            "e2e {} runc={} husk={} {verdict}",
            scenario.name,
            shown(Runtime::Runc, &results[0].1),
            shown(Runtime::Husk, &results[1].1)
        );
        let seconds = scenario_started.elapsed().as_secs_f64();
        if verdict == "not-run" {
            println!(
                "test {} ... ignored (husk is not among HUSK_E2E_RUNTIMES)",
                scenario.name
            );
            ignored += 1;
        } else if verdict == "same" || verdict == "one-runtime" {
            println!("test {} ... ok ({seconds:.1} s)", scenario.name);
            passed += 1;
        } else {
            println!("test {} ... FAILED ({seconds:.1} s)", scenario.name);
            let mut why = errors.join("\n");
            if verdict == "DIFFERENT" {
                why = "husk's observation differs from runc's".to_owned();
            }
            failed.push((scenario.name, why));
        }
    }

    // Everything is deleted: nothing of any runtime may be left.
    let name = "nothing_left_after_all_scenarios";
    let leak_started = Instant::now();
    let mut left = leftovers(&suite.daemon, &before);
    while !left.is_empty() && leak_started.elapsed() < SHIM_EXIT_TIMEOUT {
        std::thread::sleep(Duration::from_millis(200));
        left = leftovers(&suite.daemon, &before);
    }
    // A confined shim thread that made a call outside its allowlist under
    // `seccomp_action = "trap"` leaves a line; under "kill" it failed its
    // scenario. Either way it is a failure here, named.
    let trapped: Vec<String> = std::fs::read_to_string(suite.daemon.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("husk: seccomp:"))
        .map(str::to_owned)
        .collect();
    let trap_name = "no_seccomp_trap_in_containerds_log";
    if trapped.is_empty() {
        println!("test {trap_name} ... ok");
        passed += 1;
    } else {
        println!("test {trap_name} ... FAILED");
        failed.push((trap_name, trapped.join("\n")));
    }
    let Suite { mut daemon, .. } = suite;
    let log_tail = daemon.log_tail(40);
    let forced = daemon.stop().context("stopping the private containerd")?;
    left.extend(forced.into_iter().map(|f| format!("at stop: {f}")));
    if left.is_empty() {
        println!(
            "test {name} ... ok (no shim or qemu process, mount, socket, husk state or bundle left)"
        );
        passed += 1;
    } else {
        println!("test {name} ... FAILED");
        failed.push((name, left.join("\n")));
    }

    if !failed.is_empty() {
        println!("\nfailures:");
        for (name, why) in &failed {
            println!("---- {name} ----\n{why}\n");
        }
        println!("containerd's log ended with:\n{log_tail}\n");
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; {ignored} ignored; 0 measured; {filtered_out} filtered out; finished in {:.1}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(failed.is_empty())
}

// ---- operator tooling (#14): husk-ctl and the management socket --------

/// Port `husk-ctl monitor` listens on in the monitor scenario.
const MONITOR_PORT: u16 = 18090;
/// Port the scenario's Prometheus serves its API on.
const PROMETHEUS_PORT: u16 = 19090;
/// How long Prometheus may take to start and scrape a husk series.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(90);

/// `husk-ctl <args>` (built beside the shim); its output.
fn husk_ctl(suite: &Suite, args: &[&str]) -> Result<Output> {
    let binary = suite.options.shim_dir.join("husk-ctl");
    ensure!(
        binary.is_file(),
        "{} is missing: build husk-ctl beside the shim",
        binary.display()
    );
    run_with_timeout(Command::new(&binary).args(args), CTR_TIMEOUT)
}

/// Starts a detached pod running `sleep`, with `flags` for ctr run.
fn start_pod(suite: &Suite, id: &str, flags: &[&str]) -> Result<()> {
    let mut all = vec!["-d"];
    all.extend_from_slice(flags);
    let out = suite.ctr_run(Runtime::Husk, &all, IMAGE, id, &["sleep", "1000"])?;
    let started = if out.status.success() {
        suite.wait_status(id, "RUNNING")
    } else {
        Err(anyhow!("ctr run -d {id}: {}", describe(&out)))
    };
    if started.is_err() {
        // ctr keeps the container record of a task that failed to start.
        let _ = stop_pod(suite, id);
    }
    started
}

fn stop_pod(suite: &Suite, id: &str) -> Result<()> {
    let _ = suite.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    let _ = suite.wait_status(id, "STOPPED");
    let _ = suite.ctr_ok(&["task", "delete", "-f", id]);
    let _ = suite.ctr_ok(&["container", "rm", id]);
    suite.nothing_left_of(id)
}

/// Checks every line of a text exposition: HELP/TYPE comments or
/// `name{labels} value` samples; returns the samples as (series, value).
fn parse_exposition(text: &str) -> Result<Vec<(String, f64)>> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            ensure!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "unexpected comment {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            ensure!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        };
        samples.push((series.to_owned(), value));
    }
    Ok(samples)
}

fn sample(samples: &[(String, f64)], series: &str) -> Option<f64> {
    samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

/// Whether a uid-65534 process may connect to `socket`: forks, drops to
/// nobody, connects; the child's exit code says what connect returned.
fn connect_as_nobody(socket: &Path) -> Result<std::result::Result<(), i32>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(socket.as_os_str().as_bytes())?;
    // SAFETY: an all-zero sockaddr_un is valid; the path fits (checked by
    // the shim's own socket-room rule).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the child only makes system calls (no allocation, no locks)
    // before _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain system calls in the forked child.
        unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                libc::_exit(100);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let length = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let result = libc::connect(fd, std::ptr::addr_of!(addr).cast(), length);
            let errno = *libc::__errno_location();
            libc::_exit(if result == 0 { 0 } else { errno.clamp(1, 99) });
        }
    }
    ensure!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = libc::WEXITSTATUS(status);
    ensure!(code != 100, "the child could not become uid 65534");
    Ok(if code == 0 { Ok(()) } else { Err(code) })
}

fn ops_list_metrics_logs_and_root_only_socket(suite: &Suite, rt: Runtime) -> Result<String> {
    let id = suite.id(rt, "ops");
    start_pod(suite, &id, &[])?;
    let result = (|| -> Result<String> {
        let list = husk_ctl(suite, &["list"])?;
        let listing = text(&list.stdout);
        let row = listing
            .lines()
            .find(|l| l.starts_with(&id))
            .with_context(|| format!("husk-ctl list does not show {id}: {}", describe(&list)))?;
        ensure!(
            row.contains("qemu") || row.contains("builtin"),
            "no backend in {row:?}"
        );
        ensure!(
            row.ends_with(&id),
            "the pod's container is not listed in {row:?}"
        );
        println!("husk-ctl list:\n{listing}");

        // A unique prefix names the pod.
        let prefix = &id[..id.len() - 1];
        let metrics = husk_ctl(suite, &["metrics", prefix])?;
        ensure!(
            metrics.status.success(),
            "husk-ctl metrics: {}",
            describe(&metrics)
        );
        let samples = parse_exposition(&text(&metrics.stdout))?;
        println!(
            "husk-ctl metrics (excerpt):\n{}",
            text(&metrics.stdout)
                .lines()
                .filter(|l| l.starts_with("husk_guest_memory_total")
                    || l.starts_with("husk_boot_phase")
                    || l.starts_with("husk_process_resident"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let guest_total = sample(&samples, "husk_guest_memory_total_bytes")
            .context("no husk_guest_memory_total_bytes")?;
        let meminfo = suite.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "mem",
            &id,
            "sed",
            "-n",
            "s/^MemTotal: *\\([0-9]*\\) kB/\\1/p",
            "/proc/meminfo",
        ])?;
        let agent_kib: f64 = meminfo
            .trim()
            .parse()
            .with_context(|| format!("MemTotal {meminfo:?}"))?;
        ensure!(
            guest_total == agent_kib * 1024.0,
            "metrics say MemTotal {guest_total} bytes, the guest's /proc/meminfo {agent_kib} kB"
        );
        for series in [
            "husk_guest_up",
            "husk_process_threads{process=\"shim\"}",
            "husk_boot_phase_seconds{phase=\"agent_ready\"}",
            "husk_boot_phase_seconds{phase=\"first_container_start\"}",
        ] {
            ensure!(
                sample(&samples, series).is_some_and(|v| v > 0.0),
                "{series} is missing or 0"
            );
        }
        ensure!(
            samples.iter().any(|(s, _)| s
                .starts_with("husk_agent_rpc_duration_seconds_count{method=\"CreateContainer\"}")),
            "no CreateContainer latency"
        );

        let logs = husk_ctl(suite, &["logs", &id])?;
        let shown = text(&logs.stdout);
        println!(
            "husk-ctl logs (excerpt):\n{}",
            shown
                .lines()
                .filter(|l| l.starts_with("==>")
                    || l.contains("HUSK_AGENT_READY")
                    || l.contains("boot phases"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        ensure!(
            logs.status.success()
                && shown.contains("HUSK_AGENT_READY")
                && shown.contains("boot phases"),
            "husk-ctl logs lacks the console's agent line or the shim's boot phases: {}",
            describe(&logs)
        );

        let found = husk_shim::paths::SandboxPaths::new(&id).management_socket();
        match connect_as_nobody(&found)? {
            Err(code) if code == libc::EACCES => {}
            other => bail!(
                "uid 65534 connecting to {}: {other:?}, not EACCES",
                found.display()
            ),
        }
        let exec = husk_ctl(suite, &["exec", &id, "--", "uname", "-r"])?;
        println!(
            "husk-ctl exec with the debug console off: {}",
            text(&exec.stderr).trim()
        );
        ensure!(
            !exec.status.success() && text(&exec.stderr).contains("debug_console = true"),
            "husk-ctl exec with the debug console off: {}",
            describe(&exec)
        );
        Ok(format!(
            "listed; MemTotal {} MiB as the guest says; logs; nobody EACCES; exec refused",
            guest_total / 1048576.0
        ))
    })();
    let stopped = stop_pod(suite, &id);
    let seen = result?;
    stopped?;
    Ok(seen)
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(CTR_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let (code, body) =
        husk_shim::management::http::parse_response(&bytes).map_err(anyhow::Error::msg)?;
    ensure!(
        code == 200,
        "GET {path} on port {port}: {code}: {}",
        text(body)
    );
    Ok(text(body))
}

/// Kills and reaps a child on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ops_monitor_two_pods_and_a_prometheus_scrape(suite: &Suite, rt: Runtime) -> Result<String> {
    let ids = [suite.id(rt, "mon"), suite.id(rt, "mon")];
    let mut started = Vec::new();
    let result = (|| -> Result<String> {
        for (id, name) in ids.iter().zip(["web", "db"]) {
            start_pod(
                suite,
                id,
                &[
                    "--annotation",
                    &format!("io.kubernetes.cri.sandbox-name={name}"),
                    "--annotation",
                    "io.kubernetes.cri.sandbox-namespace=ops",
                ],
            )?;
            started.push(id.clone());
        }
        let binary = suite.options.shim_dir.join("husk-ctl");
        let _monitor = Reaped(
            Command::new(&binary)
                .args(["monitor", "--listen", &format!("127.0.0.1:{MONITOR_PORT}")])
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {} monitor", binary.display()))?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let aggregated = loop {
            match http_get(MONITOR_PORT, "/metrics") {
                Ok(body) => break body,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(error) => return Err(error.context("husk-ctl monitor never answered")),
            }
        };
        let samples = parse_exposition(&aggregated)?;
        for (id, name) in ids.iter().zip(["web", "db"]) {
            let series = format!(
                "husk_guest_up{{sandbox_id=\"{id}\",pod_name=\"{name}\",pod_namespace=\"ops\"}}"
            );
            ensure!(
                sample(&samples, &series) == Some(1.0),
                "the monitor has no {series}"
            );
        }
        ensure!(
            aggregated.matches("# TYPE husk_guest_up ").count() == 1,
            "husk_guest_up's TYPE appears more than once"
        );

        let prometheus = Path::new("/usr/bin/prometheus");
        ensure!(
            prometheus.is_file(),
            "{} is missing: `make deps` installs Debian's prometheus",
            prometheus.display()
        );
        let dir = suite.work.join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: husk\n    static_configs:\n      - targets: ['127.0.0.1:{MONITOR_PORT}']\n"),
        )?;
        let _server = Reaped(
            Command::new(prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
                .spawn()
                .context("cannot start prometheus")?,
        );
        let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Ok(body) = http_get(
                PROMETHEUS_PORT,
                "/api/v1/query?query=husk_guest_memory_total_bytes",
            ) {
                if ids
                    .iter()
                    .all(|id| body.contains(&format!("\"sandbox_id\":\"{id}\"")))
                {
                    return Ok("two pods labelled apart; Prometheus queried husk_guest_memory_total_bytes of both".into());
                }
                last = body;
            }
            if Instant::now() > deadline {
                bail!(
                    "Prometheus returned no husk series of both pods within {PROMETHEUS_TIMEOUT:?}: {last}\n{}",
                    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    })();
    for id in &started {
        stop_pod(suite, id)?;
    }
    result
}

fn ops_exec_runs_uname_in_the_guest(suite: &Suite, rt: Runtime) -> Result<String> {
    let release = guest_kernel()?.release;
    let config = bad_config(
        suite,
        "debug-console.toml",
        // Under QEMU the debug initramfs is readable by root only.
        &[
            ("debug_console", "true".to_owned()),
            ("qemu_run_as", toml_string("root")),
        ],
    )?;
    let id = suite.id(rt, "exec");
    start_pod(
        suite,
        &id,
        &["--runtime-config-path", &config.to_string_lossy()],
    )?;
    let result = (|| -> Result<String> {
        let exec = husk_ctl(suite, &["exec", &id, "--", "uname", "-r"])?;
        ensure!(
            exec.status.success() && text(&exec.stdout).trim() == release,
            "husk-ctl exec uname -r: {} (guest kernel {release})",
            describe(&exec)
        );
        Ok(format!("uname -r = {release}"))
    })();
    let stopped = stop_pod(suite, &id);
    let seen = result?;
    stopped?;
    Ok(seen)
}
