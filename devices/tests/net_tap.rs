//! `Tap::open` against the kernel's TUN driver, in a network namespace of
//! the test's own (unshared on one thread, as the shim enters the pod's):
//! the interface exists there and nowhere else, the fd is non-blocking with
//! a 12-byte virtio-net header, the offload probe finds what any current
//! kernel has, and frames cross the fd with the header in front, from a
//! thread in another namespace too. Last, the built-in VMM's device over a
//! real TAP moves frames both ways with its threads under the device
//! class's seccomp filter in `trap` mode, and every call the filter lacks
//! is reported. Host tier: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for
//! the namespace, CAP_NET_RAW for the packet socket that plays the pod's
//! network). The confinement policy is process-wide, so this binary sets it
//! once; only the threads the last test confines are affected by it.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use husk_confine::{confine_with, set_policy, Policy, ThreadClass, ViolationAction};
use husk_devices::net::{NetConfig, NetDevice, NetError, Tap, TapOffloads, VNET_HDR_LEN};
use husk_devices::{ActivatedQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use husk_test_support::form::announce_form;
use husk_test_support::virtqueue::DriverQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An EtherType for local experiments (IEEE 802): nothing else on the
/// interface sends it, so the test ignores the kernel's own IPv6 chatter.
const TEST_ETHERTYPE: u16 = 0x88b5;
const WAIT: Duration = Duration::from_secs(5);

fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{test} needs root for a network namespace and a TAP"
    );
}

/// Runs `body` on a thread that has unshared its network namespace; the
/// namespace (and every non-persistent TAP in it) ends with the thread.
fn in_fresh_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare with a flag constant; it acts on this thread only.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        body()
    })
    .join()
    .unwrap()
}

/// The index of interface `name` in the calling thread's namespace, or 0.
fn if_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// Sets IFF_UP on `name` through an AF_INET socket of this namespace.
fn bring_up(name: &str) {
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: just created, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; zeros are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one live ifreq.
    unsafe {
        assert_eq!(
            libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request),
            0
        );
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &mut request),
            0,
            "SIOCSIFFLAGS: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A packet socket on interface `index` for [`TEST_ETHERTYPE`] frames: the
/// pod's side of the wire.
fn packet_socket(index: u32) -> OwnedFd {
    let protocol = TEST_ETHERTYPE.to_be();
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(protocol),
        )
    };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just created, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zeros are valid.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the given size.
    let ret = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        ret,
        0,
        "bind AF_PACKET: {}",
        std::io::Error::last_os_error()
    );
    socket
}

/// The next datagram on `fd` within `WAIT` that `keep` accepts.
fn receive_matching(fd: impl AsFd, keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 65_600];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching frame within {WAIT:?}");
        let mut poll = libc::pollfd {
            fd: fd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int) } <= 0 {
            continue;
        }
        // read(2), not recv(2): the TAP fd is no socket. Readable, so it
        // does not block.
        // SAFETY: a live buffer of the given length.
        let got = unsafe { libc::read(fd.as_fd().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if got > 0 && keep(&buf[..got as usize]) {
            return buf[..got as usize].to_vec();
        }
    }
}

fn test_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == TEST_ETHERTYPE.to_be_bytes()
}

#[test]
fn tap_lives_in_the_opening_threads_namespace_with_a_12_byte_header_and_all_offloads() {
    require_root("tap_lives_in_the_opening_threads_namespace");
    let name = "husk-tap-ns";
    let (index, header_len, nonblocking, flags, offloads) = in_fresh_netns(move || {
        let tap = Tap::open(name).unwrap();
        assert_eq!(tap.name(), name);
        let fd = tap.as_fd().as_raw_fd();
        let mut header_len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int into a live local.
        let ret = unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut header_len) };
        assert_eq!(ret, 0);
        // SAFETY: F_GETFL takes no pointer.
        let status = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: ifreq is plain data; zeros are valid.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq into a live local.
        assert_eq!(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut request) }, 0);
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { request.ifr_ifru.ifru_flags });
        (
            if_index(name),
            header_len,
            status & libc::O_NONBLOCK != 0,
            flags,
            tap.supported_offloads(),
        )
    });
    assert_ne!(
        index, 0,
        "the interface exists in the opening thread's namespace"
    );
    assert_eq!(if_index(name), 0, "and not in the test's own");
    assert_eq!(header_len as usize, VNET_HDR_LEN);
    assert!(nonblocking);
    for flag in [libc::IFF_TAP, libc::IFF_NO_PI, libc::IFF_VNET_HDR] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} missing from {flags:#x}");
    }
    // Every kernel since 2.6.27 takes checksum and TSO offloads on a TAP.
    assert_eq!(
        offloads,
        TapOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        }
    );
}

#[test]
fn frames_cross_the_tap_behind_the_header_from_a_thread_in_another_namespace() {
    require_root("frames_cross_the_tap_behind_the_header");
    let name = "husk-tap-io";
    let (tap_tx, tap_rx) = mpsc::channel::<Tap>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (wire_tx, wire_rx) = mpsc::channel::<Vec<u8>>();
    // The namespace thread plays the pod's network: it owns the packet
    // socket and stays alive (and with it the namespace) until told.
    let netns = std::thread::spawn(move || {
        // SAFETY: unshare with a flag constant; it acts on this thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let tap = Tap::open(name).unwrap();
        bring_up(name);
        let wire = packet_socket(if_index(name));
        // The pod sends a frame: the TAP's reader gets it behind a header.
        let outbound = test_frame(b"from the pod");
        // SAFETY: a live buffer of the given length.
        let sent = unsafe {
            libc::send(
                wire.as_raw_fd(),
                outbound.as_ptr().cast(),
                outbound.len(),
                0,
            )
        };
        assert_eq!(
            sent,
            outbound.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        tap_tx.send(tap).unwrap();
        // The device writes one back: the pod sees the frame alone.
        let inbound = receive_matching(&wire, is_test_frame);
        wire_tx.send(inbound).unwrap();
        done_rx.recv().unwrap();
    });
    let tap = tap_rx.recv().unwrap();
    // This thread is in the test's namespace, not the TAP's.
    assert_eq!(if_index(name), 0);
    let record = receive_matching(&tap, |record| {
        record.len() > VNET_HDR_LEN && is_test_frame(&record[VNET_HDR_LEN..])
    });
    assert_eq!(
        &record[..VNET_HDR_LEN],
        &[0u8; VNET_HDR_LEN],
        "no offload is on: the header says nothing"
    );
    assert_eq!(&record[VNET_HDR_LEN..], &test_frame(b"from the pod")[..]);

    let mut written = vec![0u8; VNET_HDR_LEN];
    let frame = test_frame(b"from the guest");
    written.extend_from_slice(&frame);
    // SAFETY: a live buffer of the given length.
    let ret = unsafe {
        libc::write(
            tap.as_fd().as_raw_fd(),
            written.as_ptr().cast(),
            written.len(),
        )
    };
    assert_eq!(
        ret,
        written.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    let on_the_wire = wire_rx.recv_timeout(WAIT).unwrap();
    assert_eq!(on_the_wire, frame, "the TAP strips the header");
    done_tx.send(()).unwrap();
    netns.join().unwrap();
}

#[test]
fn a_second_open_of_a_tap_in_use_names_the_interface_and_the_ioctl() {
    require_root("a_second_open_of_a_tap_in_use");
    let name = "husk-tap-busy";
    let message = in_fresh_netns(move || {
        let _first = Tap::open(name).unwrap();
        match Tap::open(name) {
            Err(error @ NetError::TapIoctl { .. }) => error.to_string(),
            other => panic!("second open: {other:?}"),
        }
    });
    assert!(
        message.contains(name) && message.contains("TUNSETIFF"),
        "{message}"
    );
}

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the trap handler wrote to `pipe` so far.
fn read_log(pipe: &OwnedFd) -> String {
    let mut log = vec![0u8; 16 * 1024];
    // SAFETY: a live buffer of the given length; the pipe is non-blocking.
    let got = unsafe { libc::read(pipe.as_raw_fd(), log.as_mut_ptr().cast(), log.len()) };
    String::from_utf8_lossy(&log[..got.max(0) as usize]).into_owned()
}

/// The system calls named by the trap lines in `log`.
fn trapped_calls(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| line.split(" made system call ").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn mmio_device_over_a_real_tap_moves_frames_under_the_device_seccomp_class() {
    require_root("mmio_device_over_a_real_tap");
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array, checked below.
    let ret = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(ret, 0);
    // SAFETY: both fds were just created and nothing else owns them.
    let (trap_log, trap_log_writer) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    husk_confine::trap::set_log_fd(trap_log_writer.as_raw_fd());
    let policy = set_policy(Policy {
        seccomp: true,
        action: ViolationAction::Trap,
        fs_private_root: false,
    });
    assert_eq!(policy.action, ViolationAction::Trap);

    let name = "husk-tap-mmio";
    let (wire_tx, wire_rx) = mpsc::channel::<(Tap, OwnedFd)>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let netns = std::thread::spawn(move || {
        // SAFETY: unshare with a flag constant; it acts on this thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let tap = Tap::open(name).unwrap();
        bring_up(name);
        let wire = packet_socket(if_index(name));
        wire_tx.send((tap, wire)).unwrap();
        done_rx.recv().unwrap();
    });
    let (tap, wire) = wire_rx.recv().unwrap();
    // The offload switch is made on the thread that applies the driver's
    // features: a vCPU (built-in VMM) or the vhost-user daemon thread (a
    // device thread). Try it under the device class.
    let tap_fd = tap.as_fd().as_raw_fd();
    let offload_switch = std::thread::spawn(move || {
        confine_with(ThreadClass::Device, policy).unwrap();
        // SAFETY: TUNSETOFFLOAD takes its argument by value; `tap_fd` stays
        // open (the test thread holds the TAP) until this thread is joined.
        let ret = unsafe {
            libc::ioctl(
                tap_fd,
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(libc::TUN_F_CSUM),
            )
        };
        (ret == 0)
            .then_some(())
            .ok_or_else(std::io::Error::last_os_error)
    })
    .join()
    .unwrap();
    let mut device = NetDevice::new(tap, NetConfig::new([0x02, 0, 0, 0, 0, 0x01])).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut rx = DriverQueue::new(&mem, 0x1000, 16, 0x1000);
    let mut tx = DriverQueue::new(&mem, rx.end(), 16, 0x1000);
    for _ in 0..8 {
        rx.add_chain(&mem, &[(0x1000, true, &[])]).unwrap();
    }
    let tx_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let queues = vec![
        ActivatedQueue {
            queue: rx.device_queue(),
            notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        },
        ActivatedQueue {
            queue: tx.device_queue(),
            notifier: tx_notify.try_clone().unwrap(),
        },
    ];
    // Everything offered, offloads included, as Linux's driver acks it.
    device.set_acked_features(device.available_features() | VIRTIO_F_VERSION_1);
    // Activated from this unconfined thread, as the other confined-worker
    // tests do: the worker confines itself as a device thread before it
    // touches a queue or the TAP.
    device
        .activate(mem.clone(), Arc::new(NoInterrupt), queues)
        .unwrap();
    assert!(device.is_active());

    let from_pod = test_frame(b"to the guest");
    // SAFETY: a live buffer of the given length.
    let sent = unsafe {
        libc::send(
            wire.as_raw_fd(),
            from_pod.as_ptr().cast(),
            from_pod.len(),
            0,
        )
    };
    assert_eq!(sent, from_pod.len() as isize);
    let deadline = Instant::now() + WAIT;
    let received = loop {
        if let Some((_, _, data)) = rx.pop_used(&mem) {
            if is_test_frame(&data[VNET_HDR_LEN..]) {
                break data;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no frame reached the guest; trap log:\n{}",
            read_log(&trap_log)
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(&received[VNET_HDR_LEN..], &from_pod[..]);
    assert_eq!(
        u16::from_le_bytes([received[10], received[11]]),
        1,
        "num_buffers"
    );

    let from_guest = test_frame(b"to the pod");
    let mut chain = vec![0u8; VNET_HDR_LEN];
    chain.extend_from_slice(&from_guest);
    tx.add_chain(&mem, &[(chain.len() as u32, false, &chain)])
        .unwrap();
    tx_notify.write(1).unwrap();
    assert_eq!(receive_matching(&wire, is_test_frame), from_guest);

    // Counted just after writev returned: the pod may see the frame first.
    let deadline = Instant::now() + WAIT;
    while device.stats().tx_packets == 0 {
        assert!(Instant::now() < deadline, "the tx frame was never counted");
        std::thread::sleep(Duration::from_millis(2));
    }
    let stats = device.stats();
    assert!(stats.rx_packets >= 1 && stats.tx_packets == 1, "{stats:?}");
    assert_eq!((stats.rx_errors, stats.tx_errors), (0, 0));
    device.reset();
    drop(device);
    done_tx.send(()).unwrap();
    netns.join().unwrap();

    let log = read_log(&trap_log);
    let trapped = trapped_calls(&log);
    // The offload switch (ioctl TUNSETOFFLOAD) is the one call the device
    // class may lack; the data path itself must need nothing more.
    assert!(
        trapped.iter().all(|call| call.starts_with("ioctl")),
        "the net data path made calls outside the device allowlist:\n{log}"
    );
    match offload_switch {
        Ok(()) => announce_form(
            "net device under the device seccomp class: data path and offload switch allowed",
        ),
        Err(error) => announce_form(format_args!(
            "net device under the device seccomp class: data path allowed; \
             TUNSETOFFLOAD fails ({error}), so TAP offloads stay off under confinement"
        )),
    }
}
