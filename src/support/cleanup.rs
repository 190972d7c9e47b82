//! Leaving nothing behind: temporary paths removed and child processes (qemu, qemu-img) killed on
//! Ctrl-C, SIGTERM, or a watchdog timeout, even while the main thread is blocked inside libguestfs.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};

static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Outputs already complete and in place, so that an interruption does not say nothing was written.
static WRITTEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static MAIN_PARKED: AtomicBool = AtomicBool::new(false);
/// Undoes a half-done change outside this machine (a created Glance image) when a signal arrives;
/// it must end on its own within seconds (the Glance delete is bounded).
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
        end_run("interrupted", crate::support::exit_codes::INTERRUPTED);
    });
}

/// Stops the run from another thread than the main one: kills the children, removes the
/// temporaries, says what had been written, and exits with `code`.
fn end_run(why: &str, code: i32) -> ! {
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
    let written = WRITTEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!("cloudimg: {why}; {}", what_remains(&written));
    std::process::exit(code);
}

/// What a stopped run leaves, for its last message.
fn what_remains(written: &[PathBuf]) -> String {
    if written.is_empty() {
        return "temporary files removed, no output was written".into();
    }
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    format!(
        "temporary files removed; written completely before the stop: {}; no other output was written",
        names.join(", ")
    )
}

/// Records an output that is complete and in place.
pub fn written(path: &Path) {
    WRITTEN.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
}

/// Called after each call that a signal can cut short (appliance, qemu-img): once a signal is being
/// handled, the call's failure is the signal's doing, so the thread stops here and leaves the clean-up
/// and the exit to the handler. The handler waits for the main thread only: an output writer parked
/// here must not tell it that the main thread has stopped starting qemu.
pub fn checkpoint() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        if std::thread::current().name() == Some("main") {
            MAIN_PARKED.store(true, Ordering::SeqCst);
        }
        loop {
            std::thread::park();
        }
    }
}

/// Sets (`Some`) or clears (`None`) what a signal must undo before the process exits.
pub fn on_interrupt(undo: Option<Undo>) {
    *ON_INTERRUPT.lock().unwrap_or_else(|e| e.into_inner()) = undo;
}

/// Registers a path (file or directory) that must not survive the process. A path made by another
/// thread after the handler has removed the temporaries is removed here, and that thread stops.
pub fn register(path: &Path) {
    let mut temporaries = TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner());
    // The handler sets the flag before it takes the list, under this lock: a path registered too
    // late for its removal always sees the flag.
    if !INTERRUPTED.load(Ordering::SeqCst) {
        temporaries.push(path.to_path_buf());
        return;
    }
    drop(temporaries);
    let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
    checkpoint();
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
/// drop, on a signal, or by a later run once this one is over.
pub struct WorkDir {
    dir: tempfile::TempDir,
    _alive: Alive,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub fn work_dir() -> Result<WorkDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{WORK_DIR_MARKER}{}-", owner_tag()))
        .tempdir()
        .context("creating a temporary directory (is $TMPDIR writable?)")?;
    register(dir.path());
    let alive = File::open(dir.path()).map(|d| Alive::hold(&d)).unwrap_or(Alive { _lock: None });
    Ok(WorkDir { dir, _alive: alive })
}

/// An exclusive `flock` on a temporary, held for as long as this process has it: the proof, for a
/// later run's sweep, that the temporary's owner is alive — in another pid namespace, or on another
/// host sharing the directory over NFS, where its pid says nothing. A lock held by a live process
/// cannot be taken; the kernel (or the NFS server) drops it when the process dies, however it dies.
pub struct Alive {
    _lock: Option<File>,
}

impl Alive {
    /// Locks `file`'s open file through a duplicate descriptor, which keeps the lock after `file` is
    /// closed. Where locks are not supported the temporary is simply never proven dead, so kept.
    pub fn hold(file: &File) -> Alive {
        let lock = file
            .try_clone()
            .ok()
            .filter(|dup| rustix::fs::flock(dup, FlockOperation::NonBlockingLockExclusive).is_ok());
        Alive { _lock: lock }
    }
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

/// Whether a tag names a run (pid and start time) that is alive in this pid namespace; `None` when the
/// tag is not one of ours.
fn alive_here(tag: &str) -> Option<bool> {
    let (pid, start) = tag.split_once('.')?;
    let (pid, start) = (pid.parse::<u32>().ok()?, start.parse::<u64>().ok()?);
    Some(start_time(pid) == Some(start))
}

/// The owner tag in a temporary name: what follows `marker`, up to the next `-`.
fn tag_after<'a>(name: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &name[name.find(marker)? + marker.len()..];
    rest.split_once('-').map(|(tag, _)| tag)
}

/// Removes the entries of `dir` that a killed cloudimg run left behind: names holding `marker`
/// followed by a run's tag, owned by this user, whose run is provably over — not alive by its pid
/// here, and its [`Alive`] lock free (a pid that is not visible proves nothing: other pid namespaces
/// and NFS clients share directories). Returns what was removed.
pub fn sweep_leftovers(dir: &Path, marker: &str) -> Vec<PathBuf> {
    let (Ok(parent), Ok(entries)) = (File::open(dir), std::fs::read_dir(dir)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(tag) = name.to_str().and_then(|n| tag_after(n, marker)) else {
            continue;
        };
        if alive_here(tag) != Some(false) {
            continue;
        }
        let Some((claimed, is_dir)) = claim(&parent, &name) else {
            continue;
        };
        let path = entry.path();
        let gone = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            rustix::fs::unlinkat(&parent, &name, AtFlags::empty()).map_err(Into::into)
        };
        drop(claimed);
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Takes the lock of the leftover `name` in `parent`, opened without following a link: `Some` (with
/// the descriptor that holds it, and whether it is a directory) when this user owns it, no live
/// process holds its lock, and the name still refers to what was locked.
fn claim(parent: &File, name: &OsStr) -> Option<(OwnedFd, bool)> {
    let base = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    // Over NFS an exclusive lock needs a file open for writing; a directory opens read-only.
    let fd = match rustix::fs::openat(parent, name, base | OFlags::RDWR, Mode::empty()) {
        Err(rustix::io::Errno::ISDIR) => {
            rustix::fs::openat(parent, name, base | OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).ok()?
        }
        opened => opened.ok()?,
    };
    let meta = File::from(fd.try_clone().ok()?).metadata().ok()?;
    if meta.uid() != crate::support::identity::effective_uid() {
        return None;
    }
    rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).ok()?;
    let now = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    ((now.st_dev, now.st_ino) == (meta.dev(), meta.ino())).then_some((fd, meta.is_dir()))
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

/// Bounds host-side work over one image's data (reading, parsing and checking what it holds), which no
/// appliance call's watchdog bounds: a hostile configuration could keep a loop busy for hours. If the
/// work is not done within its limit, the run is stopped as a signal would stop it (children killed,
/// temporaries removed), with `why` and [`crate::support::exit_codes::BAD_GUEST`]: a computation cannot be cut
/// short safely from outside, so the whole process ends.
pub struct Deadline {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deadline {
    pub fn arm(limit: Duration, why: String) -> Self {
        let (disarm, wait) = mpsc::channel::<()>();
        // Counted from now, not from whenever the thread first runs.
        let end = std::time::Instant::now() + limit;
        let thread = std::thread::spawn(move || {
            if wait.recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
                == Err(RecvTimeoutError::Timeout)
            {
                end_run(&why, crate::support::exit_codes::BAD_GUEST);
            }
        });
        Deadline { disarm: Some(disarm), thread: Some(thread) }
    }

    /// The deadline of one image's analysis, from finding its root to the decision: a step like an
    /// appliance call, bounded by the same --timeout.
    pub fn analysis(input: &Path, limit: Duration) -> Self {
        Deadline::arm(
            limit,
            format!(
                "error: reading and checking the configuration of {} did not finish within {} s (--timeout), \
                 so the run was stopped; the image may be built to stall cloudimg",
                input.display(),
                limit.as_secs()
            ),
        )
    }
}

impl Drop for Deadline {
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
    fn a_leftover_whose_owner_is_alive_out_of_sight_is_kept() {
        // A run in another pid namespace (or on another NFS client): its pid is not visible here, but
        // it holds the lock on its temporaries.
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join(".out.qcow2.cloudimg-partial-999999999.1-abc");
        let work = dir.path().join("cloudimg-999999999.1-def");
        std::fs::write(&partial, b"partial").unwrap();
        std::fs::create_dir(&work).unwrap();
        let held = [Alive::hold(&File::open(&partial).unwrap()), Alive::hold(&File::open(&work).unwrap())];
        assert!(sweep_leftovers(dir.path(), PARTIAL_MARKER).is_empty());
        assert!(sweep_leftovers(dir.path(), WORK_DIR_MARKER).is_empty());
        assert!(partial.exists() && work.exists());

        // Its run ends: the locks go with it, and the next sweep takes both.
        drop(held);
        assert_eq!(sweep_leftovers(dir.path(), PARTIAL_MARKER), vec![partial]);
        assert_eq!(sweep_leftovers(dir.path(), WORK_DIR_MARKER), vec![work]);
    }

    #[test]
    fn a_leftover_someone_else_owns_is_not_ours_to_remove() {
        if crate::support::identity::effective_uid() != 0 {
            return; // only root can give a file away
        }
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join(".out.qcow2.cloudimg-partial-999999999.1-abc");
        std::fs::write(&theirs, b"").unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        assert!(sweep_leftovers(dir.path(), PARTIAL_MARKER).is_empty());
        assert!(theirs.exists());
    }

    #[test]
    fn the_last_word_says_which_outputs_were_written() {
        assert_eq!(what_remains(&[]), "temporary files removed, no output was written");
        let done = what_remains(&[PathBuf::from("out/a.qcow2"), PathBuf::from("out/b.qcow2")]);
        assert!(done.contains("written completely before the stop: out/a.qcow2, out/b.qcow2"), "{done}");
        assert!(!done.contains("no output was written"), "{done}");
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
