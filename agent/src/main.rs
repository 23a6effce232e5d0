//! `husk-agent`: the guest's PID 1.
//!
//! Today it does the init duties a microVM guest needs (mount the kernel
//! filesystems, report readiness and boot time, reap orphans, power the VM
//! off on request); the agent API over vsock builds on it. It must never
//! exit: PID 1 exiting panics the guest kernel, so every failure is logged to
//! the console and the VM is powered off instead.

mod boot_timer;
mod cmdline;
mod console;
mod exec;
mod mounts;
mod power;
mod reaper;

fn main() {
    if std::process::id() != 1 {
        eprintln!("husk-agent: must run as the guest's PID 1 (it is the init of the husk microVM)");
        std::process::exit(2);
    }
    boot_timer::report_init_reached();
    console::log("husk-agent starting");
    if let Err(error) = mounts::mount_kernel_filesystems() {
        console::log(&format!("cannot mount the kernel filesystems: {error}"));
        power::power_off();
    }
    let options = cmdline::AgentOptions::from_kernel_cmdline();
    console::log(&format!(
        "HUSK_AGENT_READY uptime_ms={} kernel={} cpus={}",
        uptime_ms().map_or("unknown".to_owned(), |ms| ms.to_string()),
        kernel_release().unwrap_or_else(|| "unknown".to_owned()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    ));
    if let Some(program) = &options.exec {
        exec::run_and_report(program);
        power::power_off();
    }
    if let Some(delay) = options.power_off_after {
        console::log(&format!(
            "powering off after {} ms as the kernel command line asks",
            delay.as_millis()
        ));
        std::thread::sleep(delay);
        power::power_off();
    }
    // Until the agent API listens on vsock, the console is the way to ask
    // for a power-off; orphans are reaped meanwhile.
    reaper::spawn();
    console::serve_commands();
    power::power_off();
}

/// Milliseconds since the guest kernel started.
fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
}

/// The guest kernel's release, as `uname -r` prints it.
fn kernel_release() -> Option<String> {
    nix::sys::utsname::uname()
        .ok()
        .map(|u| u.release().to_string_lossy().into_owned())
}
