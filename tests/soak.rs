//! Soak: turns back to back on several sessions for longer than two channel heartbeat
//! intervals, with a few multi-MB replies, against the real binary and the scripted claude.
//! Every answer must be exactly its own question's echo (a reply that slips to the next turn
//! shifts every later answer of the session by one).

mod support;

use std::time::{Duration, Instant};

use support::daemon::*;
use synthesis::wire::bridge::HEARTBEAT_SECS;

const SESSIONS: usize = 4;
/// Every this many turns, session 0 asks for a reply of `BIG` bytes.
const BIG_EVERY: usize = 400;
const BIG: usize = 3 << 20;

#[test]
fn every_answer_belongs_to_its_question_across_heartbeats_and_large_replies() {
    let d = Daemon::start("soak", "", &[]);
    let length = Duration::from_secs(2 * HEARTBEAT_SECS + 1);
    let workers: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let port = d.port;
            std::thread::spawn(move || {
                let mut client = Client::connect(port);
                let start = Instant::now();
                let (mut turns, mut wrong, mut big) = (0, Vec::new(), 0);
                while start.elapsed() < length {
                    let text = match turns % BIG_EVERY {
                        1 if s == 0 => format!("big {BIG}"),
                        _ => format!("s{s} t{turns}"),
                    };
                    let r = client.chat(&format!("soak-{s}"), &text, turns % 2 == 0);
                    let answer = answer_text(&r);
                    let expected = match text.strip_prefix("big ") {
                        Some(_) => format!("echo: {text}\n{}", "x".repeat(BIG)),
                        None => format!("echo: {text}"),
                    };
                    big += usize::from(text.starts_with("big "));
                    if answer != expected && wrong.len() < 3 {
                        let got = &answer[..answer.len().min(60)];
                        wrong.push(format!("turn {turns}: asked {text:?}, got {got:?} ({} bytes)", answer.len()));
                    }
                    turns += 1;
                }
                (turns, wrong, big)
            })
        })
        .collect();
    let mut total = 0;
    for (s, w) in workers.into_iter().enumerate() {
        let (turns, wrong, big) = w.join().unwrap();
        assert!(wrong.is_empty(), "session {s}: wrong answers after {turns} turns: {wrong:#?}");
        if s == 0 {
            assert!(big >= 2, "session 0 made {big} large replies in {turns} turns");
        }
        total += turns;
    }
    assert!(total > 100, "only {total} turns in the soak");
    eprintln!("soak: {total} turns over {SESSIONS} sessions, all answered with their own echo");
}

/// The answer's text, whether the response was streamed or not.
fn answer_text(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    if r.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
        let chunks = r.events().into_iter().filter(|e| e != "[DONE]");
        let values = chunks.map(|e| serde_json::from_str::<serde_json::Value>(&e).unwrap());
        return values.filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from)).collect();
    }
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}
