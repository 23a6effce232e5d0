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
//! on tmpfs under `/run`, so a template's RAM is held once in memory. When
//! a new template is made, templates of other keys (an older kernel or
//! initramfs, another size) are removed: a pod restored from one keeps
//! its pages through its mapping.
//!
//! What every pod restored from one template shares, and what the host
//! fixes first: the guest's wall clock, random-number state and NIC
//! addresses (the agent's `Restored` request, sent before anything else).
//! What it still shares: the guest kernel's address-space layout (KASLR
//! is decided once, at the template's boot).

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
/// (new size, time or inode) makes a new key.
fn file_identity(path: &Path) -> std::io::Result<String> {
    let metadata = std::fs::metadata(path)?;
    Ok(format!(
        "{}|{}|{}.{}|{}:{}",
        path.display(),
        metadata.len(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.dev(),
        metadata.ino()
    ))
}

/// The key of the template a VM of `spec` with `devices` (in window
/// order) restores from: 16 hex digits of a SHA-256 over its shape.
pub fn template_key(spec: &VmSpec, devices: &[DeviceShape]) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut line = |text: String| {
        hasher.update(text.as_bytes());
        hasher.update(b"\n");
    };
    line(format!("layout {TEMPLATE_LAYOUT}"));
    line(format!("husk {}", env!("CARGO_PKG_VERSION")));
    line(format!("kernel {}", file_identity(&spec.kernel)?));
    line(format!("initrd {}", file_identity(&spec.initrd)?));
    line(format!("cmdline {}", spec.kernel_cmdline()));
    line(format!(
        "vcpus {} memory_mib {}",
        spec.vcpus, spec.memory_mib
    ));
    for device in devices {
        line(format!(
            "device {} queues {:?} features {:#x}",
            device.device_type, device.queue_sizes, device.features
        ));
    }
    let digest = hasher.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
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

/// Removes every template in `root` but `keep`, and any half-written one
/// left by a shim that died while saving (`*.partial-<pid>` of a pid that
/// is gone). Returns how many were removed.
pub fn prune(root: &Path, keep: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == keep {
            continue;
        }
        if let Some((_, pid)) = name.split_once(".partial-") {
            let alive = pid
                .parse::<u32>()
                .map(|pid| Path::new(&format!("/proc/{pid}")).exists())
                .unwrap_or(false);
            if alive {
                continue;
            }
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(error) => {
                tracing::warn!(%error, template = %name, "cannot remove an old template")
            }
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
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&initrd, b"initrd").unwrap();
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
        assert_eq!(key.len(), 16);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
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
        }

        // A rebuilt initramfs (new contents, new size) is a new template.
        std::fs::write(&base.initrd, b"initrd, rebuilt").unwrap();
        assert_ne!(template_key(&base, &[vsock()]).unwrap(), key);
    }

    #[test]
    fn a_missing_kernel_has_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut missing = spec(dir.path());
        missing.kernel = dir.path().join("absent");
        assert!(template_key(&missing, &[]).is_err());
    }

    #[test]
    fn prune_keeps_the_current_template_and_live_partials() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("templates");
        ensure_root(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for name in [
            "current".to_owned(),
            "older".to_owned(),
            format!("current.partial-{}", std::process::id()),
            "current.partial-4294967295".to_owned(),
        ] {
            std::fs::create_dir(root.join(&name)).unwrap();
            std::fs::write(root.join(&name).join("memory"), b"x").unwrap();
        }
        assert_eq!(prune(&root, "current"), 2);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                "current".to_owned(),
                format!("current.partial-{}", std::process::id())
            ]
        );
    }
}
