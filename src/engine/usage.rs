//! Token usage from claude's transcript, and waiting for it at the end of a turn.
//!
//! The shell reads a claude's transcript before it feeds that process's Stop hook (and its
//! client-tool and permission requests, which end a response too) and hands the engine what it
//! found (`Input::Usage`). Claude Code writes the transcript in batches, so the turn's last API
//! call can land ~100–200 ms after the Stop hook (measured on 2.1.332: in a third to half of the turns).
//! When the transcript does not show the turn's answer yet, the Stop hook is answered at once
//! (claude goes on) but the response waits: the engine asks the shell to read again every
//! `REREAD` until the answer's line is there, for at most `USAGE_WAIT`; then the response goes
//! out with what was read. Calls read after their turn ended still count in the metrics.

use std::time::{Duration, Instant};

use super::turn::{Answer, Turn};
use super::{Engine, Output, ProcId, TranscriptRead};

/// Longest a finished turn's response waits for its last API call to appear in the transcript.
pub const USAGE_WAIT: Duration = Duration::from_millis(500);
/// How often the transcript is read again meanwhile.
const REREAD: Duration = Duration::from_millis(20);

impl Turn {
    /// Claude has ended the turn (Stop) and its response waits for the transcript.
    pub fn awaits_usage(&self) -> bool {
        self.usage_until.is_some()
    }
}

impl Engine {
    pub(super) fn on_usage(&mut self, now: Instant, id: ProcId, read: TranscriptRead) {
        let Some(p) = self.st.procs.get_mut(&id) else { return };
        p.transcript_read = true;
        let key = p.session.clone();
        let mut complete = false;
        for (chat_id, usage) in &read.usage {
            self.st.metrics.usage.add(usage);
            let turn = self.st.sessions.get_mut(&key).and_then(|s| s.current.as_mut());
            match turn {
                Some(t) if chat_id.as_deref() == Some(t.chat_id.as_str()) => t.usage.add(usage),
                _ => log::debug!(
                    "session {key}: {} API calls of {} read after that turn ended",
                    usage.calls,
                    chat_id.as_deref().unwrap_or("no turn")
                ),
            }
        }
        if let Some(turn) = self.st.sessions.get_mut(&key).and_then(|s| s.current.as_mut()) {
            if read.answered.as_deref() == Some(turn.chat_id.as_str()) {
                turn.usage_complete = true;
                complete = turn.awaits_usage();
                if let Some(until) = turn.usage_until.filter(|_| complete) {
                    let waited = (now + USAGE_WAIT).saturating_duration_since(until).as_millis();
                    log::debug!(
                        "session {key}: the transcript showed {}'s answer {waited} ms after Stop",
                        turn.chat_id
                    );
                }
            }
        }
        if complete {
            self.end_stopped_turn(now, &key);
        }
    }

    /// Claude ended the turn: answer now, or (when the transcript is read but does not show the
    /// turn's answer yet) wait for it.
    pub(super) fn finish_turn(&mut self, now: Instant, id: ProcId, key: &str) {
        let transcript_read = self.st.procs.get(&id).is_some_and(|p| p.transcript_read);
        let Some(turn) = self.st.sessions.get_mut(key).and_then(|s| s.current.as_mut()) else { return };
        if !transcript_read || turn.usage_complete {
            return self.end_stopped_turn(now, key);
        }
        // Claude is done with it: no interrupt, time-out or keep-alive any more.
        turn.usage_until = Some(now + USAGE_WAIT);
        turn.reread_at = Some(now + REREAD);
        turn.deadline = None;
        turn.orphan_deadline = None;
        turn.keepalive_at = None;
    }

    /// The answer of a turn Claude has ended: everything it said.
    pub(super) fn end_stopped_turn(&mut self, now: Instant, key: &str) {
        let Some(turn) = self.st.sessions.get(key).and_then(|s| s.current.as_ref()) else { return };
        let text = turn.replies.join("\n\n");
        self.end_turn(now, key, Answer::Text(text));
    }

    /// Deadlines of a turn waiting for its usage; true if it is one.
    pub(super) fn expire_usage_wait(&mut self, now: Instant, key: &str) -> bool {
        let Some(s) = self.st.sessions.get_mut(key) else { return false };
        let proc = s.proc;
        let Some(turn) = s.current.as_mut().filter(|t| t.awaits_usage()) else { return false };
        if turn.usage_until.is_some_and(|t| now >= t) {
            log::info!(
                "session {key}: the transcript does not show {}'s answer after {} ms; its usage may be short",
                turn.chat_id,
                USAGE_WAIT.as_millis()
            );
            self.end_stopped_turn(now, key);
        } else if turn.reread_at.is_some_and(|t| now >= t) {
            turn.reread_at = Some(now + REREAD);
            if let Some(proc) = proc {
                self.push(Output::ReadTranscript { proc });
            }
        }
        true
    }
}
