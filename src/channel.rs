//! `synthesis channel`: the MCP server claude starts over stdio. It relays between Claude Code
//! (channel notifications in, `reply` tool calls out) and the daemon's bridge WebSocket.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::wire::bridge::{self, FromChannel, ToChannel};
use crate::wire::mcp;

const STDIN: Token = Token(0);
const BRIDGE: Token = Token(1);

/// From `notifications/initialized` to `hello` (see `on_mcp`).
const HELLO_DELAY: Duration = Duration::from_millis(300);

struct Channel {
    hello_at: Option<Instant>,
    poll: Poll,
    url: String,
    token: String,
    bridge: Option<WebSocket<TcpStream>>,
    stdin_buf: Vec<u8>,
    done: bool,
}

pub fn run() -> Result<(), String> {
    // Die with claude even if it forgets to close our stdin.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let url =
        std::env::var(bridge::ENV_URL).map_err(|_| format!("{} is not set: run by synthesis only", bridge::ENV_URL))?;
    let token = std::env::var(bridge::ENV_TOKEN).map_err(|_| format!("{} is not set", bridge::ENV_TOKEN))?;
    let poll = Poll::new().map_err(|e| e.to_string())?;
    let stdin = io::stdin().as_raw_fd();
    set_nonblocking(stdin).map_err(|e| e.to_string())?;
    poll.registry().register(&mut SourceFd(&stdin), STDIN, Interest::READABLE).map_err(|e| e.to_string())?;
    let mut channel = Channel { hello_at: None, poll, url, token, bridge: None, stdin_buf: Vec::new(), done: false };
    channel.run().map_err(|e| format!("channel: {e}"))
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
            let wake = self.hello_at.map_or(next_beat, |h| h.min(next_beat));
            let timeout = wake.saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            for event in events.iter() {
                match event.token() {
                    STDIN => self.read_stdin()?,
                    _ => self.read_bridge(),
                }
            }
            if self.hello_at.is_some_and(|t| Instant::now() >= t) {
                self.hello_at = None;
                self.connect_bridge()?;
            }
            if Instant::now() >= next_beat {
                self.send(&FromChannel::Heartbeat);
                next_beat = Instant::now() + heartbeat;
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
        if let Ok(path) = std::env::var("SYNTHESIS_CHANNEL_TRACE") {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{t} {msg}")?;
        }
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let Some(id) = msg.get("id") else {
            if method == "notifications/initialized" {
                // Claude registers the channel's notification handler a few ms after this, with
                // no sign on the wire; messages before that are dropped. Say hello a little later.
                self.hello_at = Some(Instant::now() + HELLO_DELAY);
            }
            return Ok(()); // other notifications need no answer
        };
        let answer = match method {
            "initialize" => {
                let version = params.get("protocolVersion").and_then(Value::as_str);
                mcp::response(id, mcp::initialize_result(version))
            }
            "tools/list" => mcp::response(id, json!({"tools": [mcp::reply_tool()]})),
            "tools/call" => mcp::response(id, self.call_tool(&params)),
            "ping" => mcp::response(id, json!({})),
            // Includes `server/discover`, which must fail for Claude Code to go on to `initialize`.
            _ => mcp::error(id, mcp::METHOD_NOT_FOUND, &format!("method not found: {method}")),
        };
        write_line(&answer)
    }

    fn call_tool(&mut self, params: &Value) -> Value {
        let name = params.get("name").and_then(Value::as_str).unwrap_or("");
        let args = params.get("arguments").cloned().unwrap_or(Value::Null);
        let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        match name {
            "reply" => {
                self.send(&FromChannel::Reply { chat_id: arg("chat_id"), text: arg("text") });
                mcp::tool_text("sent", false)
            }
            _ => mcp::tool_text(&format!("unknown tool {name}"), true),
        }
    }

    /// Connect to the daemon once MCP is up, and say hello: that makes the process ready.
    fn connect_bridge(&mut self) -> io::Result<()> {
        if self.bridge.is_some() {
            return Ok(());
        }
        let addr = self.url.trim_start_matches("ws://").split('/').next().unwrap_or("").to_string();
        let stream = TcpStream::connect(&addr)?;
        let (ws, _) = tungstenite::client(self.url.as_str(), stream).map_err(|e| io::Error::other(e.to_string()))?;
        let fd = ws.get_ref().as_raw_fd();
        ws.get_ref().set_nonblocking(true)?;
        self.poll.registry().register(&mut SourceFd(&fd), BRIDGE, Interest::READABLE)?;
        self.bridge = Some(ws);
        let token = self.token.clone();
        self.send(&FromChannel::Hello { v: bridge::VERSION, token });
        Ok(())
    }

    fn send(&mut self, frame: &FromChannel) {
        let Some(ws) = &mut self.bridge else { return };
        let text = serde_json::to_string(frame).expect("frames serialise");
        if let Err(e) = ws.send(Message::text(text)) {
            if !is_would_block(&e) {
                log::warn!("channel: bridge send failed: {e}");
                self.done = true;
            }
        }
    }

    fn read_bridge(&mut self) {
        let Some(ws) = &mut self.bridge else { return };
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => match serde_json::from_str::<ToChannel>(&text) {
                    Ok(ToChannel::Deliver { chat_id, content }) => {
                        if write_line(&mcp::channel_message(&content, &chat_id)).is_err() {
                            self.done = true;
                        }
                    }
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
        let _ = ws.flush();
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
