//! The event log the host follows with `GetEvents`: process exits and OOM
//! kills, numbered in order. The host long-polls with the last sequence it
//! saw; the log keeps the newest [`MAX_RETAINED_EVENTS`] so a slow host
//! cannot make the guest's memory grow.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_protocols::agent::{Event, OomKilled, ProcessExited};
use tokio::sync::watch;

/// Events kept for hosts that fall behind (each is under 200 bytes).
const MAX_RETAINED_EVENTS: usize = 4096;
/// Longest wait one `GetEvents` may ask for, so a call never hangs forever.
pub const MAX_EVENT_WAIT: Duration = Duration::from_secs(300);

/// The log; clones share it.
#[derive(Clone)]
pub struct EventLog {
    events: Arc<Mutex<VecDeque<Event>>>,
    latest: watch::Sender<u64>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            events: Arc::default(),
            latest: watch::channel(0).0,
        }
    }
}

impl EventLog {
    /// Records that a process exited.
    pub fn process_exited(&self, exited: ProcessExited) {
        let mut event = Event::new();
        event.set_exited(exited);
        self.push(event);
    }

    /// Records that the OOM killer killed a process of `container_id`.
    pub fn oom_killed(&self, container_id: &str) {
        let mut event = Event::new();
        event.set_oom(OomKilled {
            container_id: container_id.to_owned(),
            ..Default::default()
        });
        self.push(event);
    }

    fn push(&self, mut event: Event) {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sequence = *self.latest.borrow() + 1;
        event.sequence = sequence;
        events.push_back(event);
        while events.len() > MAX_RETAINED_EVENTS {
            events.pop_front();
        }
        self.latest.send_replace(sequence);
    }

    fn after(&self, sequence: u64) -> Vec<Event> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .iter()
            .filter(|e| e.sequence > sequence)
            .cloned()
            .collect()
    }

    /// Events numbered above `sequence`, waiting up to `wait` for the first.
    pub async fn wait_after(&self, sequence: u64, wait: Duration) -> Vec<Event> {
        let mut latest = self.latest.subscribe();
        let wait = wait.min(MAX_EVENT_WAIT);
        let _ = tokio::time::timeout(wait, latest.wait_for(|&newest| newest > sequence)).await;
        self.after(sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_poll_returns_the_event_published_meanwhile() {
        let log = EventLog::default();
        log.oom_killed("c0");
        let poll = {
            let log = log.clone();
            tokio::spawn(async move { log.wait_after(1, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        log.oom_killed("c1");
        let events = poll.await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].sequence, 2);
        assert_eq!(events[0].oom().container_id, "c1");
    }

    #[tokio::test]
    async fn a_poll_with_nothing_new_returns_empty_after_its_timeout() {
        let log = EventLog::default();
        log.oom_killed("c0");
        assert!(log
            .wait_after(1, Duration::from_millis(10))
            .await
            .is_empty());
    }
}
