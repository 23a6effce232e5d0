//! `husk-ctl`: the operator's tool for a husk host. `check` says whether
//! this host can run husk pods and which backend `auto` picks (see
//! [`check`]); `env` prints the effective configuration and versions (see
//! [`env`]); `list`, `metrics` and `logs` show the running sandboxes
//! through their management sockets and files (see [`sandboxes`]);
//! `monitor` serves every sandbox's metrics as one endpoint (see
//! [`monitor`]); `exec` opens a guest's debug shell (see [`exec`]);
//! `templates` lists and removes pre-booted templates (see
//! [`templates`]).

mod check;
mod env;
mod exec;
mod monitor;
mod sandboxes;
mod templates;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "husk-ctl", about = "The operator's view of a husk host")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Whether this host can run husk pods, one verdict per line; exits 1
    /// when any line failed.
    Check {
        /// The husk configuration (default: the shim's own search,
        /// `$HUSK_CONFIG` then /etc/husk/configuration.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// containerd's configuration.
        #[arg(long, default_value = check::DEFAULT_CONTAINERD_CONFIG)]
        containerd_config: PathBuf,
    },
    /// The effective configuration (every setting) and the versions that
    /// decide the shim's behaviour.
    Env {
        /// The husk configuration (default: the shim's own search).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "toml")]
        format: env::Format,
    },
    /// The running sandboxes, read through their management sockets.
    List,
    /// A sandbox's Prometheus text.
    Metrics {
        /// The sandbox id or a unique prefix of it.
        sandbox: String,
    },
    /// A sandbox's guest console and the shim's log lines for it.
    Logs {
        /// The sandbox id or a unique prefix of it.
        sandbox: String,
        /// The most bytes shown of each log (from its end).
        #[arg(long, default_value_t = 64 * 1024)]
        bytes: u64,
    },
    /// Serves every sandbox's metrics as one Prometheus endpoint.
    Monitor {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
    },
    /// The pre-booted templates on this host (`hypervisor.template`), or
    /// the removal of one or all of them.
    Templates {
        /// Removes the template with this key.
        #[arg(long, conflicts_with = "remove_all")]
        remove: Option<String>,
        /// Removes every template.
        #[arg(long)]
        remove_all: bool,
    },
    /// A shell in the sandbox's guest, outside the containers (only with
    /// `debug_console = true`); runs COMMAND there, or relays stdin.
    Exec {
        /// The sandbox id or a unique prefix of it.
        sandbox: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
}

/// Prints `error` as `husk-ctl <what>: ...` and fails.
fn failed(what: &str, error: anyhow::Error) -> ExitCode {
    eprintln!("husk-ctl {what}: {error:#}");
    ExitCode::FAILURE
}

fn list() -> anyhow::Result<()> {
    let root = husk_shim::paths::run_root();
    let found = sandboxes::find_all(&root)?;
    println!(
        "{:<20} {:<8} {:<6} {:>8} {:>5} {:>8} {:>8}  CONTAINERS",
        "SANDBOX", "BACKEND", "ACCEL", "VMM PID", "VCPUS", "MEMORY", "UPTIME"
    );
    for sandbox in &found {
        match sandboxes::info(sandbox) {
            Ok(info) => println!(
                "{:<20} {:<8} {:<6} {:>8} {:>5} {:>8} {:>8}  {}",
                info.sandbox_id,
                info.backend,
                sandboxes::accelerator_name(&info.accelerator),
                info.vmm_pid,
                info.vcpus,
                format!("{}M", info.memory_mib),
                sandboxes::uptime_text(info.uptime_s),
                info.containers.join(",")
            ),
            Err(error) => println!("{:<20} not answering: {error:#}", sandbox.id),
        }
    }
    if found.is_empty() {
        eprintln!("(no sandbox under {})", root.display());
    }
    Ok(())
}

fn logs(sandbox: &str, bytes: u64) -> anyhow::Result<()> {
    let found = sandboxes::resolve(&husk_shim::paths::run_root(), sandbox)?;
    for (what, path) in sandboxes::log_files(&found) {
        println!("==> {what}: {} (and .1) <==", path.display());
        let tail = husk_shim::hypervisor::console::read_tail(&path, bytes);
        if tail.is_empty() {
            println!("(empty or missing)");
        } else {
            print!("{}", sandboxes::terminal_safe(&tail));
            if !tail.ends_with(b"\n") {
                println!();
            }
        }
    }
    Ok(())
}

fn templates(remove: Option<String>, remove_all: bool) -> anyhow::Result<()> {
    let root = husk_shim::hypervisor::template::template_root();
    let found = templates::find(&root)?;
    if let Some(key) = remove {
        templates::remove(&root, &key)?;
        println!("removed template {key}");
        return Ok(());
    }
    if remove_all {
        for listed in &found {
            templates::remove(&root, &listed.key)?;
            println!("removed template {}", listed.key);
        }
        return Ok(());
    }
    for line in templates::render(&found) {
        println!("{line}");
    }
    if found.is_empty() {
        eprintln!("(no template under {})", root.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Commands::List => list().map_or_else(|e| failed("list", e), |()| ExitCode::SUCCESS),
        Commands::Metrics { sandbox } => {
            match sandboxes::resolve(&husk_shim::paths::run_root(), &sandbox)
                .and_then(|found| sandboxes::metrics(&found))
            {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(error) => failed("metrics", error),
            }
        }
        Commands::Logs { sandbox, bytes } => {
            logs(&sandbox, bytes).map_or_else(|e| failed("logs", e), |()| ExitCode::SUCCESS)
        }
        Commands::Templates { remove, remove_all } => templates(remove, remove_all)
            .map_or_else(|e| failed("templates", e), |()| ExitCode::SUCCESS),
        Commands::Monitor { listen } => monitor::serve(listen, &husk_shim::paths::run_root())
            .map_or_else(|e| failed("monitor", e), |()| ExitCode::SUCCESS),
        Commands::Exec { sandbox, command } => {
            match sandboxes::resolve(&husk_shim::paths::run_root(), &sandbox)
                .and_then(|found| exec::run(&found, &command))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => failed("exec", error),
            }
        }
        Commands::Env { config, format } => match env::render(config.as_deref(), format) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("husk-ctl env: {error:#}");
                ExitCode::FAILURE
            }
        },
        Commands::Check {
            config,
            containerd_config,
        } => {
            let lines = check::run(&check::Inputs {
                config,
                containerd_config,
            });
            for line in &lines {
                println!("{:<4}  {:<17}  {}", line.verdict, line.what, line.detail);
            }
            let failed = lines
                .iter()
                .filter(|line| line.verdict == check::Verdict::Fail)
                .count();
            if failed == 0 {
                println!("verdict: this host can run husk pods");
                ExitCode::SUCCESS
            } else {
                println!("verdict: {failed} check(s) failed: husk pods cannot start here");
                ExitCode::FAILURE
            }
        }
    }
}
