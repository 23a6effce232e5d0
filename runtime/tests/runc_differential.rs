//! Differential suite: the same busybox bundles run under Debian's `runc`
//! and under our `husk-runc`, comparing stdout, stderr, exit codes and (where
//! relevant) state output. Prints a table of scenario × runtime × match and
//! fails on any mismatch that is not explained in the scenario itself.
//! Ends with a leak check: no new mounts, no leftover processes, no cgroup
//! directories.
//!
//! Needs root. Without root it says so and runs nothing; without `runc` (or
//! with `HUSK_DIFF_RUNC=none`) it runs every scenario under husk-runc alone
//! and says that it did.

use husk_test_support::artifacts::busybox;
use husk_test_support::bundle::build_busybox_rootfs;
use husk_test_support::form::announce_form;
use husk_test_support::tempdir::TestDir;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Per-command limit; a container that hangs fails its scenario.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// cgroupsPath parent shared by every scenario, removed at the end.
const CGROUP_PARENT: &str = "husk-difftest";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Observed {
    stdout: String,
    stderr: String,
    code: i32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rt {
    Runc,
    Husk,
}

/// The host's busybox, which the hooks run.
fn hook_busybox() -> String {
    busybox()
        .expect("busybox (busybox-static) is required")
        .display()
        .to_string()
}

struct Harness {
    base: PathBuf,
    busybox: PathBuf,
    runc: Option<PathBuf>,
    husk: PathBuf,
    hostdata: PathBuf,
}

impl Harness {
    fn bin(&self, rt: Rt) -> &Path {
        match rt {
            Rt::Runc => self.runc.as_deref().unwrap_or(Path::new("runc")),
            Rt::Husk => &self.husk,
        }
    }

    fn root(&self, rt: Rt) -> PathBuf {
        self.base.join(match rt {
            Rt::Runc => "state-runc",
            Rt::Husk => "state-husk",
        })
    }

    fn tag(rt: Rt) -> &'static str {
        match rt {
            Rt::Runc => "runc",
            Rt::Husk => "husk",
        }
    }

    /// Run the runtime with `args`; stdin from `input` (or /dev/null).
    fn cmd(&self, rt: Rt, args: &[&str], input: Option<&str>) -> Observed {
        let root = self.root(rt);
        let mut c = Command::new(self.bin(rt));
        c.arg("--root").arg(&root).args(args);
        c.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        run_with_timeout(c, input)
    }

    /// Like `cmd` but the container inherits /dev/null stdio, so the
    /// command's own output can be read without waiting for the container.
    fn cmd_detached(&self, rt: Rt, args: &[&str]) -> Observed {
        let root = self.root(rt);
        let out = self.base.join(format!("detached-{}.out", Self::tag(rt)));
        let err = self.base.join(format!("detached-{}.err", Self::tag(rt)));
        let status = Command::new(self.bin(rt))
            .arg("--root")
            .arg(&root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        Observed {
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
            code: status.code().unwrap_or(-1),
        }
    }

    /// A fresh bundle for one runtime and scenario.
    fn bundle(&self, rt: Rt, scenario: &str, config: &Value) -> PathBuf {
        let dir = self.base.join(format!("{scenario}-{}", Self::tag(rt)));
        let rootfs = dir.join("rootfs");
        build_busybox_rootfs(&self.busybox, &rootfs).unwrap();
        for sub in ["mnt", "home/u"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nu:x:1000:\n").unwrap();
        let text = serde_json::to_string_pretty(config)
            .unwrap()
            .replace("@BUNDLE@", dir.to_str().unwrap());
        std::fs::write(dir.join("config.json"), text).unwrap();
        dir
    }
}

fn run_with_timeout(mut c: Command, input: Option<&str>) -> Observed {
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return Observed {
                stderr: format!("spawn: {e}"),
                code: -1,
                ..Default::default()
            }
        }
    };
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break -999;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Observed {
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        code,
    }
}

/// The base bundle config: OCI defaults close to `runc spec`, with a
/// docker-like capability set so capability scenarios have something to drop.
fn base_config(name: &str) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["true"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "hdiff",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/{CGROUP_PARENT}/{name}"),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn sh(cmd: &str) -> Value {
    json!(["sh", "-c", cmd])
}

type Configure = Box<dyn Fn(&mut Value)>;
type Custom = Box<dyn Fn(&Harness, Rt, &str, &Path) -> Observed>;

enum Kind {
    /// `run` with optional stdin.
    Run(Option<&'static str>),
    /// A scripted sequence of commands.
    Custom(Custom),
}

struct Scenario {
    name: &'static str,
    configure: Configure,
    kind: Kind,
    /// Why the runtimes may legitimately differ here (None: must match).
    explained: Option<&'static str>,
}

fn scenario(name: &'static str, configure: impl Fn(&mut Value) + 'static) -> Scenario {
    Scenario {
        name,
        configure: Box::new(configure),
        kind: Kind::Run(None),
        explained: None,
    }
}

fn args(cmd: Value) -> impl Fn(&mut Value) {
    move |c: &mut Value| c["process"]["args"] = cmd.clone()
}

fn remove_ns(c: &mut Value, typ: &str) {
    let list = c["linux"]["namespaces"].as_array_mut().unwrap();
    list.retain(|n| n["type"] != typ);
}

/// Replace what legitimately differs between two runs: bundle paths,
/// pids, timestamps, the runtime's own name in its log lines.
fn normalize(s: &str, bundle: &Path) -> String {
    let mut out = s.replace(bundle.to_str().unwrap(), "@BUNDLE@");
    out = out
        .replace("msg=\"husk-runc ", "msg=\"RUNTIME ")
        .replace("msg=\"runc ", "msg=\"RUNTIME ");
    let mut lines = Vec::new();
    for line in out.lines() {
        let mut l = line.to_string();
        if let Some(start) = l.find("time=\"") {
            if let Some(end) = l[start + 6..].find('"') {
                l.replace_range(start..start + 6 + end + 1, "time=\"T\"");
            }
        }
        lines.push(l);
    }
    let mut joined = lines.join("\n");
    if out.ends_with('\n') {
        joined.push('\n');
    }
    // "pid": 123 and "pid":123 and "created": "..."
    for key in ["\"pid\": ", "\"pid\":"] {
        let mut res = String::new();
        let mut rest = joined.as_str();
        while let Some(i) = rest.find(key) {
            res.push_str(&rest[..i + key.len()]);
            rest = &rest[i + key.len()..];
            let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
            res.push_str(if digits > 0 && &rest[..digits] != "0" {
                "N"
            } else {
                &rest[..digits]
            });
            rest = &rest[digits..];
        }
        res.push_str(rest);
        joined = res;
    }
    let key = "\"created\": \"";
    let mut from = 0;
    while let Some(i) = joined[from..].find(key).map(|i| i + from + key.len()) {
        match joined[i..].find('"') {
            Some(j) => joined.replace_range(i..i + j, "T"),
            None => break,
        }
        from = i;
    }
    joined
}

fn state_status(h: &Harness, rt: Rt, id: &str) -> String {
    let o = h.cmd(rt, &["state", id], None);
    serde_json::from_str::<Value>(&o.stdout)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("error({})", o.code))
}

fn wait_stopped(h: &Harness, rt: Rt, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = state_status(h, rt, id);
        if s == "stopped" || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Append a command's result to a transcript.
fn log(t: &mut Observed, label: &str, o: &Observed) {
    t.stdout
        .push_str(&format!("[{label}] rc={}\n{}", o.code, o.stdout));
    if !o.stdout.is_empty() && !o.stdout.ends_with('\n') {
        t.stdout.push('\n');
    }
    t.stderr.push_str(&o.stderr);
}

/// Accept the runtime's console-socket connection (or give up after the
/// command timeout), receive the pty master, and read until the slave
/// side closes.
fn read_terminal(listener: std::os::unix::net::UnixListener) -> Option<String> {
    listener.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    };
    conn.set_nonblocking(false).ok()?;
    let master = husk_runtime::console::recv_fd(std::os::fd::AsRawFd::as_raw_fd(&conn)).ok()?;
    let mut f = std::fs::File::from(master);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Reading a pty master ends with EIO once the slave closes.
    while let Ok(n) = f.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn scenarios() -> Vec<Scenario> {
    let mut v = vec![
        scenario("exit-0", args(json!(["true"]))),
        scenario("exit-1", args(json!(["false"]))),
        scenario("exit-42", args(sh("exit 42"))),
        scenario("env", |c| {
            c["process"]["args"] = json!(["env"]);
            c["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz", "EMPTY=", "LANG=C.UTF-8"]);
        }),
        scenario("env-home-from-passwd", |c| {
            c["process"]["args"] = json!(["env"]);
            c["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        }),
        scenario("cwd-created-if-missing", |c| {
            c["process"]["args"] = json!(["pwd"]);
            c["process"]["cwd"] = json!("/tmp/work/deep");
        }),
        scenario("user-1000-additional-gids", |c| {
            c["process"]["args"] = json!(["id"]);
            c["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20, 1000]});
        }),
        scenario("umask", |c| {
            c["process"]["args"] = sh("umask; touch /tmp/f; stat -c %a /tmp/f");
            c["process"]["user"] = json!({"uid": 0, "gid": 0, "umask": 23});
        }),
        scenario("hostname", |c| {
            c["process"]["args"] = sh("hostname; cat /proc/sys/kernel/hostname");
            c["hostname"] = json!("box-a");
        }),
        Scenario {
            explained: Some("runc 1.1 ignores the spec's domainname (it prints (none)); husk sets it as the OCI spec requires"),
            ..scenario("domainname", |c| {
                c["process"]["args"] = sh("cat /proc/sys/kernel/domainname");
                c["domainname"] = json!("example.org");
            })
        },
        scenario("rlimit-nofile", |c| {
            c["process"]["args"] = sh("ulimit -n; ulimit -Hn");
            c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 2048, "soft": 512}]);
        }),
        scenario("readonly-rootfs", |c| {
            c["process"]["args"] = sh("touch /x; echo rc=$?; touch /tmp/y; echo rc=$?");
            c["root"]["readonly"] = json!(true);
        }),
        scenario("masked-paths", args(sh("wc -c < /proc/timer_list; ls /sys/firmware | wc -l; wc -c < /proc/keys"))),
        scenario("readonly-paths", args(sh("echo 1 > /proc/sys/vm/drop_caches; echo rc=$?"))),
        scenario("capabilities-default", args(sh("grep Cap /proc/self/status"))),
        scenario("capability-dropped", |c| {
            c["process"]["args"] = sh("chown 1:1 /tmp; echo rc=$?; grep CapEff /proc/self/status");
            for set in ["bounding", "effective", "permitted"] {
                c["process"]["capabilities"][set].as_array_mut().unwrap().retain(|x| x != "CAP_CHOWN");
            }
        }),
        scenario("ambient-and-inheritable-caps", |c| {
            c["process"]["args"] = sh("grep -E 'CapInh|CapAmb|CapEff' /proc/self/status");
            c["process"]["user"] = json!({"uid": 1000, "gid": 1000});
            c["process"]["capabilities"]["inheritable"] = json!(["CAP_NET_BIND_SERVICE"]);
            c["process"]["capabilities"]["ambient"] = json!(["CAP_NET_BIND_SERVICE"]);
        }),
        scenario("no-new-privileges-on", args(sh("grep -E 'NoNewPrivs|Seccomp:' /proc/self/status"))),
        scenario("no-new-privileges-off", |c| {
            c["process"]["args"] = sh("grep NoNewPrivs /proc/self/status");
            c["process"]["noNewPrivileges"] = json!(false);
        }),
        scenario("seccomp-mkdir-eperm", |c| {
            c["process"]["args"] = sh("mkdir /tmp/d; echo rc=$?; grep Seccomp: /proc/self/status");
            c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]});
        }),
        scenario("seccomp-argument-condition", |c| {
            c["process"]["args"] = sh("touch /tmp/f; chmod 777 /tmp/f; echo rc=$?; chmod 755 /tmp/f; echo rc=$?; stat -c %a /tmp/f");
            c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13, "args": [{"index": 1, "value": 511, "op": "SCMP_CMP_EQ"}]},
                    {"names": ["fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13, "args": [{"index": 2, "value": 511, "op": "SCMP_CMP_EQ"}]}
                ]});
        }),
        scenario("seccomp-without-nnp", |c| {
            c["process"]["args"] = sh("mkdir /tmp/d; echo rc=$?; grep -E 'NoNewPrivs|Seccomp:' /proc/self/status");
            c["process"]["noNewPrivileges"] = json!(false);
            c["process"]["user"] = json!({"uid": 1000, "gid": 1000});
            c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
        }),
        scenario("seccomp-allowlist-three-arches", |c| {
            // A docker-style profile: deny by default (ENOSYS), allow every
            // x86_64 call except mkdir/mkdirat, on x86_64, x86 and x32.
            let allowed: Vec<&str> = husk_runtime::seccomp::native_syscall_names()
                .filter(|n| *n != "mkdir" && *n != "mkdirat")
                .collect();
            c["process"]["args"] = sh("mkdir /tmp/d; echo rc=$?; ls / | wc -l; grep Seccomp: /proc/self/status");
            c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]});
        }),
        scenario("tmpfs-mount", |c| {
            c["process"]["args"] = sh("grep scratch /proc/mounts; stat -c %a /mnt/scratch");
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/mnt/scratch", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "size=1m", "mode=700"]}));
        }),
        scenario("readonly-bind-mount", |c| {
            c["process"]["args"] = sh("cat /data/file; touch /data/new; echo rc=$?; grep ' /data ' /proc/mounts | cut -d' ' -f2,4");
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/data", "type": "bind", "source": "@HOSTDATA@",
                "options": ["rbind", "ro"]}));
        }),
        scenario("mount-table", args(sh("cut -d' ' -f2- /proc/mounts | sed 's/,inode64//'"))),
        scenario("dev-nodes", args(sh("ls /dev; stat -c '%n %F %a %t:%T %u:%g' /dev/null /dev/zero /dev/full /dev/tty /dev/random /dev/urandom; ls -l /dev/ptmx /dev/fd /dev/stdout | cut -c1-10,40-"))),
        scenario("pid-namespace", args(sh("echo $$; cat /proc/1/cmdline | tr '\\0' ' '"))),
        Scenario {
            explained: Some(
                "pids after 1 differ: runc's Go init spends pids 2-5 of the new namespace on its threads; husk's single-threaded init spends none",
            ),
            ..scenario("pid-numbering-after-init", args(sh("sh -c 'echo $$'; true")))
        },
        scenario("join-namespaces-by-path", |c| {
            // The test process's own (host) ipc and network namespaces:
            // harmless to share, and identical for both runtimes.
            let me = std::process::id();
            c["process"]["args"] = sh("readlink /proc/self/ns/ipc /proc/self/ns/net; ls /sys/class/net | grep -c lo");
            remove_ns(c, "ipc");
            remove_ns(c, "network");
            let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
            ns.push(json!({"type": "ipc", "path": format!("/proc/{me}/ns/ipc")}));
            ns.push(json!({"type": "network", "path": format!("/proc/{me}/ns/net")}));
        }),
        scenario("user-namespace-mapping", |c| {
            c["process"]["args"] = sh("id; cat /proc/self/uid_map /proc/self/gid_map; stat -c '%u:%g' /bin/busybox");
            c["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
            c["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
            c["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        }),
        scenario("proc-self-cgroup", args(json!(["cat", "/proc/self/cgroup"]))),
        scenario("proc-self-cgroup-cgroupns", |c| {
            c["process"]["args"] = json!(["cat", "/proc/self/cgroup"]);
            c["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "cgroup"}));
        }),
        scenario("cgroup-mount-and-resource-files", |c| {
            // A block I/O weight needs CFQ or BFQ on the host; without
            // either both runtimes refuse it, so the scenario leaves it out
            // and says so.
            let weight_file = ["blkio.weight", "blkio.bfq.weight"]
                .into_iter()
                .find(|file| std::path::Path::new("/sys/fs/cgroup/blkio").join(file).exists());
            let cat_weight = match weight_file {
                Some(file) => format!("/sys/fs/cgroup/blkio/{file}"),
                None => {
                    announce_form(
                        "cgroup-mount-and-resource-files: this host has neither blkio.weight nor \
                         blkio.bfq.weight (no CFQ or BFQ), so the form without blockIO.weight runs",
                    );
                    String::new()
                }
            };
            c["process"]["args"] = sh(&format!(
                "ls /sys/fs/cgroup; grep ' /sys/fs/cgroup' /proc/mounts | cut -d' ' -f2,3,4 | sort; \
                 cat /sys/fs/cgroup/cpu/cpu.shares /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us \
                 /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/memory/memory.limit_in_bytes \
                 /sys/fs/cgroup/memory/memory.soft_limit_in_bytes /sys/fs/cgroup/memory/memory.swappiness \
                 /sys/fs/cgroup/cpuset/cpuset.cpus {cat_weight}; \
                 cat /sys/fs/cgroup/devices/devices.list",
            ));
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
            c["linux"]["resources"]["cpu"] = json!({"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"});
            c["linux"]["resources"]["pids"] = json!({"limit": 64});
            c["linux"]["resources"]["memory"] = json!({"limit": 67108864, "reservation": 33554432, "swappiness": 10});
            if weight_file.is_some() {
                c["linux"]["resources"]["blockIO"] = json!({"weight": 300});
            }
        }),
        scenario("cgroup-mount-with-cgroupns", |c| {
            c["process"]["args"] = sh("ls /sys/fs/cgroup; grep ' /sys/fs/cgroup' /proc/mounts | cut -d' ' -f2,3,4 | sort; cat /sys/fs/cgroup/pids/pids.max");
            c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
            c["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "cgroup"}));
            c["linux"]["resources"]["pids"] = json!({"limit": 32});
        }),
        scenario("memory-limit-oom-kill", |c| {
            c["process"]["args"] = json!(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
            c["linux"]["resources"]["memory"] = json!({"limit": 16777216});
        }),
        scenario("pids-limit-stops-fork", |c| {
            c["process"]["args"] = sh("echo start; /bin/true; echo rc=$?");
            c["linux"]["resources"]["pids"] = json!({"limit": 1});
        }),
        scenario("killed-by-sigkill-137", |c| {
            c["process"]["args"] = sh("kill -KILL $$");
            remove_ns(c, "pid");
        }),
        scenario("killed-by-sigterm-143", |c| {
            c["process"]["args"] = sh("kill -TERM $$");
            remove_ns(c, "pid");
        }),
        scenario("oom-score-adj", |c| {
            c["process"]["args"] = json!(["cat", "/proc/self/oom_score_adj"]);
            c["process"]["oomScoreAdj"] = json!(500);
        }),
        scenario("sysctl", |c| {
            c["process"]["args"] = json!(["cat", "/proc/sys/net/ipv4/ip_forward"]);
            c["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        }),
        scenario("missing-executable", args(json!(["/bin/nonexistent"]))),
    ];
    v.push(Scenario {
        name: "stdin-piped",
        configure: Box::new(args(json!(["cat"]))),
        kind: Kind::Run(Some("hello from stdin\nline two\n")),
        explained: None,
    });
    v.push(Scenario {
        name: "poststart-hook",
        configure: Box::new(|c| {
            c["process"]["args"] = json!(["true"]);
            c["hooks"] = json!({"poststart": [{"path": hook_busybox(), "args": ["busybox", "sh", "-c", "cat > @BUNDLE@/poststart.out"]}]});
        }),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut o = h.cmd(rt, &["run", "-b", bundle.to_str().unwrap(), id], None);
            o.stdout.push_str(&std::fs::read_to_string(bundle.join("poststart.out")).unwrap_or_else(|e| format!("no hook output: {e}")));
            o
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "poststop-hook-on-delete",
        configure: Box::new(|c| {
            c["process"]["args"] = json!(["true"]);
            c["hooks"] = json!({"poststop": [{"path": hook_busybox(), "args": ["busybox", "sh", "-c", "cat > @BUNDLE@/poststop.out"]}]});
        }),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut o = h.cmd(rt, &["run", "-b", bundle.to_str().unwrap(), id], None);
            o.stdout.push_str(
                &std::fs::read_to_string(bundle.join("poststop.out")).unwrap_or_else(|e| format!("no hook output: {e}")),
            );
            o
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "create-hooks-order",
        configure: Box::new(|c| {
            c["process"]["args"] = json!(["cat", "/tmp/hooks.out"]);
            let hook = |name: &str, file: &str| {
                json!({"path": hook_busybox(), "args": ["busybox", "sh", "-c", format!("echo {name} >> {file}; cat >> {file}; echo >> {file}")]})
            };
            c["hooks"] = json!({
                "createRuntime": [hook("createRuntime", "@BUNDLE@/rootfs/tmp/hooks.out")],
                "createContainer": [hook("createContainer", "@BUNDLE@/rootfs/tmp/hooks.out")],
                "startContainer": [hook("startContainer", "/tmp/hooks.out")]
            });
        }),
        kind: Kind::Run(None),
        explained: None,
    });
    v.push(Scenario {
        name: "tty-console-socket",
        configure: Box::new(|c| {
            c["process"]["terminal"] = json!(true);
            c["process"]["args"] = sh("tty; [ -t 0 ] && echo stdin-is-tty; [ -t 1 ] && echo stdout-is-tty; ls /dev/console");
        }),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let sock = h.base.join(format!("console-{}.sock", Harness::tag(rt)));
            let _ = std::fs::remove_file(&sock);
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            let reader = std::thread::spawn(move || read_terminal(listener));
            let mut t = Observed::default();
            let o = h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), "--console-socket", sock.to_str().unwrap(), id]);
            log(&mut t, "create", &o);
            let o = h.cmd(rt, &["start", id], None);
            log(&mut t, "start", &o);
            t.stdout.push_str(&format!("status after exit: {}\n", wait_stopped(h, rt, id)));
            let tty_out = reader.join().ok().flatten().unwrap_or_else(|| "no terminal received".into());
            t.stdout.push_str(&tty_out);
            let o = h.cmd(rt, &["delete", id], None);
            log(&mut t, "delete", &o);
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "exec-into-running",
        configure: Box::new(args(json!(["sleep", "100"]))),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "create",
                &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]),
            );
            log(&mut t, "start", &h.cmd(rt, &["start", id], None));
            log(
                &mut t,
                "exec",
                &h.cmd(
                    rt,
                    &[
                        "exec",
                        id,
                        "sh",
                        "-c",
                        "echo in-exec; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo",
                    ],
                    None,
                ),
            );
            log(
                &mut t,
                "exec-env-cwd-user",
                &h.cmd(
                    rt,
                    &[
                        "exec",
                        "-e",
                        "EXTRA=1",
                        "--cwd",
                        "/tmp",
                        "-u",
                        "1000:1000",
                        id,
                        "sh",
                        "-c",
                        "echo $EXTRA; pwd; id",
                    ],
                    None,
                ),
            );
            log(
                &mut t,
                "exec-exit-code",
                &h.cmd(rt, &["exec", id, "sh", "-c", "exit 7"], None),
            );
            log(
                &mut t,
                "exec-stdin",
                &h.cmd(rt, &["exec", id, "cat"], Some("piped into exec\n")),
            );
            log(&mut t, "kill", &h.cmd(rt, &["kill", id, "KILL"], None));
            t.stdout
                .push_str(&format!("status: {}\n", wait_stopped(h, rt, id)));
            log(&mut t, "delete", &h.cmd(rt, &["delete", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "exec-tty-console-socket",
        configure: Box::new(args(json!(["sleep", "100"]))),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "create",
                &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]),
            );
            log(&mut t, "start", &h.cmd(rt, &["start", id], None));
            let sock = h
                .base
                .join(format!("exec-console-{}.sock", Harness::tag(rt)));
            let _ = std::fs::remove_file(&sock);
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            let reader = std::thread::spawn(move || read_terminal(listener));
            let o = h.cmd(
                rt,
                &[
                    "exec",
                    "--tty",
                    "--detach",
                    "--console-socket",
                    sock.to_str().unwrap(),
                    id,
                    "sh",
                    "-c",
                    "tty; [ -t 1 ] && echo is-tty; echo $TERM",
                ],
                None,
            );
            log(&mut t, "exec", &o);
            t.stdout.push_str(
                &reader
                    .join()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "no terminal received".into()),
            );
            log(&mut t, "kill", &h.cmd(rt, &["kill", id, "KILL"], None));
            wait_stopped(h, rt, id);
            log(&mut t, "delete", &h.cmd(rt, &["delete", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "run-detached-pid-file",
        configure: Box::new(args(json!(["sleep", "100"]))),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            let pid_file = bundle.join("pid");
            log(
                &mut t,
                "run-d",
                &h.cmd_detached(
                    rt,
                    &[
                        "run",
                        "-d",
                        "--pid-file",
                        pid_file.to_str().unwrap(),
                        "-b",
                        bundle.to_str().unwrap(),
                        id,
                    ],
                ),
            );
            let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let state: Value = serde_json::from_str(&h.cmd(rt, &["state", id], None).stdout)
                .unwrap_or(Value::Null);
            t.stdout.push_str(&format!(
                "pid file matches state: {}\nstatus: {}\n",
                state["pid"]
                    .as_i64()
                    .is_some_and(|p| Some(p) == pid.trim().parse::<i64>().ok()),
                state["status"]
            ));
            log(
                &mut t,
                "delete-force",
                &h.cmd(rt, &["delete", "-f", id], None),
            );
            log(&mut t, "state-after", &h.cmd(rt, &["state", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "pause-resume",
        configure: Box::new(args(json!(["sleep", "100"]))),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "create",
                &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]),
            );
            t.stdout.push_str(&format!("{}\n", state_status(h, rt, id)));
            log(&mut t, "start", &h.cmd(rt, &["start", id], None));
            t.stdout.push_str(&format!("{}\n", state_status(h, rt, id)));
            log(&mut t, "pause", &h.cmd(rt, &["pause", id], None));
            t.stdout.push_str(&format!("{}\n", state_status(h, rt, id)));
            log(&mut t, "resume", &h.cmd(rt, &["resume", id], None));
            t.stdout.push_str(&format!("{}\n", state_status(h, rt, id)));
            log(&mut t, "kill", &h.cmd(rt, &["kill", id, "KILL"], None));
            t.stdout.push_str(&format!("{}\n", wait_stopped(h, rt, id)));
            log(&mut t, "delete", &h.cmd(rt, &["delete", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "state-json-lifecycle",
        configure: Box::new(|c| {
            c["process"]["args"] = json!(["sleep", "100"]);
            c["annotations"] = json!({"org.example/b": "2", "org.example/a": "1"});
        }),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "create",
                &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]),
            );
            log(&mut t, "state-created", &h.cmd(rt, &["state", id], None));
            log(&mut t, "start", &h.cmd(rt, &["start", id], None));
            log(&mut t, "state-running", &h.cmd(rt, &["state", id], None));
            log(&mut t, "start-again", &h.cmd(rt, &["start", id], None));
            log(&mut t, "delete-running", &h.cmd(rt, &["delete", id], None));
            log(&mut t, "kill-term", &h.cmd(rt, &["kill", id], None));
            log(&mut t, "kill-kill", &h.cmd(rt, &["kill", id, "9"], None));
            wait_stopped(h, rt, id);
            log(&mut t, "state-stopped", &h.cmd(rt, &["state", id], None));
            log(
                &mut t,
                "kill-stopped",
                &h.cmd(rt, &["kill", id, "KILL"], None),
            );
            log(&mut t, "delete", &h.cmd(rt, &["delete", id], None));
            log(&mut t, "state-deleted", &h.cmd(rt, &["state", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "kill-created-then-delete",
        configure: Box::new(args(json!(["true"]))),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "create",
                &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]),
            );
            log(&mut t, "kill", &h.cmd(rt, &["kill", id, "KILL"], None));
            t.stdout.push_str(&format!("{}\n", wait_stopped(h, rt, id)));
            log(&mut t, "start-stopped", &h.cmd(rt, &["start", id], None));
            log(&mut t, "delete", &h.cmd(rt, &["delete", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "ps-and-events-stats",
        configure: Box::new(|c| {
            c["process"]["args"] = sh("sleep 100 & sleep 100");
            c["linux"]["resources"]["pids"] = json!({"limit": 50});
        }),
        kind: Kind::Custom(Box::new(|h, rt, id, bundle| {
            let mut t = Observed::default();
            log(&mut t, "create", &h.cmd_detached(rt, &["create", "-b", bundle.to_str().unwrap(), id]));
            log(&mut t, "start", &h.cmd(rt, &["start", id], None));
            std::thread::sleep(Duration::from_millis(200));
            let ps = h.cmd(rt, &["ps", "--format", "json", id], None);
            let n = serde_json::from_str::<Vec<i64>>(ps.stdout.trim()).map(|v| v.len()).unwrap_or(0);
            t.stdout.push_str(&format!("[ps] rc={} pids={n}\n", ps.code));
            let ev = h.cmd(rt, &["events", "--stats", id], None);
            let v: Value = serde_json::from_str(ev.stdout.lines().next().unwrap_or("{}")).unwrap_or(Value::Null);
            let keys: BTreeSet<String> = ["cpu", "memory", "pids"].iter().filter(|k| v["data"].get(**k).is_some()).map(|k| k.to_string()).collect();
            t.stdout.push_str(&format!(
                "[events] rc={} type={} keys={keys:?} pids.current={} pids.limit={} mem.usage>0={}\n",
                ev.code, v["type"], v["data"]["pids"]["current"], v["data"]["pids"]["limit"],
                v["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0
            ));
            log(&mut t, "delete-force", &h.cmd(rt, &["delete", "--force", id], None));
            t
        })),
        explained: None,
    });
    v.push(Scenario {
        name: "start-missing-container",
        configure: Box::new(args(json!(["true"]))),
        kind: Kind::Custom(Box::new(|h, rt, _id, _bundle| {
            let mut t = Observed::default();
            log(
                &mut t,
                "start",
                &h.cmd(rt, &["start", "no-such-container"], None),
            );
            log(
                &mut t,
                "state",
                &h.cmd(rt, &["state", "no-such-container"], None),
            );
            log(
                &mut t,
                "delete",
                &h.cmd(rt, &["delete", "no-such-container"], None),
            );
            t
        })),
        explained: None,
    });
    v
}

struct Cleanup<'a> {
    h: &'a Harness,
    ids: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for rt in [Rt::Runc, Rt::Husk] {
            if rt == Rt::Runc && self.h.runc.is_none() {
                continue;
            }
            for id in &self.ids {
                let _ = Command::new(self.h.bin(rt))
                    .arg("--root")
                    .arg(self.h.root(rt))
                    .args(["delete", "--force", id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for dir in cgroup_parents() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        // The test directory removes the bundles.
    }
}

/// Every `<hierarchy>/husk-difftest` directory that could exist.
fn cgroup_parents() -> Vec<PathBuf> {
    let mut out = Vec::new();
    // Also called from the cleanup guard's drop: an unreadable table means
    // nothing to clean, not a panic.
    let mounts = husk_mountinfo::read_self().unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for m in mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
    {
        out.push(m.mount_point.join(CGROUP_PARENT));
        // runc and husk put relative paths under their own cgroup.
        for p in own.lines().filter_map(|l| l.splitn(3, ':').nth(2)) {
            if p != "/" {
                out.push(
                    m.mount_point
                        .join(p.trim_start_matches('/'))
                        .join(CGROUP_PARENT),
                );
            }
        }
    }
    out
}

fn mount_points() -> BTreeSet<PathBuf> {
    husk_mountinfo::read_self()
        .expect("mount table")
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// Processes running anything from our bundles or in our cgroups.
fn our_processes(base: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        // Zombies have exited; reaping them is the host init's business.
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
        {
            continue;
        }
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let root = std::fs::read_link(e.path().join("root")).unwrap_or_default();
        if cg.contains(CGROUP_PARENT) || root.starts_with(base) {
            let cmd = std::fs::read_to_string(e.path().join("cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            out.push(format!("{name}: {cmd}"));
        }
    }
    out
}

#[test]
fn runc_differential() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        announce_form(format_args!(
            "runc differential not run: needs root to create namespaces and cgroups (euid {euid})"
        ));
        return;
    }
    // HUSK_DIFF_RUNC=<path> picks another runc; HUSK_DIFF_RUNC=none forces
    // the husk-only form (to check that form on a machine that has runc).
    let runc = match std::env::var("HUSK_DIFF_RUNC").ok().as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.exists()),
        None => ["/usr/sbin/runc", "/usr/bin/runc"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists()),
    };
    match &runc {
        Some(p) => announce_form(format_args!(
            "runc differential, full form: husk-runc against {}",
            p.display()
        )),
        None => announce_form("runc differential, husk-only form: runc is not available (not installed, or HUSK_DIFF_RUNC=none), so each scenario runs under husk-runc alone and nothing is compared"),
    }
    let busybox = busybox().expect("busybox (busybox-static) is required");
    let base_dir = TestDir::new("diff").expect("a test directory");
    let base = base_dir.path().to_path_buf();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hostdata = base.join("hostdata");
    std::fs::create_dir_all(&hostdata).unwrap();
    std::fs::write(hostdata.join("file"), "data from the host\n").unwrap();
    let h = Harness {
        base: base.clone(),
        busybox,
        runc,
        husk: PathBuf::from(env!("CARGO_BIN_EXE_husk-runc")),
        hostdata,
    };
    let mounts_before = mount_points();
    let list = scenarios();
    let mut guard = Cleanup {
        h: &h,
        ids: Vec::new(),
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for s in &list {
        let id = format!("hdiff-{}", s.name);
        guard.ids.push(id.clone());
        let mut cfg = base_config(s.name);
        (s.configure)(&mut cfg);
        let cfg = serde_json::from_str::<Value>(
            &serde_json::to_string(&cfg)
                .unwrap()
                .replace("@HOSTDATA@", h.hostdata.to_str().unwrap()),
        )
        .unwrap();
        let mut results = Vec::new();
        let runtimes: &[Rt] = if h.runc.is_some() {
            &[Rt::Runc, Rt::Husk]
        } else {
            &[Rt::Husk]
        };
        for &rt in runtimes {
            let bundle = h.bundle(rt, s.name, &cfg);
            let started = Instant::now();
            let o = match &s.kind {
                Kind::Run(input) => {
                    h.cmd(rt, &["run", "-b", bundle.to_str().unwrap(), &id], *input)
                }
                Kind::Custom(f) => f(&h, rt, &id, &bundle),
            };
            let o = Observed {
                stdout: normalize(&o.stdout, &bundle),
                stderr: normalize(&o.stderr, &bundle),
                code: o.code,
            };
            results.push((rt, o, started.elapsed()));
            // Nothing may survive a scenario.
            let _ = Command::new(h.bin(rt))
                .arg("--root")
                .arg(h.root(rt))
                .args(["delete", "--force", &id])
                .stderr(Stdio::null())
                .status();
        }
        let verdict = if results.len() == 2 {
            let (a, b) = (&results[0].1, &results[1].1);
            if a == b {
                "match".to_string()
            } else if let Some(why) = s.explained {
                format!("explained ({why})")
            } else {
                failures.push(format!(
                    "--- {}\nrunc: rc={} stdout={:?} stderr={:?}\nhusk: rc={} stdout={:?} stderr={:?}",
                    s.name, a.code, a.stdout, a.stderr, b.code, b.stdout, b.stderr
                ));
                "MISMATCH".to_string()
            }
        } else {
            "n/a (husk only)".to_string()
        };
        let cells: Vec<String> = results
            .iter()
            .map(|(rt, o, d)| {
                format!(
                    "{}: rc={:<4} {:>5}ms",
                    Harness::tag(*rt),
                    o.code,
                    d.as_millis()
                )
            })
            .collect();
        rows.push(format!("{:<32} {:<48} {verdict}", s.name, cells.join("  ")));
    }
    println!("\n{:<32} {:<48} result", "scenario", "runtime results");
    println!("{}", "-".repeat(100));
    for r in &rows {
        println!("{r}");
    }
    let matched = rows.iter().filter(|r| r.ends_with(" match")).count();
    println!(
        "{}\n{matched}/{} scenarios identical under runc and husk-runc",
        "-".repeat(100),
        list.len()
    );

    // Leak check: after every scenario's delete, before the harness's own cleanup.
    let mut leaks = Vec::new();
    let new_mounts: Vec<_> = mount_points().difference(&mounts_before).cloned().collect();
    if !new_mounts.is_empty() {
        leaks.push(format!("new mounts: {new_mounts:?}"));
    }
    let procs = our_processes(&base);
    if !procs.is_empty() {
        leaks.push(format!("processes left: {procs:?}"));
    }
    let mut cg_left = Vec::new();
    for dir in cgroup_parents() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                cg_left.push(e.path().display().to_string());
            }
        }
    }
    if !cg_left.is_empty() {
        leaks.push(format!("cgroup directories left: {cg_left:?}"));
    }
    for rt in [Rt::Runc, Rt::Husk] {
        let left: Vec<_> = std::fs::read_dir(h.root(rt))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if !left.is_empty() {
            leaks.push(format!("{} state dirs left: {left:?}", Harness::tag(rt)));
        }
    }
    println!(
        "leak check: {}",
        if leaks.is_empty() {
            "no new mounts, processes, cgroup or state directories".to_string()
        } else {
            leaks.join("; ")
        }
    );
    drop(guard);
    assert!(
        failures.is_empty(),
        "unexplained mismatches:\n{}",
        failures.join("\n")
    );
    assert!(leaks.is_empty(), "leaks: {}", leaks.join("; "));
}
