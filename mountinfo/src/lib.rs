//! `/proc/<pid>/mountinfo`, parsed once for the whole workspace.
//!
//! Each line of the table describes one mount (see `proc_pid_mountinfo(5)`):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2) (3)   (4)        (5)            (6)       (7)   (8) (9)    (10)        (11)
//! ```
//!
//! mount id, parent id, `major:minor`, root of the mount within its file
//! system, mount point, per-mount options, zero or more optional fields
//! (`shared:N`, `master:N`, `propagate_from:N`, `unbindable`), a lone `-`,
//! file system type, source and per-superblock options.
//!
//! The kernel (`show_mountinfo` in `fs/proc_namespace.c`) writes the root,
//! mount point, type and source through `seq_file`'s `mangle`, which replaces
//! only the four bytes of `" \t\n\\"` with a backslash and three octal digits
//! (`\040`, `\011`, `\012`, `\134`). Every other byte is written raw: UTF-8
//! names arrive as their UTF-8 bytes and a name that is not UTF-8 arrives as
//! its bytes too. So this crate reads the table as bytes, splits on single
//! spaces, decodes the octal escapes into bytes and builds paths with
//! [`OsStr::from_bytes`]: a mount point comes back exactly as the
//! `mount(2)` caller spelt it, whatever its encoding. (Decoding each byte into
//! a `char`, or reading the file with `read_to_string`, turns `ü` into `Ã¼`
//! or fails outright on a non-UTF-8 name.)
//!
//! The option fields are kept as the kernel printed them, escapes included:
//! file systems print option values with `seq_show_option`, which also
//! escapes `,`, so decoding before splitting on `,` would split values. Use
//! [`unescape`] on a single option value when its bytes are wanted.
//!
//! Malformed lines are errors naming the line number and the line itself;
//! nothing is skipped silently.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One line of a mountinfo table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique id of the mount (field 1).
    pub mount_id: u32,
    /// Id of the parent mount, or of this mount for the root of the tree
    /// (field 2).
    pub parent_id: u32,
    /// Major device number of the file system (field 3, before `:`).
    pub major: u32,
    /// Minor device number of the file system (field 3, after `:`).
    pub minor: u32,
    /// The directory of the file system that forms the root of this mount
    /// (`/` unless it is a bind mount of a subdirectory), escapes decoded;
    /// for a bind-mounted namespace (nsfs) the namespace, e.g.
    /// `net:[4026532248]`.
    pub root: PathBuf,
    /// Where the mount is, relative to the reading process's root, escapes
    /// decoded.
    pub mount_point: PathBuf,
    /// Per-mount options, e.g. `rw,nosuid,relatime`.
    pub mount_options: String,
    /// Propagation fields such as `shared:1`, `master:2`, `unbindable`.
    pub optional_fields: Vec<String>,
    /// File system type, `fstype` or `fstype.subtype`, escapes decoded.
    pub fs_type: String,
    /// Mount source (`/dev/sda1`, `tmpfs`, `none`; may be empty), escapes
    /// decoded.
    pub source: OsString,
    /// Per-superblock options, escapes kept (see the crate documentation).
    pub super_options: String,
}

/// A mountinfo table that could not be read or parsed.
#[derive(Debug)]
pub enum Error {
    /// Reading the table failed (for `/proc/<pid>/mountinfo`, usually
    /// because the process is gone).
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line does not have the mountinfo shape.
    Parse {
        /// The file the line came from, when read from one.
        path: Option<PathBuf>,
        /// 1-based line number within the text.
        line_number: usize,
        /// The line as read (lossily converted when not UTF-8).
        line: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Read { path, source } => write!(f, "read {}: {source}", path.display()),
            Error::Parse {
                path,
                line_number,
                line,
                reason,
            } => {
                match path {
                    Some(path) => write!(f, "{} line {line_number}", path.display())?,
                    None => write!(f, "mountinfo line {line_number}")?,
                }
                write!(f, ": {reason}: {line:?}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Read { source, .. } => Some(source),
            Error::Parse { .. } => None,
        }
    }
}

impl MountInfo {
    /// Parse one line (without its newline). An error reports it as line 1.
    pub fn parse_line(line: impl AsRef<[u8]>) -> Result<Self, Error> {
        let line = line.as_ref();
        parse_fields(line).map_err(|reason| Error::Parse {
            path: None,
            line_number: 1,
            line: String::from_utf8_lossy(line).into_owned(),
            reason,
        })
    }

    /// The value of optional field `tag`: `Some("1")` for `shared:1` and
    /// `tag == "shared"`, `Some("")` for `unbindable`, `None` when absent.
    pub fn optional_field(&self, tag: &str) -> Option<&str> {
        self.optional_fields
            .iter()
            .find_map(|field| match field.split_once(':') {
                Some((name, value)) => (name == tag).then_some(value),
                None => (field == tag).then_some(""),
            })
    }
}

/// Parse a whole table. Empty lines are ignored; any other line that is not
/// a mountinfo line fails the parse, naming its number and text.
pub fn parse(text: impl AsRef<[u8]>) -> Result<Vec<MountInfo>, Error> {
    text.as_ref()
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(index, line)| {
            parse_fields(line).map_err(|reason| Error::Parse {
                path: None,
                line_number: index + 1,
                line: String::from_utf8_lossy(line).into_owned(),
                reason,
            })
        })
        .collect()
}

/// Read and parse the mountinfo file at `path`.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<MountInfo>, Error> {
    let path = path.as_ref();
    let text = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(text).map_err(|error| match error {
        Error::Parse {
            line_number,
            line,
            reason,
            ..
        } => Error::Parse {
            path: Some(path.to_path_buf()),
            line_number,
            line,
            reason,
        },
        read => read,
    })
}

/// The mount table of the calling process (`/proc/self/mountinfo`).
pub fn read_self() -> Result<Vec<MountInfo>, Error> {
    read_file("/proc/self/mountinfo")
}

/// The mount table of process `pid` (`/proc/<pid>/mountinfo`), as seen from
/// that process's mount namespace and root.
pub fn read_pid(pid: u32) -> Result<Vec<MountInfo>, Error> {
    read_file(format!("/proc/{pid}/mountinfo"))
}

/// Mount points at `dir` or below it, deepest first.
///
/// "Below" compares whole path components, so `/a/bc` is not below `/a/b`.
/// `dir` should be absolute and free of symlinks, as the kernel prints mount
/// points resolved. A mount point with several mounts stacked on it is
/// listed once. Among equally deep mount points, the one whose top mount is
/// later comes first. Unmounting in this order never meets a parent that is
/// busy with a child still listed; stacked mounts need one pass each.
pub fn mount_points_below(mounts: &[MountInfo], dir: impl AsRef<Path>) -> Vec<PathBuf> {
    let dir = dir.as_ref();
    let mut seen = BTreeSet::new();
    let mut points: Vec<PathBuf> = mounts
        .iter()
        .rev()
        .map(|mount| mount.mount_point.as_path())
        .filter(|point| point.starts_with(dir) && seen.insert(*point))
        .map(Path::to_path_buf)
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points
}

/// Decode the kernel's octal escapes (`\040` and the like, a backslash and
/// three octal digits up to `\377`) into bytes. Any other backslash is kept
/// as it is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(value) = field.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The byte three octal digits stand for, if they are octal and fit.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    if !digits.iter().all(|d| (b'0'..=b'7').contains(d)) || digits[0] > b'3' {
        return None;
    }
    Some(digits.iter().fold(0u8, |acc, d| acc * 8 + (d - b'0')))
}

fn unescape_path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&unescape(field)))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

fn number(field: &[u8], what: &str) -> Result<u32, String> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what} {:?} is not a number", text(field)))
}

fn parse_fields(line: &[u8]) -> Result<MountInfo, String> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if fields.len() < 10 {
        return Err(format!(
            "{} fields, a mountinfo line has at least 10",
            fields.len()
        ));
    }
    // Fields 7.. are optional fields up to the lone "-"; none of the six
    // fixed fields before them can be "-" (paths start with '/').
    let separator = 6 + fields[6..]
        .iter()
        .position(|field| *field == b"-")
        .ok_or("no \" - \" separator before the file system type")?;
    let after = &fields[separator + 1..];
    if after.len() < 3 {
        return Err("file system type, source or super options missing after \" - \"".into());
    }
    let (major, minor) = fields[2]
        .iter()
        .position(|&b| b == b':')
        .map(|colon| (&fields[2][..colon], &fields[2][colon + 1..]))
        .ok_or_else(|| format!("device {:?} is not major:minor", text(fields[2])))?;
    // The root is a path for every file system that has directories, but
    // not for nsfs: a bind mount of a namespace (CNI's /run/netns/<name>)
    // has root "net:[4026532248]". Only the mount point must be absolute.
    if !fields[4].starts_with(b"/") {
        return Err(format!("mount point {:?} is not absolute", text(fields[4])));
    }
    Ok(MountInfo {
        mount_id: number(fields[0], "mount id")?,
        parent_id: number(fields[1], "parent id")?,
        major: number(major, "major device number")?,
        minor: number(minor, "minor device number")?,
        root: unescape_path(fields[3]),
        mount_point: unescape_path(fields[4]),
        mount_options: text(fields[5]),
        optional_fields: fields[6..separator].iter().map(|f| text(f)).collect(),
        fs_type: text(&unescape(after[0])),
        source: OsString::from_vec(unescape(after[1])),
        // Nothing past the source is split by the kernel; keep any stray
        // space a file system's show_options printed.
        super_options: text(&after[2..].join(&b' ')),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel's `mangle(m, s)` with `" \t\n\\"` prints for `s`.
    fn mangle(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in raw {
            if b" \t\n\\".contains(&b) {
                out.extend_from_slice(format!("\\{b:03o}").as_bytes());
            } else {
                out.push(b);
            }
        }
        out
    }

    fn line_with_mount_point(raw: &[u8]) -> Vec<u8> {
        let mut line = b"36 25 0:45 / ".to_vec();
        line.extend(mangle(raw));
        line.extend_from_slice(b" rw,relatime shared:7 - tmpfs tmpfs rw,inode64");
        line
    }

    fn point(raw: &[u8]) -> PathBuf {
        MountInfo::parse_line(line_with_mount_point(raw))
            .unwrap()
            .mount_point
    }

    fn mount_at(id: u32, point: &str) -> MountInfo {
        MountInfo::parse_line(format!("{id} 1 0:1 / {point} rw - tmpfs tmpfs rw")).unwrap()
    }

    #[test]
    fn a_plain_line_fills_every_field() {
        let m = MountInfo::parse_line(
            "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(
            m,
            MountInfo {
                mount_id: 36,
                parent_id: 35,
                major: 98,
                minor: 0,
                root: "/mnt1".into(),
                mount_point: "/mnt/parent dir".into(),
                mount_options: "rw,noatime".into(),
                optional_fields: vec!["master:1".into()],
                fs_type: "ext3".into(),
                source: "/dev/root".into(),
                super_options: "rw,errors=continue".into(),
            }
        );
    }

    #[test]
    fn non_ascii_mount_points_survive_exactly() {
        for name in [
            "/tmp/ünïcödé dir",
            "/srv/数据/コンテナ 卷",
            "/tmp/back\\slash\nnew\tline",
            "/tmp/\\040 is not a space",
            "/",
        ] {
            assert_eq!(point(name.as_bytes()), Path::new(name), "{name:?}");
        }
        // Not UTF-8 at all: the bytes come back unchanged.
        let raw = b"/tmp/latin1-\xfc\xe9 \xff";
        assert_eq!(point(raw).as_os_str().as_bytes(), raw);
    }

    #[test]
    fn kernel_text_with_escapes_decodes_to_the_right_bytes() {
        let m = MountInfo::parse_line(
            "40 1 0:50 /sub\\134dir /tmp/\u{fc}n\u{ef}c\u{f6}d\u{e9}\\040dir/a\\012b\\011c rw - fuse.sshfs me@host:/my\\040files rw,user_id=0",
        )
        .unwrap();
        assert_eq!(m.root, Path::new("/sub\\dir"));
        assert_eq!(m.mount_point, Path::new("/tmp/ünïcödé dir/a\nb\tc"));
        assert_eq!(m.fs_type, "fuse.sshfs");
        assert_eq!(m.source, OsStr::new("me@host:/my files"));
    }

    #[test]
    fn optional_fields_are_collected_until_the_separator() {
        let m = MountInfo::parse_line(
            "24 1 8:1 / / rw,relatime shared:1 master:2 propagate_from:3 unbindable - ext4 /dev/sda1 rw",
        )
        .unwrap();
        assert_eq!(
            m.optional_fields,
            ["shared:1", "master:2", "propagate_from:3", "unbindable"]
        );
        assert_eq!(m.optional_field("shared"), Some("1"));
        assert_eq!(m.optional_field("master"), Some("2"));
        assert_eq!(m.optional_field("unbindable"), Some(""));
        assert_eq!(m.optional_field("slave"), None);
        assert_eq!(m.fs_type, "ext4");

        let none = MountInfo::parse_line("25 24 0:5 / /dev rw - devtmpfs udev rw").unwrap();
        assert!(none.optional_fields.is_empty());
        assert_eq!(none.mount_options, "rw");
    }

    #[test]
    fn an_empty_source_and_spaced_super_options_are_kept() {
        let m = MountInfo::parse_line("30 1 0:40 / /x rw - tmpfs  rw,size=1k").unwrap();
        assert_eq!(m.source, OsStr::new(""));
        assert_eq!(m.super_options, "rw,size=1k");
        // Option values keep their escapes: `\054` is a comma inside a value.
        let m = MountInfo::parse_line(
            "31 1 0:41 / /o rw - overlay overlay rw,lowerdir=/l\\054x,upperdir=/u weird tail",
        )
        .unwrap();
        assert_eq!(
            m.super_options,
            "rw,lowerdir=/l\\054x,upperdir=/u weird tail"
        );
        assert_eq!(unescape(b"/l\\054x"), b"/l,x");
    }

    #[test]
    fn unescape_leaves_what_is_not_an_escape() {
        assert_eq!(unescape(b"/a\\040b"), b"/a b");
        assert_eq!(unescape(b"/end\\"), b"/end\\");
        assert_eq!(unescape(b"/end\\04"), b"/end\\04");
        assert_eq!(unescape(b"/x\\400"), b"/x\\400");
        assert_eq!(unescape(b"/x\\089"), b"/x\\089");
        assert_eq!(unescape(b"\\377\\000"), b"\xff\x00");
    }

    #[test]
    fn a_table_parses_line_by_line() {
        let table = "22 1 0:21 / /proc rw - proc proc rw\n\
                     23 1 0:22 / /sys rw shared:2 - sysfs sysfs rw\n";
        let mounts = parse(table).unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].mount_point, Path::new("/sys"));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn a_malformed_line_is_named_in_the_error() {
        let table = "22 1 0:21 / /proc rw - proc proc rw\n\
                     23 1 0:22 / /sys rw shared:2 sysfs sysfs rw\n";
        let error = parse(table).unwrap_err();
        let Error::Parse {
            line_number, line, ..
        } = &error
        else {
            panic!("{error:?}")
        };
        assert_eq!(*line_number, 2);
        assert_eq!(line, "23 1 0:22 / /sys rw shared:2 sysfs sysfs rw");
        let message = error.to_string();
        assert!(
            message.starts_with("mountinfo line 2: no \" - \" separator"),
            "{message}"
        );
        assert!(
            message.contains("23 1 0:22 / /sys rw shared:2 sysfs sysfs rw"),
            "{message}"
        );

        // A network namespace bind-mounted by CNI: its root is no path.
        let netns = MountInfo::parse_line(
            "46 27 0:4 net:[4026532248] /run/netns/cni-bb04 rw - nsfs nsfs rw",
        )
        .unwrap();
        assert_eq!(netns.root, Path::new("net:[4026532248]"));
        assert_eq!(netns.mount_point, Path::new("/run/netns/cni-bb04"));

        for (bad, reason) in [
            (
                "x 1 0:1 / /a rw - tmpfs tmpfs rw",
                "mount id \"x\" is not a number",
            ),
            (
                "1 1 0-1 / /a rw - tmpfs tmpfs rw",
                "device \"0-1\" is not major:minor",
            ),
            (
                "1 1 0:y / /a rw - tmpfs tmpfs rw",
                "minor device number \"y\"",
            ),
            (
                "1 1 0:1 / a rw - tmpfs tmpfs rw",
                "mount point \"a\" is not absolute",
            ),
            ("1 1 0:1 / /a rw x - tmpfs tmpfs", "missing after"),
            ("1 1 0:1 / /a", "5 fields"),
        ] {
            let message = MountInfo::parse_line(bad).unwrap_err().to_string();
            assert!(message.contains(reason), "{bad:?}: {message}");
            assert!(message.contains(&format!("{bad:?}")), "{bad:?}: {message}");
        }
    }

    #[test]
    fn below_means_whole_components_not_string_prefixes() {
        let mounts = [
            mount_at(1, "/"),
            mount_at(2, "/a/b"),
            mount_at(3, "/a/bc"),
            mount_at(4, "/a/b/c/d"),
            mount_at(5, "/a/b/c"),
            mount_at(6, "/a/b/x"),
            mount_at(7, "/a/b/c"),
            mount_at(8, "/a/b-sibling"),
        ];
        assert_eq!(
            mount_points_below(&mounts, "/a/b"),
            [
                Path::new("/a/b/c/d"),
                // Stacked twice; its top mount (7) is later than /a/b/x (6).
                Path::new("/a/b/c"),
                Path::new("/a/b/x"),
                Path::new("/a/b"),
            ]
        );
        assert_eq!(
            mount_points_below(&mounts, "/a/b/"),
            mount_points_below(&mounts, "/a/b")
        );
        assert_eq!(mount_points_below(&mounts, "/a/bc"), [Path::new("/a/bc")]);
        assert!(mount_points_below(&mounts, "/a/b/c/d/e").is_empty());
        assert!(mount_points_below(&mounts, "/a/").len() == 6);
    }

    #[test]
    fn below_works_on_non_ascii_directories() {
        let dir = "/run/ünï 数据";
        let mounts = [
            mount_at(1, "/run/\u{fc}n\u{ef}\\040\u{6570}\u{636e}/rootfs"),
            mount_at(2, "/run/\u{fc}n\u{ef}\\040\u{6570}\u{636e}x"),
        ];
        assert_eq!(
            mount_points_below(&mounts, dir),
            [Path::new("/run/ünï 数据/rootfs")]
        );
    }

    #[test]
    fn this_process_table_reads() {
        let mine = read_self().unwrap();
        assert!(!mine.is_empty());
        let by_pid = read_pid(std::process::id()).unwrap();
        assert_eq!(by_pid.len(), mine.len());
        let error = read_pid(u32::MAX).unwrap_err();
        assert!(matches!(error, Error::Read { .. }), "{error:?}");
        assert!(error.to_string().contains("/proc/4294967295/mountinfo"));
    }

    #[test]
    fn a_file_parse_error_names_the_file() {
        let dir = std::env::temp_dir().join(format!("husk-mountinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mountinfo");
        std::fs::write(&file, "1 1 0:1 / / rw - tmpfs tmpfs rw\ngarbage\n").unwrap();
        let message = read_file(&file).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            message.starts_with(&format!("{} line 2: ", file.display())),
            "{message}"
        );
        assert!(message.ends_with("\"garbage\""), "{message}");
    }
}
