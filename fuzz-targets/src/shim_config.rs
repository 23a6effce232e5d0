//! `shim_config`: the shim's configuration file (`husk_shim::config`,
//! TOML), the pod annotations it sizes VMs by, and the runtime options
//! containerd passes in `Create` (`husk_shim::options::config_path`).
//!
//! The input is the configuration text; lines `#!vcpus=...` and
//! `#!memory=...` (TOML comments) are the pod's annotations. The same bytes
//! are also decoded as the value of a `runtimeoptions.v1.Options`.
//!
//! Oracle: no panic; a configuration that parses satisfies what
//! validation promises (a known cache policy, 1 <= default vCPUs <= the
//! vCPU limit, default memory within the memory limits); a VM size from
//! annotations stays within the limits; a config path read from the
//! options is never empty.

use std::collections::HashMap;
use std::path::Path;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use husk_shim::config::{Config, ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS};

/// Runs one input.
pub fn shim_config(data: &[u8]) {
    configuration(data);
    runtime_options(data);
}

fn configuration(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::from_toml(&text, Path::new("/fuzz/configuration.toml")) else {
        return;
    };
    assert!(
        ["never", "metadata", "auto", "always"].contains(&config.shared_fs.cache.as_str()),
        "accepted cache policy {:?}",
        config.shared_fs.cache
    );
    let limits = &config.limits;
    assert!(limits.max_vcpus >= 1);
    assert!(limits.min_memory_mib <= limits.max_memory_mib);
    assert!((1..=limits.max_vcpus).contains(&config.hypervisor.default_vcpus));
    assert!((limits.min_memory_mib..=limits.max_memory_mib)
        .contains(&config.hypervisor.default_memory_mib));
    let mut annotations = HashMap::new();
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("#!vcpus=") {
            annotations.insert(ANNOTATION_VCPUS.to_owned(), value.to_owned());
        } else if let Some(value) = line.strip_prefix("#!memory=") {
            annotations.insert(ANNOTATION_MEMORY_MIB.to_owned(), value.to_owned());
        }
    }
    let size = config.vm_size_for(&annotations);
    if let Ok(size) = size {
        assert!(
            (1..=limits.max_vcpus).contains(&size.vcpus),
            "{size:?} for {annotations:?}"
        );
        assert!(
            (limits.min_memory_mib..=limits.max_memory_mib).contains(&size.memory_mib),
            "{size:?} for {annotations:?}"
        );
    } else {
        assert!(
            !annotations.is_empty(),
            "the defaults alone must always give a VM size"
        );
    }
    // The shim logs and reports the configuration: it must print.
    let _ = format!("{config:?}");
}

fn runtime_options(data: &[u8]) {
    let mut any = Any::new();
    any.type_url = "type.googleapis.com/runtimeoptions.v1.Options".to_owned();
    any.value = data.to_vec();
    if let Ok(Some(path)) = husk_shim::options::config_path(Some(&any)) {
        assert!(!path.as_os_str().is_empty(), "an empty config path");
    }
    let mut other = Any::new();
    other.type_url = "containerd.runc.v1.Options".to_owned();
    other.value = data.to_vec();
    assert!(
        matches!(husk_shim::options::config_path(Some(&other)), Ok(None)),
        "options of another runtime must name no file"
    );
}
