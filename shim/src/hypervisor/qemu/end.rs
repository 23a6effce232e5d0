//! How a QEMU guest ended, decided from what the host can observe: QEMU's
//! exit status, the reason in its last QMP `SHUTDOWN` event, whether the
//! host asked it to quit or killed it, and the guest's console.
//!
//! With `-no-reboot` and `panic=-1` a guest power-off, reset and kernel
//! panic all end QEMU with status 0 and a guest `SHUTDOWN` reason; only the
//! console tells a panic apart.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The line Linux prints when it panics.
const KERNEL_PANIC_MARKER: &str = "Kernel panic - not syncing";

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest powered off or reset itself and QEMU exited cleanly: the
    /// normal end of a guest.
    PoweredOff,
    /// The guest kernel panicked (its console says so) and reset.
    KernelPanic,
    /// QEMU quit at the host's request (QMP `quit`, or SIGTERM/SIGINT/SIGHUP
    /// which QEMU handles as a request to quit).
    Stopped,
    /// QEMU was killed by a signal it cannot handle: by this backend (SIGKILL
    /// after `quit` was ignored, or on drop) or by someone else.
    Killed { signal: i32 },
    /// QEMU failed: it exited with an error or died of a fault.
    Crashed {
        status: ExitStatus,
        /// The end of QEMU's own output (stdout and stderr).
        output: String,
    },
    /// The guest did not end before the caller's deadline and was stopped.
    TimedOut,
}

/// What the host saw when QEMU exited.
#[derive(Debug, Clone, Copy)]
pub struct EndEvidence<'a> {
    pub status: ExitStatus,
    /// `reason` of QEMU's last QMP `SHUTDOWN` event, if one arrived.
    pub shutdown_reason: Option<&'a str>,
    /// The backend sent QMP `quit`.
    pub quit_requested: bool,
    /// The guest's console text.
    pub console: &'a str,
    /// QEMU's own output.
    pub qemu_output: &'a str,
}

/// Decides how the guest ended.
pub fn classify(evidence: EndEvidence<'_>) -> GuestEnd {
    if let Some(signal) = evidence.status.signal() {
        // QEMU turns SIGTERM, SIGINT and SIGHUP into an orderly exit, so a
        // signal death is SIGKILL or a fault.
        return if signal == libc::SIGKILL {
            GuestEnd::Killed { signal }
        } else {
            GuestEnd::Crashed {
                status: evidence.status,
                output: evidence.qemu_output.to_owned(),
            }
        };
    }
    if !evidence.status.success() {
        return GuestEnd::Crashed {
            status: evidence.status,
            output: evidence.qemu_output.to_owned(),
        };
    }
    match evidence.shutdown_reason {
        Some(reason) if reason.starts_with("host-") => GuestEnd::Stopped,
        None if evidence.quit_requested => GuestEnd::Stopped,
        _ if evidence.console.contains(KERNEL_PANIC_MARKER) => GuestEnd::KernelPanic,
        _ => GuestEnd::PoweredOff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn evidence(status: ExitStatus, reason: Option<&str>) -> EndEvidence<'_> {
        EndEvidence {
            status,
            shutdown_reason: reason,
            quit_requested: false,
            console: "husk-agent: HUSK_EXEC_EXIT code=0\n",
            qemu_output: "",
        }
    }

    #[test]
    fn guest_reset_with_clean_exit_is_a_power_off() {
        assert_eq!(
            classify(evidence(exited(0), Some("guest-reset"))),
            GuestEnd::PoweredOff
        );
        assert_eq!(
            classify(evidence(exited(0), Some("guest-shutdown"))),
            GuestEnd::PoweredOff
        );
        // The event can be lost if QMP went away first; the clean exit still
        // came from the guest when the host did not ask for it.
        assert_eq!(classify(evidence(exited(0), None)), GuestEnd::PoweredOff);
    }

    #[test]
    fn panic_on_the_console_makes_the_reset_a_kernel_panic() {
        let console = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n";
        let end = classify(EndEvidence {
            console,
            ..evidence(exited(0), Some("guest-reset"))
        });
        assert_eq!(end, GuestEnd::KernelPanic);
    }

    #[test]
    fn host_quit_is_a_stop() {
        assert_eq!(
            classify(evidence(exited(0), Some("host-qmp-quit"))),
            GuestEnd::Stopped
        );
        assert_eq!(
            classify(evidence(exited(0), Some("host-signal"))),
            GuestEnd::Stopped
        );
        let end = classify(EndEvidence {
            quit_requested: true,
            ..evidence(exited(0), None)
        });
        assert_eq!(end, GuestEnd::Stopped);
    }

    #[test]
    fn sigkill_is_killed_and_other_signals_are_crashes() {
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            classify(evidence(killed, None)),
            GuestEnd::Killed {
                signal: libc::SIGKILL
            }
        );
        let segv = ExitStatus::from_raw(libc::SIGSEGV);
        assert!(matches!(
            classify(evidence(segv, None)),
            GuestEnd::Crashed { .. }
        ));
    }

    #[test]
    fn error_exit_is_a_crash_carrying_qemu_output() {
        let end = classify(EndEvidence {
            qemu_output: "qemu-system-x86_64: -chardev socket: Failed to connect",
            ..evidence(exited(1), None)
        });
        match end {
            GuestEnd::Crashed { status, output } => {
                assert_eq!(status.code(), Some(1));
                assert!(output.contains("Failed to connect"), "{output}");
            }
            other => panic!("expected a crash, got {other:?}"),
        }
    }
}
