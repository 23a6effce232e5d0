//! virtio-fs request round trips: FUSE messages built in guest memory, served
//! by the device model through a real split virtqueue, checked against the
//! host directory and the decoded replies. The last tests drive the same
//! model through the MMIO adapter's worker threads.

mod fs_support;

mod virtio_fs {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fuse_backend_rs::abi::fuse_abi::{
        FsOptions, InitIn, InitIn2, InitOut, Opcode, KERNEL_MINOR_VERSION, KERNEL_VERSION,
    };
    use husk_devices::fs::{FsConfig, VirtioFs, XattrPolicy};
    use husk_devices::{ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt};
    use vm_memory::ByteValued;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::fs_support::{
        guest_memory, request, FuseClient, GuestQueue, TestDir, QUEUE_SPAN, ROOT_ID,
    };

    fn share(label: &str) -> (TestDir, FsConfig) {
        let dir = TestDir::new(label).unwrap();
        let config = FsConfig::new(dir.path());
        (dir, config)
    }

    #[test]
    fn fs_init_negotiates_fuse_7_and_a_1_mib_max_write() {
        let (_dir, config) = share("init");
        let mut client = FuseClient::uninitialised(&config);
        // What a Linux guest offers (among others): big requests and
        // concurrency.
        let offered = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::PARALLEL_DIROPS;
        let init = client.init_with_flags(offered.bits() as u32).unwrap();
        assert_eq!(init.major, KERNEL_VERSION);
        assert_eq!(init.minor, KERNEL_MINOR_VERSION);
        let enabled = FsOptions::from_bits_truncate(u64::from(init.flags));
        assert!(enabled.contains(offered), "enabled {enabled:?}");
        assert_eq!(init.max_pages, 256);
        assert_eq!(init.max_write, 1 << 20);
    }

    #[test]
    fn fs_init_without_max_pages_falls_back_to_small_writes() {
        let (_dir, config) = share("init-small");
        let mut client = FuseClient::uninitialised(&config);
        let init = client.init().unwrap();
        assert_eq!(init.flags, 0, "nothing offered, nothing enabled");
        assert_eq!(init.max_pages, 0);
        assert!(init.max_write < 1 << 20);
    }

    #[test]
    fn fs_a_second_init_starts_a_new_session_that_forgets_old_node_ids() {
        let (dir, config) = share("reinit");
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let before = client.lookup(ROOT_ID, "f").unwrap();
        let open = client.open(before.nodeid, libc::O_RDONLY).unwrap();
        client.init().unwrap();
        assert!(
            client.getattr(before.nodeid).is_err(),
            "the old node id is gone"
        );
        assert!(
            client.read(before.nodeid, open.fh, 0, 1).is_err(),
            "the old handle is gone"
        );
        let after = client.lookup(ROOT_ID, "f").unwrap();
        assert_eq!(after.attr.size, 1, "the new session works");
    }

    #[test]
    fn fs_lookup_returns_the_host_file_size_and_mode() {
        let (dir, config) = share("lookup");
        std::fs::write(dir.path().join("hello.txt"), b"hello, guest").unwrap();
        let mut client = FuseClient::new(&config);
        let entry = client.lookup(ROOT_ID, "hello.txt").unwrap();
        assert_ne!(entry.nodeid, 0);
        assert_eq!(entry.attr.size, 12);
        assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(
            client.lookup(ROOT_ID, "missing").map(|_| ()),
            Err(libc::ENOENT)
        );
    }

    #[test]
    fn fs_open_and_read_return_the_host_file_contents() {
        let (dir, config) = share("read");
        let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("data.bin"), &contents).unwrap();
        let mut client = FuseClient::new(&config);
        let entry = client.lookup(ROOT_ID, "data.bin").unwrap();
        let open = client.open(entry.nodeid, libc::O_RDONLY).unwrap();
        let head = client.read(entry.nodeid, open.fh, 0, 131_072).unwrap();
        assert_eq!(head, contents[..131_072]);
        let tail = client
            .read(entry.nodeid, open.fh, 131_072, 131_072)
            .unwrap();
        assert_eq!(tail, contents[131_072..], "a read past the end is short");
        client.release(entry.nodeid, open.fh).unwrap();
    }

    #[test]
    fn fs_create_and_write_put_the_bytes_in_the_host_file() {
        let (dir, config) = share("write");
        let mut client = FuseClient::new(&config);
        let (entry, open) = client
            .create(ROOT_ID, "new.txt", 0o640, libc::O_WRONLY)
            .unwrap();
        assert_eq!(
            client
                .write(entry.nodeid, open.fh, 0, b"written by the guest")
                .unwrap(),
            20
        );
        assert_eq!(client.write(entry.nodeid, open.fh, 8, b"BY").unwrap(), 2);
        client.release(entry.nodeid, open.fh).unwrap();
        let host_path = dir.path().join("new.txt");
        assert_eq!(std::fs::read(&host_path).unwrap(), b"written BY the guest");
        assert_eq!(std::fs::metadata(&host_path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(client.getattr(entry.nodeid).unwrap().size, 20);
    }

    #[test]
    fn fs_readdir_lists_what_is_in_the_host_directory() {
        let (dir, config) = share("readdir");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), b"a").unwrap();
        std::fs::write(dir.path().join("sub/b"), b"b").unwrap();
        std::fs::create_dir(dir.path().join("sub/c")).unwrap();
        let mut client = FuseClient::new(&config);
        let sub = client.lookup(ROOT_ID, "sub").unwrap();
        let open = client.opendir(sub.nodeid).unwrap();
        let mut entries = client.readdir(sub.nodeid, open.fh).unwrap();
        entries.sort();
        let names: Vec<&str> = entries.iter().map(|(name, _, _)| name.as_str()).collect();
        // The passthrough leaves out "." and ".."; the guest kernel adds its own.
        assert_eq!(names, ["a", "b", "c"]);
        let c_type = entries.iter().find(|(name, _, _)| name == "c").unwrap().2;
        assert_eq!(c_type, libc::DT_DIR as u32);
    }

    #[test]
    fn fs_rename_moves_the_host_file_between_directories() {
        let (dir, config) = share("rename");
        std::fs::write(dir.path().join("old"), b"payload").unwrap();
        let mut client = FuseClient::new(&config);
        let target_dir = client.mkdir(ROOT_ID, "target", 0o755).unwrap();
        client
            .rename(ROOT_ID, "old", target_dir.nodeid, "new")
            .unwrap();
        assert!(!dir.path().join("old").exists());
        assert_eq!(
            std::fs::read(dir.path().join("target/new")).unwrap(),
            b"payload"
        );
        assert_eq!(client.lookup(ROOT_ID, "old").map(|_| ()), Err(libc::ENOENT));
    }

    #[test]
    fn fs_unlink_removes_the_host_file() {
        let (dir, config) = share("unlink");
        std::fs::write(dir.path().join("doomed"), b"x").unwrap();
        let mut client = FuseClient::new(&config);
        client.lookup(ROOT_ID, "doomed").unwrap();
        client.unlink(ROOT_ID, "doomed").unwrap();
        assert!(!dir.path().join("doomed").exists());
        assert_eq!(client.unlink(ROOT_ID, "doomed"), Err(libc::ENOENT));
    }

    #[test]
    fn fs_setxattr_lands_on_the_host_file_and_getxattr_reads_it_back() {
        let (dir, config) = share("xattr");
        let host_path = dir.path().join("tagged");
        std::fs::write(&host_path, b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let entry = client.lookup(ROOT_ID, "tagged").unwrap();
        client
            .setxattr(entry.nodeid, "user.husk", b"shared-value")
            .unwrap();
        assert_eq!(read_host_xattr(&host_path, "user.husk"), b"shared-value");
        assert_eq!(
            client.getxattr(entry.nodeid, "user.husk").unwrap(),
            b"shared-value"
        );
        assert_eq!(
            client.getxattr(entry.nodeid, "user.absent"),
            Err(libc::ENODATA)
        );
    }

    #[test]
    fn fs_xattr_requests_fail_with_enosys_when_xattr_is_off() {
        let (dir, mut config) = share("noxattr");
        config.xattr = XattrPolicy::Off;
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let entry = client.lookup(ROOT_ID, "plain").unwrap();
        // ENOSYS tells the guest kernel to stop asking; its callers see EOPNOTSUPP.
        assert_eq!(
            client.setxattr(entry.nodeid, "user.husk", b"v"),
            Err(libc::ENOSYS)
        );
        assert_eq!(
            client.getxattr(entry.nodeid, "user.husk"),
            Err(libc::ENOSYS)
        );
    }

    /// A valid `security.capability` (VFS_CAP_REVISION_2, CAP_NET_RAW
    /// permitted): the host kernel checks the format of this one.
    fn net_raw_capability() -> Vec<u8> {
        let mut value = 0x0200_0000u32.to_le_bytes().to_vec();
        value.extend_from_slice(&(1u32 << 13).to_le_bytes());
        value.extend_from_slice(&[0; 12]);
        value
    }

    #[test]
    fn fs_privileged_xattrs_from_the_guest_are_stored_under_the_guest_prefix_not_on_the_host_names()
    {
        let (dir, config) = share("xattr-mapped");
        let host_path = dir.path().join("binary");
        std::fs::write(&host_path, b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "binary").unwrap().nodeid;
        let capability = net_raw_capability();
        let guest_values: [(&str, &[u8]); 4] = [
            ("security.capability", &capability),
            ("security.selinux", b"system_u:object_r:guest_t:s0\0"),
            ("trusted.overlay.opaque", b"y"),
            ("system.posix_acl_access", b"\x02\0\0\0acl"),
        ];
        for (name, value) in guest_values {
            client.setxattr(file, name, value).unwrap();
            assert_eq!(
                host_xattr(&host_path, name),
                Err(libc::ENODATA),
                "{name} reached the host file"
            );
            assert_eq!(
                host_xattr(&host_path, &format!("user.husk.guest.{name}")).unwrap(),
                value,
                "{name} is stored under the guest prefix"
            );
            assert_eq!(
                client.getxattr(file, name).unwrap(),
                value,
                "{name} reads back"
            );
        }
        client.setxattr(file, "user.plain", b"p").unwrap();
        assert_eq!(read_host_xattr(&host_path, "user.plain"), b"p");

        let mut listed = client.listxattr(file).unwrap();
        listed.sort();
        assert_eq!(
            listed,
            [
                "security.capability",
                "security.selinux",
                "system.posix_acl_access",
                "trusted.overlay.opaque",
                "user.plain"
            ]
        );

        client.removexattr(file, "trusted.overlay.opaque").unwrap();
        assert_eq!(
            client.getxattr(file, "trusted.overlay.opaque"),
            Err(libc::ENODATA)
        );
        assert_eq!(
            host_xattr(&host_path, "user.husk.guest.trusted.overlay.opaque"),
            Err(libc::ENODATA)
        );
        assert_eq!(
            client.removexattr(file, "trusted.overlay.opaque"),
            Err(libc::ENODATA)
        );
    }

    #[test]
    fn fs_the_guest_cannot_name_the_stored_copies_or_unknown_namespaces() {
        let (dir, config) = share("xattr-reserved");
        let host_path = dir.path().join("file");
        std::fs::write(&host_path, b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "file").unwrap().nodeid;
        client
            .setxattr(file, "security.capability", &net_raw_capability())
            .unwrap();
        let raw = "user.husk.guest.security.capability";
        assert_eq!(client.setxattr(file, raw, b"forged"), Err(libc::EPERM));
        assert_eq!(client.getxattr(file, raw), Err(libc::EPERM));
        assert_eq!(client.removexattr(file, raw), Err(libc::EPERM));
        assert_eq!(
            client.setxattr(file, "user.husk.other", b"x"),
            Err(libc::EPERM)
        );
        assert_eq!(
            host_xattr(&host_path, raw).unwrap(),
            net_raw_capability(),
            "the stored copy is untouched"
        );
        assert_eq!(
            client.setxattr(file, "bogus.name", b"x"),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(client.getxattr(file, "bogus.name"), Err(libc::EOPNOTSUPP));
    }

    #[test]
    fn fs_host_privileged_xattrs_are_invisible_to_the_guest_and_survive_its_removal() {
        let (dir, config) = share("xattr-host");
        let host_path = dir.path().join("image-binary");
        std::fs::write(&host_path, b"x").unwrap();
        set_host_xattr(&host_path, "security.capability", &net_raw_capability());
        set_host_xattr(&host_path, "trusted.host", b"secret");
        set_host_xattr(&host_path, "user.visible", b"v");
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "image-binary").unwrap().nodeid;
        assert_eq!(client.getxattr(file, "trusted.host"), Err(libc::ENODATA));
        assert_eq!(
            client.getxattr(file, "security.capability"),
            Err(libc::ENODATA)
        );
        assert_eq!(client.listxattr(file).unwrap(), ["user.visible"]);
        assert_eq!(
            client.removexattr(file, "security.capability"),
            Err(libc::ENODATA)
        );
        assert_eq!(
            client.setxattr_with_flags(file, "trusted.host", b"mine", libc::XATTR_REPLACE),
            Err(libc::ENODATA),
            "the host's value does not exist for the guest"
        );
        assert_eq!(
            host_xattr(&host_path, "security.capability").unwrap(),
            net_raw_capability()
        );
        assert_eq!(host_xattr(&host_path, "trusted.host").unwrap(), b"secret");
    }

    #[test]
    fn fs_xattr_create_and_replace_flags_and_size_probes_follow_the_guest_view() {
        let (dir, config) = share("xattr-flags");
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let mut client = FuseClient::new(&config);
        let file = client.lookup(ROOT_ID, "file").unwrap().nodeid;
        let name = "security.selinux";
        assert_eq!(
            client.setxattr_with_flags(file, name, b"a", libc::XATTR_REPLACE),
            Err(libc::ENODATA)
        );
        client
            .setxattr_with_flags(file, name, b"first", libc::XATTR_CREATE)
            .unwrap();
        assert_eq!(
            client.setxattr_with_flags(file, name, b"again", libc::XATTR_CREATE),
            Err(libc::EEXIST)
        );
        client
            .setxattr_with_flags(file, name, b"second", libc::XATTR_REPLACE)
            .unwrap();
        // GETXATTR: size 0 asks for the length, a short buffer is ERANGE.
        let probe = client.getxattr_sized(file, name, 0).unwrap();
        assert_eq!(u32::from_le_bytes(probe[..4].try_into().unwrap()), 6);
        assert_eq!(client.getxattr_sized(file, name, 3), Err(libc::ERANGE));
        assert_eq!(client.getxattr_sized(file, name, 6).unwrap(), b"second");
        // LISTXATTR: the probe gives the guest list's length (not the
        // host's, which has the longer stored name), a short buffer is
        // ERANGE, an exact one gets the list.
        let expected = b"security.selinux\0";
        let probe = client.listxattr_sized(file, 0).unwrap();
        assert_eq!(
            u32::from_le_bytes(probe[..4].try_into().unwrap()) as usize,
            expected.len()
        );
        assert_eq!(
            client.listxattr_sized(file, expected.len() as u32 - 1),
            Err(libc::ERANGE)
        );
        assert_eq!(
            client.listxattr_sized(file, expected.len() as u32).unwrap(),
            expected
        );
    }

    #[test]
    fn fs_init_never_grants_posix_acls_or_a_guest_security_context() {
        let (_dir, config) = share("init-acl");
        let mut client = FuseClient::uninitialised(&config);
        // POSIX_ACL (bit 20) in flags; INIT_EXT (bit 30) announces flags2,
        // whose bit 0 is FUSE_SECURITY_CTX.
        const POSIX_ACL: u32 = 1 << 20;
        const INIT_EXT: u32 = 1 << 30;
        const SECURITY_CTX_IN_FLAGS2: u32 = 1;
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x2_0000,
            flags: POSIX_ACL | INIT_EXT | FsOptions::MAX_PAGES.bits() as u32,
        };
        let init_ext = InitIn2 {
            flags2: SECURITY_CTX_IN_FLAGS2,
            unused: [0; 11],
        };
        let reply = client.call(
            Opcode::Init,
            0,
            &[init.as_slice(), init_ext.as_slice()],
            0x1_0000,
        );
        let out: InitOut = reply.parse().unwrap();
        assert_ne!(
            out.flags & FsOptions::MAX_PAGES.bits() as u32,
            0,
            "INIT worked"
        );
        assert_eq!(out.flags & POSIX_ACL, 0, "POSIX ACLs were granted");
        assert_eq!(
            out.flags2 & SECURITY_CTX_IN_FLAGS2,
            0,
            "a security context was granted"
        );
    }

    #[test]
    fn fs_mkdir_symlink_and_hardlink_appear_on_the_host() {
        let (dir, config) = share("links");
        std::fs::write(dir.path().join("file"), b"content").unwrap();
        let mut client = FuseClient::new(&config);
        let sub = client.mkdir(ROOT_ID, "dir", 0o750).unwrap();
        assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
        assert!(dir.path().join("dir").is_dir());
        let file = client.lookup(ROOT_ID, "file").unwrap();
        let link = client.link(file.nodeid, sub.nodeid, "hard").unwrap();
        assert_eq!(link.attr.nlink, 2);
        let host_file = std::fs::metadata(dir.path().join("file")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("dir/hard"))
                .unwrap()
                .ino(),
            host_file.ino()
        );
        client.symlink(sub.nodeid, "soft", "../file").unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("dir/soft")).unwrap(),
            std::path::Path::new("../file")
        );
    }

    #[test]
    fn fs_a_queue_holding_several_requests_is_drained_in_one_pass() {
        let (_dir, config) = share("batch");
        let mut client = FuseClient::new(&config);
        // Three LOOKUPs of the root's "." offered before the device runs: the
        // hand-built queue reuses descriptors 0/1, so all three read the same
        // request, and each must come back.
        let lookup = request(Opcode::Lookup, 77, ROOT_ID, &[b".\0"]);
        let used_before = client.guest.used_idx();
        for _ in 0..3 {
            client.guest.push(&lookup, 4096);
        }
        client
            .model
            .process_queue(&client.guest.memory, &mut client.queue)
            .unwrap();
        assert_eq!(client.guest.used_idx(), used_before.wrapping_add(3));
    }

    /// Counts interrupts raised by the device.
    #[derive(Default)]
    struct CountingInterrupt {
        used: AtomicUsize,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn signal_used_queue(&self) -> std::io::Result<()> {
            self.used.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn signal_config_change(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn fs_mmio_device_exposes_type_26_tag_and_queue_count() {
        let (_dir, mut config) = share("mmio-config");
        config.num_request_queues = 2;
        config.tag = "myShare".to_owned();
        let device = VirtioFs::new(config).unwrap();
        assert_eq!(device.device_type(), 26);
        assert_eq!(device.queue_max_sizes(), vec![1024, 1024, 1024]);
        let mut space = [0xffu8; 40];
        device.read_config(0, &mut space);
        assert_eq!(&space[..7], b"myShare");
        assert!(space[7..36].iter().all(|b| *b == 0));
        assert_eq!(u32::from_le_bytes(space[36..40].try_into().unwrap()), 2);
        let mut past_end = [0xffu8; 4];
        device.read_config(40, &mut past_end);
        assert_eq!(past_end, [0; 4]);
    }

    #[test]
    fn fs_mmio_device_serves_a_kicked_queue_from_its_worker_and_raises_the_interrupt() {
        let (dir, config) = share("mmio-worker");
        std::fs::write(dir.path().join("seen"), b"1").unwrap();
        let mut device = VirtioFs::new(config).unwrap();
        let memory = guest_memory(2);
        let hiprio = GuestQueue::at(memory.clone(), 0);
        let mut requests = GuestQueue::at(memory.clone(), QUEUE_SPAN);
        let interrupt = Arc::new(CountingInterrupt::default());
        let request_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let queues = vec![
            ActivatedQueue {
                queue: hiprio.device_queue(),
                notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActivatedQueue {
                queue: requests.device_queue(),
                notifier: request_kick.try_clone().unwrap(),
            },
        ];
        device.activate(memory, interrupt.clone(), queues).unwrap();
        assert_eq!(device.running_workers(), 2);

        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        requests.push(&request(Opcode::Init, 1, 0, &[init.as_slice()]), 4096);
        request_kick.write(1).unwrap();
        wait_until("the INIT reply", || requests.used_idx() == 1);
        requests.push(&request(Opcode::Lookup, 2, ROOT_ID, &[b"seen\0"]), 4096);
        request_kick.write(1).unwrap();
        wait_until("the LOOKUP reply", || requests.used_idx() == 2);
        let (_, len) = requests.last_used();
        let reply = requests.reply_bytes(len);
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            0,
            "LOOKUP succeeded"
        );
        wait_until("two interrupts", || {
            interrupt.used.load(Ordering::SeqCst) >= 2
        });

        device.reset();
        assert_eq!(device.running_workers(), 0, "reset joins the workers");
        drop(hiprio);
    }

    #[test]
    fn fs_a_paused_mmio_device_resumes_the_same_session_from_its_queue_positions() {
        let (dir, config) = share("mmio-pause");
        std::fs::write(dir.path().join("seen"), b"1").unwrap();
        let mut device = VirtioFs::new(config).unwrap();
        assert!(device.pause().is_err(), "nothing runs before activation");
        let memory = guest_memory(2);
        let hiprio = GuestQueue::at(memory.clone(), 0);
        let mut requests = GuestQueue::at(memory.clone(), QUEUE_SPAN);
        let interrupt = Arc::new(CountingInterrupt::default());
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let activated = |queues: Vec<virtio_queue::Queue>| -> Vec<ActivatedQueue> {
            queues
                .into_iter()
                .zip(&kicks)
                .map(|(queue, kick)| ActivatedQueue {
                    queue,
                    notifier: kick.try_clone().unwrap(),
                })
                .collect()
        };
        device
            .activate(
                memory.clone(),
                interrupt.clone(),
                activated(vec![hiprio.device_queue(), requests.device_queue()]),
            )
            .unwrap();
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        requests.push(&request(Opcode::Init, 1, 0, &[init.as_slice()]), 4096);
        kicks[1].write(1).unwrap();
        wait_until("the INIT reply", || requests.used_idx() == 1);
        requests.push(&request(Opcode::Lookup, 2, ROOT_ID, &[b"seen\0"]), 4096);
        kicks[1].write(1).unwrap();
        wait_until("the LOOKUP reply", || requests.used_idx() == 2);
        let (_, len) = requests.last_used();
        let reply = requests.reply_bytes(len);
        let node_id = u64::from_le_bytes(reply[16..24].try_into().unwrap());

        let positions = device.pause().unwrap();
        assert_eq!(device.running_workers(), 0, "pause joins the workers");
        assert_eq!(
            positions
                .iter()
                .map(|p| (p.next_avail, p.next_used))
                .collect::<Vec<_>>(),
            vec![(0, 0), (2, 2)]
        );
        let restored = positions
            .into_iter()
            .map(|state| virtio_queue::Queue::try_from(state).unwrap())
            .collect();
        device
            .activate(memory.clone(), interrupt.clone(), activated(restored))
            .unwrap();
        // The node id the guest looked up before the pause still means the
        // same file: the session (and its inode table) was kept.
        let getattr = fuse_backend_rs::abi::fuse_abi::GetattrIn {
            flags: 0,
            dummy: 0,
            fh: 0,
        };
        requests.push(
            &request(Opcode::Getattr, 3, node_id, &[getattr.as_slice()]),
            4096,
        );
        kicks[1].write(1).unwrap();
        wait_until("the GETATTR reply", || requests.used_idx() == 3);
        let (_, len) = requests.last_used();
        let reply = requests.reply_bytes(len);
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            0,
            "GETATTR of the node looked up before the pause succeeded"
        );
        device.reset();
        drop(hiprio);
    }

    #[test]
    fn fs_mmio_activation_with_the_wrong_queue_count_is_refused() {
        let (_dir, config) = share("mmio-count");
        let mut device = VirtioFs::new(config).unwrap();
        let guest = GuestQueue::new();
        let queues = vec![ActivatedQueue {
            queue: guest.device_queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        }];
        let error = device
            .activate(
                guest.memory.clone(),
                Arc::new(CountingInterrupt::default()),
                queues,
            )
            .unwrap_err();
        assert!(
            matches!(
                error,
                ActivateError::QueueCount {
                    expected: 2,
                    ready: 1
                }
            ),
            "{error}"
        );
        assert_eq!(device.running_workers(), 0);
    }

    /// The host attribute `name` of `path`, or the errno.
    fn host_xattr(path: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let c_name = std::ffi::CString::new(name).unwrap();
        let mut buffer = vec![0u8; 256];
        // SAFETY: the buffer is 256 bytes and lgetxattr writes at most that.
        let len = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        if len < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
        }
        buffer.truncate(len as usize);
        Ok(buffer)
    }

    fn set_host_xattr(path: &std::path::Path, name: &str, value: &[u8]) {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let c_name = std::ffi::CString::new(name).unwrap();
        // SAFETY: lsetxattr reads `value.len()` bytes of `value`.
        let result = unsafe {
            libc::lsetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            result,
            0,
            "setting host {name}: {}",
            std::io::Error::last_os_error()
        );
    }

    fn read_host_xattr(path: &std::path::Path, name: &str) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let c_name = std::ffi::CString::new(name).unwrap();
        let mut buffer = vec![0u8; 256];
        // SAFETY: the buffer is 256 bytes and getxattr writes at most that.
        let len = unsafe {
            libc::getxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
            )
        };
        assert!(
            len >= 0,
            "getxattr failed: {}",
            std::io::Error::last_os_error()
        );
        buffer.truncate(len as usize);
        buffer
    }

    #[test]
    fn fs_the_guest_cannot_make_a_setuid_or_setgid_program_on_the_host() {
        let dir = TestDir::new("setuid").unwrap();
        let mut client = FuseClient::new(&FsConfig::new(dir.path()));
        let (file, open) = client
            .create(ROOT_ID, "prog", 0o4755, libc::O_WRONLY)
            .unwrap();
        client.release(file.nodeid, open.fh).unwrap();
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().mode() & 0o7777;
        assert_eq!(mode("prog"), 0o755, "CREATE with setuid");
        client.chmod(file.nodeid, 0o6755).unwrap();
        assert_eq!(mode("prog"), 0o755, "chmod u+s,g+s");
        let sub = client.mkdir(ROOT_ID, "team", 0o775).unwrap();
        client.chmod(sub.nodeid, 0o2775).unwrap();
        assert_eq!(mode("team"), 0o2775, "setgid stays on a directory");
        client.chmod(sub.nodeid, 0o4775).unwrap();
        assert_eq!(mode("team"), 0o775, "setuid never does");

        let mut allowed = FsConfig::new(dir.path());
        allowed.allow_setuid = true;
        let mut client = FuseClient::new(&allowed);
        let prog = client.lookup(ROOT_ID, "prog").unwrap();
        client.chmod(prog.nodeid, 0o4755).unwrap();
        assert_eq!(mode("prog"), 0o4755, "allowed when the setting says so");
    }

    #[test]
    fn fs_a_write_whose_flags_the_host_refuses_does_not_close_the_handles_fd() {
        let dir = TestDir::new("append-only").unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"x\n").unwrap();
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&path)
                .status()
                .unwrap()
                .success()
        };
        assert!(chattr("+a"), "chattr +a (e2fsprogs) on the test directory");
        let mut client = FuseClient::new(&FsConfig::new(dir.path()));
        let log = client.lookup(ROOT_ID, "log").unwrap();
        let open = client
            .open(log.nodeid, libc::O_WRONLY | libc::O_APPEND)
            .unwrap();
        // The FUSE client's WRITE carries flags 0: applied to the host fd
        // they would clear O_APPEND, which an append-only file refuses.
        let first = client.write(log.nodeid, open.fh, 0, b"A");
        let second = client.write(log.nodeid, open.fh, 0, b"B");
        client.release(log.nodeid, open.fh).unwrap();
        let content = std::fs::read(&path).unwrap();
        assert!(chattr("-a"));
        assert_eq!(
            (first, second),
            (Ok(1), Ok(1)),
            "both writes through the handle"
        );
        assert_eq!(content, b"x\nAB");
    }
}
