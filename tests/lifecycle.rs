//! Stop, restart and upgrade under load, against the real binary and the scripted claude:
//! SIGTERM drains (every turn in flight answered, exit 0, no claude left); SIGHUP re-executes
//! the binary in place (same PID, same claudes, no failed or refused request); a full disk is
//! an error that shows, not a silent loss.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use support::daemon::*;

fn content(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[test]
fn sigterm_answers_every_turn_in_flight_then_exits_zero_and_leaves_no_claude() {
    let mut d = Daemon::start("drain", "", &[]);
    let mut kept = d.client();
    assert_eq!(content(&kept.chat("warm", "warm up", false)), "echo: warm up");
    const N: usize = 5;
    let turns: Vec<_> = (0..N)
        .map(|i| {
            let port = d.port;
            std::thread::spawn(move || Client::connect(port).chat(&format!("s{i}"), "sleep 1.5", i % 2 == 0))
        })
        .collect();
    let delivered = |i: usize| !d.log_lines(&format!("session s{i}: delivering chat-1")).is_empty();
    wait_for("every turn to reach claude", || (0..N).all(delivered).then_some(()));
    let pids = d.claude_pids();
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    d.wait_log("draining");
    // New work is refused on a kept-alive and on a new connection, with a retry hint; the
    // load balancer's readiness check fails; liveness holds.
    for r in [kept.chat("warm", "more", false), d.client().chat("new", "hello", false)] {
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "shutting_down");
        assert_eq!(r.header("retry-after"), Some("5"));
    }
    assert_eq!(d.client().request("GET", "/readyz", &[], "").status, 503);
    assert_eq!(d.client().request("GET", "/healthz", &[], "").status, 200);
    for t in turns {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("echo: sleep 1.5"), "{}", r.body);
    }
    assert_eq!(d.wait_exit(), Some(0));
    eprintln!("drain: SIGTERM to exit with {N} turns in flight: {:?}", t.elapsed());
    for pid in pids {
        assert!(group_members(pid).is_empty(), "claude group {pid} left behind");
    }
}

/// The synthesis binary copied where the test can replace it.
fn own_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let bin = dir.join("synthesis");
    std::fs::copy(env!("CARGO_BIN_EXE_synthesis"), &bin).unwrap();
    bin
}

/// Replace the binary file (a new inode, as an install does) with a fresh copy.
fn replace_binary(bin: &std::path::Path) {
    let tmp = bin.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_synthesis"), &tmp).unwrap();
    std::fs::rename(&tmp, bin).unwrap();
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().to_string_lossy().into_owned()
}

#[test]
fn sighup_upgrades_in_place_under_load_with_a_new_binary_and_config() {
    let dir = std::env::temp_dir().join(format!("synthesis-test-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["home", "ws", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let bin = own_binary(&dir);
    let d = Daemon::launch_bin(dir.clone(), &bin, &fake_claude(), "model = claude-code", &[]);
    let pid = d.child.id();
    let models = |d: &Daemon| {
        let auth = format!("Bearer {API_KEY}");
        d.client().request("GET", "/v1/models", &[("authorization", &auth)], "").json()["data"][0]["id"].clone()
    };
    assert_eq!(content(&d.client().chat("idle", "hello", false)), "echo: hello");
    assert_eq!(content(&d.client().chat("busy", "warm up", false)), "echo: warm up");
    // A client loop runs throughout: every request must succeed, none may be refused.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (port, stop) = (d.port, stop.clone());
        std::thread::spawn(move || {
            let (mut n, mut worst) = (0, std::time::Duration::ZERO);
            let mut kept = Client::connect(port);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let text = format!("turn {n}");
                // Alternate a kept-alive connection and fresh ones (a refused connect panics).
                let r = if n % 2 == 0 {
                    kept.chat("busy", &text, n % 4 == 0)
                } else {
                    Client::connect(port).chat("busy", &text, false)
                };
                assert_eq!(r.status, 200, "request {n} failed during the upgrade: {}", r.body);
                assert!(r.body.contains(&format!("echo: {text}")), "request {n}: {}", r.body);
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (n, worst)
        })
    };
    wait_for("the load to reach claude", || (d.delivered().len() >= 6).then_some(()));
    let in_flight = {
        let port = d.port;
        std::thread::spawn(move || Client::connect(port).chat("slow", "sleep 1.5", true))
    };
    wait_for("the slow turn to reach claude", || {
        d.delivered().iter().any(|v| v["content"] == "sleep 1.5").then_some(())
    });
    let claudes = d.claude_pids();
    assert_eq!(claudes.len(), 3);

    replace_binary(&bin);
    assert!(exe_of(pid).ends_with("(deleted)"), "the running image is the old file");
    let conf = std::fs::read_to_string(dir.join("synthesis.conf")).unwrap();
    std::fs::write(dir.join("synthesis.conf"), conf.replace("model = claude-code", "model = claude-next")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("upgraded in place");
    assert_eq!(exe_of(pid), bin.to_string_lossy(), "the new binary runs under the same PID");

    let slow = in_flight.join().unwrap();
    assert_eq!(slow.status, 200);
    assert!(slow.body.contains("echo: sleep 1.5"), "the turn in flight is answered: {}", slow.body);
    assert_eq!(content(&d.client().chat("idle", "again", false)), "echo: again");
    assert_eq!(models(&d), "claude-next", "the new config is in effect");
    stop.store(true, Ordering::Relaxed);
    let (n, worst) = loader.join().unwrap();
    assert!(n > 10, "only {n} requests during the test");
    assert_eq!(d.claude_pids(), claudes, "the same claude processes serve the next turns: none was started");
    assert!(claudes.iter().all(|p| alive(*p)));
    eprintln!("upgrade: {n} requests, none failed; longest request during the upgrade {worst:?}");
    assert_eq!(d.child.id(), pid);
    // The claudes are still our children: a crash is reaped and reported by the new image.
    let r = d.client().chat("idle", "crash", false);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (502, Some("claude_exited")), "{}", r.body);

    // A bad config on SIGHUP: the running version goes on, with the config it had.
    let conf = std::fs::read_to_string(dir.join("synthesis.conf")).unwrap();
    std::fs::write(dir.join("synthesis.conf"), format!("{conf}\nno_such_key = 1\n")).unwrap();
    d.signal(libc::SIGHUP);
    let line = d.wait_log("not upgrading");
    assert!(line.contains("no_such_key"), "{line}");
    assert_eq!(models(&d), "claude-next");
    assert_eq!(content(&d.client().chat("idle", "still here", false)), "echo: still here");
    assert_eq!(d.log_lines("upgraded in place").len(), 1);
}

#[test]
fn a_full_disk_shows_in_status_and_the_map_is_written_once_there_is_room() {
    let dir = std::env::temp_dir().join(format!("synthesis-test-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["home", "ws", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    // Every write of the map's temporary file hits a full device.
    let tmp = dir.join("state/sessions.json.tmp");
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let d = Daemon::start_in(dir.clone(), "idle_sweep = 1s", &[]);
    assert_eq!(content(&d.client().chat("a", "hello", false)), "echo: hello", "the turn itself is fine");
    let auth = format!("Bearer {API_KEY}");
    let status = || d.client().request("GET", "/status", &[("authorization", &auth)], "").json();
    let error = status()["save_error"].as_str().unwrap_or("").to_string();
    assert!(error.contains("No space left on device"), "{error}");
    assert!(!d.log_lines("cannot save the session map").is_empty());
    assert!(!dir.join("state/sessions.json").exists());
    std::fs::remove_file(&tmp).unwrap();
    wait_for("the map to be written at a sweep", || status()["save_error"].is_null().then_some(()));
    let map = std::fs::read_to_string(dir.join("state/sessions.json")).unwrap();
    assert!(map.contains("\"key\": \"a\""), "{map}");
}
