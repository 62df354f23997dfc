//! Sessions and their turns: one turn in flight per session, the rest wait in a FIFO, so
//! Claude never merges two messages into one turn.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::metrics;
use super::openclaw::compose;
use super::process::ACK_TIMEOUT;
use super::turn::{Answer, Listener, Turn};
use super::{ConnId, Engine, Output, ProcId, SessionRecord, Usage};
use crate::wire::bridge::{ToChannel, ToolDef};
use crate::wire::openai::ApiError;

/// How long a finished answer is kept for a retry of the identical request.
pub(super) const RECENT_TTL: Duration = Duration::from_secs(600);
/// Longest wait for claude to re-list tools after the catalog changed.
const TOOLS_WAIT: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
pub struct Session {
    pub key: String,
    /// The Claude Code session this OpenClaw session maps to.
    pub uuid: String,
    pub proc: Option<ProcId>,
    /// The turn delivered to Claude and not yet ended.
    pub current: Option<Turn>,
    /// Turns not yet delivered, oldest first.
    pub queue: VecDeque<Turn>,
    /// Counts turns for chat ids; never reused within a session.
    pub turns: u64,
    /// Waiting in `Engine::slot_waiters` for a process slot.
    pub wants_slot: bool,
    /// Unix seconds.
    pub created: u64,
    pub last_used: u64,
    /// Answers of recently finished turns, by request fingerprint, for identical retries.
    pub recent: VecDeque<Recent>,
    /// Hash of the client's system prompt as last given to this Claude session.
    pub system_hash: Option<u64>,
    /// The Claude session has no transcript yet (new, or it was not there to resume): the next
    /// delivery carries the system prompt and the earlier conversation.
    pub claude_fresh: bool,
    /// Other keys naming this session (`<id>:<N+1>` after a compaction).
    pub aliases: Vec<String>,
    /// One-shot (compaction requests): a fresh Claude session per turn, never saved.
    pub ephemeral: bool,
    /// The client tools of the latest request.
    pub tools: Vec<ToolDef>,
    /// Fingerprints of this Claude session's answers and of what it heard since the last one
    /// (see `history`).
    pub answers: Vec<u64>,
    pub heard: Vec<u64>,
    /// Chat id of the last turn ended by an interrupt: it had no Stop, so its replies may still
    /// come in during a later turn, and are not that turn's.
    pub interrupted: Option<String>,
}

/// A finished turn's answer, kept for an identical retry.
#[derive(Serialize, Deserialize)]
pub struct Recent {
    pub fingerprint: u64,
    pub answer: String,
    /// The usage its response reported.
    #[serde(default)]
    pub usage: Usage,
    #[serde(with = "super::clock::at")]
    pub at: Instant,
}

impl Session {
    pub fn new(key: String, uuid: String, unix_secs: u64) -> Self {
        Session {
            key,
            uuid,
            proc: None,
            current: None,
            queue: VecDeque::new(),
            turns: 0,
            wants_slot: false,
            created: unix_secs,
            last_used: unix_secs,
            recent: VecDeque::new(),
            system_hash: None,
            claude_fresh: true,
            aliases: Vec::new(),
            ephemeral: false,
            tools: Vec::new(),
            answers: Vec::new(),
            heard: Vec::new(),
            interrupted: None,
        }
    }

    pub fn restored(r: SessionRecord) -> Self {
        let mut s = Session::new(r.key, r.uuid, r.created);
        s.last_used = r.last_used;
        s.aliases = r.aliases;
        s.system_hash = r.system_hash;
        s.answers = r.answers;
        s.heard = r.heard;
        s.claude_fresh = false; // decided when its process starts (`Input::Spawned`)
        s
    }

    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            key: self.key.clone(),
            uuid: self.uuid.clone(),
            created: self.created,
            last_used: self.last_used,
            aliases: self.aliases.clone(),
            system_hash: self.system_hash,
            answers: self.answers.clone(),
            heard: self.heard.clone(),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.current.iter().chain(&self.queue).filter_map(Turn::deadline).min()
    }

    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty()
    }

    pub fn recent_answer(&self, fingerprint: u64, now: Instant) -> Option<(String, Usage)> {
        self.recent
            .iter()
            .find(|r| r.fingerprint == fingerprint && now.duration_since(r.at) < RECENT_TTL)
            .map(|r| (r.answer.clone(), r.usage))
    }
}

impl Engine {
    /// Queue a turn for `key`, making sure a process is (or will be) there to take it.
    pub(super) fn admit(&mut self, now: Instant, key: &str, mut turn: Turn, l: Listener) -> Result<(), ApiError> {
        let session = self.st.sessions.get_mut(key).expect("session exists");
        if session.queue.len() >= self.settings.queue_depth {
            let msg = format!("{} requests are already waiting for this session; retry later", session.queue.len());
            return Err(ApiError::new(429, "session_queue_full", msg).retry_after(5));
        }
        self.ensure_process(now, key)?;
        let session = self.st.sessions.get_mut(key).expect("session exists");
        session.turns += 1;
        session.last_used = l.completion.created;
        turn.chat_id = format!("chat-{}", session.turns);
        self.st.sessions_dirty = true;
        self.listen(now, key, &mut turn, l);
        self.st.sessions.get_mut(key).expect("session exists").queue.push_back(turn);
        self.deliver_next(now, key);
        Ok(())
    }

    /// Make `l` wait for `turn`, and open its response.
    pub(super) fn listen(&mut self, now: Instant, key: &str, turn: &mut Turn, l: Listener) {
        self.st.waiting.insert(l.conn, key.to_string());
        self.open_listener(&l, &turn.replies);
        turn.listeners.push(l);
        turn.orphan_deadline = None;
        turn.keepalive_at = self.next_keepalive(now, turn);
        self.ask_next(now, turn);
    }

    /// Deliver the next queued turn if the session's process is ready and free.
    pub(super) fn deliver_next(&mut self, now: Instant, key: &str) {
        let Some(session) = self.st.sessions.get_mut(key) else { return };
        if session.current.is_some() || session.queue.is_empty() {
            return;
        }
        let Some(pid) = session.proc else { return };
        let Some(bridge) = self.st.procs.get(&pid).and_then(|p| p.accepting_bridge(now)) else { return };
        if self.send_tools(key, pid) {
            // Claude re-lists tools on `list_changed`; deliver once it has (or after a short wait).
            self.st.procs.get_mut(&pid).expect("process").tools_wait_until = Some(now + TOOLS_WAIT);
            return;
        }
        let session = self.st.sessions.get_mut(key).expect("session");
        let mut turn = session.queue.pop_front().expect("queue not empty");
        let (fresh, seen) = (session.claude_fresh, session.system_hash);
        if fresh {
            session.system_hash = None;
        }
        let files;
        (turn.content, files) = compose(&mut turn.parts, session, fresh);
        session.claude_fresh = false;
        self.st.sessions_dirty |= session.system_hash != seen;
        turn.deadline = Some(now + self.settings.turn_timeout);
        turn.delivered = Some(now);
        let frame = ToChannel::Deliver { chat_id: turn.chat_id.clone(), content: turn.content.clone() };
        log::info!("session {key}: delivering {} to process {pid}", turn.chat_id);
        session.current = Some(turn);
        for file in files {
            self.push(Output::WriteAttachment { path: file.path, bytes: file.bytes });
        }
        self.push(Output::Bridge { conn: bridge, frame });
        let p = self.st.procs.get_mut(&pid).expect("process of the session");
        p.turns += 1;
        if !p.channel_proven {
            p.deliveries = 1;
            p.redeliver_at = Some(now + ACK_TIMEOUT);
        }
    }

    /// Run `f` on the session's turn in flight, lent out of the session so that `f` can use the
    /// whole engine. `None` when no turn is in flight.
    pub(super) fn with_current<R>(&mut self, key: &str, f: impl FnOnce(&mut Engine, &mut Turn) -> R) -> Option<R> {
        let mut turn = self.st.sessions.get_mut(key)?.current.take()?;
        let result = f(self, &mut turn);
        self.st.sessions.get_mut(key).expect("session").current = Some(turn);
        Some(result)
    }

    /// Send a frame to the channel of the session's process, if it is connected.
    pub(super) fn send_to_channel(&mut self, key: &str, frame: ToChannel) {
        let bridge =
            self.st.sessions.get(key).and_then(|s| s.proc).and_then(|p| self.st.procs.get(&p)).and_then(|p| p.bridge);
        if let Some(conn) = bridge {
            self.push(Output::Bridge { conn, frame });
        }
    }

    /// A `reply` tool call arrived. The channel answers claude's call only after this (bridge
    /// `replied`), so a turn's replies always arrive before its Stop hook: a reply while a turn is
    /// in flight belongs to that turn, even when Claude copied an older `chat_id` into it; a
    /// reply with no turn in flight, or naming an interrupted turn (no Stop closed it), is late
    /// and dropped, never given to the next turn.
    pub(super) fn on_reply(&mut self, now: Instant, key: &str, chat_id: &str, text: String) {
        if self.st.sessions.get(key).is_some_and(|s| s.interrupted.as_deref() == Some(chat_id)) {
            log::warn!("session {key}: late reply for the interrupted {chat_id}, dropped");
            return;
        }
        let replied = self.with_current(key, |engine, turn| {
            if turn.chat_id != chat_id {
                log::info!("session {key}: reply names {chat_id} during {}; it belongs to the turn", turn.chat_id);
            }
            engine.say(now, turn, text);
        });
        if replied.is_none() {
            log::warn!("session {key}: late reply for {chat_id} after its turn was answered, dropped");
        }
    }

    /// End the turn in flight with `answer` and move on to the next one.
    pub(super) fn end_turn(&mut self, now: Instant, key: &str, answer: Answer) {
        let Some(session) = self.st.sessions.get_mut(key) else { return };
        let Some(mut turn) = session.current.take() else { return };
        if let Answer::Text(text) = &answer {
            super::bounds::remember(&mut session.recent, turn.fingerprint, text.clone(), turn.usage, now);
        }
        let (ephemeral, proc) = (session.ephemeral, session.proc);
        let outcome = match &answer {
            Answer::Text(_) => metrics::OK,
            Answer::Error(e) => e.code.as_str(),
        };
        self.count_turn(now, &turn, outcome);
        self.answer(&mut turn, &answer);
        if let Some(p) = proc.and_then(|id| self.st.procs.get_mut(&id)) {
            p.idle_since = now;
        }
        if ephemeral {
            if let Some(id) = proc {
                self.stop_process(now, id, "one-shot session done");
            }
        }
        self.deliver_next(now, key);
        // An idle claude may now go to a session waiting for a slot.
        self.rebalance(now);
        self.maybe_finish_shutdown(now);
    }

    /// Fail every turn of a session that has not reached Claude.
    pub(super) fn fail_queued(&mut self, now: Instant, key: &str, err: &ApiError) {
        let queued: Vec<Turn> = match self.st.sessions.get_mut(key) {
            Some(s) => s.queue.drain(..).collect(),
            None => return,
        };
        for mut turn in queued {
            self.count_turn(now, &turn, &err.code);
            self.answer(&mut turn, &Answer::Error(err.clone()));
        }
    }

    pub(super) fn fail_all_queued(&mut self, now: Instant) {
        let err = super::api::shutting_down();
        let keys: Vec<String> = self.st.sessions.keys().cloned().collect();
        for key in keys {
            self.fail_queued(now, &key, &err);
        }
    }

    /// Turn deadlines: turn timeout (interrupt, 504), abandoned by every client (interrupt),
    /// keep-alive for streams.
    pub(super) fn expire_turns(&mut self, now: Instant) {
        let due: Vec<String> = self
            .st
            .sessions
            .values()
            .filter(|s| s.deadline().is_some_and(|d| now >= d))
            .map(|s| s.key.clone())
            .collect();
        let due_at = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        for key in due {
            let mut queue = std::mem::take(&mut self.st.sessions.get_mut(&key).expect("session").queue);
            for turn in queue.iter_mut().filter(|t| due_at(t.keepalive_at)) {
                self.keep_alive(now, turn);
            }
            let session = self.st.sessions.get_mut(&key).expect("session");
            session.queue = queue;
            if self.expire_usage_wait(now, &key) {
                continue;
            }
            let session = self.st.sessions.get_mut(&key).expect("session");
            let Some(mut turn) = session.current.take() else { continue };
            if due_at(turn.keepalive_at) {
                self.keep_alive(now, &mut turn);
            }
            let (timed_out, orphaned) = (due_at(turn.deadline), due_at(turn.orphan_deadline));
            self.st.sessions.get_mut(&key).expect("session").current = Some(turn);
            if timed_out {
                let secs = self.settings.turn_timeout.as_secs();
                let msg = format!("Claude did not finish the turn within {secs} s; it was interrupted");
                self.interrupt(now, &key, Some(ApiError::new(504, "turn_timeout", msg)));
            } else if orphaned {
                self.interrupt(now, &key, None);
            }
        }
    }

    /// Abort the turn in flight with one ESC (no Stop hook follows), answer it with `err`,
    /// and let the process settle before the next turn.
    pub(super) fn interrupt(&mut self, now: Instant, key: &str, err: Option<ApiError>) {
        let Some(mut turn) = self.st.sessions.get_mut(key).and_then(|s| s.current.take()) else { return };
        log::info!("session {key}: interrupting {}", turn.chat_id);
        self.st.sessions.get_mut(key).expect("session").interrupted = Some(turn.chat_id.clone());
        if let Some(pid) = self.st.sessions[key].proc {
            self.push(Output::WriteTerminal { proc: pid, data: "\x1b".into() });
            if let Some(p) = self.st.procs.get_mut(&pid) {
                p.settle_until = Some(now + self.settings.settle);
                p.idle_since = now;
            }
        }
        self.count_turn(now, &turn, err.as_ref().map_or(metrics::ABANDONED, |e| e.code.as_str()));
        if let Some(err) = err {
            self.answer(&mut turn, &Answer::Error(err));
        }
        self.maybe_finish_shutdown(now);
        self.deliver_next(now, key);
    }

    /// A client went away. A queued turn nobody waits for is dropped (it never reached Claude);
    /// a turn in flight nobody waits for is interrupted after `retry_grace`, unless a retry of
    /// the same request attaches to it first.
    pub(super) fn on_conn_closed(&mut self, now: Instant, conn: ConnId) {
        let Some(key) = self.st.waiting.remove(&conn) else { return };
        let grace = self.settings.retry_grace;
        let Some(session) = self.st.sessions.get_mut(&key) else { return };
        for turn in session.current.iter_mut().chain(session.queue.iter_mut()) {
            turn.listeners.retain(|l| l.conn != conn);
        }
        let (kept, dropped): (VecDeque<Turn>, VecDeque<Turn>) =
            std::mem::take(&mut session.queue).into_iter().partition(|t| !t.listeners.is_empty());
        session.queue = kept;
        for turn in &dropped {
            self.count_turn(now, turn, metrics::ABANDONED);
        }
        let Some(session) = self.st.sessions.get_mut(&key) else { return };
        if let Some(turn) = session.current.as_mut().filter(|t| t.listeners.is_empty() && !t.awaits_client()) {
            log::info!("session {key}: the client of {} left", turn.chat_id);
            turn.orphan_deadline = Some(now + grace);
            turn.keepalive_at = None;
        }
    }
}
