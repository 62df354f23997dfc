//! Replay tests for hostile input: numbers and sizes from outside never drive an unbounded
//! loop, allocation or file, and what the README promises holds under pressure.

mod support;

use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;
use support::*;
use synthesis::engine::{Input, Output};
use synthesis::wire::bridge::ToChannel;

/// Run `f` on another thread; fail if it takes longer than a few seconds (a frozen event loop).
fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} did not finish: the engine froze"))
}

fn compacted_request(conn: u64, key: &str) -> Input {
    let body = json!({
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "The conversation history before this point was compacted into the following summary: ..."},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "go on"},
        ],
        "prompt_cache_key": key,
    });
    let headers = [("authorization", "Bearer key")];
    http(conn, request("POST", "/v1/chat/completions", &headers, &body.to_string()))
}

#[test]
fn a_huge_generation_in_the_session_key_is_answered_at_once() {
    let out = promptly("a request with generation 2^64-1", || {
        let mut s = Script::new(settings());
        // An earlier generation exists, so the engine looks for the latest one below 2^64-1.
        s.input(chat(9, "x:3", "first", false));
        s.input(compacted_request(10, "x:18446744073709551615"))
    });
    assert!(out.is_empty(), "continues session x:3, whose turn is in flight: queued, {out:?}");
}

#[test]
fn a_huge_generation_with_no_earlier_session_starts_a_new_one_at_once() {
    let out = promptly("a request with generation 2^64-1", || {
        Script::new(settings()).input(compacted_request(10, "x:18446744073709551615"))
    });
    assert!(matches!(&out[..], [Output::Spawn { .. }]), "{out:?}");
}

#[test]
fn a_compaction_continues_the_highest_earlier_generation() {
    let mut s = Script::new(settings());
    s.input(chat(9, "x:1", "one", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some("ok")));
    s.input(chat(11, "x:7", "seven", false)); // another conversation under the same id (a reset)
    let out = s.input(compacted_request(12, "x:9"));
    assert!(out.is_empty(), "x:7's process is starting: the turn waits for it, {out:?}");
    let out = s.input(compacted_request(13, "x:5"));
    let delivered = matches!(&out[..], [Output::Bridge { conn: 100, frame: ToChannel::Deliver { chat_id, content } }]
        if chat_id == "chat-2" && content.ends_with("go on"));
    assert!(delivered, "x:5 continues x:1 (the highest generation below 5): {out:?}");
}

#[test]
fn an_overlong_session_key_is_refused_with_400() {
    let mut s = Script::new(settings());
    let key = "k".repeat(10_000);
    let out = s.input(chat(10, &key, "hello", false));
    let (conn, status, body) = response(&out[0]);
    assert_eq!((conn, status), (10, 400));
    assert_eq!(body["error"]["code"], "session_key_too_long");
    assert_eq!(out.len(), 1, "no session, no process");
    // A long but sane key is fine.
    let out = s.input(chat(11, &"k".repeat(200), "hello", false));
    assert!(matches!(&out[..], [Output::Spawn { .. }]), "{out:?}");
}

/// Answer `conn`'s chat turn `chat_id` with `text` on a started process (bridge 100, hook t4).
fn turn(s: &mut Script, conn: u64, text: &str) -> Vec<Output> {
    let out = s.input(chat(conn, "a", text, false));
    let Some(Output::Bridge { frame: ToChannel::Deliver { chat_id, .. }, .. }) = out.first() else {
        panic!("not delivered: {out:?}")
    };
    let chat_id = chat_id.clone();
    s.input(reply(100, &chat_id, &format!("answer to {text}")));
    s.input(stop_hook(20, "t4", None))
}

#[test]
fn an_identical_retry_within_ten_minutes_gets_the_same_answer_after_many_turns() {
    let mut s = Script::new(settings());
    s.input(chat(9, "a", "warm up", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some("ok")));
    turn(&mut s, 10, "first");
    for i in 0..20 {
        s.advance(Duration::from_secs(10));
        turn(&mut s, 11 + i, &format!("later {i}"));
    }
    s.advance(Duration::from_secs(200)); // 400 s after "first"
    let out = s.input(chat(50, "a", "first", false));
    let (conn, status, body) = response(&out[0]);
    assert_eq!((conn, status), (50, 200));
    assert_eq!(body["choices"][0]["message"]["content"], "answer to first");
    assert_eq!(out.len(), 1, "answered again, not delivered to Claude again: {out:?}");
    // After ten minutes it is a new turn.
    s.advance(Duration::from_secs(201));
    let out = s.input(chat(51, "a", "first", false));
    assert!(matches!(&out[..], [Output::Bridge { frame: ToChannel::Deliver { .. }, .. }]), "{out:?}");
}

#[test]
fn the_retry_cache_is_bounded_by_count_and_bytes() {
    let mut s = Script::new(settings());
    s.input(chat(9, "a", "warm up", false));
    s.start_process(1, 7, 100, "t3");
    s.input(stop_hook(20, "t4", Some("ok")));
    // Many quick turns: only the newest are kept.
    for i in 0..300 {
        turn(&mut s, 100 + i, &format!("q{i}"));
    }
    let stats = s.engine.stats();
    assert!(stats.recent_answers <= 64, "{stats:?}");
    // Big answers: bounded by bytes.
    let big = "x".repeat(300_000);
    for i in 0..10 {
        let out = s.input(chat(1000 + i, "a", &format!("big {i}"), false));
        let Some(Output::Bridge { frame: ToChannel::Deliver { chat_id, .. }, .. }) = out.first() else { panic!() };
        let chat_id = chat_id.clone();
        s.input(reply(100, &chat_id, &big));
        s.input(stop_hook(20, "t4", None));
    }
    let stats = s.engine.stats();
    assert!(stats.recent_bytes <= 1 << 20, "{stats:?}");
    // The newest answer is still there for a retry.
    let out = s.input(chat(2000, "a", "big 9", false));
    assert_eq!(response(&out[0]).2["choices"][0]["message"]["content"], big.as_str());
}

#[test]
fn refused_requests_leave_no_session_behind() {
    let mut s = Script::new(synthesis::engine::Settings { max_processes: 1, ..settings() });
    s.input(chat(9, "busy", "one", false));
    for i in 0..50 {
        let out = s.input(chat(10 + i, &format!("k{i}"), "hello", false));
        assert_eq!(response(&out[0]).1, 503, "the only process is busy");
    }
    let out = s.input(chat(99, "empty", "", false));
    assert_eq!(response(&out[0]).1, 400);
    assert_eq!(s.engine.stats().sessions, 1, "{:?}", s.engine.stats());
    assert!(s.saved.iter().all(|saved| saved.len() <= 2), "sessions.json never grew past two entries");
}

#[test]
fn a_bound_bridge_that_says_hello_again_is_cut_off_with_its_process() {
    let mut s = Script::new(settings());
    s.input(chat(10, "a", "hello", false));
    s.start_process(1, 7, 100, "t3");
    let out = s.input(hello(100, "t999"));
    assert_eq!(out[0], Output::CloseBridge { conn: 100 });
    assert!(out.contains(&Output::Signal { proc: 1, signal: synthesis::engine::Signal::Term }), "{out:?}");
    assert_eq!(s.engine.stats().bridges, 0, "the engine does not keep a binding to a closed socket");
}

#[test]
fn a_shutdown_with_a_spare_due_does_not_spin() {
    let fired = promptly("a shutdown after a lost spare", || {
        let mut s = Script::new(synthesis::engine::Settings { spare_processes: 1, ..settings() });
        let out = s.input(Input::Tick);
        assert!(matches!(&out[..], [Output::Spawn { proc: 1, .. }]), "a spare is started: {out:?}");
        s.input(Input::SpawnFailed { proc: 1, error: "gone".into() }); // the next spare waits a while
        s.input(chat(10, "a", "hello", false));
        s.input(Input::Shutdown);
        // Time passes beyond the spare's retry; every deadline must move on once handled.
        let mut fired = 0;
        let end = s.now + Duration::from_secs(3600);
        while let Some(t) = s.engine.poll_timeout().filter(|t| *t <= end) {
            s.now = t.max(s.now);
            s.input(Input::Tick);
            fired += 1;
            assert!(fired < 1000, "poll_timeout stays at {:?} after a tick", t - s.start);
        }
        fired
    });
    assert!(fired > 0);
}
