//! `husk-ctl env`: the configuration the shim would run with (the file it
//! finds, or the built-in defaults, every setting filled in) and the
//! versions that decide its behaviour, as TOML or JSON.
//!
//! The TOML form is itself a valid husk configuration: written to a file,
//! it configures the same shim.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use husk_shim::config::Config;
use husk_shim::hypervisor::Backend;
use husk_vmm::host::probe_host_kvm;

/// How `env` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Toml,
    Json,
}

/// The first line of `binary --version`, if it runs.
fn version_of(binary: &Path) -> Option<String> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    })
}

/// The report: the configuration and where it came from, the backend
/// `auto` resolves to here, and the versions of husk, QEMU and containerd.
pub fn render(config_path: Option<&Path>, format: Format) -> Result<String> {
    let (config, source) = Config::load(config_path)
        .map_err(|error| anyhow::anyhow!("loading the husk configuration: {error}"))?;
    let source = source.map_or_else(
        || "built-in defaults".to_owned(),
        |path| path.display().to_string(),
    );
    let host = probe_host_kvm();
    let (backend, reason) = Backend::resolve(config.hypervisor.kind, &host);
    let qemu = config
        .hypervisor
        .qemu_binary
        .clone()
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let versions = [
        ("husk", Some(env!("CARGO_PKG_VERSION").to_owned())),
        ("qemu", version_of(&qemu)),
        ("containerd", version_of(Path::new("containerd"))),
    ];
    match format {
        Format::Toml => {
            let mut text = format!(
                "# husk-ctl env: the configuration from {source}\n# backend: {} ({reason})\n",
                backend.name()
            );
            for (name, version) in &versions {
                text.push_str(&format!(
                    "# {name}: {}\n",
                    version.as_deref().unwrap_or("not found")
                ));
            }
            text.push_str(&toml::to_string(&config).context("writing the configuration as TOML")?);
            Ok(text)
        }
        Format::Json => {
            let versions: serde_json::Map<String, serde_json::Value> = versions
                .into_iter()
                .map(|(name, version)| (name.to_owned(), version.into()))
                .collect();
            let report = serde_json::json!({
                "source": source,
                "backend": { "name": backend.name(), "reason": reason },
                "versions": versions,
                "configuration": config,
            });
            serde_json::to_string_pretty(&report).context("writing the report as JSON")
        }
    }
}
