//! `synthesis.conf`: `key = value` lines, `#` comments, durations like `15s`/`30m`,
//! each key overridable by the environment variable `SYNTHESIS_<KEY>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub api_key: Option<String>,
    pub state_dir: PathBuf,
    pub workspace: PathBuf,
    pub claude_command: String,
    pub claude_args: Vec<String>,
    pub permission_mode: String,
    pub allowed_tools: String,
    pub model: String,
    pub max_processes: usize,
    pub max_connections: usize,
    pub queue_depth: usize,
    pub max_body: usize,
    pub ready_timeout: Duration,
    pub idle_timeout: Duration,
    pub idle_sweep: Duration,
    pub turn_timeout: Duration,
    pub trust_workspace: bool,
    pub retry_grace: Duration,
    pub tools_allow: Vec<String>,
    pub tools_deny: Vec<String>,
    pub permissions: crate::engine::Permissions,
    pub trace_file: Option<PathBuf>,
    pub http_idle_timeout: Duration,
    pub spare_processes: usize,
    pub min_free_memory: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8787".parse().unwrap(),
            api_key: None,
            state_dir: PathBuf::from("state"),
            workspace: PathBuf::from("."),
            claude_command: "claude".into(),
            claude_args: Vec::new(),
            permission_mode: "default".into(),
            allowed_tools: "mcp__synthesis__*".into(),
            model: "claude-code".into(),
            max_processes: 8,
            max_connections: 512,
            queue_depth: 8,
            max_body: 4 * 1024 * 1024,
            ready_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30 * 60),
            idle_sweep: Duration::from_secs(60),
            turn_timeout: Duration::from_secs(60 * 60),
            trust_workspace: false,
            retry_grace: Duration::from_secs(10),
            tools_allow: vec!["*".into()],
            tools_deny: Vec::new(),
            permissions: crate::engine::Permissions::Relay,
            trace_file: None,
            http_idle_timeout: Duration::from_secs(120),
            spare_processes: 1,
            min_free_memory: 512 << 20,
        }
    }
}

const KEYS: &[&str] = &[
    "listen",
    "api_key",
    "state_dir",
    "workspace",
    "claude_command",
    "claude_args",
    "permission_mode",
    "allowed_tools",
    "model",
    "max_processes",
    "max_connections",
    "queue_depth",
    "max_body",
    "ready_timeout",
    "idle_timeout",
    "idle_sweep",
    "turn_timeout",
    "spare_processes",
    "min_free_memory",
];

const PERMISSION_MODES: &[&str] = &["default", "acceptEdits", "auto", "bypassPermissions", "dontAsk", "plan"];

impl Config {
    /// Parse a config file's text, then apply `SYNTHESIS_<KEY>` overrides from `env`.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let mut cfg = Config::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line {}: expected `key = value`", n + 1))?;
            cfg.set(key.trim(), value.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        }
        for key in KEYS {
            if let Some(value) = env(&format!("SYNTHESIS_{}", key.to_ascii_uppercase())) {
                cfg.set(key, value.trim()).map_err(|e| format!("SYNTHESIS_{}: {e}", key.to_ascii_uppercase()))?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: Option<&str>) -> Result<Config, String> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"))?,
            None => String::new(),
        };
        Config::parse(&text, |k| std::env::var(k).ok()).map_err(|e| format!("{}: {e}", path.unwrap_or("environment")))
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "listen" => self.listen = value.parse().map_err(|_| format!("listen: not an address: {value:?}"))?,
            "api_key" => self.api_key = (!value.is_empty()).then(|| value.to_string()),
            "state_dir" => self.state_dir = PathBuf::from(value),
            "workspace" => self.workspace = PathBuf::from(value),
            "claude_command" => self.claude_command = value.to_string(),
            "claude_args" => self.claude_args = value.split_whitespace().map(String::from).collect(),
            "permission_mode" => {
                if !PERMISSION_MODES.contains(&value) {
                    return Err(format!("permission_mode: one of {PERMISSION_MODES:?}, not {value:?}"));
                }
                self.permission_mode = value.to_string();
            }
            "allowed_tools" => self.allowed_tools = value.to_string(),
            "model" => self.model = value.to_string(),
            "max_processes" => self.max_processes = positive(key, value)?,
            "max_connections" => self.max_connections = positive(key, value)?,
            "spare_processes" => {
                self.spare_processes = value.parse().map_err(|_| format!("{key}: expected a count, not {value:?}"))?
            }
            "min_free_memory" => self.min_free_memory = size(key, value)?,
            "queue_depth" => self.queue_depth = positive(key, value)?,
            "max_body" => self.max_body = positive(key, value)?,
            "ready_timeout" => self.ready_timeout = duration(key, value)?,
            "idle_timeout" => self.idle_timeout = duration(key, value)?,
            "idle_sweep" => self.idle_sweep = duration(key, value)?,
            "turn_timeout" => self.turn_timeout = duration(key, value)?,
            "trust_workspace" => self.trust_workspace = yes_no(key, value)?,
            "retry_grace" => self.retry_grace = duration(key, value)?,
            "tools_allow" => self.tools_allow = names(value),
            "tools_deny" => self.tools_deny = names(value),
            "http_idle_timeout" => self.http_idle_timeout = duration(key, value)?,
            "trace_file" => self.trace_file = (!value.is_empty()).then(|| PathBuf::from(value)),
            "permissions" => {
                use crate::engine::Permissions;
                self.permissions = match value {
                    "relay" => Permissions::Relay,
                    "allow" => Permissions::Allow,
                    "deny" => Permissions::Deny,
                    _ => return Err(format!("permissions: relay, allow or deny, not {value:?}")),
                }
            }
            _ => return Err(format!("unknown key {key:?}")),
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && self.api_key.is_none() {
            return Err(format!(
                "listen = {} is not a loopback address: set api_key before exposing synthesis",
                self.listen
            ));
        }
        Ok(())
    }
}

fn positive(key: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{key}: expected a positive integer, not {value:?}")),
    }
}

/// Names separated by commas and/or spaces.
fn names(value: &str) -> Vec<String> {
    value.split([',', ' ']).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn yes_no(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(format!("{key}: expected yes or no, not {value:?}")),
    }
}

/// `500ms`, `15s`, `30m`, `2h`; a bare number is seconds.
fn duration(key: &str, value: &str) -> Result<Duration, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{key}: expected a duration like 15s, not {value:?}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{key}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err(format!("{key}: must be more than zero"));
    }
    Ok(d)
}

/// Bytes: `0`, `512MiB`, `2GiB`, `800MB`, `65536`.
fn size(key: &str, value: &str) -> Result<u64, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{key}: expected a size like 512MiB, not {value:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("{key}: unknown unit {u:?} (use B, KiB, MiB, GiB, kB, MB or GB)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{key}: {value:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, |_| None)
    }

    #[test]
    fn reads_keys_comments_and_durations() {
        let c = parse("# c\nready_timeout = 2s\nidle_timeout=30m\nclaude_args = --a  b\n").unwrap();
        assert_eq!(c.ready_timeout, Duration::from_secs(2));
        assert_eq!(c.idle_timeout, Duration::from_secs(1800));
        assert_eq!(c.claude_args, vec!["--a", "b"]);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("\nbogus = 1").unwrap_err(), "line 2: unknown key \"bogus\"");
        assert!(parse("ready_timeout = 5 parsecs").unwrap_err().starts_with("line 1: ready_timeout"));
        assert!(parse("max_processes = 0").is_err());
        assert!(parse("just words").unwrap_err().contains("line 1"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::parse("max_processes = 3", |k| (k == "SYNTHESIS_MAX_PROCESSES").then(|| "5".into()));
        assert_eq!(c.unwrap().max_processes, 5);
    }

    #[test]
    fn refuses_a_public_listener_without_api_key() {
        assert!(parse("listen = 0.0.0.0:8787").unwrap_err().contains("api_key"));
        assert!(parse("listen = 0.0.0.0:8787\napi_key = k").is_ok());
    }

    #[test]
    fn the_shipped_config_parses() {
        parse(include_str!("../synthesis.conf")).unwrap();
    }
}
