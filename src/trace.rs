//! Opt-in JSONL trace (`trace_file`) of every input the engine gets, every identifier it draws
//! and every output it gives, so that a real run can be replayed against the engine in a test
//! (`replay`). The API key is written as `<api_key>`; replay with no `api_key` configured.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Ids, Input, Output, RandomIds, Settings};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// The session map the engine started with.
    Restore {
        sessions: Vec<crate::engine::SessionRecord>,
    },
    /// `t_ns`: nanoseconds since the engine started, so replay reproduces every deadline exactly.
    Input {
        t_ns: u64,
        input: Input,
    },
    Id {
        id: String,
    },
    Output {
        output: Output,
    },
}

pub struct Trace {
    file: File,
    start: Instant,
    api_key: Option<String>,
}

impl Trace {
    pub fn open(path: &Path, start: Instant, api_key: Option<String>) -> io::Result<Rc<RefCell<Trace>>> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Rc::new(RefCell::new(Trace { file, start, api_key })))
    }

    pub fn input(&mut self, now: Instant, input: &Input) {
        let t_ns = now.duration_since(self.start).as_nanos() as u64;
        self.write(&Record::Input { t_ns, input: input.clone() });
    }

    pub fn write(&mut self, record: &Record) {
        let mut line = serde_json::to_string(record).expect("records serialise");
        if let Some(key) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
            line = line.replace(key, "<api_key>");
        }
        line.push('\n');
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            log::warn!("trace: cannot write: {e}");
        }
    }
}

/// Random identifiers that are also written to the trace.
pub struct TracedIds(pub Rc<RefCell<Trace>>);

impl TracedIds {
    fn record(&self, id: String) -> String {
        self.0.borrow_mut().write(&Record::Id { id: id.clone() });
        id
    }
}

impl Ids for TracedIds {
    fn uuid(&mut self) -> String {
        self.record(RandomIds.uuid())
    }
    fn token(&mut self) -> String {
        self.record(RandomIds.token())
    }
}

/// Identifiers in the order a trace recorded them.
struct ReplayIds(VecDeque<String>);

impl Ids for ReplayIds {
    fn uuid(&mut self) -> String {
        self.0.pop_front().expect("trace has fewer ids than the replay draws")
    }
    fn token(&mut self) -> String {
        self.uuid()
    }
}

pub fn parse(text: &str) -> Result<Vec<Record>, serde_json::Error> {
    text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect()
}

/// Feed a trace's inputs to a fresh engine at their recorded times; returns its outputs.
pub fn replay(settings: Settings, records: &[Record]) -> Vec<Output> {
    let ids = records.iter().filter_map(|r| match r {
        Record::Id { id } => Some(id.clone()),
        _ => None,
    });
    let start = Instant::now();
    let mut engine = Engine::new(settings, Box::new(ReplayIds(ids.collect())), start);
    let mut outputs = Vec::new();
    for r in records {
        match r {
            Record::Restore { sessions } => engine.restore(sessions.clone()),
            Record::Input { t_ns, input } => {
                engine.handle(start + Duration::from_nanos(*t_ns), input.clone());
                outputs.extend(std::iter::from_fn(|| engine.poll_output()));
            }
            Record::Id { .. } | Record::Output { .. } => {}
        }
    }
    outputs
}

/// The outputs a trace recorded.
pub fn recorded_outputs(records: &[Record]) -> Vec<Output> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Output { output } => Some(output.clone()),
            _ => None,
        })
        .collect()
}
