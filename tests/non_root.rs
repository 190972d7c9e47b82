//! cloudimg as an ordinary user: it works where libguestfs allows it, and writes nothing outside the
//! output directory and the temporary directory it was given. Needs root to create the user; skipped
//! (with a message) otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{file_text, fixtures, text, ReadBack};

const USER: &str = "cloudimg-nonroot";

/// The tests here run one at a time: one looks for every file the user owns, the other makes some.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ensure_user() {
    if !Command::new("id").arg(USER).output().unwrap().status.success() {
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER])
            .status()
            .unwrap();
        assert!(made.success(), "useradd {USER}");
    }
}

/// As root: the test user, this binary's turn with it, and a directory (0755, root's) to work in.
/// `None` (the test is skipped) for anyone else.
fn with_user(prefix: &str) -> Option<(std::sync::MutexGuard<'static, ()>, tempfile::TempDir)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating a test user needs root");
        return None;
    }
    let alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    ensure_user();
    let base = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some((alone, base))
}

fn chown_to_user(path: &Path) {
    assert!(Command::new("chown").args([&format!("{USER}:"), path.to_str().unwrap()]).status().unwrap().success());
}

fn as_user(binary: &Path, args: &[&str], home: &Path, tmp: &Path) -> Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .arg(format!("HOME={}", home.display()))
        .arg(format!("TMPDIR={}", tmp.display()))
        .arg(binary)
        .args(args)
        .output()
        .unwrap()
}

/// Files the user owns anywhere it could write, outside `allowed`.
fn files_owned_outside(allowed: &Path) -> Vec<String> {
    let out = Command::new("find")
        .args(["/", "/tmp", "/var/tmp", "/dev/shm", "/run", "-xdev", "-user", USER])
        .output()
        .unwrap();
    text(&out.stdout).lines().filter(|l| !Path::new(l).starts_with(allowed)).map(str::to_string).collect()
}

#[test]
fn an_ordinary_user_customizes_an_image_and_writes_only_where_told() {
    let Some((_alone, base)) = with_user("cloudimg-nonroot-") else { return };
    let dir = |name: &str| {
        let d = base.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (input_dir, out_dir, tmp, home) = (dir("input"), dir("out"), dir("tmp"), dir("home"));
    for d in [&out_dir, &tmp, &home] {
        chown_to_user(d);
    }
    // The binary is copied: the checkout may sit under a directory the user cannot enter (/root).
    let binary = input_dir.join("cloudimg");
    std::fs::copy(env!("CARGO_BIN_EXE_cloudimg"), &binary).unwrap();
    let input = input_dir.join("debian.qcow2");
    std::fs::copy(fixtures().image("debian-ext4"), &input).unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    let password = home.join("pw");
    std::fs::write(&password, "non-root secret\n").unwrap();
    chown_to_user(&password);
    let input_sum = common::sha256(&input);
    let before = files_owned_outside(base.path());

    let doctor = as_user(&binary, &["doctor", "--quick", "--json"], &home, &tmp);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let user_check = &report["checks"][0];
    assert!(user_check["detail"].as_str().unwrap().contains("not root"), "{report:#}");

    let output = out_dir.join("debian-pw.qcow2");
    let run = as_user(
        &binary,
        &[
            "customize",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--password-file",
            password.to_str().unwrap(),
        ],
        &home,
        &tmp,
    );
    assert!(run.status.success(), "{}\n{}", text(&run.stdout), text(&run.stderr));

    assert_eq!(common::sha256(&input), input_sum, "the input is unchanged");
    let after = files_owned_outside(base.path());
    assert_eq!(after, before, "files the user created outside the output and temporary directories");
    let leftovers: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".guestfs-"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left in TMPDIR: {leftovers:?}");
    let home_entries: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(home_entries, vec![std::ffi::OsString::from("pw")], "nothing written to HOME");
    let owner = std::fs::metadata(&output).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), user_uid(), "the output belongs to the user");

    let rb = ReadBack::open(&[&output]);
    let files = rb.read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]);
    let cfg = file_text(&files, "/etc/cloud/cloud.cfg");
    let doc = &common::pyyaml(&[cfg])[0];
    let entry = &doc["chpasswd"]["users"][0];
    assert_eq!(entry["name"], "debian", "{doc:#}");
    assert!(common::system_crypt_verifies("non-root secret", entry["password"].as_str().unwrap()), "{doc:#}");
}

fn user_uid() -> u32 {
    let out = Command::new("id").args(["-u", USER]).output().unwrap();
    text(&out.stdout).trim().parse().unwrap()
}

fn user_gid() -> u32 {
    let out = Command::new("id").args(["-g", USER]).output().unwrap();
    text(&out.stdout).trim().parse().unwrap()
}

/// What the attacker puts under the name of a partial file it sees created.
#[derive(Clone)]
enum Swap {
    /// A symlink to the canary.
    Symlink,
    /// One of its own files, renamed in.
    Own(PathBuf),
}

/// The owner of a directory, racing cloudimg (run by root) there: a thread whose filesystem identity
/// is the user's (setfsuid/setfsgid are per thread: every entry it creates, renames or removes is
/// done with the user's rights only), woken by inotify when a name starting with one of `rules`' keys
/// is created, which it then moves away (to `stolen-N`) and replaces. It runs with a real-time
/// priority on the CPU cloudimg is pinned to, so that it acts before cloudimg's next system call: the
/// race is won every time, where an attacker on a busy machine wins it some of the time.
struct Attacker {
    dir: PathBuf,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Attacker {
    fn start(dir: &Path, canary: &Path, rules: Vec<(String, Swap)>, cpu: Option<usize>) -> Attacker {
        let (uid, gid) = (user_uid(), user_gid());
        let (watch_dir, canary) = (dir.to_path_buf(), canary.to_path_buf());
        let (ready, started) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            become_user(uid, gid);
            if let Some(cpu) = cpu {
                realtime_on(0, cpu);
            }
            use rustix::fs::inotify;
            let events = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
            inotify::add_watch(&events, &watch_dir, inotify::WatchFlags::CREATE).unwrap();
            ready.send(()).unwrap();
            let mut rules = rules;
            let mut swapped = Vec::new();
            let mut buffer = [std::mem::MaybeUninit::uninit(); 4096];
            let mut reader = inotify::Reader::new(&events, &mut buffer);
            loop {
                let event = reader.next().unwrap();
                let Some(name) = event.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
                if name == "stop" {
                    return swapped;
                }
                let Some(at) = rules.iter().position(|(key, _)| name.starts_with(key.as_str())) else { continue };
                let (_, swap) = rules.remove(at);
                swap.apply(&watch_dir, &name, &canary, &format!("stolen-{}", swapped.len()));
                swapped.push(name);
            }
        });
        started.recv().unwrap();
        Attacker { dir: dir.to_path_buf(), thread: Some(thread) }
    }

    /// The partial files it swapped.
    fn stop(mut self) -> Vec<String> {
        std::fs::write(self.dir.join("stop"), b"").unwrap();
        let swapped = self.thread.take().unwrap().join().unwrap();
        std::fs::remove_file(self.dir.join("stop")).unwrap();
        swapped
    }
}

impl Swap {
    /// Moves `dir/name` away to `dir/away` and puts the replacement in its place.
    fn apply(&self, dir: &Path, name: &str, canary: &Path, away: &str) {
        let partial = dir.join(name);
        std::fs::rename(&partial, dir.join(away)).unwrap();
        match self {
            Swap::Symlink => std::os::unix::fs::symlink(canary, &partial).unwrap(),
            Swap::Own(file) => std::fs::rename(file, &partial).unwrap(),
        }
    }
}

/// Gives this thread the user's filesystem identity (setfsuid and setfsgid are per thread; a
/// non-zero fsuid also drops root's filesystem capabilities).
fn become_user(uid: u32, gid: u32) {
    // SAFETY: setfsgid/setfsuid change only this thread's filesystem identity.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
}

/// Pins thread `tid` (0: this one) to `cpu` and, for this thread, gives it a real-time priority.
fn realtime_on(tid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read the set and the parameters.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
        if tid == 0 {
            let param = libc::sched_param { sched_priority: 10 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                eprintln!("no real-time priority ({}): the attacker may lose races", std::io::Error::last_os_error());
            }
        }
    }
}

/// Pins every thread of a process to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        realtime_on(task.file_name().to_str().unwrap().parse().unwrap(), cpu);
    }
}

/// A CPU this process may run on (the last one).
fn a_cpu() -> usize {
    // SAFETY: sched_getaffinity fills the set it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        (0..libc::CPU_SETSIZE as usize).rev().find(|&cpu| libc::CPU_ISSET(cpu, &set)).unwrap()
    }
}

/// Starts cloudimg (as root), stopped at fault point `step` (`CLOUDIMG_STOP_AT`), and waits until it is.
/// cloudimg started with `args`, its temporary files in `tmp`; stopping itself at `stop_at`.
fn started(args: &[&str], tmp: &Path, stop_at: Option<&str>) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudimg"));
    cmd.args(args)
        .env("TMPDIR", tmp)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(step) = stop_at {
        cmd.env("CLOUDIMG_STOP_AT", step);
    }
    cmd.spawn().unwrap()
}

fn stopped_at(args: &[&str], tmp: &Path, step: &str) -> std::process::Child {
    let mut child = started(args, tmp, Some(step));
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("cloudimg ended ({status}) before {step}: {}", text(&child.wait_with_output().unwrap().stderr));
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
        if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')) {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn resume(child: std::process::Child) -> Output {
    // SAFETY: kill(2) on the process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGCONT) }, 0);
    child.wait_with_output().unwrap()
}

/// (bytes, mode, uid, gid) of a file.
fn state(path: &Path) -> (Vec<u8>, u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.mode() & 0o7777, meta.uid(), meta.gid())
}

/// Root runs cloudimg on a directory another user owns; that user swaps the partial file (the image's,
/// the manifest's) for a symlink to a root-owned canary, or for a file of their own, at the moment it
/// is created or after it was written and checked. cloudimg must never write, chmod or chown through
/// the swapped name: the canary keeps its bytes, mode and owner, the user's file too, the swapped
/// names are left as the user made them, and each such output fails with exit 7.
/// The setting of the race tests: this binary's turn with the test user, a directory of root's
/// holding root's canary file (what a swapped-in symlink would point an output at), an output
/// directory the user owns, root's own TMPDIR and the password file.
struct Race {
    _alone: std::sync::MutexGuard<'static, ()>,
    base: tempfile::TempDir,
    canary: PathBuf,
    canary_before: (Vec<u8>, u32, u32, u32),
    out: PathBuf,
    tmp: PathBuf,
    pw: PathBuf,
    cpu: usize,
}

impl Race {
    /// `None` (the test is skipped) unless root.
    fn new() -> Option<Race> {
        let (alone, base) = with_user("cloudimg-race-")?;
        let canary = base.path().join("canary");
        std::fs::write(&canary, b"root's file, which no output may become\n").unwrap();
        std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (out, tmp, pw) = (base.path().join("out"), base.path().join("tmp"), base.path().join("pw"));
        for dir in [&out, &tmp] {
            std::fs::create_dir(dir).unwrap();
        }
        chown_to_user(&out);
        std::fs::write(&pw, "race secret\n").unwrap();
        let canary_before = state(&canary);
        Some(Race { _alone: alone, base, canary, canary_before, out, tmp, pw, cpu: a_cpu() })
    }

    /// A copy of the fixture `fixture` at `path`.
    fn input(&self, fixture: &str, path: PathBuf) -> PathBuf {
        std::fs::copy(fixtures().image(fixture), &path).unwrap();
        path
    }

    fn at(&self, name: &str) -> PathBuf {
        self.base.path().join(name)
    }

    /// The run failed as a replaced temporary file must make it fail, and the canary is as it was.
    fn failed_cleanly(&self, result: &Output, what: &str) {
        let stderr = text(&result.stderr);
        assert_eq!(state(&self.canary), self.canary_before, "{what}: the canary is untouched: {stderr}");
        assert_eq!(result.status.code(), Some(7), "{what}: {stderr}");
        assert!(stderr.contains("was replaced or moved while cloudimg wrote it"), "{what}: {stderr}");
    }
}

/// The prefix of cloudimg's temporary name for the output `name`.
fn partial(name: &str) -> String {
    format!(".{name}.cloudimg-partial-")
}

fn arg(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

#[test]
fn out_dir_outputs_and_manifests_swapped_as_they_are_created_fail_without_writing_elsewhere() {
    // --out-dir and --manifest, at the moment each partial file is created, in one launch: a's image
    // becomes a symlink, b's image is left alone but its manifest becomes a symlink, c's image becomes
    // a file of the user's own.
    let Some(race) = Race::new() else { return };
    let out = &race.out;
    let a = race.input("debian-ext4", race.at("a.qcow2"));
    let b = race.input("debian-xfs", race.at("b.qcow2"));
    let c = race.input("ubuntu-gpt-efi-boot", race.at("c.qcow2"));
    let own = out.join("mine");
    std::fs::write(&own, b"the user's own file\n").unwrap();
    chown_to_user(&own);
    let own_before = state(&own);
    let rules = vec![
        (partial("a.qcow2"), Swap::Symlink),
        (partial("b.qcow2.json"), Swap::Symlink),
        (partial("c.qcow2"), Swap::Own(own.clone())),
    ];
    let (a, b, c, out_arg, pw) = (arg(&a), arg(&b), arg(&c), arg(out), arg(&race.pw));
    let args = ["customize", &a, &b, &c, "--out-dir", &out_arg, "--manifest", "--password-file", &pw];
    // The partial files appear from the start (the inputs are copied beside their outputs while the
    // appliance starts): the attacker watches before cloudimg runs.
    let attacker = Attacker::start(out, &race.canary, rules, Some(race.cpu));
    let run = started(&args, &race.tmp, None);
    pin_process(run.id(), race.cpu);
    let result = run.wait_with_output().unwrap();
    let swapped = attacker.stop();
    let stderr = text(&result.stderr);
    assert_eq!(swapped.len(), 3, "the attacker saw every partial file: {swapped:?}\n{stderr}");
    race.failed_cleanly(&result, "--out-dir");
    let c_name = swapped.iter().find(|n| n.starts_with(&partial("c.qcow2"))).unwrap();
    assert_eq!(state(&out.join(c_name)), own_before, "the user's own file is untouched");
    assert!(stderr.contains("was written, but not its manifest"), "{stderr}");
    assert!(!out.join("a.qcow2").exists() && !out.join("c.qcow2").exists(), "{stderr}");
    assert!(!out.join("b.qcow2.json").exists(), "{stderr}");
    let b_out = out.join("b.qcow2");
    assert!(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&b_out).status().unwrap().success());
    for name in &swapped {
        let left = std::fs::symlink_metadata(out.join(name)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&left), user_uid(), "{name} is left as the user made it");
    }
}

#[test]
fn a_compressed_output_swapped_just_before_its_rename_fails_without_writing_elsewhere() {
    // -o with --compress (qemu-img writes), swapped after the image was written and checked, just
    // before it would be renamed into place.
    let Some(race) = Race::new() else { return };
    let d = race.input("debian-ext4", race.at("d.qcow2"));
    let d_out = race.out.join("d.qcow2");
    let (d_arg, d_out_arg, pw) = (arg(&d), arg(&d_out), arg(&race.pw));
    let args = ["customize", &d_arg, "-o", &d_out_arg, "--compress", "--password-file", &pw];
    let run = stopped_at(&args, &race.tmp, "converted");
    let name = std::fs::read_dir(&race.out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&partial("d.qcow2")))
        .expect("the partial file, written");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            become_user(user_uid(), user_gid());
            Swap::Symlink.apply(&race.out, &name, &race.canary, "stolen-d");
        });
    });
    race.failed_cleanly(&resume(run), "-o");
    assert!(!d_out.exists());
}

#[test]
fn an_in_place_image_in_the_users_directory_swapped_as_it_is_created_stays_as_it_was() {
    // --in-place on the user's image in the user's directory, swapped as it is created: the new image
    // would get the user as owner.
    let Some(race) = Race::new() else { return };
    let vm = race.input("debian-ext4", race.out.join("vm.qcow2"));
    chown_to_user(&vm);
    std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (vm_before, vm_sum) = ((state(&vm).1, state(&vm).2), common::sha256(&vm));
    let (vm_arg, pw) = (arg(&vm), arg(&race.pw));
    let args = ["customize", &vm_arg, "--in-place", "--password-file", &pw];
    let attacker = Attacker::start(&race.out, &race.canary, vec![(partial("vm.qcow2"), Swap::Symlink)], Some(race.cpu));
    let run = started(&args, &race.tmp, None);
    pin_process(run.id(), race.cpu);
    let result = run.wait_with_output().unwrap();
    assert_eq!(attacker.stop().len(), 1);
    race.failed_cleanly(&result, "--in-place");
    assert_eq!(common::sha256(&vm), vm_sum, "the input is as it was");
    assert_eq!((state(&vm).1, state(&vm).2), vm_before);
}
