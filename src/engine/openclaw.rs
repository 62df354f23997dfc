//! OpenClaw's ways, as captured from the real gateway: the whole history resent every turn,
//! identical retries, `<id>:<N>` keys that move on at compaction and reset, one-shot
//! compaction requests, and its system prompt.

use std::time::Instant;

use super::attachments::{session_dir, Attachment, Renderer};
use super::history::{self, Missed, Reading};
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
/// First line of a `<missed_conversation>` block.
const MISSED_PREAMBLE: &str = "Messages of this conversation that did not reach you (another model or host answered them), oldest first. They are context; the new message follows this block.";

/// A stable hash (the system prompt's is persisted): request bodies, system prompts, tool catalogs.
pub fn fingerprint(body: &str) -> u64 {
    history::stable_hash(body.as_bytes())
}

fn is_compaction(req: &ChatRequest) -> bool {
    req.tools.is_empty()
        && req.messages.first().is_some_and(|m| m.role == "system" && m.text().starts_with(COMPACTION_PROMPT))
}

/// `<id>:<N>` → (`<id>`, N), N in plain decimal.
fn generation(key: &str) -> Option<(&str, u64)> {
    let (base, n) = key.rsplit_once(':')?;
    let g: u64 = n.parse().ok()?;
    (g.to_string() == n).then_some((base, g))
}

/// Where a request belongs, found before anything is created.
enum Found {
    /// A known session (by its key or an alias).
    Known(String),
    /// `<id>:<N+1>` after a compaction: continues the session `earlier` under the new key.
    Continues { earlier: String },
    /// A new session (or a fresh one-shot for a compaction request) under this key.
    New(String),
}

impl Engine {
    /// Route a chat request: a tool result for the turn in flight, a retry of a request seen
    /// before, or a new turn. A refused request creates and saves nothing.
    pub(super) fn chat_turn(
        &mut self,
        now: Instant,
        conn: ConnId,
        unix_secs: u64,
        key: String,
        req: &ChatRequest,
        fingerprint: u64,
    ) -> Result<(), ApiError> {
        let found = self.find_session(&key, req);
        // Identifiers are drawn in the same order whether or not the request is accepted.
        let uuid = matches!(found, Found::New(_)).then(|| self.ids.uuid());
        let completion = Completion {
            id: format!("chatcmpl-{}", self.ids.token()),
            created: unix_secs,
            model: req.model.clone().unwrap_or_else(|| self.settings.model.clone()),
        };
        let mut l = Listener { conn, stream: req.stream, include_usage: req.include_usage(), completion };
        let existing = match &found {
            Found::Known(k) | Found::Continues { earlier: k } => Some(k.clone()),
            Found::New(_) => None,
        };
        if let Some(key) = &existing {
            self.st.sessions.get_mut(key).expect("session").tools = self.offered_tools(req);
            let Some(back) = self.continue_with_verdict(now, key, req, l) else { return Ok(()) };
            let Some(back) = self.continue_with_tool_result(now, key, req, back) else { return Ok(()) };
            let Err(back) = self.attach(now, key, fingerprint, back) else { return Ok(()) };
            if let Some((text, usage)) = self.st.sessions[key].recent_answer(fingerprint, now) {
                log::info!("session {key}: identical request answered again from the finished turn");
                let mut turn = Turn::new(fingerprint, Parts::default());
                turn.usage = usage; // what the answer cost, reported to the client that gets it
                self.listen(now, key, &mut turn, back);
                self.stream_text(now, &mut turn, &text);
                self.answer(&mut turn, &Answer::Text(text));
                return Ok(());
            }
            l = back;
        }
        let target = match &found {
            Found::Known(k) | Found::Continues { earlier: k } | Found::New(k) => k.clone(),
        };
        let mut render = Renderer::new(session_dir(&self.settings.attachments_dir, &target));
        let (text, prints) = history::new_input(&req.messages, &mut render)?;
        if text.trim().is_empty() && render.files.is_empty() {
            return Err(ApiError::new(
                400,
                "no_user_message",
                "no user message with text after the last assistant message",
            ));
        }
        let files = std::mem::take(&mut render.files);
        let reading = match existing.as_ref().and_then(|k| self.st.sessions.get(k)).filter(|s| !s.ephemeral) {
            Some(s) => history::reconcile(&req.messages, &s.answers, &s.heard, compacted(req), &mut render),
            None => Reading::Continues(Missed::default()),
        };
        // The session map is saved at once when the mapping changes: a crash must not lose it.
        let (key, mut save) = match found {
            Found::Known(key) => (key, false),
            Found::Continues { earlier } => {
                log::info!("session {earlier}: continues as {key} after a compaction");
                super::bounds::add_alias(&mut self.st.sessions.get_mut(&earlier).expect("session").aliases, &key);
                (earlier, true)
            }
            Found::New(key) => {
                self.create_session(&key, req, uuid.expect("drawn for a new session"), unix_secs);
                let ephemeral = self.st.sessions[&key].ephemeral;
                (key, !ephemeral)
            }
        };
        let missed = match reading {
            Reading::Continues(missed) => missed,
            Reading::Rewritten if self.st.sessions[&key].is_idle() => {
                self.restart_claude_session(now, &key);
                save = true;
                Missed::default()
            }
            Reading::Rewritten => {
                log::warn!("session {key}: none of Claude's answers is in the history, but a turn is under way");
                Missed::default()
            }
        };
        let parts = Parts {
            system: req
                .messages
                .iter()
                .filter(|m| m.role == "system")
                .map(ChatMessage::text)
                .collect::<Vec<_>>()
                .join("\n\n"),
            history: tail(&history::earlier(&req.messages), HISTORY_MAX),
            text,
            prints,
            files,
            missed,
        };
        match self.admit(now, &key, Turn::new(fingerprint, parts), l) {
            Ok(()) => {
                if save {
                    self.save_sessions();
                }
                Ok(())
            }
            Err(e) => {
                if existing.is_none() {
                    self.st.sessions.remove(&key);
                }
                Err(e)
            }
        }
    }

    /// Where a request belongs, without creating anything.
    ///
    /// - A compaction request (summariser prompt, no tools) goes to a one-shot session of its own,
    ///   so it never waits behind, or mixes into, the conversation's turns.
    /// - `<id>:<N+1>` whose history starts with the compaction summary continues the session of
    ///   `<id>:<N>`; any other new key (a reset gives a new id or N) starts a new Claude session.
    fn find_session(&self, key: &str, req: &ChatRequest) -> Found {
        if is_compaction(req) {
            let key = format!("compaction:{key}");
            // A fresh Claude session each time, unless one is still at work on this key.
            return match self.st.sessions.get(&key) {
                Some(s) if !(s.is_idle() && s.proc.is_none()) => Found::Known(key),
                _ => Found::New(key),
            };
        }
        if let Some(canonical) = self.session_key_of(key) {
            return Found::Known(canonical);
        }
        match generation(key).filter(|_| compacted(req)).and_then(|(base, n)| self.latest_generation(base, n)) {
            Some(earlier) => Found::Continues { earlier },
            None => Found::New(key.to_string()),
        }
    }

    fn create_session(&mut self, key: &str, req: &ChatRequest, uuid: String, unix_secs: u64) {
        if key.starts_with("compaction:") && is_compaction(req) {
            let s = self
                .st
                .sessions
                .entry(key.to_string())
                .or_insert_with(|| Session::new(key.to_string(), uuid.clone(), unix_secs));
            s.ephemeral = true;
            s.uuid = uuid;
            s.claude_fresh = true;
        } else {
            log::info!("session {key}: new, claude session {uuid}");
            self.st.sessions.insert(key.to_string(), Session::new(key.to_string(), uuid, unix_secs));
        }
        self.st.sessions.get_mut(key).expect("session").tools = self.offered_tools(req);
    }

    /// The client's history no longer holds any answer of the session's Claude session (it was
    /// edited, rewound or branched): a new Claude session takes over, seeded with that history.
    fn restart_claude_session(&mut self, now: Instant, key: &str) {
        let uuid = self.ids.uuid();
        let s = self.st.sessions.get_mut(key).expect("session");
        log::info!(
            "session {key}: none of claude session {}'s answers is in the client's history any more (edited, rewound or branched); starting claude session {uuid} with that history",
            s.uuid
        );
        s.uuid = uuid;
        s.claude_fresh = true;
        s.system_hash = None;
        s.answers.clear();
        s.heard.clear();
        if let Some(pid) = s.proc {
            self.stop_process(now, pid, "the client's history was rewritten; a new Claude session takes over");
        }
    }

    /// Claude took `print` in (a tool result) during a turn.
    pub(super) fn heard(&mut self, key: &str, print: u64) {
        if let Some(s) = self.st.sessions.get_mut(key) {
            history::remember(&mut s.heard, print, history::HEARD_KEPT);
        }
    }

    /// An answer of the session's Claude session reached a client: its place in the conversation.
    pub(super) fn remember_answer(&mut self, key: &str, print: u64) {
        if let Some(s) = self.st.sessions.get_mut(key) {
            history::remember(&mut s.answers, print, history::ANSWERS_KEPT);
            s.heard.clear();
            self.st.sessions_dirty = true;
        }
    }

    /// The session named `key`, directly or as an alias.
    fn session_key_of(&self, key: &str) -> Option<String> {
        if self.st.sessions.contains_key(key) {
            return Some(key.to_string());
        }
        self.st.sessions.values().find(|s| s.aliases.iter().any(|a| a == key)).map(|s| s.key.clone())
    }

    /// The session of the highest generation of `base` below `n`. `n` comes from the client
    /// (up to 2^64-1): look through the keys there are, never count down from it.
    fn latest_generation(&self, base: &str, n: u64) -> Option<String> {
        let names =
            self.st.sessions.values().flat_map(|s| std::iter::once(&s.key).chain(&s.aliases).map(move |k| (k, s)));
        names
            .filter_map(|(k, s)| generation(k).filter(|(b, g)| *b == base && *g < n).map(|(_, g)| (g, &s.key)))
            .max_by_key(|(g, _)| *g)
            .map(|(_, key)| key.clone())
    }

    /// Attach `l` to the in-flight or queued turn of an identical request (a client retry),
    /// so the message reaches Claude once and both requests get the answer.
    fn attach(&mut self, now: Instant, key: &str, fingerprint: u64, l: Listener) -> Result<(), Listener> {
        let session = self.st.sessions.get_mut(key).expect("session");
        let in_flight = session.current.as_ref().is_some_and(|t| t.fingerprint == fingerprint);
        let queued = session.queue.iter().position(|t| t.fingerprint == fingerprint).filter(|_| !in_flight);
        let mut turn = match queued {
            _ if in_flight => session.current.take().expect("current"),
            Some(i) => session.queue.remove(i).expect("queued"),
            None => return Err(l),
        };
        log::info!("session {key}: identical request attached to {}", turn.chat_id);
        self.listen(now, key, &mut turn, l);
        let session = self.st.sessions.get_mut(key).expect("session");
        match queued {
            Some(i) => session.queue.insert(i, turn),
            None => session.current = Some(turn),
        }
        Ok(())
    }
}

/// The last `max` bytes of `text`, on a character boundary.
fn tail(text: &str, max: usize) -> String {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
    text[start..].to_string()
}

fn compacted(req: &ChatRequest) -> bool {
    req.messages.iter().find(|m| m.role != "system").is_some_and(|m| m.text().starts_with(COMPACTED_HISTORY))
}

/// The channel message: the client's system prompt when this Claude session has not seen it
/// (`session.system_hash` holds its hash, updated here), the earlier conversation when the
/// Claude session is fresh (no transcript: new, or its transcript is gone) or else what it
/// missed of the conversation, then the new user messages. What it hears is remembered in
/// `session.heard`; the attachments the message names are returned, to be written first.
pub fn compose(parts: &mut Parts, session: &mut Session, fresh: bool) -> (String, Vec<Attachment>) {
    let mut out = Vec::new();
    let hash = fingerprint(&parts.system);
    if !parts.system.is_empty() && session.system_hash != Some(hash) {
        session.system_hash = Some(hash);
        out.push(format!("<system_prompt from=\"client\">\n{}\n</system_prompt>", parts.system));
    }
    let mut files = std::mem::take(&mut parts.files);
    let mut heard = std::mem::take(&mut parts.prints);
    if fresh && !parts.history.is_empty() {
        out.push(format!("<earlier_conversation>\n{}\n</earlier_conversation>", parts.history));
    } else if !fresh && !parts.missed.text.is_empty() {
        let missed = std::mem::take(&mut parts.missed);
        out.push(format!("<missed_conversation>\n{MISSED_PREAMBLE}\n{}\n</missed_conversation>", missed.text));
        files.extend(missed.files);
        heard.extend(missed.prints);
    }
    if fresh {
        session.heard.clear();
    }
    for p in heard {
        history::remember(&mut session.heard, p, history::HEARD_KEPT);
    }
    out.push(parts.text.clone());
    (out.join("\n\n"), files)
}
