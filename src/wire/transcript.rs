//! Claude Code's session transcript (`~/.claude/projects/<cwd>/<uuid>.jsonl`), as far as usage
//! goes: one JSON object per line; each API response is an `assistant` entry whose `message` has
//! an `id` and a `usage` (`input_tokens`, `output_tokens`, `cache_read_input_tokens`,
//! `cache_creation_input_tokens`). One response can be written as several lines (one per content
//! block) with the same `message.id` and the usage repeated, so entries are counted once per id.
//! A channel message starts a turn with a `user` entry whose content begins with
//! `<channel source="synthesis" chat_id="...">`: the API calls after it belong to that turn, and
//! the turn's last call is one that asks for no tool (the model has answered).
//!
//! Claude Code writes these lines in batches: the last call of a turn can land ~100–200 ms after
//! the Stop hook (measured on 2.1.332), which is why `Read::answered` exists.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Token counts of API calls, in Anthropic's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// API calls counted.
    pub calls: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.calls += other.calls;
    }

    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    /// OpenAI's `prompt_tokens`: everything the model read, cached or not.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens
    }

    /// What `later` adds to `self` (fields that grew), for a response whose usage was counted
    /// from an earlier, partial line.
    fn growth(&self, later: &Usage) -> Usage {
        Usage {
            input_tokens: later.input_tokens.saturating_sub(self.input_tokens),
            output_tokens: later.output_tokens.saturating_sub(self.output_tokens),
            cache_read_input_tokens: later.cache_read_input_tokens.saturating_sub(self.cache_read_input_tokens),
            cache_creation_input_tokens: later
                .cache_creation_input_tokens
                .saturating_sub(self.cache_creation_input_tokens),
            calls: 0,
        }
    }

    fn max(&self, other: &Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.max(other.input_tokens),
            output_tokens: self.output_tokens.max(other.output_tokens),
            cache_read_input_tokens: self.cache_read_input_tokens.max(other.cache_read_input_tokens),
            cache_creation_input_tokens: self.cache_creation_input_tokens.max(other.cache_creation_input_tokens),
            calls: self.calls,
        }
    }
}

/// Message ids remembered for de-duplication (a response's lines are written together).
const SEEN_MAX: usize = 64;

/// What one read of a transcript found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    /// Usage per turn (`chat_id`; `None` for calls before any channel message), in order.
    pub usage: Vec<(Option<String>, Usage)>,
    /// The newest turn, when its final API call (one asking for no tool) has been read: its
    /// usage is complete.
    pub answered: Option<String>,
}

impl Read {
    pub fn add(&mut self, chat_id: Option<String>, usage: Usage) {
        match self.usage.iter_mut().find(|(c, _)| *c == chat_id) {
            Some((_, u)) => u.add(&usage),
            None => self.usage.push((chat_id, usage)),
        }
    }
}

/// What the lines read so far have established: the turn they are in, and the responses counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parser {
    /// `chat_id` of the latest channel message.
    pub chat_id: Option<String>,
    /// The latest API call of that turn asked for no tool: the model has answered.
    pub answered: bool,
    /// Recently counted responses: (message id, usage counted for it).
    seen: VecDeque<(String, Usage)>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct ApiUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
}

impl Parser {
    /// Take one line; returns the usage it adds, with the turn (`chat_id`) it belongs to.
    pub fn line(&mut self, line: &[u8]) -> Option<(Option<String>, Usage)> {
        // Cheap filter first: most lines (attachments, request blobs, hook summaries) matter not.
        let is = |kind: &[u8]| line.windows(kind.len()).any(|w| w == kind);
        if !is(br#""type":"assistant""#) && !is(br#""type":"user""#) {
            return None;
        }
        let entry: Entry = serde_json::from_slice(line).ok()?;
        let message = entry.message?;
        match entry.kind.as_str() {
            "user" => {
                if let Some(chat_id) = message.content.as_ref().and_then(channel_chat_id) {
                    self.chat_id = Some(chat_id);
                    self.answered = false;
                }
                None
            }
            "assistant" => {
                let u = message.usage?;
                if u.input_tokens + u.output_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens == 0 {
                    return None; // not an API call (claude's own error messages carry zero usage)
                }
                let asks_tool = message.stop_reason.as_deref() == Some("tool_use")
                    || message.content.as_ref().and_then(Value::as_array).is_some_and(|blocks| {
                        blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                    });
                self.answered = !asks_tool;
                let usage = Usage {
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cache_read_input_tokens: u.cache_read_input_tokens,
                    cache_creation_input_tokens: u.cache_creation_input_tokens,
                    calls: 1,
                };
                let added = match message.id {
                    Some(id) => self.count_once(id, usage),
                    None => usage,
                };
                (!added.is_zero()).then(|| (self.chat_id.clone(), added))
            }
            _ => None,
        }
    }

    /// The turn whose answer (final API call) has been read, if the newest one's has.
    pub fn answered(&self) -> Option<String> {
        self.chat_id.clone().filter(|_| self.answered)
    }

    fn count_once(&mut self, id: String, usage: Usage) -> Usage {
        if let Some((_, counted)) = self.seen.iter_mut().find(|(seen, _)| *seen == id) {
            let added = counted.growth(&usage);
            *counted = counted.max(&usage);
            return added;
        }
        self.seen.push_back((id, usage));
        if self.seen.len() > SEEN_MAX {
            self.seen.pop_front();
        }
        usage
    }
}

/// The `chat_id` of a channel message (`<channel source="synthesis" chat_id="...">` at the start
/// of a user entry's text).
fn channel_chat_id(content: &Value) -> Option<String> {
    let text = match content {
        Value::String(s) => s.as_str(),
        Value::Array(blocks) => blocks.iter().find_map(|b| b.get("text").and_then(Value::as_str))?,
        _ => return None,
    };
    let tag = text.trim_start().strip_prefix("<channel ")?;
    let tag = &tag[..tag.find('>')?];
    let rest = &tag[tag.find("chat_id=\"")? + "chat_id=\"".len()..];
    Some(rest[..rest.find('"')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assistant(id: &str, input: u64, output: u64, read: u64, create: u64) -> String {
        format!(
            r#"{{"type":"assistant","message":{{"id":"{id}","content":[{{"type":"text","text":"x"}}],"usage":{{"input_tokens":{input},"cache_creation_input_tokens":{create},"cache_read_input_tokens":{read},"output_tokens":{output},"service_tier":"standard"}}}}}}"#
        )
    }

    fn channel(chat_id: &str) -> String {
        let content = format!("<channel source=\"synthesis\" chat_id=\"{chat_id}\">\nhello\n</channel>");
        serde_json::json!({"type": "user", "message": {"role": "user", "content": content}}).to_string()
    }

    #[test]
    fn usage_is_counted_once_per_response_and_belongs_to_the_latest_channel_message() {
        let mut p = Parser::default();
        assert_eq!(p.line(assistant("m0", 1, 1, 0, 0).as_bytes()), Some((None, Usage { calls: 1, ..one(1, 1) })));
        assert_eq!(p.line(channel("chat-1").as_bytes()), None);
        let first = p.line(assistant("m1", 10, 5, 100, 7).as_bytes()).unwrap();
        assert_eq!(first.0.as_deref(), Some("chat-1"));
        assert_eq!(first.1.prompt_tokens(), 117);
        assert_eq!(p.answered().as_deref(), Some("chat-1"), "a text-only answer is final");
        // The same response's next content block repeats its usage: nothing more.
        assert_eq!(p.line(assistant("m1", 10, 5, 100, 7).as_bytes()), None);
        // A later line of it with more output adds the difference.
        assert_eq!(p.line(assistant("m1", 10, 9, 100, 7).as_bytes()).unwrap().1.output_tokens, 4);
        let tool_result =
            r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"sent"}]}}"#;
        assert_eq!(p.line(tool_result.as_bytes()), None);
        let tool_use = r#"{"type":"assistant","message":{"id":"m1b","stop_reason":"tool_use","content":[{"type":"tool_use","name":"mcp__synthesis__reply"}],"usage":{"input_tokens":1}}}"#;
        assert_eq!(p.line(tool_use.as_bytes()).unwrap().1.calls, 1);
        assert_eq!(p.answered(), None, "a call that asks for a tool is followed by another");
        let zero = r#"{"type":"assistant","message":{"id":"err","model":"<synthetic>","usage":{"input_tokens":0,"output_tokens":0}}}"#;
        assert_eq!(p.line(zero.as_bytes()), None, "claude's own error message is no API call");
        assert_eq!(p.line(assistant("m2", 3, 2, 0, 0).as_bytes()).unwrap().0.as_deref(), Some("chat-1"));
        assert_eq!(p.answered().as_deref(), Some("chat-1"));
        assert_eq!(p.line(b"{\"type\":\"system\",\"subtype\":\"turn_duration\"}"), None);
        assert_eq!(p.line(b"not json \"type\":\"assistant\""), None);
        p.line(channel("chat-2").as_bytes());
        assert_eq!(p.chat_id.as_deref(), Some("chat-2"));
        assert_eq!(p.answered(), None, "a new turn has no answer yet");
    }

    fn one(input: u64, output: u64) -> Usage {
        Usage { input_tokens: input, output_tokens: output, ..Usage::default() }
    }

    #[test]
    fn quoted_channel_tags_inside_a_message_start_no_turn() {
        let mut p = Parser::default();
        let quoted = serde_json::json!({"type": "user", "message": {"content": "see <channel chat_id=\"x\">"}});
        p.line(quoted.to_string().as_bytes());
        assert_eq!(p.chat_id, None);
    }
}
