//! Neither transport leaks: after a vhost-user session is stopped and an
//! MMIO device is activated and reset, the process has the threads and
//! file descriptors it had before. One test in its own binary, so no other
//! test's threads or fds blur the counts.

mod fs_support;

mod virtio_fs {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use husk_devices::fs::{serve_vhost_user, FsConfig, VirtioFs};
    use husk_devices::{ActivatedQueue, VirtioDevice};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use fuse_backend_rs::abi::fuse_abi::{InitIn, Opcode, KERNEL_MINOR_VERSION, KERNEL_VERSION};
    use vm_memory::ByteValued;

    use super::fs_support::{guest_memory, request, GuestQueue, NoInterrupt, TestDir, QUEUE_SPAN};

    fn count(dir: &str) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    /// Threads and fds may take a moment to go after a join returns (the
    /// kernel reaps the thread), so poll briefly for the baseline.
    fn assert_back_to(threads: usize, fds: usize, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = (count("/proc/self/task"), count("/proc/self/fd"));
            if now == (threads, fds) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after {after}: {} threads and {} fds, expected {threads} and {fds}",
                now.0,
                now.1
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn fs_vhost_user_and_mmio_lifecycles_leave_no_thread_or_fd_behind() {
        let dir = TestDir::new("lifecycle").unwrap();
        let socket = dir.path().join("fs.sock");
        let mut config = FsConfig::new(dir.path());
        config.num_request_queues = 2;
        let threads = count("/proc/self/task");
        let fds = count("/proc/self/fd");

        for _ in 0..3 {
            let server = serve_vhost_user(&socket, config.clone()).unwrap();
            let mut frontend = UnixStream::connect(&socket).unwrap();
            // GET_FEATURES, version 1, no payload: proves the session is live.
            frontend
                .write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
                .unwrap();
            let mut reply = [0u8; 20];
            frontend.read_exact(&mut reply).unwrap();
            server.stop().unwrap();
            drop(frontend);
        }
        assert_back_to(threads, fds, "three vhost-user sessions");

        // The passthrough clears the umask at INIT; in the shim that must not
        // leak into the process (the shim's own files keep their umask).
        // SAFETY: umask has no preconditions; the old value is restored below.
        let shim_umask = unsafe { libc::umask(0o027) };
        let memory = guest_memory(3);
        let mut device = VirtioFs::new(config).unwrap();
        for _ in 0..3 {
            let notifiers: Vec<EventFd> = (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let queues = (0..3)
                .map(|index| ActivatedQueue {
                    queue: GuestQueue::at(memory.clone(), index * QUEUE_SPAN).device_queue(),
                    notifier: notifiers[index as usize].try_clone().unwrap(),
                })
                .collect();
            device
                .activate(memory.clone(), Arc::new(NoInterrupt), queues)
                .unwrap();
            assert_eq!(device.running_workers(), 3);
            let mut requests = GuestQueue::at(memory.clone(), QUEUE_SPAN);
            let init = InitIn {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                max_readahead: 0,
                flags: 0,
            };
            requests.push(&request(Opcode::Init, 1, 0, &[init.as_slice()]), 4096);
            notifiers[1].write(1).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while requests.used_idx() == 0 {
                assert!(Instant::now() < deadline, "no INIT reply");
                std::thread::sleep(Duration::from_millis(2));
            }
            device.reset();
            // SAFETY: reads and restores the umask of this (the shim's) thread.
            let after_init = unsafe { libc::umask(0o027) };
            assert_eq!(
                after_init, 0o027,
                "INIT in a worker left the process umask alone"
            );
        }
        drop(device);
        drop(memory);
        // SAFETY: restores the umask the test started with.
        unsafe { libc::umask(shim_umask) };
        assert_back_to(threads, fds, "three MMIO activations and resets");
    }
}
