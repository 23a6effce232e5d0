//! The mount points below a directory, as this process's mount namespace
//! shows them: what a teardown check looks for, and what a test directory
//! refuses to delete through. Kept small and in one place on purpose.

use std::path::Path;

/// Mount points at or below `path` in this process's mount namespace, in
/// mount order. A mount point is below `path` only on whole path
/// components (`/a/bc` is not below `/a/b`).
pub fn mounts_under(path: &Path) -> Vec<String> {
    let prefix = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|mount_point| {
            *mount_point == prefix || mount_point.starts_with(&format!("{prefix}/"))
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_components_count_as_below() {
        // /proc is a mount point in every mount namespace a test runs in.
        assert_eq!(
            mounts_under(Path::new("/proc")).first().map(String::as_str),
            Some("/proc")
        );
        assert!(mounts_under(Path::new("/pro")).is_empty());
        assert!(mounts_under(Path::new("/proc/no-such-dir")).is_empty());
    }
}
