//! What is on the host right now, for the checks that a teardown left
//! nothing behind: processes (by command line) and Unix sockets.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// A process and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub args: Vec<String>,
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.args.join(" "))
    }
}

/// Every process with a command line (kernel threads and zombies have
/// none).
pub fn processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            if cmdline.is_empty() {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command name's closing parenthesis.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            let args = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Process { pid, ppid, args })
        })
        .collect()
}

/// The processes whose command line mentions `path` (a VMM left behind
/// would name its sandbox's directory).
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy();
    processes()
        .into_iter()
        .filter(|process| process.args.iter().any(|arg| arg.contains(&*needle)))
        .map(|process| process.pid)
        .collect()
}

/// Whether a process with this id exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Unix sockets at or below `path`, sorted.
pub fn sockets_under(path: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_is_a_process_that_mentions_its_own_program() {
        let me = std::process::id();
        assert!(process_exists(me));
        let exe = std::env::args().next().unwrap();
        assert!(processes_mentioning(Path::new(&exe)).contains(&me));
        let found = processes().into_iter().find(|p| p.pid == me).unwrap();
        assert!(found.ppid > 0, "{found}");
    }

    #[test]
    fn sockets_are_found_below_a_directory_and_nothing_else() {
        let dir = crate::tempdir::TestDir::new("sockets").unwrap();
        std::fs::create_dir(dir.join("deep")).unwrap();
        std::fs::write(dir.join("file"), "x").unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dir.join("deep/s.sock")).unwrap();
        assert_eq!(sockets_under(dir.path()), vec![dir.join("deep/s.sock")]);
    }
}
