//! The bundle's OCI spec as the shim reads it (pod grouping, VM size
//! annotations, hostname) and as it rewrites it for the guest: hooks are
//! host programs and are dropped (containerd runs none for shim v2
//! runtimes), namespace paths name host namespaces and are dropped (the
//! guest creates fresh ones), and bind-mount sources are handed to the
//! share (which bind-mounts them into the container's directory there) and
//! renamed to their share-relative paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use oci_spec::runtime::Spec;

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

/// Rewrites `spec` for the guest; `share_bind` puts the host path of bind
/// mount `index` into the share (read-only when the mount says `ro`) and
/// returns its share-relative path.
pub fn for_guest(
    mut spec: Spec,
    mut share_bind: impl FnMut(usize, &Path, bool) -> Result<String>,
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
        let read_only = mount.options().iter().flatten().any(|o| o == "ro");
        let relative = share_bind(index, &source, read_only).with_context(|| {
            format!(
                "cannot share bind mount source {} (for {}) with the guest",
                source.display(),
                mount.destination().display()
            )
        })?;
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
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "hooks":{"prestart":[{"path":"/bin/true"}]},
                "linux":{"namespaces":[{"type":"network","path":"/proc/1/ns/net"},{"type":"pid"}]},
                "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                          {"destination":"/data","type":"bind","source":"/host/volume","options":["rbind"]},
                          {"destination":"/etc/hosts","type":"bind","source":"/host/hosts","options":["bind","ro"]}]}"#,
        );
        let mut shared = Vec::new();
        let guest = for_guest(original, |index, source, read_only| {
            shared.push((index, source.to_owned(), read_only));
            Ok(format!("c1/shared/{index}"))
        })
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
            Some(Path::new("c1/shared/1"))
        );
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("c1/shared/2"))
        );
        assert_eq!(
            shared,
            vec![
                (1, PathBuf::from("/host/volume"), false),
                (2, PathBuf::from("/host/hosts"), true)
            ]
        );
    }

    #[test]
    fn a_bind_the_share_refuses_is_named_with_its_destination() {
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "mounts":[{"destination":"/zero","type":"bind","source":"/dev/zero","options":["bind"]}]}"#,
        );
        let error = for_guest(original, |_, _, _| Err(anyhow!("not shareable"))).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("/dev/zero")
                && message.contains("/zero")
                && message.contains("not shareable"),
            "{message}"
        );
    }
}
