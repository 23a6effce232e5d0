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
//!
//! With `hypervisor.template` ([`super::template`]) the VM is either
//! restored from the template of its shape, or, when there is none yet,
//! boots and is saved as that template once its agent answers
//! ([`Hypervisor::after_agent_ready`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use husk_agent_client::Endpoint;
use husk_devices::balloon::BalloonDevice;
use husk_devices::fs::VirtioFs;
use husk_devices::vsock::{VsockConfig, VsockDevice};
use husk_devices::VirtioDevice;
use husk_vmm::{MicroVm, SerialSink, VmBuilder, VmExit};

use super::console::ConsoleLog;
use super::template::{self, DeviceShape};
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
    template: TemplatePlan,
}

/// What the VM does about templates.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePlan {
    /// Nothing: templates are off, or unusable for this VM.
    Off,
    /// Restored from the template in this directory.
    Restored(PathBuf),
    /// Booted; saved as template `key` under `root` once its agent answers.
    Become { root: PathBuf, key: String },
}

impl BuiltinVm {
    pub fn new(spec: VmSpec) -> Result<Self, HypervisorError> {
        Ok(Self {
            spec,
            devices: Vec::new(),
            vsock_uds: None,
            vm: None,
            console: None,
            template: TemplatePlan::Off,
        })
    }
}

/// Restore from the template of this VM's shape if there is a usable one;
/// else boot, and become it.
fn choose_template_plan(spec: &VmSpec, devices: &[Box<dyn VirtioDevice>]) -> TemplatePlan {
    let Some(root) = &spec.template_root else {
        return TemplatePlan::Off;
    };
    let shapes: Vec<DeviceShape> = devices
        .iter()
        .map(|device| DeviceShape::of(device.as_ref()))
        .collect();
    let key = match template::template_key(spec, &shapes) {
        Ok(key) => key,
        Err(error) => {
            tracing::warn!(%error, "no template key for this VM: it boots");
            return TemplatePlan::Off;
        }
    };
    let directory = root.join(&key);
    if !directory.join(husk_vmm::snapshot::MANIFEST_FILE).is_file() {
        return TemplatePlan::Become {
            root: root.clone(),
            key,
        };
    }
    let types: Vec<u32> = shapes.iter().map(|shape| shape.device_type).collect();
    match husk_vmm::snapshot::check_restorable(&directory, &types) {
        Ok(()) => TemplatePlan::Restored(directory),
        Err(error) => {
            tracing::warn!(%error, template = %directory.display(), "the template cannot be restored here: the VM boots");
            TemplatePlan::Off
        }
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
        let plan = choose_template_plan(spec, &devices);
        let mut builder = match &plan {
            TemplatePlan::Restored(directory) => VmBuilder::new().restore_snapshot(directory),
            _ => VmBuilder::new()
                .vcpus(spec.vcpus)
                .memory_mib(spec.memory_mib)
                .linux(
                    &spec.kernel,
                    Some(spec.initrd.clone()),
                    spec.kernel_cmdline(),
                ),
        }
        .serial(SerialSink::Writer(Box::new(console.writer())));
        for device in devices {
            builder = builder.virtio_device(device);
        }
        let built = builder.build();
        if let (Err(error), TemplatePlan::Restored(directory)) = (&built, &plan) {
            // Only this pod fails: the next of its shape boots and makes
            // a new template.
            template::reject(directory, &error.to_string());
        }
        let mut vm = built.with_context(|| match &plan {
            TemplatePlan::Restored(directory) => format!(
                "the built-in VMM cannot restore the template {} (set aside: the next pod of this shape boots)",
                directory.display()
            ),
            _ => format!(
                "the built-in VMM cannot build the VM (kernel {})",
                spec.kernel.display()
            ),
        })?;
        if let TemplatePlan::Restored(directory) = &plan {
            tracing::info!(template = %directory.display(), "VM restored from a template");
        }
        self.template = plan;
        vm.start()
            .context("the built-in VMM cannot start the vCPUs")?;
        self.vm = Some(Arc::new(Mutex::new(vm)));
        self.console = Some(console);
        Ok(())
    }

    fn after_agent_ready(&mut self) -> Result<(), HypervisorError> {
        let TemplatePlan::Become { root, key } =
            std::mem::replace(&mut self.template, TemplatePlan::Off)
        else {
            return Ok(());
        };
        let Some(vm) = &self.vm else {
            return Ok(());
        };
        if let Err(error) = template::ensure_root(&root) {
            tracing::warn!(%error, root = %root.display(), "cannot create the template directory; no template is made");
            return Ok(());
        }
        let directory = root.join(&key);
        let started = Instant::now();
        let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = vm.pause() {
            // A refused pause leaves the VM running.
            tracing::warn!(%error, "cannot pause the VM to save it as a template");
            return Ok(());
        }
        let saved = vm.snapshot(&directory);
        let resumed = vm.resume();
        match saved {
            Ok(summary) => {
                let removed = template::prune(&root, &key);
                tracing::info!(
                    template = %directory.display(),
                    written_mib = summary.memory_written_bytes >> 20,
                    paused_ms = started.elapsed().as_millis() as u64,
                    old_templates_removed = removed,
                    "saved this VM as the template of its shape"
                );
            }
            Err(error) => {
                // Another pod may have saved the same template first.
                tracing::warn!(%error, "the VM was not saved as a template");
            }
        }
        resumed
            .context("cannot resume the VM after saving it as a template")
            .map_err(HypervisorError::from)
    }

    fn restored_from_template(&self) -> bool {
        matches!(self.template, TemplatePlan::Restored(_))
    }

    fn reject_template(&mut self, why: &str) {
        if let TemplatePlan::Restored(directory) =
            std::mem::replace(&mut self.template, TemplatePlan::Off)
        {
            template::reject(&directory, why);
        }
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
            template_root: None,
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
    fn a_vm_restores_a_usable_template_and_otherwise_boots_and_may_become_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(true);
        spec.kernel = dir.path().join("vmlinux");
        spec.initrd = dir.path().join("initramfs.cpio.gz");
        std::fs::write(&spec.kernel, b"kernel").unwrap();
        std::fs::write(&spec.initrd, b"initrd").unwrap();
        let devices = || vec![Box::new(BalloonDevice::new()) as Box<dyn VirtioDevice>];
        assert_eq!(
            choose_template_plan(&spec, &devices()),
            TemplatePlan::Off,
            "templates off"
        );

        let root = dir.path().join("templates");
        spec.template_root = Some(root.clone());
        let TemplatePlan::Become { root: chosen, key } = choose_template_plan(&spec, &devices())
        else {
            panic!("no template yet: the VM should become it");
        };
        assert_eq!(chosen, root);

        // A real snapshot of a VM with the same devices, where this host
        // has KVM: it is restored.
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => {
                let mut template = VmBuilder::new()
                    .flat_image(vec![0xfa, 0xf4, 0xeb, 0xfd], 0x10_0000)
                    .virtio_device(Box::new(BalloonDevice::new()))
                    .serial(SerialSink::Null)
                    .build()
                    .unwrap();
                template.start().unwrap();
                template.pause().unwrap();
                template::ensure_root(&root).unwrap();
                template.snapshot(&root.join(&key)).unwrap();
                template.stop();
                assert_eq!(
                    choose_template_plan(&spec, &devices()),
                    TemplatePlan::Restored(root.join(&key))
                );
                std::fs::remove_dir_all(root.join(&key)).unwrap();
                println!("husk-test-form: template plan: restore branch ran on /dev/kvm");
            }
            Err(error) => println!(
                "husk-test-form: template plan: restore branch NOT RUN, no /dev/kvm ({error})"
            ),
        }

        // A template directory whose manifest cannot be restored here (not
        // a snapshot at all) is left alone and the VM boots.
        std::fs::create_dir_all(root.join(&key)).unwrap();
        std::fs::write(
            root.join(&key).join(husk_vmm::snapshot::MANIFEST_FILE),
            b"{}",
        )
        .unwrap();
        assert_eq!(choose_template_plan(&spec, &devices()), TemplatePlan::Off);

        // No kernel, no key: the VM boots.
        std::fs::remove_file(&spec.kernel).unwrap();
        assert_eq!(choose_template_plan(&spec, &devices()), TemplatePlan::Off);
    }

    #[test]
    fn without_free_page_reporting_there_is_no_balloon() {
        let mut vm = BuiltinVm::new(spec(false)).unwrap();
        assert_eq!(device_types(&mut vm), Vec::<u32>::new());
    }
}
