//! The sandbox's Prometheus text (`/metrics`), written with the
//! `prometheus` crate: a fresh registry per scrape holds gauges and
//! counters set from one snapshot ([`Scrape`]), plus the pod's RPC latency
//! histogram, which lives as long as the pod. Label values the guest could
//! influence (container ids are the host's, but guest figures are numbers
//! only) go through the crate's escaping, so nothing can break the format.

use husk_agent_client::agent::GuestMetrics;
use husk_devices::counters::CountersSnapshot;
use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use super::info::SandboxInfo;
use super::procfs::ProcessStats;
use crate::boot_phases::BootPhases;

/// The histogram's buckets, seconds: agent calls take a few ms on KVM and
/// tens under TCG; container creation can take seconds.
pub const RPC_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Calls that wait on the guest by design (a process's life, the event
/// long poll): not latencies, so not in the histogram.
pub const LONG_WAIT_METHODS: [&str; 2] = ["WaitProcess", "GetEvents"];

/// The pod's agent call latencies, `husk_agent_rpc_duration_seconds`.
#[derive(Clone)]
pub struct RpcLatency {
    histogram: HistogramVec,
}

impl Default for RpcLatency {
    fn default() -> Self {
        Self::new()
    }
}

impl RpcLatency {
    pub fn new() -> Self {
        let opts = HistogramOpts::new(
            "husk_agent_rpc_duration_seconds",
            "Duration of the shim's calls to the guest agent, by method",
        )
        .buckets(RPC_LATENCY_BUCKETS.to_vec());
        Self {
            // The name, help and buckets above are valid: this cannot fail.
            histogram: HistogramVec::new(opts, &["method"]).expect("valid histogram options"),
        }
    }

    /// Records one call (long waits are left out).
    pub fn observe(&self, method: &'static str, elapsed: std::time::Duration) {
        if !LONG_WAIT_METHODS.contains(&method) {
            self.histogram
                .with_label_values(&[method])
                .observe(elapsed.as_secs_f64());
        }
    }

    /// The observer the agent client is given.
    pub fn observer(&self) -> husk_agent_client::CallObserver {
        let this = self.clone();
        std::sync::Arc::new(move |method, elapsed| this.observe(method, elapsed))
    }
}

/// Everything one scrape reports.
pub struct Scrape<'a> {
    pub info: &'a SandboxInfo,
    pub shim: Option<ProcessStats>,
    /// `None` for the built-in VMM (it is the shim) or a VMM that is gone.
    pub vmm: Option<ProcessStats>,
    /// `None` when the agent did not answer.
    pub guest: Option<GuestMetrics>,
    pub devices: CountersSnapshot,
    pub phases: BootPhases,
    pub rpc: &'a RpcLatency,
}

/// A failure to build the text (a registration conflict: a bug).
#[derive(Debug, thiserror::Error)]
#[error("cannot render the metrics: {0}")]
pub struct RenderError(#[from] prometheus::Error);

struct Builder {
    registry: Registry,
}

impl Builder {
    fn add<C: Collector + Clone + 'static>(&self, collector: C) -> Result<C, RenderError> {
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }
    fn gauge(&self, name: &str, help: &str, value: f64) -> Result<(), RenderError> {
        self.add(Gauge::new(name, help)?)?.set(value);
        Ok(())
    }
    fn int_gauge(&self, name: &str, help: &str, value: u64) -> Result<(), RenderError> {
        self.add(IntGauge::new(name, help)?)?
            .set(i64::try_from(value).unwrap_or(i64::MAX));
        Ok(())
    }
    fn counter(&self, name: &str, help: &str, value: u64) -> Result<(), RenderError> {
        self.add(IntCounter::new(name, help)?)?.inc_by(value);
        Ok(())
    }
    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, RenderError> {
        self.add(GaugeVec::new(Opts::new(name, help), labels)?)
    }
    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, RenderError> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }
}

fn seconds_ms(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The Prometheus text of one scrape.
pub fn render(scrape: &Scrape<'_>) -> Result<String, RenderError> {
    let b = Builder {
        registry: Registry::new(),
    };
    let info = scrape.info;
    b.int_gauge(
        "husk_sandbox_vcpus",
        "vCPUs of the pod's VM",
        u64::from(info.vcpus),
    )?;
    b.int_gauge(
        "husk_sandbox_memory_bytes",
        "Memory of the pod's VM",
        info.memory_mib * 1024 * 1024,
    )?;
    b.int_gauge(
        "husk_sandbox_start_time_seconds",
        "When the pod's VM started, Unix time",
        info.started_at_unix_s,
    )?;
    b.int_gauge(
        "husk_sandbox_containers",
        "Containers in the pod",
        info.containers.len() as u64,
    )?;
    let backend = b.gauge_vec(
        "husk_sandbox_info",
        "The pod's VM backend (value 1)",
        &["backend"],
    )?;
    backend.with_label_values(&[info.backend.as_str()]).set(1.0);

    let processes: Vec<(&str, ProcessStats)> = [("shim", scrape.shim), ("vmm", scrape.vmm)]
        .into_iter()
        .filter_map(|(name, stats)| Some((name, stats?)))
        .collect();
    let cpu = b.add(CounterVec::new(
        Opts::new(
            "husk_process_cpu_seconds_total",
            "CPU time of the shim and of a separate VMM process (user + system)",
        ),
        &["process"],
    )?)?;
    let rss = b.gauge_vec(
        "husk_process_resident_memory_bytes",
        "Resident memory (VmRSS)",
        &["process"],
    )?;
    let pss = b.gauge_vec(
        "husk_process_proportional_memory_bytes",
        "Proportional set size (smaps_rollup Pss)",
        &["process"],
    )?;
    let fds = b.gauge_vec(
        "husk_process_open_fds",
        "Open file descriptors",
        &["process"],
    )?;
    let threads = b.gauge_vec("husk_process_threads", "Threads", &["process"])?;
    for (name, stats) in &processes {
        cpu.with_label_values(&[name]).inc_by(stats.cpu_seconds);
        rss.with_label_values(&[name]).set(stats.rss_bytes as f64);
        pss.with_label_values(&[name]).set(stats.pss_bytes as f64);
        fds.with_label_values(&[name]).set(stats.open_fds as f64);
        threads.with_label_values(&[name]).set(stats.threads as f64);
    }

    b.int_gauge(
        "husk_guest_up",
        "Whether the guest agent answered this scrape's GetGuestMetrics",
        u64::from(scrape.guest.is_some()),
    )?;
    if let Some(guest) = &scrape.guest {
        render_guest(&b, guest, &info.containers)?;
    }

    let d = &scrape.devices;
    let opened = b.counter_vec(
        "husk_vsock_connections_total",
        "vsock streams established, by who opened them",
        &["initiator"],
    )?;
    opened
        .with_label_values(&["host"])
        .inc_by(d.vsock_opened_host);
    opened
        .with_label_values(&["guest"])
        .inc_by(d.vsock_opened_guest);
    let refused = b.counter_vec(
        "husk_vsock_connections_refused_total",
        "vsock streams refused at the device's connection limit",
        &["initiator"],
    )?;
    refused
        .with_label_values(&["host"])
        .inc_by(d.vsock_refused_host);
    refused
        .with_label_values(&["guest"])
        .inc_by(d.vsock_refused_guest);
    let bytes = b.counter_vec(
        "husk_vsock_bytes_total",
        "vsock stream bytes",
        &["direction"],
    )?;
    bytes
        .with_label_values(&["to_guest"])
        .inc_by(d.vsock_bytes_to_guest);
    bytes
        .with_label_values(&["from_guest"])
        .inc_by(d.vsock_bytes_from_guest);
    b.counter(
        "husk_fs_requests_total",
        "FUSE requests the virtio-fs device received",
        d.fs_requests,
    )?;
    b.counter(
        "husk_fs_request_errors_total",
        "FUSE requests refused before the server or left unanswered",
        d.fs_request_errors,
    )?;
    let lines = b.counter_vec(
        "husk_guest_log_lines_total",
        "Log lines the guest caused in the devices, written or suppressed by the rate limit",
        &["outcome"],
    )?;
    lines
        .with_label_values(&["written"])
        .inc_by(d.guest_log_written);
    lines
        .with_label_values(&["suppressed"])
        .inc_by(d.guest_log_suppressed);

    let phases = b.gauge_vec(
        "husk_boot_phase_seconds",
        "Duration of each phase of the pod's start (only those reached)",
        &["phase"],
    )?;
    for (name, duration) in scrape.phases.named() {
        if let Some(duration) = duration {
            phases
                .with_label_values(&[name])
                .set(duration.as_secs_f64());
        }
    }
    b.add(scrape.rpc.histogram.clone())?;

    let mut text = Vec::new();
    TextEncoder::new().encode(&b.registry.gather(), &mut text)?;
    // The encoder writes UTF-8 only.
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn render_guest(b: &Builder, guest: &GuestMetrics, known: &[String]) -> Result<(), RenderError> {
    b.int_gauge(
        "husk_guest_memory_total_bytes",
        "Guest MemTotal",
        guest.mem_total_bytes,
    )?;
    b.int_gauge(
        "husk_guest_memory_free_bytes",
        "Guest MemFree",
        guest.mem_free_bytes,
    )?;
    b.int_gauge(
        "husk_guest_memory_available_bytes",
        "Guest MemAvailable",
        guest.mem_available_bytes,
    )?;
    b.gauge(
        "husk_guest_uptime_seconds",
        "Guest uptime",
        seconds_ms(guest.uptime_ms),
    )?;
    let load = b.gauge_vec(
        "husk_guest_load_average",
        "Guest load average",
        &["minutes"],
    )?;
    for (minutes, value) in [("1", guest.load1), ("5", guest.load5), ("15", guest.load15)] {
        // A guest may send NaN or infinities: the text format takes them,
        // but they mean nothing here.
        load.with_label_values(&[minutes])
            .set(if value.is_finite() { value } else { 0.0 });
    }
    if let Some(cpu) = guest.cpu.as_ref() {
        let times = b.add(CounterVec::new(
            Opts::new(
                "husk_guest_cpu_seconds_total",
                "Guest CPU time by mode (/proc/stat)",
            ),
            &["mode"],
        )?)?;
        for (mode, ms) in [
            ("user", cpu.user_ms),
            ("nice", cpu.nice_ms),
            ("system", cpu.system_ms),
            ("idle", cpu.idle_ms),
            ("iowait", cpu.iowait_ms),
            ("irq", cpu.irq_ms),
            ("softirq", cpu.softirq_ms),
            ("steal", cpu.steal_ms),
        ] {
            times.with_label_values(&[mode]).inc_by(seconds_ms(ms));
        }
    }
    let label = &["container_id"];
    let cpu = b.add(CounterVec::new(
        Opts::new(
            "husk_container_cpu_seconds_total",
            "A container's cgroup CPU time",
        ),
        label,
    )?)?;
    let usage = b.gauge_vec(
        "husk_container_memory_usage_bytes",
        "A container's cgroup memory use",
        label,
    )?;
    let limit = b.gauge_vec(
        "husk_container_memory_limit_bytes",
        "A container's cgroup memory limit",
        label,
    )?;
    let pids = b.gauge_vec(
        "husk_container_pids",
        "Processes in a container's cgroup",
        label,
    )?;
    let ooms = b.counter_vec(
        "husk_container_oom_kills_total",
        "OOM kills in a container's cgroup",
        label,
    )?;
    let io = b.counter_vec(
        "husk_container_io_bytes_total",
        "A container's block I/O",
        &["container_id", "direction"],
    )?;
    // Only containers the host knows: the guest cannot add series.
    for entry in guest
        .containers
        .iter()
        .filter(|c| known.contains(&c.container_id))
    {
        let id = entry.container_id.as_str();
        let Some(stats) = entry.stats.as_ref() else {
            continue;
        };
        if let Some(c) = stats.cpu.as_ref() {
            cpu.with_label_values(&[id])
                .inc_by(c.usage_total_ns as f64 / 1e9);
        }
        if let Some(m) = stats.memory.as_ref() {
            usage.with_label_values(&[id]).set(m.usage_bytes as f64);
            limit.with_label_values(&[id]).set(m.limit_bytes as f64);
            ooms.with_label_values(&[id]).inc_by(m.oom_kills);
        }
        if let Some(p) = stats.pids.as_ref() {
            pids.with_label_values(&[id]).set(p.current as f64);
        }
        if let Some(i) = stats.io.as_ref() {
            io.with_label_values(&[id, "read"]).inc_by(i.read_bytes);
            io.with_label_values(&[id, "write"]).inc_by(i.write_bytes);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_agent_client::agent::{
        ContainerMetrics, GuestCpuTimes, MemoryStats, StatsContainerResponse,
    };
    use protobuf::MessageField;
    use std::time::Duration;

    fn info() -> SandboxInfo {
        SandboxInfo {
            sandbox_id: "pod".into(),
            namespace: "default".into(),
            backend: "qemu".into(),
            accelerator: "tcg".into(),
            shim_pid: 10,
            vmm_pid: 11,
            vcpus: 2,
            memory_mib: 256,
            started_at_unix_s: 1_700_000_000,
            uptime_s: 5,
            containers: vec!["pod".into(), "web".into()],
            pod_name: None,
            pod_namespace: None,
            debug_console: false,
            console_log: "/run/husk/sandboxes/pod/console.log".into(),
            shim_log: "/run/husk/sandboxes/pod/shim.log".into(),
        }
    }

    fn sample<'t>(text: &'t str, series: &str) -> Option<&'t str> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn guest_figures_and_only_known_containers_reach_the_text() {
        let info = info();
        let rpc = RpcLatency::new();
        rpc.observe("CreateContainer", Duration::from_millis(30));
        rpc.observe("WaitProcess", Duration::from_secs(100));
        let container = |id: &str| ContainerMetrics {
            container_id: id.into(),
            stats: MessageField::some(StatsContainerResponse {
                memory: MessageField::some(MemoryStats {
                    usage_bytes: 4096,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let guest = GuestMetrics {
            mem_total_bytes: 123 * 1024 * 1024,
            load1: f64::NAN,
            cpu: MessageField::some(GuestCpuTimes {
                user_ms: 1500,
                ..Default::default()
            }),
            containers: vec![container("web"), container("forged\"} 1\nx")],
            ..Default::default()
        };
        let scrape = Scrape {
            info: &info,
            shim: Some(ProcessStats {
                cpu_seconds: 1.5,
                rss_bytes: 1000,
                pss_bytes: 800,
                open_fds: 12,
                threads: 9,
            }),
            vmm: None,
            guest: Some(guest),
            devices: CountersSnapshot {
                vsock_opened_guest: 3,
                ..Default::default()
            },
            phases: BootPhases {
                agent_ready: Some(Duration::from_millis(1500)),
                ..Default::default()
            },
            rpc: &rpc,
        };
        let text = render(&scrape).unwrap();
        assert_eq!(
            sample(&text, "husk_guest_memory_total_bytes"),
            Some("128974848")
        );
        assert_eq!(sample(&text, "husk_guest_up"), Some("1"));
        assert_eq!(
            sample(&text, "husk_guest_load_average{minutes=\"1\"}"),
            Some("0")
        );
        assert_eq!(
            sample(&text, "husk_guest_cpu_seconds_total{mode=\"user\"}"),
            Some("1.5")
        );
        assert_eq!(
            sample(
                &text,
                "husk_container_memory_usage_bytes{container_id=\"web\"}"
            ),
            Some("4096")
        );
        assert!(!text.contains("forged"), "{text}");
        assert_eq!(
            sample(&text, "husk_process_threads{process=\"shim\"}"),
            Some("9")
        );
        assert!(!text.contains("process=\"vmm\""));
        assert_eq!(
            sample(&text, "husk_vsock_connections_total{initiator=\"guest\"}"),
            Some("3")
        );
        assert_eq!(
            sample(&text, "husk_boot_phase_seconds{phase=\"agent_ready\"}"),
            Some("1.5")
        );
        assert!(!text.contains("phase=\"vm_start\""));
        assert_eq!(
            sample(
                &text,
                "husk_agent_rpc_duration_seconds_count{method=\"CreateContainer\"}"
            ),
            Some("1")
        );
        assert!(!text.contains("WaitProcess"));
        assert!(text.contains("# TYPE husk_agent_rpc_duration_seconds histogram"));
    }

    #[test]
    fn without_an_answering_guest_the_guest_series_are_absent_and_up_is_0() {
        let info = info();
        let rpc = RpcLatency::new();
        let scrape = Scrape {
            info: &info,
            shim: None,
            vmm: None,
            guest: None,
            devices: CountersSnapshot::default(),
            phases: BootPhases::default(),
            rpc: &rpc,
        };
        let text = render(&scrape).unwrap();
        assert_eq!(sample(&text, "husk_guest_up"), Some("0"));
        assert!(!text.contains("husk_guest_memory_total_bytes"));
        assert_eq!(sample(&text, "husk_sandbox_vcpus"), Some("2"));
    }
}
