//! The pod's share on the host, checked as the guest sees it: ids are
//! checked before any path is built; the guest's view is read-only around
//! the container mounts, so it can neither plant, rename nor create
//! anything the host later walks; a rootfs, volumes and files are
//! bind-mounted (files live, not copied), `ro` ones read-only on the host;
//! non-regular sources are refused; the tree is capped; removal and drop
//! unmount exactly what was mounted.
//!
//! Bind mounts need CAP_SYS_ADMIN; these tests run as root (as the shim
//! does) and say so loudly instead of passing vacuously when they cannot.

// The FUSE client that plays the guest lives with the virtio-fs suites.
#[path = "../../devices/tests/fs_support/mod.rs"]
mod fs_support;

mod shared_dir {
    use std::path::{Path, PathBuf};

    use husk_devices::fs::FsConfig;
    use husk_shim::resources::{Access, ShareTreeLimits, SharedDirError, SharedDirectory};

    use super::fs_support::{FuseClient, TestDir, ROOT_ID};

    const LIMITS: ShareTreeLimits = ShareTreeLimits {
        max_bytes: 1 << 20,
        max_inodes: 1024,
    };

    fn require_root(test: &str) {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "{test} needs root for bind mounts; run the fs tests as root"
        );
    }

    fn mounts_below(path: &Path) -> Vec<PathBuf> {
        husk_mountinfo::mount_points_below(&husk_mountinfo::read_self().unwrap(), path)
    }

    fn mount_at(path: &Path) -> Option<husk_mountinfo::MountInfo> {
        husk_mountinfo::read_self()
            .unwrap()
            .into_iter()
            .rev()
            .find(|m| m.mount_point == path)
    }

    fn is_mounted(path: &Path) -> bool {
        mount_at(path).is_some()
    }

    /// A sandbox directory plus a container rootfs to put in its share.
    struct Setup {
        base: TestDir,
    }

    impl Setup {
        fn new(label: &str) -> Self {
            let base = TestDir::new(label).unwrap();
            std::fs::create_dir(base.path().join("sandbox")).unwrap();
            std::fs::create_dir_all(base.path().join("bundle/rootfs/bin")).unwrap();
            std::fs::write(base.path().join("bundle/rootfs/bin/sh"), b"#!busybox").unwrap();
            Self { base }
        }
        fn sandbox(&self) -> PathBuf {
            self.base.path().join("sandbox")
        }
        fn view(&self) -> PathBuf {
            self.sandbox().join("share")
        }
        fn host_side(&self) -> PathBuf {
            self.sandbox().join("mounts")
        }
        fn rootfs(&self) -> PathBuf {
            self.base.path().join("bundle/rootfs")
        }
        fn share(&self) -> SharedDirectory {
            SharedDirectory::create(&self.sandbox(), LIMITS).unwrap()
        }
        fn guest(&self) -> FuseClient {
            FuseClient::new(&FsConfig::new(self.view()))
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            // A failed assertion must not leave mounts behind.
            for point in mounts_below(self.base.path()) {
                let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    #[test]
    fn fs_add_container_rejects_ids_that_are_not_one_safe_component_and_names_them() {
        require_root("fs_add_container_rejects...");
        let setup = Setup::new("ids");
        let share = setup.share();
        let too_long = "a".repeat(77);
        for id in [
            "",
            ".",
            "..",
            "a/b",
            "../escape",
            "/abs",
            "nul\0byte",
            "sp ace",
            too_long.as_str(),
        ] {
            let error = share.add_container(id, &setup.rootfs()).unwrap_err();
            assert!(
                matches!(&error, SharedDirError::InvalidContainerId { id: named, .. } if named == id),
                "{error}"
            );
            assert!(
                error.to_string().contains(&format!("{id:?}")),
                "message names the id: {error}"
            );
        }
        assert!(share.remove_container("../x").is_err());
        assert_eq!(
            std::fs::read_dir(setup.view()).unwrap().count(),
            0,
            "nothing was created"
        );
        share
            .add_container(&"a".repeat(76), &setup.rootfs())
            .unwrap();
    }

    #[test]
    fn fs_the_guest_view_is_a_read_only_private_slave_of_a_capped_tmpfs() {
        require_root("fs_the_guest_view_is...");
        let setup = Setup::new("layout");
        let share = setup.share();
        assert_eq!(share.root(), setup.view());
        let sandbox = mount_at(&setup.sandbox()).expect("the sandbox dir is a mount");
        assert!(
            !sandbox
                .optional_fields
                .iter()
                .any(|f| f.starts_with("shared:")),
            "the sandbox dir propagates nowhere: {:?}",
            sandbox.optional_fields
        );
        let host_side = mount_at(&setup.host_side()).expect("the host side is a mount");
        assert_eq!(host_side.fs_type, "tmpfs");
        assert!(
            host_side.super_options.contains("size=1024k"),
            "{}",
            host_side.super_options
        );
        assert!(
            host_side.super_options.contains("nr_inodes=1024"),
            "{}",
            host_side.super_options
        );
        for flag in ["nosuid", "nodev", "noexec"] {
            assert!(
                host_side.mount_options.contains(flag),
                "{}",
                host_side.mount_options
            );
        }
        let view = mount_at(&setup.view()).expect("the view is a mount");
        assert!(
            view.mount_options.starts_with("ro"),
            "{}",
            view.mount_options
        );
        assert!(
            view.optional_fields
                .iter()
                .any(|f| f.starts_with("master:")),
            "the view receives the host side's mounts: {:?}",
            view.optional_fields
        );
        drop(share);
        assert!(
            mounts_below(&setup.sandbox()).is_empty(),
            "drop undoes the layout"
        );
    }

    #[test]
    fn fs_add_container_bind_mounts_the_rootfs_where_the_guest_reads_and_writes_it() {
        require_root("fs_add_container_bind_mounts...");
        let setup = Setup::new("mount");
        let share = setup.share();
        let target = share.add_container("c1", &setup.rootfs()).unwrap();
        assert_eq!(target, setup.view().join("c1/rootfs"));
        assert_eq!(
            SharedDirectory::rootfs_relative_path("c1").unwrap(),
            Path::new("c1/rootfs")
        );
        assert!(is_mounted(&target), "{} is a mount point", target.display());
        let rootfs_mount = mount_at(&target).unwrap();
        assert!(
            rootfs_mount.mount_options.starts_with("rw")
                && rootfs_mount.mount_options.contains("nosuid")
                && rootfs_mount.mount_options.contains("nodev"),
            "{}",
            rootfs_mount.mount_options
        );
        assert_eq!(share.containers(), ["c1"]);

        // The guest, served from the view, walks to the container's file
        // and writes into its rootfs.
        let mut client = setup.guest();
        let c1 = client.lookup(ROOT_ID, "c1").unwrap();
        let rootfs = client.lookup(c1.nodeid, "rootfs").unwrap();
        let bin = client.lookup(rootfs.nodeid, "bin").unwrap();
        let sh = client.lookup(bin.nodeid, "sh").unwrap();
        let open = client.open(sh.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(
            client.read(sh.nodeid, open.fh, 0, 64).unwrap(),
            b"#!busybox"
        );
        client.release(sh.nodeid, open.fh).unwrap();
        client.mkdir(rootfs.nodeid, "tmp", 0o755).unwrap();
        assert!(
            setup.rootfs().join("tmp").is_dir(),
            "the guest writes its rootfs"
        );

        let error = share.add_container("c1", &setup.rootfs()).unwrap_err();
        assert!(
            matches!(error, SharedDirError::AlreadyAdded { .. }),
            "{error}"
        );

        share.remove_container("c1").unwrap();
        assert!(!is_mounted(&target));
        assert!(mounts_below(&setup.host_side().join("c1")).is_empty());
        assert!(
            !setup.view().join("c1").exists(),
            "the container directory is gone"
        );
        assert_eq!(
            std::fs::read(setup.rootfs().join("bin/sh")).unwrap(),
            b"#!busybox",
            "the source is intact"
        );
        assert!(share.containers().is_empty());
        let error = share.remove_container("c1").unwrap_err();
        assert!(matches!(error, SharedDirError::NotAdded { .. }), "{error}");
    }

    #[test]
    fn fs_the_guest_can_plant_rename_or_create_nothing_in_the_shares_tree() {
        require_root("fs_the_guest_can_plant...");
        let setup = Setup::new("plant");
        let victim = setup.base.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let share = setup.share();
        share.add_container("c1", &setup.rootfs()).unwrap();
        let mut client = setup.guest();
        let c1 = client.lookup(ROOT_ID, "c1").unwrap();
        assert_eq!(
            client
                .symlink(ROOT_ID, "c2", victim.to_str().unwrap())
                .unwrap_err(),
            libc::EROFS,
            "a symlink where the next container goes"
        );
        assert_eq!(
            client
                .symlink(c1.nodeid, "files", victim.to_str().unwrap())
                .unwrap_err(),
            libc::EROFS,
            "a symlink where the container's files go"
        );
        assert_eq!(client.mkdir(ROOT_ID, "c3", 0o755).unwrap_err(), libc::EROFS);
        assert_eq!(
            client
                .rename(ROOT_ID, "c1", ROOT_ID, "elsewhere")
                .unwrap_err(),
            libc::EROFS
        );
        assert_eq!(client.unlink(c1.nodeid, "rootfs").unwrap_err(), libc::EROFS);
        share.add_container("c2", &setup.rootfs()).unwrap();
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        share.remove_container("c1").unwrap();
        share.remove_container("c2").unwrap();
        assert!(mounts_below(&setup.host_side())
            .iter()
            .all(|m| m == &setup.host_side()));
    }

    #[test]
    fn fs_volumes_and_files_are_bind_mounted_live_and_ro_stays_ro_on_the_host() {
        require_root("fs_volumes_and_files...");
        let setup = Setup::new("binds");
        let host = setup.base.path().join("host");
        std::fs::create_dir_all(host.join("data")).unwrap();
        std::fs::create_dir_all(host.join("secret")).unwrap();
        std::fs::write(host.join("secret/key"), b"k1").unwrap();
        std::fs::write(host.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
        std::fs::write(host.join("resolv.conf"), b"nameserver 10.0.0.1\n").unwrap();
        let share = setup.share();
        share.add_container("c1", &setup.rootfs()).unwrap();
        let data = share
            .add_bind("c1", 1, &host.join("data"), Access::ReadWrite)
            .unwrap();
        let secret = share
            .add_bind("c1", 2, &host.join("secret"), Access::ReadOnly)
            .unwrap();
        let hosts = share
            .add_bind("c1", 3, &host.join("hosts"), Access::ReadWrite)
            .unwrap();
        let resolv = share
            .add_bind("c1", 4, &host.join("resolv.conf"), Access::ReadOnly)
            .unwrap();
        assert_eq!(data, Path::new("c1/volumes/1"));
        assert_eq!(secret, Path::new("c1/volumes/2"));
        let hosts_name = hosts.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(hosts.starts_with("c1/files"), "{}", hosts.display());
        assert!(
            hosts_name.starts_with("3-") && hosts_name.len() == 2 + 16,
            "an unpredictable name: {hosts_name}"
        );
        let resolv_name = resolv.file_name().unwrap().to_str().unwrap().to_owned();
        assert_ne!(hosts_name[2..], resolv_name[2..]);

        let mut client = setup.guest();
        let c1 = client.lookup(ROOT_ID, "c1").unwrap();
        let volumes = client.lookup(c1.nodeid, "volumes").unwrap();
        let files = client.lookup(c1.nodeid, "files").unwrap();
        // rw volume: the guest's file reaches the host directory.
        let data_dir = client.lookup(volumes.nodeid, "1").unwrap();
        let created = client
            .create(data_dir.nodeid, "out.txt", 0o644, libc::O_WRONLY)
            .unwrap();
        client
            .write(created.0.nodeid, created.1.fh, 0, b"written")
            .unwrap();
        client.release(created.0.nodeid, created.1.fh).unwrap();
        assert_eq!(
            std::fs::read(host.join("data/out.txt")).unwrap(),
            b"written"
        );
        // ro volume: refused by the host's own mount.
        let secret_dir = client.lookup(volumes.nodeid, "2").unwrap();
        let key = client.lookup(secret_dir.nodeid, "key").unwrap();
        assert_eq!(
            client.open(key.nodeid, libc::O_WRONLY).unwrap_err(),
            libc::EROFS
        );
        assert_eq!(
            client
                .create(secret_dir.nodeid, "planted", 0o644, libc::O_WRONLY)
                .unwrap_err(),
            libc::EROFS
        );
        assert_eq!(std::fs::read_dir(host.join("secret")).unwrap().count(), 1);
        // A file: live, so the kubelet's later rewrite is seen.
        let hosts_file = client.lookup(files.nodeid, &hosts_name).unwrap();
        std::fs::write(host.join("hosts"), b"10.1.1.1 pod\n").unwrap();
        let open = client.open(hosts_file.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(
            client.read(hosts_file.nodeid, open.fh, 0, 64).unwrap(),
            b"10.1.1.1 pod\n"
        );
        client.release(hosts_file.nodeid, open.fh).unwrap();
        let resolv_file = client.lookup(files.nodeid, &resolv_name).unwrap();
        assert_eq!(
            client.open(resolv_file.nodeid, libc::O_WRONLY).unwrap_err(),
            libc::EROFS
        );
        assert_eq!(
            std::fs::read(host.join("resolv.conf")).unwrap(),
            b"nameserver 10.0.0.1\n"
        );

        share.remove_container("c1").unwrap();
        assert!(mounts_below(&setup.host_side().join("c1")).is_empty());
        assert!(mounts_below(&setup.view())
            .iter()
            .all(|m| m == &setup.view()));
        assert_eq!(
            std::fs::read(host.join("hosts")).unwrap(),
            b"10.1.1.1 pod\n"
        );
        assert_eq!(std::fs::read(host.join("secret/key")).unwrap(), b"k1");
    }

    #[test]
    fn fs_a_non_regular_bind_source_is_refused_naming_it_and_nothing_is_made() {
        require_root("fs_a_non_regular_bind_source...");
        let setup = Setup::new("fifo");
        let fifo = setup.base.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let share = setup.share();
        share.add_container("c1", &setup.rootfs()).unwrap();
        for source in [Path::new("/dev/zero"), fifo.as_path()] {
            let error = share
                .add_bind("c1", 0, source, Access::ReadWrite)
                .unwrap_err();
            assert!(
                matches!(error, SharedDirError::NotShareable { .. }),
                "{error}"
            );
            let message = error.to_string();
            assert!(
                message.contains(source.to_str().unwrap())
                    && message.contains("neither a directory nor a regular file"),
                "{message}"
            );
        }
        let missing = share
            .add_bind("c1", 0, Path::new("/no/such/dir"), Access::ReadWrite)
            .unwrap_err();
        assert!(missing.to_string().contains("/no/such/dir"), "{missing}");
        let entries: Vec<_> = std::fs::read_dir(setup.host_side().join("c1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["rootfs"], "no volume or file entry was made");
    }

    #[test]
    fn fs_the_share_tree_is_capped_in_inodes() {
        require_root("fs_the_share_tree_is_capped...");
        let setup = Setup::new("cap");
        let limits = ShareTreeLimits {
            max_bytes: 1 << 20,
            max_inodes: 16,
        };
        let share = SharedDirectory::create(&setup.sandbox(), limits).unwrap();
        let mut added = 0;
        let error = loop {
            match share.add_container(&format!("c{added}"), &setup.rootfs()) {
                Ok(_) => added += 1,
                Err(error) => break error,
            }
            assert!(added < 16, "the cap never bit");
        };
        assert!(added >= 1, "at least one container fits");
        let message = error.to_string();
        assert!(message.contains("No space left on device"), "{message}");
        drop(share);
        assert!(mounts_below(&setup.sandbox()).is_empty());
    }

    #[test]
    fn fs_dropping_the_shared_directory_unmounts_every_container() {
        require_root("fs_dropping_the_shared_directory...");
        let setup = Setup::new("drop");
        let share = setup.share();
        let first = share.add_container("one", &setup.rootfs()).unwrap();
        let second = share.add_container("two", &setup.rootfs()).unwrap();
        drop(share);
        assert!(!is_mounted(&first) && !is_mounted(&second));
        assert!(mounts_below(&setup.sandbox()).is_empty());
    }

    #[test]
    fn fs_making_a_share_in_a_missing_sandbox_directory_names_it() {
        require_root("fs_making_a_share_in_a_missing...");
        let setup = Setup::new("missing");
        let missing = setup.base.path().join("nope");
        let error = SharedDirectory::create(&missing, LIMITS).err().unwrap();
        let chain = format!("{:#}", anyhow::Error::from(error));
        assert!(chain.contains(missing.to_str().unwrap()), "{chain}");
        assert!(mounts_below(setup.base.path()).is_empty());
    }
}
