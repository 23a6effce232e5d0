//! The pod's management socket: HTTP/1.1 on a Unix socket only root can
//! reach, served by the shim for operators (`husk-ctl list`, `metrics`,
//! `monitor`). `GET /info` answers the sandbox as JSON ([`SandboxInfo`]),
//! `GET /metrics` its Prometheus text ([`render`]).
//!
//! Where: `<VM directory>/shim.sock` ([`crate::paths::SandboxPaths::management_socket`]),
//! not `<sandbox directory>/shim.sock`. A Unix socket address holds 107
//! bytes; under the default run root the sandbox directory of a 76-byte id
//! would just fit, but any longer `HUSK_RUN_DIR` would not, while the VM
//! directory's length never depends on the id. `husk-ctl` finds a pod's
//! socket from its id by the same digest that names the VM directory.
//!
//! Who: the socket is mode 0600 in a 0700 directory, and a connected peer
//! whose uid is neither root nor the shim's own is answered 403 as well.
//! Bounded: at most [`MAX_CLIENTS`] connections at once, each one request
//! head of at most [`http::MAX_REQUEST_HEAD_BYTES`] within
//! [`REQUEST_TIMEOUT`].

pub mod http;
pub mod info;
pub mod procfs;
pub mod render;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

pub use info::SandboxInfo;
pub use render::{render, RpcLatency, Scrape};

use http::{Request, Status};

/// The socket's file name in the VM directory.
pub const SOCKET_NAME: &str = "shim.sock";
/// The socket's mode: root only.
pub const SOCKET_MODE: u32 = 0o600;
/// Connections served at once; more wait for a slot.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request head, and the shim to
/// answer it (a scrape asks the guest; the agent's deadline is shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the socket serves.
#[async_trait]
pub trait Endpoint: Send + Sync {
    async fn info(&self) -> Result<SandboxInfo, String>;
    async fn metrics(&self) -> Result<String, String>;
}

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the management socket {path}: {source}")]
pub struct ServeError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The running server; dropping it stops it and removes the socket.
pub struct ManagementServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ManagementServer {
    /// Binds `path` (replacing a stale socket), restricts it to root and
    /// serves `endpoint` from a task of the current runtime.
    pub fn start(path: &Path, endpoint: Arc<dyn Endpoint>) -> Result<Self, ServeError> {
        let fail = |source| ServeError {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(fail(error)),
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(fail)?;
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "management socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(stream, endpoint)).await;
                });
            }
        });
        Ok(Self {
            path: path.to_owned(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ManagementServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a peer may talk to the socket: root or the shim's own user.
fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .map(|cred| cred.uid() == 0 || cred.uid() == own)
        .unwrap_or(false)
}

async fn read_head(stream: &mut UnixStream) -> Result<Vec<u8>, http::RequestError> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = http::head_end(&buffer) {
            buffer.truncate(end);
            return Ok(buffer);
        }
        if buffer.len() >= http::MAX_REQUEST_HEAD_BYTES {
            return Err(http::RequestError::TooLarge);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(http::RequestError::Malformed("end of stream".into())),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve(mut stream: UnixStream, endpoint: Arc<dyn Endpoint>) {
    let reply = if !peer_allowed(&stream) {
        http::response(Status::Forbidden, "text/plain", b"root only\n", false)
    } else {
        match read_head(&mut stream)
            .await
            .and_then(|head| http::parse_request(&head))
        {
            Ok(request) => answer(&request, endpoint.as_ref()).await,
            Err(error) => http::response(
                error.status(),
                "text/plain",
                format!("{error}\n").as_bytes(),
                false,
            ),
        }
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}

async fn answer(request: &Request, endpoint: &dyn Endpoint) -> Vec<u8> {
    let head_only = request.method == "HEAD";
    let failed = |error: String| {
        http::response(
            Status::InternalError,
            "text/plain",
            format!("{error}\n").as_bytes(),
            head_only,
        )
    };
    match request.path.as_str() {
        "/info" => match endpoint.info().await {
            Ok(info) => match serde_json::to_vec_pretty(&info) {
                Ok(json) => http::response(Status::Ok, "application/json", &json, head_only),
                Err(error) => failed(error.to_string()),
            },
            Err(error) => http::response(
                Status::Unavailable,
                "text/plain",
                format!("{error}\n").as_bytes(),
                head_only,
            ),
        },
        "/metrics" => match endpoint.metrics().await {
            Ok(text) => http::response(
                Status::Ok,
                "text/plain; version=0.0.4; charset=utf-8",
                text.as_bytes(),
                head_only,
            ),
            Err(error) => failed(error),
        },
        other => http::response(
            Status::NotFound,
            "text/plain",
            format!("no such path {other:?}: /info or /metrics\n").as_bytes(),
            head_only,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    struct Fixed;

    #[async_trait]
    impl Endpoint for Fixed {
        async fn info(&self) -> Result<SandboxInfo, String> {
            Err("no sandbox".into())
        }
        async fn metrics(&self) -> Result<String, String> {
            Ok("husk_test 1\n".into())
        }
    }

    async fn get(path: &Path, request: &[u8]) -> (u16, String) {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).await.unwrap();
        let (code, body) = http::parse_response(&bytes).unwrap();
        (code, String::from_utf8_lossy(body).into_owned())
    }

    #[tokio::test]
    async fn the_socket_is_root_only_and_answers_each_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_NAME);
        std::fs::write(&path, b"stale").unwrap();
        let server = ManagementServer::start(&path, Arc::new(Fixed)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        assert_eq!(
            get(&path, b"GET /metrics HTTP/1.1\r\n\r\n").await,
            (200, "husk_test 1\n".into())
        );
        assert_eq!(
            get(&path, b"GET /info HTTP/1.1\r\n\r\n").await,
            (503, "no sandbox\n".into())
        );
        assert_eq!(get(&path, b"GET /nope HTTP/1.1\r\n\r\n").await.0, 404);
        assert_eq!(get(&path, b"DELETE /info HTTP/1.1\r\n\r\n").await.0, 405);
        // A head that never ends within the limit (all of it read, so the
        // answer is not lost to a reset).
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(http::MAX_REQUEST_HEAD_BYTES, b'a');
        assert_eq!(get(&path, &huge).await.0, 431);
        drop(server);
        assert!(!path.exists(), "the socket outlived its server");
    }
}
