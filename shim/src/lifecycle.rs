//! The shim binary's lifecycle actions (containerd's shim v2 protocol):
//!
//! - `start`: prints the pod's shim address. A container of an existing
//!   pod (CRI annotation `io.kubernetes.cri.sandbox-id`) gets the address of
//!   the pod's running shim and no new process; otherwise a server process
//!   is spawned, one per pod. Either way `address` is written to the bundle.
//! - serve (no action): the ttrpc task service until `Shutdown`.
//! - `delete`: cleanup after a shim that is gone: the VM, mounts, sockets
//!   and share directory; answers with the exit status containerd records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error as ShimError, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use crate::ids;
use crate::logging;
use crate::paths::SandboxPaths;
use crate::pod::process::Exit;
use crate::resources::{cleanup, rootfs};
use crate::spec;
use crate::task::TaskService;

/// The file in the bundle containerd reads the shim's address from.
const ADDRESS_FILE: &str = "address";
/// Exit status reported for a task whose shim died (SIGKILL).
const SHIM_GONE_EXIT_STATUS: u32 = 137;

/// The shim process.
pub struct HuskShim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    /// containerd's address (the shim socket's name derives from it).
    containerd_address: String,
    bundle: PathBuf,
}

/// Options for `containerd_shim::asynchronous::run`: our own logger, and
/// no implicit reaping (the shim reaps the processes it starts itself, and a
/// global `waitpid(-1)` would steal QEMU's exit status).
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_setup_logger: true,
        default_log_level: "info".to_owned(),
        no_reaper: true,
        no_sub_reaper: true,
    }
}

fn bundle_of(flags: &Flags) -> PathBuf {
    if flags.bundle.is_empty() {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    } else {
        PathBuf::from(&flags.bundle)
    }
}

/// The pod a container belongs to, from its bundle (itself if the bundle
/// is unreadable); `None` if the id found is not a valid identifier, so it
/// is never used as a path or a socket name.
fn sandbox_id_for(container_id: &str, bundle: &Path) -> Option<String> {
    let id = match spec::read_bundle_spec(bundle) {
        Ok(spec) => spec::sandbox_id_of(container_id, &spec),
        Err(_) => container_id.to_owned(),
    };
    match ids::validate("sandbox id", &id) {
        Ok(()) => Some(id),
        Err(error) => {
            tracing::error!(%error, container_id, "refusing the bundle's sandbox id");
            None
        }
    }
}

fn invalid_sandbox_id(container_id: &str) -> ShimError {
    ShimError::InvalidArgument(format!(
        "the bundle of container {container_id} names an invalid sandbox id (annotation {})",
        spec::ANNOTATION_SANDBOX_ID
    ))
}

fn write_address(bundle: &Path, address: &str) -> Result<(), ShimError> {
    std::fs::write(bundle.join(ADDRESS_FILE), address).map_err(|err| ShimError::IoError {
        context: format!("cannot write {}", bundle.join(ADDRESS_FILE).display()),
        err,
    })
}

fn socket_is_served(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[async_trait]
impl Shim for HuskShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        match args.action.as_str() {
            "" => logging::init_server(args.debug),
            // containerd reads `start`'s stdout and stderr together as the
            // address: nothing else may be written there.
            "start" => {}
            _ => logging::init_stderr(args.debug),
        }
        HuskShim {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            containerd_address: args.address.clone(),
            bundle: bundle_of(args),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        let grouping =
            sandbox_id_for(&opts.id, &self.bundle).ok_or_else(|| invalid_sandbox_id(&opts.id))?;
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        if grouping != opts.id && socket_is_served(&address) {
            tracing::info!(container_id = %opts.id, sandbox_id = %grouping, "joining the pod's running shim");
            write_address(&self.bundle, &address)?;
            return Ok(address);
        }
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_address(&self.bundle, &address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let sandbox_id =
            sandbox_id_for(&self.id, &self.bundle).ok_or_else(|| invalid_sandbox_id(&self.id))?;
        tracing::info!(
            namespace = %self.namespace,
            sandbox_id = %sandbox_id,
            container_id = %self.id,
            "cleaning up after a shim that is gone"
        );
        let paths = SandboxPaths::new(&sandbox_id);
        if sandbox_id == self.id {
            cleanup::remove_sandbox_dir(&paths);
            self.remove_dead_shim_socket(&sandbox_id);
        } else {
            remove_container_from_share(&paths, &self.id);
        }
        rootfs::unmount_rootfs(&self.bundle);
        let exit = Exit::now(SHIM_GONE_EXIT_STATUS);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        TaskService::new(&self.namespace, &self.id, publisher, self.exit.clone())
    }
}

impl HuskShim {
    /// The socket of the pod's shim, if that shim is gone (a killed shim
    /// cannot remove it itself).
    fn remove_dead_shim_socket(&self, sandbox_id: &str) {
        if self.containerd_address.is_empty() {
            return;
        }
        let address =
            containerd_shim::socket_address(&self.containerd_address, &self.namespace, sandbox_id);
        let path = Path::new(address.strip_prefix("unix://").unwrap_or(&address));
        let is_socket = std::fs::symlink_metadata(path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false);
        if is_socket && !socket_is_served(&address) {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(socket = %path.display(), "removed the dead shim's socket")
                }
                Err(error) => {
                    tracing::warn!(%error, socket = %path.display(), "cannot remove the dead shim's socket")
                }
            }
        }
    }
}

/// Removes one container's entries from a pod's share: its directory
/// `<id>` on the share's host side (rootfs, volumes and files, unmounted
/// first; the read-only view follows by propagation). Exact names only:
/// deleting `web` never touches `web.mysql`.
fn remove_container_from_share(paths: &SandboxPaths, container_id: &str) {
    if let Err(error) = ids::validate("container id", container_id) {
        tracing::warn!(%error, "not cleaning the share for an invalid container id");
        return;
    }
    cleanup::unmount_and_remove(&paths.share_host_side().join(container_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_a_container_leaves_the_share_entries_of_a_similarly_named_one() {
        let root = tempfile::tempdir().unwrap();
        let paths = SandboxPaths::under(&root.path().join("sandboxes"), "pod");
        let host_side = paths.share_host_side();
        for id in ["web", "web.mysql", "web.m0"] {
            std::fs::create_dir_all(host_side.join(id).join("rootfs")).unwrap();
            std::fs::create_dir_all(host_side.join(id).join("files")).unwrap();
        }
        std::fs::create_dir_all(host_side.join("web/volumes/0")).unwrap();
        remove_container_from_share(&paths, "web");
        assert!(!host_side.join("web").exists());
        for id in ["web.mysql", "web.m0"] {
            assert!(
                host_side.join(id).join("rootfs").is_dir(),
                "{id} lost its rootfs"
            );
            assert!(
                host_side.join(id).join("files").is_dir(),
                "{id} lost its files"
            );
        }
    }

    #[test]
    fn an_invalid_sandbox_id_in_a_bundle_is_never_used_as_a_path() {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "annotations":{"io.kubernetes.cri.sandbox-id":"/"}}"#,
        )
        .unwrap();
        assert_eq!(sandbox_id_for("c1", bundle.path()), None);
    }
}
