//! Test doubles for the pod model: a fake hypervisor whose "guest" is a
//! fake agent served over ttrpc on a Unix socket (so the real agent client
//! and its error mapping are in the path), and an event recorder.

pub mod fake_agent;
pub mod fake_vm;

use std::sync::Mutex;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::MessageDyn;

use crate::events::EventSink;

/// Records every event's topic and text.
#[derive(Default)]
pub struct RecordedEvents {
    events: Mutex<Vec<(String, String)>>,
}

impl RecordedEvents {
    /// The topics published so far, in order.
    pub fn topics(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// The text of the events on `topic`.
    pub fn on(&self, topic: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, text)| text.clone())
            .collect()
    }
}

#[async_trait]
impl EventSink for RecordedEvents {
    async fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let text = format!("{event:?}");
        self.events.lock().unwrap().push((topic.to_owned(), text));
    }
}

/// Whether the test runs as root (bind mounts into the share need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
