//! Freezing some threads of a process, and only those: the "halted CPU" fault for bdvmm's kvm
//! engine. SIGSTOP cannot do it — a stop signal stops every thread of the process, so bdvmm's
//! control loop and API would stop with its vCPUs and nothing could be read through its bridge.
//! A ptrace stop is per thread: a tracer `PTRACE_SEIZE`s each vCPU thread and
//! `PTRACE_INTERRUPT`s it (a vCPU in `KVM_RUN` returns `EINTR` to the kernel's signal path and
//! stops there, holding no lock of bdvmm's), then waits, doing nothing, until it is killed: the
//! kernel then detaches its tracees, which go on (`KVM_RUN` is re-entered after the `EINTR`).
//!
//! The tracer runs detached from its caller (its own session, stdio on /dev/null) so that the
//! command that froze the threads can return; it writes its pid to a file, and thawing is
//! `kill -KILL $(cat pidfile)`.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::Path;

/// Why threads could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// No process matched.
    #[error("no process named {comm:?} whose command line contains {needle:?}")]
    NoProcess {
        /// Its comm.
        comm: String,
        /// What its command line must contain.
        needle: String,
    },
    /// The process has no thread whose name starts with the prefix.
    #[error("process {pid} has no thread named {prefix}*")]
    NoThread {
        /// The process.
        pid: u32,
        /// The thread name prefix.
        prefix: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The tracer reported a failure.
    #[error("tracer: {0}")]
    Tracer(String),
}

fn sys(what: impl Into<String>) -> FreezeError {
    FreezeError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read(p)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
}

/// The pid of the process named `comm` whose command line contains `needle`.
pub fn find_process(comm: &str, needle: &str) -> Result<u32, FreezeError> {
    let none = || FreezeError::NoProcess {
        comm: comm.to_string(),
        needle: needle.to_string(),
    };
    let dir = std::fs::read_dir("/proc").map_err(|_| none())?;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if read_trimmed(&e.path().join("comm")).as_deref() != Some(comm) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            return Ok(pid);
        }
    }
    Err(none())
}

/// The threads of `pid` whose name starts with `prefix`.
pub fn threads(pid: u32, prefix: &str) -> Result<Vec<i32>, FreezeError> {
    let dir =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|source| FreezeError::Sys {
            what: format!("/proc/{pid}/task"),
            source,
        })?;
    let mut v: Vec<i32> = dir
        .flatten()
        .filter(|e| read_trimmed(&e.path().join("comm")).is_some_and(|c| c.starts_with(prefix)))
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect();
    v.sort_unstable();
    if v.is_empty() {
        return Err(FreezeError::NoThread {
            pid,
            prefix: prefix.to_string(),
        });
    }
    Ok(v)
}

/// Seizes and stops each thread; returns once every one is in its ptrace stop.
fn stop_all(tids: &[i32]) -> Result<(), FreezeError> {
    for &tid in tids {
        // SAFETY: ptrace on a thread id with null address and data arguments, as documented
        // for PTRACE_SEIZE (no options) and PTRACE_INTERRUPT.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) } != 0 {
            return Err(sys(format!("PTRACE_SEIZE {tid}")));
        }
        // SAFETY: as above.
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) } != 0 {
            return Err(sys(format!("PTRACE_INTERRUPT {tid}")));
        }
    }
    for &tid in tids {
        let mut status = 0;
        // SAFETY: waitpid on a traced thread with a valid status pointer.
        if unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } != tid {
            return Err(sys(format!("waitpid {tid}")));
        }
        if !libc::WIFSTOPPED(status) {
            return Err(FreezeError::Tracer(format!(
                "thread {tid} did not stop (status {status:#x})"
            )));
        }
    }
    Ok(())
}

/// Freezes the threads `tids` from a detached tracer that writes its pid to `pidfile`; returns
/// the tracer's pid once every thread is stopped. Must be called while this process has one
/// thread (it forks).
pub fn freeze_detached(tids: &[i32], pidfile: &Path) -> Result<i32, FreezeError> {
    let mut fds = [0; 2];
    // SAFETY: pipe with a valid two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(sys("pipe"));
    }
    // SAFETY: fork in a single-threaded process (the caller's contract); the child only runs
    // this function's code and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork"));
    }
    if pid == 0 {
        // SAFETY: closing the read end, a descriptor this process owns.
        unsafe { libc::close(fds[0]) };
        // SAFETY: the write end is owned by this child alone from here on.
        let mut report = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        // SAFETY: setsid has no preconditions; a new session keeps the tracer out of the
        // caller's process group (a shell or agent that kills its group on exit).
        unsafe { libc::setsid() };
        let outcome = stop_all(tids).and_then(|()| {
            // SAFETY: getpid has no preconditions.
            let me = unsafe { libc::getpid() };
            std::fs::write(pidfile, format!("{me}\n")).map_err(|source| FreezeError::Sys {
                what: format!("write {}", pidfile.display()),
                source,
            })
        });
        let _ = match &outcome {
            Ok(()) => report.write_all(b"ok\n"),
            Err(e) => report.write_all(format!("{e}\n").as_bytes()),
        };
        drop(report);
        if outcome.is_err() {
            // SAFETY: _exit ends the child at once; the kernel detaches any tracee.
            unsafe { libc::_exit(1) };
        }
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors of this process.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        loop {
            // SAFETY: pause has no preconditions; the tracer waits to be killed.
            unsafe { libc::pause() };
        }
    }
    // SAFETY: closing the write end in the parent, which owns it.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is owned by the parent alone.
    let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut got = String::new();
    let _ = r.read_to_string(&mut got);
    if got.trim() == "ok" {
        Ok(pid)
    } else {
        let mut status = 0;
        // SAFETY: reaping the child this function forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        Err(FreezeError::Tracer(if got.trim().is_empty() {
            format!("exited with status {status:#x} before reporting")
        } else {
            got.trim().to_string()
        }))
    }
}

/// The tracer of [`freeze_detached`] as a guard: dropping it (or [`Thaw::now`]) kills the tracer,
/// which lets the frozen threads go on, whatever happens to the test that froze them.
pub struct Thaw(Option<i32>);

impl Thaw {
    /// Guards the tracer `pid` (as [`freeze_detached`] returned it or wrote it to its pidfile).
    pub fn new(pid: i32) -> Thaw {
        Thaw(Some(pid))
    }

    /// Kills the tracer now; true if it was still there to kill.
    pub fn now(&mut self) -> bool {
        match self.0.take() {
            // SAFETY: kill with a pid the tracer itself reported.
            Some(pid) => unsafe { libc::kill(pid, libc::SIGKILL) == 0 },
            None => false,
        }
    }
}

impl Drop for Thaw {
    fn drop(&mut self) {
        self.now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_matches_an_unknown_process() {
        assert!(matches!(
            find_process("no-such-comm-x", "y"),
            Err(FreezeError::NoProcess { .. })
        ));
        let me = std::process::id();
        assert!(matches!(
            threads(me, "no-such-thread-prefix"),
            Err(FreezeError::NoThread { .. })
        ));
    }
}
