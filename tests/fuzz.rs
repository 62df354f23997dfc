//! Deterministic fuzzing, part of `cargo test` (stable Rust, a seeded generator, no corpus):
//! the HTTP parser and a connection's framing over a scripted socket, bridge frames and the
//! bridge socket before `hello`, MCP lines, and random input sequences against the engine on a
//! virtual clock. Invariants: no panic, every request answered exactly once, no turn answered
//! twice, nothing the outside controls grows without bound.
//!
//! A failure prints its seed; `FUZZ_SEED=<seed>` reruns that one case, `FUZZ_SCALE=<n>`
//! multiplies the number of cases.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use synthesis::engine::{CounterIds, Engine, Input, Output, Permissions, Settings, SpawnSpec};
use synthesis::shell::conn::{BridgeConn, BridgeEvent, HttpConn, HttpEvent, Stream, HELLO_MAX};
use synthesis::wire::bridge::{self, FromChannel, ToChannel, ToolDef};
use synthesis::wire::http::{self, parse_head, parse_request, Request, MAX_HEAD};
use synthesis::wire::mcp;
use synthesis::wire::openai::ApiError;

// ---------------------------------------------------------------------------------------------
// The generator

/// splitmix64: small, fast, good enough to explore input space, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// Mostly small, sometimes large (log-uniform up to `max`).
    fn size(&mut self, max: usize) -> usize {
        let bits = self.below(usize::BITS as usize - max.leading_zeros() as usize + 1);
        (self.next() as usize & ((1usize << bits) - 1)).min(max)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn text(&mut self, max: usize) -> String {
        const PARTS: &[&str] = &[
            "a",
            "hello",
            " ",
            "\n",
            "\r\n",
            ":",
            "\"",
            "\\",
            "é",
            "😀",
            "\u{0}",
            "{",
            "}",
            "[",
            "]",
            "yes abcde",
            "no abcde",
            "chat_id=\"chat-1\"",
            "sleep 1",
            "x:1",
            "<channel>",
            "\u{1b}",
            "18446744073709551615",
            "-1",
        ];
        let n = self.size(max);
        let mut s = String::new();
        while s.len() < n {
            let part = *self.pick(PARTS);
            s.push_str(part);
        }
        s
    }

    /// Damage `data` a little: flip, insert, delete, duplicate or truncate.
    fn mutate(&mut self, data: &mut Vec<u8>) {
        for _ in 0..1 + self.below(4) {
            let at = if data.is_empty() { 0 } else { self.below(data.len()) };
            match self.below(6) {
                0 if !data.is_empty() => data[at] ^= 1 << self.below(8),
                1 => {
                    let n = 1 + self.below(8);
                    let extra = self.bytes(n);
                    data.splice(at..at, extra);
                }
                2 if !data.is_empty() => {
                    let end = (at + 1 + self.below(16)).min(data.len());
                    data.drain(at..end);
                }
                3 if !data.is_empty() => {
                    let end = (at + 1 + self.below(64)).min(data.len());
                    let piece = data[at..end].to_vec();
                    data.splice(at..at, piece);
                }
                4 => data.truncate(at),
                _ => data.insert(at, *self.pick(b"\r\n:0123456789 \x00\xff{}\"")),
            }
        }
    }
}

/// Run `cases` seeded cases of `f`; a panic names the seed that caused it.
fn run_cases(name: &str, cases: usize, f: impl Fn(&mut Rng)) {
    let scale: usize = std::env::var("FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let only: Option<u64> = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok());
    let t = Instant::now();
    let seeds: Vec<u64> = match only {
        Some(seed) => vec![seed],
        None => {
            (0..(cases * scale) as u64).map(|i| i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ name.len() as u64).collect()
        }
    };
    for &seed in &seeds {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut Rng(seed))));
        if let Err(e) = result {
            eprintln!("{name}: failed with seed {seed} (rerun with FUZZ_SEED={seed})");
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("{name}: {} cases in {:?}", seeds.len(), t.elapsed());
}

// ---------------------------------------------------------------------------------------------
// HTTP parser

const METHODS: &[&str] = &["GET", "POST", "PUT", "HEAD", "OPTIONS", "G\0T", "post", ""];
const PATHS: &[&str] =
    &["/healthz", "/v1/chat/completions", "/hooks/stop", "/bridge", "/deny", "/", "*", "/v1/models?x=1"];

/// One request as a client might send it; `i` is carried in a header and in the body.
fn gen_request(rng: &mut Rng, i: usize, max_body: usize, valid: bool) -> (Vec<u8>, String, String, String) {
    let method = if valid { *rng.pick(&["GET", "POST"]) } else { *rng.pick(METHODS) };
    let path = if valid { *rng.pick(&["/healthz", "/v1/chat/completions", "/deny", "/x?y"]) } else { *rng.pick(PATHS) };
    let body = if valid {
        let n = rng.size(max_body);
        format!("{i}:{}", "b".repeat(n)).chars().take(max_body).collect::<String>()
    } else {
        rng.text(300)
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nx-i: {i}\r\n");
    let headers = 1 + if valid { rng.below(4) } else { rng.size(80) };
    for _ in 0..headers {
        match rng.below(8) {
            0 if !valid => head.push_str(&format!(
                "content-length: {}\r\n",
                rng.pick(&["-1", "1e3", "99999999999999999999", "0x10", ""])
            )),
            1 if !valid => head.push_str("transfer-encoding: chunked\r\n"),
            2 if valid => head.push_str(&format!("authorization: Bearer {}\r\n", rng.pick(&["key", ""]))),
            2 => head.push_str(&format!("authorization: Bearer {}\r\n", rng.pick(&["key", "bad", ""]))),
            3 if !valid => head.push_str(&format!("x-long: {}\r\n", "l".repeat(rng.size(100_000)))),
            4 if !valid => head.push_str("upgrade: websocket\r\n"),
            _ if valid => head.push_str(&format!("x-h{}: v{}\r\n", rng.below(1000), rng.next())),
            _ => head.push_str(&format!("x-h{}: {}\r\n", rng.below(1000), rng.text(40).replace(['\r', '\n'], ""))),
        }
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body.as_bytes());
    (raw, method.to_string(), path.to_string(), body)
}

#[test]
fn fuzz_http_parser() {
    run_cases("http parser", 40_000, |rng| {
        let max_body = 1 + rng.size(1 << 16);
        let mut buf = Vec::new();
        for i in 0..1 + rng.below(3) {
            let valid = rng.chance(50);
            buf.extend(gen_request(rng, i, max_body, valid).0);
        }
        if rng.chance(70) {
            rng.mutate(&mut buf);
        }
        if rng.chance(5) {
            let n = rng.size(1 << 17);
            buf = rng.bytes(n);
        }
        if let Ok(Some(head)) = parse_head(&buf, max_body) {
            assert!(head.len <= MAX_HEAD && head.content_length <= max_body);
            assert!(head.request.body.is_empty());
        }
        match parse_request(&buf, max_body) {
            Ok(Some(p)) => {
                assert!(p.consumed <= buf.len());
                let head = parse_head(&buf, max_body).unwrap().unwrap();
                assert_eq!(p.consumed, head.len + head.content_length);
                assert!(head.content_length <= max_body);
                assert!(p.request.body.len() <= 3 * head.content_length, "lossy UTF-8 at most triples");
            }
            // "Need more bytes" is only ever said within one head and one body.
            Ok(None) => assert!(buf.len() < MAX_HEAD + max_body, "waits for more after {} bytes", buf.len()),
            Err(_) => {}
        }
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP connection over a scripted socket

/// A socket whose peer sends `input` as it "arrives", and reads at most `room` bytes at a time.
#[derive(Default)]
struct Mock {
    input: Vec<u8>,
    arrived: usize,
    read: usize,
    client_closed: bool,
    out: Vec<u8>,
    room: usize,
    /// A write found no room: room made later is a writable edge.
    write_blocked: bool,
    shut: bool,
}

impl Read for Mock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read == self.arrived {
            return if self.client_closed && self.arrived == self.input.len() {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.arrived - self.read);
        buf[..n].copy_from_slice(&self.input[self.read..self.read + n]);
        self.read += n;
        Ok(n)
    }
}

impl Write for Mock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(!self.shut, "write after shutdown");
        if self.room == 0 {
            self.write_blocked = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room);
        self.out.extend_from_slice(&buf[..n]);
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Mock {
    fn shutdown_write(&mut self) {
        self.shut = true;
    }
}

/// The gate of the tests: `/deny` and a `bad` key are refused on the head.
fn test_gate(req: &Request) -> Result<(), ApiError> {
    if req.path == "/deny" || req.bearer() == Some("bad") {
        return Err(ApiError::new(401, "invalid_api_key", "no"));
    }
    Ok(())
}

/// Responses in `out`: (status, body), chunked bodies joined.
fn parse_responses(mut out: &[u8]) -> Vec<(u16, String)> {
    let mut all = Vec::new();
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(n) = r.parse(out).expect("a well-formed response") else { break };
        let status = r.code.unwrap();
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let chunked = header("transfer-encoding").is_some();
        let len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
        out = &out[n..];
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = out.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
                let size = usize::from_str_radix(std::str::from_utf8(&out[..line_end]).unwrap(), 16).unwrap();
                out = &out[line_end + 2..];
                body.extend_from_slice(&out[..size]);
                out = &out[size + 2..];
                if size == 0 {
                    break;
                }
            }
            body
        } else {
            let b = out[..len].to_vec();
            out = &out[len..];
            b
        };
        all.push((status, String::from_utf8(body).unwrap()));
    }
    all
}

/// How the scripted server answers a request: at once, later, or as a stream over several steps.
struct Server {
    pending: Option<(String, usize)>,
    streaming: bool,
}

#[test]
fn fuzz_http_connection_framing() {
    run_cases("http connection", 6_000, |rng| {
        let max_body = 1 + rng.size(200_000);
        let valid = rng.chance(60);
        let mut expected = Vec::new();
        let mut input = Vec::new();
        for i in 0..1 + rng.size(60) {
            let (raw, method, path, body) = gen_request(rng, i, max_body, valid);
            input.extend(raw);
            expected.push((method, path, body));
        }
        if !valid && rng.chance(50) {
            rng.mutate(&mut input);
        }
        let deny_all = !valid && rng.chance(20);
        let gate = |req: &Request| if deny_all { Err(ApiError::new(401, "x", "no")) } else { test_gate(req) };
        let mock = Mock { input, room: rng.size(1 << 16), ..Mock::default() };
        let mut conn = HttpConn::new(mock);
        let mut server = Server { pending: None, streaming: false };
        let mut seen: Vec<Request> = Vec::new();
        let mut closed = false;
        let mut upgraded = false;
        for step in 0..400 {
            let finishing = step > 300;
            // The peer: more bytes arrive, it reads some answers. Edge-triggered readiness: the
            // shell hears of the socket only when something new happens to it.
            let m = &mut conn.stream;
            let mut edge = step == 0;
            if finishing || rng.chance(60) {
                let before = m.arrived;
                let more = if finishing { m.input.len() } else { 1 + rng.size(1 << 15) };
                m.arrived = (m.arrived + more).min(m.input.len());
                edge |= m.arrived > before;
            }
            if finishing || rng.chance(50) {
                let more = if finishing { usize::MAX / 4 } else { rng.size(1 << 15) };
                m.room = m.room.saturating_add(more);
                edge |= more > 0 && std::mem::take(&mut m.write_blocked);
            }
            if !valid && m.arrived == m.input.len() && !m.client_closed && rng.chance(10) {
                m.client_closed = true;
                edge = true;
            }
            // The server finishes an answer: the shell writes it out (and serves what is next).
            let mut read = edge;
            let mut write = false;
            if let Some((path, i)) = server.pending.clone() {
                if finishing || rng.chance(40) {
                    if server.streaming {
                        conn.stream_data(&format!("{i}"));
                        conn.stream_end();
                    } else {
                        conn.respond(&http::Response::json(200, format!("{path} {i}")));
                    }
                    server.pending = None;
                    write = true;
                }
            }
            // The shell: on an edge read, hand requests to the server, write; and go on (a
            // `pump` turn) while answers complete.
            while read || write {
                if read {
                    for ev in conn.on_readable(max_body, &gate) {
                        match ev {
                            HttpEvent::Request(req) => {
                                assert!(server.pending.is_none(), "a request while one is being answered");
                                let i = seen.len();
                                let stream = rng.chance(30);
                                if stream {
                                    conn.stream_start();
                                    conn.stream_data("s");
                                }
                                server.pending = Some((req.path.clone(), i));
                                server.streaming = stream;
                                if !stream && rng.chance(50) {
                                    conn.respond(&http::Response::json(200, format!("{} {i}", req.path)));
                                    server.pending = None;
                                }
                                seen.push(req);
                            }
                            HttpEvent::Upgrade(..) => upgraded = true,
                            HttpEvent::Closed => closed = true,
                        }
                    }
                }
                let (inbuf, outbuf) = conn.buffered();
                assert!(inbuf <= MAX_HEAD + max_body, "{inbuf} bytes buffered");
                if deny_all {
                    assert!(inbuf <= MAX_HEAD, "{inbuf} bytes buffered before any head was let through");
                }
                assert!(outbuf <= (64 << 10) + 4096, "{outbuf} bytes of answers waiting");
                if upgraded || closed || !conn.flush() {
                    closed = true;
                    break;
                }
                read = conn.take_resume();
                write = false;
            }
            if closed || upgraded {
                break;
            }
        }
        if !valid {
            return; // no panic, bounded buffers: that is all garbage can promise
        }
        // Every request was seen once, in order, with its body; every one got its answer in order.
        let accepted: Vec<_> = expected.iter().enumerate().filter(|(_, (_, p, _))| p != "/deny").collect();
        assert_eq!(seen.len(), accepted.len(), "requests handed to the server");
        for (req, (_, (method, path, body))) in seen.iter().zip(&accepted) {
            assert_eq!((&req.method, &req.path, &req.body), (method, path, body));
        }
        let answers = parse_responses(&conn.stream.out);
        assert_eq!(answers.len(), expected.len(), "one answer per request");
        let mut served = 0;
        for (i, ((status, body), (_, path, _))) in answers.iter().zip(&expected).enumerate() {
            if path == "/deny" {
                assert_eq!(*status, 401, "request {i}");
            } else {
                assert_eq!(*status, 200, "request {i}");
                assert!(body == &format!("{path} {served}") || body == &format!("s{served}"), "request {i}: {body}");
                served += 1;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Bridge frames and the bridge socket before `hello`

fn gen_frame(rng: &mut Rng) -> FromChannel {
    match rng.below(8) {
        0 => FromChannel::Hello { v: *rng.pick(&[bridge::VERSION, 0, u32::MAX]), token: rng.text(40) },
        1 => FromChannel::Ready,
        2 => FromChannel::Reply { seq: rng.next(), chat_id: rng.text(12), text: rng.text(200) },
        3 => FromChannel::ToolCall {
            call_ref: rng.text(8),
            name: rng.text(8),
            arguments: json!({"k": rng.text(20), "n": rng.next(), "deep": [[[{}]]]}),
        },
        4 => FromChannel::ToolsListed,
        5 => FromChannel::PermissionRequest {
            request_id: rng.text(5),
            tool_name: rng.text(8),
            description: rng.text(30),
            input_preview: rng.text(30),
        },
        _ => FromChannel::Heartbeat,
    }
}

#[test]
fn fuzz_bridge_frames() {
    run_cases("bridge frames", 30_000, |rng| {
        let frame = gen_frame(rng);
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(serde_json::from_str::<FromChannel>(&text).unwrap(), frame, "round trip");
        let mut bytes = text.into_bytes();
        match rng.below(4) {
            0 => rng.mutate(&mut bytes),
            1 => bytes = format!("{}{}", "[".repeat(rng.size(5000)), "]".repeat(rng.size(5000))).into_bytes(),
            2 => {
                let mut v: Value = serde_json::from_slice(&bytes).unwrap();
                v[rng.text(6)] = json!(rng.next());
                if rng.chance(50) {
                    v["type"] = json!(rng.text(8));
                }
                bytes = v.to_string().into_bytes();
            }
            _ => {}
        }
        let _ = serde_json::from_slice::<FromChannel>(&bytes);
        let _ = serde_json::from_slice::<ToChannel>(&bytes); // what the channel parses
    });
}

/// A client WebSocket frame (masked), `fin` set, of `opcode` with `payload`; `claimed` overrides
/// the announced length.
fn ws_frame(rng: &mut Rng, opcode: u8, payload: &[u8], claimed: Option<u64>) -> Vec<u8> {
    let len = claimed.unwrap_or(payload.len() as u64);
    let mut f = vec![0x80 | opcode];
    match len {
        0..=125 => f.push(0x80 | len as u8),
        126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&len.to_be_bytes());
        }
    }
    let mask = (rng.next() as u32).to_be_bytes();
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn fuzz_bridge_socket_before_hello() {
    run_cases("bridge socket", 5_000, |rng| {
        let hello = serde_json::to_string(&FromChannel::Hello { v: bridge::VERSION, token: "t".into() }).unwrap();
        let mut input = Vec::new();
        let first = rng.below(5);
        let claimed_big = match first {
            0 => {
                input.extend(ws_frame(rng, 1, hello.as_bytes(), None));
                false
            }
            1 => {
                // A frame far over the hello limit, announced up front.
                let n = rng.size(8192);
                let payload = rng.bytes(n);
                let claimed = HELLO_MAX as u64 + 1 + rng.size(1 << 40) as u64;
                input.extend(ws_frame(rng, 1, &payload, Some(claimed)));
                true
            }
            2 => {
                let frame = serde_json::to_string(&gen_frame(rng)).unwrap();
                input.extend(ws_frame(rng, 1, frame.as_bytes(), None));
                false
            }
            3 => {
                let opcode = *rng.pick(&[2, 9, 10]);
                let n = rng.size(200);
                let payload = rng.bytes(n);
                input.extend(ws_frame(rng, opcode, &payload, None));
                false
            }
            _ => {
                let n = rng.size(20_000);
                input = rng.bytes(n);
                false
            }
        };
        for _ in 0..rng.below(4) {
            let frame = serde_json::to_string(&gen_frame(rng)).unwrap();
            input.extend(ws_frame(rng, 1, frame.as_bytes(), None));
        }
        let mutated = rng.chance(30);
        if mutated {
            rng.mutate(&mut input);
        }
        let claimed_big = claimed_big && !mutated;
        let total = input.len();
        let mock = Mock { input, room: usize::MAX / 2, ..Mock::default() };
        let mut b = BridgeConn::on(mock, Vec::new(), false);
        assert!(b.deadline().is_some(), "an unbound bridge has a hello deadline");
        let mut events = Vec::new();
        for _ in 0..50 {
            let m = &mut b.ws.get_mut();
            m.arrived = (m.arrived + 1 + rng.size(1 << 14)).min(total);
            let evs = b.on_readable();
            let done = evs.iter().any(|e| matches!(e, BridgeEvent::Closed));
            events.extend(evs);
            if done {
                break;
            }
        }
        let frames: Vec<&FromChannel> = events
            .iter()
            .filter_map(|e| match e {
                BridgeEvent::Frame(f) => Some(f),
                BridgeEvent::Closed => None,
            })
            .collect();
        if let Some(f) = frames.first() {
            assert!(matches!(f, FromChannel::Hello { .. }), "the first frame handed on is a hello: {f:?}");
            assert!(b.deadline().is_none(), "bound after its hello");
        }
        if claimed_big {
            assert!(matches!(events.last(), Some(BridgeEvent::Closed)), "an oversized first frame closes");
            assert!(b.ws.get_ref().read <= HELLO_MAX + 3 * 4096, "read {} bytes of it", b.ws.get_ref().read);
        }
        if first == 2 && !matches!(frames.first(), Some(FromChannel::Hello { .. })) {
            assert!(frames.is_empty(), "nothing but a hello first");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// MCP lines

#[test]
fn fuzz_mcp_lines() {
    run_cases("mcp lines", 20_000, |rng| {
        let content = rng.text(500);
        let chat_id = rng.text(20);
        let line = mcp::channel_message(&content, &chat_id);
        assert!(!line.contains('\n'), "one message, one line");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["params"]["content"], content.as_str());
        assert_eq!(v["params"]["meta"]["chat_id"], chat_id.as_str());
        let id = json!(rng.next());
        let text = rng.text(200);
        for line in [
            mcp::response(&id, mcp::tool_text(&text, rng.chance(50))),
            mcp::error(&id, mcp::METHOD_NOT_FOUND, &text),
            mcp::notification(&rng.text(30), json!({"request_id": text})),
        ] {
            assert!(!line.contains('\n'));
            serde_json::from_str::<Value>(&line).unwrap();
        }
        let version = rng.text(12);
        let offered = mcp::negotiate(Some(&version));
        assert!(offered <= mcp::PROTOCOL_VERSION, "never a protocol that disables channels");
        let tool =
            ToolDef { name: rng.text(10), description: rng.text(50), input_schema: json!({"type": rng.text(5)}) };
        serde_json::from_str::<Value>(&mcp::client_tool(&tool).to_string()).unwrap();
        // What claude sends the channel, damaged: parsed as the channel parses each line.
        let mut incoming = json!({"jsonrpc": "2.0", "id": rng.next(), "method": *rng.pick(&["initialize", "tools/list", "tools/call", "ping", "notifications/initialized", "server/discover"]),
            "params": {"protocolVersion": version, "name": *rng.pick(&["reply", "ls", ""]), "arguments": {"chat_id": chat_id, "text": text}}})
        .to_string()
        .into_bytes();
        if rng.chance(60) {
            rng.mutate(&mut incoming);
        }
        if let Ok(msg) = serde_json::from_slice::<Value>(&incoming) {
            let _ = (msg.get("method").and_then(Value::as_str), msg.get("params").and_then(|p| p.get("arguments")));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The engine: random input sequences on a virtual clock

const KEYS: &[&str] = &["a", "b", "c:0", "c:1", "c:18446744073709551615", "d:7", "compaction:a", ""];
const SUMMARISER: &str = "You are a context summarization assistant. Summarise.";
const COMPACTED: &str = "The conversation history before this point was compacted into the following summary: s";

/// A client connection as the shell would report it: one request at a time.
#[derive(Default)]
struct ClientConn {
    open: bool,
    requests: u32,
    answers: u32,
    /// A stream response is open (StreamStart seen, no StreamEnd yet).
    streaming: bool,
    /// A hook or probe: answered within the same input.
    at_once: bool,
}

#[derive(Default)]
struct Proc {
    spec: Option<SpawnSpec>,
    spawned: bool,
    exited: bool,
    bridge: Option<u64>,
}

struct EngineFuzz {
    engine: Engine,
    settings: Settings,
    now: Instant,
    next_conn: u64,
    clients: HashMap<u64, ClientConn>,
    procs: HashMap<u64, Proc>,
    /// Open bridge connections: conn → bound to a process (as far as we know).
    bridges: HashMap<u64, bool>,
    /// (bridge conn, chat id) → content delivered.
    delivered: HashMap<(u64, String), String>,
    chat_ids: Vec<String>,
    bodies: Vec<(String, String)>,
    call_ids: Vec<String>,
    keys_used: HashSet<String>,
    exited: bool,
    inputs: usize,
}

impl EngineFuzz {
    fn new(rng: &mut Rng) -> Self {
        let settings = Settings {
            api_key: if rng.chance(50) { Some("key".into()) } else { None },
            max_processes: 1 + rng.below(3),
            queue_depth: 1 + rng.below(3),
            bridge_silence: Duration::from_secs(*rng.pick(&[3600, 20])),
            retry_grace: Duration::from_secs(*rng.pick(&[1, 10])),
            trust_workspace: rng.chance(20),
            permissions: *rng.pick(&[Permissions::Relay, Permissions::Allow, Permissions::Deny]),
            tools_deny: if rng.chance(20) { vec!["ls".into()] } else { Vec::new() },
            spare_processes: *rng.pick(&[0, 0, 1, 2]),
            min_free_memory: *rng.pick(&[0, 1 << 30]),
            ..support::settings()
        };
        let now = Instant::now();
        EngineFuzz {
            engine: Engine::new(settings.clone(), Box::new(CounterIds::default()), now),
            settings,
            now,
            next_conn: 100,
            clients: HashMap::new(),
            procs: HashMap::new(),
            bridges: HashMap::new(),
            delivered: HashMap::new(),
            chat_ids: vec!["chat-1".into()],
            bodies: Vec::new(),
            call_ids: vec!["call_t9".into()],
            keys_used: HashSet::new(),
            exited: false,
            inputs: 0,
        }
    }

    fn conn(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    /// Feed one input, check every output, and answer `SaveSessions` as the shell does.
    fn feed(&mut self, input: Input) {
        if self.exited {
            return;
        }
        self.inputs += 1;
        let at_once = match &input {
            Input::Http { conn, .. } => self.clients.get(conn).is_some_and(|c| c.at_once).then_some(*conn),
            _ => None,
        };
        self.engine.handle(self.now, input);
        let mut saves = 0;
        while let Some(out) = self.engine.poll_output() {
            self.check(out, &mut saves);
        }
        if let Some(conn) = at_once {
            let c = &self.clients[&conn];
            assert_eq!(c.answers, c.requests, "conn {conn}: a hook or probe is answered at once");
        }
        for _ in 0..saves {
            self.feed(Input::Saved { error: None });
        }
        let s = self.engine.stats();
        let waiting_clients = self.clients.values().filter(|c| c.open && c.answers < c.requests).count();
        assert!(s.waiting <= waiting_clients, "{s:?}: waiting for {waiting_clients} clients");
        assert!(s.bridges <= self.bridges.len(), "{s:?}");
        assert!(s.processes <= self.settings.max_processes, "{s:?}");
        assert!(s.sessions <= 2 * KEYS.len() + self.settings.spare_processes, "{s:?}");
        assert!(s.queued <= s.sessions * self.settings.queue_depth, "{s:?}");
        assert!(s.aliases <= s.sessions * 8, "{s:?}");
        assert!(s.recent_answers <= s.sessions * 64, "{s:?}");
        assert!(s.slot_waiters <= s.sessions, "{s:?}");
    }

    fn check(&mut self, out: Output, saves: &mut usize) {
        match out {
            Output::Respond { conn, .. } | Output::Status { conn, .. } | Output::Metrics { conn, .. } => {
                let c = self.clients.get_mut(&conn).unwrap_or_else(|| panic!("answer to unknown conn {conn}"));
                assert!(!c.streaming, "conn {conn}: a response in the middle of a stream");
                c.answers += 1;
                assert!(c.answers <= c.requests, "conn {conn}: answered twice");
            }
            Output::StreamStart { conn } => {
                let c = self.clients.get_mut(&conn).expect("stream to a known conn");
                assert!(!c.streaming && c.answers < c.requests, "conn {conn}: a second stream");
                c.streaming = true;
            }
            Output::StreamData { conn, data } => {
                let c = self.clients.get_mut(&conn).expect("data to a known conn");
                assert!(c.streaming, "conn {conn}: data outside a stream");
                assert!(data.starts_with("data: ") && data.ends_with("\n\n"), "{data:?}");
            }
            Output::StreamEnd { conn } => {
                let c = self.clients.get_mut(&conn).expect("end of a known stream");
                assert!(c.streaming, "conn {conn}: end without a stream");
                c.streaming = false;
                c.answers += 1;
                assert!(c.answers <= c.requests, "conn {conn}: answered twice");
            }
            Output::Bridge { conn, frame } => {
                assert_eq!(self.bridges.get(&conn), Some(&true), "frame to bridge {conn}, which is not bound");
                if let ToChannel::Deliver { chat_id, content } = frame {
                    let previous = self.delivered.insert((conn, chat_id.clone()), content.clone());
                    assert!(
                        previous.as_ref().is_none_or(|p| *p == content),
                        "{chat_id} delivered twice with different messages"
                    );
                    self.chat_ids.push(chat_id);
                }
            }
            Output::CloseBridge { conn } => {
                self.bridges.remove(&conn);
            }
            Output::Spawn { proc, spec } => {
                let live = self.procs.values().filter(|p| !p.exited).count();
                assert!(live < self.settings.max_processes, "spawn beyond max_processes");
                assert!(!self.procs.contains_key(&proc), "process id {proc} reused");
                self.procs.insert(proc, Proc { spec: Some(spec), ..Proc::default() });
            }
            Output::WriteTerminal { proc, .. } | Output::Signal { proc, .. } | Output::ReadTranscript { proc } => {
                assert!(self.procs.contains_key(&proc), "unknown process {proc}");
            }
            Output::SaveSessions { sessions } => {
                assert!(sessions.len() <= 2 * KEYS.len() + self.settings.spare_processes);
                *saves += 1;
            }
            Output::WriteAttachment { path, bytes } => {
                let dir = format!("{}/", self.settings.attachments_dir);
                assert!(path.starts_with(&dir) && !path.contains("/..") && !path.contains('\0'), "{path}");
                assert!(bytes.len() <= 10 << 20);
            }
            Output::RemoveAttachments { dir } => {
                assert!(dir.starts_with(&format!("{}/", self.settings.attachments_dir)), "{dir}");
            }
            Output::Exit => self.exited = true,
        }
    }

    fn http(&mut self, conn: u64, method: &str, path: &str, headers: Vec<(String, String)>, body: String) {
        let c = self.clients.entry(conn).or_default();
        c.open = true;
        c.requests += 1;
        let request = Request { method: method.into(), path: path.into(), headers, body };
        self.feed(Input::Http { conn, request, unix_secs: 1_790_000_000 + self.inputs as u64 });
    }

    /// A connection free for a next request: a kept-alive one, or a new one.
    fn free_conn(&mut self, rng: &mut Rng) -> u64 {
        let free: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.open && !c.at_once && c.answers == c.requests)
            .map(|(k, _)| *k)
            .collect();
        if !free.is_empty() && rng.chance(50) {
            let mut free = free;
            free.sort();
            return *rng.pick(&free);
        }
        self.conn()
    }

    fn chat_body(&mut self, rng: &mut Rng) -> (String, String) {
        let key = rng.pick(KEYS).to_string();
        let text = match rng.below(8) {
            0 => "yes abcde".to_string(),
            1 => "no abcde".to_string(),
            2 => "sleep 1".to_string(),
            3 => String::new(),
            _ => rng.text(60),
        };
        let mut messages = Vec::new();
        if rng.chance(30) {
            messages.push(
                json!({"role": "system", "content": if rng.chance(20) { SUMMARISER } else { "You are helpful." }}),
            );
        }
        if rng.chance(30) {
            messages.push(json!({"role": "user", "content": if rng.chance(50) { COMPACTED } else { "earlier" }}));
            messages.push(json!({"role": "assistant", "content": "earlier answer"}));
        }
        if rng.chance(20) {
            let id = rng.pick(&self.call_ids).clone();
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "ls", "arguments": "{}"}}]}));
            messages.push(json!({"role": "tool", "tool_call_id": id.replace('_', ""), "content": "result"}));
        }
        if rng.chance(10) {
            let data = if rng.chance(70) { "aGVsbG8=" } else { "%%not base64" };
            let name = *rng.pick(&["notes.txt", "../../etc/passwd", "a\u{0}b", ""]);
            let parts = json!([
                {"type": "text", "text": text},
                {"type": "file", "file": {"filename": name, "file_data": format!("data:text/plain;base64,{data}")}},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}},
            ]);
            messages.push(json!({"role": "user", "content": parts}));
        } else {
            messages.push(json!({"role": "user", "content": text}));
        }
        let mut body = json!({"messages": messages, "stream": rng.chance(50), "stream_options": {"include_usage": rng.chance(50)}});
        if rng.chance(40) {
            body["tools"] = json!([{"type": "function", "function": {"name": *rng.pick(&["ls", "reply", "grep"]), "parameters": {"type": "object"}}}]);
        }
        if rng.chance(50) {
            body["prompt_cache_key"] = json!(key);
        }
        let mut body = body.to_string();
        if rng.chance(3) {
            let mut bytes = body.into_bytes();
            rng.mutate(&mut bytes);
            body = String::from_utf8_lossy(&bytes).into_owned();
        }
        (key, body)
    }

    fn chat(&mut self, rng: &mut Rng) {
        let (key, body) = if !self.bodies.is_empty() && rng.chance(25) {
            rng.pick(&self.bodies).clone() // OpenClaw's identical retry
        } else {
            self.chat_body(rng)
        };
        self.keys_used.insert(key.clone());
        self.bodies.push((key.clone(), body.clone()));
        let mut headers = Vec::new();
        if rng.chance(90) {
            let auth = if rng.chance(90) { "Bearer key" } else { "Bearer nope" };
            headers.push(("authorization".into(), auth.into()));
        }
        if rng.chance(60) {
            headers.push(("x-session-affinity".into(), key));
        }
        let conn = self.free_conn(rng);
        self.http(conn, "POST", "/v1/chat/completions", headers, body);
    }

    fn probe(&mut self, rng: &mut Rng) {
        let (method, path) = *rng.pick(&[
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/v1/models"),
            ("GET", "/status"),
            ("DELETE", "/v1/chat/completions"),
            ("GET", "/nope"),
        ]);
        let conn = self.conn();
        self.clients.entry(conn).or_default().at_once = true;
        let auth = vec![("authorization".to_string(), "Bearer key".to_string())];
        self.http(conn, method, path, if rng.chance(80) { auth } else { Vec::new() }, String::new());
    }

    fn hook(&mut self, rng: &mut Rng) {
        let token = self.token(rng, |s| s.hook_token.clone());
        let chat_id = rng.pick(&self.chat_ids).clone();
        let (path, body) = match rng.below(4) {
            0 => ("/hooks/stop", json!({"last_assistant_message": rng.text(40)})),
            1 => ("/hooks/stop", json!({"session_id": "s"})),
            2 => ("/hooks/stop-failure", json!({"error": "rate_limit"})),
            _ => (
                "/hooks/prompt",
                json!({"prompt": format!("<channel source=\"synthesis\" chat_id=\"{chat_id}\">x</channel>")}),
            ),
        };
        let body = if rng.chance(5) { "{".to_string() } else { body.to_string() };
        let conn = self.conn();
        self.clients.entry(conn).or_default().at_once = true;
        self.http(conn, "POST", path, vec![("authorization".into(), format!("Bearer {token}"))], body);
    }

    /// A token of a process the engine spawned (or a wrong one).
    fn token(&self, rng: &mut Rng, of: impl Fn(&SpawnSpec) -> String) -> String {
        let mut known: Vec<(u64, String)> =
            self.procs.iter().filter_map(|(id, p)| p.spec.as_ref().map(|s| (*id, of(s)))).collect();
        known.sort();
        if known.is_empty() || rng.chance(10) {
            return "t999".into();
        }
        rng.pick(&known).1.clone()
    }

    fn bridge_frame(&mut self, rng: &mut Rng) {
        let mut open: Vec<u64> = self.bridges.keys().copied().collect();
        open.sort();
        if open.is_empty() || rng.chance(20) {
            // A new socket says hello (maybe with a wrong token or version).
            let conn = self.conn();
            let token = self.token(rng, |s| s.bridge_token.clone());
            let v = if rng.chance(95) { bridge::VERSION } else { 2 };
            self.bridges.insert(conn, true);
            self.feed(Input::BridgeFrame { conn, frame: FromChannel::Hello { v, token } });
            return;
        }
        let conn = *rng.pick(&open);
        let chat_id = rng.pick(&self.chat_ids).clone();
        let frame = match rng.below(9) {
            0 | 1 => FromChannel::Ready,
            2 | 3 => FromChannel::Reply { seq: rng.next() % 100, chat_id, text: rng.text(80) },
            4 => {
                let name = rng.pick(&["ls", "grep", "reply"]).to_string();
                FromChannel::ToolCall { call_ref: format!("{}", rng.below(5)), name, arguments: json!({"p": "."}) }
            }
            5 => FromChannel::ToolsListed,
            6 => FromChannel::PermissionRequest {
                request_id: "abcde".into(),
                tool_name: "Bash".into(),
                description: "run".into(),
                input_preview: rng.text(20),
            },
            7 => FromChannel::Hello { v: bridge::VERSION, token: "t999".into() },
            _ => FromChannel::Heartbeat,
        };
        self.feed(Input::BridgeFrame { conn, frame });
    }

    fn step(&mut self, rng: &mut Rng) {
        match rng.below(100) {
            0..=24 => self.chat(rng),
            25..=29 => self.probe(rng),
            30..=41 => self.hook(rng),
            42..=61 => self.bridge_frame(rng),
            62..=65 => {
                let mut open: Vec<u64> = self.bridges.keys().copied().collect();
                open.sort();
                if !open.is_empty() {
                    let conn = *rng.pick(&open);
                    self.bridges.remove(&conn);
                    self.feed(Input::BridgeClosed { conn });
                }
            }
            66..=70 => {
                let mut open: Vec<u64> = self.clients.iter().filter(|(_, c)| c.open).map(|(k, _)| *k).collect();
                open.sort();
                if !open.is_empty() {
                    let conn = *rng.pick(&open);
                    self.clients.get_mut(&conn).unwrap().open = false;
                    self.feed(Input::ConnClosed { conn });
                }
            }
            71..=78 => self.answer_spawn(rng),
            79..=83 => {
                let text = rng
                    .pick(&[
                        "WARNING: Loading development channels I am using this for local development",
                        "Quick safety check ❯ 1. Yes, I trust this folder",
                        "Do you want to use this API key?",
                        "Interrupted",
                        "\u{1b}[2J\u{1b}[Hrandom",
                    ])
                    .to_string();
                if let Some(proc) = self.some_proc(rng, |p| p.spawned && !p.exited) {
                    self.feed(Input::Terminal { proc, text });
                }
            }
            84..=86 => self.exit_one(rng),
            87..=97 => {
                let d = Duration::from_millis(rng.size(3_600_000) as u64);
                self.advance(d);
            }
            98 if rng.chance(50) => self.feed(Input::Saved { error: Some("disk full".into()) }),
            98 => {
                let mut groups: Vec<(u64, u64)> =
                    self.procs.iter().filter(|(_, p)| p.spawned && !p.exited).map(|(id, _)| (*id, 300 << 20)).collect();
                groups.sort();
                let available = *rng.pick(&[100 << 20, 2 << 30, 64 << 30]);
                self.feed(Input::Memory { available, groups });
            }
            _ if rng.chance(20) => self.feed(Input::Shutdown),
            _ => self.feed(Input::Tick),
        }
    }

    fn some_proc(&self, rng: &mut Rng, f: impl Fn(&Proc) -> bool) -> Option<u64> {
        let mut ids: Vec<u64> = self.procs.iter().filter(|(_, p)| f(p)).map(|(id, _)| *id).collect();
        ids.sort();
        (!ids.is_empty()).then(|| *rng.pick(&ids))
    }

    fn answer_spawn(&mut self, rng: &mut Rng) {
        if let Some(proc) = self.some_proc(rng, |p| !p.spawned && !p.exited) {
            self.procs.get_mut(&proc).unwrap().spawned = true;
            if rng.chance(90) {
                let resumed = rng.chance(30);
                self.feed(Input::Spawned { proc, pid: 1000 + proc as u32, resumed });
            } else {
                self.procs.get_mut(&proc).unwrap().exited = true;
                self.feed(Input::SpawnFailed { proc, error: "no such file".into() });
            }
        }
    }

    fn exit_one(&mut self, rng: &mut Rng) {
        if let Some(proc) = self.some_proc(rng, |p| p.spawned && !p.exited) {
            let p = self.procs.get_mut(&proc).unwrap();
            p.exited = true;
            if let Some(b) = p.bridge.take() {
                self.bridges.remove(&b);
            }
            self.feed(Input::Exited { proc, status: "exit status 1".into() });
        }
    }

    /// Move the clock, firing each deadline on the way, as the shell does.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        let mut fired = 0;
        while let Some(t) = self.engine.poll_timeout().filter(|t| *t <= end) {
            self.now = t.max(self.now);
            self.feed(Input::Tick);
            fired += 1;
            assert!(fired < 10_000, "deadlines keep firing without time passing");
            if self.exited {
                return;
            }
        }
        self.now = end;
    }

    /// Let every claude die and time run out: every request still waited for must get its answer.
    fn finish(&mut self) {
        for _ in 0..50 {
            let live: Vec<u64> = self.procs.iter().filter(|(_, p)| !p.exited).map(|(id, _)| *id).collect();
            let waiting = self.clients.values().any(|c| c.open && c.answers < c.requests);
            if self.exited || !waiting {
                break; // (warm spares come back forever: only the waiting clients matter)
            }
            for proc in live {
                let p = self.procs.get_mut(&proc).unwrap();
                p.exited = true;
                if !p.spawned {
                    p.spawned = true;
                    self.feed(Input::SpawnFailed { proc, error: "gone".into() });
                } else {
                    self.feed(Input::Exited { proc, status: "killed by signal 9".into() });
                }
            }
            self.advance(Duration::from_secs(3600));
        }
        for (conn, c) in &self.clients {
            if c.open && !self.exited {
                assert_eq!(c.answers, c.requests, "conn {conn}: a request was never answered");
                assert!(!c.streaming, "conn {conn}: a stream never ended");
            }
        }
    }
}

#[test]
fn fuzz_engine_input_sequences() {
    let total = std::cell::Cell::new(0);
    run_cases("engine", 5_000, |rng| {
        let mut f = EngineFuzz::new(rng);
        for _ in 0..20 + rng.below(60) {
            f.step(rng);
        }
        f.finish();
        total.set(total.get() + f.inputs);
    });
    eprintln!("engine: {} inputs in all", total.get());
}
