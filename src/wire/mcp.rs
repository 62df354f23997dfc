//! The few MCP (JSON-RPC 2.0, newline-delimited) messages a Claude Code channel exchanges.

use serde_json::{json, Value};

/// Newest protocol for which Claude Code still registers channels (docs/DESIGN.md §2.1).
pub const PROTOCOL_VERSION: &str = "2025-11-25";
pub const METHOD_NOT_FOUND: i64 = -32601;

pub fn response(id: &Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

pub fn error(id: &Value, code: i64, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

pub fn notification(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

/// Echo the client's protocol version when it is older than ours, else offer ours.
/// Versions are dates, so string order is date order.
pub fn negotiate(client: Option<&str>) -> &str {
    match client {
        Some(v) if v < PROTOCOL_VERSION => v,
        _ => PROTOCOL_VERSION,
    }
}

pub const INSTRUCTIONS: &str =
    "Messages from the user arrive as <channel source=\"synthesis\" chat_id=\"...\">text</channel>. \
Answer every such message by calling the `reply` tool with the same chat_id and your complete answer as text. \
The user sees only what you pass to `reply`.";

pub fn initialize_result(client_version: Option<&str>) -> Value {
    json!({
        "protocolVersion": negotiate(client_version),
        "capabilities": {
            "experimental": {"claude/channel": {}, "claude/channel/permission": {}},
            // Without `listChanged` claude ignores notifications/tools/list_changed.
            "tools": {"listChanged": true}
        },
        "serverInfo": {"name": "synthesis", "version": env!("CARGO_PKG_VERSION")},
        "instructions": INSTRUCTIONS,
    })
}

pub fn reply_tool() -> Value {
    json!({
        "name": "reply",
        "description": "Send your answer to the user of this channel. Pass the chat_id of the message you answer.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "chat_id": {"type": "string", "description": "chat_id from the <channel> tag"},
                "text": {"type": "string", "description": "the answer"}
            },
            "required": ["chat_id", "text"]
        }
    })
}

/// A client tool as an MCP tool.
pub fn client_tool(t: &crate::wire::bridge::ToolDef) -> Value {
    json!({"name": t.name, "description": t.description, "inputSchema": t.input_schema})
}

pub fn tool_text(text: &str, is_error: bool) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": is_error})
}

pub fn channel_message(content: &str, chat_id: &str) -> String {
    notification("notifications/claude/channel", json!({"content": content, "meta": {"chat_id": chat_id}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_offers_a_protocol_that_disables_channels() {
        assert_eq!(negotiate(Some("2026-07-28")), PROTOCOL_VERSION);
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(None), PROTOCOL_VERSION);
    }
}
