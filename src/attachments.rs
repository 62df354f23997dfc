//! The shell's side of attachments (`Output::WriteAttachment` / `RemoveAttachments`): images and
//! files from requests, on disk for Claude's Read tool. Owner-only: directories 0700, files 0600.
//! The engine chose every path (`<state_dir>/attachments/<session hash>/<content hash>-<name>`).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// `<state_dir>/attachments`, absolute: the channel message names files under it.
pub fn dir(state_dir: &Path) -> PathBuf {
    std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()).join("attachments")
}

/// The Claude Code permission rule that lets Claude Read the attachments (and nothing else
/// outside its workspace) without a permission prompt. An absolute path is written `//path`.
pub fn read_rule(state_dir: &Path) -> String {
    format!("Read(/{}/**)", dir(state_dir).display())
}

/// Write `bytes` at `path`. Names are content hashes, so a file that is already there with the
/// same size is the same file and is left alone.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("attachment path has no directory"))?;
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // Both levels synthesis owns (`attachments/` and the session's), even if made earlier.
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
    }
    if fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(());
    }
    let tmp = path.with_extension("part");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    fs::rename(&tmp, path)
}

/// Delete a session's attachments directory; a missing one is fine.
pub fn remove(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_only_and_removable() {
        let root = std::env::temp_dir().join(format!("synthesis-attachments-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let file = root.join("attachments/0123/abc-image.png");
        write(&file, b"png bytes").unwrap();
        write(&file, b"png bytes").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"png bytes");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(mode(&root.join("attachments")), 0o700);
        remove(file.parent().unwrap()).unwrap();
        assert!(!file.exists());
        remove(file.parent().unwrap()).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }
}
