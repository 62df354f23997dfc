//! The mio shell: one thread, one `Poll`. It turns readiness into engine inputs and engine
//! outputs into syscalls, and holds no session logic of its own.

pub mod conn;
mod memory;
mod procfs;
pub mod spawn;
mod transcript;
mod upgrade;

pub use memory::ENV_MEMINFO as MEMINFO_ENV;
pub use upgrade::ENV_FD as UPGRADE_ENV;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::Config;
use crate::engine::{Engine, Ids, Input, Output, ProcId, RandomIds, Settings, Signal};
use crate::trace::{Record, Trace, TracedIds};
use crate::wire::bridge::FromChannel;
use conn::{BridgeConn, BridgeEvent, HttpConn, HttpEvent};
use spawn::{home, Launch};
use transcript::Transcript;
use upgrade::{ChildSnapshot, Handover};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// How often memory is read for the pool policy (when `min_free_memory` is set).
const MEMORY_SAMPLE: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause before accepting again after EMFILE/ENFILE (sozu does the same).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Connections over `max_connections` that still get their 503 (then the next are closed at once).
const REFUSAL_ROOM: usize = 32;
/// File descriptors synthesis needs besides connections and claude terminals.
const SPARE_FDS: usize = 32;

/// What a token stands for. Connection tokens double as the engine's `ConnId`s and are never reused.
enum Source {
    Http(HttpConn),
    Bridge(BridgeConn),
    Terminal(ProcId),
}

struct Child {
    pid: u32,
    master: OwnedFd,
    token: Token,
    /// Its session transcript, read for token usage.
    transcript: Option<Transcript>,
}

struct Shell {
    config: Config,
    /// `--config`, re-read by the new image on SIGHUP.
    config_path: Option<PathBuf>,
    poll: Poll,
    listener: TcpListener,
    signals: Signals,
    engine: Engine,
    sources: HashMap<Token, Source>,
    next_token: usize,
    children: HashMap<ProcId, Child>,
    self_exe: PathBuf,
    workspace: PathBuf,
    addr: SocketAddr,
    /// When to look for idle keep-alive connections and connection deadlines (unbound bridges,
    /// lingering closes).
    next_idle_check: Instant,
    /// Client and bridge connections open (counted against `max_connections`).
    conns: usize,
    /// At the cap: new connections are refused (logged once per episode).
    refusing: bool,
    /// Connections that may have a next request to serve (an answer completed or output drained),
    /// each served once per turn of the loop.
    pump: Vec<Token>,
    /// When to read memory next (`min_free_memory`).
    next_memory_check: Option<Instant>,
    /// `accept` failed for lack of resources: try again after `ACCEPT_RETRY`.
    accept_retry: bool,
    /// The opt-in JSONL trace (`trace_file`).
    trace: Option<Rc<RefCell<Trace>>>,
    /// Tokens to forget at the end of the event batch (a freed token can still have events in it).
    dead: Vec<Token>,
    exit: bool,
}

/// Run the service until a shutdown completes; after an in-place upgrade, continue the
/// previous image's work.
pub fn serve(config: Config, config_path: Option<PathBuf>) -> Result<(), String> {
    let mut shell = match upgrade::take() {
        Some(handover) => Shell::resume(config, config_path, handover?),
        None => Shell::new(config, config_path),
    }
    .map_err(|e| e.to_string())?;
    shell.run().map_err(|e| format!("event loop failed: {e}"))
}

fn with_context<T>(what: impl std::fmt::Display, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

impl Shell {
    fn new(config: Config, config_path: Option<PathBuf>) -> io::Result<Self> {
        for dir in [config.state_dir.clone(), config.state_dir.join("tmp")] {
            with_context(format!("state_dir {}", dir.display()), crate::persist::private_dir(&dir))?;
        }
        let listener = with_context(format!("cannot listen on {}", config.listen), TcpListener::bind(config.listen))?;
        // mio listens with std's backlog of 128: hundreds of claudes firing Stop hooks at once
        // overflow it and pay a 1 s SYN retransmit. Linux lets listen() raise it in place.
        // SAFETY: listen(2) on our own listening socket.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        let start = Instant::now();
        let unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let known = crate::persist::load(&config.state_dir, unix_secs);
        log::info!("{} known sessions in {}", known.len(), crate::persist::path(&config.state_dir).display());
        let mut shell = Shell::assemble(config, config_path, listener, start, |settings, ids| {
            Ok(Engine::new(settings, ids, start))
        })?;
        if let Some(t) = &shell.trace {
            t.borrow_mut().write(&Record::Restore { sessions: known.clone() });
        }
        shell.engine.restore(known);
        log::info!("synthesis listening on http://{} (workspace {})", shell.addr, shell.workspace.display());
        Ok(shell)
    }

    /// Continue the previous image's work after an in-place upgrade.
    fn resume(config: Config, config_path: Option<PathBuf>, h: Handover) -> io::Result<Self> {
        let start = Instant::now();
        // SAFETY: the previous image handed us its listening socket.
        let listener = TcpListener::from_std(unsafe { std::net::TcpListener::from_raw_fd(h.listener) });
        let engine = &h.engine;
        let mut shell = Shell::assemble(config, config_path, listener, start, |settings, ids| {
            Engine::import(settings, ids, start, engine).map_err(io::Error::other)
        })?;
        if shell.addr != shell.config.listen && shell.config.listen.port() != 0 {
            log::warn!(
                "listen changed to {}: still serving {} (a restart applies it)",
                shell.config.listen,
                shell.addr
            );
        }
        shell.next_token = h.next_token;
        for c in h.http {
            let (token, fd) = (Token(c.token), c.fd);
            // SAFETY: the previous image handed us this connected socket.
            let stream = mio::net::TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(fd) });
            shell.adopt(token, Source::Http(HttpConn::resume(stream, c, start)))?;
        }
        for (token, fd) in h.bridges {
            // SAFETY: as above.
            let stream = mio::net::TcpStream::from_std(unsafe { std::net::TcpStream::from_raw_fd(fd) });
            let bound = shell.engine.bridge_bound(token as u64);
            shell.adopt(Token(token), Source::Bridge(BridgeConn::on(stream, Vec::new(), bound)))?;
        }
        for c in h.children {
            // SAFETY: the previous image handed us this terminal master.
            let master = unsafe { OwnedFd::from_raw_fd(c.master) };
            shell.poll.registry().register(&mut SourceFd(&c.master), Token(c.token), Interest::READABLE)?;
            shell.sources.insert(Token(c.token), Source::Terminal(c.proc));
            let child = Child { pid: c.pid, master, token: Token(c.token), transcript: c.transcript };
            shell.children.insert(c.proc, child);
        }
        log::info!(
            "upgraded in place (pid {}): {} connections, {} claude processes, listening on http://{}",
            std::process::id(),
            shell.sources.len() - shell.children.len(),
            shell.children.len(),
            shell.addr
        );
        // Claudes that exited while the images changed; then let pending signals in.
        shell.reap();
        upgrade::block_signals(false);
        Ok(shell)
    }

    /// What a fresh start and an upgrade share: poll, signals, trace and the engine.
    fn assemble(
        config: Config,
        config_path: Option<PathBuf>,
        mut listener: TcpListener,
        start: Instant,
        engine: impl FnOnce(Settings, Box<dyn Ids>) -> io::Result<Engine>,
    ) -> io::Result<Self> {
        let workspace = with_context(format!("workspace {}", config.workspace.display()), config.workspace_dir())?;
        raise_fd_limit(config.max_connections + REFUSAL_ROOM + config.max_processes + SPARE_FDS);
        let self_exe = with_context("cannot find own binary", std::env::current_exe())?;
        let poll = Poll::new()?;
        let addr = listener.local_addr()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGCHLD, SIGHUP])?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE)?;
        let trace = match &config.trace_file {
            Some(path) => Some(with_context(
                format!("trace_file {}", path.display()),
                Trace::open(path, start, config.api_key.clone()),
            )?),
            None => None,
        };
        let ids: Box<dyn Ids> = match &trace {
            Some(t) => Box::new(TracedIds(t.clone())),
            None => Box::new(RandomIds),
        };
        let engine = engine(Settings::from_config(&config), ids)?;
        let next_memory_check = (config.min_free_memory > 0).then_some(start);
        Ok(Shell {
            config,
            config_path,
            poll,
            listener,
            signals,
            engine,
            sources: HashMap::new(),
            next_token: 2,
            children: HashMap::new(),
            self_exe,
            workspace,
            addr,
            accept_retry: false,
            next_idle_check: start,
            conns: 0,
            refusing: false,
            pump: Vec::new(),
            next_memory_check,
            trace,
            dead: Vec::new(),
            exit: false,
        })
    }

    /// Watch a socket handed over by the previous image.
    fn adopt(&mut self, token: Token, mut source: Source) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        let deadline = match &mut source {
            Source::Http(c) => {
                self.poll.registry().register(&mut c.stream, token, interest)?;
                self.conns += 1;
                c.deadline()
            }
            Source::Bridge(b) => {
                self.poll.registry().register(b.ws.get_mut(), token, interest)?;
                self.conns += 1;
                b.deadline()
            }
            Source::Terminal(_) => None,
        };
        if let Some(d) = deadline {
            self.next_idle_check = self.next_idle_check.min(d);
        }
        self.sources.insert(token, source);
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.exit {
            let mut timeout = self.engine.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()));
            if self.accept_retry {
                timeout = Some(timeout.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
            }
            let own = self.next_memory_check.map_or(self.next_idle_check, |m| m.min(self.next_idle_check));
            let own = own.saturating_duration_since(Instant::now());
            timeout = Some(timeout.map_or(own, |t| t.min(own)));
            if !self.pump.is_empty() {
                timeout = Some(std::time::Duration::ZERO);
            }
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {} // an empty wake-up
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    SIGNALS => self.on_signals(),
                    token => self.on_ready(token),
                }
            }
            if std::mem::take(&mut self.accept_retry) {
                self.accept();
            }
            for token in std::mem::take(&mut self.pump) {
                if !self.dead.contains(&token) {
                    self.on_ready(token);
                }
            }
            if Instant::now() >= self.next_idle_check {
                self.close_idle_connections();
            }
            if self.next_memory_check.is_some_and(|t| Instant::now() >= t) {
                self.read_memory();
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= Instant::now()) {
                self.feed(Input::Tick);
            }
            for token in std::mem::take(&mut self.dead) {
                self.forget(token);
            }
        }
        log::info!("all claude processes stopped; exiting");
        Ok(())
    }

    /// Hand one input to the engine and carry out everything it asks for.
    fn feed(&mut self, input: Input) {
        let now = Instant::now();
        if let Some(t) = &self.trace {
            t.borrow_mut().input(now, &input);
        }
        self.engine.handle(now, input);
        while let Some(out) = self.engine.poll_output() {
            if let Some(t) = &self.trace {
                t.borrow_mut().write(&Record::Output { output: out.clone() });
            }
            self.execute(out);
        }
    }

    fn execute(&mut self, out: Output) {
        match out {
            Output::Respond { conn, response } => self.with_http(conn, |c| c.respond(&response)),
            Output::StreamStart { conn } => self.with_http(conn, HttpConn::stream_start),
            Output::StreamData { conn, data } => self.with_http(conn, |c| c.stream_data(&data)),
            Output::StreamEnd { conn } => self.with_http(conn, HttpConn::stream_end),
            Output::Bridge { conn, frame } => {
                if let Some(Source::Bridge(b)) = self.sources.get_mut(&Token(conn as usize)) {
                    b.send(&frame);
                }
            }
            Output::CloseBridge { conn } => {
                if let Some(Source::Bridge(b)) = self.sources.get_mut(&Token(conn as usize)) {
                    let _ = b.ws.close(None);
                    b.flush();
                    self.dead.push(Token(conn as usize));
                }
            }
            Output::Spawn { proc, spec } => self.spawn(proc, &spec),
            Output::ReadTranscript { proc } => self.read_usage(proc),
            Output::WriteTerminal { proc, data } => {
                if let Some(child) = self.children.get(&proc) {
                    // A few bytes (Enter, ESC): the terminal buffer always takes them.
                    let fd = child.master.as_raw_fd();
                    // SAFETY: fd is an open pty master owned by `child`.
                    unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
                }
            }
            Output::Signal { proc, signal } => {
                if let Some(child) = self.children.get(&proc) {
                    let sig = match signal {
                        Signal::Term => libc::SIGTERM,
                        Signal::Kill => libc::SIGKILL,
                    };
                    // The whole group: claude, its channel, its tools.
                    // SAFETY: plain kill(2) on a group we created.
                    unsafe { libc::kill(-(child.pid as libc::pid_t), sig) };
                }
            }
            Output::SaveSessions { sessions } => {
                let error = crate::persist::save(&self.config.state_dir, &sessions).err().map(|e| {
                    let msg = format!("cannot save the session map in {}: {e}", self.config.state_dir.display());
                    log::error!("{msg}; retrying at the next idle sweep");
                    msg
                });
                self.feed(Input::Saved { error });
            }
            Output::WriteAttachment { path, bytes } => {
                if let Err(e) = crate::attachments::write(std::path::Path::new(&path), &bytes) {
                    log::error!("cannot write attachment {path}: {e}");
                }
            }
            Output::RemoveAttachments { dir } => {
                if let Err(e) = crate::attachments::remove(std::path::Path::new(&dir)) {
                    log::error!("cannot remove attachments {dir}: {e}");
                }
            }
            Output::Status { conn, mut report } => {
                let groups = procfs::group_rss();
                for p in &mut report.processes {
                    p.rss_kib = p.pid.and_then(|pid| groups.get(&pid)).map(|b| b / 1024);
                }
                report.memory_available = memory::available();
                let body = serde_json::to_string_pretty(&report).expect("status serialises");
                self.with_http(conn, |c| c.respond(&crate::wire::http::Response::json(200, body)));
            }
            Output::Metrics { conn, report } => {
                let text = report.render(&procfs::host_figures(&report.claude_pids));
                let content_type = ("content-type".into(), crate::wire::prometheus::CONTENT_TYPE.into());
                let response = crate::wire::http::Response { status: 200, headers: vec![content_type], body: text };
                self.with_http(conn, |c| c.respond(&response));
            }
            Output::Exit => self.exit = true,
        }
    }

    /// Apply an output to an HTTP connection, then push its bytes out.
    fn with_http(&mut self, conn: u64, f: impl FnOnce(&mut HttpConn)) {
        let token = Token(conn as usize);
        if let Some(Source::Http(c)) = self.sources.get_mut(&token) {
            f(c);
            self.flush_http(token);
        }
    }

    fn flush_http(&mut self, token: Token) {
        let Some(Source::Http(c)) = self.sources.get_mut(&token) else {
            return;
        };
        if !c.flush() {
            self.close(token);
            return;
        }
        // An answer completed: the next request may be waiting, in the buffer or in the socket
        // (edge-triggered: no new readiness comes for bytes already there). Served on the next
        // turn of the loop, so a long pipeline neither recurses nor starves other connections.
        if c.take_resume() && !self.pump.contains(&token) {
            self.pump.push(token);
        }
        if let Some(deadline) = c.deadline() {
            self.next_idle_check = self.next_idle_check.min(deadline);
        }
    }

    /// Tell the engine what memory the host has left and what each claude's group holds.
    fn read_memory(&mut self) {
        self.next_memory_check = Some(Instant::now() + MEMORY_SAMPLE);
        let Some(available) = memory::available() else { return };
        let groups = procfs::group_rss();
        let claudes = self.children.iter().map(|(proc, c)| (*proc, groups.get(&c.pid).copied().unwrap_or(0))).collect();
        self.feed(Input::Memory { available, groups: claudes });
    }

    /// Keep-alive connections with no request for `http_idle_timeout` are closed (a turn being
    /// answered is never cut: `turn_timeout` bounds those), and so are connections past their
    /// deadline: a bridge that did not say `hello` in time, a lingering close that lasts.
    fn close_idle_connections(&mut self) {
        let idle = self.config.http_idle_timeout;
        let now = Instant::now();
        let cutoff = now.checked_sub(idle);
        let mut next = now + idle / 4;
        let mut stale = Vec::new();
        for (token, source) in &self.sources {
            let (deadline, idle) = match source {
                Source::Http(c) => (c.deadline(), cutoff.is_some_and(|cutoff| c.idle_since_before(cutoff))),
                Source::Bridge(b) => (b.deadline(), false),
                Source::Terminal(_) => (None, false),
            };
            if idle || deadline.is_some_and(|d| d <= now) {
                stale.push(*token);
            } else if let Some(d) = deadline {
                next = next.min(d);
            }
        }
        self.next_idle_check = next;
        for token in stale {
            if let Some(Source::Bridge(_)) = self.sources.get(&token) {
                log::warn!("bridge {}: no hello within {:?}, closing", token.0, conn::HELLO_TIMEOUT);
            }
            self.close(token);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let max = self.config.max_connections;
                    if self.conns >= max + REFUSAL_ROOM {
                        continue; // closed at once: not even room for the 503
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
                        log::error!("cannot register a connection: {e}");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let full = self.conns >= max;
                    if full != self.refusing {
                        self.refusing = full;
                        if full {
                            log::warn!("{max} connections open (max_connections): refusing new ones with 503");
                        } else {
                            log::info!("below max_connections again: accepting connections");
                        }
                    }
                    let conn = if full {
                        let msg = format!("synthesis has {max} connections open (max_connections); retry shortly");
                        let err = crate::wire::openai::ApiError::new(503, "too_many_connections", msg).retry_after(1);
                        HttpConn::refused(stream, &crate::engine::error_response(&err))
                    } else {
                        HttpConn::new(stream)
                    };
                    self.conns += 1;
                    self.sources.insert(token, Source::Http(conn));
                    self.flush_http(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: the edge will not repeat, so retry after a short pause.
                    log::error!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    fn on_ready(&mut self, token: Token) {
        match self.sources.get_mut(&token) {
            Some(Source::Http(c)) => {
                let engine = &self.engine;
                let events = c.on_readable(self.config.max_body, &|req| engine.check_head(req));
                for ev in events {
                    self.on_http_event(token, ev);
                }
                // Reading may have produced an answer (a framing error) with no writable edge to come.
                self.flush_http(token);
            }
            Some(Source::Bridge(b)) => {
                let events = b.on_readable();
                self.on_bridge_events(token, events);
            }
            Some(Source::Terminal(proc)) => {
                let proc = *proc;
                self.drain_terminal(proc);
            }
            None => {}
        }
    }

    fn on_http_event(&mut self, token: Token, ev: HttpEvent) {
        let conn = token.0 as u64;
        match ev {
            HttpEvent::Request(request) => {
                let path = request.path.split('?').next().unwrap_or("");
                if path == crate::engine::HOOK_STOP || path == crate::engine::HOOK_STOP_FAILURE {
                    // The turn ends with this hook: its usage first.
                    if let Some(proc) = self.engine.process_of_hook(&request) {
                        self.read_usage(proc);
                    }
                }
                let unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                self.feed(Input::Http { conn, request, unix_secs });
            }
            HttpEvent::Upgrade(req, rest) => {
                let Some(Source::Http(c)) = self.sources.remove(&token) else {
                    return;
                };
                match c.into_websocket(rest, &req) {
                    Some(mut bridge) => {
                        // Frames may have arrived with the upgrade request.
                        let events = bridge.on_readable();
                        if let Some(deadline) = bridge.deadline() {
                            self.next_idle_check = self.next_idle_check.min(deadline);
                        }
                        self.sources.insert(token, Source::Bridge(bridge));
                        self.on_bridge_events(token, events);
                    }
                    None => {
                        log::warn!("bridge: bad WebSocket upgrade request, dropped");
                        self.conns -= 1;
                    }
                }
            }
            HttpEvent::Closed => self.close(token),
        }
    }

    fn on_bridge_events(&mut self, token: Token, events: Vec<BridgeEvent>) {
        let conn = token.0 as u64;
        for ev in events {
            match ev {
                BridgeEvent::Frame(frame) => {
                    if matches!(frame, FromChannel::ToolCall { .. } | FromChannel::PermissionRequest { .. }) {
                        // This ends a response (it asks the client): its usage first.
                        if let Some(proc) = self.engine.process_of_bridge(conn) {
                            self.read_usage(proc);
                        }
                    }
                    self.feed(Input::BridgeFrame { conn, frame })
                }
                BridgeEvent::Closed => self.close(token),
            }
        }
    }

    /// A connection ended: tell the engine now, forget the token at the end of the batch.
    fn close(&mut self, token: Token) {
        if self.dead.contains(&token) {
            return;
        }
        self.dead.push(token);
        let conn = token.0 as u64;
        match self.sources.get(&token) {
            Some(Source::Http(_)) => self.feed(Input::ConnClosed { conn }),
            Some(Source::Bridge(_)) => self.feed(Input::BridgeClosed { conn }),
            _ => {}
        }
    }

    fn forget(&mut self, token: Token) {
        match self.sources.remove(&token) {
            Some(Source::Http(mut c)) => {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.conns -= 1;
            }
            Some(Source::Bridge(mut b)) => {
                let _ = self.poll.registry().deregister(b.ws.get_mut());
                self.conns -= 1;
            }
            Some(Source::Terminal(_)) | None => {}
        }
    }

    fn spawn(&mut self, proc: ProcId, spec: &crate::engine::SpawnSpec) {
        let launch = Launch {
            config: &self.config,
            self_exe: &self.self_exe,
            addr: self.addr,
            workspace: &self.workspace,
            projects_dir: home().join(".claude").join("projects"),
        };
        let tmpdir = self.config.state_dir.join("tmp").join(proc.to_string());
        let resumed = launch.resumes(&spec.session_uuid);
        // From the transcript's present end: a resumed session's earlier calls are not this process's.
        let transcript = Some(Transcript::open(launch.transcript(&spec.session_uuid)));
        let flag = if resumed { "--resume" } else { "--session-id" };
        log::info!("process {proc}: starting {} {flag} {}", self.config.claude_command, spec.session_uuid);
        match launch.spawn(spec, resumed, &tmpdir) {
            Ok((pid, master)) => {
                let token = Token(self.next_token);
                self.next_token += 1;
                let fd = master.as_raw_fd();
                if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE) {
                    log::error!("cannot watch claude's terminal: {e}");
                }
                self.sources.insert(token, Source::Terminal(proc));
                self.children.insert(proc, Child { pid, master, token, transcript });
                self.feed(Input::Spawned { proc, pid, resumed });
            }
            Err(e) => self.feed(Input::SpawnFailed { proc, error: e.to_string() }),
        }
    }

    /// Feed the engine the usage claude's transcript gained since the last read.
    fn read_usage(&mut self, proc: ProcId) {
        let Some(t) = self.children.get_mut(&proc).and_then(|c| c.transcript.as_mut()) else { return };
        if let Some(read) = t.read() {
            self.feed(Input::Usage { proc, read });
        }
    }

    /// Keep reading claude's screen (it blocks when the terminal buffer fills).
    fn drain_terminal(&mut self, proc: ProcId) {
        let Some(child) = self.children.get(&proc) else {
            return;
        };
        let fd = child.master.as_raw_fd();
        let mut buf = [0u8; 16 * 1024];
        let mut text = String::new();
        loop {
            // SAFETY: reading into our own buffer from an open pty master.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                n if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n as usize])),
                0 => break,
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock, or EIO once every slave handle is closed.
                _ => break,
            }
        }
        if !text.is_empty() {
            self.feed(Input::Terminal { proc, text });
        }
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGCHLD => self.reap(),
                SIGHUP => self.upgrade(),
                _ => {
                    // The listener stays open: claude's hooks and bridges must still reach us so
                    // that every turn in flight can end; new chat requests get 503 meanwhile.
                    log::info!("signal {sig}: draining");
                    self.feed(Input::Shutdown);
                }
            }
        }
    }

    /// SIGHUP: re-execute the binary at our path in place, handing everything over. A binary
    /// that does not run or a config it refuses leaves this image running as it was.
    fn upgrade(&mut self) {
        if self.engine.shutting_down() {
            log::warn!("SIGHUP while shutting down: not upgrading");
            return;
        }
        let t = Instant::now();
        if let Err(e) = upgrade::check(&self.self_exe, self.config_path.as_deref()) {
            log::error!("SIGHUP: not upgrading, the running version goes on: {e}");
            return;
        }
        log::info!("SIGHUP: {} accepts the config; handing over after {:?}", self.self_exe.display(), t.elapsed());
        let handover = self.hand_over(Instant::now());
        let err = upgrade::exec(&self.self_exe, &handover);
        log::error!("SIGHUP: cannot execute {} ({err}); the running version goes on", self.self_exe.display());
    }

    fn hand_over(&mut self, now: Instant) -> Handover {
        let mut http = Vec::new();
        let mut bridges = Vec::new();
        for (token, source) in &mut self.sources {
            match source {
                Source::Http(c) => http.push(c.snapshot(token.0, now)),
                Source::Bridge(b) => {
                    b.flush();
                    bridges.push((token.0, b.ws.get_ref().as_raw_fd()));
                }
                Source::Terminal(_) => {}
            }
        }
        let children = self
            .children
            .iter()
            .map(|(proc, c)| ChildSnapshot {
                proc: *proc,
                pid: c.pid,
                master: c.master.as_raw_fd(),
                token: c.token.0,
                transcript: c.transcript.clone(),
            })
            .collect();
        Handover {
            engine: self.engine.export(now),
            listener: self.listener.as_raw_fd(),
            next_token: self.next_token,
            http,
            bridges,
            children,
        }
    }

    /// Collect every exited child and tell the engine, after a last read of its screen.
    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG on any child.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(proc) = self.children.iter().find(|(_, c)| c.pid == pid as u32).map(|(id, _)| *id) else {
                continue;
            };
            self.drain_terminal(proc);
            let child = self.children.remove(&proc).expect("child");
            let _ = self.poll.registry().deregister(&mut SourceFd(&child.master.as_raw_fd()));
            self.sources.remove(&child.token);
            let tmpdir = self.config.state_dir.join("tmp").join(proc.to_string());
            let _ = std::fs::remove_dir_all(tmpdir);
            self.feed(Input::Exited { proc, status: describe_status(status) });
        }
    }
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status}")
    }
}

/// Raise the soft limit on open files towards `want` (as far as the hard limit allows): the
/// usual soft limit of 1024 is too low for large `max_connections` or `max_processes`.
fn raise_fd_limit(want: usize) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want as libc::rlim_t {
            return;
        }
        let raised = libc::rlimit { rlim_cur: lim.rlim_max.min(want as libc::rlim_t), rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < want as libc::rlim_t {
        log::warn!(
            "only {} open files allowed: max_connections and max_processes need about {want}; \
             lower them or raise the limit (ulimit -n, supervisord minfds)",
            lim.rlim_cur
        );
    }
}
