//! Reading a claude's transcript for token usage: incrementally (from where the last read
//! stopped, whole lines only) and bounded (at most `READ_MAX` bytes per read; a line longer than
//! `LINE_MAX` is skipped unread). The parsing is `wire::transcript`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::wire::transcript::{Parser, Read, Usage};

/// Most bytes taken in one read; the rest waits for the next.
const READ_MAX: u64 = 4 << 20;
/// Longer lines (huge prompts, a reply of megabytes) are skipped: their usage is not counted.
const LINE_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transcript {
    path: PathBuf,
    /// Where the next read starts: always at a line start, or inside a skipped line.
    offset: u64,
    /// The line at `offset` is longer than `LINE_MAX`: skip to its end.
    skipping: bool,
    parser: Parser,
}

impl Transcript {
    /// A reader of `path` from its current end: a resumed session's earlier turns are not this
    /// process's.
    pub fn open(path: PathBuf) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Transcript { path, offset, skipping: false, parser: Parser::default() }
    }

    /// The usage of the API calls written since the last read; `None` while the transcript
    /// cannot be read (not written yet, or not where claude keeps it).
    pub fn read(&mut self) -> Option<Read> {
        let mut read = Read::default();
        if let Err(e) = self.read_lines(|chat_id, usage| read.add(chat_id, usage)) {
            log::debug!("transcript {}: {e}", self.path.display());
            return None;
        }
        read.answered = self.parser.answered();
        Some(read)
    }

    fn read_lines(&mut self, mut found: impl FnMut(Option<String>, Usage)) -> io::Result<()> {
        // Non-blocking: whatever is at that path, a read must never stall the event loop.
        let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(&self.path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        if meta.len() < self.offset {
            // Rewritten from scratch: what was counted stays counted; go on from its end.
            self.offset = meta.len();
            self.skipping = false;
            return Ok(());
        }
        let want = (meta.len() - self.offset).min(READ_MAX);
        let mut buf = vec![0; want as usize];
        let n = read_at(&file, &mut buf, self.offset)?;
        buf.truncate(n);
        let mut start = 0;
        while let Some(len) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + len];
            if std::mem::take(&mut self.skipping) {
                log::debug!("transcript {}: skipped a line over {LINE_MAX} bytes", self.path.display());
            } else if line.len() as u64 <= LINE_MAX {
                if let Some((chat_id, usage)) = self.parser.line(line) {
                    found(chat_id, usage);
                }
            }
            start += len + 1;
        }
        self.offset += start as u64;
        let rest = (buf.len() - start) as u64;
        if rest >= LINE_MAX || (self.skipping && rest > 0) {
            // A line too long to take: skip what there is of it, and the rest of it later.
            self.offset += rest;
            self.skipping = true;
        }
        Ok(())
    }
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn assistant(id: &str, input: u64) -> String {
        format!(
            r#"{{"type":"assistant","message":{{"id":"{id}","usage":{{"input_tokens":{input},"output_tokens":1}}}}}}"#
        )
    }

    #[test]
    fn reads_whole_lines_incrementally_from_the_end_at_open_and_skips_giant_lines() {
        let dir = std::env::temp_dir().join(format!("synthesis-transcript-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let mut f = File::create(&path).unwrap();
        writeln!(f, "{}", assistant("before", 1000)).unwrap();
        let mut t = Transcript::open(path.clone());
        assert!(t.read().unwrap().usage.is_empty(), "what was there at spawn is an earlier process's");
        let chat = r#"{"type":"user","message":{"content":"<channel source=\"synthesis\" chat_id=\"chat-1\">\nhi\n</channel>"}}"#;
        writeln!(f, "{chat}").unwrap();
        let line = assistant("m1", 10);
        write!(f, "{}", &line[..20]).unwrap();
        assert!(t.read().unwrap().usage.is_empty(), "half a line waits");
        writeln!(f, "{}", &line[20..]).unwrap();
        let read = t.read().unwrap();
        assert_eq!(read.answered.as_deref(), Some("chat-1"));
        let got = read.usage;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.as_deref(), Some("chat-1"));
        assert_eq!((got[0].1.input_tokens, got[0].1.calls), (10, 1));
        // A giant line, read in several pieces, is skipped; the line after it counts.
        let giant = format!(r#"{{"type":"assistant","pad":"{}"}}"#, "x".repeat((READ_MAX + LINE_MAX) as usize));
        writeln!(f, "{giant}").unwrap();
        assert!(t.read().unwrap().usage.is_empty());
        writeln!(f, "{}\n{}", assistant("m2", 20), assistant("m3", 30)).unwrap();
        let got = t.read().unwrap().usage;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1.input_tokens, 50);
        assert!(Transcript::open(dir.join("absent.jsonl")).read().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
