//! Guest tier, with devices: ONE guest (a TCG boot costs seconds) gets our
//! virtio-fs and vsock device models over vhost-user, served from threads of
//! this test process, and runs every check of `tests/guest/devices-checks.sh`
//! against real Linux drivers. The host side prepares the share, drives its
//! end of the vsock connections when the guest's console says it is ready,
//! and afterwards checks on the host what the guest did.
//!
//! virtio-fs: mount, a 256 MiB file each way with matching SHA-256, mkdir,
//! rename, hard links, symlinks, chmod, xattrs both ways, host files added
//! while the guest runs, and escape attempts that must not leave the share.
//! vsock: a host-initiated and a guest-initiated connection each moving
//! 64 MiB both ways with matching SHA-256, and 100 connections open at once
//! in each direction.

mod guest_harness;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use guest_harness::hybrid_vsock::{self, accept, duplex, echo, echo_round_trip};
use guest_harness::{
    announce_qemu_form, pairs, prepare_test_guest, test_vm_config, Console, ConsoleWatch,
    TestGuest, GUEST_DEADLINE,
};
use husk_devices::fs::{self as virtio_fs, FsConfig};
use husk_devices::vsock::{self as virtio_vsock, VsockConfig};
use husk_guest_probe::digest::{copy_summarized, summarize, Summary};
use husk_guest_probe::pattern::Pattern;
use husk_shim::hypervisor::qemu::{GuestEnd, QemuVm};
use husk_shim::hypervisor::{GUEST_CID, SHARED_FS_TAG};
use husk_test_support::host::process_exists;

const MIB: u64 = 1 << 20;

/// Sizes and pattern seeds; the guest script uses the same numbers.
const FS_BIG_BYTES: u64 = 256 * MIB;
const HOST_BIG_SEED: u64 = 11;
const GUEST_BIG_SEED: u64 = 12;
const VSOCK_BYTES: u64 = 64 * MIB;
const HOST_TO_GUEST_SEED: u64 = 21;
const GUEST_TO_HOST_SEED: u64 = 24;
const MANY_CONNECTIONS: usize = 100;
const MANY_BYTES: u64 = 64 * 1024;

/// The guest's vsock ports (see devices-checks.sh).
const PORT_HOST_INITIATED: u32 = 5000;
const PORT_GUEST_INITIATED: u32 = 5001;
const PORT_GUEST_MANY: u32 = 5002;
const PORT_HOST_MANY: u32 = 5003;

/// What the host side measured while the guest ran.
#[derive(Debug)]
struct HostSide {
    /// (sent, received) on the host-initiated connection.
    host_initiated: (Summary, Summary),
    /// Host-initiated connections open at once that echoed correctly.
    host_many_echoed: usize,
}

#[test]
fn one_guest_uses_virtio_fs_and_vsock_served_over_vhost_user() {
    let TestGuest {
        dir,
        kernel,
        initrd,
    } = prepare_test_guest("guest-devices", "devices-checks.sh");

    let share = dir.join("share");
    let host_big = prepare_share(dir.path(), &share);

    let vsock_vhost = dir.join("vsock-vhost.sock");
    let vsock_uds = dir.join("vsock.sock");
    let fs_vhost = dir.join("fs-vhost.sock");
    let vsock_server = virtio_vsock::serve_vhost_user(
        &vsock_vhost,
        VsockConfig::new(GUEST_CID, vsock_uds.clone()),
    )
    .expect("the vsock device serves vhost-user");
    let mut fs_config = FsConfig::new(&share);
    fs_config.tag = SHARED_FS_TAG.to_owned();
    let fs_server =
        virtio_fs::serve_vhost_user(&fs_vhost, fs_config).expect("virtio-fs serves vhost-user");

    let console = ConsoleWatch::new(&dir.join("console.log"));
    // Guest-initiated connections need their host listeners before boot.
    let guest_initiated = serve_guest_initiated(&vsock_uds, &console);
    let guest_many = serve_guest_many(&vsock_uds, &console);

    let config = test_vm_config(&dir, &kernel, &initrd)
        .with_vcpus(2)
        .with_memory_mib(512)
        .with_vsock(&vsock_vhost)
        .with_fs(&fs_vhost, SHARED_FS_TAG);
    let work_dir = config.work_dir.clone();
    let started = Instant::now();
    let vm = QemuVm::start(config).expect("QEMU starts with both vhost-user devices");
    announce_qemu_form(
        "guest devices (virtio-fs + vsock over vhost-user)",
        vm.accel(),
    );
    let pid = vm.pid();
    let host_steps = run_host_steps(&console, &vsock_uds, &share);
    let end = vm.wait_or_stop(GUEST_DEADLINE);
    console.guest_has_ended();
    println!(
        "guest with devices, all checks, power-off: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let host_side = join("host-side steps", host_steps);
    let guest_initiated = join("guest-initiated 64 MiB server", guest_initiated);
    let guest_many = join("guest-initiated 100-connection server", guest_many);
    vsock_server.stop();
    let fs_result = fs_server.stop();
    let text = Console::read(&console.path);

    // The guest ran every check and powered off by itself.
    assert_eq!(end, GuestEnd::PoweredOff, "console:\n{}", text.text);
    text.assert_checks_passed(&[
        "fs_mount",
        "fs_reads_host_file",
        "fs_writes_big_file",
        "fs_mkdir",
        "fs_rename",
        "fs_hard_link",
        "fs_symlink",
        "fs_chmod",
        "fs_xattr_set",
        "fs_xattr_get",
        "fs_xattr_list",
        "fs_xattr_from_host",
        "fs_xattr_remove",
        "fs_unlink",
        "fs_escape_dotdot_stays_in_guest",
        "fs_escape_host_symlinks_do_not_reach_host",
        "fs_escape_guest_symlink_write_stays_in_guest",
        "fs_host_added_file_appears",
        "vsock_host_initiated_64mib",
        "vsock_guest_initiated_64mib",
        "vsock_100_guest_initiated",
        "vsock_100_host_initiated",
        "fs_unmount",
    ]);
    assert_eq!(text.exec_exit_code(), Some(0), "console:\n{}", text.text);
    let host_side = host_side.unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", text.text));

    // virtio-fs: 256 MiB each way with the same checksum on both sides.
    assert_eq!(
        text.value("fs_host_big"),
        format!("{} {}", host_big.bytes, host_big.sha256),
        "the guest read the host's 256 MiB file intact"
    );
    let guest_big_expected = summarize(Pattern::new(GUEST_BIG_SEED, FS_BIG_BYTES)).unwrap();
    let guest_big_on_host =
        summarize(std::fs::File::open(share.join("guest_big")).unwrap()).unwrap();
    assert_eq!(
        guest_big_on_host, guest_big_expected,
        "the guest's 256 MiB file reached the host intact"
    );
    assert_eq!(
        text.value("fs_guest_big"),
        format!("{} {}", guest_big_on_host.bytes, guest_big_on_host.sha256)
    );

    // What the guest did to the share is what the host sees.
    assert_eq!(read(&share.join("dir/sub/after")), "moved\n");
    assert!(
        !share.join("dir/before").exists(),
        "the rename removed the old name"
    );
    let (orig, hard) = (meta(&share.join("dir/orig")), meta(&share.join("dir/hard")));
    assert_eq!(
        (orig.ino(), orig.nlink()),
        (hard.ino(), 2),
        "a hard link shares the inode"
    );
    assert_eq!(
        std::fs::read_link(share.join("dir/soft")).unwrap(),
        Path::new("orig")
    );
    assert_eq!(
        orig.permissions().mode() & 0o777,
        0o640,
        "chmod reached the host"
    );
    assert_eq!(
        get_xattr(&share.join("dir/orig"), "user.husk").as_deref(),
        Some("from-guest")
    );
    assert_eq!(get_xattr(&share.join("dir/orig"), "user.temporary"), None);
    assert!(!share.join("dir/doomed").exists());

    // Escape attempts left nothing outside the share.
    for outside in ["escaped-dotdot", "escaped-by-link"] {
        assert!(
            !dir.join(outside).exists(),
            "{outside} appeared outside the share"
        );
    }
    assert_eq!(
        std::fs::read_link(share.join("dir/out")).unwrap(),
        Path::new("../../escaped-by-link"),
        "the guest's symlink is stored as a symlink, not followed on the host"
    );

    // vsock: 64 MiB each way on a host- and a guest-initiated connection.
    let (host_sent, host_received) = &host_side.host_initiated;
    let guest_view = pairs(&text.value("vsock_host_initiated"));
    assert_eq!(host_sent.bytes, VSOCK_BYTES);
    assert_eq!(guest_view["received_bytes"], host_sent.bytes.to_string());
    assert_eq!(
        guest_view["received_sha256"], host_sent.sha256,
        "host→guest data intact"
    );
    assert_eq!(host_received.bytes, VSOCK_BYTES);
    assert_eq!(
        guest_view["sent_sha256"], host_received.sha256,
        "guest→host data intact"
    );

    let (host_sent, host_received) = guest_initiated.expect("guest-initiated connection served");
    let guest_view = pairs(&text.value("vsock_guest_initiated"));
    assert_eq!(
        (host_sent.bytes, host_received.bytes),
        (VSOCK_BYTES, VSOCK_BYTES)
    );
    assert_eq!(
        guest_view["received_sha256"], host_sent.sha256,
        "host→guest data intact"
    );
    assert_eq!(
        guest_view["sent_sha256"], host_received.sha256,
        "guest→host data intact"
    );

    // 100 connections at once, each way.
    let (echoed, peak) = guest_many.expect("guest-initiated connections served");
    assert_eq!(
        echoed, MANY_CONNECTIONS,
        "the host echoed every guest connection"
    );
    assert_eq!(
        peak, MANY_CONNECTIONS,
        "all guest connections were open at once on the host"
    );
    assert_eq!(host_side.host_many_echoed, MANY_CONNECTIONS);

    // Nothing is left: QEMU, its run directory, the device sockets.
    assert!(
        fs_result.is_ok(),
        "the virtio-fs session ended cleanly: {fs_result:?}"
    );
    assert!(!process_exists(pid), "QEMU (pid {pid}) is gone and reaped");
    let leftovers: Vec<_> = std::fs::read_dir(&work_dir).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "the work directory is empty: {leftovers:?}"
    );
    for socket in [&vsock_vhost, &vsock_uds, &fs_vhost] {
        assert!(!socket.exists(), "{} is removed", socket.display());
    }
}

/// Fills the share: a small file with a host xattr, the 256 MiB host file
/// (returns its summary), symlinks that point outside the share, and the
/// secret next to the share that no guest may read.
fn prepare_share(dir: &Path, share: &Path) -> Summary {
    std::fs::create_dir_all(share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    set_xattr(&share.join("hello.txt"), "user.fromhost", "set-by-host");
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "host-secret\n").unwrap();
    std::os::unix::fs::symlink(&secret, share.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", share.join("rel-link")).unwrap();
    let mut file = std::fs::File::create(share.join("host_big")).unwrap();
    copy_summarized(&mut Pattern::new(HOST_BIG_SEED, FS_BIG_BYTES), &mut file).unwrap()
}

/// The host's part of the guest script's sequence, in the script's order.
fn run_host_steps(
    console: &ConsoleWatch,
    vsock_uds: &Path,
    share: &Path,
) -> JoinHandle<Result<HostSide, String>> {
    let (console, vsock_uds, share) = (
        console.clone(),
        vsock_uds.to_path_buf(),
        share.to_path_buf(),
    );
    thread::spawn(move || {
        let step = |what: &str, e: std::io::Error| format!("{what}: {e}");
        console.wait_for("HUSK_WAIT host-adds-file", GUEST_DEADLINE)?;
        std::fs::create_dir_all(share.join("late")).map_err(|e| step("mkdir late", e))?;
        std::fs::write(share.join("late/added.txt"), "added-while-running\n")
            .map_err(|e| step("write late/added.txt", e))?;

        console.wait_for(&listening(PORT_HOST_INITIATED), GUEST_DEADLINE)?;
        let stream = hybrid_vsock::connect(&vsock_uds, PORT_HOST_INITIATED, &console)
            .map_err(|e| step("CONNECT 5000", e))?;
        let host_initiated = duplex(stream, VSOCK_BYTES, HOST_TO_GUEST_SEED)
            .map_err(|e| step("64 MiB on port 5000", e))?;

        console.wait_for(&listening(PORT_HOST_MANY), GUEST_DEADLINE)?;
        let host_many_echoed = many_host_initiated(&vsock_uds, &console)?;
        Ok(HostSide {
            host_initiated,
            host_many_echoed,
        })
    })
}

fn listening(port: u32) -> String {
    format!("HUSK_PROBE listening port={port}")
}

/// Opens 100 connections into the guest, waits until all are open, then
/// round-trips 64 KiB on each; returns how many echoed correctly.
fn many_host_initiated(vsock_uds: &Path, console: &ConsoleWatch) -> Result<usize, String> {
    let all_open = Arc::new(Barrier::new(MANY_CONNECTIONS));
    let workers: Vec<_> = (0..MANY_CONNECTIONS)
        .map(|index| {
            let (all_open, uds) = (all_open.clone(), vsock_uds.to_path_buf());
            let console = console.clone();
            thread::spawn(move || {
                let connected = hybrid_vsock::connect(&uds, PORT_HOST_MANY, &console);
                all_open.wait();
                echo_round_trip(connected?, index as u64, MANY_BYTES)
            })
        })
        .collect();
    let mut echoed = 0;
    let mut errors = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(())) => echoed += 1,
            Ok(Err(error)) => errors.push(format!("connection {index}: {error}")),
            Err(_) => errors.push(format!("connection {index}: thread panicked")),
        }
    }
    if !errors.is_empty() {
        eprintln!("host-initiated connections failed: {}", errors.join("; "));
    }
    Ok(echoed)
}

/// Serves the guest's connection to host port 5001: 64 MiB each way.
fn serve_guest_initiated(
    vsock_uds: &Path,
    console: &ConsoleWatch,
) -> JoinHandle<Result<(Summary, Summary), String>> {
    let listener = bind_port(vsock_uds, PORT_GUEST_INITIATED);
    let console = console.clone();
    thread::spawn(move || {
        let stream = accept(&listener, &console, GUEST_DEADLINE).map_err(|e| e.to_string())?;
        duplex(stream, VSOCK_BYTES, GUEST_TO_HOST_SEED).map_err(|e| e.to_string())
    })
}

/// Serves the guest's 100 connections to host port 5002, echoing each
/// from its own thread; returns (connections echoed, most open at once).
fn serve_guest_many(
    vsock_uds: &Path,
    console: &ConsoleWatch,
) -> JoinHandle<Result<(usize, usize), String>> {
    let listener = bind_port(vsock_uds, PORT_GUEST_MANY);
    let console = console.clone();
    thread::spawn(move || {
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut echoes = Vec::with_capacity(MANY_CONNECTIONS);
        for accepted in 0..MANY_CONNECTIONS {
            let stream = accept(&listener, &console, GUEST_DEADLINE)
                .map_err(|e| format!("after {accepted} connections: {e}"))?;
            let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now_open, Ordering::SeqCst);
            let open = open.clone();
            echoes.push(thread::spawn(move || {
                let result = echo(stream);
                open.fetch_sub(1, Ordering::SeqCst);
                result
            }));
        }
        let echoed = echoes
            .into_iter()
            .map(|echo| echo.join())
            .filter(|result| matches!(result, Ok(Ok(bytes)) if *bytes == MANY_BYTES))
            .count();
        Ok((echoed, peak.load(Ordering::SeqCst)))
    })
}

/// Listens where the device forwards guest connections to host `port`.
fn bind_port(vsock_uds: &Path, port: u32) -> UnixListener {
    let path = PathBuf::from(format!("{}_{port}", vsock_uds.display()));
    // The socket file goes away with the test directory.
    UnixListener::bind(&path).unwrap_or_else(|e| panic!("cannot listen on {}: {e}", path.display()))
}

fn join<T>(what: &str, handle: JoinHandle<Result<T, String>>) -> Result<T, String> {
    handle
        .join()
        .unwrap_or_else(|_| Err(format!("{what}: thread panicked")))
        .map_err(|e| format!("{what}: {e}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn meta(path: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("test paths hold no NUL")
}

fn set_xattr(path: &Path, name: &str, value: &str) {
    let (cpath, cname) = (c_path(path), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a buffer valid for its length.
    let result = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        result,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<String> {
    let (cpath, cname) = (c_path(path), CString::new(name).unwrap());
    let mut buf = [0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer valid for its length.
    let len = unsafe {
        libc::getxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}
