//! `husk-ctl monitor`: one Prometheus endpoint for the node, the
//! kata-monitor model. Each scrape of `/metrics` lists the sandboxes,
//! reads each one's `/info` and `/metrics` over its management socket (N
//! sockets for N pods, nothing else), and merges the texts: every series
//! gets the labels `sandbox_id` and, where CRI's annotations named them,
//! `pod_name` and `pod_namespace`; each metric family's HELP and TYPE
//! appear once. `husk_monitor_sandbox_up{sandbox_id}` says which sockets
//! answered. Each request is served on a thread of its own, at most
//! [`MAX_CONCURRENT_REQUESTS`] at once (more are answered 503 at once),
//! and a client has [`REQUEST_TIMEOUT`] in all to send its request and as
//! long again to read the response, so a slow client holds one slot for a
//! bounded time and never the others.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_shim::management::http;

use crate::sandboxes;

/// How long a client may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most requests served at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 16;

/// One metric family of a text exposition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    pub kind: Option<String>,
    pub samples: Vec<String>,
}

/// The sample's metric name (up to its labels or value).
fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// Whether sample `name` belongs to family `family` (a histogram's or
/// summary's `_bucket`, `_sum`, `_count` do).
fn belongs(name: &str, family: &str) -> bool {
    name == family
        || name.strip_prefix(family).is_some_and(|rest| {
            matches!(rest, "_bucket" | "_sum" | "_count" | "_total" | "_created")
        })
}

/// Splits a text exposition into its families, in order.
pub fn parse_families(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    let family_at = |families: &mut Vec<Family>, name: &str| -> usize {
        match families.iter().rposition(|f| f.name == name) {
            Some(i) => i,
            None => {
                families.push(Family {
                    name: name.to_owned(),
                    ..Default::default()
                });
                families.len() - 1
            }
        }
    };
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), rest) => {
                    let i = family_at(&mut families, name);
                    families[i].help = Some(rest.unwrap_or_default().to_owned());
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    let i = family_at(&mut families, name);
                    families[i].kind = Some(kind.to_owned());
                }
                _ => {}
            }
            continue;
        }
        let name = sample_name(line);
        let i = match families.last() {
            Some(last) if belongs(name, &last.name) => families.len() - 1,
            _ => family_at(&mut families, name),
        };
        families[i].samples.push(line.to_owned());
    }
    families
}

/// A label value in the text format's escaping.
pub fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `labels` (already `k="v"` pairs joined by commas) put first into a
/// sample line's label set.
pub fn with_labels(sample: &str, labels: &str) -> String {
    let name = sample_name(sample);
    let rest = &sample[name.len()..];
    match rest.strip_prefix('{') {
        Some(inner) if inner.starts_with('}') => format!("{name}{{{labels}{inner}"),
        Some(inner) => format!("{name}{{{labels},{inner}"),
        None => format!("{name}{{{labels}}}{rest}"),
    }
}

/// The labels a sandbox's series get.
pub fn sandbox_labels(id: &str, pod_name: Option<&str>, pod_namespace: Option<&str>) -> String {
    let mut labels = vec![format!("sandbox_id=\"{}\"", escape_label_value(id))];
    if let Some(name) = pod_name {
        labels.push(format!("pod_name=\"{}\"", escape_label_value(name)));
    }
    if let Some(namespace) = pod_namespace {
        labels.push(format!(
            "pod_namespace=\"{}\"",
            escape_label_value(namespace)
        ));
    }
    labels.join(",")
}

/// Merges per-sandbox expositions (`(labels, text)`) into one.
pub fn merge(sources: &[(String, String)]) -> String {
    let mut merged: Vec<Family> = Vec::new();
    for (labels, text) in sources {
        for family in parse_families(text) {
            let index = match merged.iter().position(|f| f.name == family.name) {
                Some(i) => i,
                None => {
                    merged.push(Family {
                        name: family.name.clone(),
                        help: family.help.clone(),
                        kind: family.kind.clone(),
                        samples: Vec::new(),
                    });
                    merged.len() - 1
                }
            };
            merged[index]
                .samples
                .extend(family.samples.iter().map(|s| with_labels(s, labels)));
        }
    }
    let mut out = String::new();
    for family in merged {
        if let Some(help) = &family.help {
            out.push_str(&format!("# HELP {} {help}\n", family.name));
        }
        if let Some(kind) = &family.kind {
            out.push_str(&format!("# TYPE {} {kind}\n", family.name));
        }
        for sample in &family.samples {
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// One scrape of the node: every sandbox's metrics, labelled, merged.
pub fn scrape(root: &Path) -> Result<String> {
    let mut sources = Vec::new();
    let mut up = String::from(
        "# HELP husk_monitor_sandbox_up Whether the sandbox's management socket answered this scrape\n# TYPE husk_monitor_sandbox_up gauge\n",
    );
    for found in sandboxes::find_all(root)? {
        let answered = sandboxes::info(&found).and_then(|info| {
            let text = sandboxes::metrics(&found)?;
            Ok((info, text))
        });
        let labels = match &answered {
            Ok((info, _)) => sandbox_labels(
                &found.id,
                info.pod_name.as_deref(),
                info.pod_namespace.as_deref(),
            ),
            Err(_) => sandbox_labels(&found.id, None, None),
        };
        up.push_str(&format!(
            "husk_monitor_sandbox_up{{{labels}}} {}\n",
            u8::from(answered.is_ok())
        ));
        if let Ok((_, text)) = answered {
            sources.push((labels, text));
        }
    }
    Ok(format!("{}{up}", merge(&sources)))
}

fn handle(mut stream: TcpStream, root: &Path) -> Result<()> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let reply = loop {
        if http::head_end(&head).is_some() {
            break match http::parse_request(&head) {
                Ok(request) if request.path == "/metrics" => match scrape(root) {
                    Ok(text) => http::response(
                        http::Status::Ok,
                        "text/plain; version=0.0.4; charset=utf-8",
                        text.as_bytes(),
                        request.method == "HEAD",
                    ),
                    Err(error) => http::response(
                        http::Status::InternalError,
                        "text/plain",
                        format!("{error:#}\n").as_bytes(),
                        false,
                    ),
                },
                Ok(request) => http::response(
                    http::Status::NotFound,
                    "text/plain",
                    format!("no such path {:?}: /metrics\n", request.path).as_bytes(),
                    false,
                ),
                Err(error) => http::response(
                    error.status(),
                    "text/plain",
                    format!("{error}\n").as_bytes(),
                    false,
                ),
            };
        }
        if head.len() >= http::MAX_REQUEST_HEAD_BYTES {
            let error = http::RequestError::TooLarge;
            break http::response(
                error.status(),
                "text/plain",
                format!("{error}\n").as_bytes(),
                false,
            );
        }
        // The whole request within REQUEST_TIMEOUT, however it trickles.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!(
                "the client did not send its request within {} s",
                REQUEST_TIMEOUT.as_secs()
            );
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    write_all_within(&mut stream, &reply, Instant::now() + REQUEST_TIMEOUT)
}

/// Writes `bytes` whole by `deadline`, however slowly the client reads:
/// each write waits at most what is left.
fn write_all_within(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!(
                "the client did not read the response within {} s",
                REQUEST_TIMEOUT.as_secs()
            );
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => anyhow::bail!("the client closed the connection"),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Serves `/metrics` on `listen` until killed.
pub fn serve(listen: SocketAddr, root: &Path) -> Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "husk-ctl monitor: serving http://{}/metrics for the sandboxes under {}",
        listener.local_addr()?,
        root.display()
    );
    serve_on(listener, root.to_owned());
    Ok(())
}

/// Releases a request's slot when its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts on `listener` forever, one thread per request.
fn serve_on(listener: TcpListener, root: PathBuf) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("husk-ctl monitor: accept failed: {error}");
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT_REQUESTS {
            busy.fetch_sub(1, Ordering::SeqCst);
            // A short answer, written with a short patience: the accept
            // loop never waits on a client.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(&http::response(
                http::Status::Unavailable,
                "text/plain",
                format!("{MAX_CONCURRENT_REQUESTS} requests are being served; try again\n")
                    .as_bytes(),
                false,
            ));
            continue;
        }
        let slot = Slot(busy.clone());
        let root = root.clone();
        let spawned = std::thread::Builder::new()
            .name("monitor-request".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(error) = handle(stream, &root) {
                    eprintln!("husk-ctl monitor: a request failed: {error:#}");
                }
            });
        if let Err(error) = spawned {
            eprintln!("husk-ctl monitor: cannot start a request thread: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_metrics(address: SocketAddr) -> String {
        let mut client = TcpStream::connect(address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        reply
    }

    #[test]
    fn a_silent_client_does_not_hold_up_other_scrapes_and_too_many_get_503() {
        let root = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let served = root.path().to_owned();
        std::thread::spawn(move || serve_on(listener, served));

        // Silent clients take every slot but one; a scrape is still served.
        let silent: Vec<TcpStream> = (0..MAX_CONCURRENT_REQUESTS - 1)
            .map(|_| TcpStream::connect(address).unwrap())
            .collect();
        let started = Instant::now();
        let reply = get_metrics(address);
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(
            started.elapsed() < REQUEST_TIMEOUT,
            "the scrape waited for the silent clients"
        );

        // All slots held: the next client is told so at once.
        let mut held = silent;
        held.push(TcpStream::connect(address).unwrap());
        // Let the accept loop take the last silent client first.
        std::thread::sleep(Duration::from_millis(200));
        // The answer comes at accept, before the request is read.
        let mut client = TcpStream::connect(address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut refused = String::new();
        client.read_to_string(&mut refused).unwrap();
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        drop(held);
    }

    const POD: &str = "# HELP husk_guest_up Whether\n# TYPE husk_guest_up gauge\nhusk_guest_up 1\n\
        # HELP husk_rpc_seconds Latency\n# TYPE husk_rpc_seconds histogram\n\
        husk_rpc_seconds_bucket{method=\"Check\",le=\"0.1\"} 2\nhusk_rpc_seconds_sum{method=\"Check\"} 0.01\n\
        husk_rpc_seconds_count{method=\"Check\"} 2\n";

    #[test]
    fn histogram_samples_stay_in_their_family() {
        let families = parse_families(POD);
        assert_eq!(families.len(), 2);
        assert_eq!(families[1].name, "husk_rpc_seconds");
        assert_eq!(families[1].kind.as_deref(), Some("histogram"));
        assert_eq!(families[1].samples.len(), 3);
    }

    #[test]
    fn two_pods_merge_into_one_family_each_with_distinct_labels() {
        let a = sandbox_labels("a", Some("web"), Some("default"));
        let b = sandbox_labels("b", None, None);
        let text = merge(&[(a, POD.to_owned()), (b, POD.to_owned())]);
        assert_eq!(text.matches("# TYPE husk_guest_up gauge").count(), 1);
        assert!(text.contains(
            "husk_guest_up{sandbox_id=\"a\",pod_name=\"web\",pod_namespace=\"default\"} 1\n"
        ));
        assert!(text.contains("husk_guest_up{sandbox_id=\"b\"} 1\n"));
        assert!(text.contains("husk_rpc_seconds_count{sandbox_id=\"b\",method=\"Check\"} 2\n"));
        // The histogram's samples follow its one TYPE line.
        let type_at = text.find("# TYPE husk_rpc_seconds").unwrap();
        assert!(text.rfind("husk_rpc_seconds_bucket").unwrap() > type_at);
    }

    #[test]
    fn an_annotation_cannot_break_the_text_format() {
        let labels = sandbox_labels("p", Some("evil\"} 1\nforged_metric 1\n\\"), None);
        let line = with_labels("husk_guest_up 1", &labels);
        assert_eq!(line.lines().count(), 1, "{line}");
        assert_eq!(
            line,
            "husk_guest_up{sandbox_id=\"p\",pod_name=\"evil\\\"} 1\\nforged_metric 1\\n\\\\\"} 1"
        );
        assert_eq!(with_labels("x{} 2", "a=\"b\""), "x{a=\"b\"} 2");
    }
}
