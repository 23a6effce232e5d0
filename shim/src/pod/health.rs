//! The agent health check: the bound on every wait that has no deadline of
//! its own (a process's exit, the guest's events). A guest whose agent
//! stops answering `Check` (hung, stopped, or hostile) for
//! `timeouts.health_failures` probes in a row is declared dead: its VM is
//! stopped, and the VM's end reports every running process exited (255),
//! so Wait, Kill, Delete and Shutdown all finish.

use std::sync::Weak;

use super::Pod;
use crate::sandbox::Sandbox;

/// Whether one probe found the agent serving.
async fn probe(sandbox: &Sandbox) -> Result<(), String> {
    let timeout = sandbox.health.probe_timeout;
    match tokio::time::timeout(timeout, sandbox.client.check_within(timeout)).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err("the agent reports it is not serving".into()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Counts consecutive failed probes against the limit.
#[derive(Debug)]
pub(super) struct FailureCount {
    limit: u32,
    in_a_row: u32,
}

impl FailureCount {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            in_a_row: 0,
        }
    }

    /// Records one probe; true once the limit is reached.
    pub(super) fn record(&mut self, ok: bool) -> bool {
        self.in_a_row = if ok { 0 } else { self.in_a_row + 1 };
        self.in_a_row >= self.limit
    }

    pub(super) fn in_a_row(&self) -> u32 {
        self.in_a_row
    }
}

impl Pod {
    /// Probes the sandbox's agent until the sandbox is gone (destroyed, or
    /// replaced) or declared dead.
    pub(super) async fn watch_agent_health(&self, watched: Weak<Sandbox>) {
        let Some(policy) = watched.upgrade().map(|s| s.health) else {
            return;
        };
        let mut failures = FailureCount::new(policy.failures);
        loop {
            tokio::time::sleep(policy.interval).await;
            let Some(sandbox) = watched.upgrade() else {
                return;
            };
            let still_current = self
                .current_sandbox()
                .is_some_and(|current| std::sync::Arc::ptr_eq(&current, &sandbox));
            if !still_current {
                return;
            }
            let result = probe(&sandbox).await;
            if let Err(error) = &result {
                tracing::warn!(
                    sandbox_id = %sandbox.id,
                    error = %error.escape_debug(),
                    in_a_row = failures.in_a_row() + 1,
                    limit = policy.failures,
                    "agent health probe failed"
                );
            }
            if failures.record(result.is_ok()) {
                tracing::error!(
                    sandbox_id = %sandbox.id,
                    probes = policy.failures,
                    "the guest agent stopped answering; declaring the guest dead"
                );
                sandbox.kill_vm().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FailureCount;

    #[test]
    fn only_failures_in_a_row_declare_the_guest_dead() {
        let mut count = FailureCount::new(3);
        assert!(!count.record(false));
        assert!(!count.record(false));
        assert!(!count.record(true), "a success resets the count");
        assert!(!count.record(false));
        assert!(!count.record(false));
        assert!(count.record(false));
    }
}
