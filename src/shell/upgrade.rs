//! In-place upgrade on SIGHUP, sozu-style but keeping the PID (supervisord and systemd track it):
//! the running image checks that the binary at its path runs and accepts the config, then
//! re-executes it, handing over the listener, every connection, every claude terminal and the
//! engine state through an anonymous memory file. Children stay children: exec keeps the process.

use std::ffi::CString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::conn::HttpSnapshot;
use crate::engine::ProcId;

/// Names the memory file holding the `Handover`, in the new image's environment.
pub const ENV_FD: &str = "SYNTHESIS_UPGRADE_FD";

/// Everything the new image continues from.
#[derive(Serialize, Deserialize)]
pub struct Handover {
    /// `Engine::export`.
    pub engine: String,
    pub listener: RawFd,
    pub next_token: usize,
    pub http: Vec<HttpSnapshot>,
    /// Bound and unbound bridge WebSockets: (token, fd).
    pub bridges: Vec<(usize, RawFd)>,
    pub children: Vec<ChildSnapshot>,
}

#[derive(Serialize, Deserialize)]
pub struct ChildSnapshot {
    pub proc: ProcId,
    pub pid: u32,
    /// Its terminal's master side.
    pub master: RawFd,
    pub token: usize,
    /// Where its transcript has been read up to (absent from an older image's hand-over).
    #[serde(default)]
    pub transcript: Option<super::transcript::Transcript>,
}

impl Handover {
    fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        let conns = self.http.iter().map(|c| c.fd).chain(self.bridges.iter().map(|b| b.1));
        std::iter::once(self.listener).chain(conns).chain(self.children.iter().map(|c| c.master))
    }
}

/// Run the binary at `exe` with `--check`: it must start and accept the config at `config`.
pub fn check(exe: &Path, config: Option<&Path>) -> Result<(), String> {
    let mut cmd = Command::new(exe);
    cmd.arg("--check");
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    let out = cmd.output().map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr);
    Err(format!("{} --check failed ({}): {}", exe.display(), out.status, why.trim()))
}

/// Replace this image with `exe` (same arguments), handing `handover` over. Returns only if
/// that failed, with everything as it was.
pub fn exec(exe: &Path, handover: &Handover) -> io::Error {
    let memfd = match state_file(handover) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    // Signals that arrive while the new image sets up stay pending instead of killing it (a
    // handled signal is reset to its default action by exec; the mask and pending set survive).
    block_signals(true);
    for fd in handover.fds().chain([memfd]) {
        set_cloexec(fd, false);
    }
    // SAFETY: setenv before exec in a single-threaded process.
    std::env::set_var(ENV_FD, memfd.to_string());
    let err = execv(exe);
    std::env::remove_var(ENV_FD);
    for fd in handover.fds() {
        set_cloexec(fd, true);
    }
    // SAFETY: closing the memory file we created.
    unsafe { libc::close(memfd) };
    block_signals(false);
    err
}

fn state_file(handover: &Handover) -> io::Result<RawFd> {
    let name = CString::new("synthesis-upgrade").expect("no nul");
    // SAFETY: memfd_create with a valid name; the fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is the memfd we just created; `File` is forgotten below, so it stays open.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let written = serde_json::to_writer(&mut file, handover).map_err(io::Error::other).and_then(|()| file.flush());
    std::mem::forget(file);
    if let Err(e) = written {
        // SAFETY: closing our own memfd.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

fn execv(exe: &Path) -> io::Error {
    let path = CString::new(exe.as_os_str().as_bytes()).expect("no nul in a path");
    let args: Vec<CString> =
        std::env::args_os().map(|a| CString::new(a.as_bytes()).expect("no nul in an argument")).collect();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: path and argv are nul-terminated and outlive the call; environ is the process's.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

/// In a new image: the hand-over from the previous one, if this start is an upgrade.
pub fn take() -> Option<Result<Handover, String>> {
    let fd: RawFd = std::env::var(ENV_FD).ok()?.parse().ok()?;
    std::env::remove_var(ENV_FD);
    // SAFETY: the previous image passed this memfd to us; we own it now.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    let read = file.rewind().and_then(|()| file.read_to_string(&mut text));
    Some(read.map_err(|e| e.to_string()).and_then(|_| {
        let handover: Handover = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        // Inherited descriptors must not leak into the claudes this image starts.
        for fd in handover.fds() {
            set_cloexec(fd, true);
        }
        Ok(handover)
    }))
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        let flags = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
        libc::fcntl(fd, libc::F_SETFD, flags);
    }
}

/// Block (or unblock) the signals synthesis handles. A new image unblocks them once its
/// handlers are installed, and then receives what arrived meanwhile.
pub fn block_signals(block: bool) {
    // SAFETY: building a signal set and changing this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}
