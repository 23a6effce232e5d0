//! The guest itself: what CreateSandbox sets up (hostname, DNS, the
//! virtio-fs share, sysctls), what DestroySandbox undoes, and the facts
//! GetGuestDetails reports.
//!
//! In host test mode the agent runs in its own UTS and network namespaces
//! (see `main`), so the hostname and `net.*` sysctls it sets stay private;
//! other sysctls are refused there, and DNS goes to the state directory
//! instead of `/etc/resolv.conf`.

use std::path::PathBuf;

use husk_protocols::agent::{CreateSandboxRequest, GuestDetails};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{AgentError, Result};
use crate::sandbox::AgentConfig;

/// The resolver configuration the guest's containers see.
fn resolv_conf_path(config: &AgentConfig) -> PathBuf {
    if config.test_mode {
        config.state_dir.join("resolv.conf")
    } else {
        PathBuf::from("/etc/resolv.conf")
    }
}

/// Applies the sandbox-wide settings of `request`.
pub fn set_up_sandbox(config: &AgentConfig, request: &CreateSandboxRequest) -> Result<()> {
    for name in request.sysctls.keys() {
        let bad_name = name.is_empty()
            || name
                .split('.')
                .any(|part| part.is_empty() || part == ".." || part.contains('/'));
        if bad_name {
            return Err(AgentError::InvalidRequest(format!("sysctl name {name:?}")));
        }
        if config.test_mode && !name.starts_with("net.") {
            return Err(AgentError::Unsatisfiable {
                what: format!("sysctl {name}"),
                why: "host test mode only applies namespaced net.* sysctls".into(),
            });
        }
    }
    if !request.hostname.is_empty() {
        nix::unistd::sethostname(&request.hostname)
            .map_err(|e| AgentError::io("set hostname", &request.hostname)(e.into()))?;
    }
    if !request.dns.is_empty() {
        let path = resolv_conf_path(config);
        let text: String = request.dns.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(&path, text).map_err(AgentError::io("write", &path))?;
    }
    if !config.test_mode {
        mount_share(config, &request.shared_fs_tag)?;
    }
    for (name, value) in &request.sysctls {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        std::fs::write(&path, value).map_err(AgentError::io("write sysctl", &path))?;
    }
    Ok(())
}

fn mount_share(config: &AgentConfig, tag: &str) -> Result<()> {
    if tag.is_empty() {
        return Err(AgentError::InvalidRequest(
            "shared_fs_tag is empty: the guest needs the share".into(),
        ));
    }
    let target = &config.share_dir;
    std::fs::create_dir_all(target).map_err(AgentError::io("create", target))?;
    mount(
        Some(tag),
        target,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| AgentError::io("mount virtiofs share on", target)(e.into()))
}

/// Undoes the share mount (the rest ends with the VM).
pub fn tear_down_sandbox(config: &AgentConfig) {
    if !config.test_mode {
        let _ = umount2(&config.share_dir, MntFlags::MNT_DETACH);
    }
}

/// The CPUs online in the guest.
pub fn online_cpus() -> Vec<u32> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|text| crate::resources::parse_cpu_list(text.trim()).ok())
        .unwrap_or_default()
}

/// The guest's memory (MemTotal), bytes; 0 if unknown.
pub fn memory_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kib| kib * 1024)
}

/// What GetGuestDetails reports.
pub fn details() -> GuestDetails {
    GuestDetails {
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        memory_total_bytes: memory_total_bytes(),
        online_cpus: online_cpus().len() as u32,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    }
}
