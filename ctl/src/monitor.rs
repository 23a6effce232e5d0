//! `husk-ctl monitor`: one Prometheus endpoint for the node, the
//! kata-monitor model. Each scrape of `/metrics` lists the sandboxes,
//! reads each one's `/info` and `/metrics` over its management socket (N
//! sockets for N pods, nothing else), and merges the texts: every series
//! gets the labels `sandbox_id` and, where CRI's annotations named them,
//! `pod_name` and `pod_namespace`; each metric family's HELP and TYPE
//! appear once. `husk_monitor_sandbox_up{sandbox_id}` says which sockets
//! answered. Requests are served one at a time, each bounded by
//! [`REQUEST_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use husk_shim::management::http;

use crate::sandboxes;

/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
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
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    stream.write_all(&reply)?;
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
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(error) = handle(stream, root) {
                    eprintln!("husk-ctl monitor: a request failed: {error:#}");
                }
            }
            Err(error) => eprintln!("husk-ctl monitor: accept failed: {error}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
