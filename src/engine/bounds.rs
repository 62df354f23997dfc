//! Limits on what the outside can make the engine keep: session keys, aliases, the retry
//! cache; constant-time token comparison; and a count of everything the engine holds.

use std::collections::VecDeque;
use std::time::Instant;

use super::session::{Recent, RECENT_TTL};
use super::{Engine, Usage};
use crate::wire::openai::ApiError;

/// Longest session key accepted (OpenClaw's are `<uuid>:<N>`, about 40 bytes).
pub const MAX_KEY_LEN: usize = 256;
/// Later keys remembered per session (`<id>:<N+1>` after compactions); older ones are dropped.
const MAX_ALIASES: usize = 8;
/// Finished answers kept per session for identical retries (besides `RECENT_TTL`)...
pub const RECENT_MAX: usize = 64;
/// ... and their total size; the newest answer is always kept.
pub const RECENT_MAX_BYTES: usize = 1 << 20;

/// A session key from a request, refused when it is too long to be one.
pub fn check_key(key: &str) -> Result<(), ApiError> {
    if key.len() > MAX_KEY_LEN {
        let msg = format!("session key of {} bytes; at most {MAX_KEY_LEN} are accepted", key.len());
        return Err(ApiError::new(400, "session_key_too_long", msg));
    }
    Ok(())
}

pub fn add_alias(aliases: &mut Vec<String>, key: &str) {
    aliases.push(key.to_string());
    let extra = aliases.len().saturating_sub(MAX_ALIASES);
    aliases.drain(..extra);
}

/// Keep `text` as the answer to the request with `fingerprint`, newest first, within
/// `RECENT_TTL`, `RECENT_MAX` answers and `RECENT_MAX_BYTES`.
pub fn remember(recent: &mut VecDeque<Recent>, fingerprint: u64, answer: String, usage: Usage, now: Instant) {
    recent.retain(|r| r.fingerprint != fingerprint && now.duration_since(r.at) < RECENT_TTL);
    recent.push_front(Recent { fingerprint, answer, usage, at: now });
    recent.truncate(RECENT_MAX);
    let mut bytes: usize = recent.iter().map(|r| r.answer.len()).sum();
    while bytes > RECENT_MAX_BYTES && recent.len() > 1 {
        bytes -= recent.pop_back().map_or(0, |r| r.answer.len());
    }
}

/// Compare secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(std::hint::black_box(x ^ y));
    }
    diff == 0
}

/// How much the engine holds: every count here is bounded (checked by the fuzz tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub sessions: usize,
    pub processes: usize,
    /// Client connections waiting for an answer.
    pub waiting: usize,
    /// Bound bridge connections.
    pub bridges: usize,
    pub slot_waiters: usize,
    /// Turns queued behind a turn in flight, over all sessions.
    pub queued: usize,
    pub aliases: usize,
    /// Answers kept for retries, and their bytes, over all sessions.
    pub recent_answers: usize,
    pub recent_bytes: usize,
}

impl Engine {
    /// Whether the bridge connection `conn` is bound to a process (its `hello` was accepted).
    pub fn bridge_bound(&self, conn: super::ConnId) -> bool {
        self.st.bridges.contains_key(&conn)
    }

    pub fn stats(&self) -> Stats {
        let sessions = self.st.sessions.values();
        Stats {
            sessions: self.st.sessions.len(),
            processes: self.st.procs.len(),
            waiting: self.st.waiting.len(),
            bridges: self.st.bridges.len(),
            slot_waiters: self.st.slot_waiters.len(),
            queued: sessions.clone().map(|s| s.queue.len()).sum(),
            aliases: sessions.clone().map(|s| s.aliases.len()).sum(),
            recent_answers: sessions.clone().map(|s| s.recent.len()).sum(),
            recent_bytes: sessions.flat_map(|s| &s.recent).map(|r| r.answer.len()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_secrets() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn aliases_keep_the_newest() {
        let mut a = Vec::new();
        for i in 0..20 {
            add_alias(&mut a, &format!("k:{i}"));
        }
        assert_eq!(a.len(), MAX_ALIASES);
        assert_eq!(a.last().map(String::as_str), Some("k:19"));
    }
}
