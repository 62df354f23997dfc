//! synthesis: OpenClaw's model provider backed by long-lived interactive Claude Code processes.

pub mod attachments;
pub mod channel;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod logging;
pub mod openclaw_config;
pub mod persist;
pub mod shell;
pub mod trace;
pub mod wire;
