//! Client tools ("contractor" pattern): OpenClaw's `tools` become MCP tools of the channel.
//! Claude's call ends the current response with `tool_calls`; the `role: "tool"` message of the
//! client's next request answers the MCP call, and that request waits for the rest of the turn.

use std::time::Instant;

use serde_json::Value;

use super::history;
use super::openclaw::fingerprint;
use super::turn::{Answer, Listener, PendingCall, Turn};
use super::{Engine, Output, ProcId};
use crate::wire::bridge::{ToChannel, ToolDef};
use crate::wire::openai::{ChatRequest, ToolCall};

impl Engine {
    /// The request's tools that may be offered to Claude (`tools_allow` / `tools_deny`).
    pub(super) fn offered_tools(&self, req: &ChatRequest) -> Vec<ToolDef> {
        let listed = |list: &[String], name: &str| list.iter().any(|p| p == "*" || p == name);
        req.tools
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                let name = f.get("name")?.as_str()?.to_string();
                let description = f.get("description").and_then(Value::as_str).unwrap_or("").to_string();
                let input_schema = f.get("parameters").cloned().unwrap_or(serde_json::json!({"type": "object"}));
                Some(ToolDef { name, description, input_schema })
            })
            .filter(|t| t.name != "reply" && listed(&self.settings.tools_allow, &t.name))
            .filter(|t| !listed(&self.settings.tools_deny, &t.name))
            .collect()
    }

    /// Send the session's catalog to its process when the process has not seen it yet; true if sent.
    pub(super) fn send_tools(&mut self, key: &str, pid: ProcId) -> bool {
        let tools = self.st.sessions[key].tools.clone();
        let hash = fingerprint(&serde_json::to_string(&tools).expect("tools serialise"));
        let Some(p) = self.st.procs.get_mut(&pid) else { return false };
        let Some(conn) = p.bridge.filter(|_| p.tools_sent != Some(hash)) else { return false };
        p.tools_sent = Some(hash);
        self.push(Output::Bridge { conn, frame: ToChannel::Tools { tools } });
        true
    }

    /// Claude called a client tool during the turn in flight.
    pub(super) fn on_tool_call(&mut self, now: Instant, key: &str, call_ref: String, name: String, arguments: Value) {
        let id = format!("call_{}", self.ids.token());
        log::info!("session {key}: Claude calls client tool {name} as {id}");
        let call = PendingCall { call: ToolCall { id, name, arguments: arguments.to_string() }, call_ref };
        let queued = self.with_current(key, |engine, turn| {
            turn.calls.push_back(call);
            engine.ask_next(now, turn);
        });
        if queued.is_none() {
            log::warn!("session {key}: tool call outside a turn, ignored");
        }
    }

    /// Hand the next question (permission or tool call) to the clients waiting for the turn,
    /// if none is open: it ends their response, and the answer comes with the next request.
    pub(super) fn ask_next(&mut self, now: Instant, turn: &mut Turn) {
        if turn.awaits_client() || turn.listeners.is_empty() {
            return;
        }
        if let Some((id, text)) = turn.permissions.pop_front() {
            self.say(now, turn, text);
            let all = turn.replies.join("\n\n");
            self.answer(turn, &Answer::Text(all));
            turn.replies.clear();
            turn.asked_permission = Some(id);
            return;
        }
        let Some(next) = turn.calls.pop_front() else { return };
        self.answer_tool_call(turn, &next.call);
        turn.asked = Some(next);
    }

    /// If the session's turn waits for a tool result and `req` carries it, pass it to Claude and
    /// let `l` wait for the rest of the turn (`None`). Otherwise give `l` back; a turn still
    /// waiting is told that the client will not run its tools.
    pub(super) fn continue_with_tool_result(
        &mut self,
        now: Instant,
        key: &str,
        req: &ChatRequest,
        l: Listener,
    ) -> Option<Listener> {
        let turn = self.st.sessions.get_mut(key)?.current.as_mut().filter(|t| t.asked.is_some());
        let Some(turn) = turn else { return Some(l) };
        let asked = turn.asked.take().expect("asked");
        let result = req
            .messages
            .iter()
            .filter(|m| m.role == "tool")
            .find(|m| m.tool_call_id.as_deref().is_some_and(|id| same_call_id(id, &asked.call.id)));
        let Some(result) = result else {
            // The client moved on without running the tools: Claude gets an error and goes on.
            let abandoned: Vec<PendingCall> = std::iter::once(asked).chain(turn.calls.drain(..)).collect();
            log::warn!("session {key}: the client did not return results for {} tool call(s)", abandoned.len());
            for call in abandoned {
                let content = "The user did not run this tool.".to_string();
                self.send_to_channel(key, ToChannel::ToolResult { call_ref: call.call_ref, content, is_error: true });
            }
            return Some(l);
        };
        let content = result.text();
        self.heard(key, history::tool_print(result.tool_call_id.as_deref().unwrap_or(""), &content));
        self.send_to_channel(key, ToChannel::ToolResult { call_ref: asked.call_ref, content, is_error: false });
        self.with_current(key, |engine, turn| engine.listen(now, key, turn, l));
        None
    }
}

/// OpenClaw rewrites tool call ids (`call_synth_1` comes back as `callsynth1`): compare only
/// letters and digits, case-insensitively.
pub fn same_call_id(a: &str, b: &str) -> bool {
    let norm =
        |s: &str| s.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect::<String>();
    norm(a) == norm(b)
}
