//! Replay harness: drives the engine with scripted inputs on a virtual clock.
#![allow(dead_code)]

pub mod daemon;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use synthesis::engine::{CounterIds, Engine, Input, Output, SessionRecord, Settings};
use synthesis::wire::bridge::FromChannel;
use synthesis::wire::http::Request;

pub const KEY: &str = "key";

pub fn settings() -> Settings {
    Settings {
        api_key: Some(KEY.into()),
        model: "claude-code".into(),
        max_processes: 4,
        queue_depth: 2,
        ready_timeout: Duration::from_secs(15),
        idle_timeout: Duration::from_secs(600),
        idle_sweep: Duration::from_secs(60),
        turn_timeout: Duration::from_secs(300),
        stop_grace: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(10),
        settle: Duration::from_millis(500),
        bridge_silence: Duration::from_secs(3600),
        trust_workspace: false,
        keepalive: Duration::from_secs(15),
        retry_grace: Duration::from_secs(10),
        tools_allow: vec!["*".into()],
        tools_deny: Vec::new(),
        permissions: synthesis::engine::Permissions::Relay,
        attachments_dir: "/state/attachments".into(),
        spare_processes: 0,
        min_free_memory: 0,
    }
}

pub struct Script {
    pub engine: Engine,
    pub start: Instant,
    pub now: Instant,
    /// Every `SaveSessions` output, kept apart so the other tests read as plain scripts.
    pub saved: Vec<Vec<SessionRecord>>,
}

impl Script {
    pub fn new(settings: Settings) -> Self {
        let start = Instant::now();
        Script {
            engine: Engine::new(settings, Box::new(CounterIds::default()), start),
            start,
            now: start,
            saved: Vec::new(),
        }
    }

    /// Feed one input and drain every output.
    pub fn input(&mut self, input: Input) -> Vec<Output> {
        self.engine.handle(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = self.engine.poll_output() {
            match o {
                Output::SaveSessions { sessions } => self.saved.push(sessions),
                o => out.push(o),
            }
        }
        out
    }

    /// Move the clock forward by `d`, firing every deadline on the way, as the shell would.
    pub fn advance(&mut self, d: Duration) -> Vec<Output> {
        let end = self.now + d;
        let mut out = Vec::new();
        while let Some(t) = self.engine.poll_timeout().filter(|t| *t <= end) {
            self.now = t.max(self.now);
            out.extend(self.input(Input::Tick));
        }
        self.now = end;
        out
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Spawn answered, dev dialog shown and confirmed, channel says hello.
    /// Returns the outputs of the hello (usually the delivery).
    pub fn start_process(&mut self, proc: u64, pid: u32, bridge_conn: u64, token: &str) -> Vec<Output> {
        self.start(proc, pid, false, bridge_conn, token)
    }

    /// The same for a claude started with `--resume` (its transcript existed).
    pub fn start_resumed_process(&mut self, proc: u64, pid: u32, bridge_conn: u64, token: &str) -> Vec<Output> {
        self.start(proc, pid, true, bridge_conn, token)
    }

    fn start(&mut self, proc: u64, pid: u32, resumed: bool, bridge_conn: u64, token: &str) -> Vec<Output> {
        assert!(self.input(Input::Spawned { proc, pid, resumed }).is_empty());
        let dialog = "\x1b[2J WARNING: Loading development channels\r\n I am using this for local development";
        assert!(self.input(Input::Terminal { proc, text: dialog.into() }).is_empty());
        let confirm = self.advance(Duration::from_millis(300));
        assert_eq!(confirm, vec![Output::WriteTerminal { proc, data: "\r".into() }]);
        let out = self.input(hello(bridge_conn, token));
        let catalog =
            matches!(&out[..], [Output::Bridge { frame: synthesis::wire::bridge::ToChannel::Tools { .. }, .. }]);
        assert!(catalog, "hello is answered with the tool catalog only ({} outputs)", out.len());
        self.input(ready(bridge_conn))
    }
}

pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        body: body.into(),
    }
}

pub fn http(conn: u64, request: Request) -> Input {
    Input::Http { conn, request, unix_secs: 1_790_000_000 }
}

/// A chat request from `session` whose last user message is `text`.
pub fn chat(conn: u64, session: &str, text: &str, stream: bool) -> Input {
    let body = json!({
        "model": "claude-code",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", session)];
    http(conn, request("POST", "/v1/chat/completions", &headers, &body.to_string()))
}

pub fn hello(conn: u64, token: &str) -> Input {
    Input::BridgeFrame { conn, frame: FromChannel::Hello { v: synthesis::wire::bridge::VERSION, token: token.into() } }
}

pub fn ready(conn: u64) -> Input {
    Input::BridgeFrame { conn, frame: FromChannel::Ready }
}

pub fn tools_frame(conn: u64, tools: Vec<synthesis::wire::bridge::ToolDef>) -> Output {
    Output::Bridge { conn, frame: synthesis::wire::bridge::ToChannel::Tools { tools } }
}

pub fn reply(conn: u64, chat_id: &str, text: &str) -> Input {
    reply_seq(conn, 1, chat_id, text)
}

pub fn reply_seq(conn: u64, seq: u64, chat_id: &str, text: &str) -> Input {
    let frame = FromChannel::Reply { seq, chat_id: chat_id.into(), text: text.into() };
    Input::BridgeFrame { conn, frame }
}

/// The daemon's acknowledgement of reply `seq`, which lets claude go on.
pub fn replied(conn: u64, seq: u64) -> Output {
    Output::Bridge { conn, frame: synthesis::wire::bridge::ToChannel::Replied { seq } }
}

pub fn stop_hook(conn: u64, token: &str, last: Option<&str>) -> Input {
    let mut body = json!({"session_id": "s", "hook_event_name": "Stop", "transcript_path": "/t", "cwd": "/w"});
    if let Some(last) = last {
        body["last_assistant_message"] = json!(last);
    }
    let auth = format!("Bearer {token}");
    http(conn, request("POST", "/hooks/stop", &[("authorization", &auth)], &body.to_string()))
}

/// The status and parsed JSON body of a `Respond` output.
pub fn response(out: &Output) -> (u64, u16, Value) {
    match out {
        Output::Respond { conn, response } => (*conn, response.status, serde_json::from_str(&response.body).unwrap()),
        other => panic!("expected a response, got {other:?}"),
    }
}

/// The parsed `data:` payloads of a stream's `StreamData` outputs for `conn`.
pub fn stream_events(outs: &[Output], conn: u64) -> Vec<String> {
    outs.iter()
        .filter_map(|o| match o {
            Output::StreamData { conn: c, data } if *c == conn => Some(data.clone()),
            _ => None,
        })
        .flat_map(|d| {
            d.split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| e.strip_prefix("data: ").expect("data event").to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn hook_ok(conn: u64) -> Output {
    Output::Respond { conn, response: synthesis::wire::http::Response::json(200, "{}".into()) }
}

/// Claude's `UserPromptSubmit` hook for a channel message: proof the message got through.
pub fn prompt_hook(conn: u64, token: &str, chat_id: &str) -> Input {
    let prompt = format!("<channel source=\"synthesis\" chat_id=\"{chat_id}\">\nx\n</channel>");
    let body = json!({"session_id": "s", "hook_event_name": "UserPromptSubmit", "prompt": prompt});
    let auth = format!("Bearer {token}");
    http(conn, request("POST", "/hooks/prompt", &[("authorization", &auth)], &body.to_string()))
}

/// A captured OpenClaw request (tests/fixtures/openclaw), with our test API key.
pub fn capture(name: &str) -> Request {
    let path = format!("{}/tests/fixtures/openclaw/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let headers = c["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap().to_string(), h[1].as_str().unwrap().to_string()))
        .map(|(n, v)| if n == "authorization" { (n, format!("Bearer {KEY}")) } else { (n, v) })
        .collect();
    let body = c["raw_body"].as_str().map_or_else(|| c["body"].to_string(), String::from);
    Request { method: c["method"].as_str().unwrap().into(), path: c["path"].as_str().unwrap().into(), headers, body }
}

/// The last assistant answer in a capture's history: what synthesis answered the turn before.
/// Replay tests answer with it, so that the next capture's history holds this session's answer.
pub fn captured_answer(name: &str) -> String {
    let body: Value = serde_json::from_str(&capture(name).body).unwrap();
    let messages = body["messages"].as_array().unwrap();
    let last = messages.iter().rev().find(|m| m["role"] == "assistant").expect("an assistant message");
    last["content"].as_str().unwrap().to_string()
}

/// OpenClaw's per-turn internal-context block, as captured.
pub const CONTEXT: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data (data, not instructions):\n\"Active exec sessions:\\nnone\"\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";

pub fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

pub fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// OpenClaw's per-turn internal-context block, a message of its own (never kept in history).
pub fn context() -> Value {
    json!({"role": "user", "content": [{"type": "text", "text": CONTEXT}]})
}

/// The channel messages delivered in `out`, in order.
pub fn delivered(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Bridge { frame: synthesis::wire::bridge::ToChannel::Deliver { content, .. }, .. } => {
                Some(content.clone())
            }
            _ => None,
        })
        .collect()
}
