//! `agent_responses`: what a hostile guest agent can answer the shim.
//!
//! The first byte picks an agent API method (low four bits) and a mode:
//!
//! * decode (bit 4 clear): the rest is the method's protobuf response
//!   (`husk_protocols::agent`), decoded as the client does, then run
//!   through what the shim makes of it: statistics become containerd's
//!   cgroup v1 `Metrics` (`husk_shim::metrics`), a WaitProcess answer an
//!   `Exit` and its timestamp (`husk_shim::pod::process`), events their
//!   sequence and OOM ids, process lists their pids;
//! * wire (bit 4 set): a real `husk_agent_client::AgentClient` connects to
//!   a fake agent on a Unix socket, which answers `Check` properly and
//!   then answers the method's call with the rest, either as the body of
//!   one ttrpc response frame (bit 5 clear: a `ttrpc.Response` message) or
//!   written raw (bit 5 set: frame headers and all), and closes.
//!
//! Oracle: no panic; a decoded message re-encodes to one that decodes
//! equal; the conversions keep every figure and give a timestamp whose
//! nanoseconds are in range and add up to the guest's time; over the
//! wire, a call ends (with an answer or an error) once the agent has
//! closed its side, instead of hanging.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use husk_agent_client::agent::*;
use husk_agent_client::{AgentClient, ClientError, Endpoint};
use husk_shim::metrics::cgroup_v1_metrics;
use husk_shim::pod::process::Exit;
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The methods whose answers the shim uses.
const METHODS: usize = 10;
/// ttrpc frame header length and response type (ttrpc's wire format).
const FRAME_HEADER_LEN: usize = 10;
const FRAME_RESPONSE: u8 = 2;

/// Runs one input.
pub fn agent_responses(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = usize::from(selector & 0xf) % METHODS;
    if selector & 0x10 == 0 {
        decode(method, rest);
    } else {
        wire(method, rest, selector & 0x20 != 0);
    }
}

/// Decodes `bytes` as `M` and checks the round trip.
fn round_trip<M: Message + PartialEq>(bytes: &[u8]) -> Option<M> {
    let message = M::parse_from_bytes(bytes).ok()?;
    let encoded = message
        .write_to_bytes()
        .expect("a decoded message must encode");
    let again = M::parse_from_bytes(&encoded).expect("a re-encoded message must decode");
    assert!(again == message, "the message changed in a round trip");
    Some(message)
}

fn decode(method: usize, bytes: &[u8]) {
    match method {
        0 => {
            if let Some(health) = round_trip::<HealthCheckResponse>(bytes) {
                let _ = health.status.value();
            }
        }
        1 => {
            round_trip::<StartContainerResponse>(bytes);
        }
        2 => {
            if let Some(list) = round_trip::<ListProcessesResponse>(bytes) {
                pids(&list.processes);
            }
        }
        3 => {
            if let Some(stats) = round_trip::<StatsContainerResponse>(bytes) {
                metrics(&stats);
            }
        }
        4 => {
            round_trip::<ExecProcessResponse>(bytes);
        }
        5 => {
            if let Some(wait) = round_trip::<WaitProcessResponse>(bytes) {
                exit(wait.exit_status, wait.exited_at_unix_ns);
            }
        }
        6 => {
            if let Some(events) = round_trip::<GetEventsResponse>(bytes) {
                events_seen(&events.events);
            }
        }
        7 => {
            round_trip::<GuestDetails>(bytes);
        }
        8 => {
            round_trip::<ReadLogResponse>(bytes);
        }
        _ => {
            round_trip::<Empty>(bytes);
        }
    }
}

/// The pids `Pids` reports.
fn pids(processes: &[ProcessInfo]) {
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), processes.len());
}

/// The statistics as containerd gets them.
fn metrics(stats: &StatsContainerResponse) {
    let metrics = cgroup_v1_metrics(stats);
    if let Some(cpu) = stats.cpu.as_ref() {
        assert_eq!(metrics.cpu.usage.total, cpu.usage_total_ns);
        assert_eq!(metrics.cpu.usage.user, cpu.usage_user_ns);
        assert_eq!(metrics.cpu.usage.kernel, cpu.usage_system_ns);
        assert_eq!(metrics.cpu.throttling.throttled_time, cpu.throttled_time_ns);
    }
    if let Some(memory) = stats.memory.as_ref() {
        assert_eq!(metrics.memory.usage.usage, memory.usage_bytes);
        assert_eq!(metrics.memory.usage.limit, memory.limit_bytes);
        assert_eq!(metrics.memory.rss, memory.rss_bytes);
    }
    if let Some(pids) = stats.pids.as_ref() {
        assert_eq!(metrics.pids.current, pids.current);
    }
    if let Some(io) = stats.io.as_ref() {
        let entries = &metrics.blkio.io_service_bytes_recursive;
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].value, io.read_bytes);
        assert_eq!(entries[1].value, io.write_bytes);
    }
    let encoded = metrics.write_to_bytes().expect("the metrics must encode");
    let decoded = containerd_shim_protos::cgroups::metrics::Metrics::parse_from_bytes(&encoded)
        .expect("the metrics must decode");
    assert!(decoded == metrics, "the metrics changed on the wire");
}

/// The exit the shim records and publishes.
fn exit(status: i32, at_unix_ns: i64) {
    let exit = Exit {
        status: status as u32,
        at_unix_ns,
    };
    let timestamp = exit.timestamp();
    assert!(
        (0..1_000_000_000).contains(&timestamp.nanos),
        "timestamp nanos {} for {at_unix_ns}",
        timestamp.nanos
    );
    assert_eq!(
        i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos),
        i128::from(at_unix_ns),
        "the timestamp is not the guest's time"
    );
}

/// What the event forwarder takes from a batch: the next sequence to ask
/// after, and the containers it is told ran out of memory.
fn events_seen(events: &[Event]) {
    let mut after = 0u64;
    let mut ooms = Vec::new();
    for event in events {
        after = after.max(event.sequence);
        if event.has_oom() {
            ooms.push(event.oom().container_id.clone());
        }
    }
    assert!(events.iter().all(|e| e.sequence <= after));
    assert!(ooms.len() <= events.len());
}

fn scratch_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| crate::process_dir("fuzz-agent")).clone()
}

/// Reads one ttrpc frame; returns its stream id, or None at end of stream.
async fn read_frame(stream: &mut tokio::net::UnixStream) -> Option<u32> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let stream_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some(stream_id)
}

fn frame(stream_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.push(FRAME_RESPONSE);
    out.push(0);
    out.extend_from_slice(body);
    out
}

fn serving() -> Vec<u8> {
    let mut health = HealthCheckResponse::new();
    health.status = health_check_response::ServingStatus::SERVING.into();
    let mut response = ttrpc::proto::Response::new();
    response.payload = health.write_to_bytes().expect("encode the health answer");
    response
        .write_to_bytes()
        .expect("encode the ttrpc response")
}

/// A fake agent: answers `Check`, answers the next call with `answer`
/// (framed unless `raw`), and closes.
async fn fake_agent(listener: tokio::net::UnixListener, answer: Vec<u8>, raw: bool) {
    let Ok((mut stream, _)) = listener.accept().await else {
        return;
    };
    let Some(check) = read_frame(&mut stream).await else {
        return;
    };
    if stream.write_all(&frame(check, &serving())).await.is_err() {
        return;
    }
    let Some(call) = read_frame(&mut stream).await else {
        return;
    };
    let reply = if raw { answer } else { frame(call, &answer) };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
    // Drain until the client goes, so it is not reset mid-answer.
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Calls `method` and applies the shim's conversion to its answer.
async fn call(client: &AgentClient, method: usize) -> Result<(), ClientError> {
    match method {
        0 => client.check().await.map(drop),
        1 => client.start_container("c1").await.map(drop),
        2 => client.list_processes("c1").await.map(|p| pids(&p)),
        3 => client.stats_container("c1").await.map(|s| metrics(&s)),
        4 => client
            .exec_process(ExecProcessRequest::new())
            .await
            .map(drop),
        5 => client
            .wait_process("c1", "e1")
            .await
            .map(|s| exit(s.status, s.exited_at_unix_ns)),
        6 => client.get_events(0, 0).await.map(|e| events_seen(&e)),
        7 => client.guest_details().await.map(drop),
        8 => client.read_log(0, 4096).await.map(drop),
        _ => client.pause_container("c1").await,
    }
}

fn wire(method: usize, answer: &[u8], raw: bool) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let api_socket = scratch_dir().join(format!("a{n}.sock"));
    let endpoint = Endpoint::Unix {
        api_socket: api_socket.clone(),
        stdio_socket: scratch_dir().join("stdio.sock"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    runtime.block_on(async {
        let listener =
            tokio::net::UnixListener::bind(&api_socket).expect("cannot bind the fake agent");
        let agent = tokio::spawn(fake_agent(listener, answer.to_vec(), raw));
        let client = AgentClient::connect(endpoint, Duration::from_secs(5))
            .await
            .expect("the fake agent answers Check");
        let outcome = tokio::time::timeout(Duration::from_secs(5), call(&client, method))
            .await
            .expect("the call hung after the agent closed its side");
        if let Err(error) = outcome {
            let _ = error.code();
            let _ = error.to_string();
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    });
    drop(runtime);
    let _ = std::fs::remove_file(&api_socket);
}
