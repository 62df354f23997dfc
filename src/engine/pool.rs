//! The pool of claude processes: who gets a slot, who is stopped to make room, warm spares, and
//! the host's memory. Claude is the expensive part (~280 MiB each), so a slot needs both room
//! under `max_processes` and memory above `min_free_memory`; memory readings come in as inputs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::process::ProcState;
use super::session::Session;
use super::{Engine, ProcId};
use crate::wire::openai::ApiError;

/// What one claude costs before any has been measured (Claude Code 2.1.332: 271–287 MiB).
pub const CLAUDE_ESTIMATE: u64 = 300 << 20;
/// After a spare failed to start, wait this long before starting another.
const SPARE_RETRY: Duration = Duration::from_secs(30);
/// Spares live in the session map under this prefix (a control character no client key has).
const SPARE_PREFIX: &str = "\u{1}spare-";

/// The latest memory reading, plus what happened since it was taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Bytes available to us: the tighter of MemAvailable and the cgroup's room.
    pub available: u64,
    /// Resident bytes of each claude's process group.
    pub groups: BTreeMap<ProcId, u64>,
    /// Claudes started since the reading (not in `available` yet).
    spawned: u64,
    /// Bytes of claudes reaped since the reading (back in `available` soon).
    freed: u64,
}

impl Memory {
    /// Available memory as it will be once the started claudes have grown and the reaped ones
    /// are gone.
    fn predicted(&self, claude: u64) -> u64 {
        (self.available + self.freed).saturating_sub(self.spawned * claude)
    }
}

pub fn is_spare_key(key: &str) -> bool {
    key.starts_with(SPARE_PREFIX)
}

impl Engine {
    /// What one more claude will take: the largest one measured, else an estimate.
    fn claude_size(&self) -> u64 {
        self.st.memory.as_ref().and_then(|m| m.groups.values().max().copied()).unwrap_or(CLAUDE_ESTIMATE)
    }

    /// Room for one more claude: a slot under `max_processes` and memory above the floor.
    fn has_room(&self) -> bool {
        self.st.procs.len() < self.settings.max_processes && self.memory_allows_one_more()
    }

    fn memory_allows_one_more(&self) -> bool {
        let floor = self.settings.min_free_memory;
        let size = self.claude_size();
        floor == 0 || self.st.memory.as_ref().is_none_or(|m| m.predicted(size) >= floor + size)
    }

    /// Processes told to stop and not yet reaped: slots (and memory) on their way back.
    fn freeing(&self) -> usize {
        self.st.procs.values().filter(|p| p.state == ProcState::Stopping).count()
    }

    /// Resident bytes of a claude at the last reading (0 before it was measured).
    fn weight(&self, id: ProcId) -> u64 {
        self.st.memory.as_ref().and_then(|m| m.groups.get(&id).copied()).unwrap_or(0)
    }

    /// Whether `n` waiting sessions will have room once the stopping claudes, plus `extra`
    /// more (and their `extra_bytes`), are gone.
    fn room_for(&self, n: usize, extra: usize, extra_bytes: u64) -> bool {
        let slots = self.st.procs.len() - self.freeing() - extra + n <= self.settings.max_processes;
        let floor = self.settings.min_free_memory;
        let Some(m) = self.st.memory.as_ref().filter(|_| floor > 0) else { return slots };
        let size = self.claude_size();
        let stopping: u64 =
            self.st.procs.iter().filter(|(_, p)| p.state == ProcState::Stopping).map(|(id, _)| self.weight(*id)).sum();
        slots && m.predicted(size) + stopping + extra_bytes >= floor + size * n as u64
    }

    /// Make sure the session has a process, or a place in the queue for the next free slot.
    pub(super) fn ensure_process(&mut self, now: Instant, key: &str) -> Result<(), ApiError> {
        let live = |e: &Engine| {
            let s = &e.st.sessions[key];
            s.proc.is_some_and(|p| e.st.procs.get(&p).is_some_and(|p| p.state != ProcState::Stopping))
        };
        if live(self) || self.st.sessions[key].wants_slot {
            return Ok(());
        }
        let s = &self.st.sessions[key];
        if s.proc.is_none() && s.claude_fresh && self.take_spare(now, key) {
            self.refill_spares(now);
            return Ok(());
        }
        self.st.sessions.get_mut(key).expect("session").wants_slot = true;
        self.st.slot_waiters.push_back(key.to_string());
        self.rebalance(now);
        // Refused by `rebalance` (no room can come for it) unless started or still in line.
        if live(self) || self.st.slot_waiters.iter().any(|k| k == key) {
            return Ok(());
        }
        Err(self.no_room_error())
    }

    fn no_room_error(&self) -> ApiError {
        if self.st.procs.len() < self.settings.max_processes {
            let floor = self.settings.min_free_memory >> 20;
            let avail = self.st.memory.as_ref().map_or(0, |m| m.available >> 20);
            let size = self.claude_size() >> 20;
            let msg = format!(
                "not enough memory for another claude (~{size} MiB): {avail} MiB available, min_free_memory is \
                 {floor} MiB, and no idle claude can be stopped; retry shortly"
            );
            return ApiError::new(503, "insufficient_memory", msg).retry_after(10);
        }
        let max = self.settings.max_processes;
        let msg = format!("all {max} claude processes (max_processes) are busy with turns; retry shortly");
        ApiError::new(503, "pool_busy", msg).retry_after(5)
    }

    /// Give slots to waiting sessions in arrival order, stopping idle claudes (spares first, then
    /// the least recently used) when that makes room for every waiter; when nothing can, the
    /// newest waiter is refused. Then keep the spares topped up.
    pub(super) fn rebalance(&mut self, now: Instant) {
        while let Some(key) = self.st.slot_waiters.front().cloned() {
            let Some(s) = self.st.sessions.get(&key) else {
                self.st.slot_waiters.pop_front();
                continue;
            };
            if s.proc.is_some() {
                break; // its previous claude is still stopping: the session cannot run twice
            }
            if self.has_room() {
                self.st.slot_waiters.pop_front();
                self.st.sessions.get_mut(&key).expect("session").wants_slot = false;
                self.spawn(now, &key);
                continue;
            }
            if self.make_room(now) {
                break;
            }
            let newest = self.st.slot_waiters.pop_back().expect("a waiter");
            let err = self.no_room_error();
            log::warn!("session {newest}: {}", err.message);
            if let Some(s) = self.st.sessions.get_mut(&newest) {
                s.wants_slot = false;
            }
            self.fail_queued(now, &newest, &err);
        }
        self.refill_spares(now);
    }

    /// Stop idle claudes until every waiter has room on its way; false (and nothing stopped)
    /// when even stopping all of them would not do.
    fn make_room(&mut self, now: Instant) -> bool {
        let n = self.st.slot_waiters.len();
        if self.room_for(n, 0, 0) {
            return true;
        }
        let victims = self.eviction_order();
        let bytes = victims.iter().map(|id| self.weight(*id)).sum();
        if !self.room_for(n, victims.len(), bytes) {
            return false;
        }
        for victim in victims {
            if self.room_for(n, 0, 0) {
                break;
            }
            self.stop_process(now, victim, "stopped to make room for a waiting session");
        }
        true
    }

    /// Idle claudes in the order they may be stopped: spares, then least recently used.
    fn eviction_order(&self) -> Vec<ProcId> {
        let idle = |p: &super::process::Process| {
            p.state != ProcState::Stopping
                && self.st.sessions.get(&p.session).is_none_or(Session::is_idle)
                && !self.st.slot_waiters.contains(&p.session)
        };
        let mut order: Vec<(bool, Instant, ProcId)> = self
            .st
            .procs
            .iter()
            .filter(|(_, p)| idle(p) && (is_spare_key(&p.session) || p.state == ProcState::Ready))
            .map(|(id, p)| (!is_spare_key(&p.session), p.idle_since, *id))
            .collect();
        order.sort();
        order.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Hand a warm spare to a new session: its first turn needs no spawn.
    fn take_spare(&mut self, now: Instant, key: &str) -> bool {
        let state = |k: &String| self.st.sessions[k].proc.and_then(|p| self.st.procs.get(&p)).map(|p| p.state);
        let spares: Vec<&String> = self.st.sessions.keys().filter(|k| is_spare_key(k)).collect();
        // A ready spare first, else one still starting.
        let pick = [ProcState::Ready, ProcState::Starting]
            .into_iter()
            .find_map(|want| spares.iter().find(|k| state(k) == Some(want)).map(|k| (*k).clone()));
        let Some(spare_key) = pick else {
            return false;
        };
        let spare = self.st.sessions.remove(&spare_key).expect("spare");
        let id = spare.proc.expect("a spare has a process");
        log::info!("session {key}: takes the warm spare process {id} (claude session {})", spare.uuid);
        let s = self.st.sessions.get_mut(key).expect("session");
        s.uuid = spare.uuid;
        s.proc = Some(id);
        self.st.procs.get_mut(&id).expect("spare process").session = key.to_string();
        // The map must name the Claude session the conversation now lives in: a new session's
        // request saves the map as soon as it is admitted (`chat_turn`), anything else at the sweep.
        self.st.sessions_dirty = true;
        self.st.spare_at = Some(now);
        true
    }

    /// Start spares until `spare_processes` are up, when nobody waits and there is room.
    pub(super) fn refill_spares(&mut self, now: Instant) {
        if self.shutting_down() {
            self.st.spare_at = None; // no more spares: a deadline left here would fire forever
            return;
        }
        if self.st.spare_at.is_some_and(|t| now < t) {
            return;
        }
        self.st.spare_at = None;
        let spares = self.st.sessions.keys().filter(|k| is_spare_key(k)).count();
        for _ in spares..self.settings.spare_processes {
            if !self.st.slot_waiters.is_empty() || !self.has_room() {
                return;
            }
            let key = format!("{SPARE_PREFIX}{}", self.st.next_proc);
            let mut s = Session::new(key.clone(), self.ids.uuid(), self.st.unix_secs);
            s.ephemeral = true; // never saved
            self.st.sessions.insert(key.clone(), s);
            self.spawn(now, &key);
        }
    }

    /// A spare died or failed before it was used: forget it, and wait before the next one.
    pub(super) fn spare_lost(&mut self, now: Instant, key: &str) {
        if is_spare_key(key) {
            self.st.sessions.remove(key);
            self.st.spare_at = Some(now + SPARE_RETRY);
        }
    }

    /// A memory reading from the shell. Below the floor, idle claudes are stopped (spares
    /// first) until the floor is kept; never one with a turn in flight or queued.
    pub(super) fn on_memory(&mut self, now: Instant, available: u64, groups: Vec<(ProcId, u64)>) {
        self.st.memory = Some(Memory { available, groups: groups.into_iter().collect(), spawned: 0, freed: 0 });
        let floor = self.settings.min_free_memory;
        let mut predicted = available;
        let mut victims = self.eviction_order().into_iter();
        while floor > 0 && predicted < floor {
            let Some(victim) = victims.next() else {
                log::warn!(
                    "memory: {} MiB available, under min_free_memory, and every claude is busy",
                    available >> 20
                );
                break;
            };
            predicted += self.weight(victim);
            self.stop_process(now, victim, &format!("{} MiB available is under min_free_memory", available >> 20));
        }
        self.rebalance(now);
    }

    /// Book-keeping between readings: a claude started, or one was reaped.
    pub(super) fn memory_spawned(&mut self) {
        if let Some(m) = &mut self.st.memory {
            m.spawned += 1;
        }
    }

    pub(super) fn memory_freed(&mut self, id: ProcId) {
        if let Some(m) = &mut self.st.memory {
            m.freed += m.groups.remove(&id).unwrap_or(0);
        }
    }
}
