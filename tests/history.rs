//! Replay tests: Claude sees the whole conversation. Turns it missed (another model answered,
//! another host served them) reach it once, as context; a rewritten history starts a new,
//! seeded Claude session; images and files become files Claude can Read; refused requests
//! leave nothing behind.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use synthesis::engine::attachments::session_dir;
use synthesis::engine::history::stable_hash;
use synthesis::engine::{Input, Output, Signal, SpawnSpec};
use synthesis::wire::bridge::{FromChannel, ToChannel};

const PREAMBLE: &str = "Messages of this conversation that did not reach you (another model or host answered them), oldest first. They are context; the new message follows this block.";
/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// An OpenClaw-shaped request: its system prompt, then `messages`.
fn openclaw(conn: u64, key: &str, messages: Value) -> Input {
    let mut all = vec![json!({"role": "system", "content": "You are a personal assistant running inside OpenClaw."})];
    all.extend(messages.as_array().unwrap().iter().cloned());
    let body = json!({"model": "claude-code", "messages": all, "stream": false});
    let auth = format!("Bearer {KEY}");
    http(
        conn,
        request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-session-affinity", key)],
            &body.to_string(),
        ),
    )
}

fn deliver(chat_id: &str, content: &str) -> Output {
    Output::Bridge { conn: 100, frame: ToChannel::Deliver { chat_id: chat_id.into(), content: content.into() } }
}

fn missed_block(lines: &[&str]) -> String {
    format!("<missed_conversation>\n{PREAMBLE}\n{}\n</missed_conversation>", lines.join("\n"))
}

/// Session `zed:0` after turn one, answered by synthesis with `HELLO`.
const HELLO: &str = "Hello! How can I help?";
const U1: &str = "[Wed 2026-11-25 19:00 UTC] hello";
const RUNTIME: &str = "\n\nRuntime: agent=main | model=synthesis-claude-bridge/claude-code";

fn after_turn_one() -> Script {
    let mut s = Script::new(settings());
    s.input(openclaw(10, "zed:0", json!([user(&format!("{U1}{RUNTIME}")), context()])));
    let first = delivered(&s.start_process(1, 7, 100, "t3"));
    assert!(first[0].ends_with(CONTEXT), "{}", first[0]);
    s.input(prompt_hook(20, "t4", "chat-1"));
    s.input(reply(100, "chat-1", HELLO));
    let out = s.input(stop_hook(20, "t4", None));
    assert_eq!(response(&out[1]).2["choices"][0]["message"]["content"], HELLO);
    s
}

fn answer(s: &mut Script, chat_id: &str, text: &str) {
    s.input(reply(100, chat_id, text));
    s.input(stop_hook(20, "t4", None));
}

#[test]
fn turns_answered_by_another_model_reach_claude_once_as_context_with_the_new_message() {
    let mut s = after_turn_one();
    // The user switched to another model for two turns and came back.
    let history = json!([
        user(&format!("{U1}{RUNTIME}")),
        assistant(HELLO),
        user("[Wed 2026-11-25 19:05 UTC] my name is Zed"),
        assistant("Nice to meet you, Zed."),
        user("[Wed 2026-11-25 19:06 UTC] I live in Oslo"),
        assistant("Oslo is lovely in spring."),
        user("[Wed 2026-11-25 19:15 UTC] what is my name?"),
        context(),
    ]);
    let out = s.input(openclaw(11, "zed:0", history));
    let expected = format!(
        "{}\n\n[Wed 2026-11-25 19:15 UTC] what is my name?\n\n{CONTEXT}",
        missed_block(&[
            "[user]: [Wed 2026-11-25 19:05 UTC] my name is Zed",
            "[assistant (another model)]: Nice to meet you, Zed.",
            "[user]: [Wed 2026-11-25 19:06 UTC] I live in Oslo",
            "[assistant (another model)]: Oslo is lovely in spring.",
        ])
    );
    assert_eq!(out, vec![deliver("chat-2", &expected)], "one delivery, the missed turns in order, once");
    answer(&mut s, "chat-2", "Your name is Zed.");
    // The next turn: Claude answered the last one, so only the new text goes.
    let history = json!([
        user(&format!("{U1}{RUNTIME}")),
        assistant(HELLO),
        user("my name is Zed"),
        assistant("Nice to meet you, Zed."),
        user("I live in Oslo"),
        assistant("Oslo is lovely in spring."),
        user("what is my name?"),
        assistant("Your name is Zed."),
        user("[Wed 2026-11-25 19:16 UTC] thanks"),
        context(),
    ]);
    let out = s.input(openclaw(12, "zed:0", history));
    assert_eq!(out, vec![deliver("chat-3", &format!("[Wed 2026-11-25 19:16 UTC] thanks\n\n{CONTEXT}"))]);
}

#[test]
fn openclaws_rewrites_of_its_history_do_not_hide_claudes_place() {
    // As measured through the real gateway after `/model`: stored user messages lose their
    // timestamp and merge into one message of two parts, the first message's Runtime line is
    // regenerated, the `/model` commands stay in the history, the context block is gone.
    let mut s = after_turn_one();
    let history = json!([
        user("hello\n\nRuntime: agent=main | model=openai/gpt-5"), assistant(HELLO),
        {"role": "user", "content": [{"type": "text", "text": "/model openai/gpt-5"}, {"type": "text", "text": "my name is Zed"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Got it, Zed."}]},
        user("[Wed 2026-11-25 19:14 UTC] /model synthesis-claude-bridge/claude-code"),
        user("[Wed 2026-11-25 19:15 UTC] what is my name?"), context(),
    ]);
    let out = s.input(openclaw(11, "zed:0", history));
    let expected = format!(
        "{}\n\n[Wed 2026-11-25 19:14 UTC] /model synthesis-claude-bridge/claude-code\n\n[Wed 2026-11-25 19:15 UTC] what is my name?\n\n{CONTEXT}",
        missed_block(&["[user]: /model openai/gpt-5\nmy name is Zed", "[assistant (another model)]: Got it, Zed."])
    );
    assert_eq!(out, vec![deliver("chat-2", &expected)]);
}

#[test]
fn a_message_claude_took_in_but_never_answered_is_not_handed_over_again() {
    let mut s = after_turn_one();
    let history =
        json!([user(U1), assistant(HELLO), user("[Wed 2026-11-25 19:05 UTC] remember the code 4711"), context()]);
    assert_eq!(delivered(&s.input(openclaw(11, "zed:0", history))).len(), 1);
    // Claude's API call fails: 502, and OpenClaw's fallback model answers instead.
    let body = json!({"hook_event_name": "StopFailure", "error": "overloaded_error"}).to_string();
    let out = s.input(http(20, request("POST", "/hooks/stop-failure", &[("authorization", "Bearer t4")], &body)));
    assert_eq!(response(&out[1]).1, 502);
    let history = json!([
        user("hello"),
        assistant(HELLO),
        user("remember the code 4711"),
        assistant("Noted: 4711."),
        user("[Wed 2026-11-25 19:07 UTC] and what was it?"),
        context(),
    ]);
    let out = s.input(openclaw(12, "zed:0", history));
    let expected = format!(
        "{}\n\n[Wed 2026-11-25 19:07 UTC] and what was it?\n\n{CONTEXT}",
        missed_block(&["[assistant (another model)]: Noted: 4711."])
    );
    assert_eq!(out, vec![deliver("chat-3", &expected)], "Claude heard the question; only the answer is new to it");
}

#[test]
fn claudes_own_tool_calls_are_its_place_in_the_conversation() {
    let mut s = Script::new(settings());
    let ls = json!({"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}});
    let with_tools = |conn: u64, messages: Value| {
        let body = json!({"messages": messages, "tools": [ls]});
        let auth = format!("Bearer {KEY}");
        let headers = [("authorization", auth.as_str()), ("x-session-affinity", "t:0")];
        http(conn, request("POST", "/v1/chat/completions", &headers, &body.to_string()))
    };
    s.input(with_tools(10, json!([user("list the files")])));
    s.start_process(1, 7, 100, "t3");
    s.input(prompt_hook(20, "t4", "chat-1"));
    let call = FromChannel::ToolCall { call_ref: "7".into(), name: "ls".into(), arguments: json!({}) };
    let out = s.input(Input::BridgeFrame { conn: 100, frame: call });
    let id = response(&out[0]).2["choices"][0]["message"]["tool_calls"][0]["id"].as_str().unwrap().to_string();
    let rewritten: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    let call_msg = json!({"role": "assistant", "content": null,
        "tool_calls": [{"id": rewritten, "type": "function", "function": {"name": "ls", "arguments": "{}"}}]});
    let result = json!({"role": "tool", "tool_call_id": rewritten, "content": "a.txt"});
    s.input(with_tools(11, json!([user("list the files"), call_msg, result])));
    // Claude's turn then times out; the fallback model writes the final answer.
    let out = s.advance(Duration::from_secs(300));
    assert_eq!(response(&out[1]).1, 504);
    s.advance(Duration::from_secs(1));
    let history = json!([user("list the files"), call_msg, result, assistant("There is a.txt."), user("thanks")]);
    let out = s.input(with_tools(12, history));
    let expected = format!("{}\n\nthanks", missed_block(&["[assistant (another model)]: There is a.txt."]));
    assert_eq!(out, vec![deliver("chat-2", &expected)], "the tool call is Claude's own, the result it heard");
}

#[test]
fn a_history_without_any_of_claudes_answers_starts_a_new_seeded_claude_session() {
    let mut s = after_turn_one();
    // The user edited the conversation: Claude's answer is gone, another past takes its place.
    let history = json!([user("hello"), assistant("Bonjour !"), user("[Wed 2026-11-25 19:20 UTC] où suis-je ?")]);
    let out = s.input(openclaw(11, "zed:0", history));
    assert_eq!(out, vec![Output::Signal { proc: 1, signal: Signal::Term }], "the old Claude session's process goes");
    let uuid = "00000000-0000-4000-8000-000000000006";
    let saved = s.saved.last().unwrap();
    assert_eq!((saved[0].uuid.as_str(), saved[0].answers.len()), (uuid, 0), "saved at once");
    let out = s.input(Input::Exited { proc: 1, status: "signal 15".into() });
    let spec = SpawnSpec { session_uuid: uuid.into(), bridge_token: "t7".into(), hook_token: "t8".into() };
    assert_eq!(out, vec![Output::CloseBridge { conn: 100 }, Output::Spawn { proc: 2, spec }]);
    let seeded =
        "<system_prompt from=\"client\">\nYou are a personal assistant running inside OpenClaw.\n</system_prompt>\n\n\
        <earlier_conversation>\n[user]: hello\n[assistant]: Bonjour !\n</earlier_conversation>\n\n\
        [Wed 2026-11-25 19:20 UTC] où suis-je ?";
    assert_eq!(
        s.start_process(2, 8, 101, "t7"),
        vec![Output::Bridge {
            conn: 101,
            frame: ToChannel::Deliver { chat_id: "chat-2".into(), content: seeded.into() }
        }]
    );
    s.input(reply(101, "chat-2", "À Paris."));
    s.input(stop_hook(21, "t8", None));
    // The new Claude session's answer is its place from now on.
    let history =
        json!([user("hello"), assistant("Bonjour !"), user("où suis-je ?"), assistant("À Paris."), user("merci")]);
    assert_eq!(delivered(&s.input(openclaw(12, "zed:0", history))), ["merci"]);
}

#[test]
fn a_compacted_history_is_not_a_rewrite() {
    let mut s = after_turn_one();
    let summary = "The conversation history before this point was compacted into the following summary:\n\n<summary>greetings</summary>";
    let history = json!([user(summary), assistant("Sure, Zed."), user("go on")]);
    let out = s.input(openclaw(11, "zed:1", history));
    let expected = format!("{}\n\ngo on", missed_block(&["[assistant (another model)]: Sure, Zed."]));
    assert_eq!(out, vec![deliver("chat-2", &expected)], "same Claude session and process; the summary is not repeated");
}

#[test]
fn whitespace_only_new_text_is_a_400_and_refused_requests_leave_nothing_behind() {
    let mut s = Script::new(settings());
    for (conn, key) in [(10, "w1"), (11, "w2"), (12, "w3")] {
        let out = s.input(openclaw(
            conn,
            key,
            json!([user(" \n\t "), {"role": "user", "content": [{"type": "text", "text": "  "}]}]),
        ));
        let (_, status, body) = response(&out[0]);
        assert_eq!((status, body["error"]["code"].as_str(), out.len()), (400, Some("no_user_message"), 1));
    }
    let out = s.input(openclaw(13, "w4", json!([user("x"), assistant("y")])));
    assert_eq!(response(&out[0]).1, 400, "nothing after the last assistant message");
    assert!(s.saved.is_empty(), "no session was saved");
    let out = s.input(http(14, request("GET", "/status", &[("authorization", "Bearer key")], "")));
    let Output::Status { report, .. } = &out[0] else { panic!("{out:?}") };
    assert!(report.sessions.is_empty(), "none was created: {:?}", report.sessions);
    // A known session refuses whitespace too and goes on as before.
    let mut s = after_turn_one();
    let saved = s.saved.len();
    let out = s.input(openclaw(11, "zed:0", json!([user(U1), assistant(HELLO), user("   ")])));
    assert_eq!(response(&out[0]).1, 400);
    assert_eq!(s.saved.len(), saved);
    let out = s.input(openclaw(12, "zed:0", json!([user(U1), assistant(HELLO), user("real")])));
    assert_eq!(delivered(&out), ["real"]);
}

#[test]
fn a_new_session_refused_for_a_full_pool_is_not_created() {
    let mut st = settings();
    st.max_processes = 1;
    let mut s = Script::new(st);
    s.input(chat(10, "a", "busy", false));
    s.start_process(1, 7, 100, "t3");
    let saved = s.saved.len();
    let out = s.input(chat(11, "b", "x", false));
    assert_eq!(response(&out[0]).1, 503);
    assert_eq!(s.saved.len(), saved, "nothing saved");
    let out = s.input(http(12, request("GET", "/status", &[("authorization", "Bearer key")], "")));
    let Output::Status { report, .. } = &out[0] else { panic!("{out:?}") };
    let keys: Vec<&str> = report.sessions.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["a"]);
}

fn png_bytes() -> Vec<u8> {
    synthesis::wire::base64::decode(PNG).unwrap()
}

#[test]
fn images_and_files_are_written_right_before_the_message_that_names_them() {
    let mut s = Script::new(settings());
    let parts = json!([
        {"type": "text", "text": "[Wed 2026-11-25 19:30 UTC] what is in these?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}},
        {"type": "file", "file": {"filename": "notes.txt", "file_data": "data:text/plain;base64,bm90ZXM="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]);
    s.input(openclaw(10, "img:0", json!([{"role": "user", "content": parts}])));
    let out = s.start_process(1, 7, 100, "t3");
    let dir = session_dir("/state/attachments", "img:0");
    assert_eq!(dir, format!("/state/attachments/{:016x}", stable_hash(b"img:0")));
    let png = format!("{dir}/{:016x}-image.png", stable_hash(&png_bytes()));
    let txt = format!("{dir}/{:016x}-notes.txt", stable_hash(b"notes"));
    assert_eq!(out[0], Output::WriteAttachment { path: png.clone(), bytes: png_bytes() });
    assert_eq!(out[1], Output::WriteAttachment { path: txt.clone(), bytes: b"notes".to_vec() });
    let text = delivered(&out[2..]).pop().expect("then the delivery");
    assert!(
        text.ends_with(&format!(
            "[Wed 2026-11-25 19:30 UTC] what is in these?\n[image attached: {png} — open it with the Read tool]\n\
         [file attached: notes.txt at {txt} — open it with the Read tool]\n[image: https://example.com/cat.jpg]"
        )),
        "{text}"
    );
    assert_eq!(out.len(), 3);
}

#[test]
fn an_image_alone_is_a_message_and_bad_or_oversized_ones_are_refused_creating_nothing() {
    let mut s = Script::new(settings());
    let image = |url: String| json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]);
    let out = s.input(openclaw(10, "bad", image("data:image/png;base64,@@@".into())));
    let (_, status, body) = response(&out[0]);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_attachment")));
    let huge = "A".repeat(11 * 1024 * 1024 / 3 * 4);
    let out = s.input(openclaw(11, "big", image(format!("data:image/png;base64,{huge}"))));
    let (_, status, body) = response(&out[0]);
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("attachment_too_large")));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(s.saved.is_empty());
    // Only an image, no text: still something for Claude.
    s.input(openclaw(12, "ok", image(format!("data:image/png;base64,{PNG}"))));
    let out = s.start_process(1, 7, 100, "t7"); // the refused requests drew ids too
    assert!(matches!(&out[0], Output::WriteAttachment { .. }));
    assert!(delivered(&out)[0].contains("[image attached: /state/attachments/"));
}

#[test]
fn images_among_the_missed_messages_are_handed_over_too() {
    let mut s = after_turn_one();
    let photo = json!({"role": "user", "content": [
        {"type": "text", "text": "here is my cat"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}}]});
    let history = json!([user(U1), assistant(HELLO), photo, assistant("A lovely cat."), user("what colour is it?")]);
    let out = s.input(openclaw(11, "zed:0", history));
    let png = format!("{}/{:016x}-image.png", session_dir("/state/attachments", "zed:0"), stable_hash(&png_bytes()));
    assert_eq!(out[0], Output::WriteAttachment { path: png.clone(), bytes: png_bytes() });
    let expected = format!(
        "{}\n\nwhat colour is it?",
        missed_block(&[
            &format!("[user]: here is my cat\n[image attached: {png} — open it with the Read tool]"),
            "[assistant (another model)]: A lovely cat.",
        ])
    );
    assert_eq!(out[1..], [deliver("chat-2", &expected)]);
}

#[test]
fn a_forgotten_session_takes_its_attachments_along() {
    let s = after_turn_one();
    let mut record = s.saved.last().unwrap()[0].clone();
    record.last_used -= 31 * 86_400;
    let mut later = Script::new(settings());
    later.engine.restore(vec![record]);
    later.input(http(10, request("GET", "/healthz", &[], ""))); // tells the engine what time it is
    let out = later.advance(Duration::from_secs(60));
    assert_eq!(out, vec![Output::RemoveAttachments { dir: session_dir("/state/attachments", "zed:0") }]);
}

#[test]
fn answers_are_kept_as_fingerprints_only_and_survive_a_restart() {
    let mut s = after_turn_one();
    s.advance(Duration::from_secs(60));
    let saved = s.saved.last().unwrap().clone();
    let json = serde_json::to_string(&saved).unwrap();
    assert!(!json.contains("Hello") && !json.contains("hello"), "no message texts on disk: {json}");
    assert_eq!(saved[0].answers.len(), 1);
    let mut restarted = Script::new(settings());
    restarted.engine.restore(saved);
    let history = json!([user(U1), assistant(HELLO), user("my name is Zed"), assistant("Hi Zed."), user("again?")]);
    restarted.input(openclaw(11, "zed:0", history));
    let out = restarted.start_resumed_process(1, 8, 101, "t2");
    let expected =
        format!("{}\n\nagain?", missed_block(&["[user]: my name is Zed", "[assistant (another model)]: Hi Zed."]));
    assert_eq!(delivered(&out), [expected]);
}

#[test]
fn every_captured_openclaw_conversation_still_gets_one_plain_delivery_per_turn() {
    let conversations: [&[&str]; 4] = [
        &["gateway-http-alice-turn-one", "gateway-http-alice-turn-two", "gateway-http-alice-turn-three"],
        &["gateway-http-bob-turn-one", "gateway-http-bob-slash-new", "gateway-http-bob-after-new"],
        &["compat-sessC-turn1", "compat-sessC-turn2"],
        &["gateway-cli-main-turn1", "gateway-cli-main-turn2"],
    ];
    for turns in conversations {
        let mut s = Script::new(settings());
        for (i, name) in turns.iter().enumerate() {
            let mut out = s.input(http(10 + i as u64, capture(name)));
            if i == 0 {
                out = s.start_process(1, 7, 100, "t3");
            }
            let d = delivered(&out);
            assert_eq!(d.len(), 1, "{name}: {out:?}");
            assert!(!d[0].contains("<missed_conversation>"), "{name}: synthesis served every turn");
            assert!(i == 0 || !d[0].contains("<earlier_conversation>"), "{name}");
            assert!(out.iter().all(|o| !matches!(o, Output::Signal { .. })), "{name}: not a rewrite");
            // Answered with what the next capture's history holds as synthesis's answer.
            if let Some(next) = turns.get(i + 1) {
                s.input(reply(100, &format!("chat-{}", i + 1), &captured_answer(next)));
                s.input(stop_hook(20, "t4", None));
            }
        }
    }
}

#[test]
fn a_queued_turn_with_missed_turns_and_an_image_survives_an_exported_engine() {
    use synthesis::engine::{CounterIds, Engine};
    let mut a = after_turn_one();
    a.input(openclaw(11, "zed:0", json!([user(U1), assistant(HELLO), user("busy")])));
    let photo = json!({"role": "user", "content": [
        {"type": "text", "text": "here is my cat"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}}]});
    let queued = json!([user(U1), assistant(HELLO), photo, assistant("A lovely cat."), user("what colour is it?")]);
    assert!(a.input(openclaw(12, "zed:0", queued)).is_empty(), "queued behind chat-2");
    let exported = a.engine.export(a.now);
    let imported = Engine::import(settings(), Box::new(CounterIds::default()), a.now, &exported).unwrap();
    let mut b = Script { engine: imported, start: a.start, now: a.now, ..Script::new(settings()) };
    let (out_a, out_b) = (a.input(stop_hook(20, "t4", Some("done"))), b.input(stop_hook(20, "t4", Some("done"))));
    assert_eq!(out_a, out_b);
    assert!(matches!(&out_a[2], Output::WriteAttachment { bytes, .. } if *bytes == png_bytes()), "{out_a:?}");
    assert!(delivered(&out_a)[0].starts_with("<missed_conversation>"));
    // What the session remembers came along: HELLO, answered before the export, is still its own.
    let next = |s: &mut Script| {
        s.input(reply(100, "chat-3", "It is grey."));
        s.input(stop_hook(20, "t4", None));
        let out = s.input(openclaw(13, "zed:0", json!([user(U1), assistant(HELLO), user("thanks")])));
        (delivered(&out), out.iter().any(|o| matches!(o, Output::Signal { .. })))
    };
    assert_eq!(next(&mut a), (vec!["thanks".to_string()], false));
    assert_eq!(next(&mut b), (vec!["thanks".to_string()], false), "not taken for a rewritten history");
}
