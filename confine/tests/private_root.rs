//! A virtio-fs thread's private root, as the thread sees it: `/` holds
//! only the share and `/proc/self/fd`, is read-only, hides what lies next
//! to the share on the host, keeps `/proc/self/fd/N` working (the
//! passthrough's xattr calls use it), and still sees what the host mounts
//! in the share later. The host's mount table is untouched by all of it.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use husk_confine::{enter_private_root, SHARE_INSIDE};

/// A scratch pod directory under /tmp, unmounted and removed on drop.
struct PodDir {
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl PodDir {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!("husk-private-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("share/sub")).unwrap();
        std::fs::write(root.join("share/hello"), "from the share").unwrap();
        std::fs::write(root.join("next-to-the-share"), "host only").unwrap();
        Self {
            root: root.canonicalize().unwrap(),
            mounts: Vec::new(),
        }
    }

    fn share(&self) -> PathBuf {
        self.root.join("share")
    }

    fn mount(&mut self, source: Option<&Path>, target: &Path, fstype: &str, flags: libc::c_ulong) {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
        let fstype = CString::new(fstype).unwrap();
        let source = source.map(c).unwrap_or_else(|| fstype.clone());
        // SAFETY: NUL-terminated strings that outlive the call.
        let ret = unsafe {
            libc::mount(
                source.as_ptr(),
                c(target).as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        assert_eq!(
            ret,
            0,
            "mount {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
        self.mounts.push(target.to_owned());
    }

    /// Whether the host's mount table has anything at or below the pod dir.
    fn host_mounts(&self) -> Vec<String> {
        let prefix = self.root.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
            .filter(|point| point.starts_with(&prefix))
            .collect()
    }
}

impl Drop for PodDir {
    fn drop(&mut self) {
        for target in self.mounts.iter().rev() {
            let target = CString::new(target.as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What the confined thread observed.
#[derive(Debug)]
struct Seen {
    root_entries: Vec<String>,
    hello: String,
    neighbour_visible: bool,
    host_etc_visible: bool,
    other_process_visible: bool,
    fd_path_stat_ok: bool,
    root_write_errno: Option<i32>,
    later_mount_seen: String,
}

#[test]
fn an_fs_thread_sees_only_the_share_and_its_fds() {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this host-tier test needs root (it mounts)");
    }
    let mut pod = PodDir::new();
    let share = pod.share();
    // The share is a mount point of its own whose mounts propagate, as the
    // shim's read-only view of `mounts/` is.
    pod.mount(Some(&share), &share, "none", libc::MS_BIND);
    pod.mount(None, &share, "none", libc::MS_SHARED);
    let before = pod.host_mounts();

    let (mounted_sender, mounted) = mpsc::channel::<()>();
    let (entered_sender, entered) = mpsc::channel::<i32>();
    let host_namespace = std::fs::read_link("/proc/thread-self/ns/mnt").unwrap();
    let thread_share = share.clone();
    let thread = std::thread::spawn(move || {
        enter_private_root(&thread_share).expect("enter the private root");
        // SAFETY: gettid has no arguments.
        entered_sender.send(unsafe { libc::gettid() }).unwrap();
        mounted.recv().unwrap();
        let inside = Path::new(SHARE_INSIDE);
        let mut root_entries: Vec<String> = std::fs::read_dir("/")
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        root_entries.sort();
        let hello_file = std::fs::File::open(inside.join("hello")).unwrap();
        let fd_path = format!("/proc/self/fd/{}", hello_file.as_raw_fd());
        Seen {
            root_entries,
            hello: std::fs::read_to_string(inside.join("hello")).unwrap(),
            neighbour_visible: Path::new("/next-to-the-share").exists()
                || inside.join("../next-to-the-share").exists(),
            host_etc_visible: Path::new("/etc/hostname").exists(),
            other_process_visible: Path::new("/proc/1/root").exists(),
            fd_path_stat_ok: std::fs::metadata(&fd_path).is_ok_and(|meta| meta.len() == 14),
            root_write_errno: std::fs::write("/planted", "x")
                .err()
                .and_then(|e| e.raw_os_error()),
            later_mount_seen: std::fs::read_to_string(inside.join("sub/later"))
                .unwrap_or_else(|error| format!("not seen: {error}")),
        }
    });
    let tid = entered.recv().unwrap();
    let thread_namespace = std::fs::read_link(format!("/proc/self/task/{tid}/ns/mnt")).unwrap();
    // The host mounts in the share after the thread entered its root.
    pod.mount(None, &share.join("sub"), "tmpfs", 0);
    std::fs::write(share.join("sub/later"), "mounted later").unwrap();
    mounted_sender.send(()).unwrap();
    let seen = thread.join().unwrap();
    println!("husk-test-form: full (root, real mount namespace): {seen:?}");

    assert_eq!(seen.root_entries, ["proc", "share"]);
    assert_eq!(seen.hello, "from the share");
    assert!(
        !seen.neighbour_visible,
        "the thread sees what is next to the share"
    );
    assert!(!seen.host_etc_visible, "the thread sees the host's /etc");
    assert!(
        !seen.other_process_visible,
        "the thread sees other processes in /proc"
    );
    assert!(
        seen.fd_path_stat_ok,
        "/proc/self/fd/N does not reach the file"
    );
    assert_eq!(seen.root_write_errno, Some(libc::EROFS));
    assert_eq!(seen.later_mount_seen, "mounted later");
    assert_ne!(
        thread_namespace, host_namespace,
        "the thread kept the process's mount namespace"
    );
    // Nothing the thread did shows on the host: no tmpfs over the pod dir.
    let mut after = pod.host_mounts();
    after.retain(|point| !point.ends_with("/sub"));
    assert_eq!(
        after, before,
        "the private root leaked into the host's mounts"
    );
    assert!(pod.root.join("next-to-the-share").exists());
}
