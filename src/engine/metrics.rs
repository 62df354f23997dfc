//! Counters and histograms for `GET /metrics`. The engine keeps them (time is passed in, like
//! everywhere here) and they are part of its exported state, so an in-place upgrade keeps them;
//! the shell adds what only /proc knows and renders the Prometheus text (`MetricsReport::render`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::process::ProcState;
use super::turn::Turn;
use super::{Engine, Usage};
use crate::wire::prometheus::Writer;

/// Upper bounds (ms) of the turn-duration buckets: from an instant answer to the default turn_timeout.
const TURN_BUCKETS_MS: &[u64] =
    &[250, 500, 1000, 2000, 5000, 10_000, 20_000, 30_000, 60_000, 120_000, 300_000, 600_000, 1_800_000, 3_600_000];
/// Upper bounds (ms) of the spawn → ready buckets: ~1–1.3 s is normal, ready_timeout is 15 s.
const SPAWN_BUCKETS_MS: &[u64] = &[250, 500, 1000, 1500, 2000, 3000, 5000, 10_000, 15_000, 30_000];

/// How a turn ended, for `synthesis_turns_total{outcome}`: `ok`, `abandoned` (every client left
/// and it was interrupted or dropped), or the error code of the answer (`turn_timeout`,
/// `claude_exited`, `claude_api_error`, `shutting_down`, ...: the codes of the README's
/// troubleshooting table).
pub const OK: &str = "ok";
pub const ABANDONED: &str = "abandoned";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    bounds_ms: Vec<u64>,
    /// Observations per bucket (not cumulative); one more than `bounds_ms`, for +Inf.
    counts: Vec<u64>,
    sum_us: u64,
}

impl Histogram {
    fn new(bounds_ms: &[u64]) -> Self {
        Histogram { bounds_ms: bounds_ms.to_vec(), counts: vec![0; bounds_ms.len() + 1], sum_us: 0 }
    }

    pub fn observe(&mut self, d: Duration) {
        let ms = d.as_millis() as u64;
        let i = self.bounds_ms.iter().position(|&b| ms <= b).unwrap_or(self.bounds_ms.len());
        self.counts[i] += 1;
        self.sum_us = self.sum_us.saturating_add(d.as_micros() as u64);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn write(&self, w: &mut Writer, name: &str, help: &str) {
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = self
            .bounds_ms
            .iter()
            .zip(&self.counts)
            .map(|(&b, &c)| {
                cumulative += c;
                (b as f64 / 1000.0, cumulative)
            })
            .collect();
        w.histogram(name, help, &buckets, self.count(), self.sum_us as f64 / 1e6);
    }
}

/// What the engine counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Turns ended, by outcome.
    pub turns: BTreeMap<String, u64>,
    /// Delivery to Claude → end, for turns that reached Claude.
    pub turn_duration: Histogram,
    /// Spawn → channel ready.
    pub spawn_duration: Histogram,
    /// Channel messages delivered again because claude had not taken them.
    pub deliveries_repeated: u64,
    /// Claude's API calls, from the transcripts (including calls read after their turn ended).
    pub usage: Usage,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            turns: BTreeMap::new(),
            turn_duration: Histogram::new(TURN_BUCKETS_MS),
            spawn_duration: Histogram::new(SPAWN_BUCKETS_MS),
            deliveries_repeated: 0,
            usage: Usage::default(),
        }
    }
}

/// `GET /metrics` as the engine sees it; the shell adds the /proc figures and renders it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReport {
    pub metrics: Metrics,
    /// Claude processes by state: `starting`, `idle`, `busy` (a turn in flight or queued), `stopping`.
    pub processes: BTreeMap<String, u64>,
    pub sessions: u64,
    /// Pids of the claude processes (each leads its own process group).
    pub claude_pids: Vec<u32>,
    pub save_failing: bool,
    pub shutting_down: bool,
}

/// What only the shell can measure, from /proc.
#[derive(Debug, Clone, Default)]
pub struct HostFigures {
    /// Resident memory of every process in the claude process groups.
    pub claude_rss_bytes: u64,
    pub rss_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub cpu_seconds: f64,
}

impl MetricsReport {
    /// The Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, host: &HostFigures) -> String {
        let m = &self.metrics;
        let mut w = Writer::default();
        w.family("synthesis_build_info", "gauge", "The running synthesis version.");
        w.sample("synthesis_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);

        let name = "synthesis_turns_total";
        w.family(
            name,
            "counter",
            "Turns ended, by outcome: ok, abandoned (every client left), or the error code answered.",
        );
        if !m.turns.contains_key(OK) {
            w.sample(name, &[("outcome", OK)], 0.0);
        }
        for (outcome, n) in &m.turns {
            w.sample(name, &[("outcome", outcome)], *n as f64);
        }
        m.turn_duration.write(
            &mut w,
            "synthesis_turn_duration_seconds",
            "Time from delivering a message to Claude to the end of its turn.",
        );
        m.spawn_duration.write(
            &mut w,
            "synthesis_claude_spawn_duration_seconds",
            "Time from starting a claude process to its channel being ready.",
        );
        let name = "synthesis_claude_processes";
        w.family(name, "gauge", "Claude processes, by state (busy: a turn in flight or queued).");
        for state in ["starting", "idle", "busy", "stopping"] {
            w.sample(name, &[("state", state)], self.processes.get(state).copied().unwrap_or(0) as f64);
        }
        w.single(
            "synthesis_sessions",
            "gauge",
            "Sessions known (each maps to a Claude Code session).",
            self.sessions as f64,
        );
        w.single(
            "synthesis_claude_resident_memory_bytes",
            "gauge",
            "Resident memory of every process in the claude process groups (claude, its channel, its tools).",
            host.claude_rss_bytes as f64,
        );
        w.single(
            "synthesis_deliveries_repeated_total",
            "counter",
            "Channel messages delivered again because claude had not taken them into a turn.",
            m.deliveries_repeated as f64,
        );
        let name = "synthesis_tokens_total";
        w.family(name, "counter", "Tokens of Claude's API calls, from its transcripts.");
        let u = &m.usage;
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_read", u.cache_read_input_tokens),
            ("cache_creation", u.cache_creation_input_tokens),
        ] {
            w.sample(name, &[("kind", kind)], n as f64);
        }
        w.single("synthesis_api_calls_total", "counter", "Claude's API calls, from its transcripts.", u.calls as f64);
        w.single(
            "synthesis_session_map_save_failing",
            "gauge",
            "1 while the session map cannot be saved (see save_error in /status).",
            f64::from(u8::from(self.save_failing)),
        );
        w.single(
            "synthesis_shutting_down",
            "gauge",
            "1 once a shutdown signal has arrived.",
            f64::from(u8::from(self.shutting_down)),
        );
        w.single("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", host.rss_bytes as f64);
        w.single(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            host.start_time_seconds,
        );
        w.single("process_open_fds", "gauge", "Number of open file descriptors.", host.open_fds as f64);
        w.single(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            host.cpu_seconds,
        );
        w.finish()
    }
}

impl Engine {
    pub(super) fn metrics_report(&self) -> MetricsReport {
        let mut processes = BTreeMap::new();
        for p in self.st.procs.values() {
            let state = match p.state {
                ProcState::Starting => "starting",
                ProcState::Ready if self.st.sessions.get(&p.session).is_some_and(|s| !s.is_idle()) => "busy",
                ProcState::Ready => "idle",
                ProcState::Stopping => "stopping",
            };
            *processes.entry(state.to_string()).or_insert(0) += 1;
        }
        MetricsReport {
            metrics: self.st.metrics.clone(),
            processes,
            sessions: self.st.sessions.len() as u64,
            claude_pids: self.st.procs.values().filter_map(|p| p.pid).collect(),
            save_failing: self.st.save_error.is_some(),
            shutting_down: self.shutting_down(),
        }
    }

    /// A turn ended (answered, failed, or dropped): count it, and time it if it reached Claude.
    pub(super) fn count_turn(&mut self, now: Instant, turn: &Turn, outcome: &str) {
        *self.st.metrics.turns.entry(outcome.to_string()).or_insert(0) += 1;
        if let Some(t) = turn.delivered {
            self.st.metrics.turn_duration.observe(now.saturating_duration_since(t));
        }
    }
}
