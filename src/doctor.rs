//! `synthesis doctor`: checks what an unattended claude needs and says in plain words what to fix.
//! It starts one real claude with `--debug-file` to see whether the synthesis channel registers.

use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::Config;
use crate::engine::screen::{self, Prompt, Screen, CONFIRM_DELAY, TRUST_CONFIRM, TRUST_DELAY, TRUST_SELECT};
use crate::engine::SpawnSpec;
use crate::shell::spawn::{home, Launch};
use crate::wire::bridge::ToChannel;

/// How long the test claude may take to register its channel.
const CHANNEL_DEADLINE: Duration = Duration::from_secs(30);

/// Print the report; `Ok(true)` only when a channel really works.
pub fn run(config: &Config) -> Result<bool, String> {
    let mut ok = true;
    let Some(claude) = find_command(&config.claude_command) else {
        fail(&format!(
            "claude not found: claude_command = {:?}. Install Claude Code (npm install -g @anthropic-ai/claude-code) \
             or set claude_command to its full path.",
            config.claude_command
        ));
        return Ok(false);
    };
    pass(&format!("claude found: {}", claude.display()));
    match Command::new(&claude).arg("--version").output() {
        Ok(out) if out.status.success() => pass(&format!("version {}", String::from_utf8_lossy(&out.stdout).trim())),
        Ok(out) => {
            fail(&format!("`claude --version` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
            ok = false;
        }
        Err(e) => {
            fail(&format!("cannot run claude: {e}"));
            return Ok(false);
        }
    }
    let workspace = config.workspace_dir().map_err(|e| format!("workspace {}: {e}", config.workspace.display()))?;
    let state = claude_state();
    ok &= check_auth(&state);
    let trusted = is_trusted(&state, &workspace);
    ok &= check_trust(config, trusted, &workspace);
    ok &= check_channel(config, &claude, &workspace)?;
    if !trusted && config.trust_workspace {
        // The channel check started claude there, and synthesis answered its trust question.
        ok &= check_trust_answered(&workspace);
    }
    if ok {
        pass("everything needed for synthesis works");
    }
    Ok(ok)
}

fn pass(msg: &str) {
    println!("ok    {msg}");
}

fn fail(msg: &str) {
    println!("FIX   {msg}");
}

fn find_command(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Path::new(cmd).is_file().then(|| PathBuf::from(cmd));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(cmd)).find(|p| p.is_file())
}

/// `~/.claude.json`, where claude keeps approvals, trust and login state.
fn claude_state() -> Value {
    let text = std::fs::read_to_string(home().join(".claude.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn check_auth(state: &Value) -> bool {
    if let Ok(key) = std::env::var("ANTHROPIC_API_KEY") {
        let tail: String = key.chars().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
        let approved =
            state["customApiKeyResponses"]["approved"].as_array().is_some_and(|a| a.iter().any(|k| k == &tail));
        if !approved {
            fail(
                "ANTHROPIC_API_KEY is set but claude has not been told to use it: it would stop at \
                 \"Do you want to use this API key?\". Run `claude` once as this user and answer Yes.",
            );
            return false;
        }
        pass("authentication: ANTHROPIC_API_KEY (approved)");
        return true;
    }
    let logged_in = state.get("oauthAccount").is_some() || home().join(".claude/.credentials.json").exists();
    if logged_in || std::env::var("CLAUDE_CODE_OAUTH_TOKEN").is_ok() || std::env::var("ANTHROPIC_AUTH_TOKEN").is_ok() {
        pass("authentication: logged in");
        return true;
    }
    fail("not logged in: run `claude` and use /login, or set ANTHROPIC_API_KEY in synthesis's environment.");
    false
}

/// Claude Code records an accepted workspace-trust question for the folder (or a parent).
fn is_trusted(state: &Value, workspace: &Path) -> bool {
    workspace
        .ancestors()
        .any(|dir| state["projects"][dir.to_string_lossy().as_ref()]["hasTrustDialogAccepted"].as_bool() == Some(true))
}

fn check_trust(config: &Config, trusted: bool, workspace: &Path) -> bool {
    if trusted {
        pass(&format!("workspace trusted: {}", workspace.display()));
    } else if config.trust_workspace {
        // Told after the channel check, which answers the question as synthesis would.
    } else {
        fail(&format!(
            "workspace {} is not trusted: run `claude` there once and answer \"Yes, I trust this folder\", \
             or set trust_workspace = yes.",
            workspace.display()
        ));
        return false;
    }
    true
}

/// After the channel check with trust_workspace = yes: did claude take synthesis's answer?
fn check_trust_answered(workspace: &Path) -> bool {
    if is_trusted(&claude_state(), workspace) {
        pass(&format!(
            "workspace trusted: {} (claude recorded it when synthesis answered its trust question, trust_workspace = yes)",
            workspace.display()
        ));
        return true;
    }
    fail(&format!(
        "workspace {} is not trusted, and trust_workspace = yes did not get claude past its trust question: \
         run `claude` there once and answer \"Yes, I trust this folder\".",
        workspace.display()
    ));
    false
}

/// Start claude with the synthesis channel and read its debug log for the channel's fate.
fn check_channel(config: &Config, claude: &Path, workspace: &Path) -> Result<bool, String> {
    let scratch = config.state_dir.join("doctor");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let debug = scratch.join("debug.log");
    let bridge = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = bridge.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || stand_in_bridge(bridge));
    let mut test_config = config.clone();
    test_config.claude_command = claude.to_string_lossy().into_owned();
    test_config.claude_args.extend(["--debug-file".to_string(), debug.to_string_lossy().into_owned()]);
    let self_exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let launch = Launch {
        config: &test_config,
        self_exe: &self_exe,
        addr,
        workspace,
        projects_dir: PathBuf::from("/nonexistent"), // always a new session
    };
    let spec = SpawnSpec {
        session_uuid: uuid::Uuid::new_v4().to_string(),
        bridge_token: "doctor".into(),
        hook_token: "doctor".into(),
    };
    let (pid, master) =
        launch.spawn(&spec, false, &scratch.join("tmp")).map_err(|e| format!("cannot start claude: {e}"))?;
    let verdict = watch(master, &debug, config.trust_workspace);
    // SAFETY: signalling the process group we just created.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
        libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
    }
    match verdict {
        Ok(()) => pass("claude registered the synthesis channel"),
        Err(problem) => fail(&problem),
    }
    Ok(std::fs::read_to_string(&debug).is_ok_and(|d| d.contains(REGISTERED)))
}

/// Enough of the daemon's bridge for the channel to start: accept it, hand it an empty tool
/// catalog, and keep the socket open.
fn stand_in_bridge(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(mut ws) = tungstenite::accept(stream) else { return };
            let tools = serde_json::to_string(&ToChannel::Tools { tools: Vec::new() }).expect("frame");
            let _ = ws.send(tungstenite::Message::text(tools));
            while ws.read().is_ok() {}
        });
    }
}

const REGISTERED: &str = "\"synthesis\": Channel notifications registered";
const SKIPPED: &str = "\"synthesis\": Channel notifications skipped: ";

/// Drain claude's terminal, press Enter on the development-channels warning, and wait for the
/// debug log to say whether the channel registered.
fn watch(master: std::os::fd::OwnedFd, debug: &Path, trust: bool) -> Result<(), String> {
    let mut screen = Screen::default();
    let mut terminal = std::fs::File::from(master);
    // Answering the trust screen, as the engine does: 0 not yet, 1 arrow down typed, 2 confirmed.
    let mut trust_step = 0;
    let deadline = Instant::now() + CHANNEL_DEADLINE;
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(debug).unwrap_or_default();
        if log.contains(REGISTERED) {
            return Ok(());
        }
        if let Some(reason) = log.lines().find_map(|l| l.split_once(SKIPPED).map(|(_, r)| r.to_string())) {
            return Err(format!(
                "claude skipped the synthesis channel: {reason}. Channels need a claude.ai login with \
                 channels enabled for the account (or organisation policy allowing them)."
            ));
        }
        let mut fds = libc::pollfd { fd: terminal.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one fd we own.
        unsafe { libc::poll(&mut fds, 1, 100) };
        let mut buf = [0u8; 16384];
        let n = match terminal.read(&mut buf) {
            Ok(0) | Err(_) if fds.revents & (libc::POLLHUP | libc::POLLERR) != 0 => {
                return Err(format!("claude exited during start-up; {}", screen.last_lines(12)))
            }
            Ok(n) => n,
            Err(_) => 0,
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        if trust_step == 1 && screen::trust_selection(&text) == Some(true) {
            // The selection moved to "Yes, I trust this folder": confirm, as synthesis does.
            trust_step = 2;
            std::thread::sleep(TRUST_DELAY);
            std::io::Write::write_all(&mut terminal, TRUST_CONFIRM.as_bytes()).map_err(|e| e.to_string())?;
        }
        for prompt in screen.push(&text) {
            match prompt {
                Prompt::DevChannels => {
                    std::thread::sleep(CONFIRM_DELAY);
                    std::io::Write::write_all(&mut terminal, b"\r").map_err(|e| e.to_string())?;
                }
                Prompt::WorkspaceTrust if trust => {
                    if trust_step == 0 {
                        trust_step = 1;
                        std::thread::sleep(TRUST_DELAY);
                        std::io::Write::write_all(&mut terminal, TRUST_SELECT.as_bytes()).map_err(|e| e.to_string())?
                    }
                }
                Prompt::WorkspaceTrust | Prompt::ApiKeyApproval => return Err(prompt.advice().into()),
                Prompt::Interrupted => {}
            }
        }
    }
    Err(format!(
        "claude did not register the channel within {} s; last terminal lines:\n{}",
        CHANNEL_DEADLINE.as_secs(),
        screen.last_lines(12)
    ))
}
