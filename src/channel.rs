//! `synthesis channel`: the MCP server claude starts over stdio. It relays between Claude Code
//! (channel notifications in; `reply` and client-tool calls out) and the daemon's bridge WebSocket.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::wire::bridge::{self, FromChannel, ToChannel, ToolDef};
use crate::wire::mcp;

const STDIN: Token = Token(0);
const BRIDGE: Token = Token(1);

/// How long after `notifications/initialized` the channel says `ready` when claude never proves
/// its registration (see `Registration`): later than claude ever took, and logged.
const READY_FALLBACK: Duration = Duration::from_secs(1);

/// Between two `notifications/tools/list_changed` probes (see `Registration`).
const PROBE_INTERVAL: Duration = Duration::from_millis(5);

/// Claude drops channel messages that arrive before it has registered the channel's notification
/// handler. It registers it a few ms after its first `tools/list` is answered, in one synchronous
/// step that then registers its `notifications/tools/list_changed` handler (Claude Code 2.1.332);
/// a `list_changed` that comes earlier is ignored, and the first one after that step makes claude
/// list the tools again at once. So from its first `tools/list` answer on, the channel sends a
/// `list_changed` every `PROBE_INTERVAL`: claude's next `tools/list` proves the handler is there,
/// and only then is the channel `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// Claude's first `tools/list` is not answered yet.
    Discovering,
    /// Answered; probing with `list_changed` until claude's next `tools/list`.
    Probed,
    /// `ready` was sent.
    Ready,
}

struct Channel {
    poll: Poll,
    bridge: WebSocket<TcpStream>,
    stdin_buf: Vec<u8>,
    /// The client tools, once the daemon has sent them.
    catalog: Option<Vec<ToolDef>>,
    /// A `tools/list` that arrived before the catalog.
    held_list: Option<Value>,
    initialized: bool,
    registration: Registration,
    /// When to say `ready` without proof (`READY_FALLBACK` after `initialized`).
    ready_at: Option<Instant>,
    /// When to send the next `list_changed` probe.
    probe_at: Option<Instant>,
    /// Client-tool calls waiting for their result: call_ref → MCP request id.
    pending: HashMap<String, Value>,
    /// `reply` calls waiting for the daemon's `replied`: seq → MCP request id.
    replies: HashMap<u64, Value>,
    next_seq: u64,
    done: bool,
}

pub fn run() -> Result<(), String> {
    // Die with claude even if it forgets to close our stdin.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let url =
        std::env::var(bridge::ENV_URL).map_err(|_| format!("{} is not set: run by synthesis only", bridge::ENV_URL))?;
    let token = std::env::var(bridge::ENV_TOKEN).map_err(|_| format!("{} is not set", bridge::ENV_TOKEN))?;
    let bridge = connect(&url).map_err(|e| format!("cannot reach the synthesis bridge at {url}: {e}"))?;
    let poll = Poll::new().map_err(|e| e.to_string())?;
    let stdin = io::stdin().as_raw_fd();
    set_nonblocking(stdin).map_err(|e| e.to_string())?;
    let registry = poll.registry();
    registry.register(&mut SourceFd(&stdin), STDIN, Interest::READABLE).map_err(|e| e.to_string())?;
    let fd = bridge.get_ref().as_raw_fd();
    // Writable too: a frame larger than the socket buffer is finished when room frees up.
    let interest = Interest::READABLE | Interest::WRITABLE;
    registry.register(&mut SourceFd(&fd), BRIDGE, interest).map_err(|e| e.to_string())?;
    let mut channel = Channel {
        poll,
        bridge,
        stdin_buf: Vec::new(),
        catalog: None,
        held_list: None,
        initialized: false,
        registration: Registration::Discovering,
        ready_at: None,
        probe_at: None,
        pending: HashMap::new(),
        replies: HashMap::new(),
        next_seq: 0,
        done: false,
    };
    channel.send(&FromChannel::Hello { v: bridge::VERSION, token });
    // Frames that came with the handshake are already buffered: no readiness edge will announce them.
    channel.read_bridge().map_err(|e| e.to_string())?;
    channel.run().map_err(|e| format!("channel: {e}"))
}

fn connect(url: &str) -> io::Result<WebSocket<TcpStream>> {
    let addr = url.trim_start_matches("ws://").split('/').next().unwrap_or("");
    let stream = TcpStream::connect(addr)?;
    // Frames are small and each one matters now: without this, Nagle holds a `reply` behind an
    // unacknowledged heartbeat until the daemon next sends something (the turn after).
    stream.set_nodelay(true)?;
    let (ws, _) = tungstenite::client(url, stream).map_err(|e| io::Error::other(e.to_string()))?;
    ws.get_ref().set_nonblocking(true)?;
    Ok(ws)
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Channel {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(16);
        let heartbeat = Duration::from_secs(bridge::HEARTBEAT_SECS);
        let mut next_beat = Instant::now() + heartbeat;
        while !self.done {
            let wake = [self.ready_at, self.probe_at].into_iter().flatten().fold(next_beat, Instant::min);
            match self.poll.poll(&mut events, Some(wake.saturating_duration_since(Instant::now()))) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            for event in events.iter() {
                match event.token() {
                    STDIN => self.read_stdin()?,
                    _ => self.read_bridge()?,
                }
            }
            let now = Instant::now();
            if self.probe_at.is_some_and(|t| now >= t) {
                self.probe()?;
            }
            if self.ready_at.is_some_and(|t| now >= t) {
                log::warn!(
                    "channel: claude did not prove its channel registration in {READY_FALLBACK:?}; ready anyway"
                );
                self.say_ready();
            }
            if now >= next_beat {
                self.send(&FromChannel::Heartbeat);
                next_beat = now + heartbeat;
            }
        }
        Ok(())
    }

    fn read_stdin(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match io::stdin().lock().read(&mut buf) {
                Ok(0) => {
                    self.done = true; // claude closed our stdin: it is gone
                    break;
                }
                Ok(n) => self.stdin_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while let Some(end) = self.stdin_buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=end).collect();
            match serde_json::from_slice::<Value>(&line) {
                Ok(msg) => self.on_mcp(&msg)?,
                Err(_) if line.trim_ascii().is_empty() => {}
                Err(e) => log::warn!("channel: unreadable MCP line: {e}"),
            }
        }
        Ok(())
    }

    fn on_mcp(&mut self, msg: &Value) -> io::Result<()> {
        let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let Some(id) = msg.get("id") else {
            let field = |k: &str| params.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            match method {
                "notifications/initialized" => {
                    self.initialized = true;
                    if self.registration != Registration::Ready {
                        self.ready_at = Some(Instant::now() + READY_FALLBACK);
                    }
                }
                "notifications/claude/channel/permission_request" => self.send(&FromChannel::PermissionRequest {
                    request_id: field("request_id"),
                    tool_name: field("tool_name"),
                    description: field("description"),
                    input_preview: field("input_preview"),
                }),
                _ => {}
            }
            return Ok(()); // notifications need no answer
        };
        match method {
            "initialize" => {
                let version = params.get("protocolVersion").and_then(Value::as_str);
                write_line(&mcp::response(id, mcp::initialize_result(version)))
            }
            "tools/list" if self.catalog.is_none() => {
                self.held_list = Some(id.clone()); // answered when the catalog arrives
                Ok(())
            }
            "tools/list" => self.answer_tools_list(id),
            "tools/call" => self.call_tool(id, &params),
            "ping" => write_line(&mcp::response(id, json!({}))),
            // Includes `server/discover`, which must fail for Claude Code to go on to `initialize`.
            _ => write_line(&mcp::error(id, mcp::METHOD_NOT_FOUND, &format!("method not found: {method}"))),
        }
    }

    /// Answer `tools/list`; the first answer carries the registration probe, the next
    /// `tools/list` is its proof (see `Registration`).
    fn answer_tools_list(&mut self, id: &Value) -> io::Result<()> {
        write_line(&self.tools_list(id))?;
        self.send(&FromChannel::ToolsListed);
        match self.registration {
            Registration::Discovering => {
                self.registration = Registration::Probed;
                self.probe()?;
            }
            Registration::Probed => self.say_ready(),
            Registration::Ready => {}
        }
        Ok(())
    }

    fn probe(&mut self) -> io::Result<()> {
        self.probe_at = Some(Instant::now() + PROBE_INTERVAL);
        write_line(&mcp::notification("notifications/tools/list_changed", json!({})))
    }

    fn say_ready(&mut self) {
        if self.registration != Registration::Ready {
            self.registration = Registration::Ready;
            self.ready_at = None;
            self.probe_at = None;
            self.send(&FromChannel::Ready);
        }
    }

    fn tools_list(&self, id: &Value) -> String {
        let client = self.catalog.iter().flatten().map(mcp::client_tool);
        let tools: Vec<Value> = std::iter::once(mcp::reply_tool()).chain(client).collect();
        mcp::response(id, json!({"tools": tools}))
    }

    fn call_tool(&mut self, id: &Value, params: &Value) -> io::Result<()> {
        let name = params.get("name").and_then(Value::as_str).unwrap_or("");
        let args = params.get("arguments").cloned().unwrap_or(json!({}));
        if name == "reply" {
            // Answered when the daemon has taken it (`replied`): only then may claude go on to
            // end its turn.
            let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            self.next_seq += 1;
            self.replies.insert(self.next_seq, id.clone());
            self.send(&FromChannel::Reply { seq: self.next_seq, chat_id: arg("chat_id"), text: arg("text") });
            return Ok(());
        }
        if !self.catalog.iter().flatten().any(|t| t.name == name) {
            return write_line(&mcp::response(id, mcp::tool_text(&format!("unknown tool {name}"), true)));
        }
        // Answered when the client has run the tool (`tool_result`).
        let call_ref = id.to_string();
        self.pending.insert(call_ref.clone(), id.clone());
        self.send(&FromChannel::ToolCall { call_ref, name: name.to_string(), arguments: args });
        Ok(())
    }

    fn send(&mut self, frame: &FromChannel) {
        let text = serde_json::to_string(frame).expect("frames serialise");
        if let Err(e) = self.bridge.send(Message::text(text)) {
            if !is_would_block(&e) {
                log::warn!("channel: bridge send failed: {e}");
                self.done = true;
            }
        }
    }

    fn read_bridge(&mut self) -> io::Result<()> {
        loop {
            match self.bridge.read() {
                Ok(Message::Text(text)) => match serde_json::from_str::<ToChannel>(&text) {
                    Ok(frame) => self.on_frame(frame)?,
                    Err(e) => log::warn!("channel: unknown bridge frame: {e}"),
                },
                Ok(_) => {}
                Err(e) if is_would_block(&e) => break,
                Err(_) => {
                    // The daemon is gone or closed us: without it this channel is useless.
                    self.done = true;
                    break;
                }
            }
        }
        let _ = self.bridge.flush();
        Ok(())
    }

    fn on_frame(&mut self, frame: ToChannel) -> io::Result<()> {
        match frame {
            ToChannel::Deliver { chat_id, content } => write_line(&mcp::channel_message(&content, &chat_id)),
            ToChannel::Replied { seq } => match self.replies.remove(&seq) {
                Some(id) => write_line(&mcp::response(&id, mcp::tool_text("sent", false))),
                None => Ok(()),
            },
            ToChannel::Tools { tools } => {
                let changed = self.catalog.as_ref() != Some(&tools);
                self.catalog = Some(tools);
                if let Some(id) = self.held_list.take() {
                    self.answer_tools_list(&id)?;
                } else if changed && self.initialized {
                    write_line(&mcp::notification("notifications/tools/list_changed", json!({})))?;
                }
                Ok(())
            }
            ToChannel::Permission { request_id, behavior } => write_line(&mcp::notification(
                "notifications/claude/channel/permission",
                json!({"request_id": request_id, "behavior": behavior}),
            )),
            ToChannel::ToolResult { call_ref, content, is_error } => match self.pending.remove(&call_ref) {
                Some(id) => write_line(&mcp::response(&id, mcp::tool_text(&content, is_error))),
                None => Ok(()),
            },
        }
    }
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

fn write_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}
