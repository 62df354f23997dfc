//! What a Claude session has seen of a conversation, and what it missed.
//!
//! OpenClaw resends the whole history with every request, and a conversation can go on without
//! synthesis: `/model` to another model and back, a fallback model after an error, another host
//! of a fleet. So each session remembers fingerprints (never texts) of the answers its Claude
//! session gave (`Session::answers`). On a request, the last assistant message that is one of
//! them is where Claude left the conversation; what follows it up to the new input went on
//! without Claude, and is handed over once, in a `<missed_conversation>` block.
//!
//! User messages are never the anchor: OpenClaw rewrites them in its stored history (timestamp
//! prefix dropped, neighbours merged into one message of two parts, the first one's `Runtime:`
//! line regenerated, the per-turn internal-context block left out). They are only compared, part
//! by part and normalised, with what was delivered since Claude's last answer
//! (`Session::heard`), so that a message Claude took in but never answered (its turn failed, a
//! fallback model answered) is not handed over a second time.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::attachments::{Attachment, Mode, Renderer};
use crate::wire::openai::{ApiError, ChatMessage};

/// Answer fingerprints kept per session (only the latest can be an anchor in practice).
pub const ANSWERS_KEPT: usize = 64;
/// Fingerprints of what was delivered since the last answer.
pub const HEARD_KEPT: usize = 64;
/// Most characters of missed conversation handed over with one message (the newest are kept).
const MISSED_MAX: usize = 32 * 1024;
/// Most characters of one missed tool call or result.
const TOOL_TEXT_MAX: usize = 2000;
const CONTEXT_BEGIN: &str = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>";
const CONTEXT_END: &str = "<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";

/// A 64-bit hash that never changes with the Rust release (fingerprints are persisted;
/// `DefaultHasher` may change): eight bytes at a time, FxHash-style, then a splitmix64 finish.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    let seed = 0x243f_6a88_85a3_08d3 ^ bytes.len() as u64;
    let mut h = chunks.by_ref().fold(seed, |h, c| mix(h, u64::from_le_bytes(c.try_into().unwrap())));
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = mix(h, u64::from_le_bytes(last));
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn print(kind: &str, text: &str) -> u64 {
    stable_hash(format!("{kind}\0{text}").as_bytes())
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Fingerprint of an answer's text, whitespace normalised.
pub fn answer_print(text: &str) -> u64 {
    print("answer", &normalise(text))
}

/// Fingerprint of a tool call id, by letters and digits only (OpenClaw rewrites `call_x_1` to `callx1`).
pub fn call_print(id: &str) -> u64 {
    let id: String = id.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    print("call", &id)
}

/// Fingerprint of a tool result, by call id (letters and digits) and normalised text.
pub fn tool_print(call_id: &str, text: &str) -> u64 {
    let id: String = call_id.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    print("tool", &format!("{id}\0{}", normalise(text)))
}

/// Remember `item` in a bounded list, newest last, without repeats.
pub fn remember(list: &mut Vec<u64>, item: u64, max: usize) {
    list.retain(|x| *x != item);
    list.push(item);
    if list.len() > max {
        list.drain(..list.len() - max);
    }
}

/// Without OpenClaw's per-turn internal-context blocks.
fn without_internal_context(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(CONTEXT_BEGIN) {
        out.push_str(&rest[..start]);
        rest = match rest[start..].find(CONTEXT_END) {
            Some(end) => &rest[start + end + CONTEXT_END.len()..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Without a leading `[Wed 2026-11-25 19:15 UTC] ` timestamp.
fn without_timestamp(text: &str) -> &str {
    let t = text.trim_start();
    let Some(close) = t.strip_prefix('[').and_then(|r| r.find(']')) else { return t };
    let stamp = &t[1..=close];
    let looks_like_time = close <= 48 && stamp.contains(':') && stamp.chars().filter(char::is_ascii_digit).count() >= 6;
    if looks_like_time {
        t[close + 2..].trim_start()
    } else {
        t
    }
}

/// What identifies a user's text across OpenClaw's rewrites of its history.
fn user_core(text: &str) -> String {
    let text = without_internal_context(text);
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("Runtime: ")).collect();
    normalise(without_timestamp(&kept.join("\n")))
}

/// A user message's content, piece by piece: its text(s) and its other parts.
enum Piece<'a> {
    Text(&'a str),
    Part(&'a Value),
}

fn pieces(content: Option<&Value>) -> Vec<Piece<'_>> {
    match content {
        Some(Value::String(s)) => vec![Piece::Text(s)],
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("text").and_then(Value::as_str) {
                Some(t) => Piece::Text(t),
                None => Piece::Part(p),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `None` for pieces that say nothing (an internal-context block, whitespace).
fn piece_print(piece: &Piece) -> Option<u64> {
    match piece {
        Piece::Text(t) => Some(user_core(t)).filter(|c| !c.is_empty()).map(|c| print("user", &c)),
        Piece::Part(p) => Some(print("part", &p.to_string())),
    }
}

fn tool_calls(m: &ChatMessage) -> Vec<(&str, &str, String)> {
    let calls = m.tool_calls.as_ref().and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            (c["id"].as_str().unwrap_or(""), f["name"].as_str().unwrap_or("?"), args)
        })
        .collect()
}

/// Fingerprints of an assistant message: its tool call ids, or its text when it calls nothing.
fn assistant_prints(m: &ChatMessage) -> Vec<u64> {
    let calls = tool_calls(m);
    if calls.is_empty() {
        return vec![answer_print(&m.text())];
    }
    calls.iter().map(|(id, _, _)| call_print(id)).collect()
}

/// One of this Claude session's answers.
fn is_own(m: &ChatMessage, answers: &[u64]) -> bool {
    m.role == "assistant" && assistant_prints(m).iter().any(|p| answers.contains(p))
}

/// Where the new input starts: after the last assistant message.
pub fn new_input_start(messages: &[ChatMessage]) -> usize {
    messages.iter().rposition(|m| m.role == "assistant").map_or(0, |i| i + 1)
}

/// The new input: the user messages after the last assistant message, joined by blank lines
/// (parts of one message by newlines), with the fingerprints of its pieces. An attachment that
/// cannot be taken refuses the request.
pub fn new_input(messages: &[ChatMessage], r: &mut Renderer) -> Result<(String, Vec<u64>), ApiError> {
    let mut texts = Vec::new();
    let mut prints = Vec::new();
    for m in messages[new_input_start(messages)..].iter().filter(|m| m.role == "user") {
        prints.extend(pieces(m.content.as_ref()).iter().filter_map(piece_print));
        let text = r.content(m.content.as_ref(), Mode::Strict)?;
        if !text.is_empty() {
            texts.push(text);
        }
    }
    Ok((texts.join("\n\n"), prints))
}

/// The conversation before the new input, as `[role]: text` lines (no system messages), for a
/// Claude session that starts with no transcript. Attachments are only mentioned.
pub fn earlier(messages: &[ChatMessage]) -> String {
    let mut r = Renderer::new(String::new());
    messages[..new_input_start(messages)]
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| {
            let mut text = r.content(m.content.as_ref(), Mode::Mention).unwrap_or_default();
            for (_, name, args) in tool_calls(m) {
                let sep = if text.is_empty() { "" } else { "\n" };
                text.push_str(&format!("{sep}(called tool {name} with {})", clip(&args, TOOL_TEXT_MAX)));
            }
            format!("[{}]: {}", m.role, text)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a Claude session missed of the conversation, ready to hand over.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// `[user]: …` / `[assistant (another model)]: …` / `[tool result]: …` entries, oldest
    /// first; empty when nothing was missed.
    pub text: String,
    /// Fingerprints of what the entries hand over (remembered as heard once delivered).
    pub prints: Vec<u64>,
    /// Attachments the entries name.
    pub files: Vec<Attachment>,
}

/// How the history of a request relates to what the Claude session saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Reading {
    /// Claude's place in the conversation is known (or cannot be known: it never answered, or
    /// the client sends no history); hand over what it missed.
    Continues(Missed),
    /// The session answered before, but none of its answers is in the history any more: the
    /// client edited, rewound or branched the conversation.
    Rewritten,
}

/// Read the history of a request against the session's `answers` and what it `heard` since.
/// `compacted`: the history starts with OpenClaw's compaction summary, which replaces old
/// answers legitimately.
pub fn reconcile(
    messages: &[ChatMessage],
    answers: &[u64],
    heard: &[u64],
    compacted: bool,
    r: &mut Renderer,
) -> Reading {
    let end = new_input_start(messages);
    if answers.is_empty() || end == 0 {
        return Reading::Continues(Missed::default());
    }
    let from = match messages[..end].iter().rposition(|m| is_own(m, answers)) {
        Some(anchor) => anchor + 1,
        // After a compaction: everything after the summary (whatever of it Claude saw is heard).
        None if compacted => messages.iter().position(|m| m.role != "system").map_or(end, |i| i + 1),
        None => return Reading::Rewritten,
    };
    let mut entries: Vec<Missed> = messages[from..end].iter().filter_map(|m| entry(m, heard, r)).collect();
    let mut size: usize = entries.iter().map(|e| e.text.len() + 1).sum();
    let mut left_out = 0;
    while size > MISSED_MAX && entries.len() > 1 {
        size -= entries.remove(0).text.len() + 1;
        left_out += 1;
    }
    let mut missed = Missed::default();
    let mut lines = Vec::new();
    if left_out > 0 {
        lines.push(format!("[{left_out} earlier messages left out]"));
    }
    for e in entries {
        lines.push(e.text);
        missed.prints.extend(e.prints);
        missed.files.extend(e.files);
    }
    missed.text = lines.join("\n");
    Reading::Continues(missed)
}

/// One missed message, less what Claude already heard; `None` when nothing of it is left.
fn entry(m: &ChatMessage, heard: &[u64], r: &mut Renderer) -> Option<Missed> {
    let fresh = |p: &u64| !heard.contains(p);
    let (label, texts, prints) = match m.role.as_str() {
        "user" => {
            let (mut texts, mut prints) = (Vec::new(), Vec::new());
            for piece in pieces(m.content.as_ref()) {
                let Some(p) = piece_print(&piece).filter(fresh) else { continue };
                let text = match piece {
                    Piece::Text(t) => without_internal_context(t).trim().to_string(),
                    Piece::Part(part) => r.part(part, Mode::Lenient).ok().flatten().unwrap_or_default(),
                };
                if !text.is_empty() {
                    texts.push(text);
                    prints.push(p);
                }
            }
            ("user", texts, prints)
        }
        "assistant" => {
            let prints = assistant_prints(m);
            if prints.iter().all(|p| !fresh(p)) {
                return None;
            }
            let mut texts = vec![m.text().trim().to_string()];
            for (_, name, args) in tool_calls(m) {
                texts.push(format!("(called tool {name} with {})", clip(&args, TOOL_TEXT_MAX)));
            }
            texts.retain(|t| !t.is_empty());
            ("assistant (another model)", texts, prints)
        }
        "tool" => {
            let text = m.text();
            let p = tool_print(m.tool_call_id.as_deref().unwrap_or(""), &text);
            if !fresh(&p) {
                return None;
            }
            ("tool result", vec![clip(text.trim(), TOOL_TEXT_MAX)], vec![p])
        }
        _ => return None,
    };
    if texts.is_empty() {
        r.files.clear();
        return None;
    }
    Some(Missed { text: format!("[{label}]: {}", texts.join("\n")), prints, files: std::mem::take(&mut r.files) })
}

fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let end = (0..=max).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    format!("{}… [{} more characters]", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STABLE_EMPTY: u64 = 4463363853583017634;
    const STABLE_A: u64 = 6057806392741087813;

    fn msgs(v: Value) -> Vec<ChatMessage> {
        serde_json::from_value(v).unwrap()
    }

    fn read(messages: &[ChatMessage], answers: &[u64], heard: &[u64]) -> Reading {
        reconcile(messages, answers, heard, false, &mut Renderer::new("/d".into()))
    }

    fn missed_text(r: Reading) -> String {
        match r {
            Reading::Continues(m) => m.text,
            Reading::Rewritten => panic!("rewritten"),
        }
    }

    #[test]
    fn user_text_is_recognised_through_openclaws_rewrites() {
        let sent = "[Wed 2026-11-25 19:15 UTC] my name is Zed";
        assert_eq!(user_core(sent), "my name is Zed");
        assert_eq!(user_core("my   name is\nZed"), "my name is Zed");
        let first = "[Wed 2026-11-25 19:15 UTC] hi\n\nRuntime: agent=main | model=a";
        assert_eq!(user_core(first), user_core("hi\n\nRuntime: agent=main | model=b"));
        let ctx = format!("{CONTEXT_BEGIN}\nConversation data\n{CONTEXT_END}");
        assert_eq!(user_core(&ctx), "");
        assert_eq!(user_core("[not a time] hello"), "[not a time] hello");
    }

    #[test]
    fn the_missed_turns_after_the_last_own_answer_are_handed_over_in_order() {
        let m = msgs(json!([
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi  there\n"},
            {"role": "user", "content": "my name is Zed"},
            {"role": "assistant", "content": "Nice to meet you, Zed."},
            {"role": "user", "content": [{"type": "text", "text": "/model x"}, {"type": "text", "text": "more"}]},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "what is my name?"},
        ]));
        let text = missed_text(read(&m, &[answer_print("hi there")], &[]));
        assert_eq!(
            text,
            "[user]: my name is Zed\n[assistant (another model)]: Nice to meet you, Zed.\n[user]: /model x\nmore\n[assistant (another model)]: Sure."
        );
        // The newest own answer is the anchor: nothing missed.
        let answers = [answer_print("hi there"), answer_print("Sure.")];
        assert_eq!(missed_text(read(&m, &answers, &[])), "");
    }

    #[test]
    fn what_claude_heard_is_not_handed_over_again_even_merged_and_without_its_timestamp() {
        let m = msgs(json!([
            {"role": "assistant", "content": "mine"},
            {"role": "user", "content": [{"type": "text", "text": "u2 seen"}, {"type": "text", "text": "u3 not seen"}]},
            {"role": "assistant", "content": "fallback answer"},
            {"role": "user", "content": "new"},
        ]));
        let heard = [print("user", "u2 seen")];
        let text = missed_text(read(&m, &[answer_print("mine")], &heard));
        assert_eq!(text, "[user]: u3 not seen\n[assistant (another model)]: fallback answer");
        let heard = [print("user", "u2 seen"), print("user", "u3 not seen"), answer_print("fallback answer")];
        assert_eq!(missed_text(read(&m, &[answer_print("mine")], &heard)), "");
    }

    #[test]
    fn own_tool_calls_anchor_and_other_models_tool_calls_are_shown() {
        let m = msgs(json!([
            {"role": "user", "content": "list"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "callt9", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "callt9", "content": "a.txt"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "x1", "type": "function", "function": {"name": "cat", "arguments": "{\"p\":1}"}}]},
            {"role": "tool", "tool_call_id": "x1", "content": "contents"},
            {"role": "assistant", "content": "done by the other"},
            {"role": "user", "content": "next"},
        ]));
        let text = missed_text(read(&m, &[call_print("call_t9")], &[]));
        assert_eq!(
            text,
            "[tool result]: a.txt\n[assistant (another model)]: (called tool cat with {\"p\":1})\n[tool result]: contents\n[assistant (another model)]: done by the other"
        );
    }

    #[test]
    fn no_own_answer_left_is_a_rewrite_unless_compacted_or_never_answered() {
        let m = msgs(json!([
            {"role": "user", "content": "The conversation history before this point was compacted into the following summary: x"},
            {"role": "assistant", "content": "other"},
            {"role": "user", "content": "new"},
        ]));
        assert_eq!(read(&m, &[answer_print("mine")], &[]), Reading::Rewritten);
        assert_eq!(missed_text(read(&m, &[], &[])), "", "never answered: nothing to compare with");
        let compacted = reconcile(&m, &[answer_print("mine")], &[], true, &mut Renderer::new("/d".into()));
        assert_eq!(missed_text(compacted), "[assistant (another model)]: other", "the summary itself is not repeated");
        let only_new = msgs(json!([{"role": "user", "content": "just this"}]));
        assert_eq!(missed_text(read(&only_new, &[answer_print("mine")], &[])), "", "a client that sends no history");
    }

    #[test]
    fn a_long_gap_keeps_the_newest_messages() {
        let mut v = vec![json!({"role": "assistant", "content": "mine"})];
        for i in 0..100 {
            v.push(json!({"role": "user", "content": format!("question {i} {}", "x".repeat(1000))}));
            v.push(json!({"role": "assistant", "content": format!("answer {i}")}));
        }
        v.push(json!({"role": "user", "content": "new"}));
        let text = missed_text(read(&msgs(Value::Array(v)), &[answer_print("mine")], &[]));
        assert!(text.len() <= MISSED_MAX + 100, "{}", text.len());
        assert!(text.starts_with("[") && text.contains("earlier messages left out]"));
        assert!(text.ends_with("[assistant (another model)]: answer 99"));
    }

    #[test]
    fn new_input_keeps_the_context_block_and_names_attachments() {
        let m = msgs(json!([
            {"role": "assistant", "content": "mine"},
            {"role": "user", "content": "[Wed 2026-11-25 19:15 UTC] look"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        ]));
        let mut r = Renderer::new("/d".into());
        let (text, prints) = new_input(&m, &mut r).unwrap();
        assert!(text.starts_with("[Wed 2026-11-25 19:15 UTC] look\n\n[image attached: /d/"), "{text}");
        assert_eq!(prints.len(), 2);
        assert_eq!(r.files.len(), 1);
    }

    #[test]
    fn fingerprints_are_stable_and_tell_close_texts_apart() {
        // Persisted values: these must never change.
        assert_eq!(stable_hash(b""), STABLE_EMPTY);
        assert_eq!(stable_hash(b"a"), STABLE_A);
        let texts: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\0".to_vec(),
            b"\0\0".to_vec(),
            b"12345678".to_vec(),
            b"123456789".to_vec(),
            b"12345679".to_vec(),
        ];
        for (i, a) in texts.iter().enumerate() {
            for b in &texts[i + 1..] {
                assert_ne!(stable_hash(a), stable_hash(b), "{a:?} {b:?}");
            }
        }
    }
}
