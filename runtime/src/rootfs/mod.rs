//! The container's root file system, in the order the kernel requires:
//! set the propagation of the new mount namespace, bind the rootfs onto
//! itself (pivot_root needs a mount point), perform the spec's mounts at
//! destinations resolved inside the rootfs, populate `/dev`, `pivot_root`
//! and detach the old root, then — seen from inside — read-only paths,
//! masked paths and a read-only root.

pub mod devices;
pub mod mounts;
pub mod path;

use crate::error::{Context, Error, Result};
use mounts::MountContext;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use oci_spec::runtime::Spec;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Resolve `dest` inside `rootfs`, naming `field` on escape.
pub fn resolve(rootfs: &Path, dest: &Path, field: &str) -> Result<PathBuf> {
    path::resolve_in_root(rootfs, dest)
        .map_err(|e| Error::spec(field, format!("{}: {e}", dest.display())))
}

/// Make the mount that holds `rootfs` private, so pivot_root accepts it
/// whatever propagation the host uses.
fn make_parent_mount_private(rootfs: &Path) -> Result<()> {
    let mounts = husk_mountinfo::read_self()?;
    // The deepest mount point that is `rootfs` or one of its ancestors
    // (whole components: `/a/b` does not hold `/a/bc`).
    let best = mounts
        .iter()
        .map(|m| m.mount_point.as_path())
        .filter(|mp| rootfs.starts_with(mp))
        .max_by_key(|mp| mp.components().count());
    if let Some(mp) = best {
        mount(
            None::<&str>,
            mp,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .at("make parent mount private", mp)?;
    }
    Ok(())
}

/// Everything before pivot_root, run in the container's mount namespace.
pub fn prepare(spec: &Spec, rootfs: &Path, ctx: &MountContext<'_>) -> Result<()> {
    let linux = spec.linux().as_ref();
    let propagation = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .filter(|p| !p.is_empty())
        .and_then(mounts::propagation_flag)
        .unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    mount(None::<&str>, "/", None::<&str>, propagation, None::<&str>)
        .at("set root propagation", "/")?;
    make_parent_mount_private(rootfs)?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .at("bind rootfs", rootfs)?;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let dest = resolve(rootfs, m.destination(), &format!("mounts[{i}].destination"))?;
        mounts::mount_one(m, &dest, ctx)?;
    }
    Ok(())
}

/// Populate `/dev` (unless the spec binds a /dev from elsewhere).
pub fn setup_dev(spec: &Spec, rootfs: &Path, userns: bool) -> Result<()> {
    let dev_is_bind = spec.mounts().iter().flatten().any(|m| {
        m.destination() == Path::new("/dev")
            && (m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind"))
    });
    let old_umask = nix::sys::stat::umask(Mode::empty());
    let result = (|| -> Result<()> {
        let mut nodes = Vec::new();
        if !dev_is_bind {
            nodes.extend(devices::default_devices());
        }
        for d in spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
        {
            let node = devices::from_spec(d);
            nodes.retain(|n| n.path != node.path);
            nodes.push(node);
        }
        for node in &nodes {
            let dest = resolve(rootfs, &node.path, "linux.devices")?;
            devices::create_node(node, &dest, userns)?;
        }
        if !dev_is_bind {
            let dev = resolve(rootfs, Path::new("/dev"), "mounts")?;
            std::fs::create_dir_all(&dev).at("create", &dev)?;
            devices::create_symlinks(&dev)?;
            devices::setup_ptmx(&dev)?;
        }
        Ok(())
    })();
    nix::sys::stat::umask(old_umask);
    result
}

/// Switch the root to `rootfs` and detach the old one.
pub fn pivot(rootfs: &Path) -> Result<()> {
    use nix::fcntl::{open, OFlag};
    let old = open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .at("open", "/")?;
    let new = open(
        rootfs,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .at("open", rootfs)?;
    nix::unistd::fchdir(new).at("chdir", rootfs)?;
    nix::unistd::pivot_root(".", ".").at("pivot_root", rootfs)?;
    nix::unistd::fchdir(old).at("chdir", "old root")?;
    // Keep the unmount of the old root from propagating to the host.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .at("make old root slave", "/")?;
    umount2(".", MntFlags::MNT_DETACH).at("detach old root", "/")?;
    nix::unistd::chdir("/").at("chdir", "/")?;
    let _ = nix::unistd::close(old.as_raw_fd());
    let _ = nix::unistd::close(new.as_raw_fd());
    Ok(())
}

fn locked_flags_of(path: &Path) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let Ok(st) = nix::sys::statvfs::statvfs(path) else {
        return MsFlags::empty();
    };
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if st.flags().contains(fs) {
            out |= ms;
        }
    }
    out
}

/// Read-only paths, masked paths, and the read-only root (after pivot).
pub fn finalize(spec: &Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    for p in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(p);
        if std::fs::symlink_metadata(path).is_err() {
            continue;
        }
        mount(
            Some(path),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .at("bind read-only path", path)?;
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_REC
            | locked_flags_of(path);
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
            .at("remount read-only path", path)?;
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        let path = Path::new(p);
        match std::fs::metadata(path) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .at("mask directory", path)?,
            Ok(_) => mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .at("mask file", path)?,
        }
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).is_err() {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                flags | locked_flags_of(Path::new("/")),
                None::<&str>,
            )
            .at("remount root read-only", "/")?;
        }
    }
    Ok(())
}

/// Bind the terminal's pty slave onto `/dev/console` (after pivot).
pub fn mount_console(slave_path: &Path) -> Result<()> {
    let console = Path::new("/dev/console");
    if std::fs::symlink_metadata(console).is_err() {
        std::fs::File::create(console).at("create", console)?;
    }
    mount(
        Some(slave_path),
        console,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .at("bind console", console)
}
