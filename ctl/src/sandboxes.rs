//! Finding the running sandboxes and talking to their management sockets.
//! A sandbox is a directory under the run root (`/run/husk/sandboxes`, or
//! `$HUSK_RUN_DIR`) whose name is a valid id; its socket is found from the
//! id by the digest that names its VM directory
//! (`SandboxPaths::management_socket`). A socket that is missing or does
//! not answer is reported with the sandbox, never fatal to the others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_shim::management::{http, SandboxInfo};
use husk_shim::paths::SandboxPaths;

/// How long one request to a management socket may take (a scrape asks
/// the guest, whose calls the shim bounds with `timeouts.agent_call_ms`).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
/// The most bytes read from one answer: far above a pod's metrics, and a
/// bound on what a broken shim can make the client hold.
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// One sandbox directory found under the run root.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub paths: SandboxPaths,
}

/// The sandbox directories under `root`, sorted by id (names that are not
/// valid ids are not sandboxes and are left out).
pub fn find_all(root: &Path) -> Result<Vec<Found>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("cannot list {}", root.display())),
    };
    let mut found: Vec<Found> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let id = entry.file_name().into_string().ok()?;
            husk_shim::ids::validate("sandbox id", &id).ok()?;
            entry.file_type().ok()?.is_dir().then(|| Found {
                paths: SandboxPaths::under(root, &id),
                id,
            })
        })
        .collect();
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The one sandbox whose id is `wanted` or starts with it.
pub fn resolve(root: &Path, wanted: &str) -> Result<Found> {
    let all = find_all(root)?;
    if let Some(exact) = all.iter().find(|f| f.id == wanted) {
        return Ok(exact.clone());
    }
    let matching: Vec<&Found> = all.iter().filter(|f| f.id.starts_with(wanted)).collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no sandbox id starts with {wanted:?} under {} ({} sandbox(es) there)",
            root.display(),
            all.len()
        ),
        many => bail!(
            "{wanted:?} is ambiguous: {}",
            many.iter()
                .map(|f| f.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `GET path` on a management socket; the body of a 200 answer.
pub fn get(socket: &Path, path: &str) -> Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: husk\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .with_context(|| format!("cannot write to {}", socket.display()))?;
    let mut bytes = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the answer of {}", socket.display()))?;
    let (code, body) =
        http::parse_response(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", socket.display()))?;
    if code != 200 {
        bail!(
            "{} answered {code} to GET {path}: {}",
            socket.display(),
            String::from_utf8_lossy(body).trim()
        );
    }
    Ok(body.to_vec())
}

/// A sandbox's `/info`.
pub fn info(found: &Found) -> Result<SandboxInfo> {
    let socket = found.paths.management_socket();
    let body = get(&socket, "/info")?;
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "{} answered /info with something else than its JSON",
            socket.display()
        )
    })
}

/// A sandbox's `/metrics`.
pub fn metrics(found: &Found) -> Result<String> {
    let body = get(&found.paths.management_socket(), "/metrics")?;
    String::from_utf8(body).context("the metrics are not UTF-8")
}

/// Where a sandbox's logs are.
pub fn log_files(found: &Found) -> [(&'static str, PathBuf); 2] {
    [
        ("guest console", found.paths.console_log()),
        ("shim log", found.paths.shim_log()),
    ]
}

/// The accelerator's short name ("tcg", "kvm") from its description.
pub fn accelerator_name(description: &str) -> &str {
    description
        .split([' ', ':', ',', '('])
        .next()
        .unwrap_or(description)
}

/// `3d4h`, `5m12s`, `40s`.
pub fn uptime_text(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Guest bytes made safe for a terminal: line breaks and tabs stay, other
/// control characters (escape sequences a guest could send to the
/// operator's terminal) become `\xNN`.
pub fn terminal_safe(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_are_valid_id_directories_and_prefixes_must_be_unique() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["abc123", "abd456", ".hidden", "bad..id"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("afile"), b"").unwrap();
        let ids: Vec<String> = find_all(root.path())
            .unwrap()
            .into_iter()
            .map(|f| f.id)
            .collect();
        assert_eq!(ids, ["abc123", "abd456"]);
        assert_eq!(resolve(root.path(), "abc").unwrap().id, "abc123");
        let ambiguous = resolve(root.path(), "ab").unwrap_err().to_string();
        assert!(
            ambiguous.contains("ambiguous") && ambiguous.contains("abd456"),
            "{ambiguous}"
        );
        let none = resolve(root.path(), "zz").unwrap_err().to_string();
        assert!(none.contains("no sandbox id starts with \"zz\""), "{none}");
        assert!(find_all(&root.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn uptime_and_accelerator_are_short() {
        assert_eq!(uptime_text(42), "42s");
        assert_eq!(uptime_text(312), "5m12s");
        assert_eq!(uptime_text(3 * 3600 + 120), "3h2m");
        assert_eq!(uptime_text(2 * 86_400 + 3600), "2d1h");
        assert_eq!(
            accelerator_name("tcg (PVM KVM cannot run stock guests)"),
            "tcg"
        );
        assert_eq!(accelerator_name("kvm"), "kvm");
    }

    #[test]
    fn guest_escape_sequences_never_reach_the_terminal() {
        assert_eq!(terminal_safe(b"ok\r\n\x1b[2Jx\t"), "ok\n\\x1b[2Jx\t");
    }
}
