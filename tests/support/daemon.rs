//! Loopback harness: runs the real `synthesis` binary with the scripted fake claude, in a
//! private temporary HOME, workspace and state_dir, and talks HTTP to it on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const API_KEY: &str = "test-key";
/// Generous bound for anything a test waits for; tests never sleep a fixed time.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn fake_claude() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_synthesis"));
    let path = bin.parent().unwrap().join("examples").join("fake_claude");
    assert!(path.exists(), "{} missing: cargo test builds examples", path.display());
    path
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Start synthesis with `extra` config lines and `env` for it (and so for fake claude).
    pub fn start(name: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("synthesis-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["home", "ws", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Daemon::start_in(dir, extra, env)
    }

    /// Start (again) on an existing directory, keeping HOME and state.
    pub fn start_in(dir: PathBuf, extra: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::launch(dir, &fake_claude(), extra, env)
    }

    /// Start with `claude` as claude_command.
    pub fn launch(dir: PathBuf, claude: &std::path::Path, extra: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::launch_bin(dir, Path::new(env!("CARGO_BIN_EXE_synthesis")), claude, extra, env)
    }

    /// Start the synthesis binary at `bin` (a copy the test may replace, for upgrades).
    pub fn launch_bin(dir: PathBuf, bin: &Path, claude: &Path, extra: &str, env: &[(&str, &str)]) -> Daemon {
        // Any port, and no warm spare (most tests count the claudes they cause), unless the test
        // says otherwise in `extra`.
        let state = dir.join("state").display().to_string();
        let defaults: String = [("listen", "127.0.0.1:0"), ("spare_processes", "0"), ("state_dir", state.as_str())]
            .iter()
            .filter(|(key, _)| !extra.contains(key))
            .map(|(key, value)| format!("{key} = {value}\n"))
            .collect();
        let conf = format!(
            "{defaults}api_key = {API_KEY}\nworkspace = {}\nclaude_command = {}\n{extra}\n",
            dir.join("ws").display(),
            claude.display()
        );
        std::fs::write(dir.join("synthesis.conf"), conf).unwrap();
        let mut child = Command::new(bin)
            .current_dir(&dir) // where relative paths of the config point
            .args(["--config", dir.join("synthesis.conf").to_str().unwrap()])
            .env("HOME", dir.join("home"))
            .env("RUST_LOG", "info")
            .env("FAKE_CLAUDE_LOG", dir.join("delivered.jsonl"))
            .env_remove("SYNTHESIS_REAL_CLAUDE") // the tests' own, not a setting of synthesis
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  synthesis: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut d = Daemon { child, port: 0, dir, log };
        let line = d.wait_log("listening on http://127.0.0.1:");
        d.port = line.split("127.0.0.1:").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        d
    }

    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// Wait for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(&format!("log line {needle:?}"), || self.log_lines(needle).into_iter().next())
    }

    /// Pids of the claude processes synthesis started, from its log.
    pub fn claude_pids(&self) -> Vec<i32> {
        self.log_lines("is claude pid ").iter().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect()
    }

    /// The channel notifications fake claude received, in order.
    pub fn delivered(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("delivered.jsonl"))
            .unwrap_or_default()
            .lines()
            // The last line may be half written while fake claude appends it.
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for synthesis to exit; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let status = wait_for("synthesis to exit", || self.child.try_wait().unwrap());
        status.code()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Poll `f` until it gives a value or `DEADLINE` passes.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes; /proc/<pid>/stat shows state Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Live processes whose process group is `pgid` (claude and its channel).
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        if fields[2].parse::<i32>() == Ok(pgid) && fields[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    pub fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
    }
}

/// A tiny keep-alive HTTP/1.1 client.
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_write_timeout(Some(DEADLINE)).unwrap();
        Client { stream: BufReader::new(stream) }
    }

    /// A second handle on the socket, to write from another thread.
    pub fn try_clone_stream(&self) -> TcpStream {
        self.stream.get_ref().try_clone().unwrap()
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        self.stream.get_mut().write_all(raw).unwrap();
    }

    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n", body.len());
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        self.send_raw(raw.as_bytes());
        self.read_response()
    }

    /// A chat completion for session `key` whose last user message is `text`.
    pub fn chat(&mut self, key: &str, text: &str, stream: bool) -> Response {
        let body = serde_json::json!({
            "model": "claude-code",
            "messages": [{"role": "user", "content": text}],
            "stream": stream,
            "stream_options": {"include_usage": true},
        });
        let auth = format!("Bearer {API_KEY}");
        self.request(
            "POST",
            "/v1/chat/completions",
            &[("authorization", &auth), ("x-session-affinity", key)],
            &body.to_string(),
        )
    }

    pub fn read_response(&mut self) -> Response {
        let mut line = String::new();
        self.stream.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap_or_else(|| panic!("bad status line {line:?}")).parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let find = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v): &(String, String)| v.clone());
        let body = if find("transfer-encoding").as_deref() == Some("chunked") {
            self.read_chunked()
        } else {
            let len: usize = find("content-length").map_or(0, |v| v.parse().unwrap());
            let mut buf = vec![0; len];
            self.stream.read_exact(&mut buf).unwrap();
            String::from_utf8(buf).unwrap()
        };
        Response { status, headers, body }
    }

    fn read_chunked(&mut self) -> String {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            self.stream.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            self.stream.read_exact(&mut chunk).unwrap();
            if n == 0 {
                return String::from_utf8(body).unwrap();
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }
}

/// Run `synthesis doctor` in a fresh HOME; `seed` writes its ~/.claude.json.
/// `"projects": "WS"` in the seed stands for "the workspace is trusted".
pub fn doctor(name: &str, claude: &Path, seed: Option<serde_json::Value>, env: &[(&str, &str)]) -> Output {
    let dir = std::env::temp_dir().join(format!("synthesis-doctor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["home", "ws", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let ws = dir.join("ws").canonicalize().unwrap();
    if let Some(mut seed) = seed {
        if seed["projects"] == serde_json::json!("WS") {
            seed["projects"] = serde_json::json!({ws.to_str().unwrap(): {"hasTrustDialogAccepted": true}});
        }
        std::fs::write(dir.join("home/.claude.json"), seed.to_string()).unwrap();
    }
    let conf = format!(
        "state_dir = {}\nworkspace = {}\nclaude_command = {}\n",
        dir.join("state").display(),
        ws.display(),
        claude.display()
    );
    std::fs::write(dir.join("synthesis.conf"), conf).unwrap();
    Command::new(env!("CARGO_BIN_EXE_synthesis"))
        .args(["doctor", "--config", dir.join("synthesis.conf").to_str().unwrap()])
        .env("HOME", dir.join("home"))
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("SYNTHESIS_REAL_CLAUDE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Doctor's report (stdout), also shown in the test's output.
pub fn report(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    text
}

/// `python3 -c "import <module>"` works. Otherwise the test is skipped with a visible line, or,
/// under CI (`CI` set, as `.ci/run` does), fails: CI installs these modules.
pub fn python_module(module: &str) -> bool {
    let ok = Command::new("python3").args(["-c", &format!("import {module}")]).output();
    if ok.is_ok_and(|o| o.status.success()) {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "python3 module `{module}` is missing under CI: .ci/run installs it");
    // Straight to stderr, past the test harness's capture, so that the skip shows in `cargo test`.
    let line = format!("SKIPPED: python3 module `{module}` is not installed (pip install it, or run .ci/run)\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}
