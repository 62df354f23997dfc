//! Permission relay: when Claude asks to use a tool that needs approval, nobody sees its
//! terminal, so the question goes to the user as a chat message, and the user's `yes <id>` /
//! `no <id>` comes back as the verdict (never delivered to Claude as a message).

use std::time::Instant;

use super::turn::Listener;
use super::Engine;
use crate::wire::bridge::ToChannel;
use crate::wire::openai::ChatRequest;

/// What synthesis does with Claude's permission requests (`permissions` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permissions {
    Relay,
    Allow,
    Deny,
}

impl Engine {
    pub(super) fn on_permission_request(
        &mut self,
        now: Instant,
        key: &str,
        request_id: String,
        tool: &str,
        description: &str,
        preview: &str,
    ) {
        let behavior = match self.settings.permissions {
            Permissions::Allow => "allow",
            Permissions::Deny => "deny",
            Permissions::Relay => {
                let text = format!(
                    "Claude wants to use {tool}: {description}\n{preview}\n— reply `yes {request_id}` to allow or `no {request_id}` to deny."
                );
                let id = request_id.clone();
                let relayed = self.with_current(key, |engine, turn| {
                    turn.permissions.push_back((id, text));
                    engine.ask_next(now, turn);
                });
                if relayed.is_some() {
                    log::info!("session {key}: relaying permission request {request_id} for {tool}");
                    return;
                }
                log::warn!("session {key}: permission request {request_id} outside a turn");
                "deny"
            }
        };
        log::info!("session {key}: permission request {request_id} for {tool}: {behavior} (permissions setting)");
        self.verdict(key, request_id, behavior);
    }

    fn verdict(&mut self, key: &str, request_id: String, behavior: &str) {
        self.send_to_channel(key, ToChannel::Permission { request_id, behavior: behavior.into() });
    }

    /// If the turn in flight waits for a permission verdict and `req` carries `yes <id>` or
    /// `no <id>`, pass it to Claude and let `l` wait for the rest of the turn (`None`).
    /// Any other message denies the open request (the user moved on) and is a turn of its own.
    pub(super) fn continue_with_verdict(
        &mut self,
        now: Instant,
        key: &str,
        req: &ChatRequest,
        l: Listener,
    ) -> Option<Listener> {
        let Some(id) =
            self.st.sessions.get(key).and_then(|s| s.current.as_ref()).and_then(|t| t.asked_permission.clone())
        else {
            return Some(l);
        };
        let behavior = match parse_verdict(&req.new_user_text()) {
            Some((allow, answered)) if answered == id => {
                if allow {
                    "allow"
                } else {
                    "deny"
                }
            }
            _ => {
                log::info!("session {key}: permission {id} unanswered, the user moved on: denied");
                self.st.sessions.get_mut(key)?.current.as_mut()?.asked_permission = None;
                self.verdict(key, id, "deny");
                return Some(l);
            }
        };
        log::info!("session {key}: permission {id}: {behavior} by the user");
        self.verdict(key, id, behavior);
        self.with_current(key, |engine, turn| {
            turn.asked_permission = None;
            engine.listen(now, key, turn, l);
        });
        None
    }
}

/// `yes abcde` / `no abcde` anywhere in the user's text (OpenClaw prefixes a timestamp):
/// (allowed, request id). Ids are five letters a–z without `l`.
fn parse_verdict(text: &str) -> Option<(bool, String)> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    words.windows(2).find_map(|w| {
        let allow = match w[0].as_str() {
            "yes" | "y" | "allow" => true,
            "no" | "n" | "deny" => false,
            _ => return None,
        };
        let id_like = w[1].len() == 5 && w[1].chars().all(|c| c.is_ascii_lowercase() && c != 'l');
        id_like.then(|| (allow, w[1].clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::parse_verdict;

    #[test]
    fn reads_verdicts_inside_openclaw_messages() {
        assert_eq!(parse_verdict("[Wed 2026-11-25 12:09 UTC] yes abcde"), Some((true, "abcde".into())));
        assert_eq!(parse_verdict("No QWERT please"), Some((false, "qwert".into())));
        assert_eq!(parse_verdict("yes hello"), None, "an `l` is never in an id");
        assert_eq!(parse_verdict("yes, do it"), None);
    }
}
