//! The pod model against the fake hypervisor and the fake agent: what a
//! failed Create leaves (nothing), concurrent Creates, signals to finished
//! processes, the VM's death, and Delete undoing a container's resources.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use containerd_shim_protos::api::Mount;
use containerd_shim_protos::ttrpc::Code;

use super::{NewContainer, Pod, PodError};
use crate::resources::cleanup::mounts_below;
use crate::stdio::StdioRequest;
use crate::testing::fake_vm::{FakeLauncher, SharedFakeLauncher};
use crate::testing::{is_root, RecordedEvents};

struct World {
    dir: tempfile::TempDir,
    launcher: Arc<FakeLauncher>,
    events: Arc<RecordedEvents>,
    pod: Pod,
    config_path: PathBuf,
    bundles: AtomicUsize,
}

/// A pod with a fake VM, or `None` (said on stdout) where bind mounts
/// cannot be made.
fn world(test: &str) -> Option<World> {
    world_with(test, "")
}

/// [`world`] with `extra` appended to the configuration file.
fn world_with(test: &str, extra: &str) -> Option<World> {
    if !is_root() {
        println!("husk-test-form: {test}: not run: bind mounts into the share need root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    for artifact in ["vmlinux", "bzImage", "initrd"] {
        std::fs::write(dir.path().join(artifact), b"fake").unwrap();
    }
    let config_path = dir.path().join("configuration.toml");
    std::fs::write(
        &config_path,
        format!(
            "[hypervisor]\nkind = \"qemu\"\nkernel = \"{0}/vmlinux\"\nqemu_kernel = \"{0}/bzImage\"\ninitrd = \"{0}/initrd\"\n{1}",
            dir.path().display(),
            extra
        ),
    )
    .unwrap();
    let launcher = Arc::new(FakeLauncher::default());
    let events = Arc::new(RecordedEvents::default());
    let pod = Pod::new(
        "pod",
        "test",
        &dir.path().join("run"),
        Arc::new(SharedFakeLauncher(launcher.clone())),
        events.clone(),
    );
    Some(World {
        dir,
        launcher,
        events,
        pod,
        config_path,
        bundles: AtomicUsize::new(0),
    })
}

impl World {
    /// A bundle whose spec has `extra` JSON members, and a Create request
    /// whose rootfs is a bind mount of a prepared directory.
    fn request(&self, id: &str, extra: &str) -> NewContainer {
        let serial = self.bundles.fetch_add(1, Ordering::SeqCst);
        let bundle = self
            .dir
            .path()
            .join("bundles")
            .join(format!("{id}-{serial}"));
        let image = self.dir.path().join("images").join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::create_dir_all(image.join("bin")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            format!(r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}}{extra}}}"#),
        )
        .unwrap();
        NewContainer {
            id: id.to_owned(),
            bundle,
            rootfs: vec![Mount {
                type_: "bind".into(),
                source: image.display().to_string(),
                options: vec!["rbind".into()],
                ..Default::default()
            }],
            stdio: StdioRequest::default(),
            config_path: Some(self.config_path.clone()),
        }
    }

    fn sandbox_dir(&self, sandbox_id: &str) -> PathBuf {
        self.dir.path().join("run").join(sandbox_id)
    }

    /// Everything that must be gone when no container and no VM is left.
    fn assert_nothing_left(&self, what: &str) {
        assert_eq!(self.launcher.running(), 0, "{what}: a VM still runs");
        let mounts = mounts_below(self.dir.path());
        assert!(mounts.is_empty(), "{what}: mounts left: {mounts:?}");
        let run = self.dir.path().join("run");
        let left: Vec<_> = std::fs::read_dir(&run)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{what}: sandbox directories left: {left:?}"
        );
    }
}

fn volume_mount(source: &Path) -> String {
    format!(
        r#","mounts":[{{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}}]"#,
        source.display()
    )
}

#[tokio::test]
async fn a_create_that_fails_at_any_step_leaves_nothing_behind() {
    let Some(world) = world("a_create_that_fails_at_any_step_leaves_nothing_behind") else {
        return;
    };
    let volume = world.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();

    let mut no_spec = world.request("c1", "");
    std::fs::remove_file(no_spec.bundle.join("config.json")).unwrap();
    let mut bad_config = world.request("c1", "");
    bad_config.config_path = Some(world.dir.path().join("missing.toml"));
    let missing_volume = world.request("c1", &volume_mount(Path::new("/no/such/volume")));
    let mut bad_stdout = world.request("c1", &volume_mount(&volume));
    bad_stdout.stdio.stdout = world.dir.path().join("no/dir/stdout").display().to_string();
    let good = world.request("c1", &volume_mount(&volume));

    let steps: Vec<(&str, NewContainer, Code, &str)> = vec![
        (
            "spec",
            std::mem::take(&mut no_spec),
            Code::INVALID_ARGUMENT,
            "config.json",
        ),
        ("config", bad_config, Code::INVALID_ARGUMENT, "missing.toml"),
        ("vm start", good.clone(), Code::INTERNAL, "refuses to start"),
        (
            "volume",
            missing_volume,
            Code::INVALID_ARGUMENT,
            "/no/such/volume",
        ),
        ("stdio", bad_stdout, Code::INTERNAL, "stdio"),
        (
            "agent",
            good.clone(),
            Code::INTERNAL,
            "refuses CreateContainer",
        ),
    ];
    for (step, request, code, named) in steps {
        world
            .launcher
            .fail_start
            .store(step == "vm start", Ordering::SeqCst);
        world
            .launcher
            .agent
            .fail_create_container
            .store(step == "agent", Ordering::SeqCst);
        let error = world.pod.create(request).await.unwrap_err();
        assert_eq!(error.code(), code, "{step}: {error}");
        assert!(error.to_string().contains(named), "{step}: {error}");
        assert!(
            matches!(world.pod.container("c1"), Err(PodError::NotFound(_))),
            "{step}"
        );
        world.assert_nothing_left(step);
    }
    assert!(world.launcher.created.load(Ordering::SeqCst) >= 4);

    // Nothing was reserved either: the same id creates fine now.
    world
        .launcher
        .agent
        .fail_create_container
        .store(false, Ordering::SeqCst);
    world.pod.create(good).await.unwrap();
    assert_eq!(world.launcher.agent.containers(), vec!["c1".to_owned()]);
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after delete and shutdown");
}

#[tokio::test]
async fn two_concurrent_creates_in_one_pod_share_one_vm() {
    let Some(world) = world("two_concurrent_creates_in_one_pod_share_one_vm") else {
        return;
    };
    let pod_annotation = r#","annotations":{"io.kubernetes.cri.sandbox-id":"pod"}"#;
    let (first, second) = tokio::join!(
        world.pod.create(world.request("web", pod_annotation)),
        world.pod.create(world.request("web.mysql", pod_annotation)),
    );
    first.unwrap();
    second.unwrap();
    assert_eq!(world.launcher.created.load(Ordering::SeqCst), 1);
    let mut created = world.launcher.agent.containers();
    created.sort();
    assert_eq!(created, vec!["web".to_owned(), "web.mysql".to_owned()]);

    // Two Creates of one id: exactly one wins.
    let (a, b) = tokio::join!(
        world.pod.create(world.request("db", pod_annotation)),
        world.pod.create(world.request("db", pod_annotation)),
    );
    let codes: Vec<_> = [a, b]
        .into_iter()
        .map(|r| r.err().map(|e| e.code()))
        .collect();
    assert!(
        codes.contains(&None) && codes.contains(&Some(Code::ALREADY_EXISTS)),
        "{codes:?}"
    );

    // Deleting `web` leaves `web.mysql` whole in the share.
    let share = world.sandbox_dir("pod").join("share");
    world.pod.delete("web", "").await.unwrap();
    assert_eq!(world.launcher.agent.removed(), vec!["web".to_owned()]);
    assert!(!share.join("web").exists());
    assert!(share.join("web.mysql/rootfs/bin").is_dir());
    for id in ["web.mysql", "db"] {
        world.pod.delete(id, "").await.unwrap();
    }
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn a_container_named_like_a_volume_entry_does_not_collide() {
    let Some(world) = world("a_container_named_like_a_volume_entry_does_not_collide") else {
        return;
    };
    let volume = world.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("data.txt"), "volume").unwrap();
    let pod = r#","annotations":{"io.kubernetes.cri.sandbox-id":"pod"}"#;
    let with_volume = format!(
        r#","annotations":{{"io.kubernetes.cri.sandbox-id":"pod"}}{}"#,
        volume_mount(&volume)
    );
    world
        .pod
        .create(world.request("web", &with_volume))
        .await
        .unwrap();
    world
        .pod
        .create(world.request("web.m0", pod))
        .await
        .unwrap();
    let share = world.sandbox_dir("pod").join("share");
    assert_eq!(
        std::fs::read_to_string(share.join("web/volumes/0/data.txt")).unwrap(),
        "volume"
    );
    assert!(share.join("web.m0/rootfs/bin").is_dir());
    world.pod.delete("web.m0", "").await.unwrap();
    assert_eq!(
        std::fs::read_to_string(share.join("web/volumes/0/data.txt")).unwrap(),
        "volume"
    );
    world.pod.delete("web", "").await.unwrap();
    assert!(
        volume.join("data.txt").is_file(),
        "the host volume must survive"
    );
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn kill_of_an_exited_process_returns_not_found() {
    let Some(world) = world("kill_of_an_exited_process_returns_not_found") else {
        return;
    };
    world.pod.create(world.request("c1", "")).await.unwrap();
    world.pod.start("c1", "").await.unwrap();
    world.pod.kill("c1", "", 9, false).await.unwrap();
    assert_eq!(world.pod.wait("c1", "").await.unwrap().status, 137);
    let error = world.pod.kill("c1", "", 9, false).await.unwrap_err();
    assert_eq!(error.code(), Code::NOT_FOUND, "{error}");
    assert_eq!(world.events.topics(), vec!["/tasks/start", "/tasks/exit"]);
    assert!(world.events.on("/tasks/exit")[0].contains("137"));
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn a_vm_that_dies_ends_every_running_process_with_255() {
    let Some(world) = world("a_vm_that_dies_ends_every_running_process_with_255") else {
        return;
    };
    world.pod.create(world.request("c1", "")).await.unwrap();
    world.pod.start("c1", "").await.unwrap();
    world.launcher.crash();
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), world.pod.wait("c1", ""))
        .await
        .expect("the VM's end is noticed")
        .unwrap();
    assert_eq!(exit.status, 255);
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn a_hung_agent_is_declared_dead_and_kill_wait_delete_and_shutdown_finish() {
    let Some(world) = world_with(
        "a_hung_agent_is_declared_dead",
        "[timeouts]\nagent_call_ms = 200\nhealth_interval_ms = 50\nhealth_probe_ms = 50\nhealth_failures = 2\n",
    ) else {
        return;
    };
    let bound = std::time::Duration::from_secs(30);
    world.pod.create(world.request("c1", "")).await.unwrap();
    world.pod.start("c1", "").await.unwrap();
    world
        .launcher
        .agent
        .hung
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let kill = tokio::time::timeout(bound, world.pod.kill("c1", "", 15, false))
        .await
        .expect("Kill returns although the agent never answers");
    println!("Kill with a hung agent: {kill:?}");
    let exit = tokio::time::timeout(bound, world.pod.wait("c1", ""))
        .await
        .expect("the health check ends the wait")
        .unwrap();
    assert_eq!(exit.status, 255, "the dead guest's process exits with 255");
    // The exit may come from the failed WaitProcess first; the health
    // check then stops the VM.
    tokio::time::timeout(bound, async {
        while world.launcher.running() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the health check stops the dead guest's VM");
    tokio::time::timeout(bound, world.pod.delete("c1", ""))
        .await
        .expect("Delete returns")
        .unwrap();
    assert!(tokio::time::timeout(bound, world.pod.shutdown())
        .await
        .expect("Shutdown returns"));
    world.assert_nothing_left("after the dead guest");
}

#[tokio::test]
async fn shutdown_keeps_the_pod_while_a_container_remains() {
    let Some(world) = world("shutdown_keeps_the_pod_while_a_container_remains") else {
        return;
    };
    world.pod.create(world.request("c1", "")).await.unwrap();
    assert!(!world.pod.shutdown().await);
    assert_eq!(world.launcher.running(), 1);
    let error = world.pod.delete("c2", "").await.unwrap_err();
    assert_eq!(error.code(), Code::NOT_FOUND);
    for stdin in [true, false] {
        let error = world
            .pod
            .close_io("c1", "no-such-exec", stdin)
            .await
            .unwrap_err();
        assert_eq!(
            error.code(),
            Code::NOT_FOUND,
            "CloseIO stdin={stdin}: {error}"
        );
    }
    world.pod.close_io("c1", "", true).await.unwrap();
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn guest_oom_events_reach_containerd_only_for_this_pods_containers_and_once() {
    let Some(world) =
        world("guest_oom_events_reach_containerd_only_for_this_pods_containers_and_once")
    else {
        return;
    };
    world.pod.create(world.request("c1", "")).await.unwrap();
    let agent = &world.launcher.agent;
    for id in ["c1", "someone-elses-container", "c1", "../../etc", "c1"] {
        agent.push_oom(id);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while world.pod.dropped_guest_events() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(world.pod.dropped_guest_events(), 4);
    let published = world.events.on("/tasks/oom");
    assert_eq!(published.len(), 1, "{published:?}");
    assert!(published[0].contains("c1"));
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}

#[tokio::test]
async fn volumes_are_nosuid_nodev_on_the_host_and_ro_volumes_are_read_only_there() {
    let Some(world) =
        world("volumes_are_nosuid_nodev_on_the_host_and_ro_volumes_are_read_only_there")
    else {
        return;
    };
    let (writable, readonly) = (world.dir.path().join("rw"), world.dir.path().join("ro"));
    for dir in [&writable, &readonly] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mounts = format!(
        r#","mounts":[{{"destination":"/rw","type":"bind","source":"{}","options":["rbind"]}},
                      {{"destination":"/ro","type":"bind","source":"{}","options":["rbind","ro"]}}]"#,
        writable.display(),
        readonly.display()
    );
    world
        .pod
        .create(world.request("c1", &mounts))
        .await
        .unwrap();
    let volumes = world.sandbox_dir("c1").join("share/c1/volumes");
    // Root writes through a read-write volume, and not through a ro one:
    // the host refuses, whatever the guest kernel would have done.
    std::fs::write(volumes.join("0/written"), "x").unwrap();
    let error = std::fs::write(volumes.join("1/written"), "x").unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "{error}");
    assert!(!readonly.join("written").exists());
    let table = husk_mountinfo::read_self().unwrap();
    let options = |path: &Path| {
        table
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .map(|m| m.mount_options.clone())
            .unwrap_or_default()
    };
    let share = world.sandbox_dir("c1").join("share/c1");
    for (path, ro) in [
        (share.join("rootfs"), false),
        (volumes.join("0"), false),
        (volumes.join("1"), true),
    ] {
        let options = options(&path);
        let has = |flag: &str| options.split(',').any(|o| o == flag);
        assert!(
            has("nosuid") && has("nodev"),
            "{}: {options}",
            path.display()
        );
        assert_eq!(has("ro"), ro, "{}: {options}", path.display());
    }
    world.pod.delete("c1", "").await.unwrap();
    assert!(world.pod.shutdown().await);
    world.assert_nothing_left("after the pod");
}
