//! A host process's cost as `/proc` tells it: CPU seconds (`stat` utime +
//! stime), resident and proportional memory (`status` VmRSS,
//! `smaps_rollup` Pss), open fds and threads. The parsers are pure
//! functions of the files' text; a process that is gone reads as `None`.

use std::path::Path;

/// One process's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// 0 where `smaps_rollup` is unreadable (kernels before 4.14).
    pub pss_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Key:   123 kB` value of `status` or `smaps_rollup`, in bytes (or the
/// bare number for counts such as `Threads`).
pub fn field_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let number: u64 = words.next()?.parse().ok()?;
        Some(match words.next() {
            Some("kB") => number.saturating_mul(1024),
            _ => number,
        })
    })
}

/// Reads `pid`'s figures; `None` if the process is gone.
pub fn read(pid: u32) -> Option<ProcessStats> {
    let dir = Path::new("/proc").join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let rollup = std::fs::read_to_string(dir.join("smaps_rollup")).unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let open_fds = std::fs::read_dir(dir.join("fd")).map_or(0, |entries| entries.count() as u64);
    Some(ProcessStats {
        cpu_seconds: parse_stat_cpu_ticks(&stat)? as f64 / ticks,
        rss_bytes: field_value(&status, "VmRSS").unwrap_or(0),
        pss_bytes: field_value(&rollup, "Pss").unwrap_or(0),
        open_fds,
        threads: field_value(&status, "Threads").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_a_name_with_spaces_and_parentheses() {
        let line =
            "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 99 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn kib_fields_become_bytes_and_counts_stay_counts() {
        let status = "Name:\tqemu\nVmRSS:\t  2048 kB\nThreads:\t7\n";
        assert_eq!(field_value(status, "VmRSS"), Some(2 * 1024 * 1024));
        assert_eq!(field_value(status, "Threads"), Some(7));
        assert_eq!(field_value(status, "VmSwap"), None);
        let rollup = "00400000-7ffd [rollup]\nRss:  100 kB\nPss:   60 kB\nPss_Anon: 50 kB\n";
        assert_eq!(field_value(rollup, "Pss"), Some(60 * 1024));
    }

    #[test]
    fn this_process_reads_itself() {
        let me = read(std::process::id()).unwrap();
        assert!(
            me.rss_bytes > 0 && me.threads >= 1 && me.open_fds >= 3,
            "{me:?}"
        );
    }
}
