//! `cloudimg customize`: the pipeline, in order. Open the image safely → find the root → read
//! cloud-init's configuration → plan the edit (pure) → write it back → produce the output.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::accel::{self, Accel, HostKvm};
use crate::checks::{Effective, Finding, Severity};
use crate::cleanup;
use crate::cloud_config::credentials::{CloudInitVersion, Form, Stored};
use crate::exit_codes::{with_code, APPLIANCE, BAD_GUEST, BAD_INPUT, INEFFECTIVE, OUTPUT, USAGE};
use crate::guest::{Drive, Guest, LaunchOptions};
use crate::guest_config;
use crate::image_file::{self, Format, ImageInfo};
use crate::locate::{self, Root};
use crate::output::{self, Pending};
use crate::password::{self, Secret, Source};
use crate::plan::{self, Facts, Plan, Request};
use crate::report::Reporter;
use crate::settings::{Customize, Output, Verbosity};

/// What happened, for the human summary and for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub input: PathBuf,
    pub input_format: Format,
    /// `None` for a dry run.
    pub output: Option<PathBuf>,
    pub output_format: Option<Format>,
    pub dry_run: bool,
    pub accel: Accel,
    pub root: Root,
    pub cloud_init_version: String,
    pub user: String,
    pub form: Form,
    pub file: String,
    pub changed: bool,
    pub changed_keys: Vec<String>,
    pub effective: Effective,
    pub findings: Vec<Finding>,
    pub instance_state_cleaned: bool,
    pub elapsed_seconds: f64,
}

/// Runs the pipeline; returns the summary and the masked diff of the cloud-init file.
pub fn run(s: &Customize, report: &Reporter) -> Result<(Summary, String)> {
    report.phase(&format!("Examining {}", s.input.display()));
    let info = image_file::inspect(&s.input).map_err(with_code(BAD_INPUT))?;
    report.detail(&format!("{} image, virtual size {} bytes", info.format.as_str(), info.virtual_size));
    let _lock = match s.output {
        Output::InPlace { .. } => Some(lock_for_in_place(&s.input)?),
        _ => None,
    };
    let secret = s.password.read().map_err(with_code(USAGE))?;
    let stored =
        if s.plaintext { Stored::Plain(secret.expose().to_string()) } else { Stored::Hash(password::hash(&secret)) };

    let work = cleanup::work_dir()?;
    sweep(&std::env::temp_dir(), cleanup::WORK_DIR_MARKER, report);
    let dry_run = s.output == Output::DryRun;
    let overlay = work.path().join("overlay.qcow2");
    let (guest, accel) = launch(s, &info, (!dry_run).then_some(overlay.as_path()), work.path(), report)?;
    cleanup::fault_point("launched");

    report.phase("Finding the root filesystem");
    let root = locate::find_root(&guest, s.root.as_deref()).map_err(with_code(BAD_GUEST))?;
    report.detail(&format!("root {} ({}), {}", root.device, root.fs_type, root.os.as_deref().unwrap_or("unknown OS")));
    for note in locate::mount_root(&guest, &root, dry_run).map_err(with_code(BAD_GUEST))? {
        report.warn(&note);
    }

    report.phase("Reading cloud-init's configuration");
    let image = read_image(&guest, s, report)?;
    let already_set = |text: &str| stands_for(&secret, text, s.plaintext);
    let plan = plan::plan(
        &Facts {
            files: &image.files,
            version: image.version,
            passwd_users: &image.passwd_users,
            sshd: image.sshd.as_ref(),
            booted_before: image.booted_before && !s.clean_instance_state,
        },
        &Request {
            user: s.user.as_deref(),
            stored,
            already_set: &already_set,
            expire: s.expire,
            ssh_pwauth: s.ssh_pwauth,
            target: s.target,
        },
    )?;
    report.detail(&format!("user {} via {} in {}", plan.user, plan.form.describe(), plan.target));
    refuse_if_ineffective(&plan, s.allow_ineffective, report)?;

    let mut summary = Summary {
        input: s.input.clone(),
        input_format: info.format,
        output: None,
        output_format: None,
        dry_run,
        accel,
        root,
        cloud_init_version: image.version.to_string(),
        user: plan.user.clone(),
        form: plan.form,
        file: plan.target.clone(),
        changed: plan.changed(),
        changed_keys: plan.changed_keys.clone(),
        effective: plan.effective.clone(),
        findings: plan.findings.clone(),
        instance_state_cleaned: false,
        elapsed_seconds: 0.0,
    };
    if !dry_run {
        report.phase(&format!("Writing {}", plan.target));
        if plan.changed() {
            guest.replace_file(&plan.target, plan.new_text.as_bytes(), crate::cloud_config::CLOUD_CFG)?;
        }
        if s.clean_instance_state && image.booted_before {
            guest_config::clean_instance_state(&guest)?;
            summary.instance_state_cleaned = true;
        }
        cleanup::fault_point("edited");
        guest.shutdown()?;
        cleanup::fault_point("shut-down");
        let (dest, format) = produce_output(s, &info, &overlay, &secret, report)?;
        summary.output = Some(dest);
        summary.output_format = Some(format);
    }
    summary.elapsed_seconds = report.elapsed_secs();
    Ok((summary, plan.masked_diff()))
}

/// Starts the appliance on the input (read-only, for a dry run) or on a fresh overlay over it.
fn launch(
    s: &Customize,
    info: &ImageInfo,
    overlay: Option<&Path>,
    tmpdir: &Path,
    report: &Reporter,
) -> Result<(Guest, Accel)> {
    let (accel, why) = accel::choose(s.accel, &HostKvm::probe()).map_err(with_code(APPLIANCE))?;
    let drive = match overlay {
        None => Drive { path: &s.input, format: info.format, readonly: true },
        Some(overlay) => {
            output::create_overlay(&s.input, info.format, overlay)?;
            Drive { path: overlay, format: Format::Qcow2, readonly: false }
        }
    };
    report.phase(&format!(
        "Launching the appliance ({}{})",
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        why.map(|w| format!(": {w}")).unwrap_or_default()
    ));
    let options = LaunchOptions { accel, timeout: s.timeout, debug: s.verbosity == Verbosity::Debug, tmpdir };
    let guest = Guest::launch(&[drive], &options).map_err(with_code(APPLIANCE))?;
    Ok((guest, accel))
}

/// What the plan needs from the mounted guest.
struct ImageFacts {
    files: Vec<guest_config::CloudFile>,
    version: CloudInitVersion,
    sshd: Option<crate::sshd::Files>,
    booted_before: bool,
    passwd_users: Vec<String>,
}

fn read_image(guest: &Guest, s: &Customize, report: &Reporter) -> Result<ImageFacts> {
    let (files, read_warnings) = guest_config::read_cloud_files(guest).map_err(with_code(BAD_GUEST))?;
    read_warnings.iter().for_each(|w| report.warn(w));
    let version = match s.cloud_init_version {
        Some(v) => v,
        None => guest_config::cloud_init_version(guest)?,
    };
    report.detail(&format!("cloud-init {version}; {} configuration files", files.len()));
    Ok(ImageFacts {
        files,
        version,
        sshd: guest_config::sshd_files(guest).map_err(with_code(BAD_GUEST))?,
        booted_before: guest_config::booted_before(guest).map_err(with_code(BAD_GUEST))?,
        passwd_users: guest_config::passwd_users(guest).map_err(with_code(BAD_GUEST))?,
    })
}

/// Converts the edited overlay into the output (or the in-place replacement) and renames it into place.
fn produce_output(
    s: &Customize,
    info: &ImageInfo,
    overlay: &Path,
    secret: &Secret,
    report: &Reporter,
) -> Result<(PathBuf, Format)> {
    let (dest, format, compress, in_place, replace) = match &s.output {
        Output::NewFile { path, format, compress, replace } => {
            (path.clone(), format.unwrap_or(Format::Qcow2), *compress, false, *replace)
        }
        Output::InPlace { format, compress } => {
            (in_place_target(&s.input)?, format.unwrap_or(info.format), *compress, true, true)
        }
        Output::DryRun => unreachable!("a dry run produces no output"),
    };
    report.phase(&format!("Writing the {} image {}", format.as_str(), dest.display()));
    let pending = Pending::beside(&dest).map_err(with_code(OUTPUT))?;
    sweep(pending.dir(), cleanup::PARTIAL_MARKER, report);
    output::convert(overlay, format, compress, pending.path()).map_err(with_code(OUTPUT))?;
    cleanup::fault_point("converted");
    let saved_password = reveal_random_password(&s.password, secret)?;
    let (mode, owner_like) = if in_place {
        let mode = std::fs::metadata(&dest).context("reading the input's mode")?.permissions().mode() & 0o7777;
        (mode, Some(dest.as_path()))
    } else {
        (output::default_file_mode(), None)
    };
    // Past this point the output appears; an interrupt that arrived during the conversion wins.
    cleanup::checkpoint();
    if let Err(e) = pending.commit(mode, owner_like, replace) {
        if let Some(path) = saved_password {
            let _ = std::fs::remove_file(path);
        }
        return Err(with_code(OUTPUT)(e));
    }
    Ok((dest, format))
}

/// Removes what killed runs left in `dir`, and says so.
fn sweep(dir: &Path, marker: &str, report: &Reporter) {
    for path in cleanup::sweep_leftovers(dir, marker) {
        report.warn(&format!("removed {}, left behind by an interrupted cloudimg run", path.display()));
    }
}

/// Whether an existing stored value already stands for the password, in the requested kind.
fn stands_for(secret: &Secret, stored: &str, plaintext: bool) -> bool {
    if plaintext {
        stored == secret.expose()
    } else {
        stored.starts_with('$') && password::matches(secret, stored)
    }
}

fn refuse_if_ineffective(plan: &Plan, allow: bool, report: &Reporter) -> Result<()> {
    let errors: Vec<&Finding> = plan.findings.iter().filter(|f| f.severity == Severity::Error).collect();
    for finding in &plan.findings {
        if finding.severity == Severity::Warning || allow {
            report.warn(&format!("{} (fix: {})", finding.message, finding.fix));
        }
    }
    if errors.is_empty() || allow {
        return Ok(());
    }
    let reasons: Vec<String> = errors.iter().map(|f| format!("{} (fix: {})", f.message, f.fix)).collect();
    Err(with_code(INEFFECTIVE)(anyhow::anyhow!(
        "the password login would not work, so nothing was written: {}; --allow-ineffective writes anyway",
        reasons.join("; ")
    )))
}

/// Shows a generated password once on stderr, or saves it; returns the file it was saved to.
fn reveal_random_password(source: &Source, secret: &Secret) -> Result<Option<PathBuf>> {
    match source {
        Source::Random { save_to: Some(path) } => {
            password::save_random(secret, path).map_err(with_code(OUTPUT))?;
            Ok(Some(path.clone()))
        }
        Source::Random { save_to: None } => {
            eprintln!("cloudimg: generated password (shown once): {}", secret.expose());
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// The real file an in-place edit replaces (a symlink is followed, so the link stays a link).
fn in_place_target(input: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(input).with_context(|| format!("resolving {}", input.display())).map_err(with_code(BAD_INPUT))
}

/// Holds an exclusive lock on the input for the whole in-place run, so two runs cannot interleave.
fn lock_for_in_place(input: &Path) -> Result<File> {
    let file =
        File::open(input).with_context(|| format!("opening {}", input.display())).map_err(with_code(BAD_INPUT))?;
    // SAFETY: flock(2) on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(with_code(OUTPUT)(anyhow::anyhow!(
            "{} is being edited in place by another cloudimg run; try again when it has finished",
            input.display()
        )));
    }
    Ok(file)
}
