//! `husk-ctl templates`: the pre-booted templates on this host
//! (`hypervisor.template`, `husk_shim::hypervisor::template`), one line
//! each, and the removal of one or all of them. A pod restored from a
//! template keeps its guest RAM through its own mapping, so removing a
//! template never disturbs a running pod; the next pod of that shape
//! boots and becomes the template again.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One template directory, as listed.
#[derive(Debug)]
pub struct Listed {
    pub key: String,
    /// What it holds, or why it cannot be read.
    pub description: Result<husk_vmm::snapshot::SnapshotDescription, String>,
}

/// The templates under `root`, sorted by key; half-written ones
/// (`<key>.partial-<pid>`) are left out.
pub fn find(root: &Path) -> Result<Vec<Listed>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", root.display())),
    };
    let mut found: Vec<Listed> = entries
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .filter_map(|entry| {
            let key = entry.file_name().to_string_lossy().into_owned();
            (!key.contains(".partial-")).then(|| Listed {
                description: husk_vmm::snapshot::describe(&entry.path())
                    .map_err(|error| error.to_string()),
                key,
            })
        })
        .collect();
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / f64::from(1 << 20))
}

/// The listing's lines, header first.
pub fn render(found: &[Listed]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<17} {:>5} {:>8} {:>8}  {:<16} CPU",
        "TEMPLATE", "VCPUS", "RAM", "HELD", "DEVICES"
    )];
    for listed in found {
        lines.push(match &listed.description {
            Ok(description) => format!(
                "{:<17} {:>5} {:>8} {:>8}  {:<16} {}",
                listed.key,
                description.vcpus,
                mib(description.memory_bytes),
                mib(description.memory_allocated_bytes),
                description
                    .device_types
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                description.cpu_model
            ),
            Err(why) => format!("{:<17} unreadable: {why}", listed.key),
        });
    }
    lines
}

/// Removes template `key` under `root` (a key names one directory there,
/// nothing else).
pub fn remove(root: &Path, key: &str) -> Result<()> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        bail!("{key:?} is not a template key (hex digits and '-', as `husk-ctl templates` lists them)");
    }
    let directory = root.join(key);
    if !directory.is_dir() {
        bail!("no template {key} under {}", root.display());
    }
    std::fs::remove_dir_all(&directory)
        .with_context(|| format!("cannot remove {}", directory.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_template_is_listed_with_the_reason_and_partials_are_not() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("00aa")).unwrap();
        std::fs::write(root.path().join("00aa").join("snapshot.json"), b"{}").unwrap();
        std::fs::create_dir(root.path().join("00aa.partial-1")).unwrap();
        let found = find(root.path()).unwrap();
        assert_eq!(found.len(), 1);
        let lines = render(&found);
        assert!(lines[0].starts_with("TEMPLATE"));
        assert!(
            lines[1].starts_with("00aa") && lines[1].contains("unreadable:"),
            "{}",
            lines[1]
        );
        assert!(find(&root.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn a_real_template_is_listed_with_its_size_and_devices() {
        if let Err(error) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            println!("husk-test-form: templates listing: NOT RUN, no /dev/kvm ({error})");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let mut vm = husk_vmm::VmBuilder::new()
            .memory_mib(64)
            .flat_image(vec![0xfa, 0xf4, 0xeb, 0xfd], 0x10_0000)
            .virtio_device(Box::new(husk_devices::balloon::BalloonDevice::new()))
            .serial(husk_vmm::SerialSink::Null)
            .build()
            .unwrap();
        vm.start().unwrap();
        vm.pause().unwrap();
        vm.snapshot(&root.path().join("0123abcd-89abcdef")).unwrap();
        vm.stop();
        let lines = render(&find(root.path()).unwrap());
        assert_eq!(lines.len(), 2, "{lines:?}");
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            &fields[..3],
            ["0123abcd-89abcdef", "1", "64.0M"],
            "{}",
            lines[1]
        );
        assert_eq!(fields[4], "5", "the balloon: {}", lines[1]);
        println!(
            "husk-test-form: templates listing: ran on /dev/kvm: {}",
            lines[1]
        );
    }

    #[test]
    fn remove_takes_a_key_and_nothing_that_names_another_path() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("00bb")).unwrap();
        for bad in ["", "..", "../x", "a/b"] {
            let error = remove(root.path(), bad).unwrap_err().to_string();
            assert!(error.contains("is not a template key"), "{error}");
        }
        let error = remove(root.path(), "ffff").unwrap_err().to_string();
        assert!(error.contains("no template ffff"), "{error}");
        remove(root.path(), "00bb").unwrap();
        assert!(!root.path().join("00bb").exists());
    }
}
