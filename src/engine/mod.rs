//! The sans-IO core: every session, process and turn transition happens here.
//!
//! The shell feeds `handle(now, Input)` and then drains `poll_output()` completely; it sleeps
//! until `poll_timeout()` and then feeds `Input::Tick`. The engine never touches a socket,
//! a clock, a random generator or a process: time comes in, identifiers come from `Ids`,
//! and every effect on the world is an `Output`.

mod api;
mod bounds;
pub use bounds::Stats;
pub mod attachments;
mod clock;
pub mod history;
mod metrics;
mod openclaw;
mod permissions;
mod pool;
pub use api::{session_key, HOOK_PROMPT, HOOK_STOP, HOOK_STOP_FAILURE};
pub use metrics::{HostFigures, Metrics, MetricsReport};
pub use permissions::Permissions;
mod process;
pub mod screen;
mod session;
mod tools;
mod turn;
mod usage;
pub use turn::error_response;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::wire::bridge::{FromChannel, ToChannel};
use crate::wire::http::{Request, Response};
pub use crate::wire::transcript::{Read as TranscriptRead, Usage};
use process::Process;
use session::Session;

/// Sessions unused this long are forgotten.
const SESSION_RETENTION: Duration = Duration::from_secs(30 * 86400);

/// A client or bridge connection, named by the shell.
pub type ConnId = u64;
/// A claude process, named by the engine.
pub type ProcId = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// A complete HTTP request (not a WebSocket upgrade) on a client connection.
    Http {
        conn: ConnId,
        request: Request,
        unix_secs: u64,
    },
    /// The client connection went away.
    ConnClosed {
        conn: ConnId,
    },
    BridgeFrame {
        conn: ConnId,
        frame: FromChannel,
    },
    BridgeClosed {
        conn: ConnId,
    },
    /// `resumed`: claude was started with `--resume` (its transcript exists).
    Spawned {
        proc: ProcId,
        pid: u32,
        resumed: bool,
    },
    SpawnFailed {
        proc: ProcId,
        error: String,
    },
    /// Output read from claude's terminal.
    Terminal {
        proc: ProcId,
        text: String,
    },
    /// The process (group leader) was reaped.
    Exited {
        proc: ProcId,
        status: String,
    },
    /// What claude's transcript gained since the last read: token usage per turn, and whether
    /// the newest turn's answer has been written. The shell reads it before it feeds a Stop hook
    /// or a client-tool or permission request of that process, and on `ReadTranscript`.
    Usage {
        proc: ProcId,
        read: TranscriptRead,
    },
    /// How the last `SaveSessions` went: `error` when the map could not be written.
    Saved {
        error: Option<String>,
    },
    /// Memory reading: bytes available to synthesis (the tighter of MemAvailable and the cgroup's
    /// room) and the resident bytes of each claude's process group.
    Memory {
        available: u64,
        groups: Vec<(ProcId, u64)>,
    },
    /// SIGTERM or SIGINT.
    Shutdown,
    /// `poll_timeout()` has passed.
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    Term,
    Kill,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnSpec {
    /// Claude Code session uuid: `--resume` when its transcript exists, else `--session-id`.
    pub session_uuid: String,
    /// One-time token the channel presents in its bridge `hello`.
    pub bridge_token: String,
    /// Token claude's HTTP hooks present.
    pub hook_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    Respond {
        conn: ConnId,
        response: Response,
    },
    /// Send the head of a server-sent-events response.
    StreamStart {
        conn: ConnId,
    },
    StreamData {
        conn: ConnId,
        data: String,
    },
    /// The stream is complete; the connection may serve its next request.
    StreamEnd {
        conn: ConnId,
    },
    Bridge {
        conn: ConnId,
        frame: ToChannel,
    },
    CloseBridge {
        conn: ConnId,
    },
    Spawn {
        proc: ProcId,
        spec: SpawnSpec,
    },
    WriteTerminal {
        proc: ProcId,
        data: String,
    },
    /// Read the process's transcript now (answered at once with `Input::Usage`, if readable).
    ReadTranscript {
        proc: ProcId,
    },
    /// Signal the process group.
    Signal {
        proc: ProcId,
        signal: Signal,
    },
    /// Persist the session map (sent when a session is created, and when timestamps changed).
    SaveSessions {
        sessions: Vec<SessionRecord>,
    },
    /// Write an image or file from a request, for the message that names it: directories 0700,
    /// the file 0600. Sent right before that message is delivered.
    WriteAttachment {
        path: String,
        #[serde(with = "crate::wire::base64::serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A session was forgotten: delete its attachments directory.
    RemoveAttachments {
        dir: String,
    },
    /// Answer `GET /status` after adding each process's RSS.
    Status {
        conn: ConnId,
        report: StatusReport,
    },
    /// Answer `GET /metrics`: render `report` with the figures only /proc has.
    Metrics {
        conn: ConnId,
        report: MetricsReport,
    },
    /// Every process is gone after a shutdown: exit 0.
    Exit,
}

/// One entry of the persisted session map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub key: String,
    pub uuid: String,
    /// Unix seconds.
    pub created: u64,
    pub last_used: u64,
    /// Later keys of the same conversation (`<id>:<N+1>` after a compaction).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Hash of the client system prompt this Claude session has seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_hash: Option<u64>,
    /// Fingerprints of the answers this Claude session gave, newest last (no texts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<u64>,
    /// Fingerprints of what was delivered to it since its last answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heard: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub shutting_down: bool,
    /// Why the session map could not be saved last time (retried at each idle sweep).
    pub save_error: Option<String>,
    /// Bytes the host has available (filled in by the shell) and the floor synthesis keeps.
    pub memory_available: Option<u64>,
    pub min_free_memory: u64,
    pub sessions: Vec<SessionStatus>,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub key: String,
    pub claude_session: String,
    pub process: Option<ProcId>,
    pub turn_in_flight: bool,
    pub queued: usize,
    pub turns: u64,
    pub last_used: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub id: ProcId,
    pub session: String,
    pub pid: Option<u32>,
    pub state: String,
    pub idle_secs: u64,
    pub turns: u64,
    /// Resident memory of its whole process group (claude, channel, tools), from /proc.
    pub rss_kib: Option<u64>,
}

/// Where identifiers come from: random in production, a counter in tests.
pub trait Ids {
    fn uuid(&mut self) -> String;
    fn token(&mut self) -> String;
}

pub struct RandomIds;

impl Ids for RandomIds {
    fn uuid(&mut self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
    fn token(&mut self) -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }
}

/// Deterministic identifiers for replay tests.
#[derive(Default)]
pub struct CounterIds(u64);

impl Ids for CounterIds {
    fn uuid(&mut self) -> String {
        self.0 += 1;
        format!("00000000-0000-4000-8000-{:012}", self.0)
    }
    fn token(&mut self) -> String {
        self.0 += 1;
        format!("t{}", self.0)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub api_key: Option<String>,
    pub model: String,
    pub max_processes: usize,
    pub queue_depth: usize,
    pub ready_timeout: Duration,
    pub idle_timeout: Duration,
    pub idle_sweep: Duration,
    pub turn_timeout: Duration,
    /// SIGTERM to SIGKILL.
    pub stop_grace: Duration,
    /// How long turns in flight may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// After an interrupt, how long a late Stop hook is still attributed to the interrupted turn.
    pub settle: Duration,
    /// A bridge that sends nothing (not even a heartbeat) for this long means a dead channel.
    pub bridge_silence: Duration,
    /// Accept Claude Code's workspace-trust question instead of failing.
    pub trust_workspace: bool,
    /// Interval of keep-alive events on streams.
    pub keepalive: Duration,
    /// How long a turn whose client left keeps running for a retry to attach, before it is interrupted.
    pub retry_grace: Duration,
    /// Client tools offered to Claude (`*` = all) and withheld.
    pub tools_allow: Vec<String>,
    pub tools_deny: Vec<String>,
    pub permissions: Permissions,
    /// Absolute directory for images and files from requests (`<state_dir>/attachments`).
    pub attachments_dir: String,
    /// Warm claudes kept ready for new sessions.
    pub spare_processes: usize,
    /// Keep at least this many bytes of memory available (0: no memory policy).
    pub min_free_memory: u64,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Settings {
            api_key: c.api_key.clone(),
            model: c.model.clone(),
            max_processes: c.max_processes,
            queue_depth: c.queue_depth,
            ready_timeout: c.ready_timeout,
            idle_timeout: c.idle_timeout,
            idle_sweep: c.idle_sweep,
            turn_timeout: c.turn_timeout,
            stop_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            settle: Duration::from_millis(500),
            bridge_silence: Duration::from_secs(4 * crate::wire::bridge::HEARTBEAT_SECS),
            trust_workspace: c.trust_workspace,
            keepalive: Duration::from_secs(15),
            retry_grace: c.retry_grace,
            tools_allow: c.tools_allow.clone(),
            tools_deny: c.tools_deny.clone(),
            permissions: c.permissions,
            attachments_dir: crate::attachments::dir(&c.state_dir).to_string_lossy().into_owned(),
            spare_processes: c.spare_processes,
            min_free_memory: c.min_free_memory,
        }
    }
}

/// The engine's whole state, without its settings and identifier source: what an in-place
/// upgrade hands to the new image (`Engine::export` / `Engine::import`).
#[derive(Serialize, Deserialize)]
struct State {
    // Ordered maps: iteration order decides output order, and replay must reproduce it.
    sessions: BTreeMap<String, Session>,
    procs: BTreeMap<ProcId, Process>,
    next_proc: ProcId,
    /// Client connection → key of the session whose turn it waits for.
    waiting: BTreeMap<ConnId, String>,
    /// Bound bridge connection → its process.
    bridges: BTreeMap<ConnId, ProcId>,
    /// Sessions waiting for a process slot to free up, oldest first.
    slot_waiters: VecDeque<String>,
    #[serde(with = "clock::at")]
    next_sweep: Instant,
    shutdown: Shutdown,
    /// Session timestamps changed since the map was last saved.
    sessions_dirty: bool,
    /// The last save failed (full disk, read-only state_dir): the map stays dirty.
    save_error: Option<String>,
    /// Newest wall-clock time seen (unix seconds, from requests): the engine has no clock.
    unix_secs: u64,
    /// The latest memory reading (`Input::Memory`).
    memory: Option<pool::Memory>,
    /// When to start missing spares.
    #[serde(with = "clock::opt")]
    spare_at: Option<Instant>,
    #[serde(default)]
    metrics: Metrics,
}

pub struct Engine {
    settings: Settings,
    ids: Box<dyn Ids>,
    st: State,
    outputs: VecDeque<Output>,
}

impl Engine {
    pub fn new(settings: Settings, ids: Box<dyn Ids>, now: Instant) -> Self {
        let st = State {
            sessions: BTreeMap::new(),
            procs: BTreeMap::new(),
            next_proc: 1,
            waiting: BTreeMap::new(),
            bridges: BTreeMap::new(),
            slot_waiters: VecDeque::new(),
            next_sweep: now + settings.idle_sweep,
            shutdown: Shutdown::Running,
            sessions_dirty: false,
            save_error: None,
            unix_secs: 0,
            memory: None,
            spare_at: Some(now),
            metrics: Metrics::default(),
        };
        Engine { settings, ids, st, outputs: VecDeque::new() }
    }

    /// The whole state as JSON, deadlines relative to `now`, for `import` in a new image. The
    /// engine is unchanged (if the hand-over fails, it simply goes on).
    pub fn export(&self, now: Instant) -> String {
        clock::with_base(now, || serde_json::to_string(&self.st)).expect("engine state serialises")
    }

    /// An engine continuing from `export`ed state, with (possibly new) settings.
    pub fn import(settings: Settings, ids: Box<dyn Ids>, now: Instant, json: &str) -> Result<Self, String> {
        let st: State = clock::with_base(now, || serde_json::from_str(json))
            .map_err(|e| format!("unreadable engine state: {e}"))?;
        Ok(Engine { settings, ids, st, outputs: VecDeque::new() })
    }

    /// Sessions known from an earlier run: their next process resumes their Claude session.
    pub fn restore(&mut self, records: Vec<SessionRecord>) {
        for r in records {
            self.st.sessions.insert(r.key.clone(), Session::restored(r));
        }
    }

    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Http { conn, request, unix_secs } => {
                self.st.unix_secs = self.st.unix_secs.max(unix_secs);
                self.on_http(now, conn, request, unix_secs)
            }
            Input::ConnClosed { conn } => self.on_conn_closed(now, conn),
            Input::BridgeFrame { conn, frame } => self.on_bridge_frame(now, conn, frame),
            Input::BridgeClosed { conn } => self.on_bridge_closed(now, conn),
            Input::Spawned { proc, pid, resumed } => self.on_spawned(proc, pid, resumed),
            Input::SpawnFailed { proc, error } => self.on_spawn_failed(now, proc, error),
            Input::Terminal { proc, text } => self.on_terminal(now, proc, &text),
            Input::Exited { proc, status } => self.on_exited(now, proc, &status),
            Input::Usage { proc, read } => self.on_usage(now, proc, read),
            Input::Saved { error } => self.on_saved(error),
            Input::Memory { available, groups } => self.on_memory(now, available, groups),
            Input::Shutdown => self.on_shutdown(now),
            Input::Tick => self.on_tick(now),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The earliest deadline: ready, stop grace, settle, turn, idle sweep or shutdown.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let procs = self.st.procs.values().filter_map(Process::deadline);
        let turns = self.st.sessions.values().filter_map(Session::deadline);
        let own = match self.st.shutdown {
            Shutdown::Running => Some(self.st.next_sweep),
            Shutdown::Draining(deadline) => Some(deadline),
            Shutdown::Stopping => None,
        };
        procs.chain(turns).chain(own).chain(self.st.spare_at).min()
    }

    fn on_tick(&mut self, now: Instant) {
        self.expire_processes(now);
        self.expire_turns(now);
        self.refill_spares(now);
        match self.st.shutdown {
            Shutdown::Running if now >= self.st.next_sweep => {
                self.sweep_idle(now);
                self.forget_old_sessions();
                self.save_sessions_if_dirty();
                self.st.next_sweep = now + self.settings.idle_sweep;
            }
            Shutdown::Draining(deadline) if now >= deadline => self.stop_everything(now),
            _ => {}
        }
    }

    fn on_shutdown(&mut self, now: Instant) {
        if let Shutdown::Draining(_) = self.st.shutdown {
            log::warn!("second shutdown signal: stopping every claude now");
            self.stop_everything(now);
            return;
        }
        if self.st.shutdown != Shutdown::Running {
            return;
        }
        log::info!("shutting down: {} sessions, {} processes", self.st.sessions.len(), self.st.procs.len());
        self.st.shutdown = Shutdown::Draining(now + self.settings.shutdown_grace);
        self.fail_all_queued(now);
        self.maybe_finish_shutdown(now);
    }

    /// While draining, once no turn is in flight, stop every process.
    fn maybe_finish_shutdown(&mut self, now: Instant) {
        if matches!(self.st.shutdown, Shutdown::Draining(_)) && self.st.sessions.values().all(|s| s.current.is_none()) {
            self.stop_everything(now);
        }
    }

    /// Stop every process (turns still in flight fail); exit once none is left.
    fn stop_everything(&mut self, now: Instant) {
        self.st.shutdown = Shutdown::Stopping;
        let ids: Vec<ProcId> = self.st.procs.keys().copied().collect();
        for id in ids {
            self.stop_process(now, id, "synthesis is shutting down");
        }
        self.maybe_exit();
    }

    fn maybe_exit(&mut self) {
        if self.st.shutdown == Shutdown::Stopping && self.st.procs.is_empty() {
            self.save_sessions_if_dirty();
            self.push(Output::Exit);
        }
    }

    /// Drop sessions unused for `SESSION_RETENTION` (Claude Code deletes transcripts after 30 days
    /// by default, so there would be nothing left to resume), so the map does not grow forever.
    fn forget_old_sessions(&mut self) {
        let cutoff = self.st.unix_secs.saturating_sub(SESSION_RETENTION.as_secs());
        let before = self.st.sessions.len();
        let mut forgotten = Vec::new();
        self.st.sessions.retain(|key, s| {
            let keep = s.proc.is_some() || !s.is_idle() || s.wants_slot || s.last_used >= cutoff;
            if !keep {
                forgotten.push(attachments::session_dir(&self.settings.attachments_dir, key));
            }
            keep
        });
        for dir in forgotten {
            self.push(Output::RemoveAttachments { dir });
        }
        if self.st.sessions.len() < before {
            log::info!(
                "forgot {} sessions unused for {} days",
                before - self.st.sessions.len(),
                SESSION_RETENTION.as_secs() / 86400
            );
            self.st.sessions_dirty = true;
        }
    }

    fn save_sessions(&mut self) {
        let mut sessions: Vec<SessionRecord> =
            self.st.sessions.values().filter(|s| !s.ephemeral).map(Session::record).collect();
        sessions.sort_by(|a, b| a.key.cmp(&b.key));
        self.st.sessions_dirty = false;
        self.push(Output::SaveSessions { sessions });
    }

    /// A failed save keeps the map dirty, so the next sweep writes it again; nothing is lost
    /// silently, and `/status` says why.
    fn on_saved(&mut self, error: Option<String>) {
        if error.is_some() {
            self.st.sessions_dirty = true;
        } else if self.st.save_error.is_some() {
            log::info!("the session map is saved again");
        }
        self.st.save_error = error;
    }

    fn save_sessions_if_dirty(&mut self) {
        if self.st.sessions_dirty {
            self.save_sessions();
        }
    }

    fn push(&mut self, out: Output) {
        self.outputs.push_back(out);
    }

    /// The process a hook request comes from (by its token), so that the shell can read that
    /// claude's transcript before feeding the hook.
    pub fn process_of_hook(&self, req: &Request) -> Option<ProcId> {
        self.process_by_hook_token(req.bearer()?)
    }

    /// The process bound to a bridge connection.
    pub fn process_of_bridge(&self, conn: ConnId) -> Option<ProcId> {
        self.st.bridges.get(&conn).copied()
    }

    /// Draining or stopping after SIGTERM/SIGINT.
    pub fn shutting_down(&self) -> bool {
        self.st.shutdown != Shutdown::Running
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Shutdown {
    Running,
    /// Turns in flight may finish until this deadline.
    Draining(#[serde(with = "clock::at")] Instant),
    /// Every process has been told to stop; exit when the last is reaped.
    Stopping,
}
