//! The floor under every thread of the shim, its VMM and the binaries it
//! starts: a process-wide deny list, synchronised onto all threads at once
//! (`SECCOMP_FILTER_FLAG_TSYNC`) before the VM starts.
//!
//! The shim's control threads (the ttrpc/tokio RPC threads, the console and
//! QEMU-spawner threads) read agent replies and console bytes, so they
//! handle guest input too. They cannot live under an allowlist: they mount
//! rootfs, join cgroups, `fork`/`execve` QEMU and logging binaries, and a
//! filter is inherited across `execve`, so an allowlist for them would
//! have to be QEMU's and every logger's as well. What they get instead is
//! [`DENIED`]: calls nothing in husk, QEMU or a logger makes, that an
//! attacker holding a control thread would want (debugging other
//! processes, loading kernel code, keyrings, `userfaultfd` races, handle
//! opens that escape a mount, clock and power control). The device, fs and
//! vCPU classes stack their allowlists on top (filters only narrow).

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSeccompFilterFlag,
    LinuxSyscallBuilder,
};

use crate::filter::FilterError;
use crate::{Policy, ViolationAction};

/// What no thread of the shim, nor QEMU, nor a logging binary may call.
pub const DENIED: &[&str] = &[
    // Reading or steering other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    // Kernel code and kernel objects.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "uselib",
    // Keyrings (host secrets; a classic kernel attack surface).
    "keyctl",
    "add_key",
    "request_key",
    // Race amplifiers for kernel exploits.
    "userfaultfd",
    // Opening by file handle escapes a bind mount ("shocker").
    "open_by_handle_at",
    // The node's clock, swap, power, accounting and logs.
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "syslog",
    "fanotify_init",
    // Port I/O on the host.
    "iopl",
    "ioperm",
];

/// The deny list as an OCI profile: everything allowed but [`DENIED`],
/// which `action` handles; synchronised onto every thread.
pub fn profile(action: ViolationAction) -> Result<LinuxSeccomp, FilterError> {
    let describe = |reason: String| FilterError::Describe {
        class: "control",
        reason,
    };
    let deny_action = match action {
        ViolationAction::Kill => LinuxSeccompAction::ScmpActKillProcess,
        ViolationAction::Trap => LinuxSeccompAction::ScmpActTrap,
        ViolationAction::Log => LinuxSeccompAction::ScmpActLog,
    };
    let denied = LinuxSyscallBuilder::default()
        .names(
            DENIED
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .action(deny_action)
        .build()
        .map_err(|error| describe(error.to_string()))?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![Arch::ScmpArchX86_64])
        .flags(vec![LinuxSeccompFilterFlag::SeccompFilterFlagTsync])
        .syscalls(vec![denied])
        .build()
        .map_err(|error| describe(error.to_string()))
}

/// Loads the deny list on every thread of the process, once (later calls
/// do nothing). Call it before any thread confined itself: a thread whose
/// filters are not an ancestor of the caller's cannot be synchronised, and
/// the kernel refuses the whole load, which is then reported naming it.
pub fn confine_process(policy: Policy) -> Result<(), FilterError> {
    static LOADED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    if !policy.seccomp {
        return Ok(());
    }
    let mut loaded = LOADED.lock().unwrap_or_else(|poison| poison.into_inner());
    if *loaded {
        return Ok(());
    }
    let program = husk_runtime::seccomp::compile(&profile(policy.action)?).map_err(|error| {
        FilterError::Compile {
            class: "control",
            reason: error.to_string(),
        }
    })?;
    crate::filter::install(&program)?;
    *loaded = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denied_name_is_a_system_call_of_this_architecture() {
        for name in DENIED {
            assert!(
                matches!(
                    husk_runtime::seccomp::syscall_number(name),
                    husk_runtime::seccomp::SyscallLookup::Native(_)
                ),
                "{name} is not an x86_64 system call"
            );
        }
    }

    #[test]
    fn the_deny_list_compiles_with_tsync() {
        let program =
            husk_runtime::seccomp::compile(&profile(ViolationAction::Kill).unwrap()).unwrap();
        assert_eq!(program.flags & 1, 1, "SECCOMP_FILTER_FLAG_TSYNC");
        assert!(program.program.len() > DENIED.len());
    }
}
