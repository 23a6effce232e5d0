//! Pre-booted templates for the built-in VMM (`hypervisor.template`).
//!
//! A template is a snapshot (`husk_vmm::snapshot`) of a VM whose guest
//! has booted and whose agent has answered, taken before anything of a
//! pod reached it. Pods whose VM has the same shape restore it instead of
//! booting: the kernel's boot and the agent's start are skipped, and the
//! guest RAM the boot filled is shared copy-on-write between every pod
//! restored from it.
//!
//! The shape is everything the guest saw while it booted, hashed into the
//! template's key ([`template_key`]): the kernel and initramfs (path,
//! size, modification time, inode), the command line, the vCPUs and RAM,
//! and each virtio device's type, queues and offered features, in window
//! order. A pod whose shape has no template yet boots as usual and, once
//! its agent answers, is paused, saved as the template and resumed; the
//! snapshot is written beside its final place and renamed into it, so
//! two pods racing to make one leave one whole template.
//!
//! Templates live in `<run root>/../templates/<key>` (mode 0700, root's):
//! on tmpfs under `/run`, so a template's RAM is held once in memory and
//! no template outlives a reboot (so never a host kernel upgrade). When a
//! new template is made, those of an older kernel or initramfs are
//! removed, and of the current guest at most [`MAX_TEMPLATES_PER_GUEST`]
//! shapes are kept ([`prune`]); a pod restored from a removed template
//! keeps its pages through its mapping. A template that fails to restore
//! is set aside ([`reject`]), so only the one pod fails: the next pod of
//! that shape boots and makes a new template.
//!
//! What every pod restored from one template shares, and what the host
//! fixes first: the guest's wall clock, random-number state and NIC
//! addresses (the agent's `Restored` request, sent before anything else).
//! What it still shares: every secret the guest drew before the snapshot
//! and that a reseed does not replace: the kernel's address-space layout
//! (KASLR), the stack canaries and address-space layout of the processes
//! already running (init and the agent, kernel threads), and keys the
//! kernel seeded at boot (hash and network secrets). A tenant is root in
//! its own guest and can read those, which is why templates are off by
//! default.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::VmSpec;

/// Changes when what a template holds, or how it is keyed, changes.
const TEMPLATE_LAYOUT: u32 = 1;

/// What the template store needs to know of one virtio device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceShape {
    pub device_type: u32,
    pub queue_sizes: Vec<u16>,
    pub features: u64,
}

impl DeviceShape {
    pub fn of(device: &dyn husk_devices::VirtioDevice) -> Self {
        Self {
            device_type: device.device_type(),
            queue_sizes: device.queue_max_sizes(),
            features: device.available_features(),
        }
    }
}

/// Where templates live: beside the sandboxes' run root.
pub fn template_root() -> PathBuf {
    let run_root = crate::paths::run_root();
    run_root.parent().unwrap_or(&run_root).join("templates")
}

/// A file's identity as the key sees it: a rebuilt kernel or initramfs
/// (new size, inode, modification or change time; a rewrite in place
/// that restores the modification time still moves the change time)
/// makes a new key.
fn file_identity(path: &Path) -> std::io::Result<String> {
    let metadata = std::fs::metadata(path)?;
    Ok(format!(
        "{}|{}|{}.{}|{}.{}|{}:{}",
        path.display(),
        metadata.len(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec(),
        metadata.dev(),
        metadata.ino()
    ))
}

/// The most templates kept for one kernel and initramfs: one per VM shape
/// (pod size, devices) in use, the least recently made removed first.
pub const MAX_TEMPLATES_PER_GUEST: usize = 8;

/// The key of the template a VM of `spec` with `devices` (in window
/// order) restores from: `<guest>-<shape>`, 8 hex digits each of SHA-256
/// digests. `guest` covers what every template of this host's guest
/// shares (husk's version, the kernel, the initramfs); `shape` the rest
/// (command line, vCPUs, RAM, devices), so [`prune`] can tell a template
/// of an older guest from one of another pod size.
pub fn template_key(spec: &VmSpec, devices: &[DeviceShape]) -> std::io::Result<String> {
    let mut guest = Sha256::new();
    let line = |hasher: &mut Sha256, text: String| {
        hasher.update(text.as_bytes());
        hasher.update(b"\n");
    };
    line(&mut guest, format!("layout {TEMPLATE_LAYOUT}"));
    line(&mut guest, format!("husk {}", env!("CARGO_PKG_VERSION")));
    line(
        &mut guest,
        format!("kernel {}", file_identity(&spec.kernel)?),
    );
    line(
        &mut guest,
        format!("initrd {}", file_identity(&spec.initrd)?),
    );
    let mut shape = Sha256::new();
    line(&mut shape, format!("cmdline {}", spec.kernel_cmdline()));
    line(
        &mut shape,
        format!("vcpus {} memory_mib {}", spec.vcpus, spec.memory_mib),
    );
    for device in devices {
        line(
            &mut shape,
            format!(
                "device {} queues {:?} features {:#x}",
                device.device_type, device.queue_sizes, device.features
            ),
        );
    }
    let hex =
        |digest: &[u8]| -> String { digest[..4].iter().map(|b| format!("{b:02x}")).collect() };
    Ok(format!(
        "{}-{}",
        hex(&guest.finalize()),
        hex(&shape.finalize())
    ))
}

/// Sets the template in `directory` aside (`<key>.rejected-<pid>`, which
/// [`prune`] removes) after it failed to restore, so the next pod of its
/// shape boots and makes a new one instead of failing the same way.
pub fn reject(directory: &Path, why: &str) {
    let mut aside = directory.as_os_str().to_owned();
    aside.push(format!(".rejected-{}", std::process::id()));
    match std::fs::rename(directory, &aside) {
        Ok(()) => tracing::warn!(
            template = %directory.display(),
            why,
            "the template was set aside; the next pod of its shape boots and makes a new one"
        ),
        Err(error) => {
            tracing::warn!(%error, template = %directory.display(), "cannot set a failed template aside")
        }
    }
}

/// Creates the template root (0700) if it is missing.
pub fn ensure_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
}

/// Removes from `root`: templates of another guest than `keep`'s (an older
/// kernel or initramfs), templates set aside after a failed restore,
/// half-written ones of a shim that died while saving
/// (`*.partial-<pid>` of a pid that is gone), and, of `keep`'s guest, the
/// oldest beyond [`MAX_TEMPLATES_PER_GUEST`]. Returns how many went. A pod
/// restored from a removed template keeps its pages through its mapping.
pub fn prune(root: &Path, keep: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let guest = keep.split('-').next().unwrap_or(keep);
    let mut removed = 0;
    let mut remove = |path: &Path| match std::fs::remove_dir_all(path) {
        Ok(()) => removed += 1,
        Err(error) => {
            tracing::warn!(%error, template = %path.display(), "cannot remove an old template")
        }
    };
    let mut same_guest = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == keep {
            continue;
        }
        if let Some((_, pid)) = name.split_once(".partial-") {
            let alive = pid
                .parse::<u32>()
                .map(|pid| Path::new(&format!("/proc/{pid}")).exists())
                .unwrap_or(false);
            if !alive {
                remove(&entry.path());
            }
            continue;
        }
        if name.contains(".rejected-") || name.split('-').next() != Some(guest) {
            remove(&entry.path());
            continue;
        }
        let made = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        same_guest.push((made, entry.path()));
    }
    // `keep` counts as one of the guest's templates.
    if same_guest.len() >= MAX_TEMPLATES_PER_GUEST {
        same_guest.sort();
        let excess = same_guest.len() + 1 - MAX_TEMPLATES_PER_GUEST;
        for (_, path) in same_guest.iter().take(excess) {
            remove(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Backend;

    fn spec(dir: &Path) -> VmSpec {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initramfs.cpio.gz");
        for (path, text) in [(&kernel, "kernel"), (&initrd, "initrd")] {
            if !path.exists() {
                std::fs::write(path, text).unwrap();
            }
        }
        VmSpec {
            backend: Backend::Builtin,
            vcpus: 1,
            memory_mib: 256,
            kernel,
            initrd,
            console_log: dir.join("console.log"),
            console_max_bytes: 1 << 20,
            work_dir: dir.to_owned(),
            qemu_binary: None,
            seccomp: true,
            free_page_reporting: true,
            qemu_run_as: crate::hypervisor::qemu::RunAs::Root,
            template_root: None,
        }
    }

    fn vsock() -> DeviceShape {
        DeviceShape {
            device_type: 19,
            queue_sizes: vec![256; 3],
            features: 1 << 32,
        }
    }

    #[test]
    fn the_key_is_stable_and_changes_with_every_part_of_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let base = spec(dir.path());
        let key = template_key(&base, &[vsock()]).unwrap();
        let (guest, shape) = key.split_once('-').unwrap();
        assert_eq!((guest.len(), shape.len()), (8, 8), "{key}");
        assert!(key.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        assert_eq!(template_key(&base, &[vsock()]).unwrap(), key);

        let mut bigger = spec(dir.path());
        bigger.memory_mib = 512;
        let mut wider = spec(dir.path());
        wider.vcpus = 2;
        let mut qemu = spec(dir.path());
        qemu.backend = Backend::Qemu; // another power-off command line
        let fs = DeviceShape {
            device_type: 26,
            queue_sizes: vec![1024; 2],
            features: 1 << 32,
        };
        let mut other_features = vsock();
        other_features.features |= 1 << 29;
        let variants = [
            template_key(&bigger, &[vsock()]).unwrap(),
            template_key(&wider, &[vsock()]).unwrap(),
            template_key(&qemu, &[vsock()]).unwrap(),
            template_key(&base, &[]).unwrap(),
            template_key(&base, &[vsock(), fs.clone()]).unwrap(),
            template_key(&base, &[fs, vsock()]).unwrap(),
            template_key(&base, &[other_features]).unwrap(),
        ];
        for (index, variant) in variants.iter().enumerate() {
            assert_ne!(variant, &key, "variant {index} has the base key");
            assert!(
                variant.starts_with(guest),
                "variant {index} changed only the shape, not the guest: {variant}"
            );
        }

        // A rebuilt initramfs (new contents, new size) is another guest.
        std::fs::write(&base.initrd, b"initrd, rebuilt").unwrap();
        let rebuilt = template_key(&base, &[vsock()]).unwrap();
        assert!(!rebuilt.starts_with(guest), "{rebuilt}");
    }

    #[test]
    fn a_missing_kernel_has_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = spec(dir.path());
        missing.kernel = dir.path().join("absent");
        assert!(template_key(&missing, &[]).is_err());
    }

    #[test]
    fn prune_removes_older_guests_rejected_and_dead_partials_and_caps_the_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("templates");
        ensure_root(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let make = |name: &str| {
            std::fs::create_dir(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("memory"), b"x").unwrap();
        };
        let live_partial = format!("aaaaaaaa-00000001.partial-{}", std::process::id());
        for name in [
            "aaaaaaaa-00000001",                    // kept: the current template
            "aaaaaaaa-00000002",                    // kept: another shape, same guest
            "bbbbbbbb-00000001",                    // an older guest: removed
            "aaaaaaaa-00000003.rejected-7",         // set aside: removed
            live_partial.as_str(),                  // being written: kept
            "aaaaaaaa-00000004.partial-4294967295", // its writer is gone: removed
        ] {
            make(name);
        }
        assert_eq!(prune(&root, "aaaaaaaa-00000001"), 3);
        let names = |root: &Path| {
            let mut left: Vec<String> = std::fs::read_dir(root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            left
        };
        assert_eq!(
            names(&root),
            vec![
                "aaaaaaaa-00000001".to_owned(),
                live_partial.clone(),
                "aaaaaaaa-00000002".to_owned(),
            ]
        );

        // More shapes than the cap: the oldest go, the current stays.
        for index in 0..MAX_TEMPLATES_PER_GUEST {
            std::thread::sleep(std::time::Duration::from_millis(5));
            make(&format!("aaaaaaaa-1000000{index}"));
        }
        prune(&root, "aaaaaaaa-00000001");
        let left = names(&root);
        let shapes = left.iter().filter(|n| !n.contains(".partial-")).count();
        assert_eq!(shapes, MAX_TEMPLATES_PER_GUEST, "{left:?}");
        assert!(left.contains(&"aaaaaaaa-00000001".to_owned()));
        assert!(
            !left.contains(&"aaaaaaaa-00000002".to_owned()),
            "the oldest went first"
        );
    }

    #[test]
    fn a_rejected_template_is_set_aside_for_prune() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("aaaaaaaa-00000001");
        std::fs::create_dir(&template).unwrap();
        reject(&template, "test");
        assert!(!template.exists());
        assert_eq!(prune(dir.path(), "aaaaaaaa-00000002"), 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
