//! Resolving a path inside the container's rootfs without leaving it.
//!
//! Mount destinations come from the spec and symlinks come from the image;
//! both are untrusted. The resolver walks the path one component at a time
//! with `lstat`/`readlink`, treating the rootfs as `/`: absolute symlinks are
//! re-rooted at the rootfs (as they would be after `pivot_root`), and any
//! `..` that would climb above the rootfs, literal or inside a symlink, is an
//! error rather than being clamped, so a mount never lands outside it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed before giving up, as the kernel's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;

/// Why a path could not be resolved inside the rootfs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// `..` (written, or inside the symlink named) climbs above the rootfs.
    #[error("escapes the rootfs{}", .0.as_ref().map(|l| format!(" through symlink {}", l.display())).unwrap_or_default())]
    Escapes(Option<PathBuf>),
    /// More than [`MAX_SYMLINKS`] symlinks.
    #[error("too many levels of symbolic links")]
    TooManySymlinks,
}

/// Resolve `path` (absolute or relative, both taken from the rootfs `/`)
/// inside `root`; the result always starts with `root`.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, ResolveError> {
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front_components(&mut pending, path);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut via_link: Option<PathBuf> = None;
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            if resolved.pop().is_none() {
                return Err(ResolveError::Escapes(via_link));
            }
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ResolveError::TooManySymlinks);
                }
                let target =
                    std::fs::read_link(&candidate).map_err(|_| ResolveError::TooManySymlinks)?;
                via_link = Some(
                    candidate
                        .strip_prefix(root)
                        .map(|p| Path::new("/").join(p))
                        .unwrap_or(candidate.clone()),
                );
                if target.is_absolute() {
                    resolved.clear();
                }
                push_front_components(&mut pending, &target);
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved.iter());
    Ok(out)
}

/// Lexical check used at validation time: does `path` climb above `/`?
pub fn lexically_escapes(path: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in path.components() {
        match c {
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

fn push_front_components(queue: &mut VecDeque<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    for p in parts.into_iter().rev() {
        queue.push_front(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn plain_path_resolves_under_root() {
        let dir = tempfile::tempdir().unwrap();
        let got = resolve_in_root(dir.path(), Path::new("/a/b")).unwrap();
        assert_eq!(got, dir.path().join("a/b"));
    }

    #[test]
    fn dotdot_above_root_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_in_root(dir.path(), Path::new("/../etc")).unwrap_err();
        assert_eq!(err, ResolveError::Escapes(None));
        assert!(lexically_escapes(Path::new("/a/../../etc")));
        assert!(!lexically_escapes(Path::new("/a/../etc")));
    }

    #[test]
    fn relative_symlink_climbing_out_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        symlink("../../../../etc", dir.path().join("evil")).unwrap();
        let err = resolve_in_root(dir.path(), Path::new("/evil/x")).unwrap_err();
        assert!(matches!(err, ResolveError::Escapes(Some(ref l)) if l == Path::new("/evil")));
    }

    #[test]
    fn absolute_symlink_is_rerooted_inside_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        std::fs::create_dir(dir.path().join("var")).unwrap();
        symlink("/run", dir.path().join("var/run")).unwrap();
        let got = resolve_in_root(dir.path(), Path::new("/var/run/secrets")).unwrap();
        assert_eq!(got, dir.path().join("run/secrets"));
    }
}
