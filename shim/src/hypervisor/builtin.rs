//! The built-in backend: the VMM inside the shim process
//! (`husk_vmm::VmBuilder`), with the device models on virtio-mmio. The VM
//! is the shim: its pid is the shim's, and its vCPU and device threads are
//! the shim's threads. The serial device writes into the capped
//! [`ConsoleLog`] without waiting on the host.
//!
//! Besides the devices the sandbox adds, the VM gets a virtio-balloon for
//! free page reporting when `hypervisor.free_page_reporting` is set
//! ([`BalloonDevice`]): the pages the guest frees go back to the host,
//! as QEMU's own balloon does for the qemu backend. It comes last, so the
//! other devices keep their windows and interrupt lines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use husk_agent_client::Endpoint;
use husk_devices::balloon::BalloonDevice;
use husk_devices::fs::VirtioFs;
use husk_devices::vsock::{VsockConfig, VsockDevice};
use husk_devices::VirtioDevice;
use husk_vmm::{MicroVm, SerialSink, VmBuilder, VmExit};

use super::console::ConsoleLog;
use super::{
    hybrid_vsock_endpoint, Device, ExitWatcher, Hypervisor, HypervisorError, VmInfo, VmSpec,
};

/// How often the exit watcher looks at the vCPU threads.
const EXIT_POLL: Duration = Duration::from_millis(200);

/// How long a stopped VM's console may take to reach its file.
const CONSOLE_DRAIN_PATIENCE: Duration = Duration::from_secs(2);

/// A pod's VM in the built-in VMM.
pub struct BuiltinVm {
    spec: VmSpec,
    devices: Vec<Box<dyn VirtioDevice>>,
    vsock_uds: Option<std::path::PathBuf>,
    vm: Option<Arc<Mutex<MicroVm>>>,
    console: Option<ConsoleLog>,
}

impl BuiltinVm {
    pub fn new(spec: VmSpec) -> Result<Self, HypervisorError> {
        Ok(Self {
            spec,
            devices: Vec::new(),
            vsock_uds: None,
            vm: None,
            console: None,
        })
    }
}

/// The VM's virtio devices in window order: those `added`, then the
/// balloon when `spec` asks for free page reporting.
fn vm_devices(spec: &VmSpec, added: Vec<Box<dyn VirtioDevice>>) -> Vec<Box<dyn VirtioDevice>> {
    let mut devices = added;
    if spec.free_page_reporting {
        devices.push(Box::new(BalloonDevice::new()));
    }
    devices
}

impl Hypervisor for BuiltinVm {
    fn add_device(&mut self, device: Device) -> Result<(), HypervisorError> {
        if self.vm.is_some() {
            return Err(HypervisorError::Device {
                device: device.kind(),
                reason: "the built-in VM is already running".into(),
            });
        }
        let model: Box<dyn VirtioDevice> = match device {
            Device::Vsock {
                guest_cid,
                uds,
                max_connections,
            } => {
                self.vsock_uds = Some(uds.clone());
                Box::new(
                    VsockDevice::new(VsockConfig {
                        guest_cid,
                        uds_path: uds,
                        max_connections,
                    })
                    .context("cannot create the vsock device")?,
                )
            }
            Device::SharedFs(config) => {
                Box::new(VirtioFs::new(config).context("cannot create the virtio-fs device")?)
            }
            Device::Net(backend) => Box::new(
                husk_devices::net::NetDevice::new(backend.tap, backend.config)
                    .context("cannot create the virtio-net device")?,
            ),
        };
        self.devices.push(model);
        Ok(())
    }

    fn start(&mut self) -> Result<(), HypervisorError> {
        let devices = vm_devices(&self.spec, std::mem::take(&mut self.devices));
        let spec = &self.spec;
        let console =
            ConsoleLog::create(&spec.console_log, spec.console_max_bytes).with_context(|| {
                format!(
                    "cannot create the console log {}",
                    spec.console_log.display()
                )
            })?;
        let mut builder = VmBuilder::new()
            .vcpus(spec.vcpus)
            .memory_mib(spec.memory_mib)
            .linux(
                &spec.kernel,
                Some(spec.initrd.clone()),
                spec.kernel_cmdline(),
            )
            .serial(SerialSink::Writer(Box::new(console.writer())));
        for device in devices {
            builder = builder.virtio_device(device);
        }
        let mut vm = builder.build().with_context(|| {
            format!(
                "the built-in VMM cannot build the VM (kernel {})",
                spec.kernel.display()
            )
        })?;
        vm.start()
            .context("the built-in VMM cannot start the vCPUs")?;
        self.vm = Some(Arc::new(Mutex::new(vm)));
        self.console = Some(console);
        Ok(())
    }

    fn describe(&self) -> VmInfo {
        VmInfo {
            backend: "builtin",
            accelerator: "kvm".to_owned(),
            vmm_pid: std::process::id(),
        }
    }

    fn agent_endpoint(&self) -> Result<Endpoint, HypervisorError> {
        hybrid_vsock_endpoint(self.vsock_uds.as_deref())
    }

    fn exit_watcher(&self) -> Result<ExitWatcher, HypervisorError> {
        let vm = self
            .vm
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the built-in VM was not started"))?;
        Ok(Box::pin(async move {
            tokio::task::spawn_blocking(move || loop {
                let exit: Option<VmExit> = {
                    let vm = vm.lock().unwrap_or_else(|p| p.into_inner());
                    match vm.wait(Some(EXIT_POLL)) {
                        Ok(exit) => exit,
                        Err(error) => return format!("the built-in VMM failed: {error}"),
                    }
                };
                if let Some(exit) = exit {
                    return format!("the built-in VM ended: {exit:?}");
                }
                // Let `stop` take the lock between two looks.
                std::thread::sleep(Duration::from_millis(50));
            })
            .await
            .unwrap_or_else(|error| format!("the VM watcher failed: {error}"))
        }))
    }

    fn stop(&mut self, grace: Duration) -> String {
        let Some(vm) = self.vm.take() else {
            return "never started".to_owned();
        };
        let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
        let exit = match vm.wait(Some(grace)) {
            Ok(Some(exit)) => exit,
            _ => vm.stop(),
        };
        let console = self
            .console
            .take()
            .map(|mut console| console.finish(CONSOLE_DRAIN_PATIENCE));
        match console {
            Some(console) if console.dropped_bytes > 0 => format!(
                "{exit:?} (console: {} bytes dropped)",
                console.dropped_bytes
            ),
            _ => format!("{exit:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Backend;

    fn spec(free_page_reporting: bool) -> VmSpec {
        VmSpec {
            backend: Backend::Builtin,
            vcpus: 1,
            memory_mib: 256,
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initramfs.cpio.gz".into(),
            console_log: "/nonexistent/console.log".into(),
            console_max_bytes: 1 << 20,
            work_dir: "/nonexistent".into(),
            qemu_binary: None,
            seccomp: true,
            free_page_reporting,
            qemu_run_as: crate::hypervisor::qemu::RunAs::Root,
        }
    }

    /// The virtio device ids the VM would get, in window order.
    fn device_types(vm: &mut BuiltinVm) -> Vec<u32> {
        vm_devices(&vm.spec, std::mem::take(&mut vm.devices))
            .iter()
            .map(|device| device.device_type())
            .collect()
    }

    #[test]
    fn free_page_reporting_adds_a_balloon_after_the_other_devices() {
        let mut vm = BuiltinVm::new(spec(true)).unwrap();
        let share = std::env::temp_dir();
        vm.add_device(Device::SharedFs(husk_devices::fs::FsConfig::new(&share)))
            .unwrap();
        assert_eq!(
            device_types(&mut vm),
            vec![
                26, // virtio-fs
                husk_devices::balloon::VIRTIO_ID_BALLOON
            ]
        );
    }

    #[test]
    fn without_free_page_reporting_there_is_no_balloon() {
        let mut vm = BuiltinVm::new(spec(false)).unwrap();
        assert_eq!(device_types(&mut vm), Vec::<u32>::new());
    }
}
