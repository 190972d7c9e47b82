//! `cloudimg doctor`: can this host run cloudimg, and if not, the exact command that fixes it.
//!
//! Each check gathers its facts (files, versions, one appliance build and launch) and hands them to a
//! pure function that decides what they mean; the unit tests drive those functions with made-up hosts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

use crate::appliance::accel::{self, Accel, HostKvm, KvmDevice, Requested};
use crate::appliance::trusted_dir::Distrust;
use crate::guest::{self, Drive, Guest, LaunchOptions, Setup};
use crate::image::header::Format;
use crate::support::cleanup::{self, Watchdog};

mod appliance;
mod verify_boot;

use appliance::{appliance_source_check, kernel_check, ApplianceKind, KernelFacts, SUPERMIN};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Worth knowing; cloudimg works.
    Info,
    /// cloudimg works, but slower or with a caveat.
    Warning,
    /// cloudimg cannot work here until this is fixed.
    Fail,
    /// Not run (`--quick`, or an earlier failure makes it pointless).
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// The command or setting that fixes it.
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, detail: impl Into<String>) -> Self {
        Check { name, status, detail: detail.into(), fix: None }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

pub struct Options {
    pub accel: Requested,
    pub timeout: Duration,
    /// Skip building and starting the appliance.
    pub quick: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// One line for humans.
    pub verdict: String,
    pub checks: Vec<Check>,
    /// No check failed.
    pub works: bool,
    /// The accelerator cloudimg will use here.
    pub accel: Option<Accel>,
    pub launch_seconds: Option<f64>,
}

/// Free space below which the temporary or cache directory is a failure, and below which a warning.
const TMP_FAIL_BYTES: u64 = 256 << 20;
const TMP_WARN_BYTES: u64 = 2 << 30;

/// Runs every check in order, handing each to `show` as soon as it is known (the launch takes a while).
pub fn run(opts: &Options, mut show: impl FnMut(&Check)) -> Report {
    let mut checks = Vec::new();
    let mut record = |check: Check, checks: &mut Vec<Check>| {
        show(&check);
        checks.push(check);
    };
    record(user_check(crate::support::identity::effective_uid(), container_hint()), &mut checks);
    let setup = guest::setup();
    record(libguestfs_check(&setup), &mut checks);
    let setup = setup.ok();
    record(qemu_check(setup.as_ref().map(|s| s.hv.as_str())), &mut checks);
    record(qemu_utils_check(["qemu-img", "qemu-nbd"].map(|p| command_version(p, &["--version"]))), &mut checks);
    let appliance = setup.as_ref().map(|s| ApplianceKind::probe(Path::new(&s.appliance_path)));
    record(appliance_source_check(appliance.as_ref()), &mut checks);
    if matches!(appliance, Some(ApplianceKind::Supermin { .. })) {
        record(kernel_check(&KernelFacts::probe()), &mut checks);
    }
    record(space_check("temporary directory", &std::env::temp_dir(), "TMPDIR"), &mut checks);
    if let Some(cache) = setup.as_ref().map(|s| PathBuf::from(&s.cachedir)).filter(|c| *c != std::env::temp_dir()) {
        record(space_check("appliance cache", &cache, "LIBGUESTFS_CACHEDIR"), &mut checks);
    }
    if let Some(setup) = &setup {
        record(cache_trust_check(Path::new(&setup.cachedir)), &mut checks);
    }
    let host = HostKvm::probe();
    let accel = accel::choose(opts.accel, &host).ok().map(|(a, _)| a);
    record(kvm_check(opts.accel, &host), &mut checks);
    record(verify_boot::check(&verify_boot::Facts::probe(command_version)), &mut checks);

    let blocked = checks.iter().any(|c| c.status == Status::Fail);
    let mut launch_seconds = None;
    match (&setup, &appliance, accel) {
        _ if opts.quick => {
            record(Check::new("appliance", Status::Skipped, "not built (--quick)"), &mut checks);
            record(Check::new("launch", Status::Skipped, "not started (--quick)"), &mut checks);
        }
        (Some(setup), Some(appliance), Some(accel)) if !blocked => {
            let built = match appliance {
                ApplianceKind::Supermin { .. } => {
                    let check = build_check(setup, opts.timeout);
                    let built = check.status != Status::Fail;
                    record(check, &mut checks);
                    built
                }
                _ => true,
            };
            // Without an appliance a launch can only fail again, and its failure would hide the cause.
            if built {
                let (check, seconds) = launch_check(accel, opts.timeout);
                launch_seconds = seconds;
                record(check, &mut checks);
            } else {
                record(Check::new("launch", Status::Skipped, "not started: the appliance was not built"), &mut checks);
            }
        }
        _ => record(Check::new("launch", Status::Skipped, "not started: fix the failures above first"), &mut checks),
    }
    let failures = checks.iter().filter(|c| c.status == Status::Fail).count();
    let verdict = verdict(failures, accel, launch_seconds, opts.quick);
    Report { verdict, checks, works: failures == 0, accel, launch_seconds }
}

fn verdict(failures: usize, accel: Option<Accel>, launch_seconds: Option<f64>, quick: bool) -> String {
    match (failures == 0, launch_seconds) {
        (false, _) => format!("cloudimg cannot work on this host: {failures} check(s) failed; apply the fixes above"),
        (true, Some(seconds)) => format!(
            "cloudimg works on this host: the appliance starts in {seconds:.1} s with {}",
            if accel == Some(Accel::Kvm) { "KVM" } else { "TCG (software emulation)" }
        ),
        (true, None) if quick => {
            "no problem found by the quick checks; run `cloudimg doctor` without --quick to start the appliance".into()
        }
        (true, None) => "cloudimg should work on this host".into(),
    }
}

/// Why we think this is a container, if we do.
fn container_hint() -> Option<String> {
    if let Ok(kind) = std::env::var("container") {
        return Some(format!("$container is `{kind}`"));
    }
    ["/.dockerenv", "/run/.containerenv"].iter().find(|p| Path::new(p).exists()).map(|p| format!("{p} exists"))
}

fn user_check(euid: u32, container: Option<String>) -> Check {
    let who = if euid == 0 { "running as root".to_string() } else { format!("running as uid {euid} (not root)") };
    match container {
        Some(why) => Check::new("user", Status::Info, format!("{who}, inside a container ({why})")).fix(
            "containers need /dev/kvm passed in for speed (`--device /dev/kvm`), else TCG is used; nothing else is needed",
        ),
        None if euid != 0 => Check::new(
            "user",
            Status::Info,
            format!("{who}: supported; the appliance is built once per user in the cache directory"),
        ),
        None => Check::new("user", Status::Ok, who),
    }
}

fn libguestfs_check(setup: &Result<Setup>) -> Check {
    match setup {
        Ok(s) if s.backend != guest::DIRECT_BACKEND => Check::new(
            "libguestfs",
            Status::Info,
            format!(
                "{} set to the `{}` backend; cloudimg launches with `{}` regardless, so that qemu is its own \
                 child and --timeout and Ctrl-C can stop it (appliance from {})",
                s.version,
                s.backend,
                guest::DIRECT_BACKEND,
                s.appliance_path
            ),
        ),
        Ok(s) => Check::new(
            "libguestfs",
            Status::Ok,
            format!("{} (backend {}, appliance from {})", s.version, s.backend, s.appliance_path),
        ),
        Err(e) => Check::new("libguestfs", Status::Fail, format!("cannot create a libguestfs handle: {e:#}"))
            .fix("sudo apt install libguestfs0"),
    }
}

fn qemu_check(hv: Option<&str>) -> Check {
    let Some(hv) = hv else {
        return Check::new("qemu", Status::Skipped, "unknown without libguestfs");
    };
    let fix = if std::env::var_os("LIBGUESTFS_HV").is_some() {
        format!("unset LIBGUESTFS_HV (it names {hv}), or sudo apt install qemu-system-x86")
    } else {
        "sudo apt install qemu-system-x86".to_string()
    };
    match command_version(hv, &["--version"]) {
        Ok(version) => Check::new("qemu", Status::Ok, format!("{hv}: {version}")),
        Err(e) => Check::new("qemu", Status::Fail, format!("the appliance's qemu {hv} does not run: {e:#}")).fix(fix),
    }
}

/// qemu-img (overlay, map, compressed output) and qemu-nbd (reading the edited image) from qemu-utils.
fn qemu_utils_check(versions: [Result<String>; 2]) -> Check {
    match versions {
        [Ok(img), Ok(nbd)] => Check::new("qemu-utils", Status::Ok, format!("{img}; {nbd}")),
        [img, nbd] => {
            let errors: Vec<String> =
                [img, nbd].into_iter().filter_map(|v| v.err()).map(|e| format!("{e:#}")).collect();
            let detail = format!("qemu-img and qemu-nbd (which write the output) must run: {}", errors.join("; "));
            Check::new("qemu-utils", Status::Fail, detail).fix("sudo apt install qemu-utils")
        }
    }
}

/// The first line a program prints for its version, within 30 s.
fn command_version(program: &str, args: &[&str]) -> Result<String> {
    let dog = Watchdog::arm(Duration::from_secs(30));
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    anyhow::ensure!(!dog.fired(), "{program} {} did not answer within 30 s", args.join(" "));
    anyhow::ensure!(out.status.success(), "{program} {} failed: {}", args.join(" "), stderr_tail(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string())
}

fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Free bytes for this user on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed statvfs the call fills in.
    (unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn space_check(name: &'static str, dir: &Path, variable: &str) -> Check {
    let writable = dir.is_dir() && tempfile::tempfile_in(dir).is_ok();
    space_verdict(name, dir, variable, writable, free_bytes(dir))
}

fn space_verdict(name: &'static str, dir: &Path, variable: &str, writable: bool, free: Option<u64>) -> Check {
    let shown = dir.display();
    let fix = format!("export {variable}=/a/writable/directory/with/space");
    match free {
        _ if !writable => Check::new(name, Status::Fail, format!("{shown} is not a writable directory")).fix(fix),
        Some(free) if free < TMP_FAIL_BYTES => {
            Check::new(name, Status::Fail, format!("{shown} has only {} MiB free", free >> 20)).fix(fix)
        }
        Some(free) if free < TMP_WARN_BYTES => Check::new(
            name,
            Status::Warning,
            format!("{shown} has {} MiB free; the appliance and its overlays may need more", free >> 20),
        )
        .fix(fix),
        Some(free) => Check::new(name, Status::Ok, format!("{shown}, {} GiB free", free >> 30)),
        None => Check::new(name, Status::Warning, format!("{shown}: free space unknown")),
    }
}

fn kvm_check(requested: Requested, host: &HostKvm) -> Check {
    let fix = match (host.device, host.cpu_virtualization) {
        (KvmDevice::Missing, false) => {
            "none needed; for speed, use a host (or VM type) with hardware virtualization (vmx/svm)".to_string()
        }
        (KvmDevice::Missing, true) => {
            "sudo modprobe kvm_intel (or kvm_amd); in a container, pass --device /dev/kvm".to_string()
        }
        (KvmDevice::NotAccessible, _) => "sudo usermod -aG kvm \"$USER\", then log in again".to_string(),
        (KvmDevice::Usable, _) => "KVM needs a host (or VM type) with hardware virtualization; meanwhile other \
                                   libguestfs tools (guestfish, virt-customize) hang here unless \
                                   LIBGUESTFS_BACKEND_SETTINGS=force_tcg"
            .to_string(),
    };
    match (accel::choose(requested, host), host.problem()) {
        (Err(e), _) => Check::new("kvm", Status::Fail, format!("{e:#}")).fix(format!("--accel auto picks TCG; {fix}")),
        (Ok((Accel::Kvm, _)), _) => Check::new("kvm", Status::Ok, "/dev/kvm is usable: the appliance runs with KVM"),
        (Ok((Accel::Tcg, _)), None) => {
            Check::new("kvm", Status::Info, "KVM is usable, but --accel tcg was given: software emulation")
        }
        (Ok((Accel::Tcg, _)), Some(why)) => Check::new(
            "kvm",
            Status::Warning,
            format!("{why}; cloudimg uses TCG (software emulation, a launch takes 10-25 s instead of 2-5 s)"),
        )
        .fix(fix),
    }
}

/// Whether libguestfs's cache and cloudimg's fast-boot copy beside it are this user's alone: anyone who
/// could write there could choose the appliance cloudimg boots.
fn cache_trust_check(cachedir: &Path) -> Check {
    let checked = crate::appliance::fast_boot::check_cache(cachedir).and_then(|cache| cache.fast_boot_dir().map(drop));
    cache_trust_verdict(cachedir, checked)
}

fn cache_trust_verdict(cachedir: &Path, checked: Result<(), Distrust>) -> Check {
    const NAME: &str = "cache ownership";
    match checked {
        Ok(()) => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{} and the fast-boot copy are this user's alone",
                crate::appliance::fast_boot::libguestfs_cache(cachedir).display()
            ),
        ),
        Err(why) => Check::new(
            NAME,
            Status::Fail,
            format!("{why}; cloudimg does not boot an appliance from a cache someone else could have prepared"),
        )
        .fix(why.fix),
    }
}

/// Builds (or finds up to date) the supermin appliance with the same command libguestfs runs, so that
/// a failure shows supermin's own message, and the launch after it measures only the launch.
fn build_check(setup: &Setup, timeout: Duration) -> Check {
    let cache = match crate::appliance::fast_boot::create_cache(Path::new(&setup.cachedir)) {
        Ok(cache) => cache,
        Err(why) => {
            return Check::new("appliance", Status::Fail, format!("not built: {why}")).fix(why.fix);
        }
    };
    let appliance_d = cache.join("appliance.d");
    let before = modified(&appliance_d.join("root"));
    let start = Instant::now();
    let built = run_supermin(&setup.appliance_path, &cache, timeout);
    let seconds = start.elapsed().as_secs_f64();
    match built {
        Ok(()) if before.is_some() && before == modified(&appliance_d.join("root")) => Check::new(
            "appliance",
            Status::Ok,
            format!("up to date in {} (checked in {seconds:.1} s)", appliance_d.display()),
        ),
        Ok(()) => {
            Check::new("appliance", Status::Ok, format!("built in {seconds:.1} s into {}", appliance_d.display()))
        }
        Err(e) => Check::new("appliance", Status::Fail, format!("supermin could not build the appliance: {e:#}"))
            .fix("sudo update-guestfs-appliance   (then `libguestfs-test-tool` shows the details)"),
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

fn run_supermin(appliance_path: &str, cache: &Path, timeout: Duration) -> Result<()> {
    let lock = cache.join("lock");
    // supermin keeps temporary files in $TMPDIR and leaves them there when it is stopped (--timeout,
    // Ctrl-C): it gets cloudimg's own temporary directory, removed afterwards whatever happened.
    let work = cleanup::work_dir()?;
    let mut cmd = Command::new(SUPERMIN);
    cmd.env("TMPDIR", work.path());
    cmd.args(["--build", "--if-newer", "--lock"])
        .arg(&lock)
        .args(["--copy-kernel", "-f", "ext2", "--host-cpu", std::env::consts::ARCH])
        .arg(Path::new(appliance_path).join("supermin.d"))
        .arg("-o")
        .arg(cache.join("appliance.d"));
    let dog = Watchdog::arm(timeout);
    let out = cmd.output().context("running supermin")?;
    cleanup::checkpoint();
    anyhow::ensure!(!dog.fired(), "supermin did not finish within {} s", timeout.as_secs());
    anyhow::ensure!(out.status.success(), "{}", stderr_tail(&out.stderr));
    Ok(())
}

/// Starts the appliance for real (on /dev/null, read-only), as every cloudimg run does.
fn launch_check(accel: Accel, timeout: Duration) -> (Check, Option<f64>) {
    let start = Instant::now();
    let launched = cleanup::work_dir().and_then(|work| {
        let drive = Drive { path: Path::new("/dev/null"), format: Format::Raw, readonly: true };
        let opts = LaunchOptions { accel, timeout, debug: false, tmpdir: work.path() };
        let result = Guest::launch(&[drive], &opts).and_then(|guest| {
            let appliance = guest.appliance.clone();
            guest.shutdown().map(|()| appliance)
        });
        cleanup::unregister(work.path());
        result
    });
    let seconds = start.elapsed().as_secs_f64();
    match launched {
        Ok(appliance) => (
            Check::new(
                "launch",
                Status::Ok,
                format!("the appliance started and stopped in {seconds:.1} s; it was {appliance}"),
            ),
            Some(seconds),
        ),
        Err(e) => (
            Check::new("launch", Status::Fail, format!("the appliance did not start: {e:#}"))
                .fix("libguestfs-test-tool   (prints every step of a launch)"),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_findings_name_the_cause_and_its_fix() {
        let paravirtual = HostKvm { device: KvmDevice::Usable, cpu_virtualization: false };
        let check = kvm_check(Requested::Auto, &paravirtual);
        assert_eq!(check.status, Status::Warning);
        assert!(check.detail.contains("vmx") && check.fix.as_deref().unwrap().contains("force_tcg"), "{check:?}");
        assert_eq!(kvm_check(Requested::Kvm, &paravirtual).status, Status::Fail);

        let no_group = HostKvm { device: KvmDevice::NotAccessible, cpu_virtualization: true };
        assert!(kvm_check(Requested::Auto, &no_group).fix.unwrap().contains("usermod -aG kvm"));

        let good = HostKvm { device: KvmDevice::Usable, cpu_virtualization: true };
        assert_eq!(kvm_check(Requested::Auto, &good).status, Status::Ok);
        assert_eq!(kvm_check(Requested::Tcg, &good).status, Status::Info);
    }

    #[test]
    fn temporary_space_thresholds() {
        let dir = Path::new("/t");
        let status = |writable, free| space_verdict("tmp", dir, "TMPDIR", writable, free).status;
        assert_eq!(status(false, Some(100 << 30)), Status::Fail);
        assert_eq!(status(true, Some(100 << 20)), Status::Fail);
        assert_eq!(status(true, Some(1 << 30)), Status::Warning);
        assert_eq!(status(true, Some(10 << 30)), Status::Ok);
        assert!(space_verdict("tmp", dir, "TMPDIR", false, None).fix.unwrap().starts_with("export TMPDIR="));
    }

    #[test]
    fn the_verdict_counts_failures() {
        assert!(verdict(1, None, None, false).contains("1 check(s) failed"));
        assert!(verdict(0, Some(Accel::Tcg), Some(12.34), false).contains("12.3 s with TCG"));
        assert!(verdict(0, Some(Accel::Kvm), None, true).contains("without --quick"));
    }
}
