//! Replay tests: scripted input sequences against the engine on a virtual clock,
//! asserting the exact outputs.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use synthesis::engine::{Input, Output, SessionRecord, Signal, SpawnSpec};
use synthesis::wire::bridge::ToChannel;

const UUID1: &str = "00000000-0000-4000-8000-000000000001";

fn spawn_of(proc: u64, uuid: &str, bridge: &str, hook: &str) -> Output {
    let spec = SpawnSpec { session_uuid: uuid.into(), bridge_token: bridge.into(), hook_token: hook.into() };
    Output::Spawn { proc, spec }
}

fn deliver(conn: u64, chat_id: &str, content: &str) -> Output {
    Output::Bridge { conn, frame: ToChannel::Deliver { chat_id: chat_id.into(), content: content.into() } }
}

#[test]
fn json_turn_from_spawn_to_answer() {
    let mut s = Script::new(settings());
    assert_eq!(s.input(chat(10, "sess-a", "hello there", false)), vec![spawn_of(1, UUID1, "t3", "t4")]);
    assert_eq!(s.start_process(1, 4242, 100, "t3"), vec![deliver(100, "chat-1", "hello there")]);
    let out = s.input(reply(100, "chat-1", "echo: hello there"));
    assert_eq!(out, vec![replied(100, 1)], "non-streamed: nothing but the acknowledgement until the end");
    let out = s.input(stop_hook(20, "t4", Some("ignored, there was a reply")));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0], hook_ok(20));
    let (conn, status, body) = response(&out[1]);
    assert_eq!((conn, status), (10, 200));
    assert_eq!(
        body,
        json!({
            "id": "chatcmpl-t2", "object": "chat.completion", "created": 1_790_000_000u64, "model": "claude-code",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: hello there"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                      "prompt_tokens_details": {"cached_tokens": 0}}
        })
    );
}

#[test]
fn sse_turn_streams_role_first_then_replies_then_stop_usage_done() {
    let mut s = Script::new(settings());
    let out = s.input(chat(10, "sess-a", "hi", true));
    assert_eq!(out[0], spawn_of(1, UUID1, "t3", "t4"));
    assert_eq!(out[1], Output::StreamStart { conn: 10 });
    let role = stream_events(&out, 10);
    assert_eq!(role.len(), 1);
    let role: serde_json::Value = serde_json::from_str(&role[0]).unwrap();
    assert_eq!(role["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert_eq!(role["object"], "chat.completion.chunk");

    s.start_process(1, 7, 100, "t3");
    let a = s.input(reply(100, "chat-1", "part one"));
    let b = s.input(reply(100, "chat-1", "part two"));
    let end = s.input(stop_hook(20, "t4", None));
    assert_eq!(end[0], hook_ok(20));
    assert_eq!(end.last(), Some(&Output::StreamEnd { conn: 10 }));
    let events: Vec<String> = [a, b, end].iter().flat_map(|o| stream_events(o, 10)).collect();
    let parsed: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(parsed[0]["choices"][0]["delta"], json!({"content": "part one"}));
    assert_eq!(parsed[1]["choices"][0]["delta"], json!({"content": "\n\npart two"}));
    assert_eq!(parsed[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(parsed[3]["choices"], json!([]));
    assert_eq!(parsed[3]["usage"]["total_tokens"], 0);
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[test]
fn without_reply_the_last_assistant_message_is_the_answer_and_empty_is_still_an_answer() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "one", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(stop_hook(20, "t4", Some("plain text")));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "plain text");
    let delivered = s.input(chat(11, "a", "two", false));
    assert_eq!(delivered, vec![deliver(100, "chat-2", "two")]);
    let out = s.input(stop_hook(20, "t4", None));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "");
}

#[test]
fn two_sessions_get_two_processes_and_a_second_turn_reuses_its_process() {
    let mut s = Script::new(settings());
    assert_eq!(s.input(chat(10, "a", "first a", false)), vec![spawn_of(1, UUID1, "t3", "t4")]);
    let uuid5 = "00000000-0000-4000-8000-000000000005";
    assert_eq!(s.input(chat(11, "b", "first b", false)), vec![spawn_of(2, uuid5, "t7", "t8")]);
    s.start_process(1, 7, 100, "t3");
    assert_eq!(s.start_process(2, 8, 101, "t7"), vec![deliver(101, "chat-1", "first b")]);
    s.input(stop_hook(20, "t8", Some("b answered")));
    s.input(stop_hook(21, "t4", Some("a answered")));
    // Turn two of session a: no spawn, straight to its bridge.
    assert_eq!(s.input(chat(12, "a", "second a", false)), vec![deliver(100, "chat-2", "second a")]);
}

#[test]
fn only_the_messages_after_the_last_assistant_message_are_delivered() {
    let mut s = Script::new(settings());
    s.input(chat(9, "a", "old question", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some("old answer")));
    let body = json!({"messages": [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        {"role": "user", "content": "new question"},
        {"role": "user", "content": [{"type": "text", "text": "context part"}]},
    ]});
    let headers = [("authorization", "Bearer key"), ("x-session-affinity", "a")];
    let out = s.input(http(10, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    assert_eq!(out, vec![deliver(100, "chat-2", "new question\n\ncontext part")]);
}

#[test]
fn a_new_claude_session_gets_the_system_prompt_and_earlier_history_once() {
    let mut s = Script::new(settings());
    let body = json!({"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "asked elsewhere"},
        {"role": "assistant", "content": "answered elsewhere"},
        {"role": "user", "content": "now here"},
    ]});
    let headers = [("authorization", "Bearer key"), ("x-session-affinity", "a")];
    s.input(http(10, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    let first = "<system_prompt from=\"client\">\nYou are helpful.\n</system_prompt>\n\n\
        <earlier_conversation>\n[user]: asked elsewhere\n[assistant]: answered elsewhere\n</earlier_conversation>\n\nnow here";
    assert_eq!(s.start_process(1, 7, 100, "t3"), vec![deliver(100, "chat-1", first)]);
    s.input(stop_hook(20, "t4", Some("ok")));
    let body = json!({"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "now here"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and more"},
    ]});
    let out = s.input(http(11, request("POST", "/v1/chat/completions", &headers, &body.to_string())));
    assert_eq!(out, vec![deliver(100, "chat-2", "and more")], "same system prompt, known history: only the new text");
}

#[test]
fn turns_of_one_session_are_delivered_one_at_a_time_in_order() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "one", false));
    s.start_process(1, 7, 100, "t3");
    assert!(s.input(chat(11, "a", "two", false)).is_empty(), "waits for turn one");
    s.input(reply(100, "chat-1", "r1"));
    let out = s.input(stop_hook(20, "t4", None));
    assert_eq!(out[0], hook_ok(20));
    assert_eq!(response(&out[1]).0, 10);
    assert_eq!(out[2], deliver(100, "chat-2", "two"), "turn two only after turn one ended");
    s.input(reply(100, "chat-2", "r2"));
    let out = s.input(stop_hook(20, "t4", None));
    let (conn, _, body) = response(&out[1]);
    assert_eq!((conn, body["choices"][0]["message"]["content"].as_str()), (11, Some("r2")));
}

#[test]
fn a_full_session_queue_answers_429_with_retry_after() {
    let mut s = Script::new(settings()); // queue_depth 2
    s.input(chat(10, "a", "one", false));
    s.input(chat(11, "a", "two", false));
    let out = s.input(chat(12, "a", "three", false));
    match &out[..] {
        [Output::Respond { conn: 12, response }] => {
            assert_eq!(response.status, 429);
            assert!(response.headers.contains(&("retry-after".into(), "5".into())));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ready_timeout_kills_the_group_and_fails_with_the_terminal_tail() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", true));
    s.input(Input::Spawned { proc: 1, pid: 99, resumed: false });
    s.input(Input::Terminal { proc: 1, text: "\x1b[1mLoading something\x1b[0m\r\nstill loading\r\n".into() });
    assert!(s.advance(Duration::from_millis(14_999)).is_empty());
    let out = s.advance(Duration::from_millis(1));
    assert_eq!(out[0], Output::Signal { proc: 1, signal: Signal::Term });
    let events = stream_events(&out, 10);
    let err: serde_json::Value = serde_json::from_str(&events[0]).unwrap();
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("within 15 s (ready_timeout)"), "{msg}");
    assert!(msg.contains("Loading something\nstill loading"), "tail, ANSI stripped: {msg}");
    assert_eq!(events[1], "[DONE]");
    assert_eq!(out.last(), Some(&Output::StreamEnd { conn: 10 }));
    // SIGTERM ignored: SIGKILL after the grace; reaping it answers nobody twice.
    assert_eq!(s.advance(Duration::from_secs(5)), vec![Output::Signal { proc: 1, signal: Signal::Kill }]);
    assert!(s.input(Input::Exited { proc: 1, status: "signal 9".into() }).is_empty());
}

#[test]
fn claude_exiting_mid_turn_answers_502_with_the_tail() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "crash", false));
    s.start_process(1, 7, 100, "t3");
    s.input(Input::Terminal { proc: 1, text: "thinking...\r\n".into() });
    let out = s.input(Input::Exited { proc: 1, status: "exit status 3".into() });
    assert_eq!(out[0], Output::CloseBridge { conn: 100 });
    let (conn, status, body) = response(&out[1]);
    assert_eq!((conn, status), (10, 502));
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("claude (pid 7) exited (exit status 3) during the turn"), "{msg}");
    assert!(msg.contains("thinking..."), "{msg}");
    assert_eq!(body["error"]["code"], "claude_exited");
}

#[test]
fn crash_mid_turn_with_a_queued_request_respawns_the_same_claude_session() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "crash", false));
    s.start_process(1, 7, 100, "t3");
    s.input(chat(11, "a", "after", false));
    let out = s.input(Input::Exited { proc: 1, status: "exit status 3".into() });
    assert_eq!(response(&out[1]).1, 502);
    assert_eq!(out[2], spawn_of(2, UUID1, "t6", "t7"), "same claude session uuid: resumed");
    assert_eq!(s.start_process(2, 8, 101, "t6"), vec![deliver(101, "chat-2", "after")]);
}

#[test]
fn a_process_dying_before_ready_fails_the_queue_without_respawning() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    s.input(Input::Terminal { proc: 1, text: "No conversation found with session ID x\r\n".into() });
    let out = s.input(Input::Exited { proc: 1, status: "exit status 1".into() });
    assert_eq!(out.len(), 1);
    let (_, status, body) = response(&out[0]);
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("No conversation found"));
}

#[test]
fn spawn_failure_is_a_502_naming_the_setting() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    let out = s.input(Input::SpawnFailed { proc: 1, error: "No such file or directory".into() });
    let (_, status, body) = response(&out[0]);
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("claude_command"));
}

#[test]
fn workspace_trust_screen_fails_fast_with_what_to_do() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    let out = s.input(Input::Terminal {
        proc: 1,
        text:
            "Quick safety check: Is this a project you created or one you trust?\r\n ❯ 1. Yes, I trust this folder\r\n"
                .into(),
    });
    assert_eq!(out[0], Output::Signal { proc: 1, signal: Signal::Term });
    let (_, status, body) = response(&out[1]);
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "workspace_not_trusted");
}

#[test]
fn turn_timeout_interrupts_with_one_esc_and_answers_504_then_serves_the_next() {
    let mut s = Script::new(settings()); // turn_timeout 300 s, settle 500 ms
    s.input(chat(10, "a", "sleep 9999", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    s.input(chat(11, "a", "next", false));
    let out = s.advance(Duration::from_secs(300));
    assert_eq!(out[0], Output::WriteTerminal { proc: 1, data: "\x1b".into() });
    let (conn, status, _) = response(&out[1]);
    assert_eq!((conn, status), (10, 504));
    assert_eq!(out.len(), 2, "the next turn waits for the interrupt to settle");
    assert_eq!(s.advance(Duration::from_millis(500)), vec![deliver(100, "chat-2", "next")]);
}

#[test]
fn client_disconnect_mid_turn_interrupts_after_the_retry_grace_and_moves_on() {
    let mut s = Script::new(settings()); // retry_grace 10 s
    s.input(chat(10, "a", "long", true));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    s.input(chat(11, "a", "queued, then gone", false));
    s.input(chat(12, "a", "next", false));
    assert!(s.input(Input::ConnClosed { conn: 11 }).is_empty(), "a queued turn just leaves");
    assert!(s.input(Input::ConnClosed { conn: 10 }).is_empty(), "a retry may still come");
    assert!(s.advance(Duration::from_millis(9999)).is_empty());
    assert_eq!(s.advance(Duration::from_millis(1)), vec![Output::WriteTerminal { proc: 1, data: "\x1b".into() }]);
    // A late Stop for the interrupted turn frees the process at once and answers nobody.
    let out = s.input(stop_hook(20, "t4", Some("late")));
    assert_eq!(out, vec![hook_ok(20), deliver(100, "chat-3", "next")]);
}

#[test]
fn idle_sweep_stops_idle_processes_and_spares_busy_ones() {
    let mut st = settings();
    st.idle_timeout = Duration::from_secs(120);
    let mut s = Script::new(st);
    s.input(chat(10, "idle", "x", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", None));
    s.input(chat(11, "busy", "sleep", false));
    s.start_process(2, 8, 101, "t7");
    assert_eq!(s.input(prompt_hook(21, "t8", "chat-1")), vec![hook_ok(21)]);
    // Sweeps at 60 s and 120 s: process 1 became idle at ~0.3 s, so not yet idle long enough.
    assert!(s.advance(Duration::from_secs(120) - s.elapsed()).is_empty());
    let out = s.advance(Duration::from_secs(60));
    assert_eq!(out, vec![Output::Signal { proc: 1, signal: Signal::Term }], "busy process 2 spared");
    assert_eq!(s.input(Input::Exited { proc: 1, status: "signal 15".into() }), vec![Output::CloseBridge { conn: 100 }]);
    // The session resumes its Claude session in a fresh process on its next turn.
    assert_eq!(s.input(chat(12, "idle", "back", false)), vec![spawn_of(3, UUID1, "t10", "t11")]);
}

#[test]
fn a_full_pool_evicts_the_least_recently_used_idle_process() {
    let mut st = settings();
    st.max_processes = 2;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "x", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", None));
    s.advance(Duration::from_secs(1));
    s.input(chat(11, "b", "x", false));
    s.start_process(2, 8, 101, "t7");
    s.input(stop_hook(20, "t8", None));
    // c needs a slot: a is the least recently used idle process.
    assert_eq!(s.input(chat(12, "c", "x", false)), vec![Output::Signal { proc: 1, signal: Signal::Term }]);
    let out = s.input(Input::Exited { proc: 1, status: "signal 15".into() });
    assert_eq!(
        out,
        vec![Output::CloseBridge { conn: 100 }, spawn_of(3, "00000000-0000-4000-8000-000000000009", "t11", "t12")]
    );
}

#[test]
fn a_full_pool_of_busy_processes_answers_503_and_evicts_nobody() {
    let mut st = settings();
    st.max_processes = 1;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "sleep", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(chat(11, "b", "x", false));
    let (conn, status, body) = response(&out[0]);
    assert_eq!((conn, status, out.len()), (11, 503, 1));
    assert_eq!(body["error"]["code"], "pool_busy");
    match &out[0] {
        Output::Respond { response, .. } => assert!(response.headers.contains(&("retry-after".into(), "5".into()))),
        _ => unreachable!(),
    }
}

#[test]
fn shutdown_lets_the_turn_in_flight_finish_then_stops_everything_and_exits() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "working", false));
    s.start_process(1, 7, 100, "t3");
    s.input(chat(11, "a", "queued", false));
    let out = s.input(Input::Shutdown);
    let (conn, status, _) = response(&out[0]);
    assert_eq!((conn, status, out.len()), (11, 503, 1), "queued turn refused, in-flight one continues");
    assert_eq!(response(&s.input(chat(12, "b", "new", false))[0]).1, 503);
    let out = s.input(stop_hook(20, "t4", Some("done")));
    assert_eq!(response(&out[1]).1, 200);
    assert_eq!(out[2], Output::Signal { proc: 1, signal: Signal::Term });
    assert_eq!(
        s.input(Input::Exited { proc: 1, status: "signal 15".into() }),
        vec![Output::CloseBridge { conn: 100 }, Output::Exit]
    );
}

#[test]
fn shutdown_grace_ends_a_turn_that_does_not_finish() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "sleep", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    assert!(s.input(Input::Shutdown).is_empty());
    assert_eq!(s.advance(Duration::from_secs(10)), vec![Output::Signal { proc: 1, signal: Signal::Term }]);
    let out = s.input(Input::Exited { proc: 1, status: "signal 15".into() });
    let (_, status, body) = response(&out[1]);
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("shutting down"));
    assert_eq!(out.last(), Some(&Output::Exit));
}

#[test]
fn shutdown_with_nothing_running_exits_at_once() {
    let mut s = Script::new(settings());
    assert_eq!(s.input(Input::Shutdown), vec![Output::Exit]);
}

#[test]
fn a_hello_with_a_wrong_token_is_closed_and_binds_nothing() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    assert_eq!(s.input(hello(100, "t4")), vec![Output::CloseBridge { conn: 100 }], "hook token is not a bridge token");
    assert_eq!(s.input(hello(101, "t3")), vec![tools_frame(101, vec![])]);
    assert_eq!(s.input(hello(102, "t3")), vec![Output::CloseBridge { conn: 102 }], "one-time token");
    assert_eq!(s.input(ready(101)), vec![deliver(101, "chat-1", "hi")]);
    assert_eq!(s.input(ready(103)), vec![Output::CloseBridge { conn: 103 }], "no frames before hello");
}

#[test]
fn a_closed_bridge_kills_claude_and_the_turn_fails_with_the_reason() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    assert_eq!(s.input(Input::BridgeClosed { conn: 100 }), vec![Output::Signal { proc: 1, signal: Signal::Term }]);
    let out = s.input(Input::Exited { proc: 1, status: "signal 15".into() });
    let msg = response(&out[0]).2["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("channel disconnected"), "{msg}");
}

#[test]
fn stop_failure_hook_is_an_error_response() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    let body = json!({"hook_event_name": "StopFailure", "error": "overloaded_error"}).to_string();
    let out = s.input(http(20, request("POST", "/hooks/stop-failure", &[("authorization", "Bearer t4")], &body)));
    assert_eq!(out[0], hook_ok(20));
    let (_, status, body) = response(&out[1]);
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("overloaded_error"));
}

#[test]
fn hooks_need_their_process_token() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(stop_hook(20, "t3", None));
    assert_eq!(response(&out[0]).1, 401);
    assert_eq!(out.len(), 1, "the turn goes on");
}

#[test]
fn bad_requests_get_openai_errors_and_change_nothing() {
    let mut s = Script::new(settings());
    let body = json!({"messages": [{"role": "user", "content": "x"}]}).to_string();
    let cases: Vec<(Input, u16, &str)> = vec![
        (
            http(1, request("POST", "/v1/chat/completions", &[("x-session-affinity", "a")], &body)),
            401,
            "missing_api_key",
        ),
        (
            http(1, request("POST", "/v1/chat/completions", &[("authorization", "Bearer nope")], &body)),
            401,
            "invalid_api_key",
        ),
        (
            http(1, request("POST", "/v1/chat/completions", &[("authorization", "Bearer key")], "{not json")),
            400,
            "invalid_request",
        ),
        (
            http(1, request("POST", "/v1/chat/completions", &[("authorization", "Bearer key")], "{}")),
            400,
            "invalid_request",
        ),
        (
            http(1, request("POST", "/v1/chat/completions", &[("authorization", "Bearer key")], &body)),
            400,
            "missing_session_key",
        ),
        (http(1, request("GET", "/v1/nothing", &[], "")), 404, "not_found"),
        (http(1, request("GET", "/v1/chat/completions", &[], "")), 405, "method_not_allowed"),
    ];
    for (input, status, code) in cases {
        let out = s.input(input);
        let (_, got, body) = response(&out[0]);
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(body["error"]["type"].is_string());
    }
    // Nothing was spawned by any of them, and a good request still works.
    assert_eq!(s.input(chat(2, "a", "fine", false)), vec![spawn_of(1, UUID1, "t3", "t4")]);
}

#[test]
fn models_and_healthz() {
    let mut s = Script::new(settings());
    let out = s.input(http(1, request("GET", "/v1/models", &[("authorization", "Bearer key")], "")));
    assert_eq!(response(&out[0]).2["data"][0]["id"], "claude-code");
    let out = s.input(http(1, request("GET", "/healthz", &[], "")));
    assert_eq!(response(&out[0]).1, 200);
}

#[test]
fn a_new_session_is_saved_at_once_and_timestamps_at_the_next_sweep() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    let record = SessionRecord {
        key: "a".into(),
        uuid: UUID1.into(),
        created: 1_790_000_000,
        last_used: 1_790_000_000,
        ..Default::default()
    };
    assert_eq!(s.saved, vec![vec![record.clone()]], "saved before the process even starts");
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", None));
    s.advance(Duration::from_secs(60));
    assert_eq!(s.saved.len(), 2, "the first turn touched last_used: saved at the sweep");
    s.advance(Duration::from_secs(60));
    assert_eq!(s.saved.len(), 2, "nothing changed: nothing written");
}

#[test]
fn restored_sessions_resume_their_claude_session() {
    let mut s = Script::new(settings());
    let record =
        SessionRecord { key: "a".into(), uuid: "known-uuid".into(), created: 1, last_used: 2, ..Default::default() };
    s.engine.restore(vec![record]);
    assert_eq!(s.input(chat(10, "a", "hi again", false)), vec![spawn_of(1, "known-uuid", "t2", "t3")]);
    assert!(s.saved.is_empty(), "a known session needs no immediate save");
}

#[test]
fn a_silent_bridge_means_a_dead_channel_and_claude_is_stopped() {
    let mut st = settings();
    st.bridge_silence = Duration::from_secs(20);
    let mut s = Script::new(st);
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    assert_eq!(s.input(prompt_hook(21, "t4", "chat-1")), vec![hook_ok(21)]);
    s.advance(Duration::from_secs(15));
    let beat = Input::BridgeFrame { conn: 100, frame: synthesis::wire::bridge::FromChannel::Heartbeat };
    assert!(s.input(beat).is_empty());
    assert!(s.advance(Duration::from_secs(19)).is_empty(), "the heartbeat reset the clock");
    assert_eq!(s.advance(Duration::from_secs(1)), vec![Output::Signal { proc: 1, signal: Signal::Term }]);
    let out = s.input(Input::Exited { proc: 1, status: "killed by signal 15".into() });
    let msg = response(&out[1]).2["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("no heartbeat"), "{msg}");
}

#[test]
fn trust_workspace_yes_accepts_the_trust_question() {
    let mut st = settings();
    st.trust_workspace = true;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "hi", false));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    // As Claude Code 2.1.332 draws it: "No, exit" selected; keys before the screen is drawn are lost.
    let screen = "Is this a project you trust?\r\n  \u{276f} No, exit\r\n  Yes, I trust this folder\r\n";
    assert!(s.input(Input::Terminal { proc: 1, text: screen.into() }).is_empty());
    assert_eq!(s.advance(Duration::from_millis(300)), vec![Output::WriteTerminal { proc: 1, data: "\x1b[B".into() }]);
    let redraw = "\x1b[12;3H \x1b[13;3H\u{276f}"; // only the cells that changed
    assert!(s.input(Input::Terminal { proc: 1, text: redraw.into() }).is_empty());
    assert_eq!(s.advance(Duration::from_millis(300)), vec![Output::WriteTerminal { proc: 1, data: "\r".into() }]);
    // Answered once: if the screen stays, the ready timeout reports it.
    assert!(s.input(Input::Terminal { proc: 1, text: screen.into() }).is_empty());
    assert!(s.advance(Duration::from_secs(1)).is_empty());
}

#[test]
fn status_lists_sessions_and_processes() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    s.input(chat(11, "a", "queued", false));
    s.advance(Duration::from_secs(3));
    let out = s.input(http(12, request("GET", "/status", &[("authorization", "Bearer key")], "")));
    let Output::Status { conn: 12, report } = &out[0] else { panic!("{out:?}") };
    assert_eq!(report.sessions.len(), 1);
    let sess = &report.sessions[0];
    assert_eq!((sess.turn_in_flight, sess.queued, sess.turns, sess.process), (true, 1, 2, Some(1)));
    let p = &report.processes[0];
    assert_eq!((p.pid, p.state.as_str(), p.turns, p.idle_secs), (Some(7), "ready", 1, 0), "busy is not idle");
    assert_eq!(response(&s.input(http(13, request("GET", "/status", &[], "")))[0]).1, 401);
}

#[test]
fn an_unacknowledged_first_delivery_is_repeated_until_claude_takes_it() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    assert_eq!(s.start_process(1, 7, 100, "t3"), vec![deliver(100, "chat-1", "hi")]);
    assert!(s.advance(Duration::from_millis(2999)).is_empty());
    assert_eq!(s.advance(Duration::from_millis(1)), vec![deliver(100, "chat-1", "hi")], "dropped: sent again");
    assert_eq!(s.input(prompt_hook(21, "t4", "chat-1")), vec![hook_ok(21)]);
    assert!(s.advance(Duration::from_secs(60)).is_empty(), "taken: never again");
    s.input(stop_hook(20, "t4", Some("ok")));
    // The channel is proven: later turns are delivered once, acknowledged or not.
    assert_eq!(s.input(chat(11, "a", "two", false)), vec![deliver(100, "chat-2", "two")]);
    assert!(s.advance(Duration::from_secs(60)).is_empty());
}

#[test]
fn a_prompt_hook_for_another_message_proves_nothing() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    assert_eq!(s.input(prompt_hook(21, "t4", "chat-9")), vec![hook_ok(21)]);
    assert_eq!(s.advance(Duration::from_secs(3)), vec![deliver(100, "chat-1", "hi")]);
}

#[test]
fn a_claude_that_never_takes_the_message_fails_the_turn_after_four_deliveries() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.start_process(1, 7, 100, "t3");
    for _ in 0..3 {
        assert_eq!(s.advance(Duration::from_secs(3)), vec![deliver(100, "chat-1", "hi")]);
    }
    let out = s.advance(Duration::from_secs(3));
    assert_eq!(out[0], Output::Signal { proc: 1, signal: Signal::Term });
    let (_, status, body) = response(&out[1]);
    assert_eq!((status, body["error"]["code"].as_str()), (502, Some("claude_ignored_message")));
}

#[test]
fn the_api_key_question_fails_fast_with_what_to_do() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    s.input(Input::Spawned { proc: 1, pid: 7, resumed: false });
    let screen = " Detected a custom API key in your environment\r\n Do you want to use this API key?\r\n Yes\r\n ❯ No (recommended)\r\n";
    let out = s.input(Input::Terminal { proc: 1, text: screen.into() });
    assert_eq!(out[0], Output::Signal { proc: 1, signal: Signal::Term });
    let (_, status, body) = response(&out[1]);
    assert_eq!((status, body["error"]["code"].as_str()), (502, Some("api_key_not_approved")));
}

#[test]
fn sessions_unused_for_30_days_are_forgotten_at_the_sweep() {
    let mut s = Script::new(settings());
    let day = 86_400;
    let old = SessionRecord {
        key: "old".into(),
        uuid: "u-old".into(),
        created: 0,
        last_used: 1_790_000_000 - 31 * day,
        ..Default::default()
    };
    let recent = SessionRecord {
        key: "recent".into(),
        uuid: "u-new".into(),
        created: 0,
        last_used: 1_790_000_000 - 29 * day,
        ..Default::default()
    };
    s.engine.restore(vec![old, recent]);
    s.input(chat(10, "a", "hi", false)); // tells the engine what time it is
    s.advance(Duration::from_secs(60));
    let keys: Vec<String> = s.saved.last().unwrap().iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, ["a", "recent"]);
}

#[test]
fn a_reply_is_acknowledged_after_it_became_part_of_the_answer() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", true));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(reply_seq(100, 7, "chat-1", "hello"));
    assert_eq!(out.len(), 2);
    assert!(matches!(&out[0], Output::StreamData { conn: 10, data } if data.contains("hello")));
    assert_eq!(out[1], replied(100, 7), "claude may end its turn only once the reply is taken");
}

#[test]
fn a_reply_naming_an_earlier_chat_id_during_a_turn_belongs_to_that_turn() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "one", false));
    s.start_process(1, 7, 100, "t3");
    s.input(reply(100, "chat-1", "first"));
    s.input(stop_hook(20, "t4", None));
    s.input(chat(11, "a", "two", false));
    // Claude copied the old chat_id: with the acknowledgement, no reply of chat-1 can still be
    // on its way (its Stop came after all of them), so this is chat-2's answer.
    assert_eq!(s.input(reply_seq(100, 2, "chat-1", "second")), vec![replied(100, 2)]);
    let out = s.input(stop_hook(21, "t4", None));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "second");
}

#[test]
fn a_late_reply_after_its_turn_was_answered_is_dropped_and_never_shifts_the_next_answer() {
    let mut s = Script::new(settings()); // turn_timeout 300 s, settle 500 ms
    s.input(chat(10, "a", "slow", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    s.input(chat(11, "a", "next", false));
    let out = s.advance(Duration::from_secs(300));
    assert_eq!(response(&out[1]).1, 504);
    // The interrupted turn's reply arrives while nothing is in flight: acknowledged, dropped.
    assert_eq!(s.input(reply_seq(100, 1, "chat-1", "slow answer")), vec![replied(100, 1)]);
    assert_eq!(s.advance(Duration::from_millis(500)), vec![deliver(100, "chat-2", "next")]);
    // ... and once more during the next turn: still not the next turn's.
    assert_eq!(s.input(reply_seq(100, 2, "chat-1", "slow answer again")), vec![replied(100, 2)]);
    s.input(reply_seq(100, 3, "chat-2", "echo: next"));
    let out = s.input(stop_hook(20, "t4", Some("Replied.")));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "echo: next");
}

#[test]
fn a_stop_without_a_reply_answers_with_the_last_message_and_a_reply_after_it_is_dropped() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "one", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(stop_hook(20, "t4", Some("Replied.")));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "Replied.");
    // A reply arriving after the Stop with no turn in flight is nobody's.
    assert_eq!(s.input(reply_seq(100, 1, "chat-1", "echo: one")), vec![replied(100, 1)]);
    s.input(chat(11, "a", "two", false));
    s.input(reply_seq(100, 2, "chat-2", "echo: two"));
    let out = s.input(stop_hook(21, "t4", Some("Replied.")));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], "echo: two");
}

#[test]
fn readiness_turns_503_when_draining_and_a_second_signal_stops_at_once() {
    let mut s = Script::new(settings());
    let ready = || http(30, request("GET", "/readyz", &[], ""));
    assert_eq!(response(&s.input(ready())[0]).1, 200);
    s.input(chat(10, "a", "sleep", false));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(21, "t4", "chat-1"));
    assert!(s.input(Input::Shutdown).is_empty(), "the turn in flight may finish");
    let (_, status, body) = response(&s.input(ready())[0]);
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("shutting_down")));
    assert_eq!(response(&s.input(http(31, request("GET", "/healthz", &[], "")))[0]).1, 200, "still alive");
    // The operator insists: stop now, the turn in flight gets a clear error.
    assert_eq!(s.input(Input::Shutdown), vec![Output::Signal { proc: 1, signal: Signal::Term }]);
    let out = s.input(Input::Exited { proc: 1, status: "signal 15".into() });
    let (_, status, body) = response(&out[1]);
    assert_eq!(status, 502);
    assert!(body["error"]["message"].as_str().unwrap().contains("shutting down"), "{body}");
    assert_eq!(out.last(), Some(&Output::Exit));
}

#[test]
fn a_failed_save_keeps_the_map_dirty_shows_in_status_and_is_retried_until_it_succeeds() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hi", false));
    assert_eq!(s.saved.len(), 1);
    s.input(Input::Saved { error: Some("cannot save the session map in state: No space left on device".into()) });
    let status = |s: &mut Script| {
        let out = s.input(http(12, request("GET", "/status", &[("authorization", "Bearer key")], "")));
        let Output::Status { report, .. } = &out[0] else { panic!("{out:?}") };
        report.save_error.clone()
    };
    assert!(status(&mut s).unwrap().contains("No space left"));
    s.advance(Duration::from_secs(60));
    assert_eq!(s.saved.len(), 2, "written again at the sweep though nothing changed since");
    assert_eq!(s.saved[1], s.saved[0]);
    s.input(Input::Saved { error: None });
    assert_eq!(status(&mut s), None);
    s.advance(Duration::from_secs(60));
    assert_eq!(s.saved.len(), 2, "saved: clean until something changes");
}

/// Identifiers from a counter both engines of a hand-over share, as one identifier source
/// continues across an upgrade.
struct SharedIds(std::rc::Rc<std::cell::Cell<u64>>);

impl synthesis::engine::Ids for SharedIds {
    fn uuid(&mut self) -> String {
        self.0.set(self.0.get() + 1);
        format!("00000000-0000-4000-8000-{:012}", self.0.get())
    }
    fn token(&mut self) -> String {
        self.0.set(self.0.get() + 1);
        format!("t{}", self.0.get())
    }
}

#[test]
fn exported_state_continues_in_a_new_engine_with_the_same_outputs() {
    use synthesis::engine::Engine;
    let counter = std::rc::Rc::new(std::cell::Cell::new(0));
    let mut a = Script::new(settings());
    a.engine = Engine::new(settings(), Box::new(SharedIds(counter.clone())), a.now);
    // A streamed turn in flight with one reply, a queued turn, a second session idle on its
    // process, a client tool catalog, an interrupt settling: state of every kind.
    a.input(chat(10, "a", "first", true));
    a.start_process(1, 7, 100, "t3");
    a.input(prompt_hook(20, "t4", "chat-1"));
    a.input(reply(100, "chat-1", "part one"));
    a.input(chat(11, "a", "queued", false));
    a.input(chat(12, "b", "other", false));
    a.start_process(2, 8, 101, "t8");
    a.input(stop_hook(21, "t9", Some("b done")));
    a.advance(Duration::from_secs(7));

    let exported = a.engine.export(a.now);
    let saved_before = a.saved.len();
    let ids = Box::new(SharedIds(std::rc::Rc::new(std::cell::Cell::new(counter.get()))));
    let mut b =
        Script { engine: Engine::import(settings(), ids, a.now, &exported).unwrap(), ..Script::new(settings()) };
    b.start = a.start;
    b.now = a.now;
    assert_eq!(b.engine.export(b.now), exported, "import then export is the identity");

    type Step = Box<dyn Fn(&mut Script) -> Vec<Output>>;
    let script: Vec<Step> = vec![
        Box::new(|s| s.advance(Duration::from_secs(8))), // keep-alive of the stream is due at 15 s
        Box::new(|s| s.input(reply(100, "chat-1", "part two"))),
        Box::new(|s| s.input(stop_hook(22, "t4", None))),
        Box::new(|s| s.input(chat(13, "b", "again", false))),
        Box::new(|s| s.input(reply(101, "chat-2", "echo: again"))),
        Box::new(|s| s.input(stop_hook(23, "t9", None))),
        Box::new(|s| s.input(chat(14, "c", "a new session", false))),
        Box::new(|s| s.advance(Duration::from_secs(120))),
    ];
    for (i, step) in script.iter().enumerate() {
        let (out_a, out_b) = (step(&mut a), step(&mut b));
        assert!(!out_a.is_empty() || i == 7, "step {i} does something");
        assert_eq!(out_a, out_b, "step {i}");
    }
    assert_eq!(a.saved[saved_before..], b.saved[..], "the same session map writes");
    assert!(!b.saved.is_empty());
}
