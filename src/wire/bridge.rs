//! The bridge protocol between `synthesis channel` (inside claude) and the daemon:
//! JSON text frames over one WebSocket per claude process, each with a `type`.
//!
//! channel → daemon: `hello` (at start, binds the socket), `ready` (claude has registered the
//! channel), `reply`, `tool_call`, `tools_listed`, `permission_request`, `heartbeat`. daemon → channel: `tools`
//! (the catalog, sent right after `hello` and whenever it changes), `deliver`, `replied`, `tool_result`,
//! `permission`.
//!
//! Order is causal, not timed: the channel answers claude's `reply` call only when the daemon has
//! taken the frame (`replied`), so claude cannot reach its Stop hook before the daemon has the
//! reply. Client tool calls are answered by `tool_result`, which the daemon sends after taking them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped on any incompatible change; the daemon refuses a `hello` of another version.
pub const VERSION: u32 = 3;
pub const PATH: &str = "/bridge";

/// Environment variables the daemon gives the channel through `--mcp-config`.
pub const ENV_URL: &str = "SYNTHESIS_BRIDGE_URL";
pub const ENV_TOKEN: &str = "SYNTHESIS_BRIDGE_TOKEN";

/// Seconds between channel heartbeats.
pub const HEARTBEAT_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromChannel {
    /// First frame: binds this socket to the process owning `token`.
    Hello {
        v: u32,
        token: String,
    },
    /// MCP is initialised and claude has shown it registered the channel's notification handler
    /// (see `channel::Registration`): a message delivered now is not dropped.
    Ready,
    /// Claude called the `reply` tool; the daemon acknowledges `seq` with `replied`.
    Reply {
        seq: u64,
        chat_id: String,
        text: String,
    },
    /// Claude called one of the client's tools; `call_ref` names the MCP call to answer.
    ToolCall {
        call_ref: String,
        name: String,
        arguments: Value,
    },
    /// The channel answered claude's `tools/list` (after a catalog change, claude is up to date).
    ToolsListed,
    /// Claude asks whether it may use a tool (the channel's permission capability).
    PermissionRequest {
        request_id: String,
        tool_name: String,
        description: String,
        input_preview: String,
    },
    Heartbeat,
}

/// A client (OpenClaw) tool offered to Claude as an MCP tool of the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToChannel {
    /// Push one user message into Claude as a channel notification.
    Deliver { chat_id: String, content: String },
    /// The daemon has taken reply `seq`: the channel may now tell claude it was sent.
    Replied { seq: u64 },
    /// The client tools Claude may call (besides `reply`).
    Tools { tools: Vec<ToolDef> },
    /// The client's result for a `tool_call`.
    ToolResult { call_ref: String, content: String, is_error: bool },
    /// The verdict on a permission request: `allow` or `deny`.
    Permission { request_id: String, behavior: String },
}
