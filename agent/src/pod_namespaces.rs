//! A pod member's namespaces: the shim marks each namespace a container
//! joins with [`SANDBOX_NAMESPACE`] (its host path meant the pause
//! container's), and this resolves the mark to the namespace of the same
//! type of the pod's sandbox container in the guest, as
//! `/proc/<its init pid>/ns/<type>`. Any other path is refused: a host
//! path means nothing in the guest.

use std::path::PathBuf;

use husk_protocols::pod::SANDBOX_NAMESPACE;
use husk_runtime::namespaces::proc_name;
use oci_spec::runtime::Spec;

use crate::error::{AgentError, Result};

/// The pod's sandbox container as a member sees it: its id and, while it
/// runs, its init's pid.
pub struct SandboxContainer<'a> {
    pub id: &'a str,
    pub running_pid: Option<i32>,
}

/// Rewrites the marked namespace paths of container `container_id`'s
/// `spec`; `sandbox` is the pod's sandbox container, if it was created.
pub fn resolve(
    spec: &mut Spec,
    container_id: &str,
    sandbox: Option<SandboxContainer<'_>>,
) -> Result<()> {
    let Some(linux) = spec.linux_mut() else {
        return Ok(());
    };
    let Some(mut namespaces) = linux.namespaces().clone() else {
        return Ok(());
    };
    for (index, ns) in namespaces.iter_mut().enumerate() {
        let Some(path) = ns.path().clone().filter(|p| !p.as_os_str().is_empty()) else {
            continue;
        };
        if path.as_os_str() != SANDBOX_NAMESPACE {
            return Err(AgentError::InvalidRequest(format!(
                "linux.namespaces[{index}].path {}: only the pod's sandbox namespaces \
                 ({SANDBOX_NAMESPACE}) can be joined in the guest",
                path.display()
            )));
        }
        let name = proc_name(ns.typ());
        let pid = match &sandbox {
            Some(sandbox) if sandbox.id == container_id => {
                return Err(AgentError::InvalidRequest(format!(
                    "the pod's sandbox container {container_id} cannot join its own {name} namespace"
                )))
            }
            Some(SandboxContainer {
                running_pid: Some(pid),
                ..
            }) => *pid,
            Some(SandboxContainer { id, .. }) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {container_id} joins the pod's {name} namespace, but the pod's \
                     sandbox container {id} is not running"
                )))
            }
            None => {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {container_id} joins the pod's {name} namespace, but the pod has \
                     no sandbox container yet"
                )))
            }
        };
        ns.set_path(Some(PathBuf::from(format!("/proc/{pid}/ns/{name}"))));
    }
    linux.set_namespaces(Some(namespaces));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member_spec() -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[
                {{"type":"pid","path":"{SANDBOX_NAMESPACE}"}},{{"type":"mount"}},
                {{"type":"ipc","path":"{SANDBOX_NAMESPACE}"}}]}}}}"#
        ))
        .unwrap()
    }

    fn paths(spec: &Spec) -> Vec<Option<String>> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .iter()
            .flatten()
            .map(|ns| ns.path().as_ref().map(|p| p.display().to_string()))
            .collect()
    }

    #[test]
    fn marks_become_the_running_sandbox_containers_namespaces() {
        let mut spec = member_spec();
        let sandbox = SandboxContainer {
            id: "pod",
            running_pid: Some(41),
        };
        resolve(&mut spec, "c1", Some(sandbox)).unwrap();
        assert_eq!(
            paths(&spec),
            vec![
                Some("/proc/41/ns/pid".into()),
                None,
                Some("/proc/41/ns/ipc".into())
            ]
        );
    }

    #[test]
    fn without_a_running_sandbox_container_the_member_is_refused() {
        let stopped = SandboxContainer {
            id: "pod",
            running_pid: None,
        };
        let error = resolve(&mut member_spec(), "c1", Some(stopped)).unwrap_err();
        assert!(error.to_string().contains("not running"), "{error}");
        let error = resolve(&mut member_spec(), "c1", None).unwrap_err();
        assert!(
            error.to_string().contains("no sandbox container"),
            "{error}"
        );
    }

    #[test]
    fn other_paths_are_refused_naming_the_entry() {
        let mut spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network","path":"/proc/1/ns/net"}]}}"#,
        )
        .unwrap();
        let error = resolve(&mut spec, "c1", None).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("linux.namespaces[0].path /proc/1/ns/net"),
            "{error}"
        );
    }
}
