//! `husk-ctl`: the operator's tool for a husk host. `check` says whether
//! this host can run husk pods and which backend `auto` picks (see
//! [`check`]); `env` prints the effective configuration and versions (see
//! [`env`]).

mod check;
mod env;

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
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
