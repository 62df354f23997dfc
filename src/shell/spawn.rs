//! Starting claude the way the real CLI needs it: interactive, on a pseudo-terminal, in its own
//! session and process group, with the synthesis channel and HTTP hooks in owner-only files
//! (any local user can read a command line in /proc, so no token is ever in argv).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::config::Config;
use crate::engine::SpawnSpec;
use crate::wire::bridge;

pub const HOOK_TOKEN_ENV: &str = "SYNTHESIS_HOOK_TOKEN";
/// In claude's private directory: the `--mcp-config` (with the bridge token) and `--settings` files.
pub const MCP_CONFIG_FILE: &str = "mcp-config.json";
pub const SETTINGS_FILE: &str = "settings.json";
/// The terminal claude gets. Its size changes neither claude's memory nor its start-up
/// (80×24 and 40×10 measured the same): wide enough that screens synthesis reads stay whole.
const COLS: u16 = 200;
const ROWS: u16 = 50;

/// JavaScriptCore settings for claude's Bun runtime, measured to cut an interactive claude's
/// memory (docs/claude-footprint.md): no optimising (DFG/FTL) JIT, whose compilations leave
/// ~20 MB behind, and heap sizing as on a 256 MiB machine, so that garbage is collected instead
/// of kept (~45 MB after 20 turns), for ~0.06 s more CPU per turn. Each is set only where
/// synthesis's own environment does not set it (an operator's value wins, e.g.
/// `BUN_JSC_useDFGJIT=1`), and only if claude starts with them: Bun refuses to start on a
/// `BUN_JSC_` option it does not know, and these are not a stable interface.
pub const RUNTIME_ENV: [(&str, &str); 2] = [("BUN_JSC_useDFGJIT", "0"), ("BUN_JSC_forceRAMSize", "268435456")];

/// Everything a spawn needs to know about where synthesis runs.
pub struct Launch<'a> {
    pub config: &'a Config,
    /// Absolute path of this binary: claude runs it as `synthesis channel`.
    pub self_exe: &'a Path,
    /// The listener's address, as claude's hooks and channel must reach it.
    pub addr: SocketAddr,
    /// Absolute workspace: claude's cwd.
    pub workspace: &'a Path,
    /// Where Claude Code keeps transcripts: `$HOME/.claude/projects`.
    pub projects_dir: PathBuf,
}

impl Launch<'_> {
    /// `--resume` when the session's transcript exists, else `--session-id` (claude refuses
    /// to resume an unknown session and to reuse a known id).
    pub fn resumes(&self, uuid: &str) -> bool {
        self.transcript(uuid).exists()
    }

    /// Where claude writes the session's transcript.
    pub fn transcript(&self, uuid: &str) -> PathBuf {
        self.projects_dir.join(project_dir_name(self.workspace)).join(format!("{uuid}.jsonl"))
    }

    /// The `--mcp-config` contents: the channel, with its bridge URL and one-time token.
    pub fn mcp_config(&self, spec: &SpawnSpec) -> Value {
        json!({"mcpServers": {"synthesis": {
            "command": self.self_exe.to_string_lossy(),
            "args": ["channel"],
            "env": {
                bridge::ENV_URL: format!("ws://{}{}", loopback(self.addr), bridge::PATH),
                bridge::ENV_TOKEN: spec.bridge_token,
            },
        }}})
    }

    /// The `--settings` contents: HTTP hooks whose token claude takes from its environment.
    pub fn settings(&self) -> Value {
        let base = format!("http://{}", loopback(self.addr));
        let hook = |path: &str| {
            json!([{"hooks": [{
                "type": "http",
                "url": format!("{base}{path}"),
                "headers": {"Authorization": format!("Bearer ${HOOK_TOKEN_ENV}")},
                "allowedEnvVars": [HOOK_TOKEN_ENV],
            }]}])
        };
        json!({"hooks": {
            "Stop": hook(crate::engine::HOOK_STOP),
            "StopFailure": hook(crate::engine::HOOK_STOP_FAILURE),
            "UserPromptSubmit": hook(crate::engine::HOOK_PROMPT),
        }})
    }

    /// claude's command line; `dir` is its private directory with the two files `spawn` writes.
    pub fn args(&self, spec: &SpawnSpec, resume: bool, dir: &Path) -> Vec<String> {
        let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let c = self.config;
        let session_flag = if resume { "--resume" } else { "--session-id" };
        // Claude may Read the images and files synthesis wrote for it, and nothing else beyond
        // what allowed_tools grants.
        let allowed_tools = format!("{} {}", c.allowed_tools, crate::attachments::read_rule(&c.state_dir));
        let mut args: Vec<String> = [
            "--dangerously-load-development-channels",
            "server:synthesis",
            "--mcp-config",
            &file(MCP_CONFIG_FILE),
            "--strict-mcp-config",
            "--settings",
            &file(SETTINGS_FILE),
            session_flag,
            &spec.session_uuid,
            "--permission-mode",
            &c.permission_mode,
            "--allowed-tools",
            &allowed_tools,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(c.claude_args.iter().cloned());
        args
    }

    /// Spawn claude on a new pseudo-terminal (`resume`: with `--resume`, see `resumes`); returns its
    /// pid and the terminal's master side. `tmpdir` is made owner-only (0700); it is claude's
    /// `TMPDIR` and holds its MCP config and settings (0600).
    pub fn spawn(&self, spec: &SpawnSpec, resume: bool, tmpdir: &Path) -> io::Result<(u32, OwnedFd)> {
        crate::persist::private_dir(tmpdir)?;
        crate::persist::write_private(&tmpdir.join(MCP_CONFIG_FILE), self.mcp_config(spec).to_string().as_bytes())?;
        crate::persist::write_private(&tmpdir.join(SETTINGS_FILE), self.settings().to_string().as_bytes())?;
        let (master, slave) = open_pty()?;
        let mut cmd = Command::new(&self.config.claude_command);
        cmd.args(self.args(spec, resume, tmpdir)).current_dir(self.workspace);
        // Nothing of synthesis's own configuration (the API key) reaches claude or its tools.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SYNTHESIS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env(HOOK_TOKEN_ENV, &spec.hook_token).env("TMPDIR", tmpdir);
        if std::env::var_os("TERM").is_none() {
            cmd.env("TERM", "xterm-256color");
        }
        if runtime_env_accepted(&self.config.claude_command) {
            cmd.envs(runtime_env());
        }
        cmd.stdin(Stdio::from(slave.try_clone()?)).stdout(Stdio::from(slave.try_clone()?)).stderr(Stdio::from(slave));
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own session and process group (a kill reaches its tools and MCP servers),
                // the terminal as controlling tty, and death with synthesis.
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1); // synthesis died before prctl took effect
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.config.claude_command)))?;
        Ok((child.id(), master))
    }
}

/// The `RUNTIME_ENV` settings synthesis's own environment leaves unset.
fn runtime_env() -> impl Iterator<Item = (&'static str, &'static str)> {
    RUNTIME_ENV.into_iter().filter(|(k, _)| std::env::var_os(k).is_none())
}

/// Whether `claude --version` runs with `RUNTIME_ENV`; checked once per command (~10 ms).
fn runtime_env_accepted(claude: &str) -> bool {
    static CHECKED: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ok)) = checked.iter().find(|(c, _)| c == claude) {
        return *ok;
    }
    let out = Command::new(claude).arg("--version").envs(runtime_env()).stdin(Stdio::null()).output();
    // Only Bun's own refusal counts: a claude that does not run at all fails at spawn, clearly.
    let refused = out.as_ref().is_ok_and(|o| {
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("invalid JSC environment variable")
    });
    if refused {
        let names: Vec<&str> = runtime_env().map(|(k, _)| k).collect();
        log::warn!("{claude} does not accept {}: starting it without them (more memory per claude)", names.join(", "));
    }
    checked.push((claude.to_string(), !refused));
    !refused
}

/// Claude Code's project folder name: the cwd with every non-alphanumeric as `-`.
pub fn project_dir_name(cwd: &Path) -> String {
    cwd.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

/// An unspecified listen address (0.0.0.0) is reached on loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize { ws_row: ROWS, ws_col: COLS, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two fds we then own.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh from openpty.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // The master stays with synthesis only, non-blocking for mio.
    unsafe {
        libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        libc::fcntl(slave.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok((master, slave))
}

/// The home directory claude runs with (it keeps `~/.claude.json` and `~/.claude/` there).
pub fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_carries_channel_hooks_session_and_permissions() {
        let config = Config { claude_args: vec!["--model".into(), "opus".into()], ..Config::default() };
        let launch = Launch {
            config: &config,
            self_exe: Path::new("/opt/synthesis"),
            addr: "0.0.0.0:8787".parse().unwrap(),
            workspace: Path::new("/w"),
            projects_dir: PathBuf::from("/nonexistent"),
        };
        let spec = SpawnSpec { session_uuid: "u-1".into(), bridge_token: "bt".into(), hook_token: "ht".into() };
        let dir = Path::new("/state/tmp/1");
        let args = launch.args(&spec, false, dir);
        assert_eq!(args[..2], ["--dangerously-load-development-channels", "server:synthesis"]);
        assert_eq!(
            args[2..7],
            [
                "--mcp-config",
                "/state/tmp/1/mcp-config.json",
                "--strict-mcp-config",
                "--settings",
                "/state/tmp/1/settings.json"
            ]
        );
        assert!(!args.iter().any(|a| a.contains("bt") || a.contains("ht")), "no token in argv: {args:?}");
        let mcp = launch.mcp_config(&spec);
        let server = &mcp["mcpServers"]["synthesis"];
        assert_eq!(server["command"], "/opt/synthesis");
        assert_eq!(server["args"], json!(["channel"]));
        assert_eq!(server["env"]["SYNTHESIS_BRIDGE_URL"], "ws://127.0.0.1:8787/bridge");
        assert_eq!(server["env"]["SYNTHESIS_BRIDGE_TOKEN"], "bt");
        let settings = launch.settings();
        let stop = &settings["hooks"]["Stop"][0]["hooks"][0];
        assert_eq!(stop["url"], "http://127.0.0.1:8787/hooks/stop");
        assert_eq!(stop["headers"]["Authorization"], "Bearer $SYNTHESIS_HOOK_TOKEN");
        assert_eq!(settings["hooks"]["StopFailure"][0]["hooks"][0]["url"], "http://127.0.0.1:8787/hooks/stop-failure");
        assert_eq!(args[7..9], ["--session-id", "u-1"]);
        assert_eq!(launch.args(&spec, true, dir)[7], "--resume");
        let read = format!("Read(/{}/state/attachments/**)", std::env::current_dir().unwrap().display());
        let allowed = format!("mcp__synthesis__* {read}");
        assert!(read.starts_with("Read(//"), "an absolute path in Claude Code's rule syntax: {read}");
        assert_eq!(args[9..], ["--permission-mode", "default", "--allowed-tools", &allowed, "--model", "opus"]);
    }

    #[test]
    fn runtime_settings_are_dropped_only_when_bun_refuses_them() {
        let dir = std::env::temp_dir().join(format!("synthesis-runtime-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            path.to_string_lossy().into_owned()
        };
        let refuses = script(
            "refuses",
            "[ -n \"$BUN_JSC_forceRAMSize\" ] && { echo 'error: invalid JSC environment variable' >&2; exit 1; }; echo 2.1",
        );
        let broken = script("broken", "echo 'no such thing' >&2; exit 3");
        let accepts = script("accepts", "echo 2.1");
        assert!(!runtime_env_accepted(&refuses));
        assert!(runtime_env_accepted(&broken), "a claude that fails otherwise fails at spawn, with its own error");
        assert!(runtime_env_accepted(&accepts));
        assert!(runtime_env_accepted("/nonexistent/claude"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn project_dir_replaces_non_alphanumerics() {
        assert_eq!(project_dir_name(Path::new("/home/u/my_work.1")), "-home-u-my-work-1");
    }
}
