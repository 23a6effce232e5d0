//! The hostile-guest tier: ONE guest boots through the shim's own sandbox
//! code (the `qemu` backend, the product kernel and agent, our virtio-fs
//! and vsock device models over vhost-user), and a container with every
//! capability, no seccomp filter and access to every device plays a guest
//! that has been taken over: it mounts the whole share itself over the real
//! virtio-fs device and attacks the host through it: links and directories
//! planted where the host walks, writes to `ro` volumes and files, setuid
//! programs, file capabilities, `trusted.*` and SELinux xattrs, ACLs, and a
//! flood of console output.
//!
//! Then, from the host, each check asserts that nothing outside the pod
//! changed: a sentinel outside the share keeps its content and mode; no
//! host file appeared outside the pod's directories; `ro` volumes and files
//! are unchanged; no setuid file and no privileged xattr appeared on the
//! host; the share's own tree stayed within its cap; the console stayed
//! within its cap; and the host can still add a container safely after the
//! attack. Each check reports `test <name> ... ok|FAILED`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_shim::resources::Access;
use husk_test_support::artifacts;
use husk_test_support::bundle::container_spec;
use husk_test_support::form::announce_form;
use husk_test_support::stdio::{read_text, Pipes};
use husk_test_support::tempdir::TestDir;
use husk_tests::guest::{GuestSandbox, DEFAULT_SIZE};
use serde_json::{json, Value};

/// How long the attack may take under TCG.
const ATTACK_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes the attacker writes to the serial console.
const CONSOLE_FLOOD_BYTES: u64 = 2 << 20;
/// `console.max_bytes` for this guest: the pod keeps at most twice this.
const CONSOLE_CAP: u64 = 64 << 10;
/// Mount index of each bind the attacker's container gets.
const RO_VOLUME_INDEX: usize = 1;
const RW_VOLUME_INDEX: usize = 2;
const RO_FILE_INDEX: usize = 3;
/// The attacker's container id.
const ATTACKER: &str = "attacker";

/// Every capability a 6.12 kernel knows.
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A `security.capability` value (VFS_CAP_REVISION_2, effective) granting
/// CAP_SETUID: what an attacker would plant on a host program.
const CAP_SETUID_XATTR_HEX: &str = "hex:0100000280000000000000000000000000000000";
/// A `system.posix_acl_access` value (version 2; user::rwx group::rwx other::rwx).
const ACL_RWX_HEX: &str = "hex:020000000100070000000000040007000000000020000700ffffffff";

/// Attacks that must all be refused (the guest sees an error or no effect).
const MUST_BE_REFUSED: &[&str] = &[
    "symlink_at_share_root",
    "mkdir_at_share_root",
    "file_at_share_root",
    "rename_container_dir",
    "swap_files_dir_for_a_symlink",
    "mkdir_in_container_dir",
    "write_ro_volume",
    "create_in_ro_volume",
    "write_ro_file",
    "setuid_in_rootfs",
    "setuid_in_rw_volume",
    "setgid_in_rw_volume",
];

/// Attacks the guest may see succeed (its privileged xattrs are kept for
/// it, mapped under `user.husk.guest.` on the host) but that must leave no
/// privileged xattr on a host file: the xattr check asserts that.
const CONTAINED_IN_THE_GUEST: &[&str] = &[
    "file_capability_on_rootfs",
    "trusted_xattr_on_rootfs",
    "selinux_label_on_rw_volume",
    "acl_on_rw_volume",
];

/// The host side prepared outside the pod: a sentinel, the volumes and
/// the file the attacker's container binds.
struct Outside {
    dir: TestDir,
}

impl Outside {
    fn new() -> Result<Self> {
        let dir = TestDir::new("hostile-outside")?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("sentinel"))?;
        std::fs::write(root.join("sentinel/secret"), b"host secret\n")?;
        std::fs::set_permissions(
            root.join("sentinel/secret"),
            std::fs::Permissions::from_mode(0o640),
        )?;
        std::fs::create_dir_all(root.join("ro-volume"))?;
        std::fs::write(root.join("ro-volume/key"), b"kubernetes secret\n")?;
        std::fs::create_dir_all(root.join("rw-volume"))?;
        std::fs::write(root.join("hosts"), b"127.0.0.1 localhost\n")?;
        Ok(Self { dir })
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Every entry below the outside directory with its mode, size and
    /// content digest; the rw volume's contents are the guest's to change,
    /// so only the directory itself is listed.
    fn snapshot(&self) -> Result<BTreeMap<PathBuf, String>> {
        let mut entries = BTreeMap::new();
        snapshot_into(
            self.dir.path(),
            self.dir.path(),
            &self.path("rw-volume"),
            &mut entries,
        )?;
        Ok(entries)
    }
}

fn snapshot_into(
    root: &Path,
    dir: &Path,
    skip_below: &Path,
    entries: &mut BTreeMap<PathBuf, String>,
) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let content = if meta.is_file() {
            format!("{:?}", std::fs::read(&path)?)
        } else if meta.file_type().is_symlink() {
            format!("-> {}", std::fs::read_link(&path)?.display())
        } else {
            String::new()
        };
        entries.insert(
            path.strip_prefix(root)?.to_owned(),
            format!("mode {:o} uid {} {content}", meta.mode(), meta.uid()),
        );
        if meta.is_dir() && path != skip_below {
            snapshot_into(root, &path, skip_below, entries)?;
        }
    }
    Ok(())
}

/// The attack, as a busybox shell script run by the attacker's init.
fn attack_script() -> String {
    format!(
        r#"
S=/mnt/share
C=$S/{ATTACKER}
try() {{ n=$1; shift; if "$@" >/dev/null 2>&1; then echo "ATTACK $n done"; else echo "ATTACK $n refused"; fi; }}
mkdir -p $S
try mount_share mount -t virtiofs kataShared $S
try symlink_at_share_root ln -s / $S/next
try mkdir_at_share_root mkdir $S/evil
try file_at_share_root sh -c "echo x > $S/planted"
try rename_container_dir mv $C $S/moved
try swap_files_dir_for_a_symlink sh -c "mv $C/files $C/old && ln -s / $C/files"
try mkdir_in_container_dir mkdir $C/extra
try write_ro_volume sh -c "echo owned > $C/volumes/{RO_VOLUME_INDEX}/key"
try create_in_ro_volume touch $C/volumes/{RO_VOLUME_INDEX}/planted
try write_ro_file sh -c 'for f in '$C'/files/*; do echo owned > "$f" || exit 1; done'
try setuid_in_rootfs sh -c "cp /bin/busybox /suid && chmod 4755 /suid && test -u /suid"
try setuid_in_rw_volume sh -c "cp /bin/busybox /v/suid && chmod 4755 /v/suid && test -u /v/suid"
try setgid_in_rw_volume sh -c "cp /bin/busybox /v/sgid && chmod 2755 /v/sgid && test -g /v/sgid"
try file_capability_on_rootfs /probe setxattr /bin/busybox security.capability {CAP_SETUID_XATTR_HEX}
try trusted_xattr_on_rootfs /probe setxattr /bin/busybox trusted.overlay.opaque y
try selinux_label_on_rw_volume /probe setxattr /v security.selinux system_u:object_r:shadow_t:s0
try acl_on_rw_volume /probe setxattr /v system.posix_acl_access {ACL_RWX_HEX}
try user_xattr_on_rootfs /probe setxattr /bin/busybox user.note guest
try console_flood sh -c "mknod /dev/hostile-serial c 4 64 && head -c {CONSOLE_FLOOD_BYTES} /dev/zero | tr '\000' A > /dev/hostile-serial"
echo "ATTACK end"
"#
    )
}

/// A container that holds every privilege a guest root has.
fn attacker_spec() -> Value {
    let mut spec = container_spec(&["/bin/sh", "-c", &attack_script()], false);
    let caps = json!(ALL_CAPABILITIES);
    spec["process"]["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps, "ambient": caps
    });
    spec["process"]["noNewPrivileges"] = json!(false);
    spec["linux"]["resources"] = json!({"devices": [{"allow": true, "access": "rwm"}]});
    let mounts = spec["mounts"].as_array_mut().expect("the spec's mounts");
    // The rw volume at /v; the others only through the attacker's own
    // mount of the share.
    mounts.push(json!({
        "destination": "/v", "type": "bind",
        "source": format!("{ATTACKER}/volumes/{RW_VOLUME_INDEX}"), "options": ["rbind", "rw"]
    }));
    spec
}

fn attack_results(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("ATTACK "))
        .map(|rest| rest.split_once(' ').unwrap_or((rest, "")))
        .map(|(name, result)| (name.trim().to_owned(), result.trim().to_owned()))
        .collect()
}

/// Extended attribute names of `path` on the host (not following links).
fn host_xattr_names(path: &Path) -> Result<Vec<String>> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: the path is NUL-terminated and the buffer valid for its length.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    ensure!(
        len >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buf.truncate(len as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

/// Every path below `dir` (links not followed).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    out.push(dir.to_owned());
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = entry?.path();
        if std::fs::symlink_metadata(&path)?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The outcome of the run, for the host-side checks.
struct Run {
    attacks: BTreeMap<String, String>,
    before: BTreeMap<PathBuf, String>,
    after: BTreeMap<PathBuf, String>,
    /// Setuid/setgid files and privileged xattrs found on the host in the
    /// attacker's rootfs source and rw volume (before their removal).
    privileged_files: Vec<String>,
    privileged_xattrs: Vec<String>,
    /// xattr names on the host copy of the attacker's busybox: the mapped
    /// copies prove the attacks reached the host's file server.
    busybox_xattrs: Vec<String>,
    console_bytes: u64,
    share_tree_used: u64,
    share_tree_cap: u64,
    victim_ok: Result<()>,
}

fn main() -> ExitCode {
    let runtime = match husk_tests::guest::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot build the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let started = Instant::now();
    let run = match attack().await {
        Ok(run) => run,
        Err(error) => {
            println!("test hostile_guest_attack ... FAILED");
            eprintln!("{error:#}");
            announce_form("hostile-guest tier via qemu: FAILED before the host-side checks");
            return ExitCode::FAILURE;
        }
    };
    type HostCheck = fn(&Run) -> Result<()>;
    let checks: [(&str, HostCheck); 8] = [
        ("every_attack_ran_and_the_share_was_mounted", |run| {
            ensure!(
                run.attacks.get("mount_share").map(String::as_str) == Some("done"),
                "the attacker could not mount the share, so nothing was attacked: {:?}",
                run.attacks
            );
            ensure!(
                run.attacks.contains_key("end"),
                "the script did not finish: {:?}",
                run.attacks
            );
            let missing: Vec<_> = MUST_BE_REFUSED
                .iter()
                .chain(CONTAINED_IN_THE_GUEST)
                .filter(|name| !run.attacks.contains_key(**name))
                .collect();
            ensure!(missing.is_empty(), "attacks that did not run: {missing:?}");
            ensure!(
                run.attacks.get("user_xattr_on_rootfs").map(String::as_str) == Some("done"),
                "a user.* xattr, which the host allows, was refused: the setup is broken"
            );
            Ok(())
        }),
        ("every_attack_on_the_host_was_refused_in_the_guest", |run| {
            let done: Vec<_> = MUST_BE_REFUSED
                .iter()
                .filter(|name| run.attacks.get(**name).map(String::as_str) != Some("refused"))
                .map(|name| format!("{name}: {:?}", run.attacks.get(*name)))
                .collect();
            ensure!(done.is_empty(), "attacks that were not refused: {done:?}");
            Ok(())
        }),
        ("nothing_outside_the_pod_changed", |run| {
            ensure!(
                run.before == run.after,
                "outside the pod, before vs after: removed or changed {:?}, new {:?}",
                run.before
                    .iter()
                    .filter(|(k, v)| run.after.get(*k) != Some(v))
                    .collect::<Vec<_>>(),
                run.after
                    .keys()
                    .filter(|k| !run.before.contains_key(*k))
                    .collect::<Vec<_>>()
            );
            Ok(())
        }),
        ("no_setuid_or_setgid_file_appeared_on_the_host", |run| {
            ensure!(
                run.privileged_files.is_empty(),
                "setuid/setgid files on the host: {:?}",
                run.privileged_files
            );
            Ok(())
        }),
        ("no_privileged_xattr_appeared_on_the_host", |run| {
            ensure!(
                run.privileged_xattrs.is_empty(),
                "privileged xattrs on host files: {:?}",
                run.privileged_xattrs
            );
            for mapped in [
                "user.husk.guest.security.capability",
                "user.husk.guest.trusted.overlay.opaque",
            ] {
                ensure!(
                    run.busybox_xattrs.iter().any(|n| n == mapped),
                    "the guest's write never reached the host as {mapped}: {:?}",
                    run.busybox_xattrs
                );
            }
            Ok(())
        }),
        ("the_shares_own_tree_stayed_within_its_cap", |run| {
            ensure!(
                run.share_tree_used <= run.share_tree_cap,
                "the share's tree uses {} bytes, over its cap of {}",
                run.share_tree_used,
                run.share_tree_cap
            );
            Ok(())
        }),
        ("the_console_was_recorded_and_bounded", |run| {
            println!(
                "console on the host after a {CONSOLE_FLOOD_BYTES}-byte flood: {} bytes",
                run.console_bytes
            );
            ensure!(run.console_bytes > 0, "no console was recorded");
            ensure!(
                run.console_bytes <= 2 * CONSOLE_CAP,
                "the console kept {} of the {CONSOLE_FLOOD_BYTES} bytes flooded, over twice its cap of {CONSOLE_CAP}",
                run.console_bytes
            );
            Ok(())
        }),
        (
            "the_host_adds_a_container_safely_after_the_attack",
            |run| match &run.victim_ok {
                Ok(()) => Ok(()),
                Err(error) => Err(anyhow::anyhow!("{error:#}")),
            },
        ),
    ];
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, check) in checks {
        match check(&run) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(error) => {
                println!("test {name} ... FAILED");
                eprintln!("---- {name} ----\n{error:#}");
                failed.push(name);
            }
        }
    }
    println!("attack results in the guest: {:?}", run.attacks);
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

/// Boots the guest, runs the attacker to its end, collects what the host
/// checks need, and shuts the guest down (checking the teardown too).
async fn attack() -> Result<Run> {
    let outside = Outside::new()?;
    let sandbox = GuestSandbox::boot_with(DEFAULT_SIZE, |config| {
        config.console.max_bytes = CONSOLE_CAP;
    })
    .await
    .context("the guest did not boot")?;
    announce_form(format_args!(
        "hostile-guest tier via {} ({}): a privileged container mounts the share and attacks",
        sandbox.vm().backend,
        sandbox.vm().accelerator
    ));
    let before = outside.snapshot()?;
    let rootfs_path = sandbox.add_rootfs(ATTACKER)?;
    let rootfs_source = sandbox.rootfs_source_of(ATTACKER);
    let probe = artifacts::guest_binaries()?.probe;
    std::fs::copy(&probe, rootfs_source.join("probe")).context("copy the probe")?;
    let share = sandbox.share();
    share.add_bind(
        ATTACKER,
        RO_VOLUME_INDEX,
        &outside.path("ro-volume"),
        Access::ReadOnly,
    )?;
    share.add_bind(
        ATTACKER,
        RW_VOLUME_INDEX,
        &outside.path("rw-volume"),
        Access::ReadWrite,
    )?;
    share.add_bind(
        ATTACKER,
        RO_FILE_INDEX,
        &outside.path("hosts"),
        Access::ReadOnly,
    )?;

    let mut io = sandbox
        .create_container_in(ATTACKER, &rootfs_path, &attacker_spec(), Pipes::OUT_ERR)
        .await?;
    sandbox.client().start_container(ATTACKER).await?;
    let stdout = read_text(&mut io.take_stdout()?, ATTACK_TIMEOUT).await?;
    let stderr = read_text(&mut io.take_stderr()?, Duration::from_secs(10))
        .await
        .unwrap_or_default();
    let exit = sandbox.wait(ATTACKER, "").await?;
    println!(
        "attacker exited with {}; stderr: {}",
        exit.status,
        stderr.trim()
    );
    let attacks = attack_results(&stdout);

    let console_bytes = std::fs::read_dir(sandbox.work_dir())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("console.log"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let host_side = sandbox.work_dir().join(husk_shim::resources::HOST_SIDE_DIR);
    let (share_tree_used, share_tree_cap) = used_and_size(&host_side)?;

    let (privileged_files, privileged_xattrs) =
        privileged_on_host(&[rootfs_source.clone(), outside.path("rw-volume")])?;
    let busybox_xattrs = host_xattr_names(&rootfs_source.join("bin/busybox"))?;
    let victim_ok = add_victim(&sandbox, &outside).await;
    sandbox.remove_container(ATTACKER).await?;
    let after = outside.snapshot()?;
    sandbox.shut_down().await.context("the guest's teardown")?;
    Ok(Run {
        attacks,
        before,
        after,
        privileged_files,
        privileged_xattrs,
        busybox_xattrs,
        console_bytes,
        share_tree_used,
        share_tree_cap,
        victim_ok,
    })
}

/// Bytes used and total size of the file system at `path`.
fn used_and_size(path: &Path) -> Result<(u64, u64)> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `stat` is writable.
    let ret = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    ensure!(
        ret == 0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let fragment = stat.f_frsize as u64;
    Ok((
        (stat.f_blocks as u64 - stat.f_bfree as u64) * fragment,
        stat.f_blocks as u64 * fragment,
    ))
}

/// Setuid/setgid non-directories, and `security.*`, `trusted.*` and ACL
/// xattrs, on the host below `roots`.
fn privileged_on_host(roots: &[PathBuf]) -> Result<(Vec<String>, Vec<String>)> {
    let mut paths = Vec::new();
    for root in roots {
        walk(root, &mut paths)?;
    }
    let mut files = Vec::new();
    let mut xattrs = Vec::new();
    for path in &paths {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_dir() && meta.mode() & 0o6000 != 0 {
            files.push(format!("{} (mode {:o})", path.display(), meta.mode()));
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        for name in host_xattr_names(path)? {
            if ["security.", "trusted.", "system.posix_acl"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
            {
                xattrs.push(format!("{}: {name}", path.display()));
            }
        }
    }
    Ok((files, xattrs))
}

/// After the attack the host adds a container with a file bind, which
/// must land in the share and nowhere else.
async fn add_victim(sandbox: &GuestSandbox, outside: &Outside) -> Result<()> {
    sandbox.add_rootfs("victim")?;
    let relative =
        sandbox
            .share()
            .add_bind("victim", 1, &outside.path("hosts"), Access::ReadOnly)?;
    let in_view = sandbox.share().root().join(&relative);
    ensure!(
        std::fs::read(&in_view)? == b"127.0.0.1 localhost\n",
        "the victim's file is not in the share at {}",
        in_view.display()
    );
    sandbox.share().remove_container("victim")?;
    Ok(())
}
