//! The CRI behaviours a pod must show as under runc (issue #16): pod
//! sysctls, stop grace periods, privileged containers, capabilities,
//! seccomp profiles, a shared PID namespace, mount propagation; and the
//! host namespaces and propagation a VM cannot give, which husk refuses
//! with a message naming what was asked and why.
//!
//! Each function runs under one handler and returns what a user observes
//! from inside the container, so the tier can compare the two handlers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    security_profile::ProfileType, Capability, ContainerState, LinuxContainerSecurityContext,
    Mount, MountPropagation, NamespaceMode, PodSandboxConfig, SecurityProfile,
};

use super::{Tier, STATE_TIMEOUT};

/// The sysctls a pod asks for: a safe IPC one, a safe network one and an
/// unsafe (but namespaced) network one, each away from its default.
const POD_SYSCTLS: [(&str, &str); 3] = [
    ("kernel.shm_rmid_forced", "1"),
    ("net.ipv4.ip_unprivileged_port_start", "1000"),
    ("net.core.somaxconn", "1000"),
];

/// The container's security context, created if the config has none.
fn security_context(
    config: &mut k8s_cri::v1::ContainerConfig,
) -> &mut LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// Sets the pod's namespace mode for one kind (`pick` chooses the field).
fn pod_namespace(
    config: &mut PodSandboxConfig,
    pick: impl FnOnce(&mut k8s_cri::v1::NamespaceOption) -> &mut i32,
    mode: NamespaceMode,
) {
    let options = config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(super::kubelet_namespaces);
    *pick(options) = mode as i32;
}

/// The `Seccomp:` and capability lines of `/proc/self/status`.
fn status_lines(tier: &Tier, container: &str, fields: &[&str]) -> Result<String> {
    let status = tier.exec_out(container, &["cat", "/proc/self/status"])?;
    let mut found = Vec::new();
    for field in fields {
        let line = status
            .lines()
            .find(|line| line.starts_with(&format!("{field}:")))
            .with_context(|| format!("/proc/self/status has no {field} line"))?;
        found.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    Ok(found.join(", "))
}

/// Pod sysctls reach every container of the pod: two containers read them
/// back from `/proc/sys`.
pub fn pod_sysctls(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod_with(handler, "sysctl", |config| {
        let linux = config.linux.get_or_insert_with(Default::default);
        linux.sysctls = POD_SYSCTLS
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
    })?;
    let paths: Vec<String> = POD_SYSCTLS
        .iter()
        .map(|(name, _)| format!("/proc/sys/{}", name.replace('.', "/")))
        .collect();
    let mut command = vec!["cat"];
    command.extend(paths.iter().map(String::as_str));
    let want: Vec<&str> = POD_SYSCTLS.iter().map(|(_, value)| *value).collect();
    for name in ["first", "second"] {
        let container = tier.start_container(&pod, name, &["sleep", "1000"])?;
        tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
        let out = tier.exec_out(&container, &command)?;
        let seen: Vec<&str> = out.lines().map(str::trim).collect();
        ensure!(
            seen == want,
            "container {name} reads {seen:?} from {paths:?}, not the pod's {want:?}"
        );
        tier.client.stop_container(&container, 0)?;
        tier.client.remove_container(&container)?;
    }
    Ok(format!("{POD_SYSCTLS:?} in both containers"))
}

/// StopContainer's grace period: a container that exits on SIGTERM is
/// reported at once, one that ignores it is killed when the period ends,
/// and removing stopped containers does not wait.
pub fn stop_grace_period(tier: &Tier, handler: &str) -> Result<String> {
    /// The grace period given to the container that exits on SIGTERM: far
    /// longer than its exit takes, so returning early shows it was seen.
    const LONG_GRACE_S: i64 = 30;
    /// The grace period given to the container that ignores SIGTERM.
    const SHORT_GRACE_S: i64 = 3;
    let pod = tier.run_pod(handler, "grace")?;
    let obeys = tier.start_container(
        &pod,
        "obeys",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 0.2; done",
        ],
    )?;
    let ignores = tier.start_container(
        &pod,
        "ignores",
        &["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
    )?;
    for id in [&obeys, &ignores] {
        tier.wait_container_state(id, ContainerState::ContainerRunning)?;
    }
    // The shells set their traps first thing; give them a moment to run.
    std::thread::sleep(Duration::from_secs(1));

    let started = Instant::now();
    tier.client.stop_container(&obeys, LONG_GRACE_S)?;
    let obeys_took = started.elapsed();
    let obeys_exit = tier.wait_container_state(&obeys, ContainerState::ContainerExited)?;
    ensure!(
        obeys_exit == 0 && obeys_took < Duration::from_secs(LONG_GRACE_S as u64 / 2),
        "the container that exits on SIGTERM exited {obeys_exit} and StopContainer took \
         {obeys_took:?} of its {LONG_GRACE_S} s grace period"
    );

    let started = Instant::now();
    tier.client.stop_container(&ignores, SHORT_GRACE_S)?;
    let ignores_took = started.elapsed();
    let ignores_exit = tier.wait_container_state(&ignores, ContainerState::ContainerExited)?;
    ensure!(
        ignores_exit == 137
            && ignores_took >= Duration::from_millis(SHORT_GRACE_S as u64 * 1000 - 500)
            && ignores_took < Duration::from_secs(SHORT_GRACE_S as u64 * 5),
        "the container that ignores SIGTERM exited {ignores_exit} after {ignores_took:?} \
         (grace period {SHORT_GRACE_S} s): it must be SIGKILLed (137) when the period ends"
    );

    let started = Instant::now();
    for id in [&obeys, &ignores] {
        tier.client.remove_container(id)?;
    }
    let remove_took = started.elapsed();
    ensure!(
        remove_took < Duration::from_secs(10),
        "removing two stopped containers took {remove_took:?}"
    );
    Ok(format!(
        "SIGTERM handler exits 0 inside a {LONG_GRACE_S} s grace; SIGTERM ignorer killed \
         (137) when its {SHORT_GRACE_S} s grace ends; removals do not wait"
    ))
}

/// A privileged container of a privileged pod: every capability, no
/// seccomp filter, writable `/sys` and `/proc/sys`, the machine's device
/// nodes (inside a VM, the machine is the guest).
pub fn privileged_container(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod_with(handler, "privileged", |config| {
        config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    })?;
    let container = tier.start_container_with(&pod, "root", &["sleep", "1000"], |config| {
        security_context(config).privileged = true;
    })?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    let status = status_lines(tier, &container, &["CapEff", "CapBnd", "Seccomp"])?;
    let probe = tier.exec_out(
        &container,
        &[
            "sh",
            "-c",
            "grep ' /sys ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; \
             if [ -w /proc/sys/kernel/hostname ]; then echo proc-sys-rw; else echo proc-sys-ro; fi; \
             if [ -c /dev/kmsg ]; then echo kmsg; else echo no-kmsg; fi; \
             ls /dev | wc -l",
        ],
    )?;
    let lines: Vec<&str> = probe.lines().map(str::trim).collect();
    let [sys, proc_sys, kmsg, devices] = lines[..] else {
        bail!("the probe printed {probe:?}");
    };
    let devices: usize = devices.parse().context("counting /dev")?;
    ensure!(
        devices > 20,
        "a privileged container's /dev has {devices} entries: {probe:?}"
    );
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    Ok(format!(
        "{status}; /sys {sys}; {proc_sys}; {kmsg}; more than 20 device nodes"
    ))
}

/// `add_capabilities` and `drop_capabilities` change the container's sets.
pub fn capabilities(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "caps")?;
    let container = tier.start_container_with(&pod, "caps", &["sleep", "1000"], |config| {
        security_context(config).capabilities = Some(Capability {
            add_capabilities: vec!["NET_ADMIN".into(), "SYS_TIME".into()],
            drop_capabilities: vec!["CHOWN".into()],
            ..Default::default()
        });
    })?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    let status = status_lines(tier, &container, &["CapEff", "CapPrm", "CapBnd"])?;
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    Ok(status)
}

/// The seccomp mode and whether `sethostname` works in a container with
/// `profile` (and SYS_ADMIN added when `sys_admin`).
fn seccomp_probe(
    tier: &Tier,
    pod: &super::Pod,
    name: &str,
    profile: SecurityProfile,
    sys_admin: bool,
) -> Result<String> {
    let container = tier.start_container_with(pod, name, &["sleep", "1000"], |config| {
        let context = security_context(config);
        context.seccomp = Some(profile);
        if sys_admin {
            context.capabilities = Some(Capability {
                add_capabilities: vec!["SYS_ADMIN".into()],
                ..Default::default()
            });
        }
    })?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    let mode = status_lines(tier, &container, &["Seccomp"])?;
    let (code, _, err) = tier
        .client
        .exec_sync(&container, &["hostname", &format!("{name}-host")])?;
    let sethostname = if code == 0 {
        "sethostname allowed".to_owned()
    } else {
        format!("sethostname refused ({})", err.trim())
    };
    let (code, _, err) = tier
        .client
        .exec_sync(&container, &["mkdir", "/tmp/probe"])?;
    let mkdir = if code == 0 {
        "mkdir allowed".to_owned()
    } else {
        format!("mkdir refused ({})", err.trim())
    };
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    Ok(format!("{mode}, {sethostname}, {mkdir}"))
}

/// The runtime's default profile: the container starts filtered, and
/// `sethostname` is allowed only with SYS_ADMIN.
pub fn runtime_default_seccomp(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "seccomp")?;
    let profile = SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    };
    let plain = seccomp_probe(tier, &pod, "plain", profile.clone(), false)?;
    let admin = seccomp_probe(tier, &pod, "admin", profile, true)?;
    ensure!(
        plain.contains("Seccomp: 2") && plain.contains("sethostname refused"),
        "RuntimeDefault without SYS_ADMIN: {plain}"
    );
    ensure!(
        admin.contains("Seccomp: 2") && admin.contains("sethostname allowed"),
        "RuntimeDefault with SYS_ADMIN: {admin}"
    );
    Ok(format!("without SYS_ADMIN: {plain}; with it: {admin}"))
}

/// A `localhost/<path>` profile from the node: mkdir fails with the errno
/// the profile names, everything else works.
pub fn localhost_seccomp(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod(handler, "localprofile")?;
    let profile_path = tier.work.join("deny-mkdir.json");
    std::fs::write(
        &profile_path,
        r#"{"defaultAction":"SCMP_ACT_ALLOW",
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    )
    .with_context(|| format!("writing {}", profile_path.display()))?;
    let profile = SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: profile_path.to_string_lossy().into_owned(),
    };
    let seen = seccomp_probe(tier, &pod, "local", profile, false)?;
    ensure!(
        seen.contains("Seccomp: 2") && seen.contains("Permission denied"),
        "the localhost profile denying mkdir with EACCES: {seen}"
    );
    Ok(seen)
}

/// `namespace_options.pid = POD`: a container sees the processes of the
/// pod's other containers, PID 1 is the sandbox's pause process, and a
/// container's process that is not PID 1 dies of SIGTERM at StopContainer.
pub fn shared_pid_namespace(tier: &Tier, handler: &str) -> Result<String> {
    let pod = tier.run_pod_with(handler, "sharedpid", |config| {
        pod_namespace(config, |options| &mut options.pid, NamespaceMode::Pod);
    })?;
    let first = tier.start_container(&pod, "first", &["sleep", "1001"])?;
    let second = tier.start_container(&pod, "second", &["sleep", "1002"])?;
    for id in [&first, &second] {
        tier.wait_container_state(id, ContainerState::ContainerRunning)?;
    }
    let processes = tier.exec_out(&second, &["ps"])?;
    let pid1 = tier.exec_out(&second, &["cat", "/proc/1/cmdline"])?;
    let pid1 = pid1.replace('\0', " ").trim().to_owned();
    ensure!(
        processes.contains("sleep 1001") && processes.contains("sleep 1002"),
        "the second container's ps does not show both containers' processes:\n{processes}"
    );
    tier.client.stop_container(&first, 10)?;
    let exit = tier.wait_container_state(&first, ContainerState::ContainerExited)?;
    for id in [&first, &second] {
        tier.client.stop_container(id, 0)?;
        tier.client.remove_container(id)?;
    }
    Ok(format!(
        "the second container sees `sleep 1001` of the first; PID 1 runs `{pid1}`; \
         the first exits {exit} at StopContainer"
    ))
}

/// A host directory made a shared mount for a propagation scenario,
/// unmounted (with anything mounted below it) however the scenario ends.
struct SharedVolume {
    dir: PathBuf,
}

impl SharedVolume {
    fn new(tier: &Tier, name: &str) -> Result<Self> {
        let dir = tier.work.join(name);
        std::fs::create_dir_all(dir.join("sub"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let volume = Self { dir };
        mount_cmd(&["--bind", &volume.path(), &volume.path()])?;
        mount_cmd(&["--make-rshared", &volume.path()])?;
        Ok(volume)
    }

    fn path(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    /// Whether something is mounted at `relative` below the volume, as the
    /// host's mount table says.
    fn has_mount_at(&self, relative: &str) -> Result<bool> {
        let table = std::fs::read_to_string("/proc/self/mountinfo")?;
        let want = self.dir.join(relative);
        Ok(table
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .any(|point| Path::new(point) == want))
    }
}

impl Drop for SharedVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.dir).status();
    }
}

fn mount_cmd(args: &[&str]) -> Result<()> {
    let status = Command::new("mount")
        .args(args)
        .status()
        .context("running mount")?;
    ensure!(status.success(), "mount {args:?} failed: {status}");
    Ok(())
}

/// A volume mounted with `HostToContainer` (rslave) propagation: a mount
/// the host makes below it after the container started shows inside.
pub fn propagation_host_to_container(tier: &Tier, handler: &str) -> Result<String> {
    let volume = SharedVolume::new(tier, &format!("h2c-{handler}"))?;
    let pod = tier.run_pod(handler, "h2c")?;
    let container = tier.start_container_with(&pod, "reader", &["sleep", "1000"], |config| {
        config.mounts.push(Mount {
            container_path: "/vol".into(),
            host_path: volume.path(),
            propagation: MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        });
    })?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    mount_cmd(&["-t", "tmpfs", "tmpfs", &format!("{}/sub", volume.path())])?;
    std::fs::write(volume.dir.join("sub/file"), "from the host\n")?;
    let started = Instant::now();
    let seen = loop {
        let (code, out, err) = tier
            .client
            .exec_sync(&container, &["cat", "/vol/sub/file"])?;
        if code == 0 {
            break out;
        }
        ensure!(
            started.elapsed() < STATE_TIMEOUT,
            "the host's mount below the volume never showed in the container: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    Ok(format!(
        "a mount the host made later reads {:?}",
        seen.trim()
    ))
}

/// A volume mounted with `Bidirectional` (rshared) propagation: under runc
/// a mount the privileged container makes below it appears on the host.
/// A mount made in a guest cannot be a mount on the host, so husk refuses
/// the container, naming the mount and why.
pub fn propagation_bidirectional(tier: &Tier, handler: &str) -> Result<String> {
    let volume = SharedVolume::new(tier, &format!("bidi-{handler}"))?;
    let pod = tier.run_pod_with(handler, "bidi", |config| {
        config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .privileged = true;
    })?;
    let created = tier.start_container_with(&pod, "mounter", &["sleep", "1000"], |config| {
        security_context(config).privileged = true;
        config.mounts.push(Mount {
            container_path: "/vol".into(),
            host_path: volume.path(),
            propagation: MountPropagation::PropagationBidirectional as i32,
            ..Default::default()
        });
    });
    if handler == "kata" {
        let error = match created {
            Ok(id) => {
                let _ = tier.client.stop_container(&id, 0);
                let _ = tier.client.remove_container(&id);
                bail!("husk started a container with a Bidirectional volume");
            }
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            error.contains("/vol") && error.contains("Bidirectional"),
            "the refusal does not name the mount and its propagation: {error}"
        );
        return Ok(format!("refused: {}", refusal_reason(&error)));
    }
    let container = created?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    tier.exec_out(&container, &["mount", "-t", "tmpfs", "tmpfs", "/vol/sub"])?;
    let propagated = volume.has_mount_at("sub")?;
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    ensure!(propagated, "the container's mount did not reach the host");
    Ok("the container's mount appears on the host".to_owned())
}

/// The runtime's own words in a CRI error (after containerd's prefixes).
fn refusal_reason(error: &str) -> String {
    error
        .rsplit_once("failed to create shim task: ")
        .map_or(error, |(_, reason)| reason)
        .chars()
        .take(160)
        .collect()
}

/// A pod asking for one of the host's namespaces: runc gives it; husk
/// refuses at RunPodSandbox naming the option, and leaves nothing behind.
fn host_namespace(
    tier: &Tier,
    handler: &str,
    what: &str,
    option: &str,
    pick: fn(&mut k8s_cri::v1::NamespaceOption) -> &mut i32,
) -> Result<String> {
    let result = tier.run_pod_with(handler, what, |config| {
        pod_namespace(config, pick, NamespaceMode::Node);
        if option == "host network" {
            // kubelet gives a pod on the host's network the node's
            // hostname, which means no hostname of its own.
            config.hostname.clear();
        }
    });
    if handler == "kata" {
        let error = match result {
            Ok(pod) => bail!("husk ran pod {} with the host's {option}", pod.id),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            error.contains(option),
            "the refusal does not name {option}: {error}"
        );
        return Ok(format!("refused: {}", refusal_reason(&error)));
    }
    let pod = result?;
    let container = tier.start_container(&pod, "probe", &["sleep", "1000"])?;
    tier.wait_container_state(&container, ContainerState::ContainerRunning)?;
    tier.client.stop_container(&container, 0)?;
    tier.client.remove_container(&container)?;
    Ok(format!("a pod with the host's {option} runs"))
}

pub fn host_network(tier: &Tier, handler: &str) -> Result<String> {
    host_namespace(tier, handler, "hostnet", "host network", |o| &mut o.network)
}

pub fn host_pid(tier: &Tier, handler: &str) -> Result<String> {
    host_namespace(tier, handler, "hostpid", "host PID", |o| &mut o.pid)
}

pub fn host_ipc(tier: &Tier, handler: &str) -> Result<String> {
    host_namespace(tier, handler, "hostipc", "host IPC", |o| &mut o.ipc)
}
