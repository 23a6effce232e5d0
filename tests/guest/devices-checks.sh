#!/bin/sh
# Guest side of tests/tests/guest_devices.rs: one guest with the virtio-fs and
# vsock devices served over vhost-user by the test process. The host side
# (see the test) prepared the share, listens on vsock ports 5001 and 5002,
# and waits on the console for the markers this script prints: the order of
# the steps below is the order the host follows.

. /test/lib.sh

S=/mnt/share
MIB=1048576
# Every step that waits for the host is bounded, so a host-side failure ends
# the guest instead of holding it until the test's deadline.
T="busybox timeout 60"

# ---- virtio-fs -----------------------------------------------------------

mkdir -p "$S"
check fs_mount mount -t virtiofs kataShared "$S"

reads_host_file() { test "$(cat "$S/hello.txt")" = "hello from the host"; }
check fs_reads_host_file reads_host_file

# The host wrote host_big (256 MiB of pattern seed 11); the host compares.
value fs_host_big "$(stat -c %s "$S/host_big") $(sha256sum "$S/host_big" | cut -d' ' -f1)"

writes_big_file() { husk-guest-probe pattern $((256 * MIB)) 12 > "$S/guest_big"; }
check fs_writes_big_file writes_big_file
value fs_guest_big "$(stat -c %s "$S/guest_big") $(sha256sum "$S/guest_big" | cut -d' ' -f1)"

check fs_mkdir mkdir -p "$S/dir/sub"

renames() {
  echo moved > "$S/dir/before" &&
    mv "$S/dir/before" "$S/dir/sub/after" &&
    test ! -e "$S/dir/before" &&
    test "$(cat "$S/dir/sub/after")" = moved
}
check fs_rename renames

hard_links() {
  echo linked > "$S/dir/orig" &&
    ln "$S/dir/orig" "$S/dir/hard" &&
    test "$(stat -c %h "$S/dir/orig")" = 2 &&
    test "$(stat -c %i "$S/dir/orig")" = "$(stat -c %i "$S/dir/hard")" &&
    test "$(cat "$S/dir/hard")" = linked
}
check fs_hard_link hard_links

symlinks() {
  ln -s orig "$S/dir/soft" &&
    test "$(readlink "$S/dir/soft")" = orig &&
    test "$(cat "$S/dir/soft")" = linked
}
check fs_symlink symlinks

chmods() { chmod 640 "$S/dir/orig" && test "$(stat -c %a "$S/dir/orig")" = 640; }
check fs_chmod chmods

check fs_xattr_set husk-guest-probe setxattr "$S/dir/orig" user.husk from-guest
xattr_get() { test "$(husk-guest-probe getxattr "$S/dir/orig" user.husk)" = from-guest; }
check fs_xattr_get xattr_get
xattr_list() { husk-guest-probe listxattr "$S/dir/orig" | grep -qx user.husk; }
check fs_xattr_list xattr_list
xattr_from_host() { test "$(husk-guest-probe getxattr "$S/hello.txt" user.fromhost)" = set-by-host; }
check fs_xattr_from_host xattr_from_host
xattr_remove() {
  husk-guest-probe setxattr "$S/dir/orig" user.temporary soon-gone &&
    husk-guest-probe removexattr "$S/dir/orig" user.temporary &&
    ! husk-guest-probe getxattr "$S/dir/orig" user.temporary 2>/dev/null
}
check fs_xattr_remove xattr_remove

unlinks() { echo gone > "$S/dir/doomed" && rm "$S/dir/doomed" && test ! -e "$S/dir/doomed"; }
check fs_unlink unlinks

# Escape attempts: the host keeps secret.txt next to (outside) the share and
# checks afterwards that nothing appeared outside it.
dotdot_stays_in_guest() {
  echo escaped > "$S/../escaped-dotdot" && test "$(ls "$S/.." | grep -c secret.txt)" = 0
}
check fs_escape_dotdot_stays_in_guest dotdot_stays_in_guest
host_symlinks_do_not_reach_host() {
  ! grep -qs host-secret "$S/abs-link" && ! grep -qs host-secret "$S/rel-link"
}
check fs_escape_host_symlinks_do_not_reach_host host_symlinks_do_not_reach_host
# A guest symlink leading out of the share resolves in the guest's own tree
# (the host checks that nothing appeared next to its share).
guest_symlink_write_stays_in_guest() {
  ln -s ../../escaped-by-link "$S/dir/out" &&
    echo escaped > "$S/dir/out" &&
    test "$(cat /mnt/escaped-by-link)" = escaped
}
check fs_escape_guest_symlink_write_stays_in_guest guest_symlink_write_stays_in_guest

# Files the host adds while the guest runs appear in the guest.
echo "HUSK_WAIT host-adds-file"
host_added_file_appears() {
  wait_for "$S/late/added.txt" 20 && test "$(cat "$S/late/added.txt")" = added-while-running
}
check fs_host_added_file_appears host_added_file_appears

# ---- vsock ---------------------------------------------------------------

# Host-initiated: the host connects once "listening port=5000" is on the
# console, sends 64 MiB (seed 21) while the guest sends 64 MiB (seed 22).
host_initiated() { $T husk-guest-probe vsock-listen 5000 $((64 * MIB)) 22 > /tmp/vsock-5000.out; }
check_live vsock_host_initiated_64mib host_initiated
value vsock_host_initiated "$(cat /tmp/vsock-5000.out)"

# Guest-initiated to the host's <uds>_5001: 64 MiB each way (guest seed 23).
guest_initiated() { $T husk-guest-probe vsock-connect 2 5001 $((64 * MIB)) 23 > /tmp/vsock-5001.out; }
check_live vsock_guest_initiated_64mib guest_initiated
value vsock_guest_initiated "$(cat /tmp/vsock-5001.out)"

# 100 guest-initiated connections open at once, each echoed by the host.
check vsock_100_guest_initiated $T husk-guest-probe vsock-many 2 5002 100 65536

# 100 host-initiated connections at once, each echoed by the guest.
check_live vsock_100_host_initiated $T husk-guest-probe vsock-echo-many 5003 100

check fs_unmount umount "$S"
finish 0
