//! Steering every TCP connection to `127.0.0.1` in a network namespace to
//! one listening socket, whatever the port: a BPF `sk_lookup` program
//! attached to the namespace picks the socket out of a one-entry SOCKMAP
//! (Linux 5.9+). The accepted connection keeps its original destination
//! as its local address, so the listener's owner learns which port was
//! asked for.
//!
//! This is how CRI port-forward reaches a VM pod: containerd dials
//! `localhost:<port>` inside the pod's network namespace on the host, where
//! nothing of the pod listens; the shim's listener there takes the
//! connection and carries it into the guest.
//!
//! The program is 25 instructions, written here as bytecode (no compiler
//! is needed at build or run time). Everything is held by fds: dropping a
//! [`Steering`] closes its link, which detaches the program.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `bpf(2)` commands.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
/// `enum bpf_map_type`: BPF_MAP_TYPE_SOCKMAP.
const MAP_TYPE_SOCKMAP: u32 = 15;
/// `enum bpf_prog_type`: BPF_PROG_TYPE_SK_LOOKUP.
const PROG_TYPE_SK_LOOKUP: u32 = 30;
/// `enum bpf_attach_type`: BPF_SK_LOOKUP.
const ATTACH_TYPE_SK_LOOKUP: u32 = 36;
/// The verifier's log kept when a load fails.
const VERIFIER_LOG_BYTES: usize = 16 * 1024;

/// Offsets into `struct bpf_sk_lookup` (the program's context).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
/// Helper ids.
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;
/// `SK_PASS`: the lookup goes on (with the assigned socket, if any).
const SK_PASS: i32 = 1;
/// 127.0.0.1 as the program loads it: network byte order read as a
/// little-endian u32.
const LOOPBACK_IP4_AS_LOADED: i32 = i32::from_le_bytes([127, 0, 0, 1]);

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// `dst = *(u32 *)(src + off)`.
const fn load_word(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// `if dst != imm goto +off`.
const fn jump_if_not(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
/// `if dst == imm goto +off`.
const fn jump_if(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
/// `dst = src` (64-bit).
const fn move_register(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// `dst = imm` (64-bit).
const fn move_immediate(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// `dst += imm` (64-bit).
const fn add_immediate(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}
/// `*(u32 *)(dst + off) = imm`.
const fn store_word(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm)
}
const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `dst = map` (two instructions: ld_imm64 with BPF_PSEUDO_MAP_FD).
fn load_map(dst: u8, map_fd: i32) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, map_fd), insn(0, 0, 0, 0, 0)]
}

/// The program: a TCP/IPv4 lookup for 127.0.0.1 (any port) gets the
/// socket in slot 0 of `map_fd`; every other lookup goes on untouched.
fn program(map_fd: i32) -> Vec<Insn> {
    // r6: the context; r8: the socket from the map (callee-saved).
    let mut code = vec![
        move_register(6, 1),
        load_word(2, 6, CTX_FAMILY),
        jump_if_not(2, libc::AF_INET, 20),
        load_word(2, 6, CTX_PROTOCOL),
        jump_if_not(2, libc::IPPROTO_TCP, 18),
        load_word(2, 6, CTX_LOCAL_IP4),
        jump_if_not(2, LOOPBACK_IP4_AS_LOADED, 16),
    ];
    code.extend(load_map(1, map_fd));
    code.extend([
        store_word(10, -4, 0),
        move_register(2, 10),
        add_immediate(2, -4),
        call(HELPER_MAP_LOOKUP_ELEM),
        jump_if(0, 0, 9),
        move_register(8, 0),
        move_register(1, 6),
        move_register(2, 8),
        move_immediate(3, 0),
        call(HELPER_SK_ASSIGN),
        // The reference the lookup took goes back whatever the assign did.
        move_register(1, 8),
        call(HELPER_SK_RELEASE),
        move_immediate(0, SK_PASS),
        exit(),
        // Not ours, or no socket: the usual lookup.
        move_immediate(0, SK_PASS),
        exit(),
    ]);
    code
}

/// The steering of one namespace. Dropping it detaches the program.
#[derive(Debug)]
pub struct Steering {
    _map: OwnedFd,
    _program: OwnedFd,
    _link: OwnedFd,
}

impl Steering {
    /// Attaches to the network namespace `netns` a program that hands
    /// every TCP connection to 127.0.0.1 to `listener`, a listening TCP
    /// socket made in that namespace.
    pub fn attach(netns: BorrowedFd<'_>, listener: BorrowedFd<'_>) -> io::Result<Self> {
        let map = create_sockmap().map_err(|e| context(e, "cannot create the SOCKMAP"))?;
        put_socket(map.as_fd(), listener)
            .map_err(|e| context(e, "cannot put the listener into the SOCKMAP"))?;
        let program = load_program(map.as_raw_fd())?;
        let link = attach_to_netns(program.as_fd(), netns)
            .map_err(|e| context(e, "cannot attach the sk_lookup program to the namespace"))?;
        Ok(Self {
            _map: map,
            _program: program,
            _link: link,
        })
    }
}

fn context(error: io::Error, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

/// `bpf(cmd, attr, size)`; returns the new fd.
fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the commands this is used with return a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`
    // and lives across the call; the kernel reads at most its size.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as libc::c_int)
    }
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

fn create_sockmap() -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: MAP_TYPE_SOCKMAP,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        map_flags: 0,
    };
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn put_socket(map: BorrowedFd<'_>, socket: BorrowedFd<'_>) -> io::Result<()> {
    let key: u32 = 0;
    let value: u64 = socket.as_raw_fd() as u64;
    let mut attr = MapUpdateAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u64 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn load_program(map_fd: i32) -> io::Result<OwnedFd> {
    let code = program(map_fd);
    let license = CString::new("Apache-2.0").expect("no NUL in the licence");
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"husk_portfwd_l");
    let load = |log: &mut [u8]| {
        let mut attr = ProgLoadAttr {
            prog_type: PROG_TYPE_SK_LOOKUP,
            insn_cnt: code.len() as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: ATTACH_TYPE_SK_LOOKUP,
        };
        bpf_fd(BPF_PROG_LOAD, &mut attr)
    };
    load(&mut []).or_else(|first| {
        // Again with the verifier's log, to say why.
        let mut log = vec![0u8; VERIFIER_LOG_BYTES];
        match load(&mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let text = String::from_utf8_lossy(&log);
                let text = text.trim_end_matches('\0').trim();
                Err(io::Error::new(
                    first.kind(),
                    format!("cannot load the sk_lookup program: {first}; verifier: {text}"),
                ))
            }
        }
    })
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

fn attach_to_netns(program: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: ATTACH_TYPE_SK_LOOKUP,
        flags: 0,
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_encodes_as_struct_bpf_insn() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        let code = program(7);
        assert_eq!(code.len(), 25);
        // r6 = r1
        assert_eq!(
            code[0],
            Insn {
                code: 0xbf,
                regs: 0x16,
                off: 0,
                imm: 0
            }
        );
        // the map load carries the fd and BPF_PSEUDO_MAP_FD in src
        assert_eq!(
            code[7],
            Insn {
                code: 0x18,
                regs: 0x11,
                off: 0,
                imm: 7
            }
        );
        assert_eq!(LOOPBACK_IP4_AS_LOADED, 0x0100_007f);
        // every early jump lands on the final `r0 = SK_PASS; exit`
        for (at, instruction) in code.iter().enumerate() {
            if matches!(instruction.code, 0x55 | 0x15) {
                let target = at as i64 + 1 + i64::from(instruction.off);
                assert_eq!(target, code.len() as i64 - 2, "jump at {at}");
            }
        }
        assert_eq!(code[code.len() - 1].code, 0x95);
    }
}
