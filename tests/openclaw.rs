//! Replay tests built from requests captured from the real OpenClaw gateway.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use synthesis::engine::{Input, Output, Signal};
use synthesis::wire::bridge::{FromChannel, ToChannel};
use synthesis::wire::openai::ChatRequest;

fn chunks(out: &[Output], conn: u64) -> Vec<Value> {
    stream_events(out, conn).iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[test]
fn every_capture_maps_to_the_right_session_key() {
    let expected = [
        ("compat-sessA-turn1", Some("sessA:0")),
        ("gateway-http-alice-turn-one", Some("148d6a7a-04b6-41f0-a713-2af935739448:0")),
        ("gateway-http-alice-turn-three", Some("148d6a7a-04b6-41f0-a713-2af935739448:1")),
        ("gateway-compaction-alice", Some("148d6a7a-04b6-41f0-a713-2af935739448")),
        ("gateway-http-bob-turn-one", Some("918b28d2-1d34-4d95-8835-dd23d44d192a:0")),
        ("toolloop-req1", Some("sessTool:0")),
        ("nocompat-sessA-turn1", None),
        ("retry500-req1", None),
    ];
    for (name, key) in expected {
        let req = capture(name);
        let body: ChatRequest = serde_json::from_str(&req.body).unwrap();
        let got = synthesis::engine::session_key(&req, &body).ok();
        assert_eq!(got.as_deref(), key, "{name}");
    }
    // Without the compat flags nothing names the session: refused, never guessed.
    let mut s = Script::new(settings());
    let out = s.input(http(1, capture("nocompat-sessA-turn1")));
    let (_, status, body) = response(&out[0]);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("missing_session_key")));
    assert!(body["error"]["message"].as_str().unwrap().contains("sendSessionAffinityHeaders"));
}

#[test]
fn turn_two_delivers_only_the_new_messages() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("gateway-http-alice-turn-one")));
    let first = delivered(&s.start_process(1, 7, 100, "t3"));
    assert!(
        first[0].starts_with("<system_prompt from=\"client\">\n<!-- openclaw:attempt:STABLE -->"),
        "system prompt once"
    );
    assert!(first[0].contains("http alice turn one"));
    s.input(prompt_hook(20, "t4", "chat-1"));
    s.input(reply(100, "chat-1", &captured_answer("gateway-http-alice-turn-two")));
    s.input(stop_hook(20, "t4", None));
    let second = delivered(&s.input(http(11, capture("gateway-http-alice-turn-two"))));
    assert_eq!(second.len(), 1);
    assert!(second[0].starts_with("[Wed 2026-11-25 12:09 UTC] http alice turn two"), "{}", &second[0][..80]);
    assert!(!second[0].contains("http alice turn one"), "old history is not sent again");
    assert!(!second[0].contains("<system_prompt"), "unchanged system prompt is not sent again");
    assert!(second[0].contains("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>"), "the per-turn context goes along");
}

#[test]
fn a_retried_identical_body_is_delivered_once_and_answered_twice() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("compat-sessC-turn1")));
    assert_eq!(delivered(&s.start_process(1, 7, 100, "t3")).len(), 1);
    // OpenClaw gave up on connection 10 and resends the identical body on 11.
    s.input(Input::ConnClosed { conn: 10 });
    let out = s.input(http(11, capture("compat-sessC-turn1")));
    assert!(delivered(&out).is_empty(), "attached to the turn in flight, not delivered again");
    assert_eq!(out[0], Output::StreamStart { conn: 11 });
    let mut out = s.input(reply(100, "chat-1", "the answer"));
    out.extend(s.input(stop_hook(20, "t4", None)));
    let text: String = chunks(&out, 11).iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "the answer", "the retry gets the answer");
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 11 }));
    // And once more after the turn ended: the same answer, still no delivery.
    let out = s.input(http(12, capture("compat-sessC-turn1")));
    assert!(delivered(&out).is_empty());
    let text: String = chunks(&out, 12).iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "the answer");
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 12 }));
}

#[test]
fn the_tool_loop_from_request_to_tool_calls_to_result_to_final_reply() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("toolloop-req1")));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    // The channel gets OpenClaw's tools as soon as it says hello.
    let out = s.input(hello(100, "t3"));
    let Output::Bridge { frame: ToChannel::Tools { tools }, .. } = &out[0] else { panic!("{out:?}") };
    assert_eq!(tools.len(), 12);
    assert!(tools.iter().any(|t| t.name == "ls" && t.input_schema["type"] == "object"));
    s.input(ready(100));
    s.input(prompt_hook(20, "t4", "chat-1"));
    // Claude calls `ls`: OpenClaw gets tool_calls.
    let call = FromChannel::ToolCall { call_ref: "7".into(), name: "ls".into(), arguments: json!({"path": "."}) };
    let out = s.input(Input::BridgeFrame { conn: 100, frame: call });
    let c = chunks(&out, 10);
    let tc = &c[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!((tc["type"].as_str(), tc["function"]["name"].as_str()), (Some("function"), Some("ls")));
    assert_eq!(tc["function"]["arguments"], r#"{"path":"."}"#);
    let call_id = tc["id"].as_str().unwrap().to_string();
    assert_eq!(c[1]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 10 }));
    // OpenClaw runs it and comes back with the result, under a rewritten id.
    let mut req = capture("toolloop-req2-with-tool-result");
    let rewritten: String = call_id.chars().filter(char::is_ascii_alphanumeric).collect();
    req.body = req.body.replace("callsynth1", &rewritten);
    let out = s.input(http(11, req));
    let result = out.iter().find_map(|o| match o {
        Output::Bridge { frame: ToChannel::ToolResult { call_ref, content, is_error }, .. } => {
            Some((call_ref, content, is_error))
        }
        _ => None,
    });
    let (call_ref, content, is_error) = result.expect("the result goes to Claude");
    assert_eq!((call_ref.as_str(), *is_error), ("7", false));
    assert!(content.contains("hello.txt"));
    assert!(delivered(&out).is_empty(), "a tool result is not a new message");
    // Claude finishes; its reply answers the second request.
    let mut out = s.input(reply(100, "chat-1", "echo: tool result: hello.txt"));
    out.extend(s.input(stop_hook(20, "t4", None)));
    let text: String = chunks(&out, 11).iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "echo: tool result: hello.txt");
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 11 }));
}

#[test]
fn a_client_that_moves_on_without_the_tool_result_unblocks_claude_with_an_error() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("toolloop-req1")));
    s.start_process(1, 7, 100, "t3");
    let call = FromChannel::ToolCall { call_ref: "7".into(), name: "ls".into(), arguments: json!({}) };
    s.input(Input::BridgeFrame { conn: 100, frame: call });
    let out = s.input(chat(11, "sessTool:0", "never mind", false));
    let abandoned = ToChannel::ToolResult {
        call_ref: "7".into(),
        content: "The user did not run this tool.".into(),
        is_error: true,
    };
    assert_eq!(out, vec![Output::Bridge { conn: 100, frame: abandoned }], "queued behind the turn, Claude unblocked");
}

#[test]
fn a_compaction_request_is_answered_apart_and_the_next_generation_continues_the_session() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("gateway-http-alice-turn-one")));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(20, "t4", "chat-1"));
    // Compaction arrives while alice's turn is in flight: a one-shot session of its own.
    let out = s.input(http(11, capture("gateway-compaction-alice")));
    let Output::Spawn { proc: 2, spec } = &out[0] else { panic!("{out:?}") };
    assert_ne!(spec.session_uuid, "00000000-0000-4000-8000-000000000001", "a fresh Claude session");
    let first = delivered(&s.start_process(2, 8, 101, "t7"));
    assert!(first[0].contains("You are a context summarization assistant"), "the summariser prompt goes along");
    s.input(reply(101, "chat-1", "## Summary"));
    let out = s.input(stop_hook(21, "t8", None));
    assert!(out.contains(&Output::Signal { proc: 2, signal: Signal::Term }), "one-shot: stopped when done");
    s.input(stop_hook(20, "t4", Some(&captured_answer("gateway-http-alice-turn-three"))));
    // `<id>:1` with the compacted history continues alice's Claude session and process.
    let out = s.input(http(12, capture("gateway-http-alice-turn-three")));
    let d = delivered(&out);
    assert_eq!(d.len(), 1, "{out:?}");
    assert!(d[0].starts_with("[Wed 2026-11-25 12:09 UTC] http alice turn three after compaction"));
    assert!(s.saved.last().unwrap()[0].aliases.contains(&"148d6a7a-04b6-41f0-a713-2af935739448:1".to_string()));
}

#[test]
fn keep_alive_chunks_flow_during_a_long_turn() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "sleep 1800", true));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(20, "t4", "chat-1"));
    let out = s.advance(Duration::from_secs(15));
    let c = chunks(&out, 10);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["choices"][0]["delta"], json!({}), "yielded by the SDKs, adds no text");
    assert_eq!(c[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks(&s.advance(Duration::from_secs(45)), 10).len(), 3, "every 15 s");
}

fn permission_request(id: &str) -> Input {
    let frame = FromChannel::PermissionRequest {
        request_id: id.into(),
        tool_name: "Bash".into(),
        description: "Run a command".into(),
        input_preview: "rm -rf build".into(),
    };
    Input::BridgeFrame { conn: 100, frame }
}

fn verdict(id: &str, behavior: &str) -> Output {
    Output::Bridge { conn: 100, frame: ToChannel::Permission { request_id: id.into(), behavior: behavior.into() } }
}

#[test]
fn a_permission_request_is_relayed_to_the_user_and_the_answer_goes_back_to_claude() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "clean the build", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(20, "t4", "chat-1"));
    let out = s.input(permission_request("abcde"));
    let (conn, status, body) = response(&out[0]);
    assert_eq!((conn, status), (10, 200));
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("Claude wants to use Bash: Run a command\nrm -rf build"), "{text}");
    assert!(text.contains("reply `yes abcde` to allow or `no abcde` to deny"));
    // The user's answer is a verdict for Claude, not a message.
    let out = s.input(chat(11, "a", "[Wed 2026-11-25 12:09 UTC] yes abcde", false));
    assert_eq!(out, vec![verdict("abcde", "allow")]);
    s.input(reply(100, "chat-1", "cleaned"));
    let out = s.input(stop_hook(21, "t4", None));
    let (conn, _, body) = response(&out[1]);
    assert_eq!((conn, body["choices"][0]["message"]["content"].as_str()), (11, Some("cleaned")));
}

#[test]
fn moving_on_denies_the_open_permission_request() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "clean", true));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(permission_request("qwert"));
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 10 }), "the question ends the response");
    let out = s.input(chat(11, "a", "something else", false));
    assert_eq!(out, vec![verdict("qwert", "deny")], "denied; the new message waits for the turn to end");
}

#[test]
fn permissions_allow_answers_without_asking() {
    let mut st = settings();
    st.permissions = synthesis::engine::Permissions::Allow;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "clean", false));
    s.start_process(1, 7, 100, "t3");
    assert_eq!(s.input(permission_request("zzzzz")), vec![verdict("zzzzz", "allow")]);
}

#[test]
fn a_changed_tool_catalog_reaches_claude_before_the_message() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "one", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some("ok")));
    let ls = json!({"type": "function", "function": {"name": "ls", "description": "List", "parameters": {"type": "object"}}});
    let body = json!({"messages": [{"role": "user", "content": "two"}], "tools": [ls]});
    let headers = [("authorization", "Bearer key"), ("x-session-affinity", "a")];
    let out = s.input(http(11, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    assert!(matches!(&out[..], [Output::Bridge { frame: ToChannel::Tools { tools }, .. }] if tools[0].name == "ls"));
    // The message waits until claude has re-listed the tools.
    let listed = s.input(Input::BridgeFrame { conn: 100, frame: FromChannel::ToolsListed });
    assert_eq!(delivered(&listed), ["two"]);
    // Without a re-list, it goes after a short wait anyway.
    s.input(stop_hook(20, "t4", Some("ok")));
    let body = json!({"messages": [{"role": "user", "content": "three"}], "tools": []});
    let out = s.input(http(12, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    assert!(delivered(&out).is_empty());
    assert_eq!(delivered(&s.advance(Duration::from_secs(1))), ["three"]);
}

#[test]
fn after_a_restart_the_resumed_session_does_not_get_the_system_prompt_again() {
    let mut s = Script::new(settings());
    s.input(http(10, capture("gateway-http-alice-turn-one")));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some(&captured_answer("gateway-http-alice-turn-two"))));
    s.advance(Duration::from_secs(60)); // the sweep saves the map
    let saved = s.saved.last().unwrap().clone();
    assert!(saved[0].system_hash.is_some());
    let mut restarted = Script::new(settings());
    restarted.engine.restore(saved);
    restarted.input(http(11, capture("gateway-http-alice-turn-two")));
    let d = delivered(&restarted.start_resumed_process(1, 8, 101, "t2"));
    assert!(d[0].starts_with("[Wed 2026-11-25 12:09 UTC] http alice turn two"), "{}", &d[0][..60]);
}

#[test]
fn a_known_session_whose_transcript_is_gone_gets_its_context_again() {
    let mut s = Script::new(settings());
    let record = synthesis::engine::SessionRecord {
        key: "148d6a7a-04b6-41f0-a713-2af935739448:0".into(),
        uuid: "u-known".into(),
        created: 1,
        last_used: 2,
        aliases: vec![],
        system_hash: Some(12345),
        answers: vec![],
        heard: vec![],
    };
    s.engine.restore(vec![record]);
    s.input(http(11, capture("gateway-http-alice-turn-two")));
    // Spawned with --session-id: claude has nothing to resume, so it gets prompt and history.
    let d = delivered(&s.start_process(1, 8, 101, "t2"));
    assert!(d[0].starts_with("<system_prompt from=\"client\">"));
    assert!(d[0].contains("<earlier_conversation>\n[user]: [Wed 2026-11-25 12:09 UTC] http alice turn one"));
}
