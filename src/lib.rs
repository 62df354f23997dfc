//! synthesis: OpenClaw's model provider backed by long-lived interactive Claude Code processes.

pub mod config;
pub mod engine;
pub mod wire;
