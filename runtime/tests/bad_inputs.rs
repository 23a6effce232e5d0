//! Bad bundles given to `husk-runc create`: each is rejected with an error
//! naming the field, and a failed create leaves nothing behind — no state
//! directory, no cgroup directory, no process, no mount.
//!
//! Needs root (cgroups, namespaces); without it the test says so.

use husk_test_support::artifacts::busybox;
use husk_test_support::bundle::build_busybox_rootfs;
use husk_test_support::form::announce_form;
use husk_test_support::tempdir::TestDir;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Edits a bundle's config (and files) before create.
type Prepare = Box<dyn Fn(&mut Value, &Path)>;

struct Case {
    name: &'static str,
    /// Change the config (or the bundle) before create.
    prepare: Prepare,
    /// Text the error must contain (the field or object that failed).
    expect: &'static str,
}

fn base_config(id: &str) -> Value {
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["true"], "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "cgroupsPath": format!("/husk-badinput/{id}"),
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]
        }
    })
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "malformed-json",
            prepare: Box::new(|_, b| {
                std::fs::write(
                    b.join("config.json"),
                    "{\"ociVersion\": \"1.0.2\", \"process\": ",
                )
                .unwrap()
            }),
            expect: "invalid config.json",
        },
        Case {
            name: "wrong-type",
            prepare: Box::new(|c, _| c["process"]["args"] = json!("true")),
            expect: "`process.args`",
        },
        Case {
            name: "missing-rootfs",
            prepare: Box::new(|c, _| c["root"]["path"] = json!("no-such-rootfs")),
            expect: "`root.path`",
        },
        Case {
            name: "unknown-namespace",
            prepare: Box::new(|c, _| {
                c["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "bogus"}))
            }),
            expect: "`linux.namespaces[3].type`",
        },
        Case {
            name: "namespace-path-missing",
            prepare: Box::new(|c, _| {
                c["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "network", "path": "/proc/999999999/ns/net"}))
            }),
            expect: "`linux.namespaces[3].path`",
        },
        Case {
            name: "invalid-capability",
            prepare: Box::new(|c, _| {
                c["process"]["capabilities"] = json!({"effective": ["CAP_KILL", "CAP_TELEPORT"]})
            }),
            expect: "`process.capabilities.effective",
        },
        Case {
            name: "unknown-seccomp-syscall",
            prepare: Box::new(
                |c, _| c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "makedir"], "action": "SCMP_ACT_ERRNO"}]}),
            ),
            expect: "`linux.seccomp.syscalls[0].names[1]`: unknown system call \\\"makedir\\\"",
        },
        Case {
            name: "mount-dotdot-escape",
            prepare: Box::new(|c, _| {
                c["mounts"].as_array_mut().unwrap().push(
                    json!({"destination": "/tmp/../../../etc", "type": "tmpfs", "source": "tmpfs"}),
                )
            }),
            expect: "`mounts[1].destination`",
        },
        Case {
            name: "mount-symlink-escape",
            prepare: Box::new(|c, b| {
                std::os::unix::fs::symlink("../../../../../../../etc", b.join("rootfs/escape"))
                    .unwrap();
                c["mounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"}));
            }),
            expect:
                "`mounts[1].destination`: /escape/x: escapes the rootfs through symlink /escape",
        },
        Case {
            name: "bind-source-missing",
            prepare: Box::new(|c, _| {
                c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}))
            }),
            expect: "`mounts[1].source`",
        },
        // Failures after the init was forked: everything must be undone.
        Case {
            name: "missing-executable",
            prepare: Box::new(|c, _| c["process"]["args"] = json!(["/bin/not-here"])),
            expect: "exec: \\\"/bin/not-here\\\"",
        },
        Case {
            name: "failing-mount",
            prepare: Box::new(|c, _| {
                c["mounts"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"destination": "/x", "type": "nosuchfs", "source": "none"}))
            }),
            expect: "mount nosuchfs on",
        },
        Case {
            name: "failing-create-runtime-hook",
            prepare: Box::new(|c, _| {
                c["hooks"] =
                    json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}]})
            }),
            expect: "createRuntime hook /bin/sh",
        },
    ]
}

/// Mount points of the cgroup hierarchies (v1 and v2).
fn cgroup_mount_points() -> Vec<PathBuf> {
    husk_mountinfo::read_self()
        .unwrap()
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect()
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    cgroup_mount_points()
        .into_iter()
        .map(|mp| mp.join("husk-badinput").join(id))
        .filter(|p| p.exists())
        .collect()
}

fn processes_in_bundle(base: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let root = std::fs::read_link(e.path().join("root")).unwrap_or_default();
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if root.starts_with(base) || cg.contains("husk-badinput") {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn bad_bundles_are_rejected_naming_the_field_and_leave_nothing_behind() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        announce_form("runtime bad inputs not run: needs root to create containers");
        return;
    }
    let busybox = busybox().expect("busybox");
    let base_dir = TestDir::new("bad").expect("a test directory");
    let base = base_dir.path();
    let root = base.join("state");
    let mounts_before = husk_mountinfo::read_self().unwrap().len();
    let mut failures = Vec::new();
    for case in cases() {
        let id = format!("bad-{}", case.name);
        let bundle = base.join(case.name);
        build_busybox_rootfs(&busybox, &bundle.join("rootfs")).unwrap();
        let mut cfg = base_config(&id);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        (case.prepare)(&mut cfg, &bundle);
        if case.name != "malformed-json" {
            std::fs::write(
                bundle.join("config.json"),
                serde_json::to_string(&cfg).unwrap(),
            )
            .unwrap();
        }
        let out = Command::new(env!("CARGO_BIN_EXE_husk-runc"))
            .arg("--root")
            .arg(&root)
            .args(["create", "-b", bundle.to_str().unwrap(), &id])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let mut problems = Vec::new();
        if out.status.code() != Some(1) {
            problems.push(format!("exit {:?}, want 1", out.status.code()));
        }
        if !stderr.contains(case.expect) {
            problems.push(format!("stderr lacks {:?}", case.expect));
        }
        if root.join(&id).exists() {
            problems.push("state directory left".into());
        }
        let cg = cgroup_dirs(&id);
        if !cg.is_empty() {
            problems.push(format!("cgroups left: {cg:?}"));
        }
        let procs = processes_in_bundle(base);
        if !procs.is_empty() {
            problems.push(format!("processes left: {procs:?}"));
        }
        println!(
            "{:<28} {} | {}",
            case.name,
            if problems.is_empty() { "ok  " } else { "FAIL" },
            stderr.trim()
        );
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    let mounts_after = husk_mountinfo::read_self().unwrap().len();
    for dir in cgroup_mount_points() {
        let _ = std::fs::remove_dir(dir.join("husk-badinput"));
    }
    drop(base_dir);
    assert_eq!(mounts_before, mounts_after, "mounts leaked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
