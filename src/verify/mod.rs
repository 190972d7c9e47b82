//! `cloudimg verify`: boot a throw-away overlay of the image and prove the login. Read what the boot
//! needs through the appliance → write the overlay and the NoCloud seed into a private directory →
//! boot under qemu → wait for cloud-init → log in over SSH → judge → on failure, read the logs back.

pub mod boot;
pub mod image;
pub mod seed;
pub mod ssh;
pub mod verdict;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::appliance::accel::{self, Accel, HostKvm};
use crate::cli::settings::Verify;
use crate::guest::session;
use crate::guest::Drive;
use crate::image::header::{self, Format};
use crate::image::output;
use crate::login::password::Secret;
use crate::support::cleanup::{self, WorkDir};
use crate::support::exit_codes::{with_code, BAD_GUEST, NO_BOOT, USAGE};
use crate::support::report::Reporter;
use boot::{Plan, Vm};
use ssh::{Attempt, Auth};
use verdict::{BootPath, Login, Verdict};

/// --timeout's defaults: a boot under TCG takes minutes, with KVM well under one.
const TCG_TIMEOUT: Duration = Duration::from_secs(600);
const KVM_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a guest may take to shut down when its disk is kept or its logs are read.
const POWER_OFF: Duration = Duration::from_secs(60);
/// Console lines shown with a failure.
const CONSOLE_LINES: usize = 40;

/// Boots `s.image` and judges its login. A refused login is a verdict (`Ok`); errors are for what
/// stopped the verification itself.
pub fn run(s: &Verify, report: &Reporter) -> Result<Verdict> {
    let secret = match &s.credential.password {
        Some(source) => Some(source.read()?),
        None => None,
    };
    run_with(s, secret.as_ref(), report)
}

/// [`run`] with the password already read (`customize --verify` has it).
pub fn run_with(s: &Verify, secret: Option<&Secret>, report: &Reporter) -> Result<Verdict> {
    let started = Instant::now();
    let info = header::inspect(&s.image)?;
    let (accel, _) = accel::choose(s.accel, &HostKvm::probe()).map_err(with_code(USAGE))?;
    let limit = s.timeout.unwrap_or(if accel == Accel::Kvm { KVM_TIMEOUT } else { TCG_TIMEOUT });
    let work = cleanup::work_dir()?;
    let before = read_image(s, &work, info.format, limit, report)?;
    let user = match s.user.clone().or_else(|| before.default_user.clone()) {
        Some(user) => user,
        None => {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "{} has no cloud-init default user; say whom to log in as with --user",
                s.name
            )))
        }
    };
    let overlay = work.path().join("overlay.qcow2");
    output::create_overlay(&s.image, info.format, &overlay)?;
    cleanup::checkpoint();
    // The password first; the key, when both are given, after it.
    let auths: Vec<Auth> =
        secret.into_iter().map(Auth::Password).chain(s.credential.key.as_deref().map(Auth::Key)).collect();
    let mut v = Verdict {
        image: s.name.clone(),
        user,
        auth: if secret.is_some() { "password" } else { "key" },
        boot_path: before.path,
        accel,
        login: Login::NotReached(String::new()),
        logged_in_as: None,
        cloud_init: None,
        cloud_init_logged: Vec::new(),
        wrong_password_refused: None,
        key_accepted: None,
        boot_seconds: None,
        total_seconds: 0.0,
        failure: None,
        console_tail: Vec::new(),
        cloud_init_log_tail: Vec::new(),
        sshd_log_tail: Vec::new(),
    };
    let instance = match (s.same_instance, &before.instance_id) {
        (false, _) => seed::instance_id(),
        (true, Some(id)) => id.clone(),
        (true, None) => {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "--same-instance: {} holds no plain instance-id in /var/lib/cloud/data/instance-id (never booted?)",
                s.name
            )))
        }
    };
    let mut vm = boot_and_log_in(&mut v, &before, &work, (&overlay, &instance), &auths, started + limit, report)?;
    v.failure = v.judge();
    if v.failure.is_some() {
        v.console_tail = verdict::tail(&vm.console(boot::CONSOLE_WINDOW), CONSOLE_LINES);
    }
    // A clean shutdown writes the logs' last lines to the disk, which is then read or kept.
    if s.keep_disk.is_some() || v.failure.is_some() {
        report.phase("Shutting the instance down (ACPI power button)");
        if !vm.power_off(POWER_OFF) {
            report.warn(&format!("the instance did not power off within {} s: stopped", POWER_OFF.as_secs()));
        }
    }
    drop(vm);
    if let Some(dest) = &s.keep_disk {
        keep_disk(&overlay, &s.image, dest)?;
    }
    if v.failure.is_some() {
        read_logs(&mut v, &overlay, &work, s, limit, report);
    }
    v.total_seconds = started.elapsed().as_secs_f64();
    Ok(v)
}

/// What `customize --verify` knows about the login to prove.
pub struct Expected<'a> {
    pub user: Option<String>,
    pub secret: &'a Secret,
    /// The password went into /etc/shadow of a disk booted before: boot as that instance again.
    pub same_instance: bool,
    pub accel: accel::Requested,
}

/// Why the booted output failed its verification, and the exit status that says so.
pub struct Failed {
    pub why: String,
    pub code: i32,
}

/// `customize --verify`: verifies the written output `file` (still under its temporary name) before
/// it is renamed to `dest`. qemu and the appliance open it as `/proc/PID/fd/N`, which the kernel
/// resolves to this very file whatever has become of its name. Returns a note for the summary, or
/// why the login was not proven (the verdict, console and logs are printed); errors are for what
/// stopped the verification itself.
pub fn output(
    file: &std::fs::File,
    dest: &Path,
    expected: Expected,
    report: &Reporter,
) -> Result<std::result::Result<String, Failed>> {
    use std::os::fd::AsRawFd;
    let s = Verify {
        image: format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()).into(),
        name: dest.display().to_string(),
        user: expected.user,
        credential: crate::cli::settings::Credential { password: None, key: None },
        timeout: None,
        accel: expected.accel,
        same_instance: expected.same_instance,
        keep_disk: None,
        json: false,
        verbosity: crate::support::report::Verbosity::Normal,
    };
    let v = run_with(&s, Some(expected.secret), report)?;
    match &v.failure {
        None => Ok(Ok(format!(
            "Verified by booting it ({:.0} s, {}): {} logs in with the password.",
            v.total_seconds,
            v.boot_path.describe(),
            v.user
        ))),
        Some(why) => {
            eprint!("{}", crate::support::report::for_terminal(&verdict::render(&v)));
            Ok(Err(Failed { why: why.clone(), code: v.exit_code() }))
        }
    }
}

/// The boot path, default user and (for direct boot) kernel, read through the appliance.
fn read_image(s: &Verify, work: &WorkDir, format: Format, limit: Duration, report: &Reporter) -> Result<image::Before> {
    report.phase("Reading the boot path from the image");
    let drives = [Drive { path: &s.image, format, readonly: true }];
    let opts = session::Options { accel: s.accel, timeout: limit, debug: false, tmpdir: work.path() };
    let shared = session::launch(&drives, &[&s.image], &opts, report)?;
    cleanup::checkpoint();
    let decompress = shared.accel == Accel::Tcg;
    let before = image::read_before(&shared.guest, work.path(), decompress)
        .with_context(|| format!("reading how to boot {}", s.name))
        .map_err(with_code(BAD_GUEST));
    cleanup::checkpoint();
    let _ = shared.guest.shutdown();
    let before = before?;
    if before.path == BootPath::DirectKernel {
        report.warn(&format!(
            "{} has no bootloader: booting its kernel and initrd directly, with root={} from its fstab",
            s.name,
            before.direct.as_ref().map_or("?", |d| d.root.as_str())
        ));
    }
    Ok(before)
}

/// Boots the overlay and fills in the login, cloud-init and timing parts of `v`; returns the
/// instance, still running, for its console.
fn boot_and_log_in(
    v: &mut Verdict,
    before: &image::Before,
    work: &WorkDir,
    (overlay, instance): (&Path, &str),
    auths: &[Auth],
    deadline: Instant,
    report: &Reporter,
) -> Result<Vm> {
    let seed_path = work.path().join("seed.img");
    seed::write(&seed_path, &seed::files(instance, "cloudimg-verify"))?;
    let vars = work.path().join("ovmf-vars.fd");
    let firmware = match before.path {
        BootPath::Uefi => {
            let (code, template) = boot::ovmf().ok_or_else(|| {
                with_code(NO_BOOT)(anyhow::anyhow!(
                    "the image boots only with UEFI and no OVMF firmware is installed (Debian: apt-get install ovmf)"
                ))
            })?;
            std::fs::copy(&template, &vars).context("copying OVMF's variable store")?;
            Some(code)
        }
        _ => None,
    };
    let serial = work.path().join("serial.log");
    let qmp = work.path().join("qmp.sock");
    let plan = Plan {
        accel: v.accel,
        overlay,
        seed: &seed_path,
        port: boot::free_port()?,
        serial: &serial,
        qmp: &qmp,
        direct: before.direct.as_ref(),
        uefi: firmware.as_deref().map(|code| (code, vars.as_path())),
    };
    report.phase(&format!("Booting {} ({})", v.image, if v.accel == Accel::Kvm { "KVM" } else { "TCG" }));
    let mut vm = Vm::start(&plan, &work.path().join("qemu.stderr"))?;
    cleanup::fault_point("booting");
    match vm.wait_for_cloud_init(deadline) {
        Ok(took) => v.boot_seconds = Some(took.as_secs_f64()),
        Err(why) => {
            v.login = Login::NotReached(why);
            return Ok(vm);
        }
    }
    report.phase(&format!("Logging in as {} with the {}", v.user, v.auth));
    log_in(v, &vm, &auths[0], deadline);
    if let (Login::Accepted, Some(key)) = (&v.login, auths.get(1)) {
        v.key_accepted = match ssh::attempt(vm.addr, &v.user, key, "id -un", STEP) {
            Attempt::Ran(out) => Some(out.lines().next() == Some(v.user.as_str())),
            Attempt::Refused(_) => Some(false),
            Attempt::Unreachable(_) => None,
        };
    }
    Ok(vm)
}

/// Logs in, runs the check and, after a password login, tries a wrong password.
fn log_in(v: &mut Verdict, vm: &Vm, auth: &Auth, deadline: Instant) {
    let mut refusals = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(30));
        match ssh::attempt(vm.addr, &v.user, auth, verdict::REMOTE_COMMAND, left) {
            Attempt::Ran(out) => {
                let (user, cloud_init, logged) = verdict::parse_answer(&out);
                (v.login, v.logged_in_as, v.cloud_init, v.cloud_init_logged) =
                    (Login::Accepted, user, Some(cloud_init), logged);
                break;
            }
            // cloud-init may restart sshd as it finishes: one more try before the verdict.
            Attempt::Refused(why) if refusals > 0 => {
                v.login = Login::Refused(why);
                return;
            }
            Attempt::Refused(_) => refusals += 1,
            Attempt::Unreachable(why) if Instant::now() + Duration::from_secs(5) >= deadline => {
                v.login = Login::NotReached(format!("sshd did not answer within --timeout: {why}"));
                return;
            }
            Attempt::Unreachable(_) => {}
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    if let Auth::Password(_) = auth {
        let wrong = wrong_password();
        v.wrong_password_refused = match ssh::attempt(vm.addr, &v.user, &Auth::Password(&wrong), "id -un", STEP) {
            Attempt::Ran(_) => Some(false),
            Attempt::Refused(_) => Some(true),
            Attempt::Unreachable(_) => None,
        };
    }
}

const STEP: Duration = Duration::from_secs(30);

fn wrong_password() -> Secret {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    Secret::new(format!("not-the-password-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
        .expect("not empty")
}

/// Writes the instance's disk (the overlay over the image) as a standalone qcow2 at `dest`.
fn keep_disk(overlay: &Path, image: &Path, dest: &Path) -> Result<()> {
    let pending = output::Pending::beside(dest).map_err(with_code(crate::support::exit_codes::OUTPUT))?;
    output::write_image(overlay, image, Format::Qcow2, false, &pending, false, &mut |_| {})
        .map_err(with_code(crate::support::exit_codes::OUTPUT))?;
    cleanup::checkpoint();
    pending.commit(output::default_file_mode(), None, false).map_err(with_code(crate::support::exit_codes::OUTPUT))?;
    cleanup::written(dest);
    Ok(())
}

/// Reads the ends of cloud-init's and sshd's logs from the stopped instance's overlay; a failure to
/// read them is told in their place, not instead of the verdict.
fn read_logs(v: &mut Verdict, overlay: &Path, work: &WorkDir, s: &Verify, limit: Duration, report: &Reporter) {
    report.phase("Reading cloud-init's and sshd's logs from the instance's disk");
    let drives = [Drive { path: overlay, format: Format::Qcow2, readonly: true }];
    let opts = session::Options { accel: s.accel, timeout: limit, debug: false, tmpdir: work.path() };
    let read = session::launch(&drives, &[overlay], &opts, report).and_then(|shared| {
        let logs = image::read_logs(&shared.guest);
        let _ = shared.guest.shutdown();
        logs
    });
    cleanup::checkpoint();
    match read {
        Ok((cloud_init, sshd)) => (v.cloud_init_log_tail, v.sshd_log_tail) = (cloud_init, sshd),
        Err(e) => v.cloud_init_log_tail = vec![format!("(the logs could not be read from the overlay: {e:#})")],
    }
}
