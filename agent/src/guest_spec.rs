//! Adjusting a container's OCI spec for the guest: the rootfs becomes the
//! confined path under the share, the cgroup goes under the sandbox's, bind
//! mount sources must stay inside the share, and guest-side hooks are
//! refused (the host cannot name programs for PID 1 to run).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Root, Spec};

use crate::error::{AgentError, Result};
use crate::validate;

/// The cgroup of a container, relative to the agent's own cgroup.
pub fn cgroup_path(sandbox_id: &str, container_id: &str) -> PathBuf {
    PathBuf::from(format!("husk-{sandbox_id}")).join(container_id)
}

/// Parses the host's spec and rewrites it for the guest.
pub fn for_guest(
    spec_json: &[u8],
    share: &Path,
    rootfs_path: &str,
    cgroups_path: PathBuf,
    terminal: bool,
) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_slice(spec_json)
        .map_err(|e| AgentError::InvalidRequest(format!("OCI spec: {e}")))?;
    let rootfs = validate::path_in_share(share, rootfs_path)?;
    let readonly = spec.root().as_ref().and_then(|r| r.readonly());
    let mut root = Root::default();
    root.set_path(rootfs).set_readonly(readonly);
    spec.set_root(Some(root));
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| AgentError::InvalidRequest("OCI spec has no process".into()))?;
    if process.terminal().unwrap_or(false) != terminal {
        return Err(AgentError::InvalidRequest(format!(
            "process.terminal is {} but the stdio streams say terminal={terminal}",
            process.terminal().unwrap_or(false)
        )));
    }
    if spec.hooks().is_some() {
        return Err(AgentError::InvalidRequest(
            "OCI hooks cannot run in the guest".into(),
        ));
    }
    if let Some(mounts) = spec.mounts().clone() {
        let mut confined = Vec::with_capacity(mounts.len());
        for mut mount in mounts {
            let is_bind = mount.typ().as_deref() == Some("bind")
                || mount
                    .options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            if is_bind {
                let source = mount.source().clone().unwrap_or_default();
                let source = source.to_string_lossy();
                let relative = source
                    .strip_prefix(&*share.to_string_lossy())
                    .map_or(source.as_ref(), |rest| rest.trim_start_matches('/'));
                mount.set_source(Some(validate::path_in_share(share, relative)?));
            }
            confined.push(mount);
        }
        spec.set_mounts(Some(confined));
    }
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    linux.set_cgroups_path(Some(cgroups_path));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json(extra_mount: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"/host/rootfs"}},
               "process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
               "mounts":[{extra_mount}],"linux":{{}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn rootfs_and_cgroup_are_rewritten_into_the_share_and_sandbox() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        let spec = for_guest(
            &spec_json(r#"{"destination":"/proc","type":"proc","source":"proc"}"#),
            share.path(),
            "c1/rootfs",
            cgroup_path("s1", "c1"),
            false,
        )
        .unwrap();
        let root = spec.root().as_ref().unwrap().path().clone();
        assert_eq!(root, share.path().canonicalize().unwrap().join("c1/rootfs"));
        let cgroup = spec.linux().as_ref().unwrap().cgroups_path().clone();
        assert_eq!(cgroup, Some(PathBuf::from("husk-s1/c1")));
    }

    #[test]
    fn bind_mounts_from_outside_the_share_are_refused() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        let result = for_guest(
            &spec_json(r#"{"destination":"/x","type":"bind","source":"/etc","options":["rbind"]}"#),
            share.path(),
            "c1/rootfs",
            cgroup_path("s1", "c1"),
            false,
        );
        assert!(
            matches!(result, Err(AgentError::PathEscapesShare { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn a_terminal_mismatch_between_spec_and_streams_is_refused() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(share.path().join("c1/rootfs")).unwrap();
        let result = for_guest(
            &spec_json(""),
            share.path(),
            "c1/rootfs",
            cgroup_path("s", "c1"),
            true,
        );
        assert!(
            matches!(result, Err(AgentError::InvalidRequest(_))),
            "{result:?}"
        );
    }
}
