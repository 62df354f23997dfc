//! What an operator sees: `/metrics` counters (replayed on a virtual clock), token usage from
//! claude's transcript (replayed, and end to end with the scripted fake claude), `/metrics`
//! through a real Prometheus parser, the command line and configuration from the environment.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::daemon::*;
use support::*;
use synthesis::engine::{CounterIds, Engine, Input, MetricsReport, Output, TranscriptRead, Usage};

fn metrics(s: &mut Script) -> MetricsReport {
    let out = s.input(http(90, request("GET", "/metrics", &[("authorization", "Bearer key")], "")));
    match &out[..] {
        [Output::Metrics { conn: 90, report }] => report.clone(),
        other => panic!("{other:?}"),
    }
}

fn usage(input: u64, output: u64, read: u64, create: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_read_input_tokens: read,
        cache_creation_input_tokens: create,
        calls: 1,
    }
}

/// What the shell reads from a transcript: `usage` for `chat_id`, and whether the turn's answer is there.
fn transcript(chat_id: &str, u: Usage, answered: bool) -> Input {
    let read = TranscriptRead { usage: vec![(Some(chat_id.into()), u)], answered: answered.then(|| chat_id.into()) };
    Input::Usage { proc: 1, read }
}

fn usage_json(out: &[Output], conn: u64) -> Value {
    let found = out.iter().find_map(|o| match o {
        Output::Respond { conn: c, response } if *c == conn => Some(response),
        _ => None,
    });
    let body: Value = serde_json::from_str(&found.expect("a response").body).unwrap();
    body["usage"].clone()
}

#[test]
fn a_turn_reports_the_usage_of_its_api_calls() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    s.input(reply(100, "chat-1", "hello"));
    assert!(s.input(transcript("chat-1", usage(10, 5, 100, 7), false)).is_empty());
    assert!(s.input(transcript("chat-1", usage(3, 2, 200, 0), true)).is_empty());
    let out = s.input(stop_hook(20, "t4", None));
    assert_eq!(out[0], hook_ok(20));
    assert_eq!(
        usage_json(&out, 10),
        json!({"prompt_tokens": 320, "completion_tokens": 7, "total_tokens": 327,
               "prompt_tokens_details": {"cached_tokens": 300}})
    );
}

#[test]
fn the_response_waits_briefly_for_a_last_api_call_written_after_the_stop_hook() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", true));
    s.start_process(1, 7, 100, "t3");
    s.input(reply(100, "chat-1", "hello"));
    // At Stop the transcript shows a call that asked for a tool: another call must follow.
    s.input(transcript("chat-1", usage(10, 5, 0, 0), false));
    assert_eq!(s.input(stop_hook(20, "t4", None)), vec![hook_ok(20)], "claude goes on; the response waits");
    assert_eq!(s.advance(Duration::from_millis(20)), vec![Output::ReadTranscript { proc: 1 }]);
    assert!(s.input(Input::Usage { proc: 1, read: TranscriptRead::default() }).is_empty());
    assert_eq!(s.advance(Duration::from_millis(20)), vec![Output::ReadTranscript { proc: 1 }]);
    let out = s.input(transcript("chat-1", usage(20, 1, 0, 0), true));
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 10 }));
    let events = stream_events(&out, 10);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 30);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    // The next turn is delivered at once, and times nothing out meanwhile.
    assert_eq!(
        s.input(chat(11, "a", "next", false)),
        vec![Output::Bridge {
            conn: 100,
            frame: synthesis::wire::bridge::ToChannel::Deliver { chat_id: "chat-2".into(), content: "next".into() }
        }]
    );
}

#[test]
fn a_last_api_call_that_never_appears_delays_the_answer_by_half_a_second_at_most() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    s.input(transcript("chat-1", usage(10, 5, 0, 0), false));
    s.input(stop_hook(20, "t4", Some("answer")));
    let out = s.advance(Duration::from_millis(499));
    assert!(out.iter().all(|o| *o == Output::ReadTranscript { proc: 1 }), "{out:?}");
    assert_eq!(out.len(), 24);
    let out = s.advance(Duration::from_millis(1));
    assert_eq!(usage_json(&out, 10)["prompt_tokens"], 10, "what was read");
    // A call of chat-1 read later counts in the metrics only.
    s.input(transcript("chat-1", usage(1000, 1, 0, 0), true));
    assert_eq!(metrics(&mut s).metrics.usage.input_tokens, 1010);
}

#[test]
fn a_process_whose_transcript_is_not_read_answers_at_stop() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(stop_hook(20, "t4", Some("answer")));
    assert_eq!(usage_json(&out, 10)["total_tokens"], 0);
}

#[test]
fn a_tool_call_response_reports_the_calls_so_far_and_the_next_response_the_rest() {
    let mut s = Script::new(settings());
    let ls = json!({"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}});
    let body = json!({"messages": [{"role": "user", "content": "list"}], "tools": [ls]});
    let headers = [("authorization", "Bearer key"), ("x-session-affinity", "t")];
    s.input(http(10, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    s.input(hello(100, "t3")); // not a full start: enough to bind the bridge
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    s.input(ready(100));
    s.input(transcript("chat-1", usage(10, 5, 0, 0), false));
    let frame = synthesis::wire::bridge::FromChannel::ToolCall {
        call_ref: "r1".into(),
        name: "ls".into(),
        arguments: json!({}),
    };
    let out = s.input(Input::BridgeFrame { conn: 100, frame });
    assert_eq!(usage_json(&out, 10)["prompt_tokens"], 10);
    let id = match &out[0] {
        Output::Respond { response, .. } => {
            let v: Value = serde_json::from_str(&response.body).unwrap();
            v["choices"][0]["message"]["tool_calls"][0]["id"].as_str().unwrap().to_string()
        }
        other => panic!("{other:?}"),
    };
    let body = json!({"messages": [
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": id, "content": "a.txt"}], "tools": [ls]});
    s.input(http(11, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    s.input(reply(100, "chat-1", "done"));
    s.input(transcript("chat-1", usage(30, 2, 0, 0), true));
    let out = s.input(stop_hook(20, "t4", None));
    assert_eq!(usage_json(&out, 11)["prompt_tokens"], 30, "only what the first response did not report");
}

#[test]
fn turns_are_counted_by_outcome_and_timed() {
    let mut s = Script::new(settings()); // turn_timeout 300 s, retry_grace 10 s
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    s.advance(Duration::from_secs(2));
    s.input(stop_hook(20, "t4", Some("ok")));
    // Timed out.
    s.input(chat(11, "a", "long", false));
    s.advance(Duration::from_secs(300));
    s.advance(Duration::from_secs(1));
    // Abandoned: the client left and no retry came.
    s.input(chat(12, "a", "gone", false));
    s.input(Input::ConnClosed { conn: 12 });
    s.advance(Duration::from_secs(11));
    let m = metrics(&mut s);
    let turns: BTreeMap<&str, u64> = m.metrics.turns.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(turns, BTreeMap::from([("ok", 1), ("turn_timeout", 1), ("abandoned", 1)]));
    assert_eq!(m.metrics.turn_duration.count(), 3);
    assert_eq!(m.metrics.spawn_duration.count(), 1);
    assert_eq!(m.sessions, 1);
    assert_eq!(m.processes, BTreeMap::from([("idle".to_string(), 1)]));
    assert_eq!(m.claude_pids, vec![7]);
    let text = m.render(&Default::default());
    assert!(text.contains("synthesis_turns_total{outcome=\"turn_timeout\"} 1\n"), "{text}");
    assert!(text.contains("synthesis_turn_duration_seconds_bucket{le=\"2\"} 1\n"), "{text}");
    assert!(text.contains("synthesis_turn_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
    assert!(text.contains("synthesis_claude_spawn_duration_seconds_count 1\n"), "{text}");
    assert!(text.contains("synthesis_claude_processes{state=\"busy\"} 0\n"), "{text}");
}

#[test]
fn failures_before_delivery_and_repeated_deliveries_are_counted() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.input(Input::SpawnFailed { proc: 1, error: "no such file".into() });
    let out = s.input(chat(11, "b", "hi", false));
    let Some(Output::Spawn { proc: 2, spec }) = out.first() else { panic!("{out:?}") };
    let token = spec.bridge_token.clone();
    s.start_process(2, 8, 101, &token);
    s.advance(Duration::from_secs(3)); // claude did not take it: delivered again
    let m = metrics(&mut s);
    assert_eq!(m.metrics.turns.get("claude_spawn_failed"), Some(&1));
    assert_eq!(m.metrics.deliveries_repeated, 1);
    assert_eq!(m.processes, BTreeMap::from([("busy".to_string(), 1)]));
    assert_eq!(m.metrics.turn_duration.count(), 0, "a turn that never reached Claude is not timed");
}

#[test]
fn metrics_need_the_api_key_and_survive_an_upgrade() {
    let mut s = Script::new(settings());
    let out = s.input(http(90, request("GET", "/metrics", &[], "")));
    assert_eq!(response(&out[0]).1, 401);
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    s.input(transcript("chat-1", usage(10, 5, 0, 0), true));
    s.input(stop_hook(20, "t4", Some("ok")));
    let before = metrics(&mut s);
    let exported = s.engine.export(s.now);
    let engine = Engine::import(settings(), Box::new(CounterIds::default()), s.now, &exported).unwrap();
    let mut t = Script { engine, ..Script::new(settings()) };
    t.now = s.now;
    assert_eq!(metrics(&mut t), before);
    assert_eq!(before.metrics.usage.calls, 1);
}

// ---- end to end: the real binary with the scripted fake claude ----

fn get(d: &Daemon, path: &str) -> Response {
    let auth = format!("Bearer {API_KEY}");
    d.client().request("GET", path, &[("authorization", &auth)], "")
}

#[test]
fn usage_comes_from_the_transcript_even_when_its_last_line_is_late() {
    let d = Daemon::start("usage", "", &[]);
    // fake claude writes two calls per turn: (11 + 13) input, (3 + 2) output, (100 + 200) cache
    // read, 7 cache creation.
    let expected = json!({"prompt_tokens": 331, "completion_tokens": 5, "total_tokens": 336,
                          "prompt_tokens_details": {"cached_tokens": 300}});
    let r = d.client().chat("a", "hello", false);
    assert_eq!(r.json()["usage"], expected);
    let r = d.client().chat("a", "late", true);
    let events = r.events();
    let chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(chunk["usage"], expected, "the response waited for the line written after Stop");
    assert!(d.log_lines("usage may be short").is_empty());
    let text = get(&d, "/metrics").body;
    assert!(text.contains("synthesis_tokens_total{kind=\"cache_read\"} 600\n"), "{text}");
    assert!(text.contains("synthesis_api_calls_total 4\n"), "{text}");
}

#[test]
fn metrics_parse_with_the_prometheus_client_parser() {
    if !python_module("prometheus_client") {
        return;
    }
    let d = Daemon::start("metrics", "", &[]);
    assert_eq!(d.client().chat("a", "hello", false).status, 200);
    assert_eq!(d.client().chat("b", "crash", false).status, 502);
    let r = get(&d, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prometheus_parse.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), r.body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused:\n{}", r.body);
    let samples: BTreeMap<String, f64> = serde_json::from_slice(&out.stdout).unwrap();
    let at = |k: &str| *samples.get(k).unwrap_or_else(|| panic!("no sample {k} in {samples:?}"));
    assert_eq!(at("synthesis_turns_total{outcome=ok}"), 1.0);
    assert_eq!(at("synthesis_turns_total{outcome=claude_exited}"), 1.0);
    assert_eq!(at("synthesis_turn_duration_seconds_count"), 2.0);
    assert_eq!(at("synthesis_claude_spawn_duration_seconds_count"), 2.0);
    assert_eq!(at("synthesis_claude_processes{state=idle}"), 1.0);
    assert_eq!(at("synthesis_sessions"), 2.0);
    assert_eq!(at("synthesis_deliveries_repeated_total"), 0.0);
    assert_eq!(at("synthesis_tokens_total{kind=input}"), 24.0);
    // fake claude and its channel: a few MB, far less than synthesis's limit of sense.
    let claude_rss = at("synthesis_claude_resident_memory_bytes");
    assert!(claude_rss > 1e6 && claude_rss < 1e9, "{claude_rss}");
    let rss = at("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 1e8, "{rss}");
    assert!(at("process_open_fds") >= 5.0);
    let started = at("process_start_time_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started > now - 120.0 && started <= now + 1.0, "{started} vs {now}");
    assert!(samples.contains_key("process_cpu_seconds_total"));
    assert_eq!(samples.get("synthesis_build_info{version=0.1.0}"), Some(&1.0));
}

// ---- the command line, configuration from the environment, log lines ----

fn synthesis(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_synthesis"))
        .args(args)
        .env_remove("SYNTHESIS_REAL_CLAUDE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn version_help_and_precise_usage_errors() {
    let out = synthesis(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("synthesis {}\n", env!("CARGO_PKG_VERSION")));
    assert_eq!(synthesis(&["-V"], &[]).stdout, out.stdout);
    let help = synthesis(&["--help"], &[]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("synthesis --version | -V"));
    let out = synthesis(&["--config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("synthesis: --config needs a path: --config PATH\n"));
    let out = synthesis(&["doctor", "--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option \"--bogus\""));
}

#[test]
fn environment_overrides_are_checked_named_and_logged_with_timestamps() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/synthesis.conf");
    let out = synthesis(&["--check", "--config", conf], &[("SYNTHESIS_RETRY_GRACE", "soon")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("environment variable SYNTHESIS_RETRY_GRACE: expected a duration like 15s, not \"soon\""),
        "{err}"
    );
    let out =
        synthesis(&["--check", "--config", conf], &[("SYNTHESIS_RETRY_GRAEC", "5s"), ("SYNTHESIS_HOOK_TOKEN", "x")]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let warning = err.lines().find(|l| l.contains("SYNTHESIS_")).expect("a warning");
    assert!(
        warning.ends_with(
            "] ignoring environment variable SYNTHESIS_RETRY_GRAEC: synthesis has no such setting (see synthesis.conf)"
        ),
        "{err}"
    );
    assert!(!err.contains("SYNTHESIS_HOOK_TOKEN"), "synthesis's own variable is no setting: {err}");
    // `[2026-11-25T21:45:02.346Z WARN  synthesis::config] ...`
    let stamp = &warning[1..25];
    let shape: String = stamp.chars().map(|c| if c.is_ascii_digit() { '0' } else { c }).collect();
    assert_eq!(shape, "0000-00-00T00:00:00.000Z", "{warning}");
    assert_eq!(&warning[25..31], " WARN ");
}

#[test]
fn every_setting_works_from_the_environment_in_the_running_daemon() {
    // trust_workspace, retry_grace and http_idle_timeout used to be read from the file only.
    let d = Daemon::start(
        "envkeys",
        "",
        &[("FAKE_CLAUDE_SCREEN", "trust"), ("SYNTHESIS_TRUST_WORKSPACE", "yes"), ("SYNTHESIS_HTTP_IDLE_TIMEOUT", "1s")],
    );
    assert_eq!(d.client().chat("a", "hi", false).json()["choices"][0]["message"]["content"], "echo: hi");
    let mut idle = d.client();
    assert_eq!(idle.request("GET", "/healthz", &[], "").status, 200);
    assert!(idle.closed(), "closed after http_idle_timeout = 1s");
}
