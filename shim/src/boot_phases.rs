//! Where a pod's start time goes, in five consecutive phases measured by
//! the shim: the VMM made and started (`vm_start`), the VMM running until
//! the agent answered (`agent_ready`, of which the guest kernel's boot to
//! init is `guest_kernel`, as the guest's own uptime at the agent's start
//! tells), `CreateSandbox` (`sandbox_create`), and until the pod's first
//! container was started (`first_container_start`). Logged once per pod,
//! when the first container started, and exported by the management
//! socket as `husk_boot_phase_seconds{phase}`.

use std::time::Duration;

/// The phases measured so far (`None`: not reached yet).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BootPhases {
    pub vm_start: Option<Duration>,
    pub guest_kernel: Option<Duration>,
    pub agent_ready: Option<Duration>,
    pub sandbox_create: Option<Duration>,
    pub first_container_start: Option<Duration>,
}

impl BootPhases {
    /// Each phase with its label value, in order.
    pub fn named(&self) -> [(&'static str, Option<Duration>); 5] {
        [
            ("vm_start", self.vm_start),
            ("guest_kernel", self.guest_kernel),
            ("agent_ready", self.agent_ready),
            ("sandbox_create", self.sandbox_create),
            ("first_container_start", self.first_container_start),
        ]
    }

    /// The guest kernel's part, from the guest's uptime when its agent
    /// started. The guest tells it, so it is believed only within the
    /// phase that contains it (`agent_ready`).
    pub fn set_guest_kernel(&mut self, reported_uptime_ms: u64) {
        let reported = Duration::from_millis(reported_uptime_ms);
        self.guest_kernel = Some(match self.agent_ready {
            Some(bound) => reported.min(bound),
            None => reported,
        });
    }

    /// From the VMM's creation to the first container's start, once known.
    pub fn total(&self) -> Option<Duration> {
        Some(
            self.vm_start?
                + self.agent_ready?
                + self.sandbox_create?
                + self.first_container_start?,
        )
    }
}

fn ms(duration: Option<Duration>) -> i64 {
    duration.map_or(-1, |d| d.as_millis() as i64)
}

/// Logs the phases in one line (`-1`: a phase not measured).
pub fn log(sandbox_id: &str, phases: &BootPhases) {
    tracing::info!(
        sandbox_id,
        vm_start_ms = ms(phases.vm_start),
        guest_kernel_ms = ms(phases.guest_kernel),
        agent_ready_ms = ms(phases.agent_ready),
        sandbox_create_ms = ms(phases.sandbox_create),
        first_container_start_ms = ms(phases.first_container_start),
        total_ms = ms(phases.total()),
        "boot phases"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reported_kernel_time_never_exceeds_the_phase_holding_it() {
        let mut phases = BootPhases {
            agent_ready: Some(Duration::from_millis(1_500)),
            ..Default::default()
        };
        phases.set_guest_kernel(900);
        assert_eq!(phases.guest_kernel, Some(Duration::from_millis(900)));
        phases.set_guest_kernel(u64::MAX);
        assert_eq!(phases.guest_kernel, Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn the_total_needs_every_consecutive_phase() {
        let mut phases = BootPhases {
            vm_start: Some(Duration::from_millis(10)),
            agent_ready: Some(Duration::from_millis(1_000)),
            sandbox_create: Some(Duration::from_millis(5)),
            ..Default::default()
        };
        assert_eq!(phases.total(), None);
        phases.first_container_start = Some(Duration::from_millis(20));
        assert_eq!(phases.total(), Some(Duration::from_millis(1_035)));
        assert_eq!(
            phases.named()[4],
            ("first_container_start", Some(Duration::from_millis(20)))
        );
    }
}
