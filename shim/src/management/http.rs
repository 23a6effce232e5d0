//! The management socket's HTTP/1.1, by hand: one `GET` (or `HEAD`) per
//! connection, answered with `Connection: close`. The request head is read
//! up to [`MAX_REQUEST_HEAD_BYTES`]; anything else is refused with the
//! status that names why. Clients are root (the socket is 0600), so this
//! is small rather than general.

/// The most bytes a request head may take (the request line and headers).
pub const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// A request the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query.
    pub path: String,
}

/// Why a request head was refused, with the status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request line {0:?}")]
    Malformed(String),
    #[error("method {0} is not allowed (GET or HEAD)")]
    Method(String),
    #[error("the request head exceeds {MAX_REQUEST_HEAD_BYTES} bytes")]
    TooLarge,
}

impl RequestError {
    pub fn status(&self) -> Status {
        match self {
            RequestError::Malformed(_) => Status::BadRequest,
            RequestError::Method(_) => Status::MethodNotAllowed,
            RequestError::TooLarge => Status::HeadTooLarge,
        }
    }
}

/// The statuses the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    InternalError,
    Unavailable,
}

impl Status {
    pub fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::Forbidden => "403 Forbidden",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::InternalError => "500 Internal Server Error",
            Status::Unavailable => "503 Service Unavailable",
        }
    }
}

/// The end of the head in `buffer`, if it arrived (`\r\n\r\n`, or `\n\n`
/// from a lenient client).
pub fn head_end(buffer: &[u8]) -> Option<usize> {
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses a request head's first line.
pub fn parse_request(head: &[u8]) -> Result<Request, RequestError> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let line = line.trim_end_matches('\r');
    let shown = || line.chars().take(80).collect::<String>();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(shown()));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(RequestError::Malformed(shown()));
    }
    if method != "GET" && method != "HEAD" {
        return Err(RequestError::Method(method.chars().take(16).collect()));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// A whole response; `head_only` leaves the body out (HEAD).
pub fn response(status: Status, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status.line(),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// Splits a response into its status code and body (the client side, for
/// `husk-ctl`): the head must end and the status line must be HTTP/1.x.
pub fn parse_response(bytes: &[u8]) -> Result<(u16, &[u8]), String> {
    let end = head_end(bytes).ok_or("the response has no complete head")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => Ok((code, &bytes[end..])),
        _ => Err(format!("not an HTTP/1 status line: {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_with_a_query_names_its_path() {
        let request = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/metrics");
        assert_eq!(
            parse_request(b"HEAD /info HTTP/1.0\r\n\r\n").unwrap().path,
            "/info"
        );
    }

    #[test]
    fn other_methods_and_malformed_lines_are_refused_with_their_status() {
        let error = parse_request(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(error.status(), Status::MethodNotAllowed);
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n",
            b"GET / SPDY/3\r\n",
            b"GET / HTTP/1.1 extra\r\n",
        ] {
            assert_eq!(
                parse_request(bad).unwrap_err().status(),
                Status::BadRequest,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn a_response_round_trips_through_the_client_parser() {
        let bytes = response(Status::NotFound, "text/plain", b"no such path\n", false);
        let (code, body) = parse_response(&bytes).unwrap();
        assert_eq!(code, 404);
        assert_eq!(body, b"no such path\n");
        let head = response(Status::Ok, "text/plain", b"abc", true);
        assert!(String::from_utf8_lossy(&head).contains("Content-Length: 3"));
        assert_eq!(parse_response(&head).unwrap().1, b"");
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }
}
