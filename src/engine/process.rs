//! Claude processes: spawn, dialog confirmation, readiness, stop, death, idle sweep, pool limit.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pool::is_spare_key;
use super::screen::{self, Prompt, Screen, CONFIRM_DELAY, TRUST_CONFIRM, TRUST_DELAY, TRUST_SELECT};
use super::turn::Answer;
use super::{ConnId, Engine, Output, ProcId, ProcessStatus, Signal, SpawnSpec};
use crate::wire::bridge::{self, FromChannel, ToChannel};
use crate::wire::openai::ApiError;

/// How long an unproven channel has to show (by `UserPromptSubmit`) that a message got through.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_DELIVERIES: u32 = 4;
/// Terminal lines quoted in error messages.
const TAIL_LINES: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcState {
    /// Spawned (or being spawned); not yet `hello` on the bridge.
    Starting,
    Ready,
    /// Told to stop; waiting to be reaped.
    Stopping,
}

/// Where synthesis is in answering the workspace-trust screen (trust_workspace = yes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum TrustStep {
    #[default]
    Unanswered,
    /// Arrow down typed (or about to be); Enter follows once the selection is seen to move.
    Selecting,
    Answered,
}

#[derive(Serialize, Deserialize)]
pub struct Process {
    pub session: String,
    pub pid: Option<u32>,
    pub state: ProcState,
    pub bridge: Option<ConnId>,
    pub bridge_token: String,
    pub hook_token: String,
    pub screen: Screen,
    #[serde(with = "super::clock::at")]
    pub started: Instant,
    #[serde(with = "super::clock::at")]
    pub idle_since: Instant,
    pub turns: u64,
    #[serde(with = "super::clock::at")]
    ready_deadline: Instant,
    #[serde(with = "super::clock::opt")]
    confirm_at: Option<Instant>,
    /// What to type at `confirm_at`.
    #[serde(default = "enter")]
    confirm_keys: String,
    dialog_seen: bool,
    /// Answering the workspace-trust screen (trust_workspace = yes): once only.
    #[serde(default)]
    trust: TrustStep,
    /// SIGKILL after this, while stopping.
    #[serde(with = "super::clock::opt")]
    kill_at: Option<Instant>,
    /// After an interrupt: no delivery before this.
    #[serde(with = "super::clock::opt")]
    pub settle_until: Option<Instant>,
    /// When its bridge last sent anything (heartbeats included).
    #[serde(with = "super::clock::at")]
    last_heard: Instant,
    /// `last_heard` + the allowed silence.
    #[serde(with = "super::clock::opt")]
    silent_at: Option<Instant>,
    /// A message got through (seen in a `UserPromptSubmit` hook).
    pub channel_proven: bool,
    /// Deliveries of the current turn's message while the channel is unproven.
    pub deliveries: u32,
    /// When to deliver it again if claude has not taken it.
    #[serde(with = "super::clock::opt")]
    pub redeliver_at: Option<Instant>,
    /// Hash of the client-tool catalog the channel has.
    pub tools_sent: Option<u64>,
    /// A changed catalog was sent: no delivery before claude re-listed tools, or this time.
    #[serde(with = "super::clock::opt")]
    pub tools_wait_until: Option<Instant>,
    /// Why synthesis is stopping it, for the turn that is cut short.
    stop_reason: Option<String>,
    /// The shell reads its transcript (so a turn's response can wait for the turn's usage).
    #[serde(default)]
    pub transcript_read: bool,
}

impl Process {
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            ProcState::Starting => self.confirm_at.into_iter().chain([self.ready_deadline]).min(),
            ProcState::Ready => [self.settle_until, self.silent_at, self.redeliver_at, self.tools_wait_until]
                .into_iter()
                .flatten()
                .min(),
            ProcState::Stopping => self.kill_at,
        }
    }

    /// The bridge to deliver a turn on, when the process can take one now.
    pub fn accepting_bridge(&self, now: Instant) -> Option<ConnId> {
        let settled = [self.settle_until, self.tools_wait_until].into_iter().flatten().all(|t| now >= t);
        (self.state == ProcState::Ready && settled).then_some(self.bridge?)
    }

    pub fn status(&self, id: ProcId, now: Instant) -> ProcessStatus {
        let state = match self.state {
            ProcState::Starting => "starting",
            ProcState::Ready => "ready",
            ProcState::Stopping => "stopping",
        };
        ProcessStatus {
            id,
            session: if is_spare_key(&self.session) { "(spare)".into() } else { self.session.clone() },
            pid: self.pid,
            state: state.into(),
            idle_secs: now.duration_since(self.idle_since).as_secs(),
            turns: self.turns,
            rss_kib: None,
        }
    }

    /// Type `keys` after `delay`: a TUI may drop keys that arrive before a dialog is drawn.
    fn type_later(&mut self, now: Instant, delay: std::time::Duration, keys: &str) {
        self.confirm_at = Some(now + delay);
        self.confirm_keys = keys.to_string();
    }

    fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!("claude (pid {pid})"),
            None => "claude".into(),
        }
    }

    fn tail(&self) -> String {
        match self.screen.last_lines(TAIL_LINES) {
            t if t.is_empty() => "(claude printed nothing)".into(),
            t => format!("last terminal lines:\n{t}"),
        }
    }
}

impl Engine {
    pub(super) fn spawn(&mut self, now: Instant, key: &str) {
        let id = self.st.next_proc;
        self.st.next_proc += 1;
        let session = self.st.sessions.get_mut(key).expect("session");
        session.proc = Some(id);
        let spec = SpawnSpec {
            session_uuid: session.uuid.clone(),
            bridge_token: self.ids.token(),
            hook_token: self.ids.token(),
        };
        log::info!("session {key}: spawning process {id} for claude session {}", spec.session_uuid);
        let proc = Process {
            session: key.to_string(),
            pid: None,
            state: ProcState::Starting,
            bridge: None,
            bridge_token: spec.bridge_token.clone(),
            hook_token: spec.hook_token.clone(),
            screen: Screen::default(),
            started: now,
            idle_since: now,
            turns: 0,
            ready_deadline: now + self.settings.ready_timeout,
            confirm_at: None,
            confirm_keys: enter(),
            dialog_seen: false,
            trust: TrustStep::Unanswered,
            kill_at: None,
            settle_until: None,
            last_heard: now,
            silent_at: None,
            channel_proven: false,
            deliveries: 0,
            redeliver_at: None,
            tools_sent: None,
            tools_wait_until: None,
            stop_reason: None,
            transcript_read: false,
        };
        self.st.procs.insert(id, proc);
        self.memory_spawned();
        self.push(Output::Spawn { proc: id, spec });
    }

    pub(super) fn on_spawned(&mut self, id: ProcId, pid: u32, resumed: bool) {
        let Some(p) = self.st.procs.get_mut(&id) else { return };
        log::info!("session {}: process {id} is claude pid {pid}", p.session);
        p.pid = Some(pid);
        if let Some(s) = self.st.sessions.get_mut(&p.session) {
            s.claude_fresh = !resumed;
        }
    }

    pub(super) fn on_spawn_failed(&mut self, now: Instant, id: ProcId, error: String) {
        let Some(p) = self.st.procs.remove(&id) else {
            return;
        };
        let msg = format!("cannot start claude: {error}; check claude_command in synthesis.conf");
        log::error!("session {}: {msg}", p.session);
        self.detach(&p);
        self.fail_queued(now, &p.session, &ApiError::new(502, "claude_spawn_failed", msg));
        self.spare_lost(now, &p.session);
        self.rebalance(now);
        self.maybe_exit();
    }

    pub(super) fn on_terminal(&mut self, now: Instant, id: ProcId, text: &str) {
        let Some(p) = self.st.procs.get_mut(&id) else {
            return;
        };
        let prompts = p.screen.push(text);
        if p.state != ProcState::Starting {
            return;
        }
        if p.trust == TrustStep::Selecting && p.confirm_at.is_none() && screen::trust_selection(text) == Some(true) {
            log::warn!(
                "session {}: accepting Claude Code's workspace-trust question (trust_workspace = yes)",
                p.session
            );
            p.trust = TrustStep::Answered;
            p.type_later(now, TRUST_DELAY, TRUST_CONFIRM);
        }
        for prompt in prompts {
            match prompt {
                Prompt::DevChannels => self.confirm_dev_channels(now, id),
                Prompt::WorkspaceTrust if self.settings.trust_workspace => self.select_trust(now, id),
                Prompt::WorkspaceTrust | Prompt::ApiKeyApproval => {
                    let code =
                        if prompt == Prompt::WorkspaceTrust { "workspace_not_trusted" } else { "api_key_not_approved" };
                    let p = &self.st.procs[&id];
                    let msg = format!("{} {}", prompt.advice(), p.tail());
                    log::error!("session {}: {msg}", p.session);
                    self.fail_process(now, id, ApiError::new(502, code, msg));
                    return;
                }
                Prompt::Interrupted => {}
            }
        }
    }

    /// Enter on the development-channels warning, once, after it has been drawn.
    fn confirm_dev_channels(&mut self, now: Instant, id: ProcId) {
        let p = self.st.procs.get_mut(&id).expect("process");
        if !p.dialog_seen {
            p.dialog_seen = true;
            p.type_later(now, CONFIRM_DELAY, "\r");
        }
    }

    /// trust_workspace = yes: select "Yes, I trust this folder" (`on_terminal` confirms it once the
    /// selection has moved); once. Enter is never typed while "No, exit" may be selected: if the
    /// screen stays, the ready timeout fails the request with it on the terminal tail.
    fn select_trust(&mut self, now: Instant, id: ProcId) {
        let p = self.st.procs.get_mut(&id).expect("process");
        if p.trust == TrustStep::Unanswered {
            p.trust = TrustStep::Selecting;
            p.type_later(now, TRUST_DELAY, TRUST_SELECT);
        }
    }

    pub(super) fn on_bridge_frame(&mut self, now: Instant, conn: ConnId, frame: FromChannel) {
        if let FromChannel::Hello { v, token } = frame {
            return self.on_hello(now, conn, v, &token);
        }
        let silence = self.settings.bridge_silence;
        let Some((&id, p)) = self.st.bridges.get(&conn).and_then(|id| self.st.procs.get_mut(id).map(|p| (id, p)))
        else {
            log::warn!("bridge {conn}: frame before hello, closing");
            self.push(Output::CloseBridge { conn });
            return;
        };
        p.last_heard = now;
        p.silent_at = Some(now + silence);
        let key = p.session.clone();
        match frame {
            FromChannel::Hello { .. } => unreachable!("handled above"),
            FromChannel::Ready => self.on_ready(now, id),
            FromChannel::Reply { seq, chat_id, text } => {
                self.on_reply(now, &key, &chat_id, text);
                // Only now may claude learn the reply was sent, and so only now end its turn.
                self.push(Output::Bridge { conn, frame: ToChannel::Replied { seq } });
            }
            FromChannel::ToolCall { call_ref, name, arguments } => {
                self.on_tool_call(now, &key, call_ref, name, arguments)
            }
            FromChannel::PermissionRequest { request_id, tool_name, description, input_preview } => {
                self.on_permission_request(now, &key, request_id, &tool_name, &description, &input_preview)
            }
            FromChannel::ToolsListed => {
                let p = self.st.procs.get_mut(&id).expect("bound process");
                if p.tools_wait_until.take().is_some() {
                    self.deliver_next(now, &key);
                }
            }
            FromChannel::Heartbeat => {}
        }
    }

    /// The channel's first frame binds its socket to its process; the client tools follow at
    /// once, for claude's first `tools/list`.
    fn on_hello(&mut self, now: Instant, conn: ConnId, v: u32, token: &str) {
        let found =
            self.st.procs.iter_mut().find(|(_, p)| {
                p.bridge.is_none() && p.state == ProcState::Starting && same_token(&p.bridge_token, token)
            });
        let Some((&id, p)) = found.filter(|_| v == bridge::VERSION) else {
            log::warn!("bridge {conn}: hello with an unknown or used token or version {v}, closing");
            self.push(Output::CloseBridge { conn });
            // A bound socket saying hello again is cut off too: its process loses its channel.
            self.on_bridge_closed(now, conn);
            return;
        };
        p.bridge = Some(conn);
        p.last_heard = now;
        p.silent_at = Some(now + self.settings.bridge_silence);
        let key = p.session.clone();
        self.st.bridges.insert(conn, id);
        self.send_tools(&key, id);
    }

    /// The channel is initialised (and claude had time to register it): deliver.
    fn on_ready(&mut self, now: Instant, id: ProcId) {
        let p = self.st.procs.get_mut(&id).expect("bound process");
        if p.state != ProcState::Starting {
            return;
        }
        p.state = ProcState::Ready;
        p.confirm_at = None;
        p.idle_since = now;
        let key = p.session.clone();
        let took = now.duration_since(p.started);
        log::info!("session {key}: process {id} ready after {} ms", took.as_millis());
        self.st.metrics.spawn_duration.observe(took);
        self.deliver_next(now, &key);
    }

    /// A bound bridge closing means the channel is gone: claude is useless without it.
    pub(super) fn on_bridge_closed(&mut self, now: Instant, conn: ConnId) {
        let Some(id) = self.st.bridges.remove(&conn) else {
            return;
        };
        if let Some(p) = self.st.procs.get_mut(&id) {
            p.bridge = None;
            self.stop_process(now, id, "its channel disconnected from the bridge");
        }
    }

    pub(super) fn on_exited(&mut self, now: Instant, id: ProcId, status: &str) {
        let Some(p) = self.st.procs.remove(&id) else {
            return;
        };
        let alive = now.duration_since(p.started).as_millis();
        log::info!("session {}: process {id} ({}) exited: {status} after {alive} ms", p.session, p.describe());
        self.detach(&p);
        self.memory_freed(id);
        let key = p.session.clone();
        if is_spare_key(&key) {
            // A spare that was never used: nothing waited for it.
            self.spare_lost(now, &key);
            self.rebalance(now);
            self.maybe_exit();
            return;
        }
        let why = p.stop_reason.as_ref().map_or(String::new(), |r| format!(" (synthesis was stopping it: {r})"));
        let reason = format!("{} exited ({status}){why}", p.describe());
        if self.st.sessions[&key].current.as_ref().is_some_and(|t| t.awaits_usage()) {
            self.end_stopped_turn(now, &key); // Claude had answered it
        } else if self.st.sessions[&key].current.is_some() {
            let msg = format!("{reason} during the turn; {}", p.tail());
            self.end_turn(now, &key, Answer::Error(ApiError::new(502, "claude_exited", msg)));
        }
        let queued = !self.st.sessions[&key].queue.is_empty();
        if queued && p.state == ProcState::Starting {
            // Died before becoming ready: respawning would likely loop; report why.
            let msg = format!("{reason} before its channel was ready; {}", p.tail());
            self.fail_queued(now, &key, &ApiError::new(502, "claude_start_failed", msg));
        } else if queued && !self.shutting_down() {
            // Queued turns go to a fresh process that resumes the same Claude session.
            if let Err(e) = self.ensure_process(now, &key) {
                self.fail_queued(now, &key, &e);
            }
        }
        self.rebalance(now);
        self.maybe_exit();
    }

    /// Forget the process in its session and bridge tables.
    fn detach(&mut self, p: &Process) {
        if let Some(conn) = p.bridge {
            self.st.bridges.remove(&conn);
            self.push(Output::CloseBridge { conn });
        }
        if let Some(s) = self.st.sessions.get_mut(&p.session) {
            s.proc = None;
        }
    }

    /// Fail everything the process's session is waiting for, then stop the process.
    fn fail_process(&mut self, now: Instant, id: ProcId, err: ApiError) {
        let key = self.st.procs[&id].session.clone();
        self.stop_process(now, id, &err.message);
        if self.st.sessions[&key].current.is_some() {
            self.end_turn(now, &key, Answer::Error(err.clone()));
        }
        self.fail_queued(now, &key, &err);
    }

    /// SIGTERM to the process group, SIGKILL after `stop_grace`.
    pub(super) fn stop_process(&mut self, now: Instant, id: ProcId, reason: &str) {
        let Some(p) = self.st.procs.get_mut(&id) else {
            return;
        };
        if p.state == ProcState::Stopping {
            return;
        }
        log::info!("session {}: stopping process {id} ({}): {reason}", p.session, p.describe());
        p.state = ProcState::Stopping;
        p.stop_reason = Some(reason.to_string());
        p.kill_at = Some(now + self.settings.stop_grace);
        self.push(Output::Signal { proc: id, signal: Signal::Term });
    }

    /// Ready timeouts, dialog confirmations, settle ends and SIGKILLs that are due.
    pub(super) fn expire_processes(&mut self, now: Instant) {
        let due: Vec<ProcId> =
            self.st.procs.iter().filter(|(_, p)| p.deadline().is_some_and(|d| now >= d)).map(|(id, _)| *id).collect();
        for id in due {
            let p = self.st.procs.get_mut(&id).expect("due process");
            match p.state {
                ProcState::Starting if p.confirm_at.is_some_and(|t| now >= t) => {
                    p.confirm_at = None;
                    let data = std::mem::replace(&mut p.confirm_keys, enter());
                    log::info!("session {}: answering claude's dialog with {data:?}", p.session);
                    self.push(Output::WriteTerminal { proc: id, data });
                }
                ProcState::Starting => {
                    let secs = self.settings.ready_timeout.as_secs_f32();
                    let msg =
                        format!("{} did not become ready within {secs} s (ready_timeout); {}", p.describe(), p.tail());
                    log::error!("session {}: {msg}", p.session);
                    self.fail_process(now, id, ApiError::new(504, "claude_not_ready", msg));
                }
                ProcState::Ready => self.expire_ready(now, id),
                ProcState::Stopping => {
                    p.kill_at = None;
                    log::warn!("session {}: process {id} ignored SIGTERM, killing", p.session);
                    self.push(Output::Signal { proc: id, signal: Signal::Kill });
                }
            }
        }
    }

    /// Deadlines of a ready process: heartbeat silence, redelivery, end of an interrupt's settle.
    fn expire_ready(&mut self, now: Instant, id: ProcId) {
        let p = self.st.procs.get_mut(&id).expect("due process");
        let due = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        if due(p.silent_at) {
            let secs = now.duration_since(p.last_heard).as_secs();
            let why = format!("its channel has sent nothing for {secs} s (no heartbeat)");
            self.stop_process(now, id, &why);
            return;
        }
        let key = p.session.clone();
        if due(p.redeliver_at) {
            p.redeliver_at = None;
            self.redeliver(now, id);
        }
        let p = self.st.procs.get_mut(&id).expect("due process");
        if due(p.tools_wait_until) {
            log::warn!("session {key}: claude did not re-list tools after the catalog changed; delivering");
        }
        if due(p.settle_until) || due(p.tools_wait_until) {
            p.settle_until = p.settle_until.filter(|t| now < *t);
            p.tools_wait_until = p.tools_wait_until.filter(|t| now < *t);
            self.deliver_next(now, &key);
        }
    }

    /// Claude drops channel messages that arrive before it has registered the channel's
    /// notification handler. The channel says `ready` only once claude has shown it did (see
    /// `channel::Registration`), but should that proof ever mislead: until a `UserPromptSubmit`
    /// hook has shown that a message got through, an unacknowledged delivery is sent again;
    /// after that, never.
    fn redeliver(&mut self, now: Instant, id: ProcId) {
        let p = self.st.procs.get_mut(&id).expect("process");
        let (key, bridge) = (p.session.clone(), p.bridge);
        let Some(turn) = self.st.sessions.get(&key).and_then(|s| s.current.as_ref()) else { return };
        let Some(conn) = bridge.filter(|_| !p.channel_proven) else { return };
        if p.deliveries >= MAX_DELIVERIES {
            let msg = format!(
                "{} never took the message into a turn ({} deliveries): its channel may not be registered, run `synthesis doctor`; {}",
                p.describe(),
                p.deliveries,
                p.tail()
            );
            log::error!("session {key}: {msg}");
            self.fail_process(now, id, ApiError::new(502, "claude_ignored_message", msg));
            return;
        }
        p.deliveries += 1;
        p.redeliver_at = Some(now + ACK_TIMEOUT);
        self.st.metrics.deliveries_repeated += 1;
        log::warn!("session {key}: claude has not taken {} yet, delivering again", turn.chat_id);
        let frame = ToChannel::Deliver { chat_id: turn.chat_id.clone(), content: turn.content.clone() };
        self.push(Output::Bridge { conn, frame });
    }

    /// `UserPromptSubmit`: claude took a message into a turn, so its channel works.
    pub(super) fn on_prompt_submitted(&mut self, id: ProcId, prompt: &str) {
        let p = self.st.procs.get_mut(&id).expect("process of hook token");
        let current = self.st.sessions.get(&p.session).and_then(|s| s.current.as_ref());
        if current.is_some_and(|t| prompt.contains(&format!("chat_id=\"{}\"", t.chat_id))) {
            p.channel_proven = true;
            p.redeliver_at = None;
        }
    }

    /// Stop processes idle longer than `idle_timeout`; never one with a turn in flight or queued.
    pub(super) fn sweep_idle(&mut self, now: Instant) {
        let idle: Vec<ProcId> = self
            .st
            .procs
            .iter()
            .filter(|(_, p)| p.state == ProcState::Ready && self.st.sessions[&p.session].is_idle())
            .filter(|(_, p)| !is_spare_key(&p.session)) // a spare is there to wait
            .filter(|(_, p)| now.duration_since(p.idle_since) >= self.settings.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.stop_process(now, id, "idle longer than idle_timeout");
        }
    }

    /// The process behind a hook token.
    pub(super) fn process_by_hook_token(&self, token: &str) -> Option<ProcId> {
        self.st.procs.iter().find(|(_, p)| same_token(&p.hook_token, token)).map(|(id, _)| *id)
    }
}

fn same_token(ours: &str, theirs: &str) -> bool {
    super::bounds::constant_time_eq(ours.as_bytes(), theirs.as_bytes())
}

fn enter() -> String {
    "\r".into()
}
