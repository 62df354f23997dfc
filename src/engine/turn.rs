//! A turn and the clients waiting for it. Several clients can wait for one turn (OpenClaw
//! retries an identical body), and one turn can answer several requests in a row (each
//! client-tool call ends one response; the tool result arrives in the next request).

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::attachments::Attachment;
use super::history::{answer_print, call_print, Missed};
use super::{ConnId, Engine, Output, Usage};
use crate::wire::http::Response;
use crate::wire::openai::{self, ApiError, Completion, ToolCall};

/// A client waiting for a turn's answer.
#[derive(Serialize, Deserialize)]
pub struct Listener {
    pub conn: ConnId,
    pub stream: bool,
    pub include_usage: bool,
    pub completion: Completion,
}

/// A call of a client tool, by Claude, that the client has to run.
#[derive(Serialize, Deserialize)]
pub struct PendingCall {
    pub call: ToolCall,
    /// The channel's MCP call to answer with the result.
    pub call_ref: String,
}

/// What a request brings for Claude; composed into one channel message at delivery, when it is
/// known whether the Claude session is fresh (see `Engine::deliver_next`).
#[derive(Default, Serialize, Deserialize)]
pub struct Parts {
    /// The client's system prompt.
    pub system: String,
    /// The conversation before the new input.
    pub history: String,
    /// The new user messages.
    pub text: String,
    /// Fingerprints of the new user messages' pieces (remembered as heard once delivered).
    pub prints: Vec<u64>,
    /// Attachments the new user messages name.
    pub files: Vec<Attachment>,
    /// What the Claude session missed of the conversation (handed over unless it is fresh).
    pub missed: Missed,
}

#[derive(Serialize, Deserialize)]
pub struct Turn {
    pub listeners: Vec<Listener>,
    /// Hash of the request body: an identical retry attaches to this turn.
    pub fingerprint: u64,
    pub parts: Parts,
    /// The text delivered to Claude as one channel message (set at delivery).
    pub content: String,
    pub chat_id: String,
    /// Reply texts of the response in progress.
    pub replies: Vec<String>,
    /// Set at delivery: when the turn is interrupted and answered 504.
    #[serde(with = "super::clock::opt")]
    pub deadline: Option<Instant>,
    /// The last client left: interrupt at this time unless a retry attaches.
    #[serde(with = "super::clock::opt")]
    pub orphan_deadline: Option<Instant>,
    /// Next keep-alive event for streaming listeners.
    #[serde(with = "super::clock::opt")]
    pub keepalive_at: Option<Instant>,
    /// Tool call sent to the client, whose result the next request must carry.
    pub asked: Option<PendingCall>,
    /// Further tool calls Claude made meanwhile, to hand out one per response.
    pub calls: VecDeque<PendingCall>,
    /// Permission question shown to the client, whose verdict the next request must carry.
    pub asked_permission: Option<String>,
    /// Permission questions not shown yet: (request id, text for the user).
    pub permissions: VecDeque<(String, String)>,
    /// When it was delivered to Claude, for `synthesis_turn_duration_seconds`.
    #[serde(default, with = "super::clock::opt")]
    pub delivered: Option<Instant>,
    /// Claude's API calls for this turn not yet reported in a response's `usage`.
    #[serde(default)]
    pub usage: Usage,
    /// The transcript shows the turn's answer: its usage is complete.
    #[serde(default)]
    pub usage_complete: bool,
    /// Claude has ended the turn; the response waits for the transcript until this time.
    #[serde(default, with = "super::clock::opt")]
    pub usage_until: Option<Instant>,
    /// Meanwhile, when to read the transcript again.
    #[serde(default, with = "super::clock::opt")]
    pub reread_at: Option<Instant>,
}

impl Turn {
    pub fn new(fingerprint: u64, parts: Parts) -> Self {
        Turn {
            listeners: Vec::new(),
            fingerprint,
            parts,
            content: String::new(),
            chat_id: String::new(),
            replies: Vec::new(),
            deadline: None,
            orphan_deadline: None,
            keepalive_at: None,
            asked: None,
            calls: VecDeque::new(),
            asked_permission: None,
            permissions: VecDeque::new(),
            delivered: None,
            usage: Usage::default(),
            usage_complete: false,
            usage_until: None,
            reread_at: None,
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        [self.deadline, self.orphan_deadline, self.keepalive_at, self.usage_until, self.reread_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// A question (tool call or permission) is out with the client; its answer comes in a request.
    pub fn awaits_client(&self) -> bool {
        self.asked.is_some() || self.asked_permission.is_some()
    }
}

/// How a response ends.
pub enum Answer {
    Text(String),
    Error(ApiError),
}

impl Engine {
    /// Start a listener's response: SSE head and role chunk at once (OpenClaw's first-event
    /// watchdog is running), plus what the turn has already said.
    pub(super) fn open_listener(&mut self, l: &Listener, said: &[String]) {
        if !l.stream {
            return;
        }
        self.push(Output::StreamStart { conn: l.conn });
        self.push(Output::StreamData { conn: l.conn, data: openai::role_chunk(&l.completion) });
        if !said.is_empty() {
            self.push(Output::StreamData {
                conn: l.conn,
                data: openai::content_chunk(&l.completion, &said.join("\n\n")),
            });
        }
    }

    /// Send `text` as a content delta to every streaming listener.
    pub(super) fn stream_text(&mut self, now: Instant, turn: &mut Turn, text: &str) {
        for l in turn.listeners.iter().filter(|l| l.stream) {
            let data = openai::content_chunk(&l.completion, text);
            self.outputs.push_back(Output::StreamData { conn: l.conn, data });
        }
        turn.keepalive_at = self.next_keepalive(now, turn);
    }

    /// Add `text` to what the turn says: streamed at once, kept for whole answers and late listeners.
    pub(super) fn say(&mut self, now: Instant, turn: &mut Turn, text: String) {
        let sep = if turn.replies.is_empty() { "" } else { "\n\n" };
        self.stream_text(now, turn, &format!("{sep}{text}"));
        turn.replies.push(text);
    }

    /// A chunk that adds no text, so that no client watchdog fires during a long turn.
    pub(super) fn keep_alive(&mut self, now: Instant, turn: &mut Turn) {
        for l in turn.listeners.iter().filter(|l| l.stream) {
            self.outputs.push_back(Output::StreamData { conn: l.conn, data: openai::keepalive_chunk(&l.completion) });
        }
        turn.keepalive_at = self.next_keepalive(now, turn);
    }

    pub(super) fn next_keepalive(&self, now: Instant, turn: &Turn) -> Option<Instant> {
        turn.listeners.iter().any(|l| l.stream).then_some(now + self.settings.keepalive)
    }

    /// End every listener's response with `answer`.
    pub(super) fn answer(&mut self, turn: &mut Turn, answer: &Answer) {
        let usage = std::mem::take(&mut turn.usage);
        for l in std::mem::take(&mut turn.listeners) {
            if let (Some(key), Answer::Text(text)) = (self.st.waiting.remove(&l.conn), answer) {
                self.remember_answer(&key, answer_print(text));
            }
            let (conn, c) = (l.conn, &l.completion);
            match answer {
                Answer::Text(_) if l.stream => {
                    // The text went out as deltas already.
                    let data = openai::stream_end(c, "stop", l.include_usage.then_some(&usage));
                    self.push(Output::StreamData { conn, data });
                    self.push(Output::StreamEnd { conn });
                }
                Answer::Text(text) => {
                    let response = Response::json(200, openai::completion_json(c, text, &usage));
                    self.push(Output::Respond { conn, response });
                }
                Answer::Error(e) => {
                    log::warn!("{}: {} {}", c.id, e.status, e.message);
                    if l.stream {
                        self.push(Output::StreamData { conn, data: openai::stream_error(e) });
                        self.push(Output::StreamEnd { conn });
                    } else {
                        self.push(Output::Respond { conn, response: error_response(e) });
                    }
                }
            }
        }
        turn.keepalive_at = None;
    }

    /// End every listener's response with a client-tool call (`finish_reason: "tool_calls"`).
    pub(super) fn answer_tool_call(&mut self, turn: &mut Turn, call: &ToolCall) {
        let text = turn.replies.join("\n\n");
        let usage = std::mem::take(&mut turn.usage);
        for l in std::mem::take(&mut turn.listeners) {
            if let Some(key) = self.st.waiting.remove(&l.conn) {
                self.remember_answer(&key, call_print(&call.id));
            }
            let (conn, c) = (l.conn, &l.completion);
            if l.stream {
                let mut data = openai::tool_call_chunk(c, call);
                data.push_str(&openai::stream_end(c, "tool_calls", l.include_usage.then_some(&usage)));
                self.push(Output::StreamData { conn, data });
                self.push(Output::StreamEnd { conn });
            } else {
                let response = Response::json(200, openai::tool_call_json(c, &text, call, &usage));
                self.push(Output::Respond { conn, response });
            }
        }
        turn.replies.clear();
        turn.keepalive_at = None;
    }
}

pub fn error_response(e: &ApiError) -> Response {
    let mut r = Response::json(e.status, e.body());
    if let Some(secs) = e.retry_after {
        r.headers.push(("retry-after".into(), secs.to_string()));
    }
    r
}
