//! What the host's KVM can do, decided once per process.
//!
//! On hosts whose KVM is hardware-backed, a stock guest kernel runs at full
//! speed in the built-in VMM. On PVM hosts (`kvm_pvm` loaded, see
//! `docs/architecture.md`) a stock kernel only gets through its early
//! boot, so the product falls back to the `qemu` backend under TCG there.

use std::path::Path;

/// The host's KVM, as far as running a stock Linux guest is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// `/dev/kvm` is missing or cannot be opened.
    Unavailable { reason: String },
    /// KVM is the PVM shadow-paging hypervisor: stock guests stop after
    /// their early boot.
    Pvm,
    /// Hardware-assisted KVM (VMX or SVM): stock guests run.
    Hardware,
}

impl HostKvm {
    /// Whether a stock guest kernel can boot to user space on this KVM.
    pub fn runs_stock_guests(&self) -> bool {
        matches!(self, HostKvm::Hardware)
    }

    /// A short description for logs and test reports.
    pub fn describe(&self) -> String {
        match self {
            HostKvm::Unavailable { reason } => format!("no usable KVM ({reason})"),
            HostKvm::Pvm => {
                "PVM KVM (kvm_pvm): stock guest kernels stop after early boot".to_owned()
            }
            HostKvm::Hardware => "hardware-assisted KVM".to_owned(),
        }
    }
}

/// Probes `/dev/kvm` and the loaded KVM modules.
pub fn probe_host_kvm() -> HostKvm {
    probe_with(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn probe_with(kvm_device: &Path, sys_module: &Path) -> HostKvm {
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_device)
    {
        return HostKvm::Unavailable {
            reason: format!("{}: {error}", kvm_device.display()),
        };
    }
    if sys_module.join("kvm_pvm").exists() {
        HostKvm::Pvm
    } else {
        HostKvm::Hardware
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_means_stock_guests_cannot_run() {
        let dir = std::env::temp_dir().join(format!("husk-host-probe-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("modules/kvm_pvm")).unwrap();
        std::fs::write(dir.join("kvm"), b"").unwrap();
        let probed = probe_with(&dir.join("kvm"), &dir.join("modules"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(probed, HostKvm::Pvm);
        assert!(!probed.runs_stock_guests());
    }

    #[test]
    fn missing_device_is_unavailable_and_named() {
        let probed = probe_with(Path::new("/nonexistent/kvm"), Path::new("/sys/module"));
        assert!(
            matches!(&probed, HostKvm::Unavailable { reason } if reason.contains("/nonexistent/kvm"))
        );
    }
}
