//! The bundle's OCI spec as the shim reads it (pod grouping, VM size
//! annotations, hostname) and as it rewrites it for the guest: hooks are
//! host programs and are dropped (containerd runs none for shim v2
//! runtimes), namespace paths name host namespaces and are dropped (the
//! guest creates fresh ones), and bind-mount sources are made visible in
//! the share (directories bind-mounted as the container's volumes, files
//! copied) and renamed to their share-relative paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use oci_spec::runtime::Spec;

use crate::paths::{SandboxPaths, SHARED_FILES_DIR};

/// The pod a CRI container belongs to.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// "sandbox" for a pod's pause container, "container" otherwise.
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Reads `<bundle>/config.json`.
pub fn read_bundle_spec(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .with_context(|| format!("cannot read the OCI spec {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a valid OCI runtime spec", path.display()))
}

/// The spec's annotations (empty if none).
pub fn annotations(spec: &Spec) -> HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

/// The sandbox (pod) a container belongs to: its CRI sandbox id, else the
/// container itself (one pod per `ctr run`).
pub fn sandbox_id_of(container_id: &str, spec: &Spec) -> String {
    annotations(spec)
        .get(ANNOTATION_SANDBOX_ID)
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_owned())
}

/// Host-side things made for a container's bind mounts that the share does
/// not remove with the container, to undo at delete.
#[derive(Debug, Default)]
pub struct SharedMounts {
    /// Directory of copied files, if any.
    pub files_dir: Option<PathBuf>,
}

/// Rewrites `spec` for the guest; `share_volume` adds the host directory of
/// mount `index` to the share (read-only when the mount says `ro`) and
/// returns its share-relative path.
pub fn for_guest(
    mut spec: Spec,
    container_id: &str,
    paths: &SandboxPaths,
    mut share_volume: impl FnMut(usize, &Path, bool) -> Result<String>,
    shared: &mut SharedMounts,
) -> Result<Spec> {
    spec.set_hooks(None);
    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces().clone() {
            let fresh = namespaces
                .into_iter()
                .map(|mut ns| {
                    ns.set_path(None);
                    ns
                })
                .collect();
            linux.set_namespaces(Some(fresh));
        }
    }
    let Some(mounts) = spec.mounts().clone() else {
        return Ok(spec);
    };
    let mut rewritten = Vec::with_capacity(mounts.len());
    for (index, mut mount) in mounts.into_iter().enumerate() {
        let is_bind = mount.typ().as_deref() == Some("bind")
            || mount
                .options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            rewritten.push(mount);
            continue;
        }
        let source = mount.source().clone().ok_or_else(|| {
            anyhow!(
                "mount {} is a bind mount without a source",
                mount.destination().display()
            )
        })?;
        let metadata = std::fs::metadata(&source).with_context(|| {
            format!(
                "bind mount source {} (for {}) is not accessible",
                source.display(),
                mount.destination().display()
            )
        })?;
        if !metadata.is_dir() && !metadata.is_file() {
            return Err(anyhow!(
                "bind mount source {} (for {}) is neither a directory nor a regular file; \
                 device nodes, FIFOs and sockets cannot be shared into a VM",
                source.display(),
                mount.destination().display()
            ));
        }
        let read_only = mount.options().iter().flatten().any(|o| o == "ro");
        let relative = if metadata.is_dir() {
            share_volume(index, &source, read_only)?
        } else {
            let dir = paths.shared_files(container_id);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            shared.files_dir = Some(dir.clone());
            let copy = dir.join(index.to_string());
            std::fs::copy(&source, &copy).with_context(|| {
                format!(
                    "cannot copy bind mount source {} into the share",
                    source.display()
                )
            })?;
            format!("{SHARED_FILES_DIR}/{container_id}/{index}")
        };
        mount.set_source(Some(PathBuf::from(relative)));
        rewritten.push(mount);
    }
    spec.set_mounts(Some(rewritten));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_sandbox_is_the_cri_pod_or_the_container_itself() {
        let plain = spec(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        assert_eq!(sandbox_id_of("c1", &plain), "c1");
        let cri = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"pod9"}}"#,
        );
        assert_eq!(sandbox_id_of("c1", &cri), "pod9");
    }

    #[test]
    fn hooks_and_namespace_paths_are_dropped_and_binds_move_into_the_share() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(root.path(), "pod");
        let host_dir = root.path().join("volume");
        std::fs::create_dir_all(&host_dir).unwrap();
        let host_file = root.path().join("hosts");
        std::fs::write(&host_file, "127.0.0.1 localhost\n").unwrap();
        let original = spec(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
                "hooks":{{"prestart":[{{"path":"/bin/true"}}]}},
                "linux":{{"namespaces":[{{"type":"network","path":"/proc/1/ns/net"}},{{"type":"pid"}}]}},
                "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                          {{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}},
                          {{"destination":"/etc/hosts","type":"bind","source":"{}","options":["bind","ro"]}}]}}"#,
            host_dir.display(),
            host_file.display()
        ));
        let mut shared = SharedMounts::default();
        let mut added = Vec::new();
        let guest = for_guest(
            original,
            "c1",
            &paths,
            |index, source, read_only| {
                assert!(!read_only, "the /data volume is read-write");
                added.push((index, source.to_owned()));
                Ok(format!("c1/volumes/{index}"))
            },
            &mut shared,
        )
        .unwrap();
        assert!(guest.hooks().is_none());
        let namespaces = guest
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert!(namespaces.iter().all(|ns| ns.path().is_none()));
        let mounts = guest.mounts().clone().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("c1/volumes/1"))
        );
        assert_eq!(added, vec![(1, host_dir)]);
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new(".files/c1/2"))
        );
        let copied = std::fs::read_to_string(paths.shared_files("c1").join("2")).unwrap();
        assert_eq!(copied, "127.0.0.1 localhost\n");
        assert_eq!(shared.files_dir, Some(paths.shared_files("c1")));
    }

    #[test]
    fn a_non_regular_bind_source_is_refused_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(root.path(), "pod");
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "mounts":[{"destination":"/zero","type":"bind","source":"/dev/zero","options":["bind"]}]}"#,
        );
        let error = for_guest(
            original,
            "c1",
            &paths,
            |_, _, _| unreachable!(),
            &mut Default::default(),
        )
        .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("/dev/zero")
                && message.contains("neither a directory nor a regular file"),
            "{message}"
        );
        assert!(!paths.shared_files("c1").exists(), "nothing was copied");
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(root.path(), "pod");
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "mounts":[{"destination":"/data","type":"bind","source":"/no/such/dir","options":["rbind"]}]}"#,
        );
        let error = for_guest(
            original,
            "c1",
            &paths,
            |_, _, _| unreachable!(),
            &mut Default::default(),
        )
        .unwrap_err();
        assert!(format!("{error:#}").contains("/no/such/dir"), "{error:#}");
    }
}
