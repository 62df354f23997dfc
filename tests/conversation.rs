//! Loopback tests with the scripted fake claude: what Claude receives when the conversation
//! went on without it, was rewritten, or carries images and files.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::daemon::*;
use support::{assistant, context, user, CONTEXT};

const SYSTEM: &str = "You are a personal assistant running inside OpenClaw.";
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// An OpenClaw-shaped request for `key`: system prompt, then `messages`; the answer's text.
fn turn(d: &Daemon, key: &str, messages: &[Value]) -> String {
    let r = send(d, key, messages);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

fn send(d: &Daemon, key: &str, messages: &[Value]) -> Response {
    let mut all = vec![json!({"role": "system", "content": SYSTEM})];
    all.extend(messages.iter().cloned());
    let body = json!({"model": "claude-code", "messages": all, "stream": false}).to_string();
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str()), ("x-session-affinity", key)];
    d.client().request("POST", "/v1/chat/completions", &headers, &body)
}

fn contents(d: &Daemon) -> Vec<String> {
    d.delivered().iter().map(|v| v["content"].as_str().unwrap().to_string()).collect()
}

#[test]
fn turns_another_model_answered_reach_claude_once_as_context() {
    let d = Daemon::start("missed", "", &[]);
    let u1 = "[Wed 2026-11-25 19:00 UTC] hello";
    let a1 = turn(&d, "zed:0", &[user(u1), context()]);
    // `/model` elsewhere for two turns, then back: OpenClaw stores u1 without its timestamp.
    let mut history = vec![
        user("hello"),
        assistant(&a1),
        user("my name is Zed"),
        assistant("Nice to meet you, Zed."),
        user("I live in Oslo"),
        assistant("Oslo is lovely in spring."),
    ];
    let ask = [user("[Wed 2026-11-25 19:15 UTC] what is my name?"), context()];
    let a4 = turn(&d, "zed:0", &[history.clone(), ask.to_vec()].concat());
    history.extend([user("what is my name?"), assistant(&a4)]);
    turn(&d, "zed:0", &[history, vec![user("[Wed 2026-11-25 19:16 UTC] thanks"), context()]].concat());

    let got = contents(&d);
    assert_eq!(got.len(), 3, "one delivery per turn: {got:#?}");
    let expected = format!(
        "<missed_conversation>\nMessages of this conversation that did not reach you (another model or host answered them), oldest first. They are context; the new message follows this block.\n\
         [user]: my name is Zed\n[assistant (another model)]: Nice to meet you, Zed.\n\
         [user]: I live in Oslo\n[assistant (another model)]: Oslo is lovely in spring.\n</missed_conversation>\n\n\
         [Wed 2026-11-25 19:15 UTC] what is my name?\n\n{CONTEXT}"
    );
    assert_eq!(got[1], expected);
    assert_eq!(got[2], format!("[Wed 2026-11-25 19:16 UTC] thanks\n\n{CONTEXT}"), "not repeated");
    assert_eq!(d.claude_pids().len(), 1, "the same claude throughout");
}

#[test]
fn a_rewritten_history_starts_a_new_claude_session_seeded_with_it() {
    let d = Daemon::start("rewrite", "", &[]);
    let a1 = turn(&d, "r:0", &[user("hello")]);
    assert_eq!(turn(&d, "r:0", &[user("hello"), assistant(&a1), user("more")]), "echo: more");
    // The user rewinds and edits: none of Claude's answers is in the history any more.
    let answer = turn(&d, "r:0", &[user("hello"), assistant("Bonjour !"), user("continue in French")]);
    assert!(answer.ends_with("continue in French"), "{answer}");
    let got = contents(&d);
    assert_eq!(
        got[2],
        format!(
            "<system_prompt from=\"client\">\n{SYSTEM}\n</system_prompt>\n\n\
             <earlier_conversation>\n[user]: hello\n[assistant]: Bonjour !\n</earlier_conversation>\n\ncontinue in French"
        )
    );
    let uuids: Vec<String> =
        d.log_lines(" --session-id ").iter().map(|l| l.rsplit(' ').next().unwrap().to_string()).collect();
    assert_eq!(uuids.len(), 2, "a second, new Claude session");
    assert_ne!(uuids[0], uuids[1]);
    assert_eq!(d.log_lines("edited, rewound or branched").len(), 1, "and the log says why");
    let pids = d.claude_pids();
    wait_for("the first claude to be gone", || (!alive(pids[0])).then_some(()));
    assert!(alive(pids[1]));
}

/// The path of every attachment a channel message names.
fn named_paths(content: &str) -> Vec<PathBuf> {
    content
        .lines()
        .filter_map(|l| l.strip_suffix(" — open it with the Read tool]"))
        .map(|l| PathBuf::from(l.rsplit(' ').next().unwrap()))
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn images_and_files_reach_claude_as_owner_only_files() {
    let d = Daemon::start("attachments", "max_body = 40000000", &[]);
    let notes = "line one\nline two\n";
    let parts = json!([
        {"type": "text", "text": "[Wed 2026-11-25 19:30 UTC] what is in these?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG}")}},
        {"type": "file", "file": {"filename": "notes.txt", "file_data": "data:text/plain;base64,bGluZSBvbmUKbGluZSB0d28K"}},
    ]);
    turn(&d, "img:0", &[json!({"role": "user", "content": parts})]);
    let content = contents(&d).pop().unwrap();
    let paths = named_paths(&content);
    assert_eq!(paths.len(), 2, "{content}");
    let state = d.dir.join("state").canonicalize().unwrap();
    let png = synthesis::wire::base64::decode(PNG).unwrap();
    for (path, bytes) in paths.iter().zip([png.as_slice(), notes.as_bytes()]) {
        assert!(path.starts_with(state.join("attachments")), "{}", path.display());
        assert_eq!(std::fs::read(path).unwrap(), bytes, "{}", path.display());
        assert_eq!(mode(path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }
    assert_eq!(mode(&state.join("attachments")), 0o700);
    assert!(paths[1].to_string_lossy().ends_with("-notes.txt"));

    // Too large, or not an image: refused in the OpenAI shape, and no session is created.
    let big = "A".repeat(11 * 1024 * 1024 / 3 * 4);
    let image = |url: String| json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]});
    let r = send(&d, "big:0", &[image(format!("data:image/png;base64,{big}"))]);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (413, Some("attachment_too_large")));
    let r = send(&d, "bad:0", &[image("data:image/png;base64,@@".into())]);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("invalid_attachment")));
    let r = send(&d, "blank:0", &[user("  \n ")]);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("no_user_message")));
    assert_eq!(d.claude_pids().len(), 1);
    let map = std::fs::read_to_string(state.join("sessions.json")).unwrap();
    assert!(map.contains("img:0") && !map.contains("big:0") && !map.contains("bad:0") && !map.contains("blank:0"));
}
