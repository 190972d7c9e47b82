//! `cloudimg customize`: the pipeline, in order. Open the image safely → find the root → read
//! cloud-init's configuration → plan the edit (pure) → write it back → produce the output.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::accel::Accel;
use crate::appliance;
use crate::checks::{self, Effective, Finding, Severity};
use crate::cleanup;
use crate::cli::Method;
use crate::cloud_config::credentials::{self, Form, Stored};
use crate::cloud_config::lock;
use crate::cloud_config::version::{self, CloudInitVersion};
use crate::exit_codes::{with_code, APPLIANCE, BAD_GUEST, BAD_INPUT, INEFFECTIVE, OUTPUT, USAGE};
use crate::guest::{Drive, Guest};
use crate::guest_config;
use crate::image_file::{self, Format, ImageInfo};
use crate::locate::{self, Root};
use crate::manifest::{self, GuestFacts, Manifest};
use crate::method;
use crate::output;
use crate::output_queue::Queue;
use crate::password::{self, Secret};
use crate::plan::{self, Facts, Request};
use crate::report::{Reporter, Verbosity};
use crate::settings::{Customize, Output};
use crate::shadow;
use crate::sshd;
use crate::upload::{self, Uploaded};

mod outputs;

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
    /// `None` when the image has no cloud-init (or its version is unknown and not needed).
    pub cloud_init_version: Option<String>,
    /// Where that version was read (`source`, `path`, and the version as written there).
    pub cloud_init_version_source: Option<version::Found>,
    /// `cloud-init`, `shadow`, or `lock`.
    pub method: &'static str,
    pub method_reason: String,
    /// `None` for --lock.
    pub user: Option<String>,
    /// The cloud-config form of the password; `None` without one or with --method shadow.
    pub form: Option<Form>,
    /// The main file written.
    pub file: String,
    /// Every guest file written or removed.
    pub files_changed: Vec<String>,
    pub changed: bool,
    pub changed_keys: Vec<String>,
    /// `yescrypt` or `sha512` with --method shadow.
    pub shadow_algorithm: Option<shadow::Algorithm>,
    /// cloud-init's view after the edit (`None` without cloud-init).
    pub effective: Option<Effective>,
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
    pub instance_state_cleaned: bool,
    /// Glance properties read from the image (os_distro, os_version, os_admin_user, ...).
    pub properties: BTreeMap<String, String>,
    /// The `openstack image create` command that uploads the output with these properties.
    pub openstack_command: Option<String>,
    /// With --manifest, --json or --upload: what Glance needs to know, hashes included.
    pub manifest: Option<Manifest>,
    /// With --upload: what Glance holds.
    pub upload: Option<Uploaded>,
    pub elapsed_seconds: f64,
}

/// One change to a guest file.
struct Write {
    path: String,
    /// `None` removes the file.
    content: Option<String>,
    /// Root-only (0600): cloudimg's journal, which may hold an original configuration.
    private: bool,
    /// Where a new file takes its owner, mode and label from.
    like: &'static str,
}

/// What a job decided, before anything is written.
struct Decision {
    method: &'static str,
    method_reason: String,
    user: Option<String>,
    form: Option<Form>,
    file: String,
    writes: Vec<Write>,
    changed_keys: Vec<String>,
    shadow_algorithm: Option<shadow::Algorithm>,
    effective: Option<Effective>,
    findings: Vec<Finding>,
    notes: Vec<String>,
    /// What a dry run shows: a diff with the secret masked.
    diff: String,
}

/// One image's outcome: its summary and the masked diff of what changes, or why it failed.
pub type ImageResult = Result<(Summary, String)>;

/// What the output writer is asked to do for an image.
enum WriterJob<'a> {
    /// Copy its input beside the destination, before the appliance edits it.
    CopyAhead(&'a Prepared),
    /// Write its output: its edits are done.
    Write(&'a Prepared),
}

/// The output writer: jobs in, (index, written output) out for each `Write`.
type Writer<'scope, 'a> = Queue<'scope, WriterJob<'a>, Option<(usize, Result<outputs::Converted>)>>;

/// The writer's outputs by image index.
type Written = BTreeMap<usize, Result<outputs::Converted>>;

/// One input, checked and ready to be attached.
struct Prepared {
    index: usize,
    input: PathBuf,
    info: ImageInfo,
    /// Held for the whole run when the input is edited in place (the input, open: the output takes its
    /// mode and owner from this descriptor).
    lock: Option<File>,
    /// The working overlay the edits go to; `None` for a dry run, which attaches the input read-only.
    overlay: Option<PathBuf>,
    target: Option<Target>,
}

/// Where one image's output goes.
#[derive(Clone)]
struct Target {
    dest: PathBuf,
    format: Format,
    compress: bool,
    in_place: bool,
    replace: bool,
}

/// Runs the pipeline on every input, in one appliance launch where that is safe; returns one result
/// per input, in order. An error here (no password, no temporary directory) concerns every image.
pub fn run(s: &Customize, report: &Reporter) -> Result<Vec<ImageResult>> {
    let secret = s.password.as_ref().map(|p| p.read()).transpose().map_err(with_code(USAGE))?;
    // Bad credentials should cost nothing: authenticate before any image work.
    let glance = match &s.upload {
        Some(args) => Some(upload::connect(&upload::resolve_credentials(args.os_cloud.as_deref())?, report)?),
        None => None,
    };
    let work = cleanup::work_dir()?;
    sweep(&std::env::temp_dir(), cleanup::WORK_DIR_MARKER, report);
    let mut results: Vec<Option<ImageResult>> = s.inputs.iter().map(|_| None).collect();
    let mut ready = Vec::new();
    for (index, input) in s.inputs.iter().enumerate() {
        match prepare(s, index, input, work.path(), report) {
            Ok(p) => ready.push(p),
            Err(e) => results[index] = Some(Err(named(s, input, e))),
        }
    }
    let (edited, mut converted) = edit_all(s, &ready, secret.as_ref(), work.path(), report)?;
    let by_index = |index: usize| ready.iter().find(|p| p.index == index).expect("a prepared image");
    let mut done = Vec::new();
    for (index, result) in edited {
        match result {
            Ok((mut summary, diff)) if s.output == Output::DryRun => {
                summary.elapsed_seconds = report.elapsed_secs();
                results[index] = Some(Ok((summary, diff)));
            }
            Ok((summary, diff)) => {
                // An image whose filesystems would not unmount was never handed to the writer.
                let output = converted.remove(&index).unwrap_or_else(|| {
                    Err(with_code(APPLIANCE)(anyhow::anyhow!(
                        "unmounting the image's filesystems failed, so its output was not written"
                    )))
                });
                done.push((by_index(index), summary, diff, output));
            }
            Err(e) => results[index] = Some(Err(named(s, &s.inputs[index], e))),
        }
    }
    for (index, result) in outputs::produce_outputs(s, done, secret.as_ref(), glance.as_ref(), report)? {
        results[index] = Some(result.map_err(|e| named(s, &s.inputs[index], e)));
    }
    report.detail(&format!("time per phase: {}", report.phase_totals()));
    Ok(results.into_iter().map(|r| r.expect("every input has a result")).collect())
}

/// The edits of every image, sorted by index, and the outputs of those that were edited (not for a
/// dry run), written by the output writer while the appliance goes on with the next image.
fn edit_all(
    s: &Customize,
    ready: &[Prepared],
    secret: Option<&Secret>,
    work: &Path,
    report: &Reporter,
) -> Result<(Vec<(usize, ImageResult)>, Written)> {
    std::thread::scope(|scope| {
        let mut writer = match s.output {
            Output::DryRun => None,
            _ => {
                // Copies made ahead, until their image's output is written (or, unused, dropped with the
                // thread: their temporary files go with them).
                let mut ahead = BTreeMap::new();
                Some(Queue::start(scope, move |job| match job {
                    WriterJob::CopyAhead(p) => {
                        if let Some(copied) = outputs::copy_ahead(s, p, report) {
                            ahead.insert(p.index, copied);
                        }
                        None
                    }
                    WriterJob::Write(p) => Some((p.index, outputs::convert(s, p, ahead.remove(&p.index), report))),
                })?)
            }
        };
        // The disk has nothing else to do while the appliance starts.
        if let Some(writer) = writer.as_mut() {
            ready.iter().for_each(|p| writer.submit(WriterJob::CopyAhead(p)));
        }
        let all: Vec<&Prepared> = ready.iter().collect();
        let (mut edited, alone) = in_appliance(s, &all, secret, work, writer.as_mut(), report);
        for index in alone {
            let solo = [&ready[ready.iter().position(|p| p.index == index).expect("a prepared image")]];
            edited.extend(in_appliance(s, &solo, secret, work, writer.as_mut(), report).0);
        }
        edited.sort_by_key(|(index, _)| *index);
        let Some(writer) = writer else { return Ok((edited, BTreeMap::new())) };
        // What is left to wait for once the last appliance is gone: the serial tail of the run.
        let waiting = Instant::now();
        let converted = writer.finish().into_iter().flatten().collect();
        report.took("waiting for the writer", waiting);
        Ok((edited, converted))
    })
}

/// With several inputs, errors say which image they are about.
fn named(s: &Customize, input: &Path, e: anyhow::Error) -> anyhow::Error {
    if s.inputs.len() > 1 {
        e.context(input.display().to_string())
    } else {
        e
    }
}

/// Checks one input's file and output, takes the in-place lock and creates its overlay.
fn prepare(s: &Customize, index: usize, input: &Path, work: &Path, report: &Reporter) -> Result<Prepared> {
    report.phase(&format!("Examining {}", input.display()));
    let info = image_file::inspect(input).map_err(with_code(BAD_INPUT))?;
    report.detail(&format!("{} image, virtual size {} bytes", info.format.as_str(), info.virtual_size));
    let target = match &s.output {
        Output::NewFile { path, format, compress, replace } => Some(Target {
            dest: path.clone(),
            format: format.unwrap_or(Format::Qcow2),
            compress: *compress,
            in_place: false,
            replace: *replace,
        }),
        Output::Dir { dir, format, compress, replace } => {
            let format = format.unwrap_or(Format::Qcow2);
            let stem = input.file_stem().with_context(|| format!("{} has no file name", input.display()))?;
            let dest = dir.join(format!("{}.{}", stem.to_string_lossy(), format.as_str()));
            if s.inputs.iter().take(index).any(|other| other.file_stem() == Some(stem)) {
                return Err(with_code(USAGE)(anyhow::anyhow!(
                    "another input is also named {}; its output would be {} too",
                    stem.to_string_lossy(),
                    dest.display()
                )));
            }
            crate::settings::check_output_path(input, &dest, *replace)?;
            Some(Target { dest, format, compress: *compress, in_place: false, replace: *replace })
        }
        Output::InPlace { format, compress } => Some(Target {
            dest: in_place_target(input)?,
            format: format.unwrap_or(info.format),
            compress: *compress,
            in_place: true,
            replace: true,
        }),
        Output::DryRun => None,
    };
    let lock = match s.output {
        Output::InPlace { .. } => Some(lock_for_in_place(input)?),
        _ => None,
    };
    let overlay = match target {
        Some(_) => {
            let overlay = work.join(format!("overlay-{index}.qcow2"));
            output::create_overlay(input, info.format, &overlay)?;
            Some(overlay)
        }
        None => None,
    };
    Ok(Prepared { index, input: input.to_path_buf(), info, lock, overlay, target })
}

/// Edits the images of `group` in one appliance, handing each one to `writer` as soon as its
/// filesystems are unmounted. Returns each edited image's result, and the images the appliance could
/// not serve safely (copies of another), which need one of their own.
fn in_appliance<'scope, 'a: 'scope>(
    s: &Customize,
    group: &[&'a Prepared],
    secret: Option<&Secret>,
    tmpdir: &Path,
    mut writer: Option<&mut Writer<'scope, 'a>>,
    report: &Reporter,
) -> (Vec<(usize, ImageResult)>, Vec<usize>) {
    if group.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let drives: Vec<Drive> = group
        .iter()
        .map(|p| match &p.overlay {
            Some(overlay) => Drive { path: overlay, format: Format::Qcow2, readonly: false },
            None => Drive { path: &p.input, format: p.info.format, readonly: true },
        })
        .collect();
    let names: Vec<&Path> = group.iter().map(|p| p.input.as_path()).collect();
    let options =
        appliance::Options { accel: s.accel, timeout: s.timeout, debug: s.verbosity == Verbosity::Debug, tmpdir };
    let shared = match appliance::launch(&drives, &names, &options, report) {
        Ok(shared) => shared,
        Err(e) => return (group.iter().map(|p| (p.index, Err(appliance::copy_error(&e)))).collect(), Vec::new()),
    };
    let job = |pos: usize, disk: Option<&locate::Disk>| {
        let editing = Instant::now();
        let result = image_job(&shared.guest, s, group[pos], disk, secret, shared.accel, report);
        let secs = report.took("editing", editing);
        report.detail(&format!("edited {} in {secs:.1} s", group[pos].input.display()));
        result
    };
    let unmounted = |pos: usize, _: &(Summary, String)| {
        if let Some(writer) = writer.as_mut() {
            writer.submit(WriterJob::Write(group[pos]));
        }
    };
    let mut out: Vec<(usize, ImageResult)> =
        shared.each(group.len(), job, unmounted).into_iter().map(|(pos, result)| (group[pos].index, result)).collect();
    let alone = shared.alone().into_iter().map(|pos| group[pos].index).collect();
    if s.output == Output::DryRun {
        return (out, alone);
    }
    cleanup::fault_point("edited");
    let shutting = Instant::now();
    let shut = shared.guest.shutdown();
    report.took("shutdown", shutting);
    cleanup::fault_point("shut-down");
    if let Err(e) = shut {
        for (_, result) in out.iter_mut().filter(|(_, r)| r.is_ok()) {
            *result = Err(appliance::copy_error(&e));
        }
    }
    (out, alone)
}

/// Everything for one image inside the appliance: its root, its configuration, the decision, the writes.
fn image_job(
    guest: &Guest,
    s: &Customize,
    p: &Prepared,
    disk: Option<&locate::Disk>,
    secret: Option<&Secret>,
    accel: Accel,
    report: &Reporter,
) -> ImageResult {
    let dry_run = s.output == Output::DryRun;
    let of = if s.inputs.len() > 1 { format!(" of {}", p.input.display()) } else { String::new() };
    let deadline = cleanup::Deadline::analysis(&p.input, s.timeout);
    cleanup::fault_point("analysing");
    report.phase(&format!("Finding the root filesystem{of}"));
    let root = locate::find_root(guest, s.root.as_deref(), disk).map_err(with_code(BAD_GUEST))?;
    report.detail(&format!("root {} ({}), {}", root.device, root.fs_type, root.os.as_deref().unwrap_or("unknown OS")));
    for note in locate::mount_root(guest, &root, dry_run, disk).map_err(with_code(BAD_GUEST))? {
        report.warn(&note);
    }

    report.phase(&format!("Reading the image's configuration{of}"));
    let image = read_image(guest, s, &Mounted { root: &root, readonly: dry_run, disk }, report)?;
    let facts =
        guest_facts(guest, &image, disk.map_or("/dev/sda", |d| d.device.as_str())).map_err(with_code(BAD_GUEST))?;
    let mut decision = if s.lock { decide_lock(&image)? } else { decide_credentials(s, &image, secret, report)? };
    let disagreements = image.cloud.iter().flat_map(|c| c.detection.disagreements());
    decision.findings.extend(disagreements.map(|message| Finding {
        severity: Severity::Warning,
        message,
        fix: version::Detection::DISAGREEMENT_FIX.into(),
    }));
    report.detail(&format!("method {}: {}", decision.method, decision.method_reason));
    refuse_if_ineffective(&decision.findings, s.allow_ineffective, report)?;
    drop(deadline);
    decision.notes.iter().for_each(|n| report.detail(n));

    let mut summary = Summary {
        input: p.input.clone(),
        input_format: p.info.format,
        output: None,
        output_format: None,
        dry_run,
        accel,
        root,
        cloud_init_version: image.cloud.as_ref().and_then(|c| c.version()).map(|v| v.to_string()),
        cloud_init_version_source: image.cloud.as_ref().and_then(|c| c.detection.chosen().cloned()),
        method: decision.method,
        method_reason: decision.method_reason,
        user: decision.user,
        form: decision.form,
        file: decision.file,
        files_changed: decision.writes.iter().map(|w| w.path.clone()).collect(),
        changed: !decision.writes.is_empty(),
        changed_keys: decision.changed_keys,
        shadow_algorithm: decision.shadow_algorithm,
        effective: decision.effective,
        findings: decision.findings,
        notes: decision.notes,
        instance_state_cleaned: false,
        properties: manifest::properties(&facts),
        openstack_command: None,
        manifest: None,
        upload: None,
        elapsed_seconds: 0.0,
    };
    if !dry_run {
        let files = if summary.files_changed.is_empty() {
            "nothing (no change)".to_string()
        } else {
            summary.files_changed.join(", ")
        };
        let into = if s.inputs.len() > 1 { format!(" in {}", p.input.display()) } else { String::new() };
        report.phase(&format!("Writing {files}{into}"));
        for write in &decision.writes {
            apply(guest, write)?;
        }
        if image.journal_files.contains(&lock::OLD_JOURNAL) {
            guest.remove_dir_if_empty(lock::OLD_JOURNAL_DIR)?;
        }
        if s.clean_instance_state && image.booted_before {
            guest_config::clean_instance_state(guest)?;
            summary.instance_state_cleaned = true;
        }
        if s.trim {
            report.phase(&format!("Trimming free space{of}"));
            for failure in guest.trim_mounted()? {
                report.warn(&format!("{failure}; the output keeps that filesystem's free blocks"));
            }
        }
    }
    Ok((summary, decision.diff))
}

/// What the image says about itself for Glance; `disk` is its whole-disk device.
fn guest_facts(guest: &Guest, image: &ImageFacts, disk: &str) -> Result<GuestFacts> {
    let table = guest.partition_table(disk)?;
    Ok(GuestFacts {
        os_id: locate::os_release_field(&image.os_release, "ID"),
        os_version: locate::os_release_field(&image.os_release, "VERSION_ID"),
        admin_user: image.cloud.as_ref().and_then(|c| credentials::default_user(&merged(&c.files))),
        guest_agent: guest.exists("/usr/bin/qemu-ga")? || guest.exists("/usr/sbin/qemu-ga")?,
        partition_table: table.as_ref().map(|t| t.kind.to_string()),
        gpt_types: table.map(|t| t.gpt_types).unwrap_or_default(),
        architecture: guest_config::architecture(guest)?,
    })
}

fn apply(guest: &Guest, write: &Write) -> Result<()> {
    match (&write.content, write.private) {
        (None, _) => guest.remove_file(&write.path),
        (Some(text), true) => guest.replace_private_file(&write.path, text.as_bytes(), write.like),
        (Some(text), false) => guest.replace_file(&write.path, text.as_bytes(), write.like),
    }
}

/// A password and/or keys, by the method chosen.
fn decide_credentials(
    s: &Customize,
    image: &ImageFacts,
    secret: Option<&Secret>,
    report: &Reporter,
) -> Result<Decision> {
    let default_user = image.cloud.as_ref().and_then(|c| credentials::default_user(&merged(&c.files)));
    let user = s.user.clone().or(default_user.clone());
    let in_shadow = |u: &str| image.shadow.as_deref().is_some_and(|t| shadow::state(t, u) != shadow::State::Missing);
    let facts = method::Facts {
        cloud_init: image.cloud.is_some(),
        version: image.cloud.as_ref().and_then(|c| c.version()),
        plaintext: s.plaintext,
        set_passwords_runs: image.cloud.as_ref().is_some_and(|c| credentials::runs_set_passwords(&merged(&c.files))),
        booted_before: image.booted_before && !s.clean_instance_state,
        user_in_shadow: user.as_deref().is_some_and(in_shadow),
    };
    let (method, reason) = method::choose(s.method, &facts).map_err(with_code(BAD_GUEST))?;
    if s.method == Method::Auto {
        report.phase(&format!(
            "Method: {}, because {reason}",
            if method == Method::Shadow { "/etc/shadow" } else { "cloud-init" }
        ));
    }
    match method {
        Method::Shadow => {
            let secret = secret.expect("settings require a password for --method shadow");
            if !s.ssh_keys.is_empty() {
                return Err(with_code(USAGE)(anyhow::anyhow!(
                    "--ssh-key goes through cloud-init; with --method shadow, run a second customize with --ssh-key alone"
                )));
            }
            decide_shadow(s, image, secret, user, reason)
        }
        _ => decide_cloud_init(s, image, secret, reason),
    }
}

fn merged(files: &[guest_config::CloudFile]) -> crate::cloud_config::yaml11::Mapping {
    let parsed: Vec<_> = files.iter().map(|f| f.parsed.clone()).collect();
    crate::cloud_config::merge::effective(&parsed)
}

fn decide_cloud_init(s: &Customize, image: &ImageFacts, secret: Option<&Secret>, reason: String) -> Result<Decision> {
    let cloud = image.cloud.as_ref().ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!(
            "the image has no {}, so no cloud-init to set the password; use --method shadow (or auto) to set it in /etc/shadow",
            crate::cloud_config::CLOUD_CFG
        ))
    })?;
    let version = cloud.version().ok_or_else(|| guest_config::version_unknown(&cloud.detection))?;
    let stored = secret.map(|secret| {
        if s.plaintext {
            Stored::Plain(secret.expose().to_string())
        } else {
            Stored::Hash(password::hash(secret))
        }
    });
    let comparer = Comparer::new(secret, s.plaintext);
    let already_set = |text: &str| comparer.stands_for(text);
    let plan = plan::plan(
        &Facts {
            files: &cloud.files,
            version,
            passwd_users: &image.passwd_users,
            sshd: image.sshd.as_ref(),
            shadow: image.shadow.as_deref(),
            booted_before: image.booted_before && !s.clean_instance_state,
        },
        &Request {
            user: s.user.as_deref(),
            stored,
            ssh_keys: &s.ssh_keys,
            already_set: &already_set,
            expire: s.expire,
            ssh_pwauth: s.ssh_pwauth,
            target: s.target,
        },
    )?;
    let in_cloud_cfg = plan.target == crate::cloud_config::CLOUD_CFG;
    let mut writes = Vec::new();
    if plan.changed() {
        writes.push(Write {
            path: plan.target.clone(),
            content: Some(plan.new_text.clone()),
            // A drop-in cloudimg writes a password to is root's alone; cloud.cfg keeps its mode.
            private: plan.holds_secret && !in_cloud_cfg,
            like: crate::cloud_config::CLOUD_CFG,
        });
        let mut journal = image.journal.clone().unwrap_or_default();
        journal.record(&plan.target, plan.old_text.as_deref(), &plan.new_text);
        writes.push(Write {
            path: lock::JOURNAL.into(),
            content: Some(journal.to_text()),
            private: true,
            like: crate::cloud_config::CLOUD_CFG,
        });
        writes.extend(image.journal_files.iter().filter(|f| **f != lock::JOURNAL).map(|old| Write {
            path: old.to_string(),
            content: None,
            private: false,
            like: crate::cloud_config::CLOUD_CFG,
        }));
    }
    let exposed = (in_cloud_cfg && secret.is_some() && plan.holds_secret)
        .then(|| cloud.files.iter().find(|f| f.path == plan.target)?.mode)
        .flatten()
        .and_then(|mode| checks::readable_password_finding(&plan.target, mode));
    Ok(Decision {
        method: "cloud-init",
        method_reason: reason,
        user: Some(plan.user.clone()),
        form: plan.form,
        file: plan.target.clone(),
        writes,
        changed_keys: plan.changed_keys.clone(),
        shadow_algorithm: None,
        effective: Some(plan.effective.clone()),
        findings: plan.findings.iter().cloned().chain(comparer.findings()).chain(exposed).collect(),
        notes: Vec::new(),
        diff: plan.masked_diff(),
    })
}

fn decide_shadow(
    s: &Customize,
    image: &ImageFacts,
    secret: &Secret,
    user: Option<String>,
    reason: String,
) -> Result<Decision> {
    let user = user.ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!(
            "the image's cloud-init configuration names no default user; name the user with --user"
        ))
    })?;
    let text = image.shadow.as_deref().ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!("the image has no {} to set the password in", shadow::SHADOW))
    })?;
    let (algorithm, why) = shadow::default_algorithm(&image.os_release, image.login_defs.as_deref());
    let mut notes = vec![format!("{} hash: {why}", algorithm.name())];
    let mut writes = Vec::new();
    let current_hash = shadow::hash_of(text, &user);
    let comparer = Comparer::new(Some(secret), false);
    if !current_hash.is_some_and(|h| comparer.stands_for(h)) {
        let hash = match algorithm {
            shadow::Algorithm::Yescrypt => password::hash_yescrypt(secret),
            shadow::Algorithm::Sha512 => password::hash(secret),
        };
        let today = shadow::days_since_epoch(std::time::SystemTime::now());
        let (new, more) = shadow::set_password(text, &user, &hash, today, s.expire).map_err(with_code(BAD_GUEST))?;
        notes.extend(more);
        writes.push(Write { path: shadow::SHADOW.into(), content: Some(new), private: false, like: shadow::SHADOW });
    }
    let mut findings = comparer.findings();
    let mut diff = String::new();
    match (&image.sshd, s.ssh_pwauth) {
        (Some(files), Some(true)) => {
            for (path, new_text) in sshd::enable_password_authentication(files) {
                diff.push_str(
                    &similar::TextDiff::from_lines(files[&path].as_str(), new_text.as_str())
                        .unified_diff()
                        .header(&format!("a{path}"), &format!("b{path}"))
                        .to_string(),
                );
                notes.push(format!("{path}: PasswordAuthentication yes where sshd reads it first"));
                writes.push(Write { path, content: Some(new_text), private: false, like: sshd::MAIN_CONFIG });
            }
            let mut after = files.clone();
            after.extend(
                writes
                    .iter()
                    .filter(|w| w.path.starts_with("/etc/ssh/"))
                    .map(|w| (w.path.clone(), w.content.clone().unwrap_or_default())),
            );
            findings.extend(cloud_init_undoes_sshd(image, &after));
            if user == "root" {
                findings.extend(checks::root_password_finding(&after));
            }
        }
        (None, _) => findings.push(Finding {
            severity: Severity::Warning,
            message: format!(
                "the image has no {}: the password will work on the console, not over SSH",
                sshd::MAIN_CONFIG
            ),
            fix: "install openssh-server in the image if you need SSH".into(),
        }),
        _ => {}
    }
    if !writes.is_empty() {
        diff = format!(
            "{} for `{user}`: a new {} hash (not shown), account unlocked\n{diff}",
            shadow::SHADOW,
            algorithm.name()
        );
    }
    Ok(Decision {
        method: "shadow",
        method_reason: reason,
        user: Some(user),
        form: None,
        file: shadow::SHADOW.into(),
        changed_keys: Vec::new(),
        writes,
        shadow_algorithm: Some(algorithm),
        effective: None,
        findings,
        notes,
        diff,
    })
}

/// On a new instance cloud-init applies its own `ssh_pwauth`, which may turn sshd's passwords off again.
fn cloud_init_undoes_sshd(image: &ImageFacts, sshd_files: &sshd::Files) -> Option<Finding> {
    let cloud = image.cloud.as_ref()?;
    let version = cloud.version()?;
    let parsed: Vec<_> = cloud.files.iter().map(|f| f.parsed.clone()).collect();
    let outcome = credentials::outcome(&merged(&cloud.files), version, "", None);
    let after = sshd::password_authentication(&sshd::after_cloud_init(sshd_files, outcome.ssh_pwauth, version));
    if after.password_authentication {
        return None;
    }
    let file =
        crate::cloud_config::merge::deciding_file(&parsed, &["ssh_pwauth"]).map(|f| f.path.clone()).unwrap_or_default();
    Some(Finding {
        severity: Severity::Warning,
        message: format!("{file} sets `ssh_pwauth: false`: on a new instance cloud-init turns SSH passwords off again (a disk booted again as the same instance keeps them)"),
        fix: "also run `cloudimg customize` with --method cloud-init, or remove `ssh_pwauth` from that file".into(),
    })
}

/// `--lock`: cloudimg's journal undone, then every remaining password removed.
fn decide_lock(image: &ImageFacts) -> Result<Decision> {
    let cloud = image
        .cloud
        .as_ref()
        .ok_or_else(|| with_code(BAD_GUEST)(anyhow::anyhow!("the image has no cloud-init configuration to lock")))?;
    let mut current: BTreeMap<String, String> = cloud.files.iter().map(|f| (f.path.clone(), f.text.clone())).collect();
    let mut changes: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut notes = Vec::new();
    let mut findings = Vec::new();
    if let Some(journal) = &image.journal {
        for (path, undo) in lock::undo(journal, &current) {
            match undo {
                lock::Undo::Restore(Some(original)) => {
                    notes.push(format!("{path}: restored as it was before cloudimg changed it"));
                    current.insert(path.clone(), original.clone());
                    changes.insert(path, Some(original));
                }
                lock::Undo::Restore(None) => {
                    notes.push(format!("{path}: removed (cloudimg had created it)"));
                    current.remove(&path);
                    changes.insert(path, None);
                }
                lock::Undo::ChangedSince => findings.push(Finding {
                    severity: Severity::Warning,
                    message: format!("{path} changed after cloudimg wrote it, so it is not restored; its passwords are removed in place"),
                    fix: format!("compare it with the original in the input image's {} if you need it", image.journal_files[0]),
                }),
            }
        }
        changes.extend(image.journal_files.iter().map(|f| (f.to_string(), None)));
    }
    let files: Vec<(String, String)> = current.into_iter().collect();
    let (locked, more) = lock::lock(&files).map_err(with_code(BAD_GUEST))?;
    notes.extend(more);
    changes.extend(locked.into_iter().map(|(p, t)| (p, Some(t))));
    let originals: BTreeMap<&str, &str> = cloud.files.iter().map(|f| (f.path.as_str(), f.text.as_str())).collect();
    let writes: Vec<Write> = changes
        .into_iter()
        // A file restored and then locked back to what it is now needs no write.
        .filter(|(path, content)| match originals.get(path.as_str()) {
            Some(now) => Some(*now) != content.as_deref(),
            None => lock::JOURNALS.contains(&path.as_str()) || content.is_some(),
        })
        .map(|(path, content)| Write { path, content, private: false, like: crate::cloud_config::CLOUD_CFG })
        .collect();
    Ok(Decision {
        method: "lock",
        method_reason: "--lock".into(),
        user: None,
        form: None,
        file: crate::cloud_config::CLOUD_CFG.into(),
        changed_keys: Vec::new(),
        writes,
        shadow_algorithm: None,
        effective: None,
        findings,
        diff: notes.iter().map(|n| format!("{n}\n")).collect(),
        notes,
    })
}

/// The root as it is mounted, so that it can be mounted again the same way.
struct Mounted<'a> {
    root: &'a Root,
    readonly: bool,
    disk: Option<&'a locate::Disk>,
}

/// What the decisions need from the mounted guest.
struct ImageFacts {
    /// `None` without /etc/cloud/cloud.cfg.
    cloud: Option<CloudFacts>,
    sshd: Option<crate::sshd::Files>,
    booted_before: bool,
    passwd_users: Vec<String>,
    shadow: Option<String>,
    os_release: String,
    login_defs: Option<String>,
    /// Read from the first of [`lock::JOURNALS`] present.
    journal: Option<lock::Journal>,
    /// Which of [`lock::JOURNALS`] the image holds.
    journal_files: Vec<&'static str>,
}

struct CloudFacts {
    files: Vec<guest_config::CloudFile>,
    /// The version from --cloud-init-version or the image, and every source asked.
    detection: version::Detection,
}

impl CloudFacts {
    /// `None` when no source gave it.
    fn version(&self) -> Option<CloudInitVersion> {
        self.detection.chosen().map(|found| found.version)
    }
}

fn read_image(guest: &Guest, s: &Customize, mounted: &Mounted, report: &Reporter) -> Result<ImageFacts> {
    let cloud = if guest_config::has_cloud_init(guest).map_err(with_code(BAD_GUEST))? {
        let (files, read_warnings) = guest_config::read_cloud_files(guest).map_err(with_code(BAD_GUEST))?;
        read_warnings.iter().for_each(|w| report.warn(w));
        let remount = || locate::mount_root(guest, mounted.root, mounted.readonly, mounted.disk).map(drop);
        let detection = guest_config::cloud_init_version(guest, s.cloud_init_version, &mounted.root.device, remount)
            .map_err(with_code(BAD_GUEST))?;
        match detection.chosen() {
            Some(found) => report.detail(&format!("cloud-init {found}; {} configuration files", files.len())),
            None => report.detail(&format!("cloud-init of unknown version: {}", detection.failure())),
        }
        Some(CloudFacts { files, detection })
    } else {
        report.detail("no cloud-init in the image");
        None
    };
    let read = |path: &str| guest_config::read_text(guest, path).map_err(with_code(BAD_GUEST));
    let mut journal = None;
    let mut journal_files = Vec::new();
    for path in lock::JOURNALS {
        if let Some(text) = read(path)? {
            if journal.is_none() {
                journal = Some(lock::Journal::parse(path, &text).map_err(with_code(BAD_GUEST))?);
            }
            journal_files.push(path);
        }
    }
    Ok(ImageFacts {
        cloud,
        sshd: guest_config::sshd_files(guest).map_err(with_code(BAD_GUEST))?,
        booted_before: guest_config::booted_before(guest).map_err(with_code(BAD_GUEST))?,
        passwd_users: guest_config::passwd_users(guest).map_err(with_code(BAD_GUEST))?,
        // Only the shadow route needs it; a run that cannot read it fails there, not here.
        shadow: read(shadow::SHADOW).ok().flatten(),
        os_release: guest_config::os_release(guest).map_err(with_code(BAD_GUEST))?,
        login_defs: read(shadow::LOGIN_DEFS).ok().flatten(),
        journal,
        journal_files,
    })
}

/// Removes what killed runs left in `dir`, and says so.
fn sweep(dir: &Path, marker: &str, report: &Reporter) {
    for path in cleanup::sweep_leftovers(dir, marker) {
        report.warn(&format!("removed {}, left behind by an interrupted cloudimg run", path.display()));
    }
}

/// Whether existing stored values already stand for the password, in the requested kind; each value
/// is checked once. A hash with cost parameters beyond what cloudimg computes is not checked: it
/// counts as another password (and is replaced), with a warning.
struct Comparer<'a> {
    secret: Option<&'a Secret>,
    plaintext: bool,
    checked: RefCell<BTreeMap<String, bool>>,
    refused: RefCell<Vec<String>>,
}

impl<'a> Comparer<'a> {
    fn new(secret: Option<&'a Secret>, plaintext: bool) -> Self {
        Comparer { secret, plaintext, checked: RefCell::default(), refused: RefCell::default() }
    }

    fn stands_for(&self, stored: &str) -> bool {
        let Some(secret) = self.secret else { return false };
        if self.plaintext {
            return stored == secret.expose();
        }
        if !stored.starts_with('$') {
            return false;
        }
        if let Some(&known) = self.checked.borrow().get(stored) {
            return known;
        }
        let same = password::matches(secret, stored).unwrap_or_else(|why| {
            self.refused.borrow_mut().push(format!("{why:#}"));
            false
        });
        self.checked.borrow_mut().insert(stored.to_string(), same);
        same
    }

    fn findings(&self) -> Vec<Finding> {
        self.refused
            .borrow()
            .iter()
            .map(|why| Finding {
                severity: Severity::Warning,
                message: format!("a password hash already in the image was not compared with the password: {why}"),
                fix: "none needed: a new hash takes its place".into(),
            })
            .collect()
    }
}

fn refuse_if_ineffective(findings: &[Finding], allow: bool, report: &Reporter) -> Result<()> {
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    for finding in findings {
        if finding.severity != Severity::Error || allow {
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

/// The real file an in-place edit replaces (a symlink is followed, so the link stays a link).
fn in_place_target(input: &Path) -> Result<PathBuf> {
    let target = std::fs::canonicalize(input)
        .with_context(|| format!("resolving {}", input.display()))
        .map_err(with_code(BAD_INPUT))?;
    // The new image is written beside the old one and renamed over it: for a device, that would put a
    // file in place of the device node.
    if std::fs::metadata(&target).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())) {
        return Err(with_code(USAGE)(anyhow::anyhow!(
            "--in-place cannot rewrite the block device {}: write a new image with -o, then copy it onto the \
             device yourself (e.g. `qemu-img convert -O raw OUT.qcow2 {}`)",
            target.display(),
            target.display()
        )));
    }
    Ok(target)
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
