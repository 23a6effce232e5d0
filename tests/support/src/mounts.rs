//! The mount points below a directory, as this process's mount namespace
//! shows them: what a teardown check looks for, and what a test directory
//! refuses to delete through. Kept small and in one place on purpose.

use std::path::Path;

/// Mount points at or below `path` in this process's mount namespace, in
/// mount order (husk-mountinfo decodes the kernel's escapes). A mount
/// point is below `path` only on whole path components (`/a/bc` is not
/// below `/a/b`). An unreadable mount table shows no mounts.
pub fn mounts_under(path: &Path) -> Vec<String> {
    husk_mountinfo::read_self()
        .unwrap_or_default()
        .into_iter()
        .filter(|mount| mount.mount_point.starts_with(path))
        .map(|mount| mount.mount_point.to_string_lossy().into_owned())
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
