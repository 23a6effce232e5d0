//! Turning a class's rule lists into a classic-BPF program with the runtime
//! crate's seccomp compiler (the one that compiles containers' profiles),
//! and loading it on the calling thread.

use husk_runtime::seccomp as compiler;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use crate::syscalls::{self, ArgCheck, Rule};
use crate::{ThreadClass, ViolationAction};

/// Why a filter could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The OCI description of the list could not be built.
    #[error("cannot describe the {class} allowlist: {reason}")]
    Describe { class: &'static str, reason: String },
    /// The compiler refused the list.
    #[error("cannot compile the {class} allowlist: {reason}")]
    Compile { class: &'static str, reason: String },
    /// The kernel refused the program.
    #[error("cannot load the seccomp filter: {reason}")]
    Load { reason: String },
}

/// The class's allowlist as an OCI seccomp profile: `action` by default,
/// the listed calls allowed, `clone3` failing with ENOSYS.
pub fn profile(class: ThreadClass, action: ViolationAction) -> Result<LinuxSeccomp, FilterError> {
    let describe = |reason: String| FilterError::Describe {
        class: class.name(),
        reason,
    };
    let mut rules: Vec<LinuxSyscall> = Vec::new();
    for rule in syscalls::lists_for(class)
        .iter()
        .flat_map(|list| list.iter())
    {
        rules.push(allow_rule(rule).map_err(describe)?);
    }
    rules.push(errno_rule(syscalls::ENOSYS_CALLS, libc::ENOSYS).map_err(describe)?);
    let refused = syscalls::refused_for(class);
    if !refused.is_empty() {
        rules.push(errno_rule(refused, libc::EACCES).map_err(describe)?);
    }
    let default_action = match action {
        ViolationAction::Kill => LinuxSeccompAction::ScmpActKillProcess,
        ViolationAction::Trap => LinuxSeccompAction::ScmpActTrap,
        ViolationAction::Log => LinuxSeccompAction::ScmpActLog,
    };
    LinuxSeccompBuilder::default()
        .default_action(default_action)
        .architectures(vec![Arch::ScmpArchX86_64])
        .syscalls(rules)
        .build()
        .map_err(|error| describe(error.to_string()))
}

/// `names` fail with `errno` instead of violating.
fn errno_rule(names: &[&str], errno: i32) -> Result<LinuxSyscall, String> {
    LinuxSyscallBuilder::default()
        .names(
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(errno as u32)
        .build()
        .map_err(|error| error.to_string())
}

fn allow_rule(rule: &Rule) -> Result<LinuxSyscall, String> {
    let args = rule
        .args
        .iter()
        .map(|check| match *check {
            ArgCheck::Equals { index, value } => LinuxSeccompArgBuilder::default()
                .index(index)
                .value(value)
                .op(LinuxSeccompOperator::ScmpCmpEq)
                .build(),
            ArgCheck::MaskedEquals { index, mask, value } => LinuxSeccompArgBuilder::default()
                .index(index)
                .value(mask)
                .value_two(value)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build(),
        })
        .collect::<Result<Vec<LinuxSeccompArg>, _>>()
        .map_err(|error| error.to_string())?;
    LinuxSyscallBuilder::default()
        .names(vec![rule.name.to_string()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(args)
        .build()
        .map_err(|error| error.to_string())
}

/// The compiled filter for `class`.
pub fn build(class: ThreadClass, action: ViolationAction) -> Result<compiler::Filter, FilterError> {
    let profile = profile(class, action)?;
    compiler::compile(&profile).map_err(|error| FilterError::Compile {
        class: class.name(),
        reason: error.to_string(),
    })
}

/// Loads `filter` on the calling thread (it and the threads it creates).
pub fn install(filter: &compiler::Filter) -> Result<(), FilterError> {
    compiler::install(filter).map_err(|error| FilterError::Load {
        reason: error.to_string(),
    })
}
