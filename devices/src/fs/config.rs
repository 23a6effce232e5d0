//! What a virtio-fs share looks like: the host directory, the tag the guest
//! mounts, the queue layout, the caching contract, what the guest may do
//! with extended attributes, and how many host fds it may make the share
//! hold.
//!
//! [`FsConfig`] is plain data with public fields so the shim can build it
//! from its own configuration; [`FsConfig::validate`] is the single place
//! that decides whether a configuration is usable, and both transports call
//! it before serving. The cache and xattr policies are parsed from the
//! strings the shim's configuration uses (`never|metadata|auto|always`,
//! `mapped|off`) and mapped here, once, onto fuse-backend-rs's passthrough
//! options.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fuse_backend_rs::passthrough;

/// The tag Kata-compatible agents mount (`mount -t virtiofs kataShared`).
pub const DEFAULT_TAG: &str = "kataShared";
/// Size of the tag field in the device configuration space
/// (virtio 1.2, 5.11.4 "Device configuration layout": `u8 tag[36]`).
pub const TAG_LEN_MAX: usize = 36;
/// Size of the whole configuration space: the tag plus `le32 num_request_queues`.
pub const CONFIG_SPACE_LEN: usize = TAG_LEN_MAX + 4;
/// Default ring size: what virtiofsd and QEMU's vhost-user-fs-device use at
/// most (QEMU caps `queue-size` at its VIRTQUEUE_MAX_SIZE, 1024).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Largest split virtqueue (virtio 1.2, 2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Upper bound on request queues. Each queue gets its own worker thread, and
/// vhost-user-backend maps queues to threads through a `u64` mask, so the hard
/// limit is 63; 16 keeps a pod's thread count modest.
pub const MAX_REQUEST_QUEUES: usize = 16;

/// Default for [`FsConfig::max_open_inodes`]. Each inode the guest holds is
/// one `O_PATH` fd in the shim; 65536 is far more than a container's
/// working set (the guest kernel forgets inodes it evicts from its cache)
/// and keeps a share's fds well below the shim's fd limit.
pub const DEFAULT_MAX_OPEN_INODES: usize = 65536;
/// Default for [`FsConfig::max_open_handles`]. Each open file or directory
/// is one more fd; 65536 covers a pod whose processes hold tens of
/// thousands of files open at once (a database on a volume). With
/// [`DEFAULT_MAX_OPEN_INODES`], one share holds at most about 131072 fds,
/// so the shim's RLIMIT_NOFILE must be above that.
pub const DEFAULT_MAX_OPEN_HANDLES: usize = 65536;

/// How long the guest may trust cached entries and attributes when the
/// guest has the share to itself (`metadata`, `always`): one day, the value
/// virtio-fs daemons conventionally use for "forever".
const EXCLUSIVE_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Revalidation interval for `auto`: the guest sees host-side changes (a
/// container directory added by the shim) within a second.
const AUTO_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a share configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The tag is empty; the guest could not name the share.
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    /// The tag does not fit the configuration-space field.
    #[error("virtio-fs tag {tag:?} is {len} bytes, the limit is {TAG_LEN_MAX}")]
    TagTooLong { tag: String, len: usize },
    /// The tag contains a NUL byte, which would end it early in the guest.
    #[error("virtio-fs tag {tag:?} contains a NUL byte")]
    TagHasNul { tag: String },
    /// The cache policy string is none of the known ones.
    #[error("unknown virtio-fs cache policy {value:?} (expected never, metadata, auto or always)")]
    CachePolicy { value: String },
    /// The xattr policy string is none of the known ones.
    #[error("unknown virtio-fs xattr policy {value:?} (expected mapped or off)")]
    XattrPolicy { value: String },
    /// The device needs at least one request queue besides hiprio.
    #[error("virtio-fs needs at least one request queue, got 0")]
    NoRequestQueues,
    /// More request queues than the device serves.
    #[error("virtio-fs asked for {requested} request queues, the limit is {MAX_REQUEST_QUEUES}")]
    TooManyRequestQueues { requested: usize },
    /// A limit on inodes or handles is 0: the guest could not use the share.
    #[error("virtio-fs {setting} is 0; the share needs at least 1")]
    ZeroLimit { setting: &'static str },
    /// The ring size is not a power of two in 1..=32768.
    #[error("virtio-fs queue size {size} is not a power of two between 1 and {MAX_QUEUE_SIZE}")]
    QueueSize { size: u16 },
    /// The shared directory cannot be resolved.
    #[error("virtio-fs shared directory {path} cannot be resolved: {source}")]
    SharedDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The shared directory is not a directory.
    #[error("virtio-fs shared directory {path} is not a directory")]
    SharedDirNotDirectory { path: PathBuf },
    /// fuse-backend-rs takes the root as a UTF-8 string.
    #[error("virtio-fs shared directory {path} is not valid UTF-8")]
    SharedDirNotUtf8 { path: PathBuf },
}

/// How much the guest may cache, from "nothing" to "the share is mine".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No data, entry or attribute caching: every access reaches the host.
    Never,
    /// Cache metadata (entries, attributes, directories) but not file data.
    Metadata,
    /// Close-to-open consistency with short timeouts (the default).
    #[default]
    Auto,
    /// Cache everything and coalesce writes (writeback): the guest owns the share.
    Always,
}

impl CachePolicy {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            CachePolicy::Never => "never",
            CachePolicy::Metadata => "metadata",
            CachePolicy::Auto => "auto",
            CachePolicy::Always => "always",
        }
    }

    /// Entry and attribute timeout the guest gets under this policy.
    pub fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => AUTO_TIMEOUT,
            CachePolicy::Metadata | CachePolicy::Always => EXCLUSIVE_TIMEOUT,
        }
    }
}

impl FromStr for CachePolicy {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "never" => Ok(CachePolicy::Never),
            "metadata" => Ok(CachePolicy::Metadata),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            _ => Err(ConfigError::CachePolicy {
                value: value.to_owned(),
            }),
        }
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest may do with extended attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XattrPolicy {
    /// No xattrs: every xattr request fails with `ENOSYS`, after which the
    /// guest kernel stops asking and answers `EOPNOTSUPP` itself.
    Off,
    /// `user.*` passes through; `security.*`, `trusted.*` and `system.*`
    /// (file capabilities, SELinux labels, ACLs) are stored under
    /// `user.husk.guest.` on the host and never applied to the host file;
    /// see `super::xattr`. The default.
    #[default]
    Mapped,
}

impl XattrPolicy {
    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            XattrPolicy::Off => "off",
            XattrPolicy::Mapped => "mapped",
        }
    }
}

impl FromStr for XattrPolicy {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "off" => Ok(XattrPolicy::Off),
            "mapped" => Ok(XattrPolicy::Mapped),
            _ => Err(ConfigError::XattrPolicy {
                value: value.to_owned(),
            }),
        }
    }
}

impl fmt::Display for XattrPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One virtio-fs share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory the guest sees as the root of the mount.
    pub shared_dir: PathBuf,
    /// The name the guest mounts (`mount -t virtiofs <tag>`).
    pub tag: String,
    /// Request queues besides the hiprio queue (each gets a worker thread).
    pub num_request_queues: usize,
    /// The maximum ring size of every queue.
    pub queue_size: u16,
    /// What the guest may cache.
    pub cache: CachePolicy,
    /// What the guest may do with extended attributes.
    pub xattr: XattrPolicy,
    /// Most inodes the guest may hold at once (each one host fd). A LOOKUP,
    /// READDIRPLUS entry or creation that would need one more fails with
    /// `ENFILE` until the guest forgets some; inodes it holds still
    /// resolve. At least 1.
    pub max_open_inodes: usize,
    /// Most files and directories the guest may have open at once (each
    /// one host fd); an OPEN, OPENDIR or CREATE beyond it fails with
    /// `ENFILE`. At least 1.
    pub max_open_handles: usize,
    /// Whether the guest may set the setuid bit (and setgid on
    /// non-directories) on host files; off by default, so nothing the
    /// guest writes becomes a privileged program on the host.
    pub allow_setuid: bool,
}

impl FsConfig {
    /// A share of `shared_dir` with the defaults: tag `kataShared`, one
    /// request queue of 1024 entries, `auto` caching, `mapped` xattrs, and
    /// the default inode and handle limits.
    pub fn new(shared_dir: impl Into<PathBuf>) -> Self {
        Self {
            shared_dir: shared_dir.into(),
            tag: DEFAULT_TAG.to_owned(),
            num_request_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            cache: CachePolicy::default(),
            xattr: XattrPolicy::default(),
            max_open_inodes: DEFAULT_MAX_OPEN_INODES,
            max_open_handles: DEFAULT_MAX_OPEN_HANDLES,
            allow_setuid: false,
        }
    }

    /// Checks everything but the shared directory itself.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_tag(&self.tag)?;
        if self.num_request_queues == 0 {
            return Err(ConfigError::NoRequestQueues);
        }
        if self.num_request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::TooManyRequestQueues {
                requested: self.num_request_queues,
            });
        }
        if !self.queue_size.is_power_of_two() {
            return Err(ConfigError::QueueSize {
                size: self.queue_size,
            });
        }
        if self.max_open_inodes == 0 {
            return Err(ConfigError::ZeroLimit {
                setting: "max_open_inodes",
            });
        }
        if self.max_open_handles == 0 {
            return Err(ConfigError::ZeroLimit {
                setting: "max_open_handles",
            });
        }
        Ok(())
    }

    /// Total queues the device exposes: hiprio plus the request queues.
    pub fn num_queues(&self) -> usize {
        1 + self.num_request_queues
    }

    /// The device configuration space: the tag NUL-padded to 36 bytes, then
    /// `num_request_queues` as le32.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut space = [0u8; CONFIG_SPACE_LEN];
        let tag = self.tag.as_bytes();
        let tag_len = tag.len().min(TAG_LEN_MAX);
        space[..tag_len].copy_from_slice(&tag[..tag_len]);
        // Bounded by MAX_REQUEST_QUEUES after validate(); saturate otherwise.
        let queues = u32::try_from(self.num_request_queues).unwrap_or(u32::MAX);
        space[TAG_LEN_MAX..].copy_from_slice(&queues.to_le_bytes());
        space
    }

    /// The shared directory with symlinks resolved, checked to be a directory.
    pub fn resolved_shared_dir(&self) -> Result<PathBuf, ConfigError> {
        resolve_directory(&self.shared_dir)
    }

    /// fuse-backend-rs passthrough options for this share, rooted at the
    /// resolved shared directory as the serving threads see it (under the
    /// shim's confinement, at `/share` of their private root).
    pub(crate) fn passthrough_config(&self) -> Result<passthrough::Config, ConfigError> {
        self.validate()?;
        let root = husk_confine::fs_root_for(&self.resolved_shared_dir()?);
        let root_dir = root
            .to_str()
            .ok_or_else(|| ConfigError::SharedDirNotUtf8 { path: root.clone() })?
            .to_owned();
        let timeout = self.cache.timeout();
        Ok(passthrough::Config {
            root_dir,
            cache_policy: match self.cache {
                CachePolicy::Never => passthrough::CachePolicy::Never,
                CachePolicy::Metadata => passthrough::CachePolicy::Metadata,
                CachePolicy::Auto => passthrough::CachePolicy::Auto,
                CachePolicy::Always => passthrough::CachePolicy::Always,
            },
            entry_timeout: timeout,
            attr_timeout: timeout,
            // Writeback lets the guest coalesce writes; it is only correct
            // when nobody else changes files under the guest, which is the
            // contract `always` states.
            writeback: self.cache == CachePolicy::Always,
            // Mapped xattrs go through the passthrough's xattr calls under
            // the names `SharedFs` chooses.
            xattr: self.xattr != XattrPolicy::Off,
            // The root is opened by INIT (and re-opened on DESTROY), so a
            // guest that remounts gets a fresh inode table.
            do_import: true,
            // O_PATH fds per inode: no CAP_DAC_READ_SEARCH and no
            // open_by_handle_at, which could name inodes outside the share.
            inode_file_handles: false,
            ..passthrough::Config::default()
        })
    }
}

/// Checks a tag: non-empty, no NUL, at most 36 bytes of UTF-8.
pub fn validate_tag(tag: &str) -> Result<(), ConfigError> {
    if tag.is_empty() {
        return Err(ConfigError::EmptyTag);
    }
    if tag.len() > TAG_LEN_MAX {
        return Err(ConfigError::TagTooLong {
            tag: tag.to_owned(),
            len: tag.len(),
        });
    }
    if tag.as_bytes().contains(&0) {
        return Err(ConfigError::TagHasNul {
            tag: tag.to_owned(),
        });
    }
    Ok(())
}

fn resolve_directory(path: &Path) -> Result<PathBuf, ConfigError> {
    let resolved = path
        .canonicalize()
        .map_err(|source| ConfigError::SharedDir {
            path: path.to_owned(),
            source,
        })?;
    let metadata = std::fs::metadata(&resolved).map_err(|source| ConfigError::SharedDir {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Err(ConfigError::SharedDirNotDirectory {
            path: path.to_owned(),
        });
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_config_defaults_are_valid_and_use_the_kata_tag() {
        let config = FsConfig::new("/tmp");
        config.validate().unwrap();
        assert_eq!(config.tag, "kataShared");
        assert_eq!(config.num_queues(), 2);
    }

    #[test]
    fn fs_config_space_pads_the_tag_and_ends_with_le32_queue_count() {
        let mut config = FsConfig::new("/tmp");
        config.num_request_queues = 3;
        let space = config.config_space();
        assert_eq!(&space[..10], b"kataShared");
        assert!(space[10..TAG_LEN_MAX].iter().all(|b| *b == 0));
        assert_eq!(&space[TAG_LEN_MAX..], &3u32.to_le_bytes());
    }

    #[test]
    fn fs_tag_of_exactly_36_bytes_is_accepted_and_37_rejected() {
        validate_tag(&"a".repeat(36)).unwrap();
        let error = validate_tag(&"a".repeat(37)).unwrap_err();
        assert!(
            matches!(error, ConfigError::TagTooLong { len: 37, .. }),
            "{error}"
        );
    }

    #[test]
    fn fs_queue_size_must_be_a_power_of_two() {
        let mut config = FsConfig::new("/tmp");
        config.queue_size = 1000;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::QueueSize { size: 1000 })
        ));
        config.queue_size = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::QueueSize { size: 0 })
        ));
    }

    #[test]
    fn fs_cache_policy_maps_onto_passthrough_timeouts_and_writeback() {
        let mut config = FsConfig::new("/tmp");
        config.cache = CachePolicy::Never;
        let never = config.passthrough_config().unwrap();
        assert_eq!(never.cache_policy, passthrough::CachePolicy::Never);
        assert_eq!(never.entry_timeout, Duration::ZERO);
        assert!(!never.writeback);
        config.cache = CachePolicy::Always;
        let always = config.passthrough_config().unwrap();
        assert_eq!(always.cache_policy, passthrough::CachePolicy::Always);
        assert_eq!(always.attr_timeout, EXCLUSIVE_TIMEOUT);
        assert!(always.writeback);
        assert!(always.xattr);
    }

    #[test]
    fn fs_inode_and_handle_limits_of_0_are_refused_naming_the_setting() {
        let mut config = FsConfig::new("/tmp");
        assert_eq!(config.max_open_inodes, DEFAULT_MAX_OPEN_INODES);
        assert_eq!(config.max_open_handles, DEFAULT_MAX_OPEN_HANDLES);
        config.max_open_inodes = 0;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("max_open_inodes"), "{error}");
        config.max_open_inodes = 1;
        config.max_open_handles = 0;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("max_open_handles"), "{error}");
        config.max_open_handles = 1;
        config.validate().unwrap();
    }

    #[test]
    fn fs_xattr_policy_defaults_to_mapped_and_off_turns_passthrough_xattrs_off() {
        let mut config = FsConfig::new("/tmp");
        assert_eq!(config.xattr, XattrPolicy::Mapped);
        assert!(config.passthrough_config().unwrap().xattr);
        config.xattr = XattrPolicy::Off;
        assert!(!config.passthrough_config().unwrap().xattr);
    }

    #[test]
    fn fs_xattr_policy_round_trips_through_its_name_and_rejects_others() {
        for policy in [XattrPolicy::Off, XattrPolicy::Mapped] {
            assert_eq!(policy.as_str().parse::<XattrPolicy>().unwrap(), policy);
        }
        for wrong in ["on", "true", "Mapped", ""] {
            let error = wrong.parse::<XattrPolicy>().unwrap_err();
            assert!(
                matches!(&error, ConfigError::XattrPolicy { value } if value == wrong),
                "{error}"
            );
        }
    }

    #[test]
    fn fs_cache_policy_round_trips_through_its_name() {
        for policy in [
            CachePolicy::Never,
            CachePolicy::Metadata,
            CachePolicy::Auto,
            CachePolicy::Always,
        ] {
            assert_eq!(policy.as_str().parse::<CachePolicy>().unwrap(), policy);
        }
    }
}
