//! `synthesis.conf`: `key = value` lines, `#` comments, durations like `15s`/`30m`,
//! each key overridable by the environment variable `SYNTHESIS_<KEY>`. The keys are one table, `KEYS`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::Permissions;

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
    pub permissions: Permissions,
    pub trace_file: Option<PathBuf>,
    pub http_idle_timeout: Duration,
    pub spare_processes: usize,
    pub min_free_memory: u64,
}

/// One configuration key. `KEYS` has one row per key, and everything about keys is derived from
/// it or checked against it: parsing, defaults, the `SYNTHESIS_<KEY>` environment overrides,
/// validation, the documented `synthesis.conf` and the README's table (tests keep those two in step).
pub struct Key {
    pub name: &'static str,
    /// The default, written as in `synthesis.conf` (`""`: none).
    pub default: &'static str,
    /// What it means, for the README's table.
    pub doc: &'static str,
    set: fn(&mut Config, &str) -> Result<(), String>,
}

impl Key {
    /// The environment variable that overrides it.
    pub fn env(&self) -> String {
        format!("SYNTHESIS_{}", self.name.to_ascii_uppercase())
    }
}

macro_rules! key {
    ($name:ident, $default:expr, $doc:expr, |$c:ident, $v:ident| $set:expr) => {
        Key {
            name: stringify!($name),
            default: $default,
            doc: $doc,
            set: |$c, $v| {
                $c.$name = $set;
                Ok(())
            },
        }
    };
}

pub const KEYS: &[Key] = &[
    key!(listen, "127.0.0.1:8787", "API, bridge and hook listener; non-loopback only with `api_key`", |c, v| {
        v.parse().map_err(|_| format!("not an address: {v:?}"))?
    }),
    key!(api_key, "", "bearer token clients must send; unset = no check", |c, v| optional(v)),
    key!(state_dir, "state", "session map, attachments (images and files for Claude) and each claude's `TMPDIR`", |c, v| PathBuf::from(v)),
    key!(workspace, "workspace", "claude's working directory (created if missing); claude must trust it", |c, v| {
        PathBuf::from(nonempty(v)?)
    }),
    key!(claude_command, "claude", "the Claude Code CLI", |c, v| nonempty(v)?.to_string()),
    key!(claude_args, "", "extra arguments for claude (space-separated)", |c, v| {
        v.split_whitespace().map(String::from).collect()
    }),
    key!(permission_mode, "default", "claude's `--permission-mode`", |c, v| one_of(v, PERMISSION_MODES)?.to_string()),
    key!(allowed_tools, "mcp__synthesis__*", "claude's `--allowed-tools`", |c, v| v.to_string()),
    key!(model, "claude-code", "model id listed by `/v1/models` (any requested name is accepted)", |c, v| {
        nonempty(v)?.to_string()
    }),
    key!(max_processes, "8", "claude processes alive at once", |c, v| positive(v)?),
    key!(
        max_connections,
        "512",
        "client, hook and bridge connections at once (503 beyond); fits a 1024 open-files limit",
        |c, v| positive(v)?
    ),
    key!(
        spare_processes,
        "1",
        "warm claudes kept ready for new conversations (first turn without a spawn)",
        |c, v| v.parse().map_err(|_| format!("expected a count, not {v:?}"))?
    ),
    key!(
        min_free_memory,
        "512MiB",
        "memory kept available on the host; idle claudes are stopped to keep it (`0`: off)",
        |c, v| size(v)?
    ),
    key!(queue_depth, "8", "requests waiting per session before 429", |c, v| positive(v)?),
    key!(max_body, "4194304", "largest request body (413 beyond); images in the history count, raise it for photos", |c, v| positive(v)?),
    key!(ready_timeout, "15s", "spawn → channel ready, else the request fails", |c, v| duration(v)?),
    key!(idle_timeout, "30m", "idle processes are stopped after this ...", |c, v| duration(v)?),
    key!(idle_sweep, "60s", "... checked this often", |c, v| duration(v)?),
    key!(turn_timeout, "60m", "a longer turn is interrupted (one ESC) and answered 504", |c, v| duration(v)?),
    key!(
        trust_workspace,
        "no",
        "`yes`: answer Claude Code's workspace-trust question with \"Yes, I trust this folder\" instead of failing with advice",
        |c, v| yes_no(v)?
    ),
    key!(
        retry_grace,
        "10s",
        "a turn whose client left keeps running this long for an identical retry to attach",
        |c, v| duration(v)?
    ),
    key!(tools_allow, "*", "client (OpenClaw) tools offered to Claude as `mcp__synthesis__<name>`", |c, v| names(v)),
    key!(tools_deny, "", "client tools withheld from Claude", |c, v| names(v)),
    key!(
        permissions,
        "relay",
        "Claude's permission prompts: `relay` to the user, or `allow` / `deny` them all",
        |c, v| match v {
            "relay" => Permissions::Relay,
            "allow" => Permissions::Allow,
            "deny" => Permissions::Deny,
            _ => return Err(format!("relay, allow or deny, not {v:?}")),
        }
    ),
    key!(
        trace_file,
        "",
        "opt-in JSONL trace of engine inputs, ids and outputs, replayable with `synthesis::trace::replay`",
        |c, v| optional(v).map(PathBuf::from)
    ),
    key!(
        http_idle_timeout,
        "120s",
        "keep-alive client connections idle this long are closed",
        |c, v| duration(v)?
    ),
];

/// `SYNTHESIS_*` variables synthesis sets for itself (the channel's bridge, claude's hooks, an
/// in-place upgrade): not configuration, so no warning names them.
pub const INTERNAL_ENV: &[&str] = &[
    crate::wire::bridge::ENV_URL,
    crate::wire::bridge::ENV_TOKEN,
    crate::shell::spawn::HOOK_TOKEN_ENV,
    crate::shell::UPGRADE_ENV,
    crate::shell::MEMINFO_ENV,
];

const PERMISSION_MODES: &[&str] = &["default", "acceptEdits", "auto", "bypassPermissions", "dontAsk", "plan"];

impl Default for Config {
    /// Every key at its default (`KEYS`).
    fn default() -> Self {
        let mut c = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: None,
            state_dir: PathBuf::new(),
            workspace: PathBuf::new(),
            claude_command: String::new(),
            claude_args: Vec::new(),
            permission_mode: String::new(),
            allowed_tools: String::new(),
            model: String::new(),
            max_processes: 0,
            spare_processes: 0,
            min_free_memory: 0,
            max_connections: 0,
            queue_depth: 0,
            max_body: 0,
            ready_timeout: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            idle_sweep: Duration::ZERO,
            turn_timeout: Duration::ZERO,
            trust_workspace: false,
            retry_grace: Duration::ZERO,
            tools_allow: Vec::new(),
            tools_deny: Vec::new(),
            permissions: Permissions::Relay,
            trace_file: None,
            http_idle_timeout: Duration::ZERO,
        };
        for k in KEYS {
            (k.set)(&mut c, k.default).unwrap_or_else(|e| panic!("default of {}: {e}", k.name));
        }
        c
    }
}

impl Config {
    /// Parse a config file's text, then apply `SYNTHESIS_<KEY>` overrides from `env`.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let mut cfg = Config::default();
        let mut seen: Vec<(&str, usize)> = Vec::new();
        for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line {n}: expected `key = value`"))?;
            let key = key.trim();
            let k = KEYS.iter().find(|k| k.name == key).ok_or_else(|| format!("line {n}: unknown key {key:?}"))?;
            if let Some((_, first)) = seen.iter().find(|(name, _)| *name == k.name) {
                return Err(format!("line {n}: {key} is already set on line {first}"));
            }
            seen.push((k.name, n));
            (k.set)(&mut cfg, value.trim()).map_err(|e| format!("line {n}: {key}: {e}"))?;
        }
        for k in KEYS {
            if let Some(value) = env(&k.env()) {
                (k.set)(&mut cfg, value.trim()).map_err(|e| format!("environment variable {}: {e}", k.env()))?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: Option<&str>) -> Result<Config, String> {
        for name in unknown_env(std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned())) {
            log::warn!("ignoring environment variable {name}: synthesis has no such setting (see synthesis.conf)");
        }
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"))?,
            None => String::new(),
        };
        let mut config = Config::parse(&text, |k| std::env::var(k).ok()).map_err(|e| match path {
            Some(p) => format!("{p}: {e}"),
            None => e,
        })?;
        // claude runs in the workspace and reads its files from the state dir (MCP config,
        // settings, attachments): a relative path would point into the workspace.
        config.state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))?;
        Ok(config)
    }

    /// The workspace as an absolute path, created if it is missing (a new folder: claude will
    /// ask whether to trust it).
    pub fn workspace_dir(&self) -> std::io::Result<PathBuf> {
        if !self.workspace.exists() {
            std::fs::create_dir_all(&self.workspace)?;
            log::warn!("created the workspace {} (claude will ask whether to trust it)", self.workspace.display());
        }
        self.workspace.canonicalize()
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

/// `SYNTHESIS_*` variable names that are neither a key's override nor synthesis's own.
pub fn unknown_env(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut unknown: Vec<String> = names
        .filter(|n| n.starts_with("SYNTHESIS_"))
        .filter(|n| !INTERNAL_ENV.contains(&n.as_str()) && !KEYS.iter().any(|k| k.env() == *n))
        .collect();
    unknown.sort();
    unknown
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_string())
}

fn nonempty(value: &str) -> Result<&str, String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(value)
}

fn one_of<'a>(value: &'a str, allowed: &[&str]) -> Result<&'a str, String> {
    if !allowed.contains(&value) {
        return Err(format!("one of {}, not {value:?}", allowed.join(", ")));
    }
    Ok(value)
}

fn positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a positive integer, not {value:?}")),
    }
}

/// Names separated by commas and/or spaces.
fn names(value: &str) -> Vec<String> {
    value.split([',', ' ']).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn yes_no(value: &str) -> Result<bool, String> {
    match value {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(format!("expected yes or no, not {value:?}")),
    }
}

/// `500ms`, `15s`, `30m`, `2h`; a bare number is seconds.
fn duration(value: &str) -> Result<Duration, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("expected a duration like 15s, not {value:?}"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Bytes: `0`, `512MiB`, `2GiB`, `800MB`, `65536`.
fn size(value: &str) -> Result<u64, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (num, unit) = value.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("expected a size like 512MiB, not {value:?}"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("unknown unit {u:?} (use B, KiB, MiB, GiB, kB, MB or GB)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{value:?} is too large"))
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
        assert!(parse("ready_timeout = 5 parsecs").unwrap_err().starts_with("line 1: ready_timeout: "));
        assert!(parse("max_processes = 0").is_err());
        assert!(parse("just words").unwrap_err().contains("line 1"));
        assert_eq!(parse("model = a\n\nmodel = b").unwrap_err(), "line 3: model is already set on line 1");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::parse("max_processes = 3", |k| (k == "SYNTHESIS_MAX_PROCESSES").then(|| "5".into()));
        assert_eq!(c.unwrap().max_processes, 5);
    }

    #[test]
    fn every_key_has_its_environment_override_and_a_bad_value_names_the_variable() {
        for k in KEYS {
            let value = "x-from-env";
            match Config::parse("", |name| (name == k.env()).then(|| value.to_string())) {
                Err(e) => assert!(e.starts_with(&format!("environment variable {}: ", k.env())), "{e}"),
                Ok(c) => assert!(format!("{c:?}").contains(value), "{} ignored", k.env()),
            }
        }
        let e = Config::parse("", |k| (k == "SYNTHESIS_TRUST_WORKSPACE").then(|| "maybe".into())).unwrap_err();
        assert_eq!(e, "environment variable SYNTHESIS_TRUST_WORKSPACE: expected yes or no, not \"maybe\"");
    }

    #[test]
    fn unknown_synthesis_variables_are_named_but_not_synthesis_own() {
        let names = ["SYNTHESIS_API_KEY", "SYNTHESIS_APIKEY", "SYNTHESIS_HOOK_TOKEN", "SYNTHESIS_UPGRADE_FD", "HOME"];
        assert_eq!(unknown_env(names.iter().map(|n| n.to_string())), vec!["SYNTHESIS_APIKEY"]);
        assert!(INTERNAL_ENV.contains(&"SYNTHESIS_BRIDGE_URL") && INTERNAL_ENV.contains(&"SYNTHESIS_BRIDGE_TOKEN"));
    }

    #[test]
    fn refuses_a_public_listener_without_api_key() {
        assert!(parse("listen = 0.0.0.0:8787").unwrap_err().contains("api_key"));
        assert!(parse("listen = 0.0.0.0:8787\napi_key = k").is_ok());
    }

    /// `synthesis.conf` documents every key, at its default, in the table's order.
    #[test]
    fn the_shipped_config_is_the_table() {
        let text = include_str!("../synthesis.conf");
        let shipped: Vec<(&str, &str)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once('=').map(|(k, v)| (k.trim(), v.trim())).expect("key = value"))
            .collect();
        let table: Vec<(&str, &str)> = KEYS.iter().map(|k| (k.name, k.default)).collect();
        assert_eq!(shipped, table, "synthesis.conf and config::KEYS differ");
        parse(text).unwrap();
    }

    /// The README's configuration table is the table.
    #[test]
    fn the_readme_table_is_the_table() {
        let mut rows = vec!["| key | default | meaning |".to_string(), "|---|---|---|".to_string()];
        for k in KEYS {
            let default = if k.default.is_empty() { "(none)".to_string() } else { format!("`{}`", k.default) };
            rows.push(format!("| `{}` | {default} | {} |", k.name, k.doc));
        }
        let readme = include_str!("../README.md");
        let found: Vec<&str> =
            readme.lines().skip_while(|l| *l != rows[0]).take_while(|l| l.starts_with('|')).collect();
        assert_eq!(found, rows, "README.md's key table should read:\n{}", rows.join("\n"));
    }
}
