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

/// A socket a connection runs on: TCP, or a scripted stand-in in the fuzz tests.
pub trait Stream: Read + Write {
    fn shutdown_write(&mut self);
}

impl Stream for TcpStream {
    fn shutdown_write(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Decides on a request's head whether its body may be read (authentication): an `Err` is
/// answered at once, and the body is discarded unread.
pub type Gate<'a> = &'a dyn Fn(&Request) -> Result<(), ApiError>;

pub struct HttpConn<S = TcpStream> {
    pub stream: S,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// The head of the request being received, let through by the gate; its body is next in `inbuf`.
    head: Option<http::Head>,
    /// Bytes of a refused request still to come: read and dropped, never buffered.
    skip: usize,
    /// A request was handed to the engine and its answer is not complete yet.
    busy: bool,
    /// Last time a request arrived or an answer completed.
    pub last_active: Instant,
    keep_alive: bool,
    /// Close once `outbuf` is written.
    closing: bool,
    /// Bytes discarded while closing: unread request bytes are read and dropped until the
    /// client closes, so that closing with unread data (a TCP reset) cannot destroy the answer.
    lingering: usize,
    /// Our side is shut down (the answer is out); lingering gives up at this time.
    linger_until: Option<Instant>,
    eof: bool,
    /// An answer completed or the output drained: the next request may be waiting, in the
    /// buffer or in the socket (whose readiness edge may be long gone).
    resume: bool,
    /// Reading last stopped at the buffer limit, not at `WouldBlock`: the socket may hold more,
    /// and no readiness edge will say so.
    stalled: bool,
}

/// Bytes discarded while lingering before giving up on a client that keeps sending.
const LINGER_LIMIT: usize = 64 << 20;
/// How long lingering waits for the client to close after the last answer.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// No next request is taken while more than this waits to be written (a client that pipelines
/// requests without reading the answers).
const OUTBUF_HIGH: usize = 64 * 1024;
/// Reads go through a stack buffer of this size.
const READ_CHUNK: usize = 16 * 1024;

impl<S: Stream> HttpConn<S> {
    pub fn new(stream: S) -> Self {
        HttpConn {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            head: None,
            skip: 0,
            busy: false,
            last_active: Instant::now(),
            keep_alive: true,
            closing: false,
            lingering: 0,
            linger_until: None,
            eof: false,
            resume: false,
            stalled: false,
        }
    }

    /// A connection over the connection cap: `response` (a 503), then close.
    pub fn refused(stream: S, response: &Response) -> Self {
        let mut c = HttpConn::new(stream);
        c.keep_alive = false;
        c.respond(response);
        c
    }

    /// Read what we may, then take the next request off the buffer if we may. Reading stops
    /// at the request being received (or at `MAX_HEAD` while waiting for a head), so a client
    /// cannot make synthesis buffer more than one request, nor a body before its head passed `gate`.
    pub fn on_readable(&mut self, max_body: usize, gate: Gate) -> Vec<HttpEvent> {
        let mut events = Vec::new();
        loop {
            let full = self.fill();
            let ev = self.next_request(max_body, gate);
            // The gate let a head through (its body may already wait in the socket), or refused
            // it (what the client sent is discarded from now on).
            let again = ev.is_none() && full && self.room() > 0;
            events.extend(ev);
            if !again {
                break;
            }
        }
        let gone = self.eof || self.lingering >= LINGER_LIMIT;
        if gone && !matches!(events.first(), Some(HttpEvent::Upgrade(..))) {
            events.push(HttpEvent::Closed);
        }
        events
    }

    /// How many bytes `inbuf` may hold now.
    fn read_limit(&self) -> usize {
        match &self.head {
            Some(h) => h.len + h.content_length,
            None => http::MAX_HEAD,
        }
    }

    /// How many bytes may be read now.
    fn room(&self) -> usize {
        if self.closing {
            READ_CHUNK
        } else if self.skip > 0 {
            self.skip.min(READ_CHUNK)
        } else {
            self.read_limit().saturating_sub(self.inbuf.len())
        }
    }

    /// Read until the socket would block or ends, or `inbuf` is at its limit (true).
    fn fill(&mut self) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        self.stalled = false;
        while !self.eof && self.lingering < LINGER_LIMIT {
            let room = self.room();
            if room == 0 {
                self.stalled = true;
                return true;
            }
            match self.stream.read(&mut buf[..room.min(READ_CHUNK)]) {
                Ok(0) => self.eof = true,
                Ok(n) if self.closing => self.lingering += n,
                Ok(n) if self.skip > 0 => self.skip -= n,
                Ok(n) => {
                    if self.inbuf.capacity() == 0 {
                        self.inbuf.reserve_exact(READ_CHUNK); // then doubling, never past MAX_HEAD
                    }
                    self.inbuf.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
        false
    }

    /// Take the next complete request off the buffer, if the connection may serve one now.
    fn next_request(&mut self, max_body: usize, gate: Gate) -> Option<HttpEvent> {
        if self.busy || self.closing || self.skip > 0 || self.outbuf.len() > OUTBUF_HIGH {
            return None;
        }
        if self.head.is_none() {
            let head = match http::parse_head(&self.inbuf, max_body) {
                Ok(head) => head?,
                Err(e) => {
                    // Framing errors end the connection: we cannot find the next request's start.
                    let err = framing_error(&e);
                    log::warn!("rejecting request: {}", err.message);
                    self.refuse(&err);
                    return None;
                }
            };
            let req = &head.request;
            if req.is_websocket_upgrade() && req.method == "GET" && req.path == bridge::PATH {
                self.inbuf.drain(..head.len);
                return Some(HttpEvent::Upgrade(head.request, std::mem::take(&mut self.inbuf)));
            }
            if let Err(err) = gate(req) {
                // Answered at once; the body is dropped as it comes, and the connection goes on.
                log::debug!("refusing {} {} on its head: {}", req.method, req.path, err.message);
                let total = head.len + head.content_length;
                let buffered = total.min(self.inbuf.len());
                self.inbuf.drain(..buffered);
                self.release_inbuf();
                self.skip = total - buffered;
                self.keep_alive = head.keep_alive;
                self.respond(&crate::engine::error_response(&err));
                return None;
            }
            let total = head.len + head.content_length;
            self.inbuf.reserve_exact(total.saturating_sub(self.inbuf.len()));
            self.head = Some(head);
        }
        let total = self.read_limit();
        if self.inbuf.len() < total {
            return None;
        }
        let head = self.head.take().expect("head");
        let mut request = head.request;
        request.body = String::from_utf8_lossy(&self.inbuf[head.len..total]).into_owned();
        self.inbuf.drain(..total);
        self.release_inbuf();
        self.keep_alive = head.keep_alive;
        self.busy = true;
        self.last_active = Instant::now();
        Some(HttpEvent::Request(request))
    }

    /// A request's room is not kept for the next one: an idle keep-alive connection holds no buffer.
    fn release_inbuf(&mut self) {
        if self.inbuf.is_empty() {
            self.inbuf = Vec::new();
        } else {
            self.inbuf.shrink_to(READ_CHUNK);
        }
    }

    /// Answer `err` and close, discarding whatever else the client sends.
    fn refuse(&mut self, err: &ApiError) {
        self.keep_alive = false;
        self.inbuf = Vec::new();
        self.head = None;
        self.respond(&crate::engine::error_response(err));
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
        self.resume = true;
        self.last_active = Instant::now();
        if !self.keep_alive {
            self.closing = true;
        }
    }

    /// Write buffered output; returns false when the connection is finished or broken.
    pub fn flush(&mut self) -> bool {
        let was_high = self.outbuf.len() > OUTBUF_HIGH;
        while !self.outbuf.is_empty() {
            match self.stream.write(&self.outbuf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if was_high && self.outbuf.len() <= OUTBUF_HIGH {
            self.resume = true;
        }
        if self.outbuf.is_empty() && self.outbuf.capacity() > OUTBUF_HIGH {
            self.outbuf = Vec::new(); // a long answer's room is not kept
        }
        if !self.outbuf.is_empty() {
            return true;
        }
        if self.closing {
            if self.linger_until.is_none() {
                self.stream.shutdown_write();
                self.linger_until = Some(Instant::now() + LINGER_TIME);
            }
            return !self.eof && self.lingering < LINGER_LIMIT;
        }
        !self.eof || self.busy
    }

    /// Bytes buffered: (received, not yet written).
    pub fn buffered(&self) -> (usize, usize) {
        (self.inbuf.len(), self.outbuf.len())
    }

    /// True once after an answer completed or the output drained (see `resume`), if a next
    /// request may be waiting: in the buffer, or in the socket behind a full buffer.
    pub fn take_resume(&mut self) -> bool {
        std::mem::take(&mut self.resume) && (self.stalled || !self.inbuf.is_empty())
    }

    /// When the connection must be closed whatever happens (a lingering close that lasts).
    pub fn deadline(&self) -> Option<Instant> {
        self.linger_until
    }

    /// Idle between requests (nothing being answered or written) since before `cutoff`.
    pub fn idle_since_before(&self, cutoff: Instant) -> bool {
        !self.busy && self.outbuf.is_empty() && self.last_active < cutoff
    }

    pub fn into_websocket(self, rest: Vec<u8>, req: &Request) -> Option<BridgeConn<S>> {
        let mut stream = self.stream;
        let accept = http::websocket_accept(req)?;
        // The 101 is tiny; a fresh socket's send buffer always takes it.
        stream.write_all(&accept).ok()?;
        Some(BridgeConn::on(stream, rest, false))
    }
}

impl HttpConn<TcpStream> {
    /// What an in-place upgrade hands over (the socket itself travels as `fd`). A head being
    /// received is still in `inbuf`, and is checked again by the new image.
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
            skip: self.skip,
            shut: self.linger_until.is_some(),
        }
    }

    /// The connection of `snapshot`, on its socket, in a new image.
    pub fn resume(stream: TcpStream, snapshot: HttpSnapshot, now: Instant) -> Self {
        HttpConn {
            stream,
            inbuf: snapshot.inbuf,
            outbuf: snapshot.outbuf,
            head: None,
            skip: snapshot.skip,
            busy: snapshot.busy,
            last_active: now.checked_sub(Duration::from_millis(snapshot.idle_ms)).unwrap_or(now),
            keep_alive: snapshot.keep_alive,
            closing: snapshot.closing,
            lingering: snapshot.lingering,
            linger_until: snapshot.shut.then_some(now + LINGER_TIME),
            eof: snapshot.eof,
            resume: true,
            stalled: true,
        }
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
    #[serde(default)]
    skip: usize,
    #[serde(default)]
    shut: bool,
}

/// A new bridge must say `hello` within this time...
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// ... in a frame of at most this size (a hello is about 100 bytes).
pub const HELLO_MAX: usize = 4096;
/// Largest frame of a bound channel: a `reply` or client-tool call carries what Claude wrote in
/// one go (bounded by its output tokens, well under a MiB); one such buffer per claude at most.
pub const FRAME_MAX: usize = 16 << 20;

/// Frames are small JSON: tungstenite's default 128 KiB buffers per socket would make
/// bridges the bulk of synthesis's memory with hundreds of sessions.
fn bridge_config(max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
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
pub struct BridgeConn<S = TcpStream> {
    pub ws: WebSocket<S>,
    /// Not bound yet: the first frame must be a `hello` (of at most `HELLO_MAX` bytes) by then.
    hello_by: Option<Instant>,
}

pub enum BridgeEvent {
    Frame(FromChannel),
    Closed,
}

impl<S: Read + Write> BridgeConn<S> {
    /// A bridge WebSocket on `stream`, after the upgrade handshake (`read`: bytes already read).
    /// Unless `bound` (handed over by the previous image), its first frame must be a `hello`.
    pub fn on(stream: S, read: Vec<u8>, bound: bool) -> Self {
        let (max, hello_by) = if bound { (FRAME_MAX, None) } else { (HELLO_MAX, Some(Instant::now() + HELLO_TIMEOUT)) };
        BridgeConn {
            ws: WebSocket::from_partially_read(stream, read, Role::Server, Some(bridge_config(max))),
            hello_by,
        }
    }

    pub fn on_readable(&mut self) -> Vec<BridgeEvent> {
        let mut events = Vec::new();
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => match serde_json::from_str::<FromChannel>(&text) {
                    Ok(frame @ FromChannel::Hello { .. }) if self.hello_by.is_some() => {
                        // The engine closes the socket if the token is not one it gave out.
                        self.hello_by = None;
                        self.ws.set_config(|c| *c = bridge_config(FRAME_MAX));
                        events.push(BridgeEvent::Frame(frame));
                    }
                    Ok(_) if self.hello_by.is_some() => {
                        log::warn!("bridge: first frame is not a hello, closing");
                        events.push(BridgeEvent::Closed);
                        return events;
                    }
                    Ok(frame) => events.push(BridgeEvent::Frame(frame)),
                    Err(e) => {
                        log::warn!("bridge: unreadable frame ({e}), closing");
                        events.push(BridgeEvent::Closed);
                        return events;
                    }
                },
                Ok(_) => {} // pings are answered by tungstenite on flush
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if let tungstenite::Error::Capacity(e) = &e {
                        log::warn!("bridge: {e}, closing");
                    }
                    events.push(BridgeEvent::Closed);
                    return events;
                }
            }
        }
        self.flush();
        events
    }

    /// An unbound bridge must be closed at this time.
    pub fn deadline(&self) -> Option<Instant> {
        self.hello_by
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
