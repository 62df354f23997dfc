//! Load benchmark: N sessions × M turns through a real synthesis with the scripted fake claude.
//!
//!     cargo build --release --bins --examples
//!     target/release/examples/bench [sessions=8] [turns=8000]
//!
//! Starts `target/release/synthesis` on a private temp dir and loopback port, warms up every
//! session (one claude each), then runs all sessions concurrently, one keep-alive client per
//! session. Prints p50/p99 turn latency, turns/s, synthesis's CPU time per turn and its RSS.
//! The default runs for longer than two channel heartbeats (5 s each), and every answer must be
//! exactly its own question's echo. Then it times a new session's first turn with and without
//! a warm spare (`spare_processes`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let sessions = args.first().copied().unwrap_or(8);
    let turns = args.get(1).copied().unwrap_or(8000);
    let bin_dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let dir = std::env::temp_dir().join(format!("synthesis-bench-{}", std::process::id()));
    let (mut daemon, port) = start(&bin_dir, &dir, &format!("max_processes = {sessions}\nspare_processes = 0\n"));
    let pid = daemon.id();

    let t = Instant::now();
    let warm: Vec<_> =
        (0..sessions).map(|s| std::thread::spawn(move || Client::new(port).turn(s, "warm up"))).collect();
    warm.into_iter().for_each(|h| {
        h.join().unwrap();
    });
    println!("{sessions} sessions started (one claude each) in {:.2?}", t.elapsed());
    let cpu_before = cpu_time(pid);

    let t = Instant::now();
    let workers: Vec<_> = (0..sessions)
        .map(|s| {
            std::thread::spawn(move || {
                let mut c = Client::new(port);
                (0..turns).map(|i| c.turn(s, &format!("turn {i} of session {s}"))).collect::<Vec<Duration>>()
            })
        })
        .collect();
    let mut lat: Vec<Duration> = workers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let wall = t.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    lat.sort();
    let total = lat.len();
    let pct = |p: f64| lat[((total as f64 * p) as usize).min(total - 1)];
    println!("{total} turns in {wall:.2?}: {:.0} turns/s", total as f64 / wall.as_secs_f64());
    println!("turn latency p50 {:.2?}  p99 {:.2?}  max {:.2?}", pct(0.50), pct(0.99), lat[total - 1]);
    println!("synthesis CPU {:.2?} in all = {:.1} µs per turn", cpu, cpu.as_secs_f64() * 1e6 / total as f64);
    println!("synthesis RSS with {sessions} live sessions: {} KiB", rss_kib(pid));

    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = daemon.wait().unwrap();
    println!("SIGTERM to exit with {sessions} claudes: {:.2?} ({status})", t.elapsed());
    let _ = std::fs::remove_dir_all(&dir);

    for spares in [0, 1] {
        let lat = first_turns(&bin_dir, &dir, spares, 5);
        let ms: Vec<String> = lat.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1e3)).collect();
        println!("new session, first turn, spare_processes = {spares}: {} ms", ms.join(" / "));
    }
}

/// Start synthesis with the fake claude and `extra` config lines; returns it and its port.
fn start(bin_dir: &std::path::Path, dir: &std::path::Path, extra: &str) -> (std::process::Child, u16) {
    for sub in ["home", "ws", "state"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = format!(
        "listen = 127.0.0.1:0\napi_key = bench\nstate_dir = {}\nworkspace = {}\nclaude_command = {}\n{extra}",
        dir.join("state").display(),
        dir.join("ws").display(),
        bin_dir.join("examples/fake_claude").display(),
    );
    std::fs::write(dir.join("synthesis.conf"), conf).unwrap();
    let mut daemon = Command::new(bin_dir.join("synthesis"))
        .args(["--config", dir.join("synthesis.conf").to_str().unwrap()])
        .env("HOME", dir.join("home"))
        .env("RUST_LOG", "warn,synthesis::shell=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo build --release --bins --examples first");
    let port = listening_port(daemon.stderr.take().unwrap());
    (daemon, port)
}

/// First-turn latency of `n` new sessions, one after another, each once a spare (if any) is ready.
fn first_turns(bin_dir: &std::path::Path, dir: &std::path::Path, spares: usize, n: usize) -> Vec<Duration> {
    let dir = dir.with_extension(format!("spare{spares}"));
    let (mut daemon, port) = start(bin_dir, &dir, &format!("spare_processes = {spares}\nmax_processes = {}\n", n + 2));
    let lat = (0..n)
        .map(|i| {
            while spares > 0 && !spare_ready(port) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Client::new(port).turn(1000 + i, "first")
        })
        .collect();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    lat
}

fn spare_ready(port: u16) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /status HTTP/1.1\r\nhost: b\r\nauthorization: Bearer bench\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["session"] == "(spare)" && p["state"] == "ready"))
}

fn listening_port(stderr: std::process::ChildStderr) -> u16 {
    let mut lines = BufReader::new(stderr).lines();
    let port = loop {
        let line = lines.next().expect("synthesis exited").unwrap();
        if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    port
}

fn proc_stat(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')').next().unwrap().split_whitespace().map(String::from).collect()
}

/// utime + stime of the synthesis process.
fn cpu_time(pid: u32) -> Duration {
    let f = proc_stat(pid);
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    fn new(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        Client { stream: BufReader::new(s) }
    }

    /// One non-streamed turn; returns its latency.
    fn turn(&mut self, session: usize, text: &str) -> Duration {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{text}"}}]}}"#);
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\nauthorization: Bearer bench\r\nx-session-affinity: s{session}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let t = Instant::now();
        self.stream.get_mut().write_all(req.as_bytes()).unwrap();
        let (mut line, mut len) = (String::new(), 0);
        self.stream.read_line(&mut line).unwrap();
        assert!(line.contains(" 200 "), "{line}");
        loop {
            line.clear();
            self.stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], format!("echo: {text}"), "answer to {text:?}");
        t.elapsed()
    }
}
