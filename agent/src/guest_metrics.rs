//! What `GetGuestMetrics` reports: the guest's memory (`/proc/meminfo`),
//! CPU time (`/proc/stat`), load (`/proc/loadavg`), uptime, the uptime at
//! which the agent started (the kernel's share of a pod's boot), and each
//! running container's cgroup figures, read as `StatsContainer` reads
//! them. The parsers are pure functions of the files' text; a field a
//! kernel does not print reads as 0.

use std::sync::OnceLock;

use husk_protocols::agent::{GuestCpuTimes, GuestMetrics};

/// The guest uptime at which the agent started, recorded once at boot.
static AGENT_STARTED_UPTIME_MS: OnceLock<u64> = OnceLock::new();

/// Records when (in guest uptime) the agent started; later calls are
/// ignored.
pub fn record_agent_start(uptime_ms: u64) {
    let _ = AGENT_STARTED_UPTIME_MS.set(uptime_ms);
}

/// The memory figures of `/proc/meminfo`, bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
}

/// Parses `/proc/meminfo` (`MemTotal:  1234 kB` lines).
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut info = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        let slot = match key {
            "MemTotal" => &mut info.total_bytes,
            "MemFree" => &mut info.free_bytes,
            "MemAvailable" => &mut info.available_bytes,
            _ => continue,
        };
        *slot = kib.saturating_mul(1024);
    }
    info
}

/// Parses the aggregate `cpu` line of `/proc/stat`; `ticks_per_second` is
/// the kernel's USER_HZ (`sysconf(_SC_CLK_TCK)`).
pub fn parse_cpu_times(text: &str, ticks_per_second: u64) -> GuestCpuTimes {
    let ticks: Vec<u64> = text
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .map(|field| field.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let ms = |index: usize| {
        ticks
            .get(index)
            .map_or(0, |t| t.saturating_mul(1000) / ticks_per_second.max(1))
    };
    GuestCpuTimes {
        user_ms: ms(0),
        nice_ms: ms(1),
        system_ms: ms(2),
        idle_ms: ms(3),
        iowait_ms: ms(4),
        irq_ms: ms(5),
        softirq_ms: ms(6),
        steal_ms: ms(7),
        ..Default::default()
    }
}

/// Parses `/proc/loadavg`: the 1, 5 and 15 minute averages.
pub fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(0.0));
    [
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    ]
}

/// Parses `/proc/uptime`'s first field as milliseconds.
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((seconds * 1000.0) as u64)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The guest-wide figures, without containers (the sandbox adds them).
pub fn read_guest() -> GuestMetrics {
    let memory = parse_meminfo(&read("/proc/meminfo"));
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
    let [load1, load5, load15] = parse_loadavg(&read("/proc/loadavg"));
    GuestMetrics {
        mem_total_bytes: memory.total_bytes,
        mem_free_bytes: memory.free_bytes,
        mem_available_bytes: memory.available_bytes,
        cpu: protobuf::MessageField::some(parse_cpu_times(&read("/proc/stat"), ticks)),
        load1,
        load5,
        load15,
        agent_started_uptime_ms: AGENT_STARTED_UPTIME_MS.get().copied().unwrap_or(0),
        uptime_ms: parse_uptime_ms(&read("/proc/uptime")).unwrap_or(0),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes_and_others_ignored() {
        let text = "MemTotal:         493424 kB\nMemFree:          412000 kB\n\
                    MemAvailable:     450100 kB\nBuffers:            1234 kB\nbroken line\n";
        assert_eq!(
            parse_meminfo(text),
            MemInfo {
                total_bytes: 493_424 * 1024,
                free_bytes: 412_000 * 1024,
                available_bytes: 450_100 * 1024,
            }
        );
        assert_eq!(parse_meminfo("MemTotal: lots\n").total_bytes, 0);
    }

    #[test]
    fn the_cpu_line_is_converted_from_ticks_to_milliseconds() {
        let text = "cpu  250 1 100 5000 7 0 3 2 0 0\ncpu0 250 1 100 5000 7 0 3 2 0 0\nintr 1\n";
        let times = parse_cpu_times(text, 100);
        assert_eq!(times.user_ms, 2_500);
        assert_eq!(times.nice_ms, 10);
        assert_eq!(times.system_ms, 1_000);
        assert_eq!(times.idle_ms, 50_000);
        assert_eq!(times.iowait_ms, 70);
        assert_eq!(times.softirq_ms, 30);
        assert_eq!(times.steal_ms, 20);
        assert_eq!(parse_cpu_times("intr 1\n", 100).user_ms, 0);
    }

    #[test]
    fn loadavg_and_uptime_parse() {
        assert_eq!(
            parse_loadavg("0.25 0.10 1.50 1/80 123\n"),
            [0.25, 0.10, 1.50]
        );
        assert_eq!(parse_loadavg(""), [0.0; 3]);
        assert_eq!(parse_uptime_ms("12.34 20.00\n"), Some(12_340));
        assert_eq!(parse_uptime_ms("x"), None);
    }
}
