//! The runtime options containerd passes in `Create`: for this runtime,
//! `runtimeoptions.v1.Options` (what the CRI plugin sends from a runtime's
//! `options` table and `ctr run --runtime-config-path` sets), whose
//! `config_path` names the shim's configuration file. Other option types
//! (e.g. runc's) carry nothing for us and are ignored.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// The message name of containerd's generic runtime options.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// `config_path` in `runtimeoptions.v1.Options`.
const CONFIG_PATH_FIELD: u32 = 2;

/// The configuration file the options name, if any.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>> {
    let Some(any) = options else { return Ok(None) };
    if !any.type_url.ends_with(RUNTIME_OPTIONS) {
        return Ok(None);
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut found = None;
    while !input.eof().context("runtime options")? {
        let tag = input.read_raw_varint32().context("runtime options")?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (CONFIG_PATH_FIELD, 2) => {
                let path = input
                    .read_string()
                    .context("runtime options: config_path")?;
                if !path.is_empty() {
                    found = Some(PathBuf::from(path));
                }
            }
            (_, 2) => {
                input.read_bytes().context("runtime options")?;
            }
            (_, 0) => {
                input.read_raw_varint64().context("runtime options")?;
            }
            (field, wire_type) => {
                bail!("runtime options: unexpected field {field} with wire type {wire_type}")
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut any = Any::new();
        any.type_url = type_url.to_owned();
        any.value = value;
        any
    }

    #[test]
    fn the_config_path_of_runtime_options_is_read() {
        let mut value = vec![0x0a, 3];
        value.extend_from_slice(b"url");
        value.extend_from_slice(&[0x12, 11]);
        value.extend_from_slice(b"/etc/x.toml");
        let path = config_path(Some(&any("runtimeoptions.v1.Options", value))).unwrap();
        assert_eq!(path, Some(PathBuf::from("/etc/x.toml")));
    }

    #[test]
    fn other_options_and_none_name_no_file() {
        assert_eq!(config_path(None).unwrap(), None);
        let runc = any("containerd.runc.v1.Options", vec![0x08, 1]);
        assert_eq!(config_path(Some(&runc)).unwrap(), None);
    }
}
