//! The namespaces a spec asks for: which to create, which to join by path,
//! and the system calls that do either.
//!
//! The user namespace is always handled first (joining or creating it
//! changes what the other namespaces may do), and pid/time namespaces only
//! take effect for children, which is why the init forks once more after
//! [`NamespaceSet::enter_non_user`].

use crate::error::{Context, Error, Result};
use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// One namespace entry of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceEntry {
    pub typ: LinuxNamespaceType,
    /// `Some` joins an existing namespace; `None` creates a new one.
    pub path: Option<PathBuf>,
}

/// The validated namespace list of a container.
#[derive(Debug, Clone, Default)]
pub struct NamespaceSet {
    pub entries: Vec<NamespaceEntry>,
}

/// The `clone(2)` flag for a namespace type.
pub fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        // CLONE_NEWTIME shares its value with CSIGNAL's range in old libcs.
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(0x80),
    }
}

/// The file name of a namespace type under `/proc/<pid>/ns/`.
pub fn proc_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// Order in which namespaces are joined by path: user first, mount last
/// (after it, paths given for the others would resolve in the container).
const JOIN_ORDER: [LinuxNamespaceType; 8] = [
    LinuxNamespaceType::User,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Time,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Mount,
];

impl NamespaceSet {
    /// Build from the spec; duplicates and missing paths name their entry.
    pub fn from_spec(spec: &Spec) -> Result<Self> {
        let mut entries: Vec<NamespaceEntry> = Vec::new();
        let list = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
        for (i, ns) in list.into_iter().flatten().enumerate() {
            if entries.iter().any(|e| e.typ == ns.typ()) {
                return Err(Error::spec(
                    format!("linux.namespaces[{i}].type"),
                    format!("duplicate namespace {}", proc_name(ns.typ())),
                ));
            }
            let path = ns.path().clone().filter(|p| !p.as_os_str().is_empty());
            if let Some(p) = &path {
                if let Err(e) = std::fs::metadata(p) {
                    let why = if e.kind() == std::io::ErrorKind::NotFound {
                        "does not exist".to_string()
                    } else {
                        e.to_string()
                    };
                    return Err(Error::spec(
                        format!("linux.namespaces[{i}].path"),
                        format!("{}: {why}", p.display()),
                    ));
                }
            }
            entries.push(NamespaceEntry {
                typ: ns.typ(),
                path,
            });
        }
        Ok(Self { entries })
    }

    fn get(&self, typ: LinuxNamespaceType) -> Option<&NamespaceEntry> {
        self.entries.iter().find(|e| e.typ == typ)
    }

    /// Whether a new namespace of this type is created.
    pub fn creates(&self, typ: LinuxNamespaceType) -> bool {
        self.get(typ).is_some_and(|e| e.path.is_none())
    }

    /// Whether the container gets a namespace of this type other than the
    /// runtime's own.
    pub fn creates_or_joins(&self, typ: LinuxNamespaceType) -> bool {
        self.get(typ).is_some()
    }

    /// Join the user namespace by path if one is given.
    pub fn join_user(&self) -> Result<()> {
        if let Some(NamespaceEntry { path: Some(p), .. }) = self.get(LinuxNamespaceType::User) {
            join_path(p, LinuxNamespaceType::User)?;
        }
        Ok(())
    }

    /// Join the other namespaces given by path, then create the new ones
    /// (except user, which the caller creates separately to write its maps).
    pub fn enter_non_user(&self) -> Result<()> {
        for typ in JOIN_ORDER.iter().skip(1) {
            if let Some(NamespaceEntry { path: Some(p), .. }) = self.get(*typ) {
                join_path(p, *typ)?;
            }
        }
        let mut flags = CloneFlags::empty();
        for e in &self.entries {
            if e.path.is_none() && e.typ != LinuxNamespaceType::User {
                flags |= clone_flag(e.typ);
            }
        }
        if !flags.is_empty() {
            nix::sched::unshare(flags).at("unshare namespaces", format!("{flags:?}"))?;
        }
        Ok(())
    }
}

/// `setns` into the namespace file at `path`.
pub fn join_path(path: &std::path::Path, typ: LinuxNamespaceType) -> Result<()> {
    let file = std::fs::File::open(path).at("open namespace", path)?;
    nix::sched::setns(file.as_fd(), clone_flag(typ)).at("setns", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_paths_and_new_namespaces_are_told_apart() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/self/ns/net"}]}}"#,
        )
        .unwrap();
        let set = NamespaceSet::from_spec(&spec).unwrap();
        assert!(set.creates(LinuxNamespaceType::Pid));
        assert!(!set.creates(LinuxNamespaceType::Network));
        assert!(set.creates_or_joins(LinuxNamespaceType::Network));
        assert!(!set.creates_or_joins(LinuxNamespaceType::Uts));
    }

    #[test]
    fn missing_namespace_path_is_rejected_naming_the_entry() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"ipc","path":"/nonexistent/ns"}]}}"#,
        )
        .unwrap();
        let e = NamespaceSet::from_spec(&spec).unwrap_err().to_string();
        assert!(e.contains("linux.namespaces[0].path"), "{e}");
    }
}
