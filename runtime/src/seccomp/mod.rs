//! seccomp: compiling the spec's `linux.seccomp` into a classic-BPF filter
//! and installing it.
//!
//! The generator is our own. The program checks the architecture first (a
//! foreign architecture, or an x32 call on x86_64, is killed), then walks one
//! self-contained block per (syscall, rule): load the syscall number, compare,
//! check each argument condition on the two 32-bit halves of the 64-bit
//! argument, and return the rule's action. Blocks stay short, so the 8-bit
//! jump offsets of classic BPF are never a limit whatever the profile size.
//! Rules with argument conditions are placed before unconditional ones, so a
//! specific rule wins over a blanket one for the same call (as libseccomp
//! does). Conditions on distinct arguments are ANDed; several conditions on
//! the same argument become alternative rules, as in runc.

pub mod bpf;
mod syscalls_x86;
mod syscalls_x86_64;

use crate::error::{Error, Result};
use bpf::{Cmp, Program, To};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_KILL_THREAD: u32 = 0x0000_0000;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_TRACE: u32 = 0x7ff0_0000;
const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// x32 system calls on x86_64 have this bit set in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARGS: u32 = 16;
/// Linux's BPF_MAXINSNS.
const MAX_INSNS: usize = 4096;
const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;

/// A compiled filter.
#[derive(Debug, Clone)]
pub struct Filter {
    pub program: Vec<libc::sock_filter>,
    pub flags: u32,
}

/// What a system call name means on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallLookup {
    /// The native number.
    Native(u32),
    /// A call of another architecture only: skipped, as libseccomp does.
    Foreign,
    /// No Linux architecture has a call of that name.
    Unknown,
}

/// Every system call name of the native architecture (x86_64).
pub fn native_syscall_names() -> impl Iterator<Item = &'static str> {
    syscalls_x86_64::X86_64_SYSCALLS.iter().map(|(n, _)| *n)
}

/// The i386 number of `name`, for profiles that list `SCMP_ARCH_X86`.
pub fn x86_syscall_number(name: &str) -> Option<u32> {
    let table = syscalls_x86::X86_SYSCALLS;
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

/// Look `name` up in the native table, then in the foreign names.
pub fn syscall_number(name: &str) -> SyscallLookup {
    let table = syscalls_x86_64::X86_64_SYSCALLS;
    if let Ok(i) = table.binary_search_by(|(n, _)| (*n).cmp(name)) {
        return SyscallLookup::Native(table[i].1);
    }
    if syscalls_x86_64::FOREIGN_SYSCALLS
        .binary_search(&name)
        .is_ok()
    {
        return SyscallLookup::Foreign;
    }
    SyscallLookup::Unknown
}

fn action_value(action: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<u32> {
    let errno = errno.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SECCOMP_RET_KILL_THREAD
        }
        LinuxSeccompAction::ScmpActKillProcess => SECCOMP_RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => SECCOMP_RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => SECCOMP_RET_ERRNO | errno,
        LinuxSeccompAction::ScmpActTrace => SECCOMP_RET_TRACE | errno,
        LinuxSeccompAction::ScmpActLog => SECCOMP_RET_LOG,
        LinuxSeccompAction::ScmpActAllow => SECCOMP_RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(Error::spec(field, "SCMP_ACT_NOTIFY is not supported"));
        }
    })
}

/// Split a rule's conditions into alternatives with at most one condition
/// per argument index (runc's semantics for repeated indices).
fn alternatives(args: &[LinuxSeccompArg]) -> Vec<Vec<LinuxSeccompArg>> {
    let mut by_index: Vec<Vec<LinuxSeccompArg>> = Vec::new();
    for a in args {
        match by_index.iter_mut().find(|g| g[0].index() == a.index()) {
            Some(g) => g.push(*a),
            None => by_index.push(vec![*a]),
        }
    }
    if by_index.iter().all(|g| g.len() == 1) {
        return vec![args.to_vec()];
    }
    // Repeated index: each condition on it is a separate rule, together
    // with the single conditions on the other indices.
    let singles: Vec<LinuxSeccompArg> = by_index
        .iter()
        .filter(|g| g.len() == 1)
        .map(|g| g[0])
        .collect();
    let mut out = Vec::new();
    for g in by_index.iter().filter(|g| g.len() > 1) {
        for c in g {
            let mut alt = singles.clone();
            alt.push(*c);
            out.push(alt);
        }
    }
    out
}

/// Emit the check of one condition: fall through when it holds, jump to
/// `fail` when it does not.
fn emit_condition(p: &mut Program, arg: &LinuxSeccompArg, fail: bpf::Label) {
    let lo_off = OFFSET_ARGS + 8 * arg.index() as u32;
    let hi_off = lo_off + 4;
    let value = arg.value();
    let (v_hi, v_lo) = ((value >> 32) as u32, value as u32);
    let pass = p.label();
    match arg.op() {
        LinuxSeccompOperator::ScmpCmpEq
        | LinuxSeccompOperator::ScmpCmpNe
        | LinuxSeccompOperator::ScmpCmpMaskedEq => {
            let masked = matches!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
            // For MASKED_EQ the spec's value is the mask and valueTwo the datum.
            let (mask, datum) = if masked {
                (value, arg.value_two().unwrap_or(0))
            } else {
                (u64::MAX, value)
            };
            let (d_hi, d_lo) = ((datum >> 32) as u32, datum as u32);
            let eq = !matches!(arg.op(), LinuxSeccompOperator::ScmpCmpNe);
            let differ = p.label();
            p.load(hi_off);
            if masked {
                p.and((mask >> 32) as u32);
            }
            p.jump(Cmp::Eq, d_hi, To::Next, To::L(differ));
            p.load(lo_off);
            if masked {
                p.and(mask as u32);
            }
            p.jump(Cmp::Eq, d_lo, To::Next, To::L(differ));
            // Both halves equal.
            if eq {
                p.jump(Cmp::Eq, 0, To::L(pass), To::L(pass));
            } else {
                p.jump(Cmp::Eq, 0, To::L(fail), To::L(fail));
            }
            p.bind(differ);
            if eq {
                p.jump(Cmp::Eq, 0, To::L(fail), To::L(fail));
            }
        }
        op => {
            // Ordered comparisons: decide on the high word unless equal.
            let (cmp, strict_hi) = match op {
                LinuxSeccompOperator::ScmpCmpGt => (Cmp::Gt, true),
                LinuxSeccompOperator::ScmpCmpGe => (Cmp::Ge, true),
                LinuxSeccompOperator::ScmpCmpLt => (Cmp::Ge, false),
                _ => (Cmp::Gt, false), // LE: !(A > v)
            };
            let hi_equal = p.label();
            p.load(hi_off);
            if strict_hi {
                // GT/GE: hi > v_hi passes, hi < v_hi fails, equal checks lo.
                p.jump(Cmp::Gt, v_hi, To::L(pass), To::Next);
                p.jump(Cmp::Eq, v_hi, To::L(hi_equal), To::L(fail));
                p.bind(hi_equal);
                p.load(lo_off);
                p.jump(cmp, v_lo, To::L(pass), To::L(fail));
            } else {
                // LT/LE: hi < v_hi passes, hi > v_hi fails, equal checks lo.
                p.jump(Cmp::Gt, v_hi, To::L(fail), To::Next);
                p.jump(Cmp::Eq, v_hi, To::L(hi_equal), To::L(pass));
                p.bind(hi_equal);
                p.load(lo_off);
                p.jump(cmp, v_lo, To::L(fail), To::L(pass));
            }
        }
    }
    p.bind(pass);
}

/// One rule block: compare the number, check the conditions, return the
/// action. A holds the syscall number on entry when `a_holds_nr`.
fn emit_rule(
    p: &mut Program,
    nr: u32,
    action: u32,
    conds: &[LinuxSeccompArg],
    a_holds_nr: &mut bool,
) {
    let skip = p.label();
    if !*a_holds_nr {
        p.load(OFFSET_NR);
    }
    p.jump(Cmp::Eq, nr, To::Next, To::L(skip));
    for c in conds {
        emit_condition(p, c, skip);
    }
    p.ret(action);
    p.bind(skip);
    // Conditions load arguments into A; a plain block leaves the number.
    *a_holds_nr = conds.is_empty();
}

/// Compile the spec's profile; errors name the offending field.
pub fn compile(seccomp: &LinuxSeccomp) -> Result<Filter> {
    let default_action = action_value(
        seccomp.default_action(),
        seccomp.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    let mut flags = 0;
    for f in seccomp.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
        };
    }
    // (name, action, conditions): resolved per architecture below.
    let mut conditional: Vec<(&str, u32, Vec<LinuxSeccompArg>)> = Vec::new();
    let mut unconditional: Vec<(&str, u32, Vec<LinuxSeccompArg>)> = Vec::new();
    for (i, rule) in seccomp.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let action = action_value(rule.action(), rule.errno_ret(), &format!("{field}.action"))?;
        let args = rule.args().clone().unwrap_or_default();
        for (j, a) in args.iter().enumerate() {
            if a.index() > 5 {
                return Err(Error::spec(
                    format!("{field}.args[{j}].index"),
                    format!("{} is above 5", a.index()),
                ));
            }
        }
        for (j, name) in rule.names().iter().enumerate() {
            if syscall_number(name) == SyscallLookup::Unknown {
                return Err(Error::spec(
                    format!("{field}.names[{j}]"),
                    format!("unknown system call {name:?}"),
                ));
            }
            if action == default_action {
                continue;
            }
            if args.is_empty() {
                unconditional.push((name, action, Vec::new()));
            } else {
                for alt in alternatives(&args) {
                    conditional.push((name, action, alt));
                }
            }
        }
    }
    let arches: Vec<Arch> = seccomp.architectures().clone().unwrap_or_default();
    let wants = |a: Arch| arches.contains(&a);
    let with_x86 = wants(Arch::ScmpArchX86);
    let with_x32 = wants(Arch::ScmpArchX32);
    let rules: Vec<&(&str, u32, Vec<LinuxSeccompArg>)> =
        conditional.iter().chain(unconditional.iter()).collect();

    let mut p = Program::default();
    let x86_64 = p.label();
    let i386 = p.label();
    p.load(OFFSET_ARCH);
    let not_x86_64 = p.label();
    p.jump(Cmp::Eq, AUDIT_ARCH_X86_64, To::Next, To::L(not_x86_64));
    // Arch blocks can be far apart: reach them with 32-bit jumps.
    p.jump_always(x86_64);
    p.bind(not_x86_64);
    if with_x86 {
        let not_i386 = p.label();
        p.jump(Cmp::Eq, AUDIT_ARCH_I386, To::Next, To::L(not_i386));
        p.jump_always(i386);
        p.bind(not_i386);
    }
    p.ret(SECCOMP_RET_KILL_PROCESS);

    // x86_64 (and x32, whose numbers carry X32_SYSCALL_BIT).
    p.bind(x86_64);
    p.load(OFFSET_NR);
    if !with_x32 {
        let native = p.label();
        p.jump(Cmp::Ge, X32_SYSCALL_BIT, To::Next, To::L(native));
        p.ret(SECCOMP_RET_KILL_PROCESS);
        p.bind(native);
    }
    let mut a_holds_nr = true;
    let variants: &[u32] = if with_x32 {
        &[0, X32_SYSCALL_BIT]
    } else {
        &[0]
    };
    for bit in variants {
        for (name, action, conds) in &rules {
            if let SyscallLookup::Native(nr) = syscall_number(name) {
                emit_rule(&mut p, nr | bit, *action, conds, &mut a_holds_nr);
            }
        }
    }
    p.ret(default_action);

    if with_x86 {
        p.bind(i386);
        p.load(OFFSET_NR);
        let mut a_holds_nr = true;
        for (name, action, conds) in &rules {
            if let Some(nr) = x86_syscall_number(name) {
                emit_rule(&mut p, nr, *action, conds, &mut a_holds_nr);
            }
        }
        p.ret(default_action);
    } else {
        p.bind(i386);
    }
    let program = p.assemble().map_err(Error::Seccomp)?;
    if program.len() > MAX_INSNS {
        return Err(Error::spec(
            "linux.seccomp.syscalls",
            format!(
                "profile needs {} BPF instructions, the kernel allows {MAX_INSNS}",
                program.len()
            ),
        ));
    }
    Ok(Filter { program, flags })
}

/// Install `filter` on the calling thread (all threads with TSYNC).
pub fn install(filter: &Filter) -> Result<()> {
    let prog = libc::sock_fprog {
        len: filter.program.len() as u16,
        filter: filter.program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points at a live, correctly sized instruction array.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            filter.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(Error::Seccomp(format!(
            "load filter: {}",
            std::io::Error::last_os_error()
        )));
    }
    if rc > 0 {
        // With TSYNC, a positive return names a thread that could not be
        // synchronised (its filters are not an ancestor of ours); nothing
        // was loaded.
        return Err(Error::Seccomp(format!(
            "load filter: thread {rc} cannot take it (SECCOMP_FILTER_FLAG_TSYNC)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookup_tables_are_sorted_and_other_arches_calls_are_foreign() {
        let foreign = syscalls_x86_64::FOREIGN_SYSCALLS;
        assert!(foreign.windows(2).all(|pair| pair[0] < pair[1]));
        let native = syscalls_x86_64::X86_64_SYSCALLS;
        assert!(native.windows(2).all(|pair| pair[0].0 < pair[1].0));
        // containerd's RuntimeDefault profile lists these generic names.
        for name in ["recv", "send", "_llseek"] {
            assert_eq!(syscall_number(name), SyscallLookup::Foreign, "{name}");
        }
        assert_eq!(syscall_number("makedir"), SyscallLookup::Unknown);
    }

    /// Run the program the way the kernel does, on a synthetic call.
    fn run(prog: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr;
        data[1] = arch;
        for (i, a) in args.iter().enumerate() {
            data[4 + 2 * i] = *a as u32;
            data[5 + 2 * i] = (*a >> 32) as u32;
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let f = prog[pc];
            let class = f.code & 0x07;
            match class as u32 {
                libc::BPF_LD => acc = data[(f.k / 4) as usize],
                libc::BPF_ALU => acc &= f.k,
                libc::BPF_RET => return f.k,
                libc::BPF_JMP if (f.code & 0xf0) as u32 == libc::BPF_JA => {
                    pc += f.k as usize;
                }
                libc::BPF_JMP => {
                    let op = (f.code & 0xf0) as u32;
                    let taken = match op {
                        libc::BPF_JEQ => acc == f.k,
                        libc::BPF_JGT => acc > f.k,
                        libc::BPF_JGE => acc >= f.k,
                        libc::BPF_JSET => acc & f.k != 0,
                        _ => panic!("op {op}"),
                    };
                    pc += if taken { f.jt as usize } else { f.jf as usize };
                }
                _ => panic!("class {class}"),
            }
            pc += 1;
        }
    }

    fn profile(json: &str) -> Filter {
        compile(&serde_json::from_str(json).unwrap()).unwrap()
    }

    const MKDIR: u32 = 83;
    const CHMOD: u32 = 90;

    #[test]
    fn errno_rule_hits_only_its_syscall() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, MKDIR, [0; 6]),
            SECCOMP_RET_ERRNO | 1
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, 0, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, 0x4000_0003, 0, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn argument_conditions_compare_both_halves() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod"],"action":"SCMP_ACT_ERRNO","errnoRet":13,
              "args":[{"index":1,"value":511,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, CHMOD, [0, 511, 0, 0, 0, 0]),
            SECCOMP_RET_ERRNO | 13
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, CHMOD, [0, 493, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(
                &f.program,
                AUDIT_ARCH_X86_64,
                CHMOD,
                [0, (1 << 32) | 511, 0, 0, 0, 0]
            ),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn ordered_and_masked_operators_follow_64_bit_semantics() {
        let cases = [
            (
                "SCMP_CMP_GT",
                10u64,
                None,
                [(11u64, true), (10, false), (1 << 33, true)],
            ),
            (
                "SCMP_CMP_GE",
                10,
                None,
                [(10, true), (9, false), (1 << 33, true)],
            ),
            (
                "SCMP_CMP_LT",
                10,
                None,
                [(9, true), (10, false), (1 << 33, false)],
            ),
            (
                "SCMP_CMP_LE",
                10,
                None,
                [(10, true), (11, false), (1 << 33, false)],
            ),
            (
                "SCMP_CMP_NE",
                10,
                None,
                [(10, false), (11, true), ((1 << 32) | 10, true)],
            ),
            (
                "SCMP_CMP_MASKED_EQ",
                0xff,
                Some(0x12u64),
                [(0x312, true), (0x313, false), (0x12, true)],
            ),
        ];
        for (op, value, two, checks) in cases {
            let two = two
                .map(|t| format!(r#","valueTwo":{t}"#))
                .unwrap_or_default();
            let f = profile(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["chmod"],"action":"SCMP_ACT_ERRNO",
                  "args":[{{"index":2,"value":{value}{two},"op":"{op}"}}]}}]}}"#
            ));
            for (arg, hit) in checks {
                let got = run(&f.program, AUDIT_ARCH_X86_64, CHMOD, [0, 0, arg, 0, 0, 0]);
                assert_eq!(got == (SECCOMP_RET_ERRNO | 1), hit, "{op} {value} vs {arg}");
            }
        }
    }

    #[test]
    fn conditional_rule_wins_over_blanket_rule() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
               {"names":["chmod"],"action":"SCMP_ACT_ALLOW"},
               {"names":["chmod"],"action":"SCMP_ACT_KILL_PROCESS","args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, CHMOD, [1, 0, 0, 0, 0, 0]),
            SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, CHMOD, [2, 0, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, MKDIR, [0; 6]),
            SECCOMP_RET_ERRNO | 1
        );
    }

    #[test]
    fn listed_i386_architecture_gets_its_own_numbers() {
        let f = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
               "syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        // mkdir is 39 on i386, 83 on x86_64.
        assert_eq!(
            run(&f.program, AUDIT_ARCH_I386, 39, [0; 6]),
            SECCOMP_RET_ERRNO | 1
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_I386, 83, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, MKDIR, [0; 6]),
            SECCOMP_RET_ERRNO | 1
        );
        assert_eq!(
            run(
                &f.program,
                AUDIT_ARCH_X86_64,
                X32_SYSCALL_BIT | MKDIR,
                [0; 6]
            ),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn large_profile_on_three_architectures_fits_and_stays_correct() {
        let names: Vec<String> = syscalls_x86_64::X86_64_SYSCALLS
            .iter()
            .map(|(n, _)| format!("\"{n}\""))
            .collect();
        let f = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
                "syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}},
                            {{"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{{"index":0,"value":8,"op":"SCMP_CMP_EQ"}}]}}]}}"#,
            names.join(",")
        ));
        assert!(f.program.len() <= MAX_INSNS);
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, 0, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_I386, 3, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(
            run(&f.program, AUDIT_ARCH_X86_64, 9999, [0; 6]),
            SECCOMP_RET_ERRNO | 38
        );
        assert_eq!(
            run(&f.program, 0xc000_00b7, 0, [0; 6]),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn foreign_architecture_names_are_skipped_unknown_names_rejected() {
        assert_eq!(syscall_number("chown32"), SyscallLookup::Foreign);
        assert_eq!(syscall_number("read"), SyscallLookup::Native(0));
        assert_eq!(syscall_number("frobnicate"), SyscallLookup::Unknown);
    }
}
