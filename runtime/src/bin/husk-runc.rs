//! `husk-runc`: a runc-compatible command line over the husk runtime
//! library. It takes runc's commands and flags (`--root`, `--bundle`,
//! `--pid-file`, `--console-socket` ...) and prints the same state JSON, so
//! the same bundles and scripts drive both. All logic lives in the library;
//! this file parses arguments, waits for processes and formats output.

use clap::{Args, Parser, Subcommand};
use husk_runtime::console;
use husk_runtime::signals::parse_signal;
use husk_runtime::{Container, ContainerBuilder, Error, ExecOptions};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "husk-runc",
    version,
    about = "runc-compatible CLI for the husk OCI runtime"
)]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = husk_runtime::DEFAULT_STATE_ROOT)]
    root: PathBuf,
    /// Accepted for runc compatibility; logs go to stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    #[arg(long = "log-format", global = true)]
    log_format: Option<String>,
    #[arg(long, global = true)]
    debug: bool,
    #[arg(long = "systemd-cgroup", global = true)]
    systemd_cgroup: bool,
    #[arg(long, global = true)]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Container id.
    id: String,
    /// Path to the bundle directory.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: i32,
    #[arg(long = "no-pivot")]
    no_pivot: bool,
    #[arg(long = "no-new-keyring")]
    no_new_keyring: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container; its process waits for `start`.
    Create(CreateArgs),
    /// Start a created container.
    Start { id: String },
    /// Create, start, wait for and delete a container.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short, long)]
        detach: bool,
        #[arg(long)]
        keep: bool,
        #[arg(long = "no-subreaper")]
        no_subreaper: bool,
    },
    /// Run a new process inside a container.
    Exec(ExecArgs),
    /// Print the state of a container.
    State { id: String },
    /// Send a signal to the container's init.
    Kill {
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a container.
    Delete {
        id: String,
        #[arg(short, long)]
        force: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// List the processes of a container.
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// Print resource statistics.
    Events {
        id: String,
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
    },
    /// List containers.
    List {
        #[arg(short, long)]
        quiet: bool,
        #[arg(short, long, default_value = "table")]
        format: String,
    },
}

#[derive(Args, Debug)]
struct ExecArgs {
    id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    #[arg(long = "console-socket")]
    console_socket: Option<PathBuf>,
    #[arg(long)]
    cwd: Option<PathBuf>,
    #[arg(short, long = "env")]
    env: Vec<String>,
    #[arg(short, long)]
    tty: bool,
    /// uid[:gid]
    #[arg(short, long)]
    user: Option<String>,
    #[arg(short = 'g', long = "additional-gids")]
    additional_gids: Vec<u32>,
    /// Path to a process.json.
    #[arg(short, long)]
    process: Option<PathBuf>,
    #[arg(short, long)]
    detach: bool,
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    #[arg(long = "no-new-privs")]
    no_new_privs: bool,
    #[arg(short, long = "cap")]
    cap: Vec<String>,
    #[arg(long = "preserve-fds", default_value_t = 0)]
    preserve_fds: i32,
    #[arg(long = "process-label")]
    process_label: Option<String>,
    #[arg(long)]
    apparmor: Option<String>,
}

/// A failure, printed the way runc's logger prints it.
fn report(err: &dyn std::fmt::Display) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = husk_runtime::state::format_rfc3339(now.as_secs() as i64, 0, false);
    let msg = err
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    eprintln!("time=\"{ts}\" level=error msg=\"{msg}\"");
}

/// Exit status of a waited process, shell-style (128+signal).
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Signals forwarded to the container while we wait for it.
const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Block the signals we handle synchronously; returns the set.
fn block_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for s in FORWARDED {
        set.add(s);
    }
    let _ = set.thread_block();
    set
}

/// Wait for `pid` (our child), forwarding signals to it.
fn wait_forwarding(pid: i32, set: &SigSet) -> i32 {
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(st) => {
                    if st.pid() == Some(Pid::from_raw(pid)) {
                        if let Some(code) = exit_code(st) {
                            return code;
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 255,
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            Err(_) => {}
        }
    }
}

/// A socketpair standing in for `--console-socket` when we own the tty.
fn internal_console() -> Result<(OwnedFd, OwnedFd), Error> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    husk_runtime::error::sys(
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
        "socketpair",
        "console",
    )
}

fn cmd_create(
    root: &PathBuf,
    a: &CreateArgs,
    console_fd: Option<OwnedFd>,
) -> Result<Container, Error> {
    let mut b = ContainerBuilder::new(a.id.clone())
        .with_root(root)
        .with_bundle(&a.bundle)
        .with_pid_file(a.pid_file.clone())
        .with_console_socket(a.console_socket.clone())
        .with_preserve_fds(a.preserve_fds);
    if let Some(fd) = console_fd {
        b = b.with_console_fd(fd);
    }
    b.create()
}

fn bundle_wants_terminal(bundle: &std::path::Path) -> bool {
    husk_runtime::spec::load(bundle)
        .ok()
        .and_then(|s| s.process().as_ref().and_then(|p| p.terminal()))
        == Some(true)
}

fn run(cli: Cli) -> Result<i32, (String, Error)> {
    let root = cli.root.clone();
    let e = |name: &str| {
        let name = name.to_string();
        move |err: Error| (name.clone(), err)
    };
    match cli.command {
        Command::Create(a) => {
            cmd_create(&root, &a, None).map_err(e("create"))?;
            Ok(0)
        }
        Command::Start { id } => {
            Container::load(&root, &id)
                .and_then(|c| c.start())
                .map_err(e(""))?;
            Ok(0)
        }
        Command::Run {
            create,
            detach,
            keep,
            ..
        } => {
            let own_tty =
                !detach && create.console_socket.is_none() && bundle_wants_terminal(&create.bundle);
            let (ours, theirs) = if own_tty {
                let (a, b) = internal_console().map_err(e("run"))?;
                (Some(a), Some(b))
            } else {
                (None, None)
            };
            let set = if detach {
                SigSet::empty()
            } else {
                block_signals()
            };
            let c = cmd_create(&root, &create, theirs).map_err(e("run"))?;
            let master = match &ours {
                Some(sock) => Some(
                    console::recv_fd(std::os::fd::AsRawFd::as_raw_fd(sock)).map_err(e("run"))?,
                ),
                None => None,
            };
            if let Err(err) = c.start() {
                let _ = Container::load(&root, &create.id).and_then(|c| c.delete(true));
                return Err(("run".into(), err));
            }
            if detach {
                return Ok(0);
            }
            let proxy = master.map(|m| std::thread::spawn(move || console::proxy(&m)));
            let code = wait_forwarding(c.pid(), &set);
            if let Some(t) = proxy {
                let _ = t.join();
            }
            if !keep {
                if let Ok(c) = Container::load(&root, &create.id) {
                    let _ = c.delete(true);
                }
            }
            Ok(code)
        }
        Command::Exec(a) => {
            let c = Container::load(&root, &a.id).map_err(e("exec"))?;
            let process = build_exec_process(&c, &a).map_err(e("exec"))?;
            let terminal = process.terminal() == Some(true);
            let own_tty = terminal && !a.detach && a.console_socket.is_none();
            let (ours, theirs) = if own_tty {
                let (x, y) = internal_console().map_err(e("exec"))?;
                (Some(x), Some(std::sync::Arc::new(y)))
            } else {
                (None, None)
            };
            let set = if a.detach {
                SigSet::empty()
            } else {
                block_signals()
            };
            let pid = c
                .exec(ExecOptions {
                    process: Some(process),
                    console_socket: a.console_socket.clone(),
                    console_fd: theirs,
                    pid_file: a.pid_file.clone(),
                    preserve_fds: a.preserve_fds,
                })
                .map_err(e("exec"))?;
            if a.detach {
                return Ok(0);
            }
            let master = match &ours {
                Some(sock) => console::recv_fd(std::os::fd::AsRawFd::as_raw_fd(sock)).ok(),
                None => None,
            };
            let proxy = master.map(|m| std::thread::spawn(move || console::proxy(&m)));
            let code = wait_forwarding(pid, &set);
            if let Some(t) = proxy {
                let _ = t.join();
            }
            Ok(code)
        }
        Command::State { id } => {
            let c = Container::load(&root, &id).map_err(e(""))?;
            print!("{}", c.state_json().map_err(e(""))?);
            Ok(0)
        }
        Command::Kill { id, signal, all } => {
            let sig = parse_signal(&signal).map_err(e(""))?;
            Container::load(&root, &id)
                .and_then(|c| c.kill(sig, all))
                .map_err(e(""))?;
            Ok(0)
        }
        Command::Delete { id, force } => {
            match Container::load(&root, &id) {
                Ok(c) => c.delete(force).map_err(e(""))?,
                Err(Error::NotFound(_)) if force => {}
                Err(err) => return Err(("".into(), err)),
            }
            Ok(0)
        }
        Command::Pause { id } => {
            Container::load(&root, &id)
                .and_then(|c| c.pause())
                .map_err(e(""))?;
            Ok(0)
        }
        Command::Resume { id } => {
            Container::load(&root, &id)
                .and_then(|c| c.resume())
                .map_err(e(""))?;
            Ok(0)
        }
        Command::Ps {
            format,
            id,
            ps_args,
        } => {
            let c = Container::load(&root, &id).map_err(e(""))?;
            let pids = c.pids();
            if format == "json" {
                println!("{}", serde_json::to_string(&pids).unwrap_or_default());
                return Ok(0);
            }
            let args = if ps_args.is_empty() {
                vec!["-ef".to_string()]
            } else {
                ps_args
            };
            let out = std::process::Command::new("ps")
                .args(&args)
                .output()
                .map_err(|err| ("".to_string(), Error::InvalidArgument(format!("ps: {err}"))))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let col = header
                .split_whitespace()
                .position(|h| h == "PID")
                .unwrap_or(0);
            println!("{header}");
            for line in lines {
                let pid: Option<i32> = line
                    .split_whitespace()
                    .nth(col)
                    .and_then(|p| p.parse().ok());
                if pid.is_some_and(|p| pids.contains(&p)) {
                    println!("{line}");
                }
            }
            Ok(0)
        }
        Command::Events {
            id,
            stats,
            interval,
        } => {
            let c = Container::load(&root, &id).map_err(e(""))?;
            let every = parse_interval(&interval);
            loop {
                let ev = serde_json::json!({"type": "stats", "id": id, "data": c.stats()});
                println!("{ev}");
                if stats || c.status() == husk_runtime::Status::Stopped {
                    return Ok(0);
                }
                std::thread::sleep(every);
            }
        }
        Command::List { quiet, format } => {
            let ids = Container::list(&root);
            if quiet {
                for id in ids {
                    println!("{id}");
                }
                return Ok(0);
            }
            let mut rows = Vec::new();
            for id in ids {
                if let Ok(c) = Container::load(&root, &id) {
                    let st = c.status();
                    let r = c.record();
                    rows.push((
                        id,
                        if st == husk_runtime::Status::Stopped {
                            0
                        } else {
                            r.pid
                        },
                        st,
                        r.bundle.clone(),
                        r.created.clone(),
                    ));
                }
            }
            if format == "json" {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, pid, st, b, cr)| serde_json::json!({"ociVersion": husk_runtime::state::OCI_VERSION, "id": id, "pid": pid, "status": st, "bundle": b, "created": cr, "owner": ""}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("ID          PID         STATUS      BUNDLE      CREATED     OWNER");
                for (id, pid, st, b, cr) in rows {
                    println!(
                        "{id:<11} {pid:<11} {st:<11} {:<11} {cr:<11} root",
                        b.display()
                    );
                }
            }
            Ok(0)
        }
    }
}

fn parse_interval(s: &str) -> std::time::Duration {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().unwrap_or(5);
    match unit {
        "ms" => std::time::Duration::from_millis(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => std::time::Duration::from_secs(n),
    }
}

/// The process for `exec`: a process.json, or the container's process
/// with the command line's overrides.
fn build_exec_process(c: &Container, a: &ExecArgs) -> Result<oci_spec::runtime::Process, Error> {
    if let Some(path) = &a.process {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        return serde_path_to_error::deserialize(de)
            .map_err(|err| Error::spec(err.path().to_string(), err.inner().to_string()));
    }
    if a.command.is_empty() {
        return Err(Error::InvalidArgument("exec: missing command".into()));
    }
    let spec = husk_runtime::container::container_spec(c);
    let mut p = spec.process().clone().unwrap_or_default();
    p.set_args(Some(a.command.clone()));
    let mut env = p.env().clone().unwrap_or_default();
    for kv in &a.env {
        let key = kv.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    p.set_env(Some(env));
    if let Some(cwd) = &a.cwd {
        p.set_cwd(cwd.clone());
    }
    p.set_terminal(Some(a.tty));
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (u.as_str(), None),
        };
        let uid: u32 = uid
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("invalid --user {u:?}")))?;
        let mut user = p.user().clone();
        user.set_uid(uid);
        if let Some(g) = gid {
            user.set_gid(
                g.parse()
                    .map_err(|_| Error::InvalidArgument(format!("invalid --user {u:?}")))?,
            );
        }
        p.set_user(user);
    }
    if !a.additional_gids.is_empty() {
        let mut user = p.user().clone();
        user.set_additional_gids(Some(a.additional_gids.clone()));
        p.set_user(user);
    }
    if a.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    if !a.cap.is_empty() {
        let mut caps = p.capabilities().clone().unwrap_or_default();
        for name in &a.cap {
            let cap: oci_spec::runtime::Capability =
                serde_json::from_value(serde_json::Value::String(name.clone()))
                    .map_err(|_| Error::spec("--cap", format!("unknown capability {name}")))?;
            for set in [
                caps.bounding().clone(),
                caps.effective().clone(),
                caps.permitted().clone(),
                caps.inheritable().clone(),
                caps.ambient().clone(),
            ]
            .iter_mut()
            .enumerate()
            {
                let mut s = set.1.clone().unwrap_or_default();
                s.insert(cap);
                match set.0 {
                    0 => caps.set_bounding(Some(s)),
                    1 => caps.set_effective(Some(s)),
                    2 => caps.set_permitted(Some(s)),
                    3 => caps.set_inheritable(Some(s)),
                    _ => caps.set_ambient(Some(s)),
                };
            }
        }
        p.set_capabilities(Some(caps));
    }
    Ok(p)
}

fn main() -> ExitCode {
    if std::env::var_os("HUSK_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("HUSK_LOG"))
            .init();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err((cmd, err)) => {
            if cmd.is_empty() {
                report(&err);
            } else {
                report(&format!("husk-runc {cmd} failed: {err}"));
            }
            ExitCode::from(1)
        }
    }
}
