//! The bundle's OCI spec as the shim reads it (pod grouping, VM size
//! annotations, hostname) and as it rewrites it for the guest: hooks are
//! host programs and are dropped (containerd runs none for shim v2
//! runtimes); namespace paths name host namespaces, so the pod's sandbox
//! container creates fresh ones in the guest and every other container
//! joins the sandbox container's (CRI's model, which the agent resolves);
//! a spec without its own network, PID or IPC namespace (a pod on the
//! host's) is refused, as is Bidirectional mount propagation: a VM cannot
//! share the host's namespaces, nor make a mount on the host. Bind-mount
//! sources are handed to the share (which bind-mounts them into the
//! container's directory there) and renamed to their share-relative paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use husk_protocols::pod::SANDBOX_NAMESPACE;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

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

/// The network namespace CNI made for the pod, named by the sandbox
/// container's spec (`linux.namespaces[network].path`); `None` for other
/// containers and for pods without one (`ctr run`: loopback only).
pub fn pod_netns(container_id: &str, spec: &Spec) -> Option<PathBuf> {
    if sandbox_id_of(container_id, spec) != container_id {
        return None;
    }
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|path| !path.as_os_str().is_empty())
}

/// The namespaces a pod cannot take from the host, with the words a
/// refusal uses: the CRI option and why a VM cannot give it.
const OWN_NAMESPACES: [(LinuxNamespaceType, &str, &str); 3] = [
    (
        LinuxNamespaceType::Network,
        "host network (hostNetwork; CRI NamespaceMode NODE for network)",
        "a husk pod runs in its own VM, whose kernel has its own network stack",
    ),
    (
        LinuxNamespaceType::Pid,
        "host PID (hostPID; CRI NamespaceMode NODE for pid)",
        "the host's processes are outside the pod's VM and cannot be seen from it",
    ),
    (
        LinuxNamespaceType::Ipc,
        "host IPC (hostIPC; CRI NamespaceMode NODE for ipc)",
        "the host's shared memory and message queues are outside the pod's VM",
    ),
];

/// Rewrites `spec` of container `container_id` for the guest;
/// `share_bind` puts the host path of bind mount `index` into the share
/// (read-only when the mount says `ro`) and returns its share-relative
/// path.
pub fn for_guest(
    container_id: &str,
    mut spec: Spec,
    mut share_bind: impl FnMut(usize, &Path, bool) -> Result<String>,
) -> Result<Spec> {
    spec.set_hooks(None);
    let is_sandbox = sandbox_id_of(container_id, &spec) == container_id;
    if let Some(linux) = spec.linux_mut() {
        let namespaces = linux.namespaces().clone().unwrap_or_default();
        for (typ, option, why) in OWN_NAMESPACES {
            if !namespaces.iter().any(|ns| ns.typ() == typ) {
                bail!(
                    "the pod asks for the {option}, which husk refuses: {why}; \
                     run such pods with a runc RuntimeClass"
                );
            }
        }
        let in_guest = namespaces
            .into_iter()
            .map(|mut ns| {
                let joins = ns
                    .path()
                    .as_ref()
                    .is_some_and(|p| !p.as_os_str().is_empty());
                // The sandbox container's network path is the CNI netns on
                // the host: in the guest it makes the pod's own.
                let path = (joins && !is_sandbox).then(|| PathBuf::from(SANDBOX_NAMESPACE));
                ns.set_path(path);
                ns
            })
            .collect();
        linux.set_namespaces(Some(in_guest));
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
        if mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "rshared" || o == "shared")
        {
            bail!(
                "mount {} asks for Bidirectional (rshared) propagation, which husk refuses: \
                 a mount made inside the pod's VM cannot appear on the host; \
                 HostToContainer (rslave) propagation works",
                mount.destination().display()
            );
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
                "linux":{"namespaces":[{"type":"network","path":"/proc/1/ns/net"},{"type":"pid"},{"type":"ipc"}]},
                "mounts":[{"destination":"/proc","type":"proc","source":"proc"},
                          {"destination":"/data","type":"bind","source":"/host/volume","options":["rbind"]},
                          {"destination":"/etc/hosts","type":"bind","source":"/host/hosts","options":["bind","ro"]}]}"#,
        );
        let mut shared = Vec::new();
        let guest = for_guest("c1", original, |index, source, read_only| {
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
    fn a_pod_member_joins_the_sandbox_containers_namespaces() {
        let member = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"pod9"},
                "linux":{"namespaces":[{"type":"network","path":"/var/run/netns/cni-1"},
                                       {"type":"pid"},{"type":"ipc","path":"/proc/7/ns/ipc"}]}}"#,
        );
        let guest = for_guest("c1", member, |_, _, _| unreachable!()).unwrap();
        let paths: Vec<Option<PathBuf>> = guest
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .iter()
            .flatten()
            .map(|ns| ns.path().clone())
            .collect();
        let pod = Some(PathBuf::from(SANDBOX_NAMESPACE));
        assert_eq!(paths, vec![pod.clone(), None, pod]);
    }

    #[test]
    fn host_namespaces_are_refused_naming_the_option() {
        for (missing, option) in [
            ("network", "host network"),
            ("pid", "host PID"),
            ("ipc", "host IPC"),
        ] {
            let namespaces: Vec<String> = ["network", "pid", "ipc", "uts", "mount"]
                .iter()
                .filter(|typ| **typ != missing)
                .map(|typ| format!(r#"{{"type":"{typ}"}}"#))
                .collect();
            let on_host = spec(&format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
                    "linux":{{"namespaces":[{}]}}}}"#,
                namespaces.join(",")
            ));
            let error = for_guest("c1", on_host, |_, _, _| unreachable!()).unwrap_err();
            assert!(format!("{error}").contains(option), "{error}");
        }
    }

    #[test]
    fn bidirectional_propagation_is_refused_naming_the_mount() {
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "linux":{"namespaces":[{"type":"network"},{"type":"pid"},{"type":"ipc"}]},
                "mounts":[{"destination":"/vol","type":"bind","source":"/srv/vol","options":["rbind","rshared"]}]}"#,
        );
        let error = for_guest("c1", original, |_, _, _| Ok("x".into())).unwrap_err();
        let message = format!("{error}");
        assert!(
            message.contains("/vol") && message.contains("Bidirectional"),
            "{message}"
        );
    }

    #[test]
    fn a_bind_the_share_refuses_is_named_with_its_destination() {
        let original = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "linux":{"namespaces":[{"type":"network"},{"type":"pid"},{"type":"ipc"}]},
                "mounts":[{"destination":"/zero","type":"bind","source":"/dev/zero","options":["bind"]}]}"#,
        );
        let error = for_guest("c1", original, |_, _, _| Err(anyhow!("not shareable"))).unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("/dev/zero")
                && message.contains("/zero")
                && message.contains("not shareable"),
            "{message}"
        );
    }
}
