//! `husk-ctl env` as an operator runs it: the TOML it prints is a husk
//! configuration that reads back to the same settings, JSON carries the
//! same configuration with the backend and versions, and a configuration
//! that cannot be read fails naming its path.

use std::process::Command;

use husk_test_support::tempdir::TestDir;

fn env(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_husk-ctl"))
        .arg("env")
        .args(args)
        .output()
        .expect("husk-ctl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_printed_toml_is_a_configuration_with_the_files_settings() {
    let work = TestDir::new("husk-ctl-env").unwrap();
    let config = work.join("configuration.toml");
    std::fs::write(
        &config,
        "[hypervisor]\ndefault_memory_mib = 384\n[shared_fs]\nxattr = \"off\"\n",
    )
    .unwrap();
    let (code, toml_text, stderr) = env(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        toml_text.contains(&format!("configuration from {}", config.display())),
        "{toml_text}"
    );
    let printed = work.join("printed.toml");
    std::fs::write(&printed, &toml_text).unwrap();
    let read_back = husk_shim::config::Config::from_toml(&toml_text, &printed).unwrap();
    assert_eq!(read_back.hypervisor.default_memory_mib, 384);
    assert!(toml_text.contains("xattr = \"off\""), "{toml_text}");

    let (code, json_text, stderr) =
        env(&["--config", config.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(
        report["configuration"]["hypervisor"]["default_memory_mib"],
        384
    );
    assert!(report["backend"]["name"].is_string(), "{json_text}");
    assert_eq!(report["versions"]["husk"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn an_unreadable_configuration_fails_naming_its_path() {
    let work = TestDir::new("husk-ctl-env").unwrap();
    let missing = work.join("no-such-configuration.toml");
    let (code, stdout, stderr) = env(&["--config", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
}
