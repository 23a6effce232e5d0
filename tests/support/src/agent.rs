//! The agent's process-creating calls as the suites make them: each opens
//! the host ends of the streams it asks for before the call, as the shim
//! does, so nothing a process writes at once is lost.

use anyhow::{Context, Result};
use husk_agent_client::agent::{CreateContainerRequest, ExecProcessRequest};
use husk_agent_client::AgentClient;
use serde_json::Value;

use crate::bundle::process_json;
use crate::stdio::{HostStdio, Pipes};

/// Creates (does not start) container `id` from `spec` on the rootfs at
/// `rootfs_path` (relative to the share), with the streams `pipes` asks for.
pub async fn create_container(
    client: &AgentClient,
    id: &str,
    rootfs_path: &str,
    spec: &Value,
    pipes: Pipes,
) -> Result<HostStdio> {
    let ids = pipes.stream_ids(id);
    let stdio = HostStdio::open(client, &ids).await?;
    let request = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec.to_string().into_bytes(),
        rootfs_path: rootfs_path.into(),
        stdio: protobuf::MessageField::some(ids),
        ..Default::default()
    };
    client
        .create_container(request)
        .await
        .with_context(|| format!("CreateContainer {id} ({})", spec["process"]["args"]))?;
    Ok(stdio)
}

/// Starts `args` as process `exec_id` in the running container `id`, on a
/// terminal if `pipes` asks for one.
pub async fn exec_process(
    client: &AgentClient,
    id: &str,
    exec_id: &str,
    args: &[&str],
    pipes: Pipes,
) -> Result<HostStdio> {
    let ids = pipes.stream_ids(&format!("{id}-{exec_id}"));
    let stdio = HostStdio::open(client, &ids).await?;
    let request = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process_json: process_json(args, pipes.terminal).to_string().into_bytes(),
        stdio: protobuf::MessageField::some(ids),
        ..Default::default()
    };
    client
        .exec_process(request)
        .await
        .with_context(|| format!("ExecProcess {exec_id} in {id} ({args:?})"))?;
    Ok(stdio)
}
