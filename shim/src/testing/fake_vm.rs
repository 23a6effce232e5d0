//! A fake hypervisor: "starting" the VM serves a [`FakeAgent`] on a Unix
//! socket in the VM's work directory, "stopping" it ends that server, and
//! a test can crash it to see the pod notice. The launcher counts what it
//! did so tests can check that no VM outlives a failed Create.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_agent_client::Endpoint;
use tokio::sync::watch;

use super::fake_agent::{FakeAgent, FakeAgentServer};
use crate::hypervisor::{
    Device, ExitWatcher, Hypervisor, HypervisorError, Launcher, VmInfo, VmSpec,
};

/// Makes fake VMs that all serve one [`FakeAgent`].
#[derive(Default)]
pub struct FakeLauncher {
    pub agent: Arc<FakeAgent>,
    /// `start` fails when set.
    pub fail_start: AtomicBool,
    pub created: AtomicUsize,
    pub started: AtomicUsize,
    pub stopped: AtomicUsize,
    /// Crashes the running VM (its exit watcher resolves).
    crash: Mutex<Option<watch::Sender<bool>>>,
    /// The devices the last VM was given, by kind.
    pub devices: Mutex<Vec<&'static str>>,
}

impl FakeLauncher {
    /// VMs started and not stopped.
    pub fn running(&self) -> usize {
        self.started.load(Ordering::SeqCst) - self.stopped.load(Ordering::SeqCst)
    }

    /// Ends the running VM as if the VMM died.
    pub fn crash(&self) {
        if let Some(crash) = self.crash.lock().unwrap().as_ref() {
            crash.send_replace(true);
        }
    }
}

struct FakeVm {
    launcher: Arc<FakeLauncher>,
    socket: PathBuf,
    server: Option<FakeAgentServer>,
    ended: watch::Sender<bool>,
}

/// The launcher the pod holds: shares the counters with the test.
pub struct SharedFakeLauncher(pub Arc<FakeLauncher>);

impl Launcher for SharedFakeLauncher {
    fn create(&self, spec: VmSpec) -> Result<Box<dyn Hypervisor>, HypervisorError> {
        self.0.created.fetch_add(1, Ordering::SeqCst);
        self.0.devices.lock().unwrap().clear();
        let (ended, _) = watch::channel(false);
        *self.0.crash.lock().unwrap() = Some(ended.clone());
        Ok(Box::new(FakeVm {
            launcher: self.0.clone(),
            socket: spec.work_dir.join("fake-agent.sock"),
            server: None,
            ended,
        }))
    }
}

impl Hypervisor for FakeVm {
    fn add_device(&mut self, device: Device) -> Result<(), HypervisorError> {
        self.launcher.devices.lock().unwrap().push(device.kind());
        Ok(())
    }

    fn start(&mut self) -> Result<(), HypervisorError> {
        if self.launcher.fail_start.load(Ordering::SeqCst) {
            return Err(anyhow::anyhow!("the fake VM refuses to start").into());
        }
        let server = FakeAgentServer::start(self.launcher.agent.clone(), &self.socket)
            .map_err(|e| anyhow::anyhow!("the fake agent cannot serve: {e}"))?;
        self.server = Some(server);
        self.launcher.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn describe(&self) -> VmInfo {
        VmInfo {
            backend: "fake",
            accelerator: "none".into(),
            vmm_pid: std::process::id(),
        }
    }

    fn agent_endpoint(&self) -> Result<Endpoint, HypervisorError> {
        Ok(Endpoint::Unix {
            api_socket: self.socket.clone(),
            stdio_socket: self.socket.with_file_name("fake-stdio.sock"),
        })
    }

    fn exit_watcher(&self) -> Result<ExitWatcher, HypervisorError> {
        let mut ended = self.ended.subscribe();
        Ok(Box::pin(async move {
            let _ = ended.wait_for(|ended| *ended).await;
            "the fake VM ended".to_owned()
        }))
    }

    fn stop(&mut self, _grace: Duration) -> String {
        if self.server.take().is_some() {
            self.launcher.stopped.fetch_add(1, Ordering::SeqCst);
        }
        self.ended.send_replace(true);
        "stopped".to_owned()
    }
}
