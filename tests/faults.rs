//! Faults: the tool killed (SIGKILL) or interrupted (SIGINT, SIGTERM) at each step, its qemu killed
//! under it, a full disk, two runs racing for one output. After every fault: the input is unchanged
//! (in place: the old or the new image, whole), nothing incomplete exists under the output name, no
//! child process survives, and what a SIGKILL leaves is clearly named and removed by the next run.
//!
//! The tool stops itself at a named step when `CLOUDIMG_STOP_AT` names it (see `cleanup::fault_point`),
//! so each fault hits exactly that step. `CLOUDIMG_FAULTS=full` adds kills at random moments.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{fixtures, p, sha256, text};

/// The steps a run can be stopped at, in order.
const NEW_OUTPUT_STEPS: &[&str] =
    &["creating-overlay", "copying", "launched", "edited", "shut-down", "converting", "converted", "renamed"];
const IN_PLACE_STEPS: &[&str] = &["edited", "converting", "converted", "renamed"];

struct Bench {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    tmpdir: PathBuf,
    pw: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let tmpdir = dir.join("tmp");
        std::fs::create_dir(&tmpdir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "fault pw\n").unwrap();
        Bench { _tmp: tmp, dir, tmpdir, pw }
    }

    fn image(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::copy(fixtures().image("debian-ext4"), &path).unwrap();
        path
    }

    /// A fresh copy of the fixture as the input, its checksum, and an output path beside it.
    fn input_and_output(&self) -> (PathBuf, String, PathBuf) {
        let input = self.image("input.qcow2");
        let sum = sha256(&input);
        (input, sum, self.dir.join("output.qcow2"))
    }

    fn command(&self, args: &[&str], stop_at: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudimg"));
        cmd.args(args)
            .env("TMPDIR", &self.tmpdir)
            // The appliance cache stays where it always is, so that TMPDIR holds only cloudimg's files.
            .env("LIBGUESTFS_CACHEDIR", "/var/tmp")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(step) = stop_at {
            cmd.env("CLOUDIMG_STOP_AT", step);
        }
        cmd
    }

    fn customize(&self, input: &Path, output: Option<&Path>) -> Vec<String> {
        let mut args = vec!["customize".to_string(), input.display().to_string(), "--password-file".into()];
        args.push(self.pw.display().to_string());
        match output {
            Some(out) => args.extend(["-o".to_string(), out.display().to_string()]),
            None => args.push("--in-place".into()),
        }
        args
    }

    /// Names in the bench directory and TMPDIR other than the given ones.
    fn extra_files(&self, known: &[&Path]) -> Vec<String> {
        let mut names = Vec::new();
        for dir in [&self.dir, &self.tmpdir] {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path != self.tmpdir && path != self.pw && !known.contains(&path.as_path()) {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names
    }
}

fn args_ref(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Waits until the process has stopped itself at its fault point.
fn wait_until_stopped(child: &mut Child, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = child.stderr.take().map(|mut e| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                s
            });
            panic!("the run ended ({status}) before reaching {step}: {stderr:?}");
        }
        if stopped(child.id()) {
            return;
        }
        assert!(Instant::now() < deadline, "never reached {step}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// The pids whose parent is `pid` (qemu, libguestfs's recovery process, qemu-img).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie waiting for a non-reaping init is dead for our purposes.
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

/// Asserts that all of `pids` are gone within a few seconds (libguestfs's recovery process polls).
fn assert_no_survivors(pids: &[u32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "{what}: child processes survived: {pids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Runs until `step`, then does `fault` to the stopped process; returns its exit status and the
/// children it had.
fn fault_at(cmd: &mut Command, step: &str, fault: impl FnOnce(u32)) -> (ExitStatus, Vec<u32>, String) {
    let mut child = cmd.spawn().unwrap();
    wait_until_stopped(&mut child, step);
    let children = children_of(child.id());
    fault(child.id());
    let out = child.wait_with_output().unwrap();
    (out.status, children, text(&out.stderr))
}

fn qemu_img_check(image: &Path) -> bool {
    Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(image).status().unwrap().success()
}

#[test]
fn killed_at_every_step_the_input_survives_and_the_next_run_cleans_up() {
    let bench = Bench::new();
    let (input, input_sum, output) = bench.input_and_output();
    let vm = bench.image("vm.qcow2");
    let vm_before = sha256(&vm);
    let mut vm_replaced = false;
    let known = [input.as_path(), output.as_path(), vm.as_path()];
    let mut runs = 0;

    for (step, in_place) in
        NEW_OUTPUT_STEPS.iter().map(|s| (*s, false)).chain(IN_PLACE_STEPS.iter().map(|s| (*s, true)))
    {
        let what = format!("SIGKILL at {step}{}", if in_place { " (in place)" } else { "" });
        let args = bench.customize(if in_place { &vm } else { &input }, (!in_place).then_some(output.as_path()));
        let (status, children, _) =
            fault_at(&mut bench.command(&args_ref(&args), Some(step)), step, |pid| signal(pid, libc::SIGKILL));
        runs += 1;
        assert_eq!(status.code(), None, "{what}: killed");
        assert_no_survivors(&children, &what);
        assert_eq!(sha256(&input), input_sum, "{what}: the input changed");
        if in_place {
            vm_replaced |= step == "renamed";
            assert!(qemu_img_check(&vm), "{what}: the in-place image is damaged");
            assert_eq!(sha256(&vm) == vm_before, !vm_replaced, "{what}: old image before the rename, new after");
        } else if step == "renamed" {
            assert!(qemu_img_check(&output), "{what}: the renamed output is complete");
            std::fs::remove_file(&output).unwrap();
        } else {
            assert!(!output.exists(), "{what}: something exists under the output name");
        }
        // What a SIGKILL leaves is named as cloudimg's; the next run (this loop's next step) removes it.
        for name in bench.extra_files(&known) {
            assert!(name.contains("cloudimg-"), "{what}: unclearly named leftover {name}");
        }
    }

    // A normal run afterwards removes every leftover and writes a good output.
    let args = bench.customize(&input, Some(&output));
    let out = bench.command(&args_ref(&args), None).output().unwrap();
    runs += 1;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("left behind by an interrupted cloudimg run"), "{}", text(&out.stderr));
    assert!(qemu_img_check(&output));
    assert_eq!(bench.extra_files(&known), Vec::<String>::new(), "leftovers after a normal run");
    eprintln!("{runs} runs, {} kill points", NEW_OUTPUT_STEPS.len() + IN_PLACE_STEPS.len());
}

#[test]
fn sigint_and_sigterm_clean_up_at_once() {
    let bench = Bench::new();
    let (input, input_sum, output) = bench.input_and_output();
    let known = [input.as_path(), output.as_path()];
    for (step, sig) in [("edited", libc::SIGTERM), ("converting", libc::SIGINT), ("converted", libc::SIGTERM)] {
        let what = format!("signal {sig} at {step}");
        let args = bench.customize(&input, Some(&output));
        let (status, children, stderr) = fault_at(&mut bench.command(&args_ref(&args), Some(step)), step, |pid| {
            signal(pid, sig);
            signal(pid, libc::SIGCONT);
        });
        assert_eq!(status.code(), Some(130), "{what}: {stderr}");
        assert!(stderr.contains("interrupted; temporary files removed"), "{what}: {stderr}");
        assert_no_survivors(&children, &what);
        assert_eq!(sha256(&input), input_sum, "{what}");
        assert!(!output.exists(), "{what}");
        assert_eq!(bench.extra_files(&known), Vec::<String>::new(), "{what}: nothing may be left");
    }

    // Ctrl-C in the middle of the appliance's launch (a blocking libguestfs call), for an in-place run.
    let vm = bench.image("vm.qcow2");
    let vm_sum = sha256(&vm);
    let args = bench.customize(&vm, None);
    let mut child = bench.command(&args_ref(&args), None).spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in std::io::BufRead::lines(stdout) {
        if line.unwrap().contains("Launching the appliance") {
            std::thread::sleep(Duration::from_secs(2));
            signal(child.id(), libc::SIGINT);
            break;
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert_eq!(sha256(&vm), vm_sum);
    assert_eq!(bench.extra_files(&[input.as_path(), vm.as_path()]), Vec::<String>::new());
}

#[test]
fn a_run_holding_the_password_can_dump_no_core() {
    let bench = Bench::new();
    let (input, _, output) = bench.input_and_output();
    let args = bench.customize(&input, Some(&output));
    let mut child = bench.command(&args_ref(&args), Some("creating-overlay")).spawn().unwrap();
    wait_until_stopped(&mut child, "creating-overlay");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    signal(child.id(), libc::SIGTERM);
    signal(child.id(), libc::SIGCONT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    // Soft and hard limit: no child (qemu, qemu-img) can raise it again either.
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"], "{limits}");
}

#[test]
fn a_killed_appliance_is_an_appliance_error_and_leaves_nothing() {
    let bench = Bench::new();
    let (input, input_sum, output) = bench.input_and_output();
    let args = bench.customize(&input, Some(&output));
    let (status, children, stderr) =
        fault_at(&mut bench.command(&args_ref(&args), Some("launched")), "launched", |pid| {
            let qemu: Vec<u32> = children_of(pid)
                .into_iter()
                .filter(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default().starts_with("qemu"))
                .collect();
            assert!(!qemu.is_empty(), "no qemu child found");
            qemu.iter().for_each(|q| signal(*q, libc::SIGKILL));
            signal(pid, libc::SIGCONT);
        });
    assert_eq!(status.code(), Some(6), "{stderr}");
    assert_no_survivors(&children, "qemu killed");
    assert_eq!(sha256(&input), input_sum);
    assert!(!output.exists());
    assert_eq!(bench.extra_files(&[input.as_path()]), Vec::<String>::new(), "{stderr}");
}

/// A batch of two images into an output directory, stopped at `step` and interrupted there (Ctrl-C).
struct Interrupted {
    inputs: [PathBuf; 2],
    out: PathBuf,
    status: ExitStatus,
    children: Vec<u32>,
    stderr: String,
}

fn batch_interrupted_at(bench: &Bench, step: &str) -> Interrupted {
    let inputs = [bench.image("a.qcow2"), bench.image("b.qcow2")];
    let out = bench.dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let args = ["customize", p(&inputs[0]), p(&inputs[1]), "--out-dir", p(&out), "--password-file", p(&bench.pw)];
    let (status, children, stderr) = fault_at(&mut bench.command(&args, Some(step)), step, |pid| {
        signal(pid, libc::SIGINT);
        signal(pid, libc::SIGCONT);
    });
    Interrupted { inputs, out, status, children, stderr }
}

#[test]
fn interrupted_between_two_outputs_of_a_batch_the_last_word_names_the_written_one() {
    let bench = Bench::new();
    // Stopped as the first output has been renamed into place, then interrupted.
    let Interrupted { out, status, children, stderr, .. } = batch_interrupted_at(&bench, "renamed");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_no_survivors(&children, "interrupted batch");
    let written = out.join("a.qcow2");
    assert!(
        stderr.contains(&format!("written completely before the stop: {}; no other output was written", p(&written))),
        "{stderr}"
    );
    assert!(qemu_img_check(&written), "the output it names is complete");
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["a.qcow2"], "the second output was not written");
}

#[test]
fn an_analysis_that_outlasts_the_timeout_stops_the_run_and_leaves_nothing() {
    // A stall in host-side work over the image's data (a configuration built to keep a parser busy),
    // simulated by stopping the run while it analyses the image for longer than --timeout: when it
    // continues, its deadline has passed. --timeout must also let the appliance start under TCG.
    const TIMEOUT: u64 = 60;
    let bench = Bench::new();
    let (input, input_sum, output) = bench.input_and_output();
    let mut args = bench.customize(&input, Some(&output));
    args.extend(["--timeout".to_string(), TIMEOUT.to_string()]);
    let mut cmd = bench.command(&args_ref(&args), Some("analysing"));
    let (status, children, stderr) = fault_at(&mut cmd, "analysing", |pid| {
        std::thread::sleep(Duration::from_secs(TIMEOUT + 2));
        signal(pid, libc::SIGCONT);
    });
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("did not finish within {TIMEOUT} s (--timeout), so the run was stopped"))
            && stderr.contains("no output was written"),
        "{stderr}"
    );
    assert_no_survivors(&children, "analysis deadline");
    assert_eq!(sha256(&input), input_sum);
    assert!(!output.exists());
    assert_eq!(bench.extra_files(&[input.as_path()]), Vec::<String>::new(), "{stderr}");
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir(&at).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&at).status();
        assert!(ok.unwrap().success(), "mounting a tmpfs (the test needs root)");
        SmallDisk(at)
    }
}

/// Whether this run may mount a small tmpfs (root only); says so when it skips.
fn can_mount_tmpfs() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: mounting a small tmpfs needs root");
    }
    root
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_output_disk_is_a_clear_error_that_leaves_nothing() {
    if !can_mount_tmpfs() {
        return;
    }
    let bench = Bench::new();
    let input = bench.image("input.qcow2");
    let input_sum = sha256(&input);
    let disk = SmallDisk::mount(bench.dir.join("small"), "512K");
    let output = disk.0.join("output.qcow2");
    let args = bench.customize(&input, Some(&output));
    let out = bench.command(&args_ref(&args), None).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("No space left on device") && stderr.contains("output.qcow2"), "{stderr}");
    assert_eq!(std::fs::read_dir(&disk.0).unwrap().count(), 0, "the full disk holds nothing afterwards");
    assert_eq!(sha256(&input), input_sum);
    assert_eq!(bench.extra_files(&[input.as_path(), disk.0.as_path()]), Vec::<String>::new());
}

#[test]
fn racing_runs_one_output_wins_whole_and_in_place_runs_exclude_each_other() {
    let bench = Bench::new();
    let input = bench.image("input.qcow2");
    let output = bench.dir.join("output.qcow2");
    let args = bench.customize(&input, Some(&output));
    let runs: Vec<Child> = (0..2).map(|_| bench.command(&args_ref(&args), None).spawn().unwrap()).collect();
    let mut codes: Vec<Option<i32>> = runs.into_iter().map(|c| c.wait_with_output().unwrap().status.code()).collect();
    codes.sort();
    assert_eq!(codes, vec![Some(0), Some(7)], "one wins, the other finds the output taken");
    assert!(qemu_img_check(&output));
    assert_eq!(bench.extra_files(&[input.as_path(), output.as_path()]), Vec::<String>::new());

    let vm = bench.image("vm.qcow2");
    let args = bench.customize(&vm, None);
    let mut first = bench.command(&args_ref(&args), Some("launched")).spawn().unwrap();
    wait_until_stopped(&mut first, "launched");
    let second = bench.command(&args_ref(&args), None).output().unwrap();
    assert_eq!(second.status.code(), Some(7), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("is being edited in place by another cloudimg run"));
    signal(first.id(), libc::SIGCONT);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(qemu_img_check(&vm));
}

/// `CLOUDIMG_FAULTS=full`: SIGKILL at random moments (not only at the named steps), alternating new
/// output and in place, with the same checks; about 20 s a run under TCG.
#[test]
fn killed_at_random_moments_the_input_survives() {
    if std::env::var("CLOUDIMG_FAULTS").as_deref() != Ok("full") {
        eprintln!("skipped: set CLOUDIMG_FAULTS=full for kills at random moments");
        return;
    }
    let runs: u64 = std::env::var("CLOUDIMG_FAULT_RUNS").ok().and_then(|n| n.parse().ok()).unwrap_or(20);
    let bench = Bench::new();
    let (input, input_sum, output) = bench.input_and_output();
    let vm = bench.image("vm.qcow2");
    let known = [input.as_path(), output.as_path(), vm.as_path()];
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for run in 0..runs {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis((seed >> 33) % 18_000);
        let in_place = run % 2 == 1;
        let args = bench.customize(if in_place { &vm } else { &input }, (!in_place).then_some(output.as_path()));
        let mut child = bench.command(&args_ref(&args), None).spawn().unwrap();
        std::thread::sleep(delay);
        let children = children_of(child.id());
        let _ = child.kill();
        let status = child.wait().unwrap();
        let what = format!("run {run}: SIGKILL after {delay:?} ({status})");
        assert_no_survivors(&children, &what);
        assert_eq!(sha256(&input), input_sum, "{what}");
        assert!(qemu_img_check(&vm), "{what}");
        if output.exists() {
            assert!(qemu_img_check(&output), "{what}: an output under its name is complete");
            std::fs::remove_file(&output).unwrap();
        }
        for name in bench.extra_files(&known) {
            assert!(name.contains("cloudimg-"), "{what}: unclearly named leftover {name}");
        }
        eprintln!("{what}: ok");
    }
}

/// Lets a run stopped at `step` go on to its next stop there, or to its end; `true` when it stopped.
fn continue_to(child: &mut Child, step: &str) -> bool {
    signal(child.id(), libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        if stopped(child.id()) {
            return true;
        }
        assert!(Instant::now() < deadline, "the run neither stopped at {step} nor ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Fills the filesystem holding `dir` (a tmpfs) with a file, until the disk is full.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0x5a; 1 << 16];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    filler
}

/// A batch whose second output meets a full disk while it is written (its input copied beside it, as
/// the appliance starts): the second image fails alone; the first and third outputs are written whole.
#[test]
fn a_full_disk_while_one_output_is_written_fails_that_image_alone() {
    if !can_mount_tmpfs() {
        return;
    }
    let bench = Bench::new();
    let inputs = [bench.image("a.qcow2"), bench.image("b.qcow2"), bench.image("c.qcow2")];
    let sums: Vec<String> = inputs.iter().map(|i| sha256(i)).collect();
    // Room for two outputs (each smaller than its input) and the third one's start.
    let room = 3 * std::fs::metadata(&inputs[0]).unwrap().len() + (64 << 20);
    let disk = SmallDisk::mount(bench.dir.join("out"), &room.to_string());
    let mut args = vec!["customize"];
    args.extend(inputs.iter().map(|i| p(i)));
    args.extend(["--out-dir", p(&disk.0), "--password-file", p(&bench.pw), "--json", "-v"]);
    // The writer stops as it starts each output (a, b, c in turn): the disk fills up as b's begins
    // and is freed as c's begins, so only b's write meets it.
    let mut child = bench.command(&args, Some("copying")).spawn().unwrap();
    wait_until_stopped(&mut child, "copying");
    let children = children_of(child.id());
    assert!(continue_to(&mut child, "copying"), "stopped for b");
    let filler = fill(&disk.0);
    assert!(continue_to(&mut child, "copying"), "stopped for c");
    std::fs::remove_file(&filler).unwrap();
    assert!(!continue_to(&mut child, "copying"), "no fourth output");
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert_no_survivors(&children, "full disk in a batch");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let oks: Vec<bool> = report.as_array().unwrap().iter().map(|e| e["ok"] == true).collect();
    assert_eq!(oks, [true, false, true], "{report}");
    let error = report[1]["error"].as_str().unwrap();
    assert!(error.contains("No space left on device") && error.contains("b.qcow2"), "{error}");
    for name in ["a.qcow2", "c.qcow2"] {
        assert!(qemu_img_check(&disk.0.join(name)), "{name} is whole");
    }
    let mut names: Vec<_> = std::fs::read_dir(&disk.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["a.qcow2", "c.qcow2"], "nothing of b, no temporaries");
    assert_eq!(inputs.iter().map(|i| sha256(i)).collect::<Vec<_>>(), sums, "inputs unchanged");
    let known: Vec<&Path> = inputs.iter().map(PathBuf::as_path).chain([disk.0.as_path()]).collect();
    assert_eq!(bench.extra_files(&known), Vec::<String>::new(), "{stderr}");
}

/// Ctrl-C as the first output of a batch is written while the appliance goes on with the second.
#[test]
fn ctrl_c_while_an_output_is_written_in_the_background_leaves_nothing() {
    let bench = Bench::new();
    let Interrupted { inputs: [a, b], out, status, children, stderr } = batch_interrupted_at(&bench, "converting");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted; temporary files removed, no output was written"), "{stderr}");
    assert_no_survivors(&children, "Ctrl-C during a background write");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "no output and no temporary in the output directory");
    assert_eq!(bench.extra_files(&[a.as_path(), b.as_path(), out.as_path()]), Vec::<String>::new(), "{stderr}");
}
