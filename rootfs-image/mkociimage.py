#!/usr/bin/env python3
"""Builds husk's end-to-end test image: a small OCI image archive (an
oci-layout tar as `ctr images import` reads it) made of Debian's static
busybox.

The archive holds `oci-layout`, `index.json` and `blobs/sha256/`: one
gzip-compressed layer (the root tree below), and two image manifests that
share it, each with its own config:

  <name>:latest   Cmd ["sh"], WorkingDir "/", Env PATH and HUSK_IMAGE
  <name>:uid1000  the same, with User "1000:1000" (ctr 1.6's `run` has no
                  --user flag; the image config's User is how a ctr user
                  runs as another user)
  <name>:pause    the same, with Cmd ["sleep", "infinity"]: the sandbox
                  (pause) image of the CRI tier, which has no registry

The root tree: /bin/busybox with applet symlinks (sh, echo, env, pwd, id,
sleep, cat, ...), /etc/passwd (root, user 1000, nobody 65534), /etc/group,
/tmp with mode 1777, empty /proc, /sys, /dev, /run, /root, /home/user.

Reproducible: every entry has a fixed owner and mtime (SOURCE_DATE_EPOCH or
0), entries are sorted, gzip records no name or time, so the same busybox
gives the same bytes and digests.

Each manifest descriptor in index.json carries two annotations: containerd's
`io.containerd.image.name` (the full reference, which containerd 1.6's
importer uses as the image name as is) and the OCI
`org.opencontainers.image.ref.name` (the tag alone, which other tools and
`ctr images import --base-name` read).

Usage: mkociimage.py OUTPUT.tar [--busybox PATH] [--name REPOSITORY]
Prints the image references and the layer and manifest digests.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
DEFAULT_NAME = "docker.io/husk/busybox"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APPLETS = [
    "sh", "ash", "echo", "env", "pwd", "id", "sleep", "cat", "true", "false",
    "ps", "ls", "head", "tail", "kill", "uname", "grep", "wc", "hostname",
    "mount", "umount", "date", "printf", "test", "[", "seq", "mkdir", "rm",
    "cp", "mv", "ln", "touch", "chmod", "stat", "sed", "awk", "tr", "cut",
    "sort", "uniq", "tee", "dd", "sha256sum", "readlink", "whoami", "nproc",
    "free", "top", "dmesg", "find", "xargs", "expr", "basename", "dirname",
    "wget", "nc", "ip", "ifconfig", "vi", "less", "more", "tty", "stty",
]

# (path, mode, uid, gid) of the directories in the root tree.
DIRECTORIES = [
    ("bin", 0o755, 0, 0),
    ("dev", 0o755, 0, 0),
    ("etc", 0o755, 0, 0),
    ("home", 0o755, 0, 0),
    ("home/user", 0o755, 1000, 1000),
    ("proc", 0o555, 0, 0),
    ("root", 0o700, 0, 0),
    ("run", 0o755, 0, 0),
    ("sys", 0o555, 0, 0),
    ("tmp", 0o1777, 0, 0),
    ("usr", 0o755, 0, 0),
    ("usr/bin", 0o755, 0, 0),
    ("var", 0o755, 0, 0),
]

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "user:x:1000:1000:user:/home/user:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"


def fail(message):
    sys.exit(f"mkociimage: {message}")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_info(name, kind, mode, uid=0, gid=0, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = MTIME
    info.size = size
    info.linkname = linkname
    return info


def layer_tar(busybox):
    """The root tree as an uncompressed tar, entries sorted by path."""
    entries = []
    for path, mode, uid, gid in DIRECTORIES:
        entries.append((path, tar_info(path, tarfile.DIRTYPE, mode, uid, gid), None))
    files = {
        "bin/busybox": (busybox, 0o755),
        "etc/passwd": (PASSWD.encode(), 0o644),
        "etc/group": (GROUP.encode(), 0o644),
        "etc/hostname": (b"husk\n", 0o644),
    }
    for path, (data, mode) in files.items():
        entries.append((path, tar_info(path, tarfile.REGTYPE, mode, size=len(data)), data))
    for applet in APPLETS:
        path = f"bin/{applet}"
        entries.append((path, tar_info(path, tarfile.SYMTYPE, 0o777, linkname="busybox"), None))
    entries.sort(key=lambda e: e[0])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _, info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def gzip_bytes(data):
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buffer.getvalue()


def json_bytes(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def build(busybox_path, name):
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    if busybox[:4] != b"\x7fELF":
        fail(f"{busybox_path} is not an ELF binary (install busybox-static)")
    layer = layer_tar(busybox)
    layer_gz = gzip_bytes(layer)
    blobs = {}

    def add_blob(data, media_type, annotations=None, platform=None):
        digest = sha256(data)
        blobs[digest] = data
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        if platform:
            descriptor["platform"] = platform
        return descriptor

    layer_descriptor = add_blob(layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")
    platform = {"architecture": "amd64", "os": "linux"}
    manifests = []
    for tag, user, cmd in (("latest", None, ["sh"]), ("uid1000", "1000:1000", ["sh"]),
                           ("pause", None, ["sleep", "infinity"])):
        config = {
            "Cmd": cmd,
            "Entrypoint": None,
            "Env": [PATH_ENV, "HUSK_IMAGE=busybox"],
            "WorkingDir": "/",
        }
        if user:
            config["User"] = user
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
            "history": [{"created": "1970-01-01T00:00:00Z",
                         "created_by": "rootfs-image/mkociimage.py (busybox-static)"}],
        }
        config_descriptor = add_blob(json_bytes(image_config),
                                     "application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_descriptor,
            "layers": [layer_descriptor],
        }
        reference = f"{name}:{tag}"
        manifests.append(add_blob(
            json_bytes(manifest),
            "application/vnd.oci.image.manifest.v1+json",
            annotations={
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
            platform=platform,
        ))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}
    members = [("oci-layout", json_bytes({"imageLayoutVersion": "1.0.0"})),
               ("index.json", json_bytes(index))]
    members += [(f"blobs/sha256/{d.split(':', 1)[1]}", data) for d, data in sorted(blobs.items())]
    return members, layer_descriptor, manifests


def write_archive(output, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            tar.addfile(tar_info(directory, tarfile.DIRTYPE, 0o755))
        for path, data in members:
            tar.addfile(tar_info(path, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    temporary = output + ".tmp"
    with open(temporary, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(temporary, output)
    return sha256(buffer.getvalue())


def main(argv):
    args = argv[1:]
    busybox, name, output = "/bin/busybox", DEFAULT_NAME, None
    while args:
        arg = args.pop(0)
        if arg in ("--busybox", "--name"):
            if not args:
                fail(f"{arg} needs a value")
            value = args.pop(0)
            if arg == "--busybox":
                busybox = value
            else:
                name = value
        elif arg.startswith("-"):
            fail(f"unknown option {arg}\n{__doc__}")
        elif output is None:
            output = arg
        else:
            fail(f"unexpected argument {arg}")
    if output is None:
        fail("usage: mkociimage.py OUTPUT.tar [--busybox PATH] [--name REPOSITORY]")
    if not os.path.isfile(busybox):
        fail(f"{busybox} is missing: apt-get install busybox-static (or make deps)")
    members, layer, manifests = build(busybox, name)
    archive_digest = write_archive(output, members)
    for manifest in manifests:
        print(f"image {manifest['annotations']['io.containerd.image.name']} "
              f"manifest {manifest['digest']}")
    print(f"layer {layer['digest']} ({layer['size']} bytes)")
    print(f"archive {output} {archive_digest}")


if __name__ == "__main__":
    main(sys.argv)
