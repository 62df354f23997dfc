//! End-to-end tests against the real Claude Code CLI, offline: claude talks to the scripted
//! fake Anthropic API in `tests/real_claude/fake_anthropic.py`, in an isolated, seeded HOME.
//!
//! They need the CLI, so plain `cargo test` lists them as ignored. `.ci/run` installs the pinned
//! version and runs them with `SYNTHESIS_REAL_CLAUDE=<path to claude> cargo test --test real_claude -- --ignored`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};
use support::daemon::*;

const API_KEY_ENV: &str = "sk-ant-test-offline-key";
const NEEDS: &str = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)";

/// The scripted Anthropic API, on a loopback port.
struct FakeApi {
    child: Child,
    port: String,
    log: PathBuf,
}

impl FakeApi {
    fn start(dir: &std::path::Path) -> FakeApi {
        let log = dir.join("api.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/real_claude/fake_anthropic.py");
        let mut child =
            Command::new("python3").args([script, log.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("PORT ").expect("fake API port").to_string();
        FakeApi { child, port, log }
    }

    /// claude's environment: offline, and this API as its endpoint.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = offline_env();
        env.push(("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{}", self.port)));
        env
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake Anthropic API plus a synthesis whose claude_command is the real CLI.
struct Real {
    api: FakeApi,
    claude: PathBuf,
    daemon: Option<Daemon>,
    /// Config lines for every start.
    extra: String,
}

impl Real {
    fn start(name: &str) -> Real {
        Real::start_with(name, true, "")
    }

    /// `trusted`: the seeded HOME trusts the workspace already (as after running claude there once);
    /// `extra`: config lines for every start.
    fn start_with(name: &str, trusted: bool, extra: &str) -> Real {
        let claude = PathBuf::from(std::env::var("SYNTHESIS_REAL_CLAUDE").expect(NEEDS));
        let dir = std::env::temp_dir().join(format!("synthesis-real-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "ws", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        seed_home(&dir, trusted);
        let api = FakeApi::start(&dir);
        let mut real = Real { api, claude, daemon: None, extra: extra.to_string() };
        real.restart_daemon(dir);
        real
    }

    fn restart_daemon(&mut self, dir: PathBuf) {
        let env = self.api.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let extra = format!("retry_grace = 1s\n{}", self.extra);
        self.daemon = Some(Daemon::launch(dir, &self.claude, &extra, &env));
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// The /v1/messages bodies claude sent, in order.
    fn api_requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.api.log).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The `<channel>` bodies in the newest API request that carries any.
    fn channel_bodies_seen_last(&self) -> Vec<String> {
        let bodies = |r: &Value| channel_bodies(&r["messages"].to_string());
        self.api_requests().iter().rev().map(bodies).find(|b| !b.is_empty()).unwrap_or_default()
    }
}

/// The inner texts of every `<channel ...>...</channel>` in JSON-escaped messages.
fn channel_bodies(s: &str) -> Vec<String> {
    s.split("<channel ")
        .skip(1)
        .filter_map(|part| {
            let (attrs, body) = part.split_once('>')?;
            // Skip the example tag in the channel's instructions, which claude also shows the model.
            attrs.contains("chat-").then_some(())?;
            Some(body.split_once("</channel>")?.0.replace("\\n", "\n").trim().to_string())
        })
        .collect()
}

/// What `claude` needs in HOME to start unattended: onboarding done, the API key approved,
/// the workspace trusted (`"projects": "WS"` for the doctor helper), and the channel feature flags
/// a claude.ai login would fetch.
fn seed() -> Value {
    json!({
        "hasCompletedOnboarding": true,
        "theme": "dark",
        // claude remembers approved keys by their last 20 characters.
        "customApiKeyResponses": {"approved": [&API_KEY_ENV[API_KEY_ENV.len() - 20..]], "rejected": []},
        "cachedGrowthBookFeatures": {"tengu_harbor": true, "tengu_harbor_permissions": true},
        "projects": "WS",
    })
}

fn seed_home(dir: &std::path::Path, trusted: bool) {
    let ws = dir.join("ws").canonicalize().unwrap();
    let mut cfg = seed();
    cfg["projects"] = json!({});
    if trusted {
        cfg["projects"] = json!({ws.to_str().unwrap(): {
            "hasTrustDialogAccepted": true, "hasCompletedProjectOnboarding": true, "allowedTools": [], "mcpServers": {}
        }});
    }
    std::fs::write(dir.join("home/.claude.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// The environment of an offline claude (the fake API's port aside).
fn offline_env() -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_API_KEY", API_KEY_ENV.into()),
        ("DISABLE_AUTOUPDATER", "1".into()),
        ("DISABLE_TELEMETRY", "1".into()),
        ("DISABLE_ERROR_REPORTING", "1".into()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
        ("CLAUDE_CODE_GB_DISK_CACHE_WHEN_TELEMETRY_OFF", "1".into()),
    ]
}

fn real_doctor(name: &str, seed: Value) -> (bool, String) {
    let claude = PathBuf::from(std::env::var("SYNTHESIS_REAL_CLAUDE").expect(NEEDS));
    // Without a reachable API endpoint claude spends ~18 s retrying its policy fetch at start.
    let api_dir = std::env::temp_dir().join(format!("synthesis-real-doctor-api-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&api_dir).unwrap();
    let api = FakeApi::start(&api_dir);
    let env = api.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = doctor(&format!("real-{name}"), &claude, Some(seed), &env);
    (out.status.success(), report(&out))
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn doctor_passes_with_a_working_channel() {
    let (ok, text) = real_doctor("fine", seed());
    assert!(ok, "{text}");
    assert!(text.contains("ok    version 2."), "{text}");
    assert!(text.contains("ok    claude registered the synthesis channel"), "{text}");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn doctor_explains_a_channels_feature_that_is_off() {
    let mut s = seed();
    s["cachedGrowthBookFeatures"] = json!({});
    let (ok, text) = real_doctor("nochannels", s);
    assert!(!ok);
    assert!(
        text.contains("FIX   claude skipped the synthesis channel: channels feature is not currently available"),
        "{text}"
    );
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn doctor_explains_an_untrusted_workspace() {
    let mut s = seed();
    s["projects"] = json!({});
    let (ok, text) = real_doctor("untrusted", s);
    assert!(!ok);
    assert!(text.contains("is not trusted: run `claude` there once"), "{text}");
    assert!(text.contains("FIX   claude asks whether to trust the workspace"), "the real CLI asked: {text}");
}

fn content(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_turn_answered_through_reply_then_a_second_turn_delivers_only_the_new_text() {
    let real = Real::start("reply");
    let t = Instant::now();
    assert_eq!(content(&real.d().client().chat("a", "hello claude", false)), "echo: hello claude");
    eprintln!("cold start + first turn: {:?}", t.elapsed());
    let t = Instant::now();
    let r = real.d().client().chat("a", "second message", true);
    eprintln!("warm streamed turn: {:?}", t.elapsed());
    let text: String = r.events()[..r.events().len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(text, "echo: second message");
    assert_eq!(real.channel_bodies_seen_last(), ["hello claude", "second message"], "one message per turn");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_warm_spare_answers_a_new_sessions_first_turn_without_a_spawn() {
    let real = Real::start_with("spare", true, "spare_processes = 1");
    real.d().wait_log("process 1 ready after");
    let t = Instant::now();
    assert_eq!(content(&real.d().client().chat("new", "hello spare", false)), "echo: hello spare");
    eprintln!("new session's first turn on a warm spare: {:?}", t.elapsed());
    assert!(!real.d().log_lines("session new: takes the warm spare process 1").is_empty());
    assert!(real.d().log_lines("session new: spawning").is_empty(), "no spawn on the request path");
    real.d().wait_log("process 2 ready after");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_turn_across_heartbeats_and_a_large_reply_each_answer_their_own_question() {
    let real = Real::start("heartbeats");
    assert_eq!(content(&real.d().client().chat("a", "warm up", false)), "echo: warm up");
    // The model takes longer than two channel heartbeats before it replies.
    let slow = format!("#slow{} across heartbeats", 2 * synthesis::wire::bridge::HEARTBEAT_SECS + 1);
    assert_eq!(content(&real.d().client().chat("a", &slow, false)), format!("echo: {slow}"));
    let big = content(&real.d().client().chat("a", "#big300000 large", false));
    assert_eq!(big, format!("echo: #big300000 large\n{}", "y".repeat(300_000)));
    assert_eq!(content(&real.d().client().chat("a", "right after", false)), "echo: right after");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_turn_without_reply_is_answered_by_last_assistant_message_and_two_replies_both_arrive() {
    let real = Real::start("plain");
    assert_eq!(content(&real.d().client().chat("a", "#plain just text", false)), "PLAIN: #plain just text");
    assert_eq!(content(&real.d().client().chat("a", "#reply2 go", false)), "part 1\n\npart 2");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn after_a_restart_the_session_resumes_with_its_history() {
    let mut real = Real::start("resume");
    assert_eq!(content(&real.d().client().chat("a", "remember apples", false)), "echo: remember apples");
    let mut d = real.daemon.take().unwrap();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    let dir = d.dir.clone();
    drop(d);
    real.restart_daemon(dir);
    assert_eq!(content(&real.d().client().chat("a", "what was it", false)), "echo: what was it");
    assert_eq!(real.d().log_lines(" --resume ").len(), 1);
    assert_eq!(real.channel_bodies_seen_last(), ["remember apples", "what was it"], "history resumed");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_client_disconnect_interrupts_claude_and_the_next_turn_works() {
    let real = Real::start("interrupt");
    assert_eq!(content(&real.d().client().chat("a", "warm up", false)), "echo: warm up");
    let mut c = real.d().client();
    let body = r##"{"messages":[{"role":"user","content":"#slow30 take your time"}],"stream":true}"##;
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {API_KEY}\r\nx-session-affinity: a\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    c.send_raw(raw.as_bytes());
    wait_for("claude to call the API for the slow turn", || {
        real.channel_bodies_seen_last().last().is_some_and(|b| b.contains("#slow30")).then_some(())
    });
    drop(c);
    real.d().wait_log("interrupting chat-2");
    let t = Instant::now();
    assert_eq!(content(&real.d().client().chat("a", "after the interrupt", false)), "echo: after the interrupt");
    eprintln!("turn after interrupt: {:?}", t.elapsed());
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn an_api_error_ends_the_turn_with_an_error_response() {
    let real = Real::start("apierror");
    let r = real.d().client().chat("a", "#err400 fail please", false);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "claude_api_error");
    assert_eq!(content(&real.d().client().chat("a", "and now", false)), "echo: and now");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn the_tool_loop_through_a_real_claude() {
    let real = Real::start("toolloop");
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "t:0")];
    let ls = json!({"type": "function", "function": {"name": "ls", "description": "List a directory",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}});
    let first = json!({"messages": [{"role": "user", "content": "#tool list it"}], "tools": [ls]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &first.to_string());
    let call = r.json()["choices"][0]["message"]["tool_calls"][0].clone();
    assert_eq!(call["function"]["name"], "ls", "{}", r.body);
    let id: String = call["id"].as_str().unwrap().chars().filter(char::is_ascii_alphanumeric).collect();
    let second = json!({"messages": [
        {"role": "user", "content": "#tool list it"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": call["function"]}]},
        {"role": "tool", "tool_call_id": id, "content": "hello.txt"},
    ], "tools": [ls]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &second.to_string());
    assert_eq!(content(&r), "echo: tool result: hello.txt");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_permission_prompt_is_relayed_to_the_user_and_allowed() {
    let real = Real::start("permission");
    let asked = content(&real.d().client().chat("a", "#bash run it", false));
    assert!(asked.starts_with("Claude wants to use Bash"), "{asked}");
    let id = asked.split("`yes ").nth(1).and_then(|s| s.split('`').next()).expect("request id").to_string();
    let done = content(&real.d().client().chat("a", &format!("yes {id}"), false));
    assert_eq!(done, "echo: bash said: bash-ran");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_captured_openclaw_turn_with_its_48_kb_system_prompt_goes_through() {
    let real = Real::start("capture");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openclaw/gateway-http-alice-turn-one.json");
    let capture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut body = capture["body"].clone();
    body["stream"] = json!(false);
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "alice:0")];
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &body.to_string());
    let answer = content(&r);
    assert!(answer.starts_with("echo: <system_prompt from=\"client\">"), "{}", &answer[..answer.len().min(200)]);
    assert!(answer.contains("http alice turn one"));
    assert!(answer.len() > 40_000, "the whole system prompt reached Claude ({} bytes)", answer.len());
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn a_tool_added_mid_session_reaches_claude() {
    let real = Real::start("newtool");
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "t:0")];
    let tool = |name: &str| {
        json!({"type": "function", "function": {"name": name, "description": "a client tool",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}})
    };
    let first = json!({"messages": [{"role": "user", "content": "hello"}], "tools": [tool("ls")]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &first.to_string());
    assert_eq!(content(&r), "echo: hello");
    // Turn two offers one more tool; Claude must be able to call it at once.
    let second = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "echo: hello"},
        {"role": "user", "content": "#toolcat show it"}], "tools": [tool("ls"), tool("cat")]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &second.to_string());
    let call = &r.json()["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "cat", "{}", r.body);
}

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn an_image_reaches_the_model_as_an_image_block_after_claude_reads_it() {
    // Default settings: synthesis lets Claude Read its attachments without a permission prompt.
    let real = Real::start("image");
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "img:0")];
    let parts = json!([
        {"type": "text", "text": "#read what is in this picture?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}},
    ]);
    let body = json!({"messages": [{"role": "user", "content": parts}]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &body.to_string());
    assert_eq!(content(&r), "echo: read 1 image block(s)");
    // What claude sent the model after its Read: the file as an image block.
    let blocks: Vec<Value> = real
        .api_requests()
        .iter()
        .flat_map(|r| r["messages"].as_array().cloned().unwrap_or_default())
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["type"] == "tool_result")
        .flat_map(|b| b["content"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["type"] == "image")
        .collect();
    let source = &blocks.first().expect("an image block in a tool result")["source"];
    assert_eq!((source["type"].as_str(), source["media_type"].as_str()), (Some("base64"), Some("image/png")));
    assert_eq!(source["data"], PNG, "the bytes synthesis wrote");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn usage_is_the_scripted_apis_numbers_for_json_and_streamed_turns() {
    let real = Real::start("usage");
    // fake_anthropic.py's usage for a default turn's two calls: input 101 + 102, output 7 + 8,
    // cache read 5000 + 10000, cache creation 300.
    let expected = json!({"prompt_tokens": 203 + 15000 + 300, "completion_tokens": 15,
                          "total_tokens": 203 + 15000 + 300 + 15, "prompt_tokens_details": {"cached_tokens": 15000}});
    for i in 0..3 {
        let r = real.d().client().chat("a", &format!("count me {i}"), false);
        assert_eq!(r.json()["usage"], expected, "{}", r.body);
    }
    // An identical retry gets the same answer, and what it cost.
    assert_eq!(real.d().client().chat("a", "count me 2", false).json()["usage"], expected);
    let r = real.d().client().chat("a", "count me streamed", true);
    let events = r.events();
    let chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(chunk["usage"], expected);
    // One call, answered without `reply`.
    let r = real.d().client().chat("a", "#plain only text", false);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 101 + 5000 + 300);
    let waited = real.d().log_lines("usage may be short");
    assert!(waited.is_empty(), "the transcript always showed the answer in time: {waited:?}");
}

/// The workspace in `Real`'s seeded ~/.claude.json: is it trusted?
fn trusted_in_home(real: &Real) -> Option<bool> {
    let home = std::fs::read_to_string(real.d().dir.join("home/.claude.json")).unwrap();
    let home: Value = serde_json::from_str(&home).unwrap();
    let ws = real.d().dir.join("ws").canonicalize().unwrap();
    home["projects"][ws.to_str().unwrap()]["hasTrustDialogAccepted"].as_bool()
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn turns_another_model_answered_reach_the_model_once() {
    let real = Real::start("missed");
    assert_eq!(content(&real.d().client().chat("a", "hello", false)), "echo: hello");
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "a")];
    let body = json!({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "echo: hello"},
        {"role": "user", "content": "my name is Zed"}, {"role": "assistant", "content": "Nice to meet you, Zed."},
        {"role": "user", "content": "what is my name?"},
    ]});
    let r = real.d().client().request("POST", "/v1/chat/completions", &headers, &body.to_string());
    assert!(content(&r).ends_with("what is my name?"));
    let seen = real.channel_bodies_seen_last();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert!(seen[1].starts_with("<missed_conversation>"), "{}", seen[1]);
    assert!(seen[1].contains(
        "[user]: my name is Zed\n[assistant (another model)]: Nice to meet you, Zed.\n</missed_conversation>"
    ));
    assert_eq!(seen[1].matches("my name is Zed").count(), 1);
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn trust_workspace_yes_gets_claude_past_the_trust_screen_of_a_folder_it_has_never_seen() {
    let real = Real::start_with("trustyes", false, "trust_workspace = yes");
    assert_eq!(trusted_in_home(&real), None, "claude has never seen this folder");
    assert_eq!(
        content(&real.d().client().chat("a", "hello from a new folder", false)),
        "echo: hello from a new folder"
    );
    real.d().wait_log("accepting Claude Code's workspace-trust question");
    assert_eq!(trusted_in_home(&real), Some(true), "claude recorded the trust itself");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn without_trust_workspace_a_new_folder_fails_fast_with_advice() {
    let real = Real::start_with("trustno", false, "");
    let r = real.d().client().chat("a", "hello", false);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "workspace_not_trusted");
    assert_eq!(trusted_in_home(&real), None, "synthesis never accepts trust by itself");
}

#[test]
#[ignore = "needs the real Claude Code CLI: set SYNTHESIS_REAL_CLAUDE (see .ci/run)"]
fn doctor_with_trust_workspace_yes_reports_the_trust_claude_recorded() {
    let mut s = seed();
    s["projects"] = json!({});
    let claude = PathBuf::from(std::env::var("SYNTHESIS_REAL_CLAUDE").expect(NEEDS));
    let api_dir = std::env::temp_dir().join(format!("synthesis-real-doctor-api-trustyes-{}", std::process::id()));
    std::fs::create_dir_all(&api_dir).unwrap();
    let api = FakeApi::start(&api_dir);
    let mut env = api.env();
    env.push(("SYNTHESIS_TRUST_WORKSPACE", "yes".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = doctor("real-trustyes", &claude, Some(s), &env);
    let text = report(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    workspace trusted: ") && text.contains("claude recorded it"), "{text}");
    assert!(text.contains("ok    claude registered the synthesis channel"), "{text}");
}
