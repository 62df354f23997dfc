//! HTTP/1.1 framing without I/O: parse a request out of a byte buffer, serialise responses.

use serde::{Deserialize, Serialize};

const MAX_HEADERS: usize = 64;
/// Bytes of request line plus headers we are willing to buffer.
pub const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The token of an `Authorization: Bearer <token>` header.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }
}

/// A parsed request plus what the connection should do after answering it.
#[derive(Debug)]
pub struct Parsed {
    pub request: Request,
    pub consumed: usize,
    pub keep_alive: bool,
}

/// A request head: the request without its body, which is `content_length` bytes after `len`.
#[derive(Debug)]
pub struct Head {
    pub request: Request,
    pub len: usize,
    pub content_length: usize,
    pub keep_alive: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Malformed(String),
    /// Content-Length over the configured limit: answer 413 and close.
    BodyTooLarge(usize),
    HeadTooLarge,
    /// Chunked request bodies are not used by OpenAI clients; answer 411.
    LengthRequired,
}

/// Try to take one complete request off the front of `buf`. `Ok(None)` means "need more bytes".
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Option<Parsed>, ParseError> {
    let Some(head) = parse_head(buf, max_body)? else { return Ok(None) };
    let consumed = head.len + head.content_length;
    if buf.len() < consumed {
        return Ok(None);
    }
    let mut request = head.request;
    request.body = String::from_utf8_lossy(&buf[head.len..consumed]).into_owned();
    Ok(Some(Parsed { request, consumed, keep_alive: head.keep_alive }))
}

/// Try to parse the request head at the front of `buf`; the body need not be there yet.
/// A head may take at most `MAX_HEAD` bytes and `MAX_HEADERS` headers.
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(&buf[..buf.len().min(MAX_HEAD)]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(ParseError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ParseError::Malformed(e.to_string())),
    };
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect();
    let find = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if find("transfer-encoding").is_some_and(|v| !v.eq_ignore_ascii_case("identity")) {
        return Err(ParseError::LengthRequired);
    }
    let length = match find("content-length") {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| ParseError::Malformed(format!("bad content-length {v:?}")))?,
    };
    if length > max_body {
        return Err(ParseError::BodyTooLarge(length));
    }
    let connection = find("connection").unwrap_or("").to_ascii_lowercase();
    let keep_alive = match req.version {
        Some(0) => connection.contains("keep-alive"),
        _ => !connection.contains("close"),
    };
    let request = Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        headers,
        body: String::new(),
    };
    Ok(Some(Head { request, len: head_len, content_length: length, keep_alive }))
}

/// A complete response with a known body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Self {
        Response { status, headers: vec![("content-type".into(), "application/json".into())], body }
    }

    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = status_line(self.status);
        for (n, v) in &self.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n", self.body.len()));
        head.push_str(connection(keep_alive));
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

fn status_line(status: u16) -> String {
    let reason = match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    format!("HTTP/1.1 {status} {reason}\r\n")
}

fn connection(keep_alive: bool) -> &'static str {
    if keep_alive {
        "connection: keep-alive\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    }
}

/// Head of a server-sent-events stream; the body follows in chunked encoding.
pub fn sse_head(keep_alive: bool) -> Vec<u8> {
    let mut head = status_line(200);
    head.push_str("content-type: text/event-stream\r\ncache-control: no-cache\r\n");
    head.push_str("transfer-encoding: chunked\r\n");
    head.push_str(connection(keep_alive));
    head.into_bytes()
}

pub fn chunk(data: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The `101 Switching Protocols` answer to a WebSocket upgrade request.
pub fn websocket_accept(req: &Request) -> Option<Vec<u8>> {
    let key = req.header("sec-websocket-key")?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "{}upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n",
        status_line(101)
    );
    Some(head.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_with_body_and_leaves_the_rest() {
        let raw = b"POST /v1/x HTTP/1.1\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}GET";
        let p = parse_request(raw, 10).unwrap().unwrap();
        assert_eq!(p.request.method, "POST");
        assert_eq!(p.request.header("x-a"), Some("b"));
        assert_eq!(p.request.body, "{}");
        assert_eq!(p.consumed, raw.len() - 3);
        assert!(p.keep_alive);
    }

    #[test]
    fn waits_for_the_whole_body() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}";
        assert!(parse_request(raw, 10).unwrap().is_none());
    }

    #[test]
    fn refuses_oversized_bodies_before_reading_them() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse_request(raw, 10).unwrap_err(), ParseError::BodyTooLarge(11));
    }

    #[test]
    fn connection_close_and_http10() {
        let raw = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(!parse_request(raw, 10).unwrap().unwrap().keep_alive);
        let raw = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse_request(raw, 10).unwrap().unwrap().keep_alive);
    }

    #[test]
    fn a_head_is_there_before_its_body_and_is_at_most_max_head() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}";
        let head = parse_head(raw, 10).unwrap().unwrap();
        assert_eq!((head.len, head.content_length, head.request.body.as_str()), (raw.len() - 2, 5, ""));
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD - 1, b'a');
        assert!(parse_head(&long, 10).unwrap().is_none(), "one byte short of the limit: wait");
        long.push(b'a');
        assert_eq!(parse_head(&long, 10).unwrap_err(), ParseError::HeadTooLarge);
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&long, 10).unwrap_err(), ParseError::HeadTooLarge, "a complete head past the limit");
    }

    #[test]
    fn chunk_framing() {
        assert_eq!(chunk("hello"), b"5\r\nhello\r\n");
    }
}
