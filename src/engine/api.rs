//! The HTTP surface: OpenAI endpoints for clients and hook endpoints for claude.

use std::time::Instant;

use serde_json::{json, Value};

use super::openclaw::fingerprint;
use super::pool::is_spare_key;
use super::turn::{error_response, Answer};
use super::{ConnId, Engine, Output, ProcId, ProcessStatus, SessionStatus, StatusReport};
use crate::wire::http::{Request, Response};
use crate::wire::openai::{ApiError, ChatRequest};

pub const HOOK_STOP: &str = "/hooks/stop";
pub const HOOK_STOP_FAILURE: &str = "/hooks/stop-failure";
pub const HOOK_PROMPT: &str = "/hooks/prompt";

impl Engine {
    pub(super) fn on_http(&mut self, now: Instant, conn: ConnId, req: Request, unix_secs: u64) {
        let path = req.path.split('?').next().unwrap_or("");
        let result = match (req.method.as_str(), path) {
            ("GET", "/healthz") => Ok(Some(Response::json(200, json!({"status": "ok"}).to_string()))),
            // Readiness for load balancers: not ready once draining, so no new session comes here.
            ("GET", "/readyz") if self.shutting_down() => Err(shutting_down()),
            ("GET", "/readyz") => Ok(Some(Response::json(200, json!({"status": "ready"}).to_string()))),
            ("GET", "/v1/models") => self.authorize(&req).map(|()| Some(self.models())),
            ("GET", "/status") => self.authorize(&req).map(|()| {
                let report = self.status(now);
                self.push(Output::Status { conn, report });
                None
            }),
            ("GET", "/metrics") => self.authorize(&req).map(|()| {
                let report = self.metrics_report();
                self.push(Output::Metrics { conn, report });
                None
            }),
            ("POST", "/v1/chat/completions") => {
                self.authorize(&req).and_then(|()| self.chat(now, conn, &req, unix_secs)).map(|()| None)
            }
            ("POST", HOOK_STOP) => self.hook(now, conn, &req, Hook::Stop).map(|()| None),
            ("POST", HOOK_STOP_FAILURE) => self.hook(now, conn, &req, Hook::StopFailure).map(|()| None),
            ("POST", HOOK_PROMPT) => self.hook(now, conn, &req, Hook::PromptSubmit).map(|()| None),
            (
                _,
                "/healthz"
                | "/readyz"
                | "/status"
                | "/metrics"
                | "/v1/models"
                | "/v1/chat/completions"
                | HOOK_STOP
                | HOOK_STOP_FAILURE
                | HOOK_PROMPT,
            ) => Err(ApiError::new(405, "method_not_allowed", format!("{} is not allowed on {path}", req.method))),
            _ => Err(ApiError::new(404, "not_found", format!("no such endpoint: {} {path}", req.method))),
        };
        match result {
            Ok(Some(response)) => self.push(Output::Respond { conn, response }),
            Ok(None) => {}
            Err(e) => self.push(Output::Respond { conn, response: error_response(&e) }),
        }
    }

    /// Whether the body of a request may be read, decided on its head (the shell asks before
    /// buffering the body): without the API key or a known hook token, the answer is a 401 at
    /// once. The engine checks again when the whole request arrives. Only the probes are open
    /// to all (any other path needs the key, even to learn that it does not exist).
    pub fn check_head(&self, req: &Request) -> Result<(), ApiError> {
        match req.path.split('?').next().unwrap_or("") {
            "/healthz" | "/readyz" => Ok(()),
            HOOK_STOP | HOOK_STOP_FAILURE | HOOK_PROMPT => self.hook_process(req).map(|_| ()),
            _ => self.authorize(req),
        }
    }

    fn hook_process(&self, req: &Request) -> Result<ProcId, ApiError> {
        req.bearer()
            .and_then(|t| self.process_by_hook_token(t))
            .ok_or_else(|| ApiError::new(401, "invalid_hook_token", "hook token unknown"))
    }

    fn authorize(&self, req: &Request) -> Result<(), ApiError> {
        let Some(key) = &self.settings.api_key else {
            return Ok(());
        };
        match req.bearer() {
            Some(token) if super::bounds::constant_time_eq(token.as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(
                401,
                "invalid_api_key",
                "wrong API key: send the api_key of synthesis.conf as the bearer token",
            )),
            None => Err(ApiError::new(401, "missing_api_key", "missing `Authorization: Bearer <api_key>` header")),
        }
    }

    fn status(&self, now: Instant) -> StatusReport {
        let mut sessions: Vec<SessionStatus> = self
            .st
            .sessions
            .values()
            .filter(|s| !is_spare_key(&s.key))
            .map(|s| SessionStatus {
                key: s.key.clone(),
                claude_session: s.uuid.clone(),
                process: s.proc,
                turn_in_flight: s.current.is_some(),
                queued: s.queue.len(),
                turns: s.turns,
                last_used: s.last_used,
            })
            .collect();
        sessions.sort_by(|a, b| a.key.cmp(&b.key));
        let busy = |p: &ProcessStatus| self.st.sessions.get(&p.session).is_some_and(|s| !s.is_idle());
        let mut processes: Vec<ProcessStatus> = self.st.procs.iter().map(|(id, p)| p.status(*id, now)).collect();
        for p in processes.iter_mut().filter(|p| busy(p)) {
            p.idle_secs = 0; // a turn is in flight or queued
        }
        processes.sort_by_key(|p| p.id);
        StatusReport {
            shutting_down: self.shutting_down(),
            save_error: self.st.save_error.clone(),
            memory_available: None,
            min_free_memory: self.settings.min_free_memory,
            sessions,
            processes,
        }
    }

    fn models(&self) -> Response {
        let model = json!({"id": self.settings.model, "object": "model", "created": 0, "owned_by": "synthesis"});
        Response::json(200, json!({"object": "list", "data": [model]}).to_string())
    }

    /// Admit a chat-completions request; the answer comes later.
    fn chat(&mut self, now: Instant, conn: ConnId, req: &Request, unix_secs: u64) -> Result<(), ApiError> {
        if self.shutting_down() {
            return Err(shutting_down());
        }
        let body: ChatRequest = serde_json::from_str(&req.body).map_err(|e| {
            let what = if e.is_data() { "is not a chat completions request" } else { "is not valid JSON" };
            ApiError::new(400, "invalid_request", format!("request body {what}: {e}"))
        })?;
        let key = session_key(req, &body)?;
        super::bounds::check_key(&key)?;
        self.chat_turn(now, conn, unix_secs, key, &body, fingerprint(&req.body))
    }

    /// Stop / StopFailure from claude's HTTP hooks: answered at once (the hook blocks claude),
    /// then the turn in flight ends.
    fn hook(&mut self, now: Instant, conn: ConnId, req: &Request, kind: Hook) -> Result<(), ApiError> {
        let id = self.hook_process(req)?;
        let body: Value = serde_json::from_str(&req.body)
            .map_err(|e| ApiError::new(400, "invalid_request", format!("hook body is not valid JSON: {e}")))?;
        // Claude waits for its hooks: answer before anything else.
        self.push(Output::Respond { conn, response: Response::json(200, "{}".into()) });
        let text_of = |field: &str| body.get(field).and_then(Value::as_str).unwrap_or("").to_string();
        match kind {
            Hook::PromptSubmit => self.on_prompt_submitted(id, &text_of("prompt")),
            Hook::Stop => self.on_stop(now, id, Ok(text_of("last_assistant_message"))),
            Hook::StopFailure => self.on_stop(now, id, Err(text_of("error"))),
        }
        Ok(())
    }

    /// Turn end: `last` is `last_assistant_message` (Stop) or the API error (StopFailure).
    fn on_stop(&mut self, now: Instant, id: ProcId, last: Result<String, String>) {
        let p = self.st.procs.get_mut(&id).expect("process of hook token");
        let key = p.session.clone();
        if p.settle_until.take().is_some() {
            // The interrupted turn ended after all; the process is free again.
            log::info!("session {key}: late Stop after an interrupt");
            self.deliver_next(now, &key);
            return;
        }
        let Some(turn) = self.st.sessions.get(&key).and_then(|s| s.current.as_ref()) else {
            log::info!("session {key}: Stop hook with no turn in flight");
            return;
        };
        if turn.awaits_usage() {
            log::info!("session {key}: another Stop hook for {}", turn.chat_id);
            return;
        }
        match last {
            Err(error) => {
                let msg = format!("Claude's model API call failed: {error}");
                self.end_turn(now, &key, Answer::Error(ApiError::new(502, "claude_api_error", msg)));
            }
            Ok(last) => {
                if turn.replies.is_empty() && !last.is_empty() {
                    // No `reply` call: the final assistant text is the answer (maybe empty).
                    let chat_id = turn.chat_id.clone();
                    self.on_reply(now, &key, &chat_id, last);
                }
                self.finish_turn(now, id, &key);
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Hook {
    PromptSubmit,
    Stop,
    StopFailure,
}

/// The OpenClaw session a request belongs to. OpenClaw sends its session id only with the
/// compat flags `sendSessionAffinityHeaders` / `supportsPromptCacheKey`; other clients may send `user`.
/// Without any of them the request is refused: guessing could mix two conversations.
pub fn session_key(req: &Request, body: &ChatRequest) -> Result<String, ApiError> {
    let headers = ["x-session-affinity", "session_id"].into_iter().filter_map(|h| req.header(h));
    let fields = [&body.prompt_cache_key, &body.user].into_iter().filter_map(|f| f.as_deref());
    let key = headers.chain(fields).map(str::trim).find(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::new(
            400,
            "missing_session_key",
            "no session key: send the x-session-affinity header (OpenClaw: set compat.sendSessionAffinityHeaders \
                 and compat.supportsPromptCacheKey on the model), or prompt_cache_key or user in the body",
        )
    })?;
    if key.chars().any(char::is_control) {
        return Err(ApiError::new(400, "invalid_session_key", "the session key contains control characters"));
    }
    Ok(key.to_string())
}

/// The answer to new work while draining: safe to retry elsewhere, it never reached Claude.
pub(super) fn shutting_down() -> ApiError {
    ApiError::new(503, "shutting_down", "synthesis is shutting down; retry shortly").retry_after(5)
}
