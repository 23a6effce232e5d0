//! OCI hooks: run a hook's program with its args and env, the container's
//! OCI state as JSON on stdin, and its timeout.

use crate::error::{Error, Result};
use oci_spec::runtime::Hook;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Which lifecycle point a hook belongs to (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl HookKind {
    /// The spec's field name.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::CreateContainer => "createContainer",
            HookKind::StartContainer => "startContainer",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }
}

/// Run every hook in order; the first failure stops the list.
pub fn run_hooks(kind: HookKind, hooks: Option<&Vec<Hook>>, state_json: &str) -> Result<()> {
    for hook in hooks.into_iter().flatten() {
        run_hook(kind, hook, state_json)?;
    }
    Ok(())
}

fn run_hook(kind: HookKind, hook: &Hook, state_json: &str) -> Result<()> {
    let fail = |message: String| Error::Hook {
        kind: kind.name(),
        path: hook.path().clone(),
        message,
    };
    let args = hook.args().clone().unwrap_or_default();
    let mut cmd = Command::new(hook.path());
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.args(args.iter().skip(1));
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| fail(format!("start: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(state_json.as_bytes());
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(fail(format!("exited with {status}"))),
            Ok(None) => {}
            Err(e) => return Err(fail(format!("wait: {e}"))),
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail("timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn hook_reads_state_on_stdin_and_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state");
        let h = hook(&format!(
            r#"{{"path":"/bin/sh","args":["sh","-c","cat > {}"]}}"#,
            out.display()
        ));
        run_hooks(HookKind::Poststart, Some(&vec![h]), "{\"id\":\"x\"}").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"id\":\"x\"}");
        let bad = hook(r#"{"path":"/bin/sh","args":["sh","-c","exit 3"]}"#);
        let e = run_hooks(HookKind::Poststop, Some(&vec![bad]), "{}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("poststop hook /bin/sh") && e.contains("3"),
            "{e}"
        );
    }

    #[test]
    fn hook_past_its_timeout_is_killed() {
        let h = hook(r#"{"path":"/bin/sh","args":["sh","-c","sleep 5"],"timeout":1}"#);
        let start = Instant::now();
        let e = run_hooks(HookKind::CreateRuntime, Some(&vec![h]), "{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(4));
    }
}
