//! A scripted stand-in for the `claude` CLI, for tests, benchmarks and demos.
//!
//! It behaves like interactive Claude Code where synthesis can tell: it needs a terminal,
//! shows the development-channels warning and waits for Enter, keeps session files under
//! `$HOME/.claude/projects/...`, starts the channel from `--mcp-config` and speaks MCP to it,
//! calls the Stop hook from `--settings` when a turn ends, and aborts a turn on one ESC.
//!
//! Each channel message scripts its turn:
//!   plain text      → reply `echo: <text>`
//!   `sleep <secs>`  → wait (ESC interrupts), then echo
//!   `crash`         → exit 3 mid-turn
//!   `silent`        → end the turn without `reply` (last_assistant_message `silent-answer`)
//!   `tool <name> <json-args>` → call the channel's client tool, then reply `echo: tool result: <text>`
//!   `perm <tool>`   → ask permission (request id `abcde`), then reply `echo: permission <allow|deny>`
//!   `big <bytes>`   → reply `echo: big <bytes>`, a newline and that many `x` (multi-MB replies)
//!   `late`          → echo, but write the turn's last transcript line 150 ms after the Stop hook
//! Messages that arrive during a turn are merged into the next turn, as claude does.
//! The session file is a transcript like claude's: per turn the channel message, then two API
//! calls (`reply` asked for, then the answer) with the usage in `TRANSCRIPT_USAGE`.
//! Environment: `FAKE_CLAUDE_LOG=<path>` appends each channel notification as a JSON line;
//! `FAKE_CLAUDE_DROP_FIRST=1` drops the first notification (claude's registration race);
//! `FAKE_CLAUDE_SCREEN=hang` never shows the dialog, `=trust` shows the workspace-trust screen first;
//! `FAKE_CLAUDE_BALLAST_MB=<n>` holds n MiB resident, so that it weighs something like claude.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

enum Event {
    Mcp(Value),
    Key(u8),
    ChannelGone,
}

struct Fake {
    events: Receiver<Event>,
    to_channel: ChildStdin,
    /// Killed with our process group; never waited for, as claude exits first.
    _channel: Child,
    next_id: u64,
    settings: Value,
    /// Drop the first channel notification, as claude does when one arrives before it has
    /// registered the channel (`FAKE_CLAUDE_DROP_FIRST=1`).
    drop_next: bool,
    /// Channel notifications waiting for a turn.
    inbox: Vec<(String, String)>,
    /// The session transcript (`<uuid>.jsonl`).
    transcript: PathBuf,
    /// API calls written so far, for message ids.
    calls: u64,
}

/// Usage of the two API calls of each turn, as (input, output, cache read, cache creation): a
/// turn's usage is their sum, `prompt_tokens` 331, `completion_tokens` 5, `cached_tokens` 300.
pub const TRANSCRIPT_USAGE: [(u64, u64, u64, u64); 2] = [(11, 3, 100, 7), (13, 2, 200, 0)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version") {
        println!("0.0.0 (fake Claude Code)");
        return;
    }
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    if unsafe { libc::isatty(1) } == 0 {
        fail("Error: Input must be provided either through stdin or as a prompt argument when using --print");
    }
    if unsafe { libc::isatty(0) } == 0 {
        fail("Error: stdin is not a terminal");
    }
    let session_file = session_file(flag("--session-id"), flag("--resume"));
    let mb: usize = std::env::var("FAKE_CLAUDE_BALLAST_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    // Touched, so it is resident; kept until exit.
    let ballast = std::hint::black_box(vec![1u8; mb << 20]);
    raw_mode();
    std::mem::forget(ballast);
    let (tx, events) = channel();
    spawn_key_reader(tx.clone());
    match std::env::var("FAKE_CLAUDE_SCREEN").as_deref() {
        Ok("hang") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Ok("trust") => trust_screen(&events),
        _ => {}
    }
    if flag("--dangerously-load-development-channels").is_some() {
        // Drawn with cursor moves instead of spaces, like the real TUI.
        print!("\x1b[2J\x1b[H WARNING: Loading development channels\r\n");
        print!(" I\x1b[1Cam\x1b[1Cusing\x1b[1Cthis\x1b[1Cfor\x1b[1Clocal\x1b[1Cdevelopment\r\n   2. Exit\r\n");
        flush();
        wait_for_key(&events, b'\r');
        print!("\x1b[2J\x1b[H> \r\n");
        flush();
    }
    std::fs::OpenOptions::new().create(true).append(true).open(&session_file).expect("session file");
    let mcp = json_arg(&flag("--mcp-config").unwrap_or_else(|| fail("no --mcp-config")))
        .unwrap_or_else(|| fail("bad --mcp-config"));
    let settings: Value = flag("--settings").map_or(Value::Null, |s| json_arg(&s).expect("settings"));
    let (channel_child, to_channel) = start_channel(&mcp, tx);
    let mut fake = Fake {
        events,
        to_channel,
        _channel: channel_child,
        next_id: 0,
        settings,
        drop_next: std::env::var("FAKE_CLAUDE_DROP_FIRST").is_ok(),
        inbox: Vec::new(),
        transcript: session_file,
        calls: 0,
    };
    fake.handshake();
    if let Some(path) = flag("--debug-file") {
        // What claude logs once the channel's notifications are wired up.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("debug file");
        writeln!(f, "[DEBUG] MCP server \"synthesis\": Channel notifications registered").unwrap();
    }
    fake.serve();
}

/// Inline JSON, or the path of a file holding it (claude takes both for both flags).
fn json_arg(arg: &str) -> Option<Value> {
    let text = if arg.trim_start().starts_with('{') { arg.to_string() } else { std::fs::read_to_string(arg).ok()? };
    serde_json::from_str(&text).ok()
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

fn flush() {
    std::io::stdout().flush().unwrap();
}

/// `--session-id` must be new, `--resume` must exist; both name `<uuid>.jsonl` under the project.
fn session_file(new: Option<String>, resume: Option<String>) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let project: String =
        cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let dir = PathBuf::from(std::env::var("HOME").unwrap()).join(".claude/projects").join(project);
    std::fs::create_dir_all(&dir).unwrap();
    match (new, resume) {
        (Some(id), None) if dir.join(format!("{id}.jsonl")).exists() => {
            fail(&format!("Error: Session ID {id} is already in use."))
        }
        (None, Some(id)) if !dir.join(format!("{id}.jsonl")).exists() => {
            fail(&format!("No conversation found with session ID: {id}"))
        }
        (Some(id), None) | (None, Some(id)) => dir.join(format!("{id}.jsonl")),
        _ => dir.join(format!("{}.jsonl", std::process::id())),
    }
}

fn raw_mode() {
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(0, &mut t);
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(0, libc::TCSANOW, &t);
    }
}

fn spawn_key_reader(tx: Sender<Event>) {
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while let Ok(1) = std::io::stdin().read(&mut b) {
            if tx.send(Event::Key(b[0])).is_err() {
                return;
            }
        }
    });
}

/// The workspace-trust screen as Claude Code 2.1.332 draws it: "No, exit" selected, "Yes, I trust
/// this folder" below it; arrow down selects it, Enter confirms. Keys in the first 200 ms after
/// drawing are lost, as on the real screen. Enter on "No, exit" exits.
fn trust_screen(events: &Receiver<Event>) {
    print!("\x1b[2J\x1b[HQuick safety check: Is this a project you created or one you trust?\r\n");
    print!("  \x1b[1m❯ No, exit\x1b[0m\r\n    Yes, I trust this folder\r\n\r\n  Enter to confirm · Esc to cancel\r\n");
    flush();
    let drawn = Instant::now();
    let (mut keys, mut yes) = (Vec::new(), false);
    loop {
        let Ok(Event::Key(k)) = events.recv() else { continue };
        if drawn.elapsed() < Duration::from_millis(200) {
            continue;
        }
        keys.push(k);
        if keys.ends_with(b"\x1b[B") {
            yes = true;
            // Only the cells that changed, as the real TUI does under load.
            print!("\x1b[2;3H \x1b[3;3H❯");
            flush();
        } else if k == b'\r' && yes {
            print!("\x1b[2J\x1b[H");
            return;
        } else if k == b'\r' {
            std::process::exit(1);
        }
    }
}

fn wait_for_key(events: &Receiver<Event>, key: u8) {
    loop {
        if let Ok(Event::Key(k)) = events.recv() {
            if k == key {
                return;
            }
        }
    }
}

/// Start the `synthesis` server of `--mcp-config` with its env, as claude does.
fn start_channel(mcp: &Value, tx: Sender<Event>) -> (Child, ChildStdin) {
    let server = &mcp["mcpServers"]["synthesis"];
    let mut cmd = Command::new(server["command"].as_str().expect("command"));
    for a in server["args"].as_array().into_iter().flatten() {
        cmd.arg(a.as_str().unwrap());
    }
    for (k, v) in server["env"].as_object().into_iter().flatten() {
        cmd.env(k, v.as_str().unwrap());
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("channel");
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(Event::Mcp(v));
            }
        }
        let _ = tx.send(Event::ChannelGone);
    });
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

/// An HTTP hook: its URL and headers (with `$VAR`s from `allowedEnvVars` expanded).
type Hook = (String, HashMap<String, String>);

fn http_hook(settings: &Value, event: &str) -> Option<Hook> {
    let hook = &settings["hooks"][event][0]["hooks"][0];
    let url = hook["url"].as_str()?.to_string();
    let mut headers = HashMap::new();
    for (k, v) in hook["headers"].as_object().into_iter().flatten() {
        let mut v = v.as_str().unwrap().to_string();
        for var in hook["allowedEnvVars"].as_array().into_iter().flatten() {
            let var = var.as_str().unwrap();
            v = v.replace(&format!("${var}"), &std::env::var(var).unwrap_or_default());
        }
        headers.insert(k.clone(), v);
    }
    Some((url, headers))
}

impl Fake {
    fn send(&mut self, msg: Value) {
        let mut line = msg.to_string();
        line.push('\n');
        if self.to_channel.write_all(line.as_bytes()).is_err() {
            std::process::exit(0);
        }
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            match self.events.recv() {
                Ok(Event::Mcp(v)) if v["id"] == json!(id) => return v,
                Ok(Event::Mcp(v)) => self.note(v),
                Ok(Event::Key(_)) => {}
                Ok(Event::ChannelGone) | Err(_) => std::process::exit(0),
            }
        }
    }

    fn handshake(&mut self) {
        let discover = self.request("server/discover", json!({}));
        assert_eq!(discover["error"]["code"], -32601, "server/discover must fail");
        let init = self.request("initialize", json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "fake-claude", "version": "0"}}));
        assert!(init["result"]["capabilities"]["experimental"]["claude/channel"].is_object(), "not a channel: {init}");
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        let tools = self.request("tools/list", json!({}));
        assert!(tools["result"]["tools"].as_array().unwrap().iter().any(|t| t["name"] == "reply"));
    }

    /// Remember a channel notification for the next turn (and log it).
    fn note(&mut self, v: Value) {
        if v["method"] == "notifications/tools/list_changed" {
            // Like claude: fetch the new list (its answer is not waited for).
            self.send(json!({"jsonrpc": "2.0", "id": "relist", "method": "tools/list"}));
            return;
        }
        if v["method"] != "notifications/claude/channel" {
            return;
        }
        let p = &v["params"];
        if std::mem::take(&mut self.drop_next) {
            return;
        }
        if let Ok(path) = std::env::var("FAKE_CLAUDE_LOG") {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            // One write per line: every fake claude appends to the same file at once.
            let line = format!("{}\n", json!({"content": p["content"], "meta": p["meta"]}));
            f.write_all(line.as_bytes()).unwrap();
        }
        let chat_id = p["meta"]["chat_id"].as_str().unwrap_or("").to_string();
        self.inbox.push((chat_id, p["content"].as_str().unwrap_or("").to_string()));
    }

    fn serve(&mut self) {
        loop {
            match self.events.recv() {
                Ok(Event::Mcp(v)) => self.note(v),
                Ok(Event::Key(_)) => {}
                Ok(Event::ChannelGone) | Err(_) => std::process::exit(0),
            }
            if !self.inbox.is_empty() {
                // Everything queued so far becomes one turn, as in the real CLI.
                let msgs = std::mem::take(&mut self.inbox);
                let chat_id = msgs.last().unwrap().0.clone();
                let text = msgs.into_iter().map(|(_, t)| t).collect::<Vec<_>>().join("\n");
                self.turn(&chat_id, &text);
            }
        }
    }

    fn turn(&mut self, chat_id: &str, text: &str) {
        let prompt = format!("<channel source=\"synthesis\" chat_id=\"{chat_id}\">\n{text}\n</channel>");
        self.call_hook("UserPromptSubmit", json!({"prompt": prompt}));
        self.write_transcript(json!({"type": "user", "message": {"role": "user", "content": prompt}}));
        let script = text.trim();
        let last = if script == "crash" {
            print!("crashing as scripted\r\n");
            flush();
            std::process::exit(3);
        } else if script == "silent" {
            "silent-answer".to_string()
        } else {
            if let Some(secs) = script.strip_prefix("sleep ").and_then(|s| s.trim().parse::<f64>().ok()) {
                if !self.sleep(Duration::from_secs_f64(secs)) {
                    print!("  ⎿  Interrupted · What should Claude do instead?\r\n");
                    flush();
                    return; // no Stop hook after an interrupt
                }
            }
            let answer = if let Some(tool) = script.strip_prefix("perm ") {
                format!("echo: permission {}", self.ask_permission(tool.trim()))
            } else {
                self.tool_or_echo(script, text)
            };

            self.api_call(0);
            let r = self.request("tools/call", json!({"name": "reply", "arguments": {"chat_id": chat_id, "text": answer}, "_meta": {"claudecode/toolUseId": "toolu_1"}}));
            assert_eq!(r["result"]["content"][0]["text"], "sent");
            "Replied.".to_string()
        };
        if script == "late" {
            // Like claude's batched writes: the answer's line lands after the Stop hook.
            self.call_hook("Stop", json!({"last_assistant_message": last}));
            std::thread::sleep(Duration::from_millis(150));
            self.api_call(1);
            return;
        }
        if script == "silent" {
            self.api_call(0);
        }
        self.api_call(1);
        self.call_hook("Stop", json!({"last_assistant_message": last}));
    }

    /// Write API call `n` of a turn to the transcript: 0 asks for the `reply` tool, 1 answers.
    fn api_call(&mut self, n: usize) {
        self.calls += 1;
        let (input, output, read, create) = TRANSCRIPT_USAGE[n];
        let (content, stop) = match n {
            0 => (json!([{"type": "tool_use", "name": "mcp__synthesis__reply", "input": {}}]), "tool_use"),
            _ => (json!([{"type": "text", "text": "Replied."}]), "end_turn"),
        };
        let usage = json!({"input_tokens": input, "output_tokens": output, "cache_read_input_tokens": read,
                           "cache_creation_input_tokens": create, "service_tier": "standard"});
        let message = json!({"id": format!("msg_fake_{}", self.calls), "type": "message", "role": "assistant",
                             "content": content, "stop_reason": stop, "usage": usage});
        self.write_transcript(json!({"type": "assistant", "message": message}));
    }

    fn write_transcript(&self, entry: Value) {
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.transcript).expect("transcript");
        f.write_all(format!("{entry}\n").as_bytes()).expect("transcript write");
    }

    /// `tool <name> <json-args>` calls the channel's client tool; `big <n>` echoes plus n bytes;
    /// anything else is echoed.
    fn tool_or_echo(&mut self, script: &str, text: &str) -> String {
        if let Some(n) = script.strip_prefix("big ").and_then(|n| n.trim().parse::<usize>().ok()) {
            return format!("echo: {text}\n{}", "x".repeat(n));
        }
        match script.strip_prefix("tool ").and_then(|rest| rest.split_once(' ')) {
            Some((name, args)) => {
                let args: Value = serde_json::from_str(args).unwrap_or(json!({}));
                let r = self.request("tools/call", json!({"name": name, "arguments": args}));
                format!("echo: tool result: {}", r["result"]["content"][0]["text"].as_str().unwrap_or(""))
            }
            None => format!("echo: {text}"),
        }
    }

    /// Ask the channel for permission to use `tool` (request id `abcde`) and wait for the verdict.
    fn ask_permission(&mut self, tool: &str) -> String {
        let params =
            json!({"request_id": "abcde", "tool_name": tool, "description": "scripted request", "input_preview": "{}"});
        self.send(
            json!({"jsonrpc": "2.0", "method": "notifications/claude/channel/permission_request", "params": params}),
        );
        loop {
            match self.events.recv() {
                Ok(Event::Mcp(v)) if v["method"] == "notifications/claude/channel/permission" => {
                    return v["params"]["behavior"].as_str().unwrap_or("").to_string()
                }
                Ok(Event::Mcp(v)) => self.note(v),
                Ok(Event::Key(_)) => {}
                Ok(Event::ChannelGone) | Err(_) => std::process::exit(0),
            }
        }
    }

    /// Sleep unless one ESC arrives; false when interrupted.
    fn sleep(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            match self.events.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(Event::Key(0x1b)) => return false,
                Ok(Event::Mcp(v)) => self.note(v),
                Ok(Event::Key(_)) => {}
                Ok(Event::ChannelGone) => std::process::exit(0),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => std::process::exit(0),
            }
        }
    }

    /// Call the HTTP hook for `event` with the common fields plus `fields`; like claude,
    /// wait for its answer before going on.
    fn call_hook(&self, event: &str, mut body: Value) {
        let Some((url, headers)) = http_hook(&self.settings, event) else { return };
        let rest = url.strip_prefix("http://").expect("http hook");
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        for (k, v) in
            [("session_id", "fake"), ("transcript_path", "/dev/null"), ("cwd", "."), ("hook_event_name", event)]
        {
            body[k] = json!(v);
        }
        let body = body.to_string();
        let mut req = format!("POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        // Like claude, wait for the hook's answer before going on.
        if let Ok(mut s) = TcpStream::connect(host) {
            let _ = s.write_all(req.as_bytes());
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
        }
    }
}
