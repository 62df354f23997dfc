//! Sessions and their turns: one turn in flight per session, the rest wait in a FIFO, so
//! Claude never merges two messages into one turn.

use std::collections::VecDeque;
use std::time::Instant;

use super::process::ACK_TIMEOUT;
use super::{ConnId, Engine, Output, ProcId, SessionRecord};
use crate::wire::bridge::ToChannel;
use crate::wire::http::Response;
use crate::wire::openai::{self, ApiError, Completion};

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
}

pub struct Turn {
    pub conn: ConnId,
    pub stream: bool,
    pub include_usage: bool,
    pub completion: Completion,
    /// The text delivered to Claude as one channel message.
    pub content: String,
    pub chat_id: String,
    /// Reply texts so far (non-streamed answers are sent whole at the end).
    pub replies: Vec<String>,
    /// Set at delivery: when the turn is interrupted and answered 504.
    pub deadline: Option<Instant>,
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
        }
    }

    pub fn restored(r: SessionRecord) -> Self {
        let mut s = Session::new(r.key, r.uuid, r.created);
        s.last_used = r.last_used;
        s
    }

    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            key: self.key.clone(),
            uuid: self.uuid.clone(),
            created: self.created,
            last_used: self.last_used,
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().and_then(|t| t.deadline)
    }

    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty()
    }
}

/// How a turn ends.
pub enum Answer {
    Text(String),
    Error(ApiError),
}

impl Engine {
    /// Queue a turn for `key`, making sure a process is (or will be) there to take it.
    pub(super) fn admit(&mut self, now: Instant, key: &str, mut turn: Turn) -> Result<(), ApiError> {
        let session = self.sessions.get_mut(key).expect("session exists");
        if session.queue.len() >= self.settings.queue_depth {
            return Err(ApiError::new(
                429,
                "session_queue_full",
                format!("{} requests are already waiting for this session; retry later", session.queue.len()),
            )
            .retry_after(5));
        }
        self.ensure_process(now, key)?;
        let session = self.sessions.get_mut(key).expect("session exists");
        session.turns += 1;
        session.last_used = turn.completion.created;
        self.sessions_dirty = true;
        turn.chat_id = format!("chat-{}", session.turns);
        let (conn, stream, role) = (turn.conn, turn.stream, openai::role_chunk(&turn.completion));
        session.queue.push_back(turn);
        self.waiting.insert(conn, key.to_string());
        if stream {
            // Headers and the role chunk at once: OpenClaw's first-event watchdog starts now.
            self.push(Output::StreamStart { conn });
            self.push(Output::StreamData { conn, data: role });
        }
        self.deliver_next(now, key);
        Ok(())
    }

    /// Deliver the next queued turn if the session's process is ready and free.
    pub(super) fn deliver_next(&mut self, now: Instant, key: &str) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.current.is_some() || session.queue.is_empty() {
            return;
        }
        let Some(pid) = session.proc else { return };
        let Some(bridge) = self.procs.get(&pid).and_then(|p| p.accepting_bridge(now)) else {
            return;
        };
        let mut turn = session.queue.pop_front().expect("queue not empty");
        turn.deadline = Some(now + self.settings.turn_timeout);
        let frame = ToChannel::Deliver { chat_id: turn.chat_id.clone(), content: turn.content.clone() };
        log::info!("session {key}: delivering {} to process {pid}", turn.chat_id);
        session.current = Some(turn);
        self.push(Output::Bridge { conn: bridge, frame });
        let p = self.procs.get_mut(&pid).expect("process of the session");
        p.turns += 1;
        if !p.channel_proven {
            p.deliveries = 1;
            p.redeliver_at = Some(now + ACK_TIMEOUT);
        }
    }

    /// A `reply` tool call arrived for the session's turn in flight.
    pub(super) fn on_reply(&mut self, key: &str, chat_id: &str, text: String) {
        let Some(turn) = self.sessions.get_mut(key).and_then(|s| s.current.as_mut()) else {
            log::warn!("session {key}: reply for {chat_id} outside a turn, dropped");
            return;
        };
        if turn.chat_id != chat_id {
            log::warn!("session {key}: reply names {chat_id}, turn is {}; attributed to the turn", turn.chat_id);
        }
        if turn.stream {
            let sep = if turn.replies.is_empty() { "" } else { "\n\n" };
            let data = openai::content_chunk(&turn.completion, &format!("{sep}{text}"));
            let conn = turn.conn;
            turn.replies.push(text);
            self.push(Output::StreamData { conn, data });
        } else {
            turn.replies.push(text);
        }
    }

    /// End the turn in flight with `answer` and move on to the next one.
    pub(super) fn end_turn(&mut self, now: Instant, key: &str, answer: Answer) {
        let Some(turn) = self.sessions.get_mut(key).and_then(|s| s.current.take()) else {
            return;
        };
        if let Some(pid) = self.sessions[key].proc {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.idle_since = now;
            }
        }
        self.answer(turn, answer);
        self.deliver_next(now, key);
        self.maybe_finish_shutdown(now);
    }

    /// Send a turn's answer to its client (if the client is still there).
    pub(super) fn answer(&mut self, turn: Turn, answer: Answer) {
        if self.waiting.remove(&turn.conn).is_none() {
            return; // client gone
        }
        let conn = turn.conn;
        let c = &turn.completion;
        match (turn.stream, answer) {
            (true, Answer::Text(_)) => {
                let data = openai::stream_end(c, turn.include_usage);
                self.push(Output::StreamData { conn, data });
                self.push(Output::StreamEnd { conn });
            }
            (true, Answer::Error(e)) => {
                log::warn!("{}: {} {}", c.id, e.status, e.message);
                self.push(Output::StreamData { conn, data: openai::stream_error(&e) });
                self.push(Output::StreamEnd { conn });
            }
            (false, Answer::Text(text)) => {
                let response = Response::json(200, openai::completion_json(c, &text));
                self.push(Output::Respond { conn, response });
            }
            (false, Answer::Error(e)) => {
                log::warn!("{}: {} {}", c.id, e.status, e.message);
                self.push(Output::Respond { conn, response: error_response(&e) });
            }
        }
    }

    /// Fail every turn of a session that has not reached Claude.
    pub(super) fn fail_queued(&mut self, key: &str, err: &ApiError) {
        let queued: Vec<Turn> = match self.sessions.get_mut(key) {
            Some(s) => s.queue.drain(..).collect(),
            None => return,
        };
        for turn in queued {
            self.answer(turn, Answer::Error(err.clone()));
        }
    }

    pub(super) fn fail_all_queued(&mut self) {
        let err = ApiError::new(503, "shutting_down", "synthesis is shutting down; retry shortly").retry_after(5);
        let keys: Vec<String> = self.sessions.keys().cloned().collect();
        for key in keys {
            self.fail_queued(&key, &err);
        }
    }

    /// Turns past `turn_timeout`: interrupt Claude and answer 504.
    pub(super) fn expire_turns(&mut self, now: Instant) {
        let expired: Vec<String> =
            self.sessions.values().filter(|s| s.deadline().is_some_and(|d| now >= d)).map(|s| s.key.clone()).collect();
        for key in expired {
            let secs = self.settings.turn_timeout.as_secs();
            let err = ApiError::new(
                504,
                "turn_timeout",
                format!("Claude did not finish the turn within {secs} s; it was interrupted"),
            );
            self.interrupt(now, &key, Some(err));
        }
    }

    /// Abort the turn in flight with one ESC (no Stop hook follows), answer it with `err`
    /// (or nobody, when the client left), and let the process settle before the next turn.
    pub(super) fn interrupt(&mut self, now: Instant, key: &str, err: Option<ApiError>) {
        let Some(turn) = self.sessions.get_mut(key).and_then(|s| s.current.take()) else {
            return;
        };
        log::info!("session {key}: interrupting {}", turn.chat_id);
        if let Some(pid) = self.sessions[key].proc {
            self.push(Output::WriteTerminal { proc: pid, data: "\x1b".into() });
            if let Some(p) = self.procs.get_mut(&pid) {
                p.settle_until = Some(now + self.settings.settle);
                p.idle_since = now;
            }
        }
        match err {
            Some(e) => self.answer(turn, Answer::Error(e)),
            None => {
                self.waiting.remove(&turn.conn);
            }
        }
        self.maybe_finish_shutdown(now);
    }

    /// The client of a turn went away: drop it if queued, interrupt it if in flight.
    pub(super) fn on_conn_closed(&mut self, now: Instant, conn: ConnId) {
        let Some(key) = self.waiting.remove(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if session.current.as_ref().is_some_and(|t| t.conn == conn) {
            self.waiting.insert(conn, key.clone());
            self.interrupt(now, &key, None);
            self.deliver_next(now, &key);
        } else {
            session.queue.retain(|t| t.conn != conn);
            log::info!("session {key}: client left before its turn was delivered");
        }
    }
}

pub fn error_response(e: &ApiError) -> Response {
    let mut r = Response::json(e.status, e.body());
    if let Some(secs) = e.retry_after {
        r.headers.push(("retry-after".into(), secs.to_string()));
    }
    r
}
