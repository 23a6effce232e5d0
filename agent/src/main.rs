//! `husk-agent`: the guest's PID 1 and the agent API server.
//!
//! As PID 1 it does the init duties a microVM guest needs (mount the kernel
//! filesystems, report readiness and boot time, reap every orphan, power the
//! VM off), honours the `husk.exec=` and `husk.power_off_after_ms=` test
//! hooks, and then serves the agent API on vsock. It must never exit: PID 1
//! exiting panics the guest kernel, so every failure is logged to the
//! console and the VM is powered off instead.
//!
//! `husk-agent --test-mode --api-socket PATH --stdio-socket PATH --share-dir
//! DIR [--state-dir DIR]` serves the same API on Unix sockets on the host
//! (host-tier tests); `husk-agent __runtime-helper` is the agent's own
//! single-threaded helper for container create and exec (see `helper`).

mod boot_timer;
mod cmdline;
mod console;
mod debug_console;
mod error;
mod events;
mod exec;
mod guest;
mod guest_metrics;
mod guest_spec;
mod helper;
mod logging;
mod mounts;
mod network;
mod pod_namespaces;
mod port_forward;
mod power;
mod process;
mod reaper;
mod resources;
mod restored;
mod rpc;
mod sandbox;
mod server;
mod stdio;
mod switch_root;
mod validate;

use std::path::PathBuf;

use sandbox::AgentConfig;
use server::Listen;

/// Where the guest mounts the virtio-fs share.
const GUEST_SHARE_DIR: &str = "/run/husk/shared";
/// The guest agent's state (runtime state, bundles).
const GUEST_STATE_DIR: &str = "/run/husk/agent";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(helper::HELPER_ARG) {
        helper::main(args.get(2).map_or("", String::as_str));
    }
    if args.iter().any(|a| a == "--test-mode") {
        std::process::exit(test_mode_main(&args[1..]));
    }
    if std::process::id() != 1 {
        eprintln!(
            "husk-agent: must run as the guest's PID 1 (it is the init of the husk microVM), \
             or with --test-mode on the host"
        );
        std::process::exit(2);
    }
    guest_main()
}

fn guest_main() -> ! {
    boot_timer::report_init_reached();
    console::log("husk-agent starting");
    if let Err(error) = switch_root::leave_rootfs() {
        console::log(&format!("cannot leave the initramfs's rootfs: {error}"));
        power::power_off();
    }
    if let Err(error) = mounts::mount_kernel_filesystems() {
        console::log(&format!("cannot mount the kernel filesystems: {error}"));
        power::power_off();
    }
    let options = cmdline::AgentOptions::from_kernel_cmdline();
    if let Some(ms) = uptime_ms() {
        guest_metrics::record_agent_start(ms);
    }
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
        reaper::spawn_blocking_reaper();
        std::thread::sleep(delay);
        power::power_off();
    }
    logging::init();
    // The console still takes `poweroff`, beside the API.
    let console_thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(|| {
            console::serve_commands();
            power::power_off();
        });
    if let Err(error) = console_thread {
        console::log(&format!("cannot start the console thread: {error}"));
    }
    let config = AgentConfig {
        share_dir: PathBuf::from(GUEST_SHARE_DIR),
        state_dir: PathBuf::from(GUEST_STATE_DIR),
        test_mode: false,
    };
    if let Err(error) = server::run(config, Listen::Vsock) {
        console::log(&format!("agent API stopped: {error}"));
    }
    power::power_off()
}

/// Host test mode; returns the process exit code.
fn test_mode_main(args: &[String]) -> i32 {
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let (Some(api), Some(stdio), Some(share_dir)) = (
        value("--api-socket"),
        value("--stdio-socket"),
        value("--share-dir"),
    ) else {
        eprintln!(
            "usage: husk-agent --test-mode --api-socket PATH --stdio-socket PATH --share-dir DIR [--state-dir DIR]"
        );
        return 2;
    };
    let state_dir = value("--state-dir")
        .unwrap_or_else(|| std::env::temp_dir().join(format!("husk-agent-{}", std::process::id())));
    if let Err(error) = std::fs::create_dir_all(&state_dir) {
        eprintln!("husk-agent: cannot create {}: {error}", state_dir.display());
        return 1;
    }
    // Before any thread exists: container inits re-parent to us (as they
    // would to PID 1), and the hostname and net.* sysctls CreateSandbox
    // sets stay out of the host's namespaces.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if let Err(error) = nix::sched::unshare(
        nix::sched::CloneFlags::CLONE_NEWUTS | nix::sched::CloneFlags::CLONE_NEWNET,
    ) {
        eprintln!("husk-agent: test mode needs root (unshare uts+net): {error}");
        return 1;
    }
    logging::init();
    let config = AgentConfig {
        share_dir,
        state_dir,
        test_mode: true,
    };
    match server::run(config, Listen::Unix { api, stdio }) {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("{error}");
            1
        }
    }
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
