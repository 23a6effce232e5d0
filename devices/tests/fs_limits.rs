//! virtio-fs limits on what the guest makes the share hold: inodes (one
//! host fd each, `max_open_inodes`) and open files and directories
//! (`max_open_handles`). Requests go through the device as FUSE messages;
//! the tests check the replies and the device's own counts.

mod fs_support;

mod virtio_fs {
    use husk_devices::fs::FsConfig;

    use super::fs_support::{FuseClient, TestDir, ROOT_ID};

    const ENFILE: Option<i32> = Some(libc::ENFILE);

    /// A share holding `files` empty files `f0`, `f1`, ..., with the limits.
    fn share(label: &str, files: usize, inodes: usize, handles: usize) -> (TestDir, FsConfig) {
        let dir = TestDir::new(label).unwrap();
        for index in 0..files {
            std::fs::write(dir.path().join(format!("f{index}")), b"x").unwrap();
        }
        let mut config = FsConfig::new(dir.path());
        config.max_open_inodes = inodes;
        config.max_open_handles = handles;
        (dir, config)
    }

    #[test]
    fn fs_the_lookup_past_max_open_inodes_fails_with_enfile_until_the_guest_forgets_one() {
        let (_dir, config) = share("inode-cap", 4, 3, 16);
        let mut client = FuseClient::new(&config);
        let nodes: Vec<u64> = (0..3)
            .map(|index| client.lookup(ROOT_ID, &format!("f{index}")).unwrap().nodeid)
            .collect();
        assert_eq!(client.model.open_inodes(), 3);
        assert_eq!(client.lookup(ROOT_ID, "f3").err(), ENFILE);
        // Inodes the guest holds still resolve, and the root is not counted.
        assert_eq!(client.lookup(ROOT_ID, "f0").unwrap().nodeid, nodes[0]);
        client.getattr(ROOT_ID).unwrap();
        assert_eq!(client.lookup(ROOT_ID, "f3").err(), ENFILE);
        // f0 was looked up twice: it is gone after forgetting both.
        client.forget(nodes[0], 1);
        assert_eq!(client.lookup(ROOT_ID, "f3").err(), ENFILE);
        client.forget(nodes[0], 1);
        assert_eq!(client.model.open_inodes(), 2);
        let f3 = client.lookup(ROOT_ID, "f3").unwrap().nodeid;
        assert_eq!(client.lookup(ROOT_ID, "f0").err(), ENFILE);
        // BATCH_FORGET frees as well.
        client.batch_forget(&[(nodes[1], 1), (f3, 1)]);
        assert_eq!(client.model.open_inodes(), 1);
        client.lookup(ROOT_ID, "f0").unwrap();
    }

    #[test]
    fn fs_creations_past_max_open_inodes_fail_before_touching_the_host() {
        let (dir, config) = share("inode-cap-create", 0, 2, 16);
        let mut client = FuseClient::new(&config);
        let sub = client.mkdir(ROOT_ID, "sub", 0o755).unwrap().nodeid;
        client.symlink(ROOT_ID, "link", "sub").unwrap();
        assert_eq!(client.mkdir(ROOT_ID, "more", 0o755).err(), ENFILE);
        assert_eq!(
            client
                .mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0)
                .err(),
            ENFILE
        );
        assert_eq!(
            client
                .create(ROOT_ID, "file", 0o644, libc::O_RDWR | libc::O_CREAT)
                .err(),
            ENFILE
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["link", "sub"], "nothing refused was created");
        client.forget(sub, 1);
        client
            .create(ROOT_ID, "file", 0o644, libc::O_RDWR | libc::O_CREAT)
            .unwrap();
        assert_eq!(client.model.open_inodes(), 2);
    }

    #[test]
    fn fs_readdirplus_past_max_open_inodes_lists_every_name_but_only_counted_ones_get_a_node_id() {
        let (_dir, config) = share("inode-cap-readdirplus", 3, 2, 16);
        let mut client = FuseClient::new(&config);
        let root = client.opendir(ROOT_ID).unwrap().fh;
        let mut entries = client.readdirplus(ROOT_ID, root).unwrap();
        entries.sort();
        let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["f0", "f1", "f2"]);
        let with_node: Vec<u64> = entries
            .iter()
            .map(|(_, node)| *node)
            .filter(|node| *node != 0)
            .collect();
        assert_eq!(with_node.len(), 2, "{entries:?}");
        assert_eq!(client.model.open_inodes(), 2);
        let unlisted = entries.iter().find(|(_, node)| *node == 0).unwrap();
        assert_eq!(client.lookup(ROOT_ID, &unlisted.0).err(), ENFILE);
        client.forget(with_node[0], 1);
        client.lookup(ROOT_ID, &unlisted.0).unwrap();
        assert_eq!(client.model.open_inodes(), 2);
    }

    #[test]
    fn fs_opens_past_max_open_handles_fail_with_enfile_until_one_is_released() {
        let (_dir, config) = share("handle-cap", 1, 16, 2);
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "f0").unwrap().nodeid;
        let first = client.open(file, libc::O_RDONLY).unwrap().fh;
        let _root_handle = client.opendir(ROOT_ID).unwrap().fh;
        assert_eq!(client.model.open_handles(), 2);
        assert_eq!(client.open(file, libc::O_RDONLY).err(), ENFILE);
        assert_eq!(client.opendir(ROOT_ID).err(), ENFILE);
        assert_eq!(
            client
                .create(ROOT_ID, "new", 0o644, libc::O_RDWR | libc::O_CREAT)
                .err(),
            ENFILE
        );
        // A RELEASE of a handle that does not exist frees nothing.
        assert!(client.release(file, 9999).is_err());
        assert_eq!(client.open(file, libc::O_RDONLY).err(), ENFILE);
        client.release(file, first).unwrap();
        assert_eq!(client.model.open_handles(), 1);
        client.open(file, libc::O_RDONLY).unwrap();
    }

    #[test]
    fn fs_a_new_init_starts_the_counts_afresh() {
        let (_dir, config) = share("cap-reinit", 2, 1, 1);
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "f0").unwrap().nodeid;
        client.open(file, libc::O_RDONLY).unwrap();
        assert_eq!(client.lookup(ROOT_ID, "f1").err(), ENFILE);
        client.init().unwrap();
        assert_eq!(
            (client.model.open_inodes(), client.model.open_handles()),
            (0, 0)
        );
        let file = client.lookup(ROOT_ID, "f1").unwrap().nodeid;
        client.open(file, libc::O_RDONLY).unwrap();
    }
}
