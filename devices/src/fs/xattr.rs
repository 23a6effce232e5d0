//! Where a guest's extended attributes live on the host under
//! [`XattrPolicy::Mapped`](super::XattrPolicy::Mapped).
//!
//! The passthrough performs xattr calls as the shim (root, with every
//! capability), so a name passed through unchanged has its full host
//! meaning: `security.capability` grants file capabilities to whoever runs
//! the file on the host, `security.selinux` relabels it for the host's
//! policy, `trusted.*` is root-only metadata that host software trusts
//! (overlayfs reads `trusted.overlay.*`), and `system.posix_acl_*` are host
//! ACLs. None of that may be the guest's choice. The rule:
//!
//! * `user.*` passes through: it means nothing to the host kernel, and the
//!   host checks the same permissions as for the file's data;
//! * `security.*`, `trusted.*` and `system.*` are virtualised: stored on the
//!   host file as `user.husk.guest.<name>` ([`GUEST_NAMESPACE_PREFIX`]),
//!   which the host kernel never interprets, and read back from there only;
//! * the guest cannot name anything under `user.husk.` itself
//!   ([`RESERVED_PREFIX`], `EPERM`), so it cannot read or forge the stored
//!   copies under their raw names, and LISTXATTR shows the stored copies
//!   under their guest names and hides the raw ones;
//! * any other namespace is refused with `EOPNOTSUPP`, as the host kernel
//!   would refuse it.
//!
//! Reads of a virtualised name never fall back to the host's own value:
//! the guest sees exactly the privileged attributes it wrote. Exposing the
//! host's values (an image file's `security.capability`, the host's SELinux
//! label) would be harmless to the host, but the guest could then read an
//! attribute it cannot remove (removal must not reach the host), and the
//! guest kernel removes `security.capability` on every write to a file that
//! has one: a value it can see but not remove would fail those writes or
//! leave them lying. The price is that file capabilities set in image
//! layers do not take effect in the guest; a container that needs one gets
//! it through its spec's capability sets instead.
//!
//! Consequences of storing under `user.`: the host kernel refuses `user.*`
//! on symlinks and special files (`EPERM`), so the guest cannot set
//! privileged attributes on those; a guest name longer than
//! `XATTR_NAME_MAX` (255) minus the 16-byte prefix is refused by the host
//! (`ERANGE`); and a host file system without user xattrs refuses them all.

use std::ffi::{CStr, CString};

/// Where a guest's privileged attribute `<name>` is stored on the host:
/// `user.husk.guest.<name>`.
pub const GUEST_NAMESPACE_PREFIX: &[u8] = b"user.husk.guest.";
/// Names the guest may not use directly: husk's own part of `user.`.
pub const RESERVED_PREFIX: &[u8] = b"user.husk.";
/// Namespaces whose meaning on the host is privileged, virtualised for the
/// guest.
const VIRTUALISED_NAMESPACES: [&[u8]; 3] = [b"security.", b"trusted.", b"system."];
/// The namespace that passes through.
const USER_NAMESPACE: &[u8] = b"user.";
/// Linux's `XATTR_LIST_MAX`: no name list is longer, so one LISTXATTR of
/// this size always gets the whole host list.
pub const XATTR_LIST_MAX: u32 = 65536;

/// What a name the guest sent means on the host.
#[derive(Debug, PartialEq, Eq)]
pub enum HostName {
    /// The same name on the host.
    Same,
    /// Stored under this name on the host.
    Stored(CString),
    /// Under [`RESERVED_PREFIX`]: refused with `EPERM`.
    Reserved,
    /// Not a namespace Linux knows: refused with `EOPNOTSUPP`.
    Unsupported,
}

/// Where the guest's attribute `name` lives on the host.
pub fn host_name(name: &CStr) -> HostName {
    let bytes = name.to_bytes();
    if bytes.starts_with(RESERVED_PREFIX) {
        return HostName::Reserved;
    }
    if bytes.starts_with(USER_NAMESPACE) {
        return HostName::Same;
    }
    if VIRTUALISED_NAMESPACES
        .iter()
        .any(|namespace| bytes.starts_with(namespace))
    {
        let mut stored = GUEST_NAMESPACE_PREFIX.to_vec();
        stored.extend_from_slice(bytes);
        // `bytes` came from a CStr, so it holds no NUL.
        return CString::new(stored).map_or(HostName::Unsupported, HostName::Stored);
    }
    HostName::Unsupported
}

/// The guest's name for the host attribute `host`, or `None` when the guest
/// must not see it: the host's own privileged attributes, husk's reserved
/// names, and stored copies whose guest name would not map back to them.
fn guest_name(host: &[u8]) -> Option<&[u8]> {
    if let Some(name) = host.strip_prefix(GUEST_NAMESPACE_PREFIX) {
        let virtualised = VIRTUALISED_NAMESPACES
            .iter()
            .any(|namespace| name.starts_with(namespace));
        return virtualised.then_some(name);
    }
    if host.starts_with(RESERVED_PREFIX) {
        return None;
    }
    host.starts_with(USER_NAMESPACE).then_some(host)
}

/// The guest's view of a host LISTXATTR result (NUL-terminated names, one
/// after another), in the same format.
pub fn guest_list(host_list: &[u8]) -> Vec<u8> {
    let mut list = Vec::with_capacity(host_list.len());
    for host in host_list.split(|byte| *byte == 0) {
        if host.is_empty() {
            continue;
        }
        if let Some(name) = guest_name(host) {
            list.extend_from_slice(name);
            list.push(0);
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> CString {
        CString::new(text).unwrap()
    }

    #[test]
    fn user_names_pass_and_privileged_namespaces_are_stored_under_the_guest_prefix() {
        assert_eq!(host_name(&name("user.mime_type")), HostName::Same);
        for privileged in [
            "security.capability",
            "security.selinux",
            "trusted.overlay.opaque",
            "system.posix_acl_access",
            "system.posix_acl_default",
        ] {
            assert_eq!(
                host_name(&name(privileged)),
                HostName::Stored(name(&format!("user.husk.guest.{privileged}"))),
                "{privileged}"
            );
        }
    }

    #[test]
    fn the_reserved_prefix_and_unknown_namespaces_are_refused() {
        assert_eq!(
            host_name(&name("user.husk.guest.security.capability")),
            HostName::Reserved
        );
        assert_eq!(host_name(&name("user.husk.other")), HostName::Reserved);
        assert_eq!(
            host_name(&name("Security.capability")),
            HostName::Unsupported
        );
        assert_eq!(host_name(&name("")), HostName::Unsupported);
        assert_eq!(host_name(&name("user")), HostName::Unsupported);
    }

    #[test]
    fn the_guest_list_shows_stored_names_unprefixed_and_hides_host_privileged_and_raw_names() {
        let host = b"user.a\0security.selinux\0user.husk.guest.security.capability\0\
trusted.overlay.opaque\0user.husk.guest.trusted.x\0user.husk.other\0\
user.husk.guest.user.smuggled\0system.posix_acl_access\0user.b\0";
        assert_eq!(
            guest_list(host),
            b"user.a\0security.capability\0trusted.x\0user.b\0".to_vec()
        );
        assert!(guest_list(b"").is_empty());
        assert!(guest_list(b"security.selinux\0").is_empty());
    }
}
