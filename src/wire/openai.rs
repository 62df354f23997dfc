//! OpenAI chat-completions request and response shapes (what OpenClaw speaks).

use serde::Deserialize;
use serde_json::{json, Value};

use super::transcript::Usage;

/// The parts of a chat-completions request that synthesis acts on; everything else
/// (tools, tool_choice, max_completion_tokens, ...) is accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// OpenAI function tools, offered to Claude as MCP tools.
    #[serde(default)]
    pub tools: Vec<Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    /// On `role: "tool"` messages: the call this is the result of.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// On `role: "assistant"` messages: the tools it called (OpenAI `tool_calls` array).
    #[serde(default)]
    pub tool_calls: Option<Value>,
}

impl ChatMessage {
    /// The text of the message: a plain string, or the `text` parts of a content array.
    pub fn text(&self) -> String {
        match &self.content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
            }
            _ => String::new(),
        }
    }
}

impl ChatRequest {
    /// The new input of this request: the user messages after the last assistant message,
    /// joined by blank lines. Earlier history is already in Claude's own session.
    pub fn new_user_text(&self) -> String {
        let start = self.messages.iter().rposition(|m| m.role == "assistant").map_or(0, |i| i + 1);
        self.messages[start..]
            .iter()
            .filter(|m| m.role == "user")
            .map(ChatMessage::text)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// Identity of one completion, repeated in every chunk of a stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// OpenAI's usage object for Claude's API calls (from its transcript): `prompt_tokens` counts
/// everything the model read (input + cache read + cache creation), `cached_tokens` the cache reads.
fn usage(u: &Usage) -> Value {
    let (prompt, completion) = (u.prompt_tokens(), u.output_tokens);
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": u.cache_read_input_tokens}})
}

/// The whole non-streamed answer.
pub fn completion_json(c: &Completion, text: &str, u: &Usage) -> String {
    json!({
        "id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": usage(u),
    })
    .to_string()
}

fn chunk(c: &Completion, delta: Value, finish: Option<&str>) -> String {
    let body = json!({
        "id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    sse_data(&body.to_string())
}

/// One SSE event carrying `data`.
pub fn sse_data(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// First event of every stream, sent as soon as the request is accepted.
pub fn role_chunk(c: &Completion) -> String {
    chunk(c, json!({"role": "assistant", "content": ""}), None)
}

pub fn content_chunk(c: &Completion, text: &str) -> String {
    chunk(c, json!({"content": text}), None)
}

/// A chunk with an empty delta: the SDKs yield it (so client watchdogs see life), it adds no text.
pub fn keepalive_chunk(c: &Completion) -> String {
    chunk(c, json!({}), None)
}

/// A client-tool call, as OpenAI calls it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl ToolCall {
    fn json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

pub fn tool_call_chunk(c: &Completion, call: &ToolCall) -> String {
    let mut call = call.json();
    call["index"] = json!(0);
    chunk(c, json!({"tool_calls": [call]}), None)
}

/// The whole non-streamed answer that asks the client to run a tool.
pub fn tool_call_json(c: &Completion, text: &str, call: &ToolCall, u: &Usage) -> String {
    let content = if text.is_empty() { Value::Null } else { json!(text) };
    json!({
        "id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": [call.json()]},
                     "finish_reason": "tool_calls"}],
        "usage": usage(u),
    })
    .to_string()
}

/// The closing events: finish reason, usage when asked for (`stream_options.include_usage`), and `[DONE]`.
pub fn stream_end(c: &Completion, finish: &str, usage_chunk: Option<&Usage>) -> String {
    let mut out = chunk(c, json!({}), Some(finish));
    if let Some(u) = usage_chunk {
        let body = json!({
            "id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": [], "usage": usage(u),
        });
        out.push_str(&sse_data(&body.to_string()));
    }
    out.push_str(&sse_data("[DONE]"));
    out
}

/// An error after the stream has started: the OpenAI SDKs raise on a chunk with `error`.
pub fn stream_error(err: &ApiError) -> String {
    let mut out = sse_data(&err.body());
    out.push_str(&sse_data("[DONE]"));
    out
}

/// An error in the OpenAI shape, with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiError {
    pub status: u16,
    pub kind: String,
    pub code: String,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        let kind = match status {
            401 => "authentication_error",
            400 | 404 | 413 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        ApiError { status, kind: kind.into(), code: code.into(), message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn body(&self) -> String {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}}).to_string()
    }
}
