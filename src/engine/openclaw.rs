//! OpenClaw's ways, as captured from the real gateway: the whole history resent every turn,
//! identical retries, `<id>:<N>` keys that move on at compaction and reset, one-shot
//! compaction requests, and its system prompt.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

use super::session::Session;
use super::turn::{Answer, Listener, Parts, Turn};
use super::{ConnId, Engine};
use crate::wire::openai::{ApiError, ChatMessage, ChatRequest, Completion};

/// First words of OpenClaw's summariser system prompt (compaction requests carry no tools).
const COMPACTION_PROMPT: &str = "You are a context summarization assistant";
/// First words of the history after a compaction.
const COMPACTED_HISTORY: &str = "The conversation history before this point was compacted";
/// Most characters of earlier history handed to a new Claude session.
const HISTORY_MAX: usize = 32 * 1024;

pub fn fingerprint(body: &str) -> u64 {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    h.finish()
}

fn is_compaction(req: &ChatRequest) -> bool {
    req.tools.is_empty()
        && req.messages.first().is_some_and(|m| m.role == "system" && m.text().starts_with(COMPACTION_PROMPT))
}

/// `<id>:<N>` → (`<id>`, N).
fn generation(key: &str) -> Option<(&str, u64)> {
    let (base, n) = key.rsplit_once(':')?;
    Some((base, n.parse().ok()?))
}

impl Engine {
    /// Route a chat request: a tool result for the turn in flight, a retry of a request seen
    /// before, or a new turn.
    pub(super) fn chat_turn(
        &mut self,
        now: Instant,
        conn: ConnId,
        unix_secs: u64,
        key: String,
        req: &ChatRequest,
        fingerprint: u64,
    ) -> Result<(), ApiError> {
        let key = self.session_for(&key, req, unix_secs);
        let completion = Completion {
            id: format!("chatcmpl-{}", self.ids.token()),
            created: unix_secs,
            model: req.model.clone().unwrap_or_else(|| self.settings.model.clone()),
        };
        let l = Listener { conn, stream: req.stream, include_usage: req.include_usage(), completion };
        self.sessions.get_mut(&key).expect("session").tools = self.offered_tools(req);
        let Some(l) = self.continue_with_verdict(now, &key, req, l) else { return Ok(()) };
        let Some(l) = self.continue_with_tool_result(now, &key, req, l) else { return Ok(()) };
        let Err(l) = self.attach(now, &key, fingerprint, l) else { return Ok(()) };
        if let Some((text, usage)) = self.sessions[&key].recent_answer(fingerprint, now) {
            log::info!("session {key}: identical request answered again from the finished turn");
            let mut turn = Turn::new(fingerprint, Parts::default());
            turn.usage = usage; // what the answer cost, reported to the client that gets it
            self.listen(now, &key, &mut turn, l);
            self.stream_text(now, &mut turn, &text);
            self.answer(&mut turn, &Answer::Text(text));
            return Ok(());
        }
        if req.new_user_text().is_empty() {
            return Err(ApiError::new(
                400,
                "no_user_message",
                "no user message with text after the last assistant message",
            ));
        }
        self.admit(now, &key, Turn::new(fingerprint, parts(req)), l)
    }

    /// Find or create the session for `key`.
    ///
    /// - A compaction request (summariser prompt, no tools) goes to a one-shot session of its own,
    ///   so it never waits behind, or mixes into, the conversation's turns.
    /// - `<id>:<N+1>` whose history starts with the compaction summary continues the session of
    ///   `<id>:<N>`; any other new key (a reset gives a new id or N) starts a new Claude session.
    fn session_for(&mut self, key: &str, req: &ChatRequest, unix_secs: u64) -> String {
        if is_compaction(req) {
            let key = format!("compaction:{key}");
            // A fresh Claude session each time, unless one is still at work on this key.
            if self.sessions.get(&key).is_none_or(|s| s.is_idle() && s.proc.is_none()) {
                let uuid = self.ids.uuid();
                let s = self
                    .sessions
                    .entry(key.clone())
                    .or_insert_with(|| Session::new(key.clone(), uuid.clone(), unix_secs));
                s.ephemeral = true;
                s.uuid = uuid;
                s.claude_fresh = true;
            }
            return key;
        }
        if let Some(canonical) = self.session_key_of(key) {
            return canonical;
        }
        let compacted =
            req.messages.iter().find(|m| m.role != "system").is_some_and(|m| m.text().starts_with(COMPACTED_HISTORY));
        if let Some(earlier) =
            generation(key).filter(|_| compacted).and_then(|(base, n)| self.latest_generation(base, n))
        {
            log::info!("session {earlier}: continues as {key} after a compaction");
            self.sessions.get_mut(&earlier).expect("session").aliases.push(key.to_string());
            self.save_sessions();
            return earlier;
        }
        let uuid = self.ids.uuid();
        log::info!("session {key}: new, claude session {uuid}");
        self.sessions.insert(key.to_string(), Session::new(key.to_string(), uuid, unix_secs));
        // Saved at once: a crash must not lose the key → Claude session mapping.
        self.save_sessions();
        key.to_string()
    }

    /// The session named `key`, directly or as an alias.
    fn session_key_of(&self, key: &str) -> Option<String> {
        if self.sessions.contains_key(key) {
            return Some(key.to_string());
        }
        self.sessions.values().find(|s| s.aliases.iter().any(|a| a == key)).map(|s| s.key.clone())
    }

    /// The session of the highest generation of `base` below `n`.
    fn latest_generation(&self, base: &str, n: u64) -> Option<String> {
        (0..n).rev().find_map(|k| self.session_key_of(&format!("{base}:{k}")))
    }

    /// Attach `l` to the in-flight or queued turn of an identical request (a client retry),
    /// so the message reaches Claude once and both requests get the answer.
    fn attach(&mut self, now: Instant, key: &str, fingerprint: u64, l: Listener) -> Result<(), Listener> {
        let session = self.sessions.get_mut(key).expect("session");
        let in_flight = session.current.as_ref().is_some_and(|t| t.fingerprint == fingerprint);
        let queued = session.queue.iter().position(|t| t.fingerprint == fingerprint).filter(|_| !in_flight);
        let mut turn = match queued {
            _ if in_flight => session.current.take().expect("current"),
            Some(i) => session.queue.remove(i).expect("queued"),
            None => return Err(l),
        };
        log::info!("session {key}: identical request attached to {}", turn.chat_id);
        self.listen(now, key, &mut turn, l);
        let session = self.sessions.get_mut(key).expect("session");
        match queued {
            Some(i) => session.queue.insert(i, turn),
            None => session.current = Some(turn),
        }
        Ok(())
    }
}

/// The parts of a request Claude may need.
fn parts(req: &ChatRequest) -> Parts {
    let system: Vec<String> = req.messages.iter().filter(|m| m.role == "system").map(ChatMessage::text).collect();
    let history = req.earlier_history();
    let start = history.len().saturating_sub(HISTORY_MAX);
    let start = (start..history.len()).find(|i| history.is_char_boundary(*i)).unwrap_or(0);
    Parts { system: system.join("\n\n"), history: history[start..].to_string(), text: req.new_user_text() }
}

/// The channel message: the client's system prompt when this Claude session has not seen it
/// (`seen` holds its hash, updated here), the earlier conversation when the Claude session is
/// fresh (no transcript: new, or its transcript is gone), then the new user messages.
pub fn compose(parts: &Parts, seen: &mut Option<u64>, fresh: bool) -> String {
    let mut out = Vec::new();
    let hash = fingerprint(&parts.system);
    if !parts.system.is_empty() && *seen != Some(hash) {
        *seen = Some(hash);
        out.push(format!("<system_prompt from=\"client\">\n{}\n</system_prompt>", parts.system));
    }
    if fresh && !parts.history.is_empty() {
        out.push(format!("<earlier_conversation>\n{}\n</earlier_conversation>", parts.history));
    }
    out.push(parts.text.clone());
    out.join("\n\n")
}
