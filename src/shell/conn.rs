//! Client sockets on the one listener: plain HTTP requests (OpenAI API, hooks) and, after an
//! upgrade on `/bridge`, the WebSocket of a channel.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use serde::{Deserialize, Serialize};
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::Message;

use crate::wire::bridge::{self, FromChannel, ToChannel};
use crate::wire::http::{self, ParseError, Request, Response};
use crate::wire::openai::ApiError;

/// What reading from an HTTP connection produced.
pub enum HttpEvent {
    Request(Request),
    /// A WebSocket upgrade on the bridge path; the rest of the buffer belongs to it.
    Upgrade(Request, Vec<u8>),
    Closed,
}

pub struct HttpConn {
    pub stream: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// A request was handed to the engine and its answer is not complete yet.
    busy: bool,
    /// Last time a request arrived or an answer completed.
    pub last_active: Instant,
    keep_alive: bool,
    /// Close once `outbuf` is written.
    closing: bool,
    /// Our side is shut down; unread request bytes are discarded until the client closes, so
    /// that closing with unread data (a TCP reset) cannot destroy the error response.
    lingering: usize,
    eof: bool,
}

/// Bytes discarded while lingering before giving up on a client that keeps sending.
const LINGER_LIMIT: usize = 64 << 20;

impl HttpConn {
    pub fn new(stream: TcpStream) -> Self {
        HttpConn {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            busy: false,
            last_active: Instant::now(),
            keep_alive: true,
            closing: false,
            lingering: 0,
            eof: false,
        }
    }

    /// Read what is there, then take the next request off the buffer if we may.
    pub fn on_readable(&mut self, max_body: usize) -> Vec<HttpEvent> {
        let mut buf = [0u8; 16 * 1024];
        // Stop buffering if a client pipelines more than one request's worth while we work.
        while !self.eof && self.inbuf.len() <= max_body + http::MAX_HEAD {
            match self.stream.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) if self.closing => self.lingering += n,
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.eof = true,
            }
        }
        let mut events: Vec<HttpEvent> = self.next_request(max_body).into_iter().collect();
        let gone = self.eof || self.lingering >= LINGER_LIMIT;
        if gone && !matches!(events.first(), Some(HttpEvent::Upgrade(..))) {
            events.push(HttpEvent::Closed);
        }
        events
    }

    /// After an answer is complete, a pipelined request may already be buffered.
    pub fn next_request(&mut self, max_body: usize) -> Option<HttpEvent> {
        if self.busy || self.closing || self.inbuf.is_empty() {
            return None;
        }
        match http::parse_request(&self.inbuf, max_body) {
            Ok(None) => None,
            Ok(Some(parsed)) => {
                self.inbuf.drain(..parsed.consumed);
                self.keep_alive = parsed.keep_alive;
                let req = parsed.request;
                if req.is_websocket_upgrade() && req.method == "GET" && req.path == bridge::PATH {
                    return Some(HttpEvent::Upgrade(req, std::mem::take(&mut self.inbuf)));
                }
                self.busy = true;
                self.last_active = Instant::now();
                Some(HttpEvent::Request(req))
            }
            Err(e) => {
                // Framing errors end the connection: we cannot find the next request's start.
                let err = framing_error(&e);
                log::warn!("rejecting request: {}", err.message);
                self.keep_alive = false;
                self.respond(&crate::engine::error_response(&err));
                None
            }
        }
    }

    pub fn respond(&mut self, r: &Response) {
        self.outbuf.extend_from_slice(&r.to_bytes(self.keep_alive));
        self.finish();
    }

    pub fn stream_start(&mut self) {
        self.outbuf.extend_from_slice(&http::sse_head(self.keep_alive));
    }

    pub fn stream_data(&mut self, data: &str) {
        self.outbuf.extend_from_slice(&http::chunk(data));
    }

    pub fn stream_end(&mut self) {
        self.outbuf.extend_from_slice(http::LAST_CHUNK);
        self.finish();
    }

    fn finish(&mut self) {
        self.busy = false;
        self.last_active = Instant::now();
        if !self.keep_alive {
            self.closing = true;
        }
    }

    /// Write buffered output; returns false when the connection is finished or broken.
    pub fn flush(&mut self) -> bool {
        while !self.outbuf.is_empty() {
            match self.stream.write(&self.outbuf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.closing {
            if self.lingering == 0 {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.lingering = 1;
            }
            return !self.eof && self.lingering < LINGER_LIMIT;
        }
        !self.eof || self.busy
    }

    /// Idle between requests (nothing being answered or written) since before `cutoff`.
    pub fn idle_since_before(&self, cutoff: Instant) -> bool {
        !self.busy && self.outbuf.is_empty() && self.last_active < cutoff
    }

    /// What an in-place upgrade hands over (the socket itself travels as `fd`).
    pub fn snapshot(&self, token: usize, now: Instant) -> HttpSnapshot {
        HttpSnapshot {
            token,
            fd: self.stream.as_raw_fd(),
            inbuf: self.inbuf.clone(),
            outbuf: self.outbuf.clone(),
            busy: self.busy,
            idle_ms: now.saturating_duration_since(self.last_active).as_millis() as u64,
            keep_alive: self.keep_alive,
            closing: self.closing,
            lingering: self.lingering,
            eof: self.eof,
        }
    }

    /// The connection of `snapshot`, on its socket, in a new image.
    pub fn resume(stream: TcpStream, snapshot: HttpSnapshot, now: Instant) -> Self {
        HttpConn {
            stream,
            inbuf: snapshot.inbuf,
            outbuf: snapshot.outbuf,
            busy: snapshot.busy,
            last_active: now.checked_sub(Duration::from_millis(snapshot.idle_ms)).unwrap_or(now),
            keep_alive: snapshot.keep_alive,
            closing: snapshot.closing,
            lingering: snapshot.lingering,
            eof: snapshot.eof,
        }
    }

    pub fn into_websocket(self, rest: Vec<u8>, req: &Request) -> Option<BridgeConn> {
        let mut stream = self.stream;
        let accept = http::websocket_accept(req)?;
        // The 101 is tiny; a fresh socket's send buffer always takes it.
        stream.write_all(&accept).ok()?;
        Some(BridgeConn::on(stream, rest))
    }
}

/// An HTTP connection as handed to a new image on upgrade.
#[derive(Serialize, Deserialize)]
pub struct HttpSnapshot {
    pub token: usize,
    pub fd: RawFd,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    busy: bool,
    idle_ms: u64,
    keep_alive: bool,
    closing: bool,
    lingering: usize,
    eof: bool,
}

/// Frames are small JSON: tungstenite's default 128 KiB buffers per socket would make
/// bridges the bulk of synthesis's memory with hundreds of sessions.
fn bridge_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_message_size(Some(16 << 20))
}

fn framing_error(e: &ParseError) -> ApiError {
    match e {
        ParseError::BodyTooLarge(n) => {
            ApiError::new(413, "body_too_large", format!("request body of {n} bytes is over max_body"))
        }
        ParseError::HeadTooLarge => ApiError::new(431, "headers_too_large", "request headers are too large"),
        ParseError::LengthRequired => {
            ApiError::new(411, "length_required", "send the body with Content-Length (chunked bodies are not accepted)")
        }
        ParseError::Malformed(m) => ApiError::new(400, "malformed_http", format!("malformed HTTP request: {m}")),
    }
}

/// A channel's bridge WebSocket.
pub struct BridgeConn {
    pub ws: WebSocket<TcpStream>,
}

pub enum BridgeEvent {
    Frame(FromChannel),
    Closed,
}

impl BridgeConn {
    /// A bridge WebSocket on `stream`, after the upgrade handshake (`read`: bytes already read).
    pub fn on(stream: TcpStream, read: Vec<u8>) -> Self {
        BridgeConn { ws: WebSocket::from_partially_read(stream, read, Role::Server, Some(bridge_config())) }
    }

    pub fn on_readable(&mut self) -> Vec<BridgeEvent> {
        let mut events = Vec::new();
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => match serde_json::from_str::<FromChannel>(&text) {
                    Ok(frame) => events.push(BridgeEvent::Frame(frame)),
                    Err(e) => {
                        log::warn!("bridge: unreadable frame ({e}), closing");
                        events.push(BridgeEvent::Closed);
                        return events;
                    }
                },
                Ok(_) => {} // pings are answered by tungstenite on flush
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    events.push(BridgeEvent::Closed);
                    return events;
                }
            }
        }
        self.flush();
        events
    }

    pub fn send(&mut self, frame: &ToChannel) {
        let text = serde_json::to_string(frame).expect("frames serialise");
        if let Err(e) = self.ws.write(Message::text(text)) {
            log::warn!("bridge: cannot queue a frame: {e}");
        }
        self.flush();
    }

    pub fn flush(&mut self) {
        match self.ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::debug!("bridge flush: {e}"),
        }
    }
}
