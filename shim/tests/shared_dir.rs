//! Host-side container directories in a live share: ids are checked before
//! any path is built, a rootfs is bind-mounted at `<share>/<id>/rootfs`
//! where the guest sees it, and removal unmounts exactly that mount even
//! when the guest has planted symlinks or renamed directories.
//!
//! Bind mounts need CAP_SYS_ADMIN; these tests run as root (as the shim
//! does) and say so loudly instead of passing vacuously when they cannot.

// The FUSE client that plays the guest lives with the virtio-fs suites.
#[path = "../../devices/tests/fs_support/mod.rs"]
mod fs_support;

mod shared_dir {
    use std::path::Path;

    use husk_devices::fs::FsConfig;
    use husk_shim::resources::{SharedDirError, SharedDirectory};

    use super::fs_support::{FuseClient, TestDir, ROOT_ID};

    fn require_root(test: &str) {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "{test} needs root for bind mounts; run the fs tests as root"
        );
    }

    fn is_mounted(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(path))
    }

    /// A share plus a container rootfs to put in it.
    struct Setup {
        base: TestDir,
    }

    impl Setup {
        fn new(label: &str) -> Self {
            let base = TestDir::new(label).unwrap();
            std::fs::create_dir(base.path().join("share")).unwrap();
            std::fs::create_dir_all(base.path().join("bundle/rootfs/bin")).unwrap();
            std::fs::write(base.path().join("bundle/rootfs/bin/sh"), b"#!busybox").unwrap();
            Self { base }
        }
        fn share(&self) -> std::path::PathBuf {
            self.base.path().join("share")
        }
        fn rootfs(&self) -> std::path::PathBuf {
            self.base.path().join("bundle/rootfs")
        }
    }

    #[test]
    fn fs_add_container_rejects_ids_that_are_not_one_safe_component_and_names_them() {
        require_root("fs_add_container_rejects...");
        let setup = Setup::new("ids");
        let share = SharedDirectory::open(&setup.share()).unwrap();
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
            std::fs::read_dir(setup.share()).unwrap().count(),
            0,
            "nothing was created"
        );
        share
            .add_container(&"a".repeat(76), &setup.rootfs())
            .unwrap();
    }

    #[test]
    fn fs_add_container_bind_mounts_the_rootfs_where_the_guest_reads_it_and_remove_unmounts_it() {
        require_root("fs_add_container_bind_mounts...");
        let setup = Setup::new("mount");
        let share = SharedDirectory::open(&setup.share()).unwrap();
        let target = share.add_container("c1", &setup.rootfs()).unwrap();
        assert_eq!(target, setup.share().join("c1/rootfs"));
        assert_eq!(
            SharedDirectory::rootfs_relative_path("c1").unwrap(),
            Path::new("c1/rootfs")
        );
        assert!(is_mounted(&target), "{} is a mount point", target.display());
        assert_eq!(share.containers(), ["c1"]);

        // The guest, served from the same share, walks to the container's file.
        let mut client = FuseClient::new(&FsConfig::new(setup.share()));
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

        let error = share.add_container("c1", &setup.rootfs()).unwrap_err();
        assert!(
            matches!(error, SharedDirError::AlreadyAdded { .. }),
            "{error}"
        );

        share.remove_container("c1").unwrap();
        assert!(!is_mounted(&target));
        assert!(
            !setup.share().join("c1").exists(),
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
    fn fs_add_container_refuses_an_id_the_guest_planted_as_a_symlink() {
        require_root("fs_add_container_refuses...");
        let setup = Setup::new("plant");
        let victim = setup.base.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let share = SharedDirectory::open(&setup.share()).unwrap();
        let mut client = FuseClient::new(&FsConfig::new(setup.share()));
        client
            .symlink(ROOT_ID, "c2", victim.to_str().unwrap())
            .unwrap();

        let error = share.add_container("c2", &setup.rootfs()).unwrap_err();
        assert!(
            matches!(
                error,
                SharedDirError::Io {
                    operation: "create",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("c2"), "{error}");
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "nothing was created through the link"
        );
        assert!(!is_mounted(&victim.join("rootfs")));
        assert!(share.containers().is_empty());
        assert!(
            std::fs::symlink_metadata(setup.share().join("c2"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "the guest's entry is left alone"
        );
    }

    #[test]
    fn fs_remove_container_unmounts_after_the_guest_renamed_its_directory() {
        require_root("fs_remove_container_unmounts...");
        let setup = Setup::new("moved");
        let share = SharedDirectory::open(&setup.share()).unwrap();
        share.add_container("c3", &setup.rootfs()).unwrap();
        let mut client = FuseClient::new(&FsConfig::new(setup.share()));
        client.rename(ROOT_ID, "c3", ROOT_ID, "elsewhere").unwrap();
        let moved = setup.share().join("elsewhere/rootfs");
        assert!(is_mounted(&moved));

        share.remove_container("c3").unwrap();
        assert!(
            !is_mounted(&moved),
            "the mount is gone wherever the guest moved it"
        );
        assert_eq!(
            std::fs::read(setup.rootfs().join("bin/sh")).unwrap(),
            b"#!busybox"
        );
    }

    #[test]
    fn fs_dropping_the_shared_directory_unmounts_every_container() {
        require_root("fs_dropping_the_shared_directory...");
        let setup = Setup::new("drop");
        let share = SharedDirectory::open(&setup.share()).unwrap();
        let first = share.add_container("one", &setup.rootfs()).unwrap();
        let second = share.add_container("two", &setup.rootfs()).unwrap();
        drop(share);
        assert!(!is_mounted(&first) && !is_mounted(&second));
        assert_eq!(std::fs::read_dir(setup.share()).unwrap().count(), 0);
    }

    #[test]
    fn fs_opening_a_missing_shared_directory_names_it() {
        let setup = Setup::new("missing");
        let missing = setup.base.path().join("nope");
        let error = SharedDirectory::open(&missing).err().unwrap();
        assert!(
            error.to_string().contains(missing.to_str().unwrap()),
            "{error}"
        );
    }
}
