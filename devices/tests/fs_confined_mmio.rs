//! The built-in VMM's virtio-fs queue workers under the shim's full
//! confinement (seccomp in kill mode, capabilities cut, a private root
//! holding only the share): a guest's INIT, LOOKUP, GETXATTR (which the
//! passthrough reaches through `/proc/self/fd/N`) and MKDIR are served, the
//! worker reads back as confined in its own mount namespace, and the
//! process survives (a call outside the allowlist would kill it with
//! SIGSYS). Its own binary: the confinement policy is process-wide.

mod fs_support;

mod virtio_fs {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fuse_backend_rs::abi::fuse_abi::{
        EntryOut, GetxattrIn, GetxattrOut, InitIn, MkdirIn, Opcode, OutHeader,
        KERNEL_MINOR_VERSION, KERNEL_VERSION,
    };
    use husk_confine::{set_policy, Policy, ViolationAction};
    use husk_devices::fs::{FsConfig, VirtioFs};
    use husk_devices::{ActivatedQueue, VirtioDevice};
    use vm_memory::ByteValued;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::fs_support::{
        cstr, guest_memory, request, GuestQueue, NoInterrupt, TestDir, QUEUE_SPAN, ROOT_ID,
    };

    /// The request queue of an activated device, driven as the guest does.
    struct Driver {
        requests: GuestQueue,
        notifier: EventFd,
        unique: u64,
    }

    impl Driver {
        /// Posts one request, kicks the worker and waits for its reply:
        /// (errno or 0, body).
        fn call(&mut self, opcode: Opcode, nodeid: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
            self.unique += 1;
            let before = self.requests.used_idx();
            self.requests
                .push(&request(opcode, self.unique, nodeid, parts), 4096);
            self.notifier.write(1).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.requests.used_idx() == before {
                assert!(Instant::now() < deadline, "no reply to {opcode:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
            let (_, len) = self.requests.last_used();
            let bytes = self.requests.reply_bytes(len);
            let header_len = std::mem::size_of::<OutHeader>();
            let header = *OutHeader::from_slice(&bytes[..header_len]).unwrap();
            assert_eq!(header.unique, self.unique);
            (-header.error, bytes[header_len..].to_vec())
        }
    }

    fn parse<T: ByteValued>(reply: &(i32, Vec<u8>), what: &str) -> T {
        assert_eq!(reply.0, 0, "{what} failed with errno {}", reply.0);
        *T::from_slice(&reply.1[..std::mem::size_of::<T>()]).unwrap()
    }

    fn status_field(status: &str, key: &str) -> String {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    #[test]
    fn confined_queue_workers_serve_from_a_private_root() {
        // SAFETY: geteuid has no arguments.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this host-tier test needs root (the private root mounts)"
        );
        let policy = set_policy(Policy {
            seccomp: true,
            action: ViolationAction::Kill,
            fs_private_root: true,
        });
        assert!(policy.fs_private_root && policy.seccomp);

        let dir = TestDir::new("fs-confined-mmio").unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("note"), "from the host").unwrap();
        std::fs::write(dir.path().join("outside"), "host only").unwrap();
        let note = std::ffi::CString::new(share.join("note").to_str().unwrap()).unwrap();
        // SAFETY: NUL-terminated name and path; the value is 2 bytes long.
        let set = unsafe {
            libc::setxattr(
                note.as_ptr(),
                c"user.colour".as_ptr(),
                b"ok".as_ptr().cast(),
                2,
                0,
            )
        };
        assert_eq!(set, 0, "setxattr: {}", std::io::Error::last_os_error());

        let memory = guest_memory(2);
        let mut device = VirtioFs::new(FsConfig::new(&share)).unwrap();
        let notifiers: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let queues = (0..2)
            .map(|index| ActivatedQueue {
                queue: GuestQueue::at(memory.clone(), index * QUEUE_SPAN).device_queue(),
                notifier: notifiers[index as usize].try_clone().unwrap(),
            })
            .collect();
        device
            .activate(memory.clone(), Arc::new(NoInterrupt), queues)
            .unwrap();
        let mut driver = Driver {
            requests: GuestQueue::at(memory.clone(), QUEUE_SPAN),
            notifier: notifiers[1].try_clone().unwrap(),
            unique: 0,
        };

        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        let reply = driver.call(Opcode::Init, 0, &[init.as_slice()]);
        assert_eq!(reply.0, 0, "INIT failed with errno {}", reply.0);
        let entry: EntryOut = parse(
            &driver.call(Opcode::Lookup, ROOT_ID, &[&cstr("note")]),
            "LOOKUP note",
        );
        let probe = GetxattrIn {
            size: 0,
            padding: 0,
        };
        let size: GetxattrOut = parse(
            &driver.call(
                Opcode::Getxattr,
                entry.nodeid,
                &[probe.as_slice(), &cstr("user.colour")],
            ),
            "GETXATTR user.colour (size)",
        );
        let fetch = GetxattrIn {
            size: size.size,
            padding: 0,
        };
        let value = driver.call(
            Opcode::Getxattr,
            entry.nodeid,
            &[fetch.as_slice(), &cstr("user.colour")],
        );
        assert_eq!(value, (0, b"ok".to_vec()), "GETXATTR through /proc/self/fd");
        let outside = driver.call(Opcode::Lookup, ROOT_ID, &[&cstr("..")]);
        let mkdir = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        let made: EntryOut = parse(
            &driver.call(Opcode::Mkdir, ROOT_ID, &[mkdir.as_slice(), &cstr("made")]),
            "MKDIR made",
        );
        assert!(made.nodeid != 0);
        assert!(share.join("made").is_dir(), "MKDIR did not reach the share");

        // The worker that served all of it, read from /proc.
        let process_namespace = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let mut workers = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if !name.starts_with("virtio-fs-q") {
                continue;
            }
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let mut root: Vec<String> = std::fs::read_dir(task.join("root"))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            root.sort();
            workers.push((
                name.trim().to_owned(),
                status_field(&status, "Seccomp:"),
                status_field(&status, "NoNewPrivs:"),
                std::fs::read_link(task.join("ns/mnt")).unwrap() != process_namespace,
                root,
            ));
        }
        device.reset();
        println!(
            "husk-test-form: full (root; seccomp kill, private root): workers {workers:?}; LOOKUP .. from the root answered errno {}",
            outside.0
        );
        assert_eq!(workers.len(), 2, "one worker per queue: {workers:?}");
        for (name, seccomp, no_new_privs, own_namespace, root) in &workers {
            assert_eq!(seccomp, "2", "{name} runs without its filter");
            assert_eq!(no_new_privs, "1", "{name} lacks no_new_privs");
            assert!(own_namespace, "{name} shares the process's mount namespace");
            assert_eq!(root, &["proc", "share"], "{name}'s root");
        }
        // `..` from the share's root is the share itself, never the host dir
        // around it.
        let parent: EntryOut = parse(&outside, "LOOKUP ..");
        assert_eq!(
            parent.attr.ino,
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&share).unwrap())
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("outside")).unwrap(),
            "host only"
        );
    }
}
