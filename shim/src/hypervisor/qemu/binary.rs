//! Finding `qemu-system-x86_64` and checking that it is new enough.
//!
//! The backend relies on QEMU 7.2 (Debian 12's `qemu-system-x86`): `microvm`
//! with `memory-backend=`, and the bus-less `vhost-user-vsock-device` and
//! `vhost-user-fs-device`. The version comes from the first line of
//! `--version`, e.g. `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::QemuError;

/// The QEMU program the backend runs.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// The oldest QEMU the backend was verified with (Debian 12's package).
pub const MINIMUM_QEMU_VERSION: QemuVersion = QemuVersion {
    major: 7,
    minor: 2,
    micro: 0,
};

/// A QEMU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Reads the version from `qemu-system-* --version` output. Returns `None`
/// when the text holds no `QEMU emulator version X.Y[.Z]`.
pub fn parse_version_output(output: &str) -> Option<QemuVersion> {
    const MARKER: &str = "QEMU emulator version ";
    let start = output.find(MARKER)? + MARKER.len();
    let number = output[start..].split_whitespace().next()?;
    // Development builds print e.g. `7.2.50` or `8.0.0-rc1`; the suffix
    // after `-` does not change the release line.
    let number = number.split('-').next()?;
    let mut parts = number.split('.').map(str::parse::<u32>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let micro = match parts.next() {
        Some(micro) => micro.ok()?,
        None => 0,
    };
    Some(QemuVersion {
        major,
        minor,
        micro,
    })
}

/// The QEMU binary to run: `configured` if given, else the first
/// `qemu-system-x86_64` on `PATH`.
pub fn locate_qemu(configured: Option<&Path>) -> Result<PathBuf, QemuError> {
    locate_qemu_in(configured, &std::env::var("PATH").unwrap_or_default())
}

fn locate_qemu_in(configured: Option<&Path>, path: &str) -> Result<PathBuf, QemuError> {
    match configured {
        Some(binary) if binary.is_file() => Ok(binary.to_path_buf()),
        Some(binary) => Err(QemuError::BinaryMissing {
            binary: binary.to_path_buf(),
        }),
        None => find_on_path(QEMU_PROGRAM, path).ok_or_else(|| QemuError::NotFound {
            path: path.to_owned(),
        }),
    }
}

/// The first executable file called `program` in the `:`-separated `path`.
fn find_on_path(program: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `binary --version` and checks it against [`MINIMUM_QEMU_VERSION`].
pub fn check_version(binary: &Path) -> Result<QemuVersion, QemuError> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| QemuError::VersionCommand {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version_output(&text).ok_or_else(|| QemuError::VersionUnparseable {
        binary: binary.to_path_buf(),
        output: format!("{}{}", text, String::from_utf8_lossy(&output.stderr)),
    })?;
    if version < MINIMUM_QEMU_VERSION {
        return Err(QemuError::VersionTooOld {
            binary: binary.to_path_buf(),
            found: version,
            required: MINIMUM_QEMU_VERSION,
        });
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    #[test]
    fn debian_version_line_is_parsed() {
        let output = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                      Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(parse_version_output(output), Some(version(7, 2, 22)));
    }

    #[test]
    fn upstream_and_development_versions_are_parsed() {
        assert_eq!(
            parse_version_output("QEMU emulator version 9.1.0\n"),
            Some(version(9, 1, 0))
        );
        assert_eq!(
            parse_version_output("QEMU emulator version 8.0.0-rc1 (v8.0.0-rc1)\n"),
            Some(version(8, 0, 0))
        );
        assert_eq!(
            parse_version_output("QEMU emulator version 6.2\n"),
            Some(version(6, 2, 0))
        );
    }

    #[test]
    fn text_without_a_qemu_version_is_rejected() {
        assert_eq!(parse_version_output(""), None);
        assert_eq!(parse_version_output("bash: qemu: command not found"), None);
        assert_eq!(parse_version_output("QEMU emulator version x.y"), None);
    }

    #[test]
    fn versions_order_by_release() {
        assert!(version(7, 1, 9) < MINIMUM_QEMU_VERSION);
        assert!(version(7, 2, 0) >= MINIMUM_QEMU_VERSION);
        assert!(version(8, 0, 0) > MINIMUM_QEMU_VERSION);
        assert!(version(6, 10, 0) < MINIMUM_QEMU_VERSION);
    }

    #[test]
    fn too_old_qemu_error_names_the_debian_package() {
        let error = QemuError::VersionTooOld {
            binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            found: version(6, 2, 0),
            required: MINIMUM_QEMU_VERSION,
        };
        let message = error.to_string();
        assert!(
            message.contains("6.2.0") && message.contains("7.2.0"),
            "{message}"
        );
        assert!(message.contains("qemu-system-x86 package"), "{message}");
    }

    #[test]
    fn qemu_missing_from_path_names_the_debian_package() {
        let error = locate_qemu_in(None, "/nonexistent-husk-dir").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("qemu-system-x86 package"), "{message}");
        assert!(message.contains("/nonexistent-husk-dir"), "{message}");
    }

    #[test]
    fn program_is_found_in_the_first_path_entry_holding_it() {
        let dir = std::env::temp_dir().join(format!("husk-qemu-path-{}", std::process::id()));
        let (first, second) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        // A non-executable file of the same name is skipped.
        std::fs::write(first.join(QEMU_PROGRAM), b"").unwrap();
        std::fs::write(second.join(QEMU_PROGRAM), b"").unwrap();
        std::fs::set_permissions(
            second.join(QEMU_PROGRAM),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let path = format!("{}::{}", first.display(), second.display());
        let found = find_on_path(QEMU_PROGRAM, &path);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, Some(second.join(QEMU_PROGRAM)));
    }

    #[test]
    fn configured_binary_that_does_not_exist_is_named() {
        let error = locate_qemu(Some(Path::new("/nonexistent/qemu"))).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/qemu"), "{error}");
    }
}
