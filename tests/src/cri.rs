//! A CRI v1 client, as kubelet talks to containerd's CRI plugin: gRPC over
//! containerd's Unix socket, the generated types of the `k8s-cri` crate.
//! Calls are blocking (each runs on the client's own tokio runtime) so the
//! CRI tier's scenarios read like the e2e tier's, and each error names the
//! call that failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long one CRI call may take (a husk sandbox boots a TCG guest).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What every pod config as kubelet writes it holds: the metadata (the uid
/// made from `name`), `name` as the hostname, and the log directory.
pub fn pod_config(name: &str, namespace: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: namespace.to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_directory.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

/// A container config of `image` running `command`, logging to
/// `<name>.log` in the pod's log directory.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: command.iter().map(|arg| arg.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A connected CRI client.
pub struct CriClient {
    runtime: tokio::runtime::Runtime,
    service: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the CRI plugin on containerd's gRPC socket `socket`.
    pub fn connect(socket: &Path) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the CRI client's runtime")?;
        let path: PathBuf = socket.to_owned();
        let channel = runtime
            .block_on(async move {
                // The URI is required and ignored: the connector dials the socket.
                Endpoint::try_from("http://[::]:0")?
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .with_context(|| format!("cannot connect to CRI at {}", socket.display()))?;
        Ok(Self {
            runtime,
            service: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &self,
        what: &str,
        future: impl std::future::Future<
            Output = std::result::Result<tonic::Response<T>, tonic::Status>,
        >,
    ) -> Result<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await })
            .map_err(|_| anyhow::anyhow!("CRI {what}: no answer within {CALL_TIMEOUT:?}"))?
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                anyhow::anyhow!(
                    "CRI {what} failed: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })
    }

    /// The runtime's name and version (`Version`).
    pub fn version(&self) -> Result<VersionResponse> {
        let mut service = self.service.clone();
        self.call(
            "Version",
            service.version(VersionRequest {
                version: "v1".into(),
            }),
        )
    }

    /// Whether the CRI plugin knows `image`.
    pub fn has_image(&self, image: &str) -> Result<bool> {
        let mut images = self.images.clone();
        let status = self.call(
            "ImageStatus",
            images.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            }),
        )?;
        Ok(status.image.is_some())
    }

    /// `RunPodSandbox` of `config` with `handler`; the sandbox id.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> Result<String> {
        let mut service = self.service.clone();
        Ok(self
            .call(
                "RunPodSandbox",
                service.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler.into(),
                }),
            )?
            .pod_sandbox_id)
    }

    /// `PodSandboxStatus`.
    pub fn pod_status(&self, pod: &str) -> Result<PodSandboxStatus> {
        let mut service = self.service.clone();
        self.call(
            "PodSandboxStatus",
            service.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: false,
            }),
        )?
        .status
        .context("PodSandboxStatus returned no status")
    }

    /// The ids of the pods the runtime lists.
    pub fn list_pods(&self) -> Result<Vec<String>> {
        let mut service = self.service.clone();
        Ok(self
            .call(
                "ListPodSandbox",
                service.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
            )?
            .items
            .into_iter()
            .map(|pod| pod.id)
            .collect())
    }

    /// `StopPodSandbox`.
    pub fn stop_pod(&self, pod: &str) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "StopPodSandbox",
            service.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }),
        )
        .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod(&self, pod: &str) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "RemovePodSandbox",
            service.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            }),
        )
        .map(drop)
    }

    /// `CreateContainer` of `config` in `pod` (whose config is `pod_config`);
    /// the container id.
    pub fn create_container(
        &self,
        pod: &str,
        config: &ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> Result<String> {
        let mut service = self.service.clone();
        Ok(self
            .call(
                "CreateContainer",
                service.create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.into(),
                    config: Some(config.clone()),
                    sandbox_config: Some(pod_config.clone()),
                }),
            )?
            .container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, container: &str) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "StartContainer",
            service.start_container(StartContainerRequest {
                container_id: container.into(),
            }),
        )
        .map(drop)
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, container: &str) -> Result<ContainerStatus> {
        let mut service = self.service.clone();
        self.call(
            "ContainerStatus",
            service.container_status(ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            }),
        )?
        .status
        .context("ContainerStatus returned no status")
    }

    /// `StopContainer` with a grace period of `timeout_s` seconds.
    pub fn stop_container(&self, container: &str, timeout_s: i64) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "StopContainer",
            service.stop_container(StopContainerRequest {
                container_id: container.into(),
                timeout: timeout_s,
            }),
        )
        .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, container: &str) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "RemoveContainer",
            service.remove_container(RemoveContainerRequest {
                container_id: container.into(),
            }),
        )
        .map(drop)
    }

    /// The pod IP `PodSandboxStatus` reports for `pod`.
    pub fn pod_ip(&self, pod: &str) -> Result<std::net::Ipv4Addr> {
        let ip = self
            .pod_status(pod)?
            .network
            .map(|network| network.ip)
            .unwrap_or_default();
        ip.parse()
            .with_context(|| format!("PodSandboxStatus of {pod} reports the IP {ip:?}"))
    }

    /// `ContainerStats` of `container`.
    pub fn container_stats(&self, container: &str) -> Result<ContainerStats> {
        let mut service = self.service.clone();
        self.call(
            "ContainerStats",
            service.container_stats(ContainerStatsRequest {
                container_id: container.into(),
            }),
        )?
        .stats
        .context("ContainerStats returned no stats")
    }

    /// `UpdateContainerResources` of `container` to `resources`.
    pub fn update_container_resources(
        &self,
        container: &str,
        resources: LinuxContainerResources,
    ) -> Result<()> {
        let mut service = self.service.clone();
        self.call(
            "UpdateContainerResources",
            service.update_container_resources(UpdateContainerResourcesRequest {
                container_id: container.into(),
                linux: Some(resources),
                ..Default::default()
            }),
        )
        .map(drop)
    }

    /// `Exec` of `cmd` in `container` (stdout and stderr, no stdin, no
    /// TTY): the streaming URL the runtime's streaming server serves.
    pub fn exec_url(&self, container: &str, cmd: &[&str]) -> Result<String> {
        let mut service = self.service.clone();
        Ok(self
            .call(
                "Exec",
                service.exec(ExecRequest {
                    container_id: container.into(),
                    cmd: cmd.iter().map(|arg| arg.to_string()).collect(),
                    tty: false,
                    stdin: false,
                    stdout: true,
                    stderr: true,
                }),
            )?
            .url)
    }

    /// `PortForward` to `port` of `pod`: the streaming URL.
    pub fn port_forward_url(&self, pod: &str, port: i32) -> Result<String> {
        let mut service = self.service.clone();
        Ok(self
            .call(
                "PortForward",
                service.port_forward(PortForwardRequest {
                    pod_sandbox_id: pod.into(),
                    port: vec![port],
                }),
            )?
            .url)
    }

    /// `ExecSync` of `cmd` in `container`: (exit code, stdout, stderr).
    pub fn exec_sync(&self, container: &str, cmd: &[&str]) -> Result<(i32, String, String)> {
        let mut service = self.service.clone();
        let reply = self.call(
            "ExecSync",
            service.exec_sync(ExecSyncRequest {
                container_id: container.into(),
                cmd: cmd.iter().map(|arg| arg.to_string()).collect(),
                timeout: 60,
            }),
        )?;
        Ok((
            reply.exit_code,
            String::from_utf8_lossy(&reply.stdout).into_owned(),
            String::from_utf8_lossy(&reply.stderr).into_owned(),
        ))
    }
}
