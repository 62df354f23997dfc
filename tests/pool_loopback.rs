//! The pool against the real binary: claudes that weigh something (the scripted claude holding
//! ballast), a scripted host memory reading (`SYNTHESIS_MEMINFO`), and warm spares.

mod support;

use support::daemon::*;

const MIB: u64 = 1 << 20;

fn set_available(path: &std::path::Path, mib: u64) {
    let kib = mib * 1024;
    std::fs::write(path, format!("MemTotal: 99999999 kB\nMemFree: {kib} kB\nMemAvailable: {kib} kB\n")).unwrap();
}

fn status(d: &Daemon) -> serde_json::Value {
    let auth = format!("Bearer {API_KEY}");
    d.client().request("GET", "/status", &[("authorization", &auth)], "").json()
}

#[test]
fn the_memory_floor_stops_idle_claudes_never_a_busy_one_and_refuses_only_when_nothing_can_go() {
    let dir = std::env::temp_dir().join(format!("synthesis-test-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["home", "ws", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let meminfo = dir.join("meminfo");
    set_available(&meminfo, 3000);
    let env = [("SYNTHESIS_MEMINFO", meminfo.to_str().unwrap()), ("FAKE_CLAUDE_BALLAST_MB", "40")];
    let d = Daemon::start_in(dir.clone(), "min_free_memory = 1000MiB", &env);
    assert_eq!(d.client().chat("idle", "one", false).status, 200);
    assert_eq!(d.client().chat("busy", "two", false).status, 200);
    let pids = d.claude_pids();
    let s = status(&d);
    for p in s["processes"].as_array().unwrap() {
        assert!(p["rss_kib"].as_u64().unwrap() * 1024 > 40 * MIB, "the group's memory, ballast included: {p}");
    }
    assert_eq!(s["min_free_memory"].as_u64(), Some(1000 * MIB));
    assert_eq!(s["memory_available"].as_u64(), Some(3000 * MIB));

    let port = d.port;
    let busy = std::thread::spawn(move || Client::connect(port).chat("busy", "sleep 3", false));
    wait_for("the long turn to reach claude", || d.delivered().iter().any(|v| v["content"] == "sleep 3").then_some(()));
    // The host runs short: the idle claude goes, the busy one stays.
    set_available(&meminfo, 900);
    wait_for("the idle claude to be stopped", || group_members(pids[0]).is_empty().then_some(()));
    assert!(alive(pids[1]), "a claude with a turn in flight is never stopped");
    // Still short and nothing idle: a new session is refused with a clear reason.
    let r = d.client().chat("new", "hello", false);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "insufficient_memory");
    assert!(r.header("retry-after").is_some());
    let answer = busy.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    // Memory back: the new session is served.
    set_available(&meminfo, 3000);
    wait_for("the reading to come in", || (status(&d)["memory_available"].as_u64() == Some(3000 * MIB)).then_some(()));
    let r = wait_for("the new session to be served", || {
        let r = d.client().chat("new", "hello", false);
        (r.status == 200).then_some(r)
    });
    assert!(r.body.contains("echo: hello"));
}

#[test]
fn a_warm_spare_answers_a_new_sessions_first_turn_without_a_spawn() {
    let d = Daemon::start("spare", "spare_processes = 1", &[]);
    d.wait_log("process 1 ready after");
    assert_eq!(d.log_lines("spawning process").len(), 1, "only the spare so far");
    let r = d.client().chat("new", "hello", false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("echo: hello"));
    assert!(!d.log_lines("session new: takes the warm spare process 1").is_empty());
    assert!(d.log_lines("session new: spawning").is_empty(), "no spawn on the request path");
    // The spare is replaced in the background, and the next new session takes that one.
    d.wait_log("process 2 ready after");
    assert_eq!(d.client().chat("newer", "hi", false).status, 200);
    assert!(!d.log_lines("session newer: takes the warm spare process 2").is_empty());
    let s = status(&d);
    assert!(s["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["key"] != "" && !s["key"].as_str().unwrap().contains("spare")));
}
