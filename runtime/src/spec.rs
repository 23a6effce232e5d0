//! Loading and validating a bundle's `config.json`.
//!
//! Parsing goes through `serde_path_to_error`, so a malformed document, an
//! unknown namespace type or an unknown capability name is reported with the
//! JSON path of the offending field (`linux.namespaces[2].type`). After
//! parsing, [`validate`] checks what the types cannot express: a rootfs that
//! exists, absolute paths, namespace consistency, syscall names that exist,
//! and mount destinations that stay inside the rootfs.

use crate::capabilities::CapabilityMasks;
use crate::error::{Error, Result};
use crate::namespaces::NamespaceSet;
use crate::rootfs::path::{lexically_escapes, resolve_in_root};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Parse `config.json` text; errors name the JSON path that failed.
pub fn parse(text: &str) -> Result<Spec> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Spec>(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(document)".to_string()
        } else {
            field
        };
        Error::spec(field, e.inner().to_string())
    })
}

/// Read and parse `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        op: "read",
        path: path.clone(),
        source,
    })?;
    parse(&text)
}

/// The absolute rootfs path of `spec` in `bundle`.
pub fn rootfs_path(spec: &Spec, bundle: &Path) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::spec("root", "missing"))?;
    let p = root.path();
    Ok(if p.is_absolute() {
        p.clone()
    } else {
        bundle.join(p)
    })
}

/// Check everything a container needs before any process or mount exists.
pub fn validate(spec: &Spec, bundle: &Path) -> Result<()> {
    let rootfs = rootfs_path(spec, bundle)?;
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::spec(
                "root.path",
                format!("{} is not a directory", rootfs.display()),
            ))
        }
        Err(e) => {
            return Err(Error::spec(
                "root.path",
                format!("{}: {e}", rootfs.display()),
            ))
        }
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::spec("process", "missing"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::spec("process.args", "must name a program to run"));
    }
    if !process.cwd().is_absolute() {
        return Err(Error::spec("process.cwd", "must be an absolute path"));
    }
    CapabilityMasks::from_spec(process.capabilities().as_ref())?;
    let mut seen_rlimits = HashSet::new();
    for (i, r) in process.rlimits().iter().flatten().enumerate() {
        if !seen_rlimits.insert(format!("{:?}", r.typ())) {
            return Err(Error::spec(
                format!("process.rlimits[{i}].type"),
                "duplicate rlimit",
            ));
        }
        if r.soft() > r.hard() {
            return Err(Error::spec(
                format!("process.rlimits[{i}]"),
                "soft limit above hard limit",
            ));
        }
    }
    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| Error::spec("linux", "missing"))?;
    let namespaces = NamespaceSet::from_spec(spec)?;
    if spec.hostname().as_ref().is_some_and(|h| !h.is_empty())
        && !namespaces.creates_or_joins(LinuxNamespaceType::Uts)
    {
        return Err(Error::spec(
            "hostname",
            "setting the hostname needs a uts namespace",
        ));
    }
    if spec.domainname().as_ref().is_some_and(|h| !h.is_empty())
        && !namespaces.creates_or_joins(LinuxNamespaceType::Uts)
    {
        return Err(Error::spec(
            "domainname",
            "setting the domainname needs a uts namespace",
        ));
    }
    let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty());
    if namespaces.creates(LinuxNamespaceType::User) && !has_maps {
        return Err(Error::spec(
            "linux.uidMappings",
            "a new user namespace needs uid and gid mappings",
        ));
    }
    if has_maps && !namespaces.creates_or_joins(LinuxNamespaceType::User) {
        return Err(Error::spec(
            "linux.uidMappings",
            "mappings given without a user namespace",
        ));
    }
    if let Some(seccomp) = linux.seccomp() {
        crate::seccomp::compile(seccomp)?;
    }
    for (i, mount) in spec.mounts().iter().flatten().enumerate() {
        let dest = mount.destination();
        let field = format!("mounts[{i}].destination");
        if !dest.is_absolute() {
            return Err(Error::spec(
                field,
                format!("{} is not absolute", dest.display()),
            ));
        }
        if lexically_escapes(dest) {
            return Err(Error::spec(
                field,
                format!("{} escapes the rootfs", dest.display()),
            ));
        }
        resolve_in_root(&rootfs, dest)
            .map_err(|e| Error::spec(field.clone(), format!("{}: {e}", dest.display())))?;
        if mount.typ().as_deref() == Some("bind")
            || mount
                .options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind")
        {
            let src = mount.source().as_ref().ok_or_else(|| {
                Error::spec(format!("mounts[{i}].source"), "bind mount without source")
            })?;
            let src = if src.is_absolute() {
                src.clone()
            } else {
                bundle.join(src)
            };
            if std::fs::symlink_metadata(&src).is_err() {
                return Err(Error::spec(
                    format!("mounts[{i}].source"),
                    format!("{} does not exist", src.display()),
                ));
            }
        }
    }
    for (i, p) in linux.masked_paths().iter().flatten().enumerate() {
        if !p.starts_with('/') {
            return Err(Error::spec(
                format!("linux.maskedPaths[{i}]"),
                format!("{p} is not absolute"),
            ));
        }
    }
    for (i, p) in linux.readonly_paths().iter().flatten().enumerate() {
        if !p.starts_with('/') {
            return Err(Error::spec(
                format!("linux.readonlyPaths[{i}]"),
                format!("{p} is not absolute"),
            ));
        }
    }
    if let Some(prop) = linux.rootfs_propagation() {
        if crate::rootfs::mounts::propagation_flag(prop).is_none() && !prop.is_empty() {
            return Err(Error::spec(
                "linux.rootfsPropagation",
                format!("unknown propagation {prop:?}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(extra_linux: &str, extra_top: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
            "process":{{"args":["/bin/true"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
            {extra_top}
            "linux":{{"namespaces":[{{"type":"mount"}},{{"type":"pid"}}]{extra_linux}}}}}"#
        )
    }

    fn bundle() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        dir
    }

    fn err_of(text: &str, bundle: &Path) -> String {
        match parse(text).and_then(|s| validate(&s, bundle)) {
            Ok(()) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_spec_is_accepted() {
        let b = bundle();
        validate(&parse(&minimal("", "")).unwrap(), b.path()).unwrap();
    }

    #[test]
    fn malformed_json_names_the_location() {
        let b = bundle();
        let e = err_of(
            r#"{"ociVersion": "1.0.2", "process": {"args": 5}}"#,
            b.path(),
        );
        assert!(e.contains("process.args"), "{e}");
        let e = err_of("{not json", b.path());
        assert!(e.contains("invalid config.json"), "{e}");
    }

    #[test]
    fn missing_rootfs_is_rejected_naming_root_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = err_of(&minimal("", ""), dir.path());
        assert!(e.contains("`root.path`"), "{e}");
    }

    #[test]
    fn unknown_namespace_is_rejected_naming_the_entry() {
        let b = bundle();
        let text = minimal("", "").replace(r#"{"type":"pid"}"#, r#"{"type":"bogus"}"#);
        let e = err_of(&text, b.path());
        assert!(e.contains("linux.namespaces[1].type"), "{e}");
    }

    #[test]
    fn invalid_capability_is_rejected_naming_the_set() {
        let b = bundle();
        let text = minimal("", "").replace(
            r#""cwd":"/""#,
            r#""cwd":"/","capabilities":{"bounding":["CAP_CHOWN","CAP_FLY"]}"#,
        );
        let e = err_of(&text, b.path());
        assert!(e.contains("process.capabilities.bounding"), "{e}");
    }

    #[test]
    fn unknown_seccomp_syscall_is_rejected_naming_it() {
        let b = bundle();
        let text = minimal(
            r#","seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","not_a_syscall"],"action":"SCMP_ACT_ERRNO"}]}"#,
            "",
        );
        let e = err_of(&text, b.path());
        assert!(
            e.contains("linux.seccomp.syscalls[0].names[1]") && e.contains("not_a_syscall"),
            "{e}"
        );
    }

    #[test]
    fn mount_destination_with_dotdot_escape_is_rejected() {
        let b = bundle();
        let text = minimal(
            "",
            r#""mounts":[{"destination":"/../../etc","type":"tmpfs","source":"tmpfs"}],"#,
        );
        let e = err_of(&text, b.path());
        assert!(
            e.contains("mounts[0].destination") && e.contains("escapes"),
            "{e}"
        );
    }

    #[test]
    fn mount_destination_through_escaping_symlink_is_rejected() {
        let b = bundle();
        std::os::unix::fs::symlink("../../../../../tmp", b.path().join("rootfs/out")).unwrap();
        let text = minimal(
            "",
            r#""mounts":[{"destination":"/out/x","type":"tmpfs","source":"tmpfs"}],"#,
        );
        let e = err_of(&text, b.path());
        assert!(
            e.contains("mounts[0].destination") && e.contains("symlink /out"),
            "{e}"
        );
    }

    #[test]
    fn hostname_without_uts_namespace_is_rejected() {
        let b = bundle();
        let e = err_of(&minimal("", r#""hostname":"box","#), b.path());
        assert!(e.contains("`hostname`"), "{e}");
    }

    #[test]
    fn user_namespace_without_mappings_is_rejected() {
        let b = bundle();
        let text = minimal("", "").replace(r#"{"type":"pid"}"#, r#"{"type":"user"}"#);
        let e = err_of(&text, b.path());
        assert!(e.contains("linux.uidMappings"), "{e}");
    }

    #[test]
    fn duplicate_namespace_is_rejected() {
        let b = bundle();
        let text = minimal("", "").replace(r#"{"type":"pid"}"#, r#"{"type":"mount"}"#);
        let e = err_of(&text, b.path());
        assert!(
            e.contains("linux.namespaces[1].type") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn relative_cwd_is_rejected() {
        let b = bundle();
        let e = err_of(
            &minimal("", "").replace(r#""cwd":"/""#, r#""cwd":"tmp""#),
            b.path(),
        );
        assert!(e.contains("process.cwd"), "{e}");
    }
}
