//! KVM or TCG: which accelerator QEMU runs the guest with, and why.
//!
//! KVM is used where the host's KVM can run a stock guest kernel
//! ([`husk_vmm::host::probe_host_kvm`]). On PVM hosts a stock kernel never
//! reaches user space under KVM (see `docs/architecture.md`), so the
//! guest runs under TCG, QEMU's software emulation, with `-cpu max` so the
//! guest sees the newest CPU features TCG can emulate.

use std::fmt;

use husk_vmm::host::HostKvm;

/// The accelerator a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM where it runs stock guests, TCG otherwise.
    #[default]
    Auto,
    /// Always KVM (`-accel kvm -cpu host`).
    Kvm,
    /// Always TCG (`-accel tcg -cpu max`).
    Tcg,
}

/// The accelerator QEMU is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

/// The TCG translation cache, MiB.
pub const TCG_TRANSLATION_CACHE_MIB: u32 = 32;

impl ResolvedAccel {
    /// The `-accel` value.
    pub fn qemu_name(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }

    /// The whole `-accel` option. Under TCG the translation cache is
    /// bounded: QEMU's default reserves up to 1 GiB for translated code,
    /// which a small guest's kernel and busybox never need but which the
    /// host pays for in touched pages.
    pub fn qemu_option(self) -> String {
        match self {
            ResolvedAccel::Kvm => "kvm".to_owned(),
            ResolvedAccel::Tcg => format!("tcg,tb-size={TCG_TRANSLATION_CACHE_MIB}"),
        }
    }

    /// Kernel parameters the guest needs under this accelerator, appended
    /// to the pod's command line.
    ///
    /// Under TCG: `noapictimer`. The guest otherwise calibrates its local
    /// APIC timer against the PIT and then verifies it, two waits of about
    /// 100 ms each of emulated time that took 220 ms of a 720 ms boot to
    /// `/init` here; without the local APIC timer the PIT is the tick
    /// (broadcast to other vCPUs). Under KVM the guest keeps its TSC
    /// deadline timer and nothing is added.
    pub fn guest_kernel_parameters(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "",
            ResolvedAccel::Tcg => "noapictimer",
        }
    }

    /// The `-cpu` model that goes with it.
    pub fn cpu_model(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "host",
            ResolvedAccel::Tcg => "max",
        }
    }
}

impl fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.qemu_name())
    }
}

/// The accelerator chosen for one VM and the reason, for logs and test
/// reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: ResolvedAccel,
    pub reason: String,
}

impl Accel {
    /// Decides the accelerator; `probe` is called only for [`Accel::Auto`].
    pub fn resolve(self, probe: impl FnOnce() -> HostKvm) -> AccelChoice {
        match self {
            Accel::Kvm => AccelChoice {
                accel: ResolvedAccel::Kvm,
                reason: "KVM was requested".to_owned(),
            },
            Accel::Tcg => AccelChoice {
                accel: ResolvedAccel::Tcg,
                reason: "TCG was requested".to_owned(),
            },
            Accel::Auto => {
                let host = probe();
                if host.runs_stock_guests() {
                    AccelChoice {
                        accel: ResolvedAccel::Kvm,
                        reason: host.describe(),
                    }
                } else {
                    AccelChoice {
                        accel: ResolvedAccel::Tcg,
                        reason: format!("{}: software emulation instead", host.describe()),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_uses_kvm_on_hardware_kvm() {
        let choice = Accel::Auto.resolve(|| HostKvm::Hardware);
        assert_eq!(choice.accel, ResolvedAccel::Kvm);
        assert!(choice.reason.contains("hardware"), "{}", choice.reason);
    }

    #[test]
    fn auto_uses_tcg_on_pvm_and_says_why() {
        let choice = Accel::Auto.resolve(|| HostKvm::Pvm);
        assert_eq!(choice.accel, ResolvedAccel::Tcg);
        assert!(choice.reason.contains("PVM"), "{}", choice.reason);
    }

    #[test]
    fn auto_uses_tcg_without_kvm_and_says_why() {
        let choice = Accel::Auto.resolve(|| HostKvm::Unavailable {
            reason: "/dev/kvm: No such file or directory".to_owned(),
        });
        assert_eq!(choice.accel, ResolvedAccel::Tcg);
        assert!(choice.reason.contains("/dev/kvm"), "{}", choice.reason);
    }

    #[test]
    fn explicit_choice_does_not_probe_the_host() {
        let choice = Accel::Tcg.resolve(|| panic!("probed the host"));
        assert_eq!(choice.accel, ResolvedAccel::Tcg);
        assert_eq!(
            Accel::Kvm.resolve(|| panic!("probed the host")).accel,
            ResolvedAccel::Kvm
        );
    }
}
