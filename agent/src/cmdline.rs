//! Agent options read from the kernel command line (`husk.*` parameters).

use std::time::Duration;

/// What the host asked of the agent through the command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgentOptions {
    /// `husk.power_off_after_ms=N`: power the VM off N ms after readiness
    /// (boot checks and the demo use it).
    pub power_off_after: Option<Duration>,
    /// `husk.exec=/path`: run this program (from the initramfs) once the
    /// guest is ready, report its exit status, then power off. Guest-tier
    /// tests and diagnostics use it.
    pub exec: Option<String>,
}

impl AgentOptions {
    /// Parses `/proc/cmdline`; unreadable or unknown parameters are ignored.
    pub fn from_kernel_cmdline() -> Self {
        std::fs::read_to_string("/proc/cmdline")
            .map(|text| Self::parse(&text))
            .unwrap_or_default()
    }

    fn parse(cmdline: &str) -> Self {
        let mut options = Self::default();
        for parameter in cmdline.split_whitespace() {
            if let Some(value) = parameter.strip_prefix("husk.power_off_after_ms=") {
                match value.parse::<u64>() {
                    Ok(ms) => options.power_off_after = Some(Duration::from_millis(ms)),
                    Err(_) => crate::console::log(&format!(
                        "ignoring invalid husk.power_off_after_ms={value}"
                    )),
                }
            } else if let Some(path) = parameter.strip_prefix("husk.exec=") {
                options.exec = Some(path.to_owned());
            }
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_delay_is_read_from_the_command_line() {
        let options = AgentOptions::parse("console=ttyS0 husk.power_off_after_ms=250 quiet");
        assert_eq!(options.power_off_after, Some(Duration::from_millis(250)));
        assert_eq!(AgentOptions::parse("console=ttyS0").power_off_after, None);
    }

    #[test]
    fn exec_program_is_read_from_the_command_line() {
        let options = AgentOptions::parse("console=ttyS0 husk.exec=/test/run quiet");
        assert_eq!(options.exec.as_deref(), Some("/test/run"));
        assert_eq!(AgentOptions::parse("quiet").exec, None);
    }
}
