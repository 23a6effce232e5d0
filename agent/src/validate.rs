//! Checks on what the host sends: ids and paths. The host is trusted to
//! drive the sandbox, not to reach outside it: ids become directory and
//! cgroup names, and paths must stay inside the shared directory.

use std::path::{Component, Path, PathBuf};

use crate::error::{AgentError, Result};

/// Longest container or exec id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Checks a container, exec or sandbox id: 1 to [`MAX_ID_LEN`] letters,
/// digits, '.', '_' or '-', starting with a letter or digit (so it can never
/// be `.`, `..` or a path).
pub fn id(kind: &'static str, id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(AgentError::InvalidId {
            kind,
            id: id.to_owned(),
        })
    }
}

/// Resolves `relative`, a path the host gave relative to the share, to an
/// existing path inside `share` (symlinks followed, then checked).
pub fn path_in_share(share: &Path, relative: &str) -> Result<PathBuf> {
    let escapes = || AgentError::PathEscapesShare {
        path: relative.to_owned(),
        share: share.to_owned(),
    };
    let candidate = Path::new(relative);
    if relative.is_empty()
        || candidate.is_absolute()
        || candidate
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(escapes());
    }
    let share = share
        .canonicalize()
        .map_err(AgentError::io("resolve the shared directory", share))?;
    let joined = share.join(candidate);
    let resolved = joined
        .canonicalize()
        .map_err(AgentError::io("resolve", &joined))?;
    if resolved.starts_with(&share) {
        Ok(resolved)
    } else {
        Err(escapes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_be_paths_are_rejected() {
        for bad in ["", "..", ".", "a/b", "-x", "a b", "a\n", &"x".repeat(129)] {
            assert!(id("container", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["c1", "abc.def_1-2", &"x".repeat(128)] {
            assert!(id("container", good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn paths_leaving_the_share_are_rejected_even_through_symlinks() {
        let share = tempfile::tempdir().unwrap();
        std::fs::create_dir(share.path().join("c1")).unwrap();
        std::os::unix::fs::symlink("/etc", share.path().join("evil")).unwrap();
        assert!(path_in_share(share.path(), "c1").is_ok());
        for bad in ["../x", "/etc", "c1/../../x", "evil", ""] {
            assert!(
                matches!(
                    path_in_share(share.path(), bad),
                    Err(AgentError::PathEscapesShare { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }
}
