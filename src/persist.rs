//! The session map on disk: OpenClaw session key → Claude Code session uuid, with timestamps.
//! Written atomically (temp file, fsync, rename, directory fsync), mode 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::SessionRecord;

const FILE: &str = "sessions.json";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SessionFile {
    version: u32,
    sessions: Vec<SessionRecord>,
}

/// Create `dir` (and missing parents) readable by its owner only (0700), or tighten it if it
/// exists: it holds claude's temporary files, tokens and the session map.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Write `bytes` to a file readable by its owner only (0600), never through a symlink.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Load the map. A missing file is an empty map; an unreadable one is moved aside (and logged)
/// so that synthesis starts empty instead of crash-looping under its supervisor.
pub fn load(state_dir: &Path, unix_secs: u64) -> Vec<SessionRecord> {
    let path = path(state_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        // Not UTF-8, or unreadable: moved aside like a parse error, never overwritten later.
        Err(e) => return set_aside(&path, unix_secs, &e.to_string()),
    };
    match serde_json::from_str::<SessionFile>(&text) {
        Ok(f) if f.version == VERSION => f.sessions,
        Ok(f) => set_aside(&path, unix_secs, &format!("unknown version {}", f.version)),
        Err(e) => set_aside(&path, unix_secs, &e.to_string()),
    }
}

fn set_aside(path: &Path, unix_secs: u64, why: &str) -> Vec<SessionRecord> {
    let aside = path.with_extension(format!("json.corrupt-{unix_secs}"));
    match fs::rename(path, &aside) {
        Ok(()) => log::error!(
            "{} is unreadable ({why}); moved to {}, starting with no sessions",
            path.display(),
            aside.display()
        ),
        Err(e) => log::error!(
            "{} is unreadable ({why}) and cannot be moved aside ({e}); starting with no sessions",
            path.display()
        ),
    }
    Vec::new()
}

pub fn save(state_dir: &Path, sessions: &[SessionRecord]) -> io::Result<()> {
    let path = path(state_dir);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(&SessionFile { version: VERSION, sessions: sessions.to_vec() })?;
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(state_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("synthesis-persist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_with_private_mode() {
        let d = dir("rt");
        let recs =
            vec![SessionRecord { key: "k".into(), uuid: "u".into(), created: 1, last_used: 2, ..Default::default() }];
        save(&d, &recs).unwrap();
        assert_eq!(load(&d, 0), recs);
        assert_eq!(fs::metadata(path(&d)).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!path(&d).with_extension("json.tmp").exists());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_the_map_starts_empty() {
        let d = dir("corrupt");
        fs::write(path(&d), "{half a file").unwrap();
        assert!(load(&d, 77).is_empty());
        assert!(!path(&d).exists());
        assert_eq!(fs::read_to_string(d.join("sessions.json.corrupt-77")).unwrap(), "{half a file");
    }

    #[test]
    fn private_dirs_and_files_are_owner_only_even_when_they_existed() {
        let d = dir("private");
        let sub = d.join("a/b");
        fs::create_dir_all(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700);
        let file = sub.join("f");
        fs::write(&file, "old").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&file, b"new").unwrap();
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&file).unwrap(), "new");
        std::os::unix::fs::symlink(&file, sub.join("link")).unwrap();
        assert!(write_private(&sub.join("link"), b"x").is_err(), "never through a symlink");
    }

    #[test]
    fn a_file_that_is_not_utf8_is_moved_aside_not_overwritten() {
        let d = dir("utf8");
        fs::write(path(&d), b"{\"version\": 1, \xff\xfe}").unwrap();
        assert!(load(&d, 78).is_empty());
        assert!(!path(&d).exists());
        assert_eq!(fs::read(d.join("sessions.json.corrupt-78")).unwrap(), b"{\"version\": 1, \xff\xfe}");
    }

    #[test]
    fn a_full_disk_is_an_error_not_a_silent_success() {
        let d = dir("full");
        std::os::unix::fs::symlink("/dev/full", path(&d).with_extension("json.tmp")).unwrap();
        let recs =
            vec![SessionRecord { key: "k".into(), uuid: "u".into(), created: 1, last_used: 2, ..Default::default() }];
        let err = save(&d, &recs).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    #[test]
    fn a_missing_file_is_an_empty_map() {
        assert!(load(&dir("missing"), 0).is_empty());
    }
}
