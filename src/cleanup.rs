//! Leaving nothing behind: temporary paths removed and child processes (qemu, qemu-img) killed on
//! Ctrl-C, SIGTERM, or a watchdog timeout, even while the main thread is blocked inside libguestfs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static MAIN_PARKED: AtomicBool = AtomicBool::new(false);
/// Undoes a half-done change outside this machine (a created Glance image) when a signal arrives.
type Undo = Box<dyn FnOnce() + Send>;
static ON_INTERRUPT: Mutex<Option<Undo>> = Mutex::new(None);

/// Installs the handler for SIGINT, SIGTERM and SIGHUP: kill children, remove temporaries, exit.
pub fn install_signal_handler() {
    // Failing to install (a handler already exists) only loses the clean-up, not correctness.
    let _ = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        if let Some(undo) = ON_INTERRUPT.lock().unwrap_or_else(|e| e.into_inner()).take() {
            undo();
        }
        // The main thread may be inside libguestfs, creating files in our temporary directory or
        // starting qemu: keep killing children until it has parked at a checkpoint (bounded wait).
        for _ in 0..500 {
            kill_children();
            if MAIN_PARKED.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        remove_temporaries();
        eprintln!("cloudimg: interrupted; temporary files removed, nothing was written");
        std::process::exit(crate::exit_codes::INTERRUPTED);
    });
}

/// Called by the main thread after each call that a signal can cut short (appliance, qemu-img):
/// once a signal is being handled, the call's failure is the signal's doing, so the main thread stops
/// here and leaves the clean-up and the exit to the handler.
pub fn checkpoint() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        MAIN_PARKED.store(true, Ordering::SeqCst);
        loop {
            std::thread::park();
        }
    }
}

/// Sets (`Some`) or clears (`None`) what a signal must undo before the process exits.
pub fn on_interrupt(undo: Option<Undo>) {
    *ON_INTERRUPT.lock().unwrap_or_else(|e| e.into_inner()) = undo;
}

/// Registers a path (file or directory) that must not survive the process.
pub fn register(path: &Path) {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
}

/// Forgets a path once it has been removed or renamed into place.
pub fn unregister(path: &Path) {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != path);
}

fn remove_temporaries() {
    let paths = std::mem::take(&mut *TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner()));
    for path in paths {
        // A dying libguestfs may still add files to a directory while it is removed: retry briefly.
        for _ in 0..50 {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            if path.symlink_metadata().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A temporary directory for one run, named `cloudimg-TAG-XXXXXX` (see [`owner_tag`]) and removed on
/// drop, on a signal, or by a later run if this one is killed.
pub fn work_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{WORK_DIR_MARKER}{}-", owner_tag()))
        .tempdir()
        .context("creating a temporary directory (is $TMPDIR writable?)")?;
    register(dir.path());
    Ok(dir)
}

pub const WORK_DIR_MARKER: &str = "cloudimg-";
pub const PARTIAL_MARKER: &str = ".cloudimg-partial-";

/// Names this process in its temporary files: its pid and start time (clock ticks since boot), so that
/// a later run can tell the leftovers of a run that was killed (kill -9, OOM, power loss) from the
/// files of one still going, even after the pid is reused.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{pid}.{}", start_time(pid).unwrap_or(0))
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    start_time_field(&stat)
}

/// Field 22 of `/proc/PID/stat`; the command name (field 2) may hold spaces and parentheses.
fn start_time_field(stat: &str) -> Option<u64> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the run a tag names has ended; a tag that cannot be parsed is not ours to judge.
fn owner_is_gone(tag: &str) -> bool {
    let Some((pid, start)) = tag.split_once('.') else {
        return false;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) != Some(start),
        _ => false,
    }
}

/// The owner tag in a temporary name: what follows `marker`, up to the next `-`.
fn tag_after<'a>(name: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &name[name.find(marker)? + marker.len()..];
    rest.split_once('-').map(|(tag, _)| tag)
}

/// Removes the entries of `dir` that a killed cloudimg run left behind: names holding `marker`
/// followed by the tag of a process that is gone. Returns what was removed.
pub fn sweep_leftovers(dir: &Path, marker: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(tag) = name.to_str().and_then(|n| tag_after(n, marker)) else {
            continue;
        };
        if owner_is_gone(tag) {
            let path = entry.path();
            let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if gone.is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// Fault injection for the test suite: with `CLOUDIMG_STOP_AT=NAME` the process stops itself
/// (SIGSTOP) at the point called NAME, so that a test can kill it exactly there, or signal it and let
/// it continue: a signal sent while stopped is then handled as if it arrived at that point.
pub fn fault_point(name: &str) {
    if std::env::var_os("CLOUDIMG_STOP_AT").is_some_and(|v| v == name) {
        // SAFETY: raise(3) with a valid signal number.
        unsafe { libc::raise(libc::SIGSTOP) };
        // Give the handler thread, woken by SIGCONT together with this one, time to take the signal.
        std::thread::sleep(Duration::from_millis(300));
        checkpoint();
    }
}

/// Makes a child about to be spawned die with this process, even when this process is killed with
/// SIGKILL and cannot clean up (qemu-img would otherwise go on writing an orphaned file).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: getpid(2) has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: prctl, getppid and _exit are async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Kills this process's children (the appliance's qemu and libguestfs's helper, qemu-img).
pub fn kill_children() {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if parent_pid(&stat) == Some(me) {
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The parent pid from a `/proc/PID/stat` line; the command name may contain spaces and parentheses.
fn parent_pid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Kills the children if it is not disarmed within `limit`; the blocked call then fails and the caller
/// asks [`Watchdog::fired`] to explain why.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    fired: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn arm(limit: Duration) -> Self {
        let (disarm, wait) = mpsc::channel::<()>();
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = std::thread::spawn(move || {
            if wait.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
                flag.store(true, Ordering::SeqCst);
                kill_children();
            }
        });
        Watchdog { disarm: Some(disarm), fired, thread: Some(thread) }
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_survives_odd_command_names() {
        assert_eq!(parent_pid("42 (qemu) S 7 42 42 0"), Some(7));
        assert_eq!(parent_pid("42 (a) b (c)) R 9 1 1"), Some(9));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn leftovers_of_dead_runs_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join(format!("cloudimg-{}-abc", owner_tag()));
        let dead = dir.path().join("cloudimg-999999999.1-abc");
        let reused_pid = dir.path().join(format!(".out.qcow2.cloudimg-partial-{}.1-xyz", std::process::id()));
        let unrelated = dir.path().join("cloudimg-notes.txt");
        std::fs::create_dir(&mine).unwrap();
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(&reused_pid, b"").unwrap();
        std::fs::write(&unrelated, b"").unwrap();
        assert_eq!(sweep_leftovers(dir.path(), WORK_DIR_MARKER), vec![dead.clone()]);
        assert_eq!(sweep_leftovers(dir.path(), PARTIAL_MARKER), vec![reused_pid.clone()]);
        assert!(mine.exists() && unrelated.exists() && !dead.exists() && !reused_pid.exists());
        assert_eq!(start_time_field("1 (a) b) S 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0"), Some(4242));
    }

    #[test]
    fn watchdog_kills_a_hanging_child_and_says_so() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let dog = Watchdog::arm(Duration::from_millis(200));
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(dog.fired());
        let quiet = Watchdog::arm(Duration::from_secs(30));
        drop(quiet);
    }
}
