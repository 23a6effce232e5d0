//! The container's on-disk record under the state root, and the two JSON
//! shapes derived from it: `runc state` output and the OCI state hooks read
//! on stdin.
//!
//! Layout (same as runc's, so operators find their way): `<root>/<id>/`
//! (mode 0711) holds `state.json` (mode 0600, our own record) and, between
//! create and start, `exec.fifo`. A container's liveness is decided from its
//! pid *and* that pid's start time, so a recycled pid reads as stopped.

use crate::cgroups::CgroupPaths;
use crate::error::{Context, Error, Result};
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The OCI version string runc 1.1 reports.
pub const OCI_VERSION: &str = "1.0.2-dev";
/// Name of the state record inside the container's directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the fifo the init blocks on until `start`.
pub const EXEC_FIFO: &str = "exec.fifo";

/// Lifecycle status as the OCI runtime spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// Everything the runtime remembers about a container between commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pid: i32,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`).
    pub pid_start_time: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    pub cgroups: CgroupPaths,
    pub spec: Spec,
}

/// `runc state` output, field for field.
#[derive(Debug, Serialize)]
pub struct RuncState<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    pub id: &'a str,
    pub pid: i32,
    pub status: Status,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub created: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub owner: &'a str,
}

/// The OCI state given to hooks on stdin.
#[derive(Debug, Serialize)]
pub struct HookState<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: Status,
    #[serde(skip_serializing_if = "is_zero")]
    pub pid: i32,
    pub bundle: &'a Path,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

impl ContainerRecord {
    /// Annotations sorted by key, as Go's encoder prints maps.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.spec
            .annotations()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The OCI state for hooks at `status`.
    pub fn hook_state(&self, status: Status) -> HookState<'_> {
        HookState {
            oci_version: OCI_VERSION,
            id: &self.id,
            status,
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            bundle: &self.bundle,
            annotations: self.annotations(),
        }
    }

    /// `runc state` JSON at `status`.
    pub fn runc_state(&self, status: Status) -> RuncState<'_> {
        RuncState {
            oci_version: OCI_VERSION,
            id: &self.id,
            pid: if status == Status::Stopped {
                0
            } else {
                self.pid
            },
            status,
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            created: &self.created,
            annotations: self.annotations(),
            owner: &self.owner,
        }
    }

    /// Whether the recorded process still exists (and is not a zombie).
    pub fn process_alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => start == self.pid_start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// `(state letter, start time)` of a process from `/proc/<pid>/stat`.
pub fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesised and may contain spaces.
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // starttime is field 22 of the whole line, 20 after "pid (comm)".
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The per-container directories under a state root.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// Reject ids that could address a path outside the state root.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

impl StateStore {
    /// A store rooted at `root` (created with mode 0700 on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Create the directory of a new container; fails if it exists.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .at("create state root", &self.root)?;
        let dir = self.dir(id);
        match std::fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::AlreadyExists(id.to_string()))
            }
            Err(e) => Err(e).at("create state dir", &dir),
        }
    }

    /// Write the record atomically (temp file + rename).
    pub fn save(&self, record: &ContainerRecord) -> Result<()> {
        let dir = self.dir(&record.id);
        let tmp = dir.join(".state.json.tmp");
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Init(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .at("write", &tmp)?;
            f.write_all(&bytes).at("write", &tmp)?;
        }
        std::fs::rename(&tmp, dir.join(STATE_FILE)).at("rename", dir.join(STATE_FILE))
    }

    /// Load the record of `id`.
    pub fn load(&self, id: &str) -> Result<ContainerRecord> {
        validate_id(id)?;
        let path = self.dir(id).join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(e) => return Err(e).at("read", &path),
        };
        serde_json::from_slice(&text).map_err(|e| Error::Io {
            op: "parse",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Every container id in the store.
    pub fn list(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(STATE_FILE).exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Remove the container's directory and everything in it.
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).at("remove state dir", &dir),
        }
    }
}

/// Now as RFC 3339 with nanoseconds in UTC, trailing zeros trimmed, like
/// Go's `time.RFC3339Nano`.
pub fn now_rfc3339_nano() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(now.as_secs() as i64, now.subsec_nanos(), true)
}

/// Format seconds since the epoch; `nanos` only when `with_nanos`.
pub fn format_rfc3339(secs: i64, nanos: u32, with_nanos: bool) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let base = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    if with_nanos && nanos > 0 {
        let frac = format!("{nanos:09}");
        format!("{base}.{}Z", frac.trim_end_matches('0'))
    } else {
        format!("{base}Z")
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(format_rfc3339(0, 0, true), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_rfc3339(1_700_000_000, 120_000_000, true),
            "2023-11-14T22:13:20.12Z"
        );
        assert_eq!(
            format_rfc3339(951_782_400, 5, false),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn ids_with_separators_are_rejected() {
        assert!(validate_id("abc-1.2_x").is_ok());
        for bad in ["", "..", "a/b", "a b"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn second_create_of_same_id_reports_exists() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("root"));
        store.create_dir("c1").unwrap();
        assert!(matches!(
            store.create_dir("c1"),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(store.load("nope"), Err(Error::NotFound(_))));
    }

    #[test]
    fn own_process_reads_as_alive_with_its_start_time() {
        let pid = std::process::id() as i32;
        let (state, start) = proc_stat(pid).unwrap();
        assert_ne!(state, 'Z');
        assert!(start > 0);
    }
}
