//! The bridge protocol between `synthesis channel` (inside claude) and the daemon:
//! JSON text frames over one WebSocket per claude process, each with a `type`.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the daemon refuses a `hello` of another version.
pub const VERSION: u32 = 1;
pub const PATH: &str = "/bridge";

/// Environment variables the daemon gives the channel through `--mcp-config`.
pub const ENV_URL: &str = "SYNTHESIS_BRIDGE_URL";
pub const ENV_TOKEN: &str = "SYNTHESIS_BRIDGE_TOKEN";

/// Seconds between channel heartbeats.
pub const HEARTBEAT_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromChannel {
    /// First frame, sent once MCP is initialised: binds this socket to the process owning `token`.
    Hello {
        v: u32,
        token: String,
    },
    /// Claude called the `reply` tool.
    Reply {
        chat_id: String,
        text: String,
    },
    Heartbeat,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToChannel {
    /// Push one user message into Claude as a channel notification.
    Deliver { chat_id: String, content: String },
}
