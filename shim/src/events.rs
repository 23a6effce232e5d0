//! Where the pod's task events go. The shim publishes to containerd
//! through [`ContainerdEvents`]; tests give the pod model a recorder
//! instead. Publishing never fails for the caller: an event containerd
//! cannot take is logged, as containerd's own shims do.

use async_trait::async_trait;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::ttrpc::context::Context;

/// A destination for task events (`/tasks/create`, `/tasks/exit`, ...).
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Publishes `event` on `topic`; returns once it was handed over.
    async fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>);
}

/// containerd's event service, in the shim's namespace.
pub struct ContainerdEvents {
    publisher: RemotePublisher,
    namespace: String,
}

impl ContainerdEvents {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_owned(),
        }
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Err(error) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(%error, topic, "cannot publish an event to containerd");
        }
    }
}
