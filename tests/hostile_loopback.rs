//! Loopback tests for hostile local users: the real binary, the scripted fake claude, 127.0.0.1.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::daemon::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// `VAR=value` from a process's environment (readable by its owner only).
fn env_of(pid: i32, var: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{var}=");
    environ.split(|b| *b == 0).find_map(|e| String::from_utf8_lossy(e).strip_prefix(&prefix).map(String::from))
}

#[test]
fn no_token_is_on_a_command_line_and_state_is_owner_only() {
    let dir = std::env::temp_dir().join(format!("synthesis-test-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    for sub in [dir.join("home"), dir.join("ws"), state.join("tmp")] {
        std::fs::create_dir_all(&sub).unwrap();
    }
    for open in [&state, &state.join("tmp")] {
        std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
        // as an older synthesis left them
    }
    let d = Daemon::start_in(dir, "", &[]);
    assert_eq!(d.client().chat("a", "hello", false).status, 200);
    let pid = d.claude_pids()[0];
    let group = group_members(pid);
    let hook_token = env_of(pid, "SYNTHESIS_HOOK_TOKEN").expect("claude has its hook token in its environment");
    let bridge_token = group
        .iter()
        .find_map(|p| env_of(*p, "SYNTHESIS_BRIDGE_TOKEN"))
        .expect("the channel has its bridge token in its environment");
    for p in group {
        let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap()).replace('\0', " ");
        assert!(!cmdline.contains(&bridge_token), "bridge token on the command line of {p}: {cmdline}");
        assert!(!cmdline.contains(&hook_token), "hook token on the command line of {p}: {cmdline}");
    }
    let private = state.join("tmp").join("1");
    for dir in [&state, &state.join("tmp"), &private] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    for file in ["mcp-config.json", "settings.json"] {
        assert_eq!(mode(&private.join(file)), 0o600, "{file}");
    }
    let mcp = std::fs::read_to_string(private.join("mcp-config.json")).unwrap();
    assert!(mcp.contains(&bridge_token), "the bridge token travels in the owner-only file");
}
