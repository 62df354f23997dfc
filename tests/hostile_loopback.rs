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

/// A compaction continuation whose generation is 2^64-1.
fn freeze_body() -> String {
    serde_json::json!({
        "messages": [
            {"role": "user", "content": "The conversation history before this point was compacted into the following summary: x"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "go on"},
        ],
        "prompt_cache_key": "x:18446744073709551615",
    })
    .to_string()
}

#[test]
fn a_huge_generation_does_not_freeze_the_loop() {
    let d = Daemon::start("freeze", "", &[]);
    let auth = format!("Bearer {API_KEY}");
    let mut c = d.client();
    c.send_raw(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nauthorization: {auth}\r\ncontent-length: {}\r\n\r\n{}",
            freeze_body().len(),
            freeze_body()
        )
        .as_bytes(),
    );
    assert_eq!(d.client().request("GET", "/healthz", &[], "").status, 200, "the loop still answers");
    let r = c.read_response();
    assert!(r.json()["choices"][0]["message"]["content"].as_str().unwrap().ends_with("go on"), "{}", r.body);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_request_without_the_api_key_is_refused_on_its_head_and_its_body_never_buffered() {
    let d = Daemon::start("headauth", "", &[]);
    let body_len = 4 << 20; // max_body
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nauthorization: Bearer wrong\r\nx-session-affinity: s\r\ncontent-length: {body_len}\r\n\r\n"
    );
    let mut c = d.client();
    c.send_raw(head.as_bytes());
    let r = c.read_response(); // before the body: nothing else is coming
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    // The body is dropped as it comes and the connection goes on.
    c.send_raw(&vec![b'x'; body_len]);
    assert_eq!(c.request("GET", "/healthz", &[], "").status, 200);

    // Many clients sending whole bodies without the key: synthesis holds none of them.
    let before = rss_kib(d.child.id());
    let port = d.port;
    let senders: Vec<_> = (0..40)
        .map(|_| {
            let head = head.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                c.send_raw(head.as_bytes());
                assert_eq!(c.read_response().status, 401);
                c.send_raw(&vec![b'x'; body_len]);
                c
            })
        })
        .collect();
    let clients: Vec<Client> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    let grown = rss_kib(d.child.id()).saturating_sub(before);
    eprintln!("RSS grew by {grown} KiB with {} clients having sent {} MiB each", clients.len(), body_len >> 20);
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB: unauthenticated bodies were buffered");
}

/// Open a WebSocket on /bridge and return the raw socket after the 101.
fn upgrade(port: u16) -> std::net::TcpStream {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(
        b"GET /bridge HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    s
}

/// True once the server has closed `s` (EOF or reset); false if it is still open after `DEADLINE`.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    use std::io::{ErrorKind, Read};
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a close frame
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// A masked client text frame header announcing `len` bytes.
fn frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]); // mask
    h
}

#[test]
fn a_bridge_that_does_not_say_hello_is_closed() {
    use std::io::Write;
    let d = Daemon::start("nohello", "", &[]);
    // Silent: closed after the hello timeout.
    let mut silent = upgrade(d.port);
    // A first frame far over the hello limit: closed on its header, nothing buffered.
    let mut big = upgrade(d.port);
    big.write_all(&frame_header(8 << 20)).unwrap();
    big.write_all(&[b'x'; 1024]).unwrap();
    assert!(closed_by_server(&mut big));
    // A first frame that is not a hello.
    let mut rude = upgrade(d.port);
    let payload: Vec<u8> =
        br#"{"type":"heartbeat"}"#.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]).collect();
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 1, 2, 3, 4];
    frame.extend_from_slice(&payload);
    rude.write_all(&frame).unwrap();
    assert!(closed_by_server(&mut rude));
    let t = std::time::Instant::now();
    assert!(closed_by_server(&mut silent));
    eprintln!("silent bridge closed after a further {:?}", t.elapsed());
    d.wait_log("no hello within");
    // The real channel still binds and works.
    assert_eq!(d.client().chat("a", "hello", false).status, 200);
}

#[test]
fn connections_over_max_connections_get_503_and_are_closed() {
    let d = Daemon::start("conncap", "max_connections = 4", &[]);
    let mut idle: Vec<Client> = (0..2).map(|_| d.client()).collect();
    for c in &mut idle {
        assert_eq!(c.request("GET", "/healthz", &[], "").status, 200);
    }
    let bridges: Vec<std::net::TcpStream> = (0..2).map(|_| upgrade(d.port)).collect(); // unbound ones count
    let mut over = d.client();
    let r = over.request("GET", "/healthz", &[], "");
    assert_eq!(r.status, 503, "{}", r.body);
    let err = &r.json()["error"];
    assert_eq!(err["code"], "too_many_connections");
    assert!(err["message"].as_str().unwrap().contains("max_connections") && err["type"].is_string());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(over.closed());
    drop(bridges);
    let r = wait_for("a free connection", || {
        let r = d.client().request("GET", "/healthz", &[], "");
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn requests_pipelined_behind_a_busy_one_are_all_answered() {
    let d = Daemon::start("pipeline", "max_body = 1000", &[]);
    let auth = format!("Bearer {API_KEY}");
    let chat = r#"{"messages":[{"role":"user","content":"sleep 1"}]}"#;
    let mut raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nauthorization: {auth}\r\nx-session-affinity: p\r\ncontent-length: {}\r\n\r\n{chat}",
        chat.len()
    )
    .into_bytes();
    let n = 400;
    let pad = "p".repeat(500);
    for i in 0..n {
        raw.extend_from_slice(format!("GET /healthz?{i} HTTP/1.1\r\nx-pad: {pad}\r\n\r\n").as_bytes());
    }
    assert!(raw.len() > 1000 + 65536 * 2, "more than synthesis buffers per connection");
    let mut c = d.client();
    let mut writer = c.try_clone_stream();
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut writer, &raw).unwrap());
    let r = c.read_response();
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: sleep 1");
    for i in 0..n {
        assert_eq!(c.read_response().status, 200, "pipelined request {i}");
    }
    sender.join().unwrap();
}

#[test]
fn an_identical_retry_after_many_turns_gets_the_same_answer_without_a_second_delivery() {
    let d = Daemon::start("retrycache", "", &[]);
    let mut c = d.client();
    assert_eq!(c.chat("a", "first", false).json()["choices"][0]["message"]["content"], "echo: first");
    for i in 0..6 {
        assert_eq!(c.chat("a", &format!("turn {i}"), false).status, 200);
    }
    assert_eq!(d.delivered().len(), 7);
    let r = c.chat("a", "first", false); // OpenClaw's retry of the first request, byte for byte
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: first");
    assert_eq!(d.delivered().len(), 7, "the retry did not reach claude again");
}

#[test]
fn after_an_upgrade_bound_bridges_stay_bound_and_unbound_ones_still_must_say_hello() {
    let d = Daemon::start("hostileupgrade", "", &[]);
    assert_eq!(d.client().chat("a", "hello", false).status, 200);
    let claudes = d.claude_pids();
    let mut unbound = upgrade(d.port);
    d.signal(libc::SIGHUP);
    d.wait_log("upgraded in place");
    // The unbound socket is closed by the new image once its hello time is up...
    assert!(closed_by_server(&mut unbound));
    d.wait_log("no hello within");
    // ... and by then the bound channel (handed over as well) would have been cut if it had
    // been taken for an unbound one: its claude still answers.
    let r = d.client().chat("a", "after the upgrade", false);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: after the upgrade");
    assert_eq!(d.claude_pids(), claudes, "no claude was restarted");
}
