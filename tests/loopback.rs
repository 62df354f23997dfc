//! Loopback tests: the real binary, the scripted fake claude, HTTP on 127.0.0.1.

mod support;

use std::time::Instant;

use support::daemon::*;

#[test]
fn json_and_streamed_turns_two_sessions_and_process_reuse() {
    let d = Daemon::start("turns", "", &[]);
    let mut c = d.client();
    let r = c.chat("alice", "hello there", false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hello there");

    let r = c.chat("alice", "second turn", true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "echo: second turn");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert!(chunks.last().unwrap()["usage"].is_object());
    assert_eq!(d.log_lines("spawning process").len(), 1, "alice's second turn reused her claude");

    let r = Client::connect(d.port).chat("bob", "hi from bob", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hi from bob");
    assert_eq!(d.claude_pids().len(), 2, "two sessions, two claude processes");
    let delivered: Vec<String> = d.delivered().iter().map(|v| v["content"].as_str().unwrap().to_string()).collect();
    assert_eq!(delivered, ["hello there", "second turn", "hi from bob"]);
}

/// Headers, path, body, expected status.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str, u16);

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let d = Daemon::start("errors", "max_body = 1000", &[]);
    let auth = format!("Bearer {API_KEY}");
    let good = r#"{"messages":[{"role":"user","content":"x"}]}"#;
    let mut c = d.client();
    let cases: [Case; 5] = [
        (&[("x-session-affinity", "s")], "/v1/chat/completions", good, 401),
        (&[("authorization", "Bearer wrong"), ("x-session-affinity", "s")], "/v1/chat/completions", good, 401),
        (&[("authorization", &auth), ("x-session-affinity", "s")], "/v1/chat/completions", "{oops", 400),
        (&[("authorization", &auth), ("x-session-affinity", "s")], "/v1/chat/completions", r#"{"model":"m"}"#, 400),
        (&[("authorization", &auth)], "/v1/nope", good, 404),
    ];
    for (headers, path, body, status) in cases {
        let r = c.request("POST", path, headers, body);
        assert_eq!(r.status, status, "{}", r.body);
        let err = &r.json()["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty())
                && err["type"].is_string()
                && err["code"].is_string()
        );
    }
    // Same keep-alive connection still works; then an oversized body is refused and closed.
    assert_eq!(c.request("GET", "/healthz", &[], "").status, 200);
    let big = "x".repeat(1001);
    let r = c.request("POST", "/v1/chat/completions", &[("authorization", &auth)], &big);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert!(c.closed());
    assert_eq!(d.client().request("GET", "/healthz", &[], "").status, 200);
    assert!(d.claude_pids().is_empty(), "no bad request started a claude");
}

#[test]
fn sigterm_exits_zero_and_leaves_no_claude_or_channel() {
    let mut d = Daemon::start("sigterm", "", &[]);
    assert_eq!(d.client().chat("a", "one", false).status, 200);
    assert_eq!(d.client().chat("b", "two", false).status, 200);
    let pids = d.claude_pids();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| group_members(*p).len() >= 2), "claude and its channel run");
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    eprintln!("SIGTERM to exit: {:?}", t.elapsed());
    for pid in pids {
        assert!(group_members(pid).is_empty(), "group {pid} left behind");
    }
}

#[test]
fn sigkill_of_synthesis_takes_its_claudes_along() {
    let mut d = Daemon::start("sigkill", "", &[]);
    assert_eq!(d.client().chat("a", "one", false).status, 200);
    let pid = d.claude_pids()[0];
    d.signal(libc::SIGKILL);
    d.wait_exit();
    wait_for("claude and its channel to die", || group_members(pid).is_empty().then_some(()));
}

#[test]
fn crash_mid_turn_is_a_502_with_the_terminal_tail_and_the_next_turn_works() {
    let d = Daemon::start("crash", "", &[]);
    assert_eq!(d.client().chat("a", "warm up", false).status, 200);
    let t = Instant::now();
    let r = d.client().chat("a", "crash", false);
    assert_eq!(r.status, 502, "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("exit status 3") && msg.contains("crashing as scripted"), "{msg}");
    eprintln!("crash to error: {:?}", t.elapsed());
    let r = d.client().chat("a", "are you back", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: are you back");
    assert_eq!(d.claude_pids().len(), 2);
}

#[test]
fn a_claude_that_never_becomes_ready_fails_after_ready_timeout_and_is_gone() {
    let d = Daemon::start("hang", "ready_timeout = 1s", &[("FAKE_CLAUDE_SCREEN", "hang")]);
    let r = d.client().chat("a", "hello", false);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("ready_timeout"));
    let pid = d.claude_pids()[0];
    wait_for("the hung claude to be gone", || group_members(pid).is_empty().then_some(()));
}

#[test]
fn workspace_trust_screen_fails_fast_with_advice() {
    let d = Daemon::start("trust", "", &[("FAKE_CLAUDE_SCREEN", "trust")]);
    let r = d.client().chat("a", "hello", false);
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "workspace_not_trusted");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("Yes, I trust this folder"));
}

#[test]
fn trust_workspace_yes_answers_the_workspace_trust_screen() {
    let d = Daemon::start("trustyes", "trust_workspace = yes", &[("FAKE_CLAUDE_SCREEN", "trust")]);
    assert_eq!(d.client().chat("a", "hello", false).json()["choices"][0]["message"]["content"], "echo: hello");
    d.wait_log("accepting Claude Code's workspace-trust question (trust_workspace = yes)");
}

#[test]
fn concurrent_requests_on_one_session_get_separate_answers_in_order() {
    let d = Daemon::start("fifo", "", &[]);
    assert_eq!(d.client().chat("a", "warm up", false).status, 200);
    let port = d.port;
    let first = std::thread::spawn(move || Client::connect(port).chat("a", "sleep 0.5", false));
    wait_for("the first turn to be delivered", || (d.delivered().len() == 2).then_some(()));
    let second = Client::connect(d.port).chat("a", "second", false);
    let first = first.join().unwrap();
    assert_eq!(first.json()["choices"][0]["message"]["content"], "echo: sleep 0.5");
    assert_eq!(second.json()["choices"][0]["message"]["content"], "echo: second");
    assert_eq!(d.delivered().len(), 3, "delivered one by one, never merged");
}

#[test]
fn client_disconnect_interrupts_the_turn_and_the_next_turn_works() {
    let d = Daemon::start("disconnect", "retry_grace = 100ms", &[]);
    let mut c = d.client();
    let body = r#"{"messages":[{"role":"user","content":"sleep 30"}],"stream":true}"#;
    let auth = format!("Bearer {API_KEY}");
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nauthorization: {auth}\r\nx-session-affinity: a\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    c.send_raw(raw.as_bytes());
    wait_for("delivery", || (d.delivered().len() == 1).then_some(()));
    drop(c);
    d.wait_log("interrupting chat-1");
    let r = d.client().chat("a", "next", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: next");
}

/// The official `openai` Python SDK (`.ci/run` installs it; without it the test is skipped
/// visibly, or fails under CI).
#[test]
fn the_openai_python_sdk_gets_replies_streamed_and_not() {
    if !python_module("openai") {
        return;
    }
    let d = Daemon::start("sdk", "", &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let url = format!("http://127.0.0.1:{}/v1", d.port);
    let out = std::process::Command::new("python3").args([script, &url, API_KEY]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");
}

#[test]
fn a_huge_body_gets_413_even_while_the_client_is_still_sending() {
    let d = Daemon::start("huge", "max_body = 1000", &[]);
    let mut c = d.client();
    let body = "x".repeat(8 << 20);
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\ncontent-length: {}\r\n\r\n", body.len());
    c.send_raw(head.as_bytes());
    let mut writer = c.try_clone_stream();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let _ = writer.write_all(body.as_bytes()); // may fail once the server closes: fine
    });
    let r = c.read_response();
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    sender.join().unwrap();
}

/// The Claude session uuid of the first spawn log line with `flag`.
fn spawned_with(d: &Daemon, flag: &str) -> Vec<String> {
    d.log_lines(&format!(" {flag} ")).iter().map(|l| l.rsplit(' ').next().unwrap().to_string()).collect()
}

#[test]
fn after_a_restart_a_session_resumes_its_claude_session() {
    let mut d = Daemon::start("restart", "", &[]);
    assert_eq!(d.client().chat("a", "before restart", false).status, 200);
    let uuid = spawned_with(&d, "--session-id")[0].clone();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    let dir = d.dir.clone();
    drop(d);
    let d = Daemon::start_in(dir, "", &[]);
    let r = d.client().chat("a", "after restart", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: after restart");
    assert_eq!(spawned_with(&d, "--resume"), vec![uuid]);
}

#[test]
fn after_an_idle_kill_a_session_resumes_its_claude_session() {
    let d = Daemon::start("idle", "idle_timeout = 500ms\nidle_sweep = 200ms", &[]);
    assert_eq!(d.client().chat("a", "one", false).status, 200);
    let pid = d.claude_pids()[0];
    d.wait_log("idle longer than idle_timeout");
    wait_for("the idle claude to be gone", || group_members(pid).is_empty().then_some(()));
    let r = d.client().chat("a", "two", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: two");
    assert_eq!(spawned_with(&d, "--resume"), spawned_with(&d, "--session-id"));
}

#[test]
fn max_processes_is_never_exceeded() {
    let d = Daemon::start("pool", "max_processes = 2", &[]);
    let live = |d: &Daemon| d.claude_pids().into_iter().filter(|p| alive(*p)).count();
    for (round, key) in ["a", "b", "c", "a", "b"].into_iter().enumerate() {
        let r = d.client().chat(key, &format!("hi from {key} in round {round}"), false);
        assert_eq!(r.json()["choices"][0]["message"]["content"], format!("echo: hi from {key} in round {round}"));
        assert!(live(&d) <= 2, "more than 2 claudes alive");
    }
    assert_eq!(d.claude_pids().len(), 5, "each turn past the second evicted the least recently used");
}

#[test]
fn status_shows_processes_with_their_memory() {
    let d = Daemon::start("status", "", &[]);
    assert_eq!(d.client().chat("a", "one", false).status, 200);
    let auth = format!("Bearer {API_KEY}");
    let r = d.client().request("GET", "/status", &[("authorization", &auth)], "");
    let s = r.json();
    assert_eq!(s["sessions"][0]["key"], "a");
    assert_eq!(s["processes"][0]["state"], "ready");
    assert!(s["processes"][0]["rss_kib"].as_u64().is_some_and(|k| k > 0), "{s}");
}

#[test]
fn a_first_message_dropped_by_claude_is_delivered_again_and_answered_once() {
    let d = Daemon::start("dropfirst", "", &[("FAKE_CLAUDE_DROP_FIRST", "1")]);
    let r = d.client().chat("a", "are you there", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: are you there");
    d.wait_log("has not taken chat-1 yet, delivering again");
    let r = d.client().chat("a", "second", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: second");
    let delivered: Vec<String> = d.delivered().iter().map(|v| v["content"].as_str().unwrap().to_string()).collect();
    assert_eq!(delivered, ["are you there", "second"], "each message reached claude's turn once");
}

#[test]
fn the_tool_loop_end_to_end() {
    let d = Daemon::start("toolloop", "", &[]);
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", "t:0")];
    let ls = serde_json::json!({"type": "function", "function": {"name": "ls", "description": "List a directory",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}});
    let ask = r#"tool ls {"path":"."}"#;
    let first = serde_json::json!({"messages": [{"role": "user", "content": ask}], "tools": [ls]});
    let r = d.client().request("POST", "/v1/chat/completions", &headers, &first.to_string());
    let choice = &r.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{}", r.body);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(
        (call["function"]["name"].as_str(), call["function"]["arguments"].as_str()),
        (Some("ls"), Some(r#"{"path":"."}"#))
    );
    // OpenClaw runs the tool and sends the result, with the call id rewritten its way.
    let id: String = call["id"].as_str().unwrap().chars().filter(char::is_ascii_alphanumeric).collect();
    let second = serde_json::json!({"messages": [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "ls", "arguments": "{\"path\":\".\"}"}}]},
        {"role": "tool", "tool_call_id": id, "content": "\"hello.txt\""},
    ], "tools": [ls]});
    let r = d.client().request("POST", "/v1/chat/completions", &headers, &second.to_string());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: tool result: \"hello.txt\"", "{}", r.body);
    assert_eq!(d.delivered().len(), 1, "the tool result is not a new message");
}

#[test]
fn a_permission_request_round_trip_through_the_user() {
    let d = Daemon::start("perm", "", &[]);
    let r = d.client().chat("p", "perm Bash", false);
    let text = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.starts_with("Claude wants to use Bash") && text.contains("`yes abcde`"), "{text}");
    let r = d.client().chat("p", "yes abcde", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: permission allow");
    assert_eq!(d.delivered().len(), 1, "the verdict is not a message");
}

/// Run `turns` on a daemon in `dir` with a trace; returns the trace's records.
fn traced_run(d: Daemon, turns: &[(&str, &str)]) -> (Daemon, Vec<synthesis::trace::Record>) {
    let mut d = d;
    for (key, text) in turns {
        assert_eq!(d.client().chat(key, text, false).status, 200);
    }
    assert_eq!(
        d.client()
            .request("POST", "/v1/chat/completions", &[("authorization", &format!("Bearer {API_KEY}"))], "{")
            .status,
        400
    );
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    let path = d.dir.join("trace.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(!text.contains(API_KEY), "the API key is never written");
    (d, synthesis::trace::parse(&text).unwrap())
}

/// Replay a trace with the daemon's settings (no api_key: it was redacted) and compare.
fn assert_replays(d: &Daemon, records: &[synthesis::trace::Record]) -> Vec<synthesis::engine::Output> {
    let conf = std::fs::read_to_string(d.dir.join("synthesis.conf")).unwrap();
    let mut config = synthesis::config::Config::parse(&conf, |_| None).unwrap();
    config.api_key = None;
    let recorded = synthesis::trace::recorded_outputs(records);
    let replayed = synthesis::trace::replay(synthesis::engine::Settings::from_config(&config), records);
    for (i, (a, b)) in replayed.iter().zip(&recorded).enumerate() {
        assert_eq!(a, b, "output {i} differs");
    }
    assert_eq!(replayed.len(), recorded.len());
    assert_eq!(recorded.last(), Some(&synthesis::engine::Output::Exit));
    recorded
}

fn spawned_uuids(outputs: &[synthesis::engine::Output]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            synthesis::engine::Output::Spawn { spec, .. } => Some(spec.session_uuid.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_recorded_trace_replays_to_the_same_outputs() {
    let d = Daemon::start("trace", "", &[]);
    let dir = d.dir.clone();
    drop(d);
    let traced = format!("trace_file = {}", dir.join("trace.jsonl").display());
    let turns = [("a", "first"), ("a", "second"), ("b", "other session")];
    let (d, records) = traced_run(Daemon::start_in(dir.clone(), &traced, &[]), &turns);
    let first = spawned_uuids(&assert_replays(&d, &records));
    assert_eq!(first.len(), 2);
    // A second run starts from the saved session map: the trace carries it, replay still matches.
    drop(d);
    let (d, records) = traced_run(Daemon::start_in(dir, &traced, &[]), &[("a", "after restart")]);
    assert!(matches!(&records[0], synthesis::trace::Record::Restore { sessions } if sessions.len() == 2));
    assert_eq!(spawned_uuids(&assert_replays(&d, &records)), first[..1], "session a resumed its Claude session");
}

#[test]
fn accepting_resumes_after_running_out_of_file_descriptors() {
    let d = Daemon::start("emfile", "", &[]);
    let pid = d.child.id() as i32;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    let limit = libc::rlimit { rlim_cur: open_fds + 3, rlim_max: open_fds + 3 };
    assert_eq!(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) }, 0);
    // Three connections fit; the next ones wait in the listen backlog while accept fails.
    let first: Vec<Client> = (0..3).map(|_| d.client()).collect();
    let _idle: Vec<Client> = (0..2).map(|_| d.client()).collect();
    let mut last = d.client();
    last.send_raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    d.wait_log("accept failed");
    drop(first); // frees descriptors; no new connection will arrive to trigger an edge
    assert_eq!(last.read_response().status, 200);
}

#[test]
fn idle_keep_alive_connections_are_closed_but_never_a_turn_in_progress() {
    let d = Daemon::start("httpidle", "http_idle_timeout = 300ms", &[]);
    let mut idle = d.client();
    assert_eq!(idle.request("GET", "/healthz", &[], "").status, 200);
    let t = Instant::now();
    assert!(idle.closed(), "the server closed the idle connection");
    assert!(t.elapsed() < DEADLINE);
    // A turn longer than the idle timeout is answered on its connection.
    let r = d.client().chat("a", "sleep 1", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: sleep 1");
}

#[test]
fn a_relative_state_dir_works_though_claude_runs_in_the_workspace() {
    // The documented default is `state_dir = state`: claude (cwd = workspace) must still find the
    // MCP config and settings files synthesis writes there.
    let d = Daemon::start("relstate", "state_dir = state", &[]);
    let r = d.client().chat("a", "hello", false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hello");
    assert!(d.dir.join("state/sessions.json").exists(), "the state dir is next to the config's cwd");
}
