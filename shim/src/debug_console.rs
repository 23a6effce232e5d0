//! The host side of the guest's debug console (`debug_console = true`):
//! the product initramfs has no shell, so for such a pod the shim writes
//! `initramfs-debug.cpio` in the pod's VM directory: the configured
//! initramfs, zero padding to a 4-byte boundary, then a second,
//! uncompressed newc archive holding `debug_shell` as `/bin/busybox` and
//! `/bin/sh` linking to it. Linux unpacks concatenated archives in order
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`), so the
//! agent's initramfs is unchanged and the shell is added beside it. The
//! agent serves the shell only when the shim then sends
//! `StartDebugConsole`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The file written in the VM directory.
pub const DEBUG_INITRD_NAME: &str = "initramfs-debug.cpio";
/// The largest shell accepted: a static busybox is about 2 MiB; more is
/// not a shell but a misconfiguration that would cost every such pod.
pub const MAX_DEBUG_SHELL_BYTES: u64 = 16 * 1024 * 1024;

/// Why the debug initramfs could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DebugInitrdError {
    #[error("debug_shell = {path}: {reason}")]
    Shell { path: PathBuf, reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One newc entry (header, name, data, each padded to 4 bytes).
fn newc_entry(out: &mut Vec<u8>, inode: u32, name: &str, mode: u32, data: &[u8]) {
    let name_size = name.len() + 1;
    let fields = [
        inode,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name_size as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The newc archive that adds `shell` as `/bin/busybox` and `/bin/sh`.
pub fn shell_archive(shell: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040_755;
    const FILE: u32 = 0o100_755;
    const LINK: u32 = 0o120_777;
    let mut out = Vec::with_capacity(shell.len() + 1024);
    newc_entry(&mut out, 0x4800_0001, "bin", DIR, b"");
    newc_entry(&mut out, 0x4800_0002, "bin/busybox", FILE, shell);
    newc_entry(&mut out, 0x4800_0003, "bin/sh", LINK, b"busybox");
    newc_entry(&mut out, 0, "TRAILER!!!", 0, b"");
    out
}

/// Writes `<vm_dir>/initramfs-debug.cpio` from `initrd` and `shell`;
/// returns its path.
pub fn write_debug_initrd(
    initrd: &Path,
    shell: &Path,
    vm_dir: &Path,
) -> Result<PathBuf, DebugInitrdError> {
    let shell_error = |reason: String| DebugInitrdError::Shell {
        path: shell.to_owned(),
        reason,
    };
    let size = std::fs::metadata(shell)
        .map_err(|e| shell_error(format!("not readable: {e}")))?
        .len();
    if size > MAX_DEBUG_SHELL_BYTES {
        return Err(shell_error(format!(
            "{size} bytes is more than the {MAX_DEBUG_SHELL_BYTES} a static shell takes"
        )));
    }
    let shell_bytes =
        std::fs::read(shell).map_err(|e| shell_error(format!("not readable: {e}")))?;
    if !shell_bytes.starts_with(b"\x7fELF") {
        return Err(shell_error(
            "not an ELF executable (a static shell such as Debian's busybox-static is needed)"
                .into(),
        ));
    }
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| DebugInitrdError::Io {
            action,
            path,
            source,
        }
    };
    let mut combined = std::fs::read(initrd).map_err(io("read", initrd))?;
    pad4(&mut combined);
    combined.extend_from_slice(&shell_archive(&shell_bytes));
    let target = vm_dir.join(DEBUG_INITRD_NAME);
    let mut file = std::fs::File::create(&target).map_err(io("create", &target))?;
    file.write_all(&combined).map_err(io("write", &target))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of an uncompressed newc archive: (name, mode, data).
    fn entries(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap()
            };
            assert_eq!(&bytes[..6], b"070701", "at {offset}");
            let (mode, size, name_size) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(bytes[110..110 + name_size - 1].to_vec()).unwrap();
            let data_start = (110 + name_size).div_ceil(4) * 4;
            let data = bytes[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data));
            offset += next;
            bytes = &bytes[next..];
        }
    }

    #[test]
    fn the_shell_archive_holds_busybox_and_sh_linking_to_it() {
        let archive = shell_archive(b"\x7fELF-shell");
        assert_eq!(archive.len() % 4, 0);
        let found = entries(&archive);
        assert_eq!(found[0], ("bin".into(), 0o040_755, vec![]));
        assert_eq!(
            found[1],
            ("bin/busybox".into(), 0o100_755, b"\x7fELF-shell".to_vec())
        );
        assert_eq!(found[2], ("bin/sh".into(), 0o120_777, b"busybox".to_vec()));
    }

    #[test]
    fn the_debug_initrd_is_the_initrd_padded_then_the_shell_archive() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, b"\x1f\x8bgzip-bytes!").unwrap();
        let shell = dir.path().join("busybox");
        std::fs::write(&shell, b"\x7fELFbusybox").unwrap();
        let made = write_debug_initrd(&initrd, &shell, dir.path()).unwrap();
        let bytes = std::fs::read(&made).unwrap();
        // 13 bytes, padded with zeros to 16, where the second archive starts.
        assert!(bytes.starts_with(b"\x1f\x8bgzip-bytes!\x00\x00\x00070701"));
        let second = &bytes[16..];
        assert_eq!(entries(second)[1].2, b"\x7fELFbusybox");
    }

    #[test]
    fn a_missing_or_non_elf_shell_is_refused_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, b"x").unwrap();
        let missing =
            write_debug_initrd(&initrd, &dir.path().join("nope"), dir.path()).unwrap_err();
        assert!(
            missing.to_string().starts_with("debug_shell = "),
            "{missing}"
        );
        let script = dir.path().join("sh");
        std::fs::write(&script, b"#!/bin/sh\n").unwrap();
        let error = write_debug_initrd(&initrd, &script, dir.path()).unwrap_err();
        assert!(error.to_string().contains("not an ELF"), "{error}");
    }
}
