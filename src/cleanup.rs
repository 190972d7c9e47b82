//! Leaving nothing behind: temporary paths removed and child processes (qemu, qemu-img) killed on
//! Ctrl-C, SIGTERM, or a watchdog timeout, even while the main thread is blocked inside libguestfs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static MAIN_PARKED: AtomicBool = AtomicBool::new(false);

/// Installs the handler for SIGINT, SIGTERM and SIGHUP: kill children, remove temporaries, exit.
pub fn install_signal_handler() {
    // Failing to install (a handler already exists) only loses the clean-up, not correctness.
    let _ = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
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
