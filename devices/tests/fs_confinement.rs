//! virtio-fs confinement: a guest that walks up with `..`, plants or follows
//! symlinks, races directory swaps or names paths with `/` must never reach a
//! host file outside the shared directory. Each test lays out
//! `<base>/share` (what the guest sees) next to `<base>/outside/secret`
//! (what it must never reach) and checks both the replies and the host.

mod fs_support;

mod virtio_fs {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use fuse_backend_rs::abi::fuse_abi::{Opcode, SetattrIn};
    use husk_devices::fs::FsConfig;
    use vm_memory::ByteValued;

    use super::fs_support::{FuseClient, TestDir, ROOT_ID};

    /// FATTR_MODE (include/uapi/linux/fuse.h): SETATTR changes the mode.
    const FATTR_MODE: u32 = 1 << 0;
    const SECRET: &[u8] = b"host secret";

    struct Layout {
        base: TestDir,
        share: PathBuf,
        outside: PathBuf,
    }

    impl Layout {
        fn new(label: &str) -> Self {
            let base = TestDir::new(label).unwrap();
            let share = base.path().join("share");
            let outside = base.path().join("outside");
            std::fs::create_dir(&share).unwrap();
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("secret"), SECRET).unwrap();
            std::fs::set_permissions(
                outside.join("secret"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            Self {
                base,
                share,
                outside,
            }
        }

        fn client(&self) -> FuseClient {
            FuseClient::new(&FsConfig::new(&self.share))
        }

        fn secret(&self) -> PathBuf {
            self.outside.join("secret")
        }

        /// The host side outside the share is exactly as the layout made it.
        fn assert_outside_untouched(&self) {
            let mut names: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["secret"], "nothing was created next to the secret");
            assert_eq!(std::fs::read(self.secret()).unwrap(), SECRET);
            let metadata = std::fs::metadata(self.secret()).unwrap();
            assert_eq!(
                metadata.mode() & 0o7777,
                0o600,
                "the secret's mode is unchanged"
            );
            assert!(
                xattr_names(&self.secret()).is_empty(),
                "the secret got no xattr"
            );
            let mut base_names: Vec<_> = std::fs::read_dir(self.base.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .collect();
            base_names.sort();
            assert_eq!(
                base_names,
                ["outside", "share"],
                "nothing was created above the share"
            );
        }
    }

    #[test]
    fn fs_lookup_of_dotdot_at_the_root_stays_at_the_root() {
        let layout = Layout::new("esc-root");
        let mut client = layout.client();
        let up = client.lookup(ROOT_ID, "..").unwrap();
        assert_eq!(up.nodeid, ROOT_ID, "`..` of the root is the root");
        assert_eq!(up.attr.ino, std::fs::metadata(&layout.share).unwrap().ino());
        let up_again = client.lookup(up.nodeid, "..").unwrap();
        assert_eq!(up_again.nodeid, ROOT_ID);
        assert_eq!(
            client.lookup(up_again.nodeid, "outside").map(|_| ()),
            Err(libc::ENOENT)
        );
        layout.assert_outside_untouched();
    }

    #[test]
    fn fs_dotdot_from_a_subdirectory_climbs_no_higher_than_the_root() {
        let layout = Layout::new("esc-sub");
        std::fs::create_dir_all(layout.share.join("a/b")).unwrap();
        let mut client = layout.client();
        let a = client.lookup(ROOT_ID, "a").unwrap();
        let b = client.lookup(a.nodeid, "b").unwrap();
        assert_eq!(client.lookup(b.nodeid, "..").unwrap().nodeid, a.nodeid);
        let root = client.lookup(a.nodeid, "..").unwrap();
        assert_eq!(
            root.nodeid, ROOT_ID,
            "the share's root is found again, not a new inode"
        );
        assert_eq!(client.lookup(root.nodeid, "..").unwrap().nodeid, ROOT_ID);
        assert_eq!(
            client.lookup(root.nodeid, "secret").map(|_| ()),
            Err(libc::ENOENT)
        );
    }

    #[test]
    fn fs_absolute_symlink_to_etc_is_a_symlink_that_readlink_shows_and_nothing_follows() {
        let layout = Layout::new("esc-abs");
        std::os::unix::fs::symlink("/etc", layout.share.join("etc_link")).unwrap();
        let mut client = layout.client();
        let link = client.lookup(ROOT_ID, "etc_link").unwrap();
        assert_eq!(
            link.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "the link itself, not /etc"
        );
        assert_ne!(link.attr.ino, std::fs::metadata("/etc").unwrap().ino());
        assert_eq!(client.readlink(link.nodeid).unwrap(), "/etc");
        assert!(
            client.open(link.nodeid, libc::O_RDONLY).is_err(),
            "OPEN of a symlink never reaches /etc"
        );
        assert!(
            client.opendir(link.nodeid).is_err(),
            "OPENDIR of a symlink never lists /etc"
        );
        assert_eq!(
            client.lookup(link.nodeid, "passwd").map(|_| ()),
            Err(libc::ENOTDIR),
            "a lookup below the link does not resolve /etc/passwd"
        );
    }

    #[test]
    fn fs_relative_symlink_climbing_out_of_the_share_does_not_reach_outside() {
        let layout = Layout::new("esc-rel");
        std::fs::create_dir(layout.share.join("d")).unwrap();
        std::os::unix::fs::symlink("../../../outside", layout.share.join("d/up")).unwrap();
        std::os::unix::fs::symlink("../../outside/secret", layout.share.join("d/secret_link"))
            .unwrap();
        let mut client = layout.client();
        let d = client.lookup(ROOT_ID, "d").unwrap();
        let up = client.lookup(d.nodeid, "up").unwrap();
        assert_eq!(up.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(client.readlink(up.nodeid).unwrap(), "../../../outside");
        assert_eq!(
            client.lookup(up.nodeid, "secret").map(|_| ()),
            Err(libc::ENOTDIR)
        );
        let secret_link = client.lookup(d.nodeid, "secret_link").unwrap();
        assert_eq!(secret_link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(secret_link.attr.size, "../../outside/secret".len() as u64);
        for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
            assert!(
                client.open(secret_link.nodeid, flags).is_err(),
                "OPEN({flags:#x}) of the link fails"
            );
        }
        layout.assert_outside_untouched();
    }

    #[test]
    fn fs_setxattr_and_chmod_on_a_symlink_do_not_reach_its_target() {
        let layout = Layout::new("esc-attr");
        std::os::unix::fs::symlink(layout.secret(), layout.share.join("l")).unwrap();
        let mut client = layout.client();
        let link = client.lookup(ROOT_ID, "l").unwrap();
        // user.* xattrs are not allowed on symlinks, so the kernel refuses;
        // had the server followed the link, the secret would carry it.
        assert!(client.setxattr(link.nodeid, "user.pwned", b"1").is_err());
        let setattr = SetattrIn {
            valid: FATTR_MODE,
            mode: 0o777,
            ..Default::default()
        };
        let reply = client.call(Opcode::Setattr, link.nodeid, &[setattr.as_slice()], 4096);
        assert!(
            reply.check().is_err(),
            "chmod of a symlink is refused, not applied to its target"
        );
        layout.assert_outside_untouched();
    }

    #[test]
    fn fs_names_that_climb_or_contain_a_slash_are_rejected() {
        let layout = Layout::new("esc-names");
        std::fs::write(layout.share.join("f"), b"inside").unwrap();
        let mut client = layout.client();
        let file = client.lookup(ROOT_ID, "f").unwrap();
        for name in ["..", "../escaped", "../outside/new", "a/b"] {
            assert_eq!(
                client.rename(ROOT_ID, "f", ROOT_ID, name),
                Err(libc::EINVAL),
                "rename to {name}"
            );
            assert_eq!(
                client.link(file.nodeid, ROOT_ID, name).map(|_| ()),
                Err(libc::EINVAL),
                "link to {name}"
            );
            assert_eq!(
                client
                    .create(ROOT_ID, name, 0o644, libc::O_WRONLY)
                    .map(|_| ()),
                Err(libc::EINVAL),
                "create {name}"
            );
            assert_eq!(
                client.mkdir(ROOT_ID, name, 0o755).map(|_| ()),
                Err(libc::EINVAL),
                "mkdir {name}"
            );
            assert_eq!(
                client.symlink(ROOT_ID, name, "/etc").map(|_| ()),
                Err(libc::EINVAL),
                "symlink {name}"
            );
        }
        assert_eq!(
            client.rename(ROOT_ID, "../outside/secret", ROOT_ID, "stolen"),
            Err(libc::EINVAL)
        );
        assert_eq!(
            client.lookup(ROOT_ID, "../outside").map(|_| ()),
            Err(libc::EINVAL)
        );
        assert_eq!(
            client.lookup(ROOT_ID, "d/../..").map(|_| ()),
            Err(libc::EINVAL)
        );
        assert_eq!(std::fs::read(layout.share.join("f")).unwrap(), b"inside");
        layout.assert_outside_untouched();
    }

    #[test]
    fn fs_a_node_id_the_guest_never_looked_up_names_nothing() {
        let layout = Layout::new("esc-nodeid");
        let mut client = layout.client();
        for nodeid in [2, 3, 999, u64::MAX] {
            assert!(
                client.open(nodeid, libc::O_RDONLY).is_err(),
                "OPEN of node {nodeid}"
            );
            assert!(client.getattr(nodeid).is_err(), "GETATTR of node {nodeid}");
        }
    }

    #[test]
    fn fs_directory_swapped_for_a_symlink_after_lookup_keeps_requests_inside() {
        let layout = Layout::new("esc-race");
        std::fs::create_dir(layout.share.join("d")).unwrap();
        let mut client = layout.client();
        let d = client.lookup(ROOT_ID, "d").unwrap();
        // The race a hostile writer would try: replace the directory by a
        // symlink to the outside between the lookup and the use.
        std::fs::rename(layout.share.join("d"), layout.share.join("d.moved")).unwrap();
        std::os::unix::fs::symlink(&layout.outside, layout.share.join("d")).unwrap();
        let (entry, open) = client
            .create(d.nodeid, "planted", 0o644, libc::O_WRONLY)
            .unwrap();
        client.write(entry.nodeid, open.fh, 0, b"x").unwrap();
        client.release(entry.nodeid, open.fh).unwrap();
        client.mkdir(d.nodeid, "planted_dir", 0o755).unwrap();
        assert!(
            layout.share.join("d.moved/planted").is_file(),
            "the request followed the inode"
        );
        assert!(layout.share.join("d.moved/planted_dir").is_dir());
        assert_eq!(
            client.lookup(d.nodeid, "secret").map(|_| ()),
            Err(libc::ENOENT)
        );
        layout.assert_outside_untouched();
        let fresh = client.lookup(ROOT_ID, "d").unwrap();
        assert_eq!(
            fresh.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "a fresh lookup sees the symlink itself"
        );
    }

    #[test]
    fn fs_mknod_refuses_device_nodes_but_allows_whiteouts_and_fifos() {
        let layout = Layout::new("esc-mknod");
        let mut client = layout.client();
        // 8:0 is /dev/sda on most hosts; 1:1 is /dev/mem.
        let sda = libc::makedev(8, 0) as u32;
        let mem = libc::makedev(1, 1) as u32;
        assert_eq!(
            client
                .mknod(ROOT_ID, "disk", libc::S_IFBLK | 0o600, sda)
                .map(|_| ()),
            Err(libc::EPERM)
        );
        assert_eq!(
            client
                .mknod(ROOT_ID, "mem", libc::S_IFCHR | 0o600, mem)
                .map(|_| ()),
            Err(libc::EPERM)
        );
        assert!(!layout.share.join("disk").exists() && !layout.share.join("mem").exists());
        let whiteout = client.mknod(ROOT_ID, "whiteout", libc::S_IFCHR, 0).unwrap();
        assert_eq!(whiteout.attr.mode & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(
            std::fs::symlink_metadata(layout.share.join("whiteout"))
                .unwrap()
                .rdev(),
            0
        );
        client
            .mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0)
            .unwrap();
        assert!(layout.share.join("fifo").exists());
    }

    fn xattr_names(path: &Path) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buffer = vec![0u8; 1024];
        // SAFETY: listxattr writes at most buffer.len() bytes.
        let len =
            unsafe { libc::listxattr(c_path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
        assert!(
            len >= 0,
            "listxattr failed: {}",
            std::io::Error::last_os_error()
        );
        buffer.truncate(len as usize);
        buffer
    }
}
