//! `cloudimg customize`: the pipeline, in order. Open the image safely → find the root → read
//! cloud-init's configuration → plan the edit (pure) → write it back → produce the output.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::appliance::accel::Accel;
use crate::cli::settings::{Customize, Output};
use crate::cloud_config::lock;
use crate::cloud_config::version;
use crate::customize::queue::Queue;
use crate::guest::config;
use crate::guest::locate::{self, Root};
use crate::guest::session;
use crate::guest::{Drive, Guest};
use crate::image::header::{self, Format, ImageInfo};
use crate::image::output;
use crate::login::checks::{Finding, Severity};
use crate::login::password::Secret;
use crate::openstack::manifest::{self, Manifest};
use crate::openstack::upload::{self, Uploaded};
use crate::support::cleanup;
use crate::support::exit_codes::{with_code, APPLIANCE, BAD_INPUT, OUTPUT, USAGE};
use crate::support::report::{Reporter, Verbosity};

mod decide;
mod in_guest;
mod outputs;
mod queue;

use decide::{decide_credentials, decide_lock, refuse_if_ineffective, ImageFacts, Write};
pub use decide::{Decided, Route};
use in_guest::{apply, guest_facts, read_image};

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
    /// The method, the user, what changes, and what the checks found.
    #[serde(flatten)]
    pub decided: Decided,
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

/// One image after its appliance: its summary and masked diff (or why its edit failed), and, unless
/// the run is a dry run or the edit failed, what the output writer made of it.
struct Edited<'a> {
    image: &'a Prepared,
    result: ImageResult,
    converted: Option<Result<outputs::Converted>>,
}

/// One image's final result.
struct Outcome<'a> {
    image: &'a Prepared,
    result: ImageResult,
}

/// What one appliance launch did: the images it edited, and those it could not serve safely (copies
/// of another), which need a launch of their own.
struct Round<'a> {
    edited: Vec<Edited<'a>>,
    alone: Vec<&'a Prepared>,
}

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
    let secret = s.password.as_ref().map(|p| p.read()).transpose()?;
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
    let mut done = Vec::new();
    for Edited { image, result, converted } in edit_all(s, &ready, secret.as_ref(), work.path(), report)? {
        match result {
            Ok((mut summary, diff)) if s.output == Output::DryRun => {
                summary.elapsed_seconds = report.elapsed_secs();
                results[image.index] = Some(Ok((summary, diff)));
            }
            Ok((summary, diff)) => {
                // An image whose filesystems would not unmount was never handed to the writer.
                let output = converted.unwrap_or_else(|| {
                    Err(with_code(APPLIANCE)(anyhow::anyhow!(
                        "unmounting the image's filesystems failed, so its output was not written"
                    )))
                });
                done.push(outputs::Finished { image, summary, diff, output });
            }
            Err(e) => results[image.index] = Some(Err(named(s, &image.input, e))),
        }
    }
    for Outcome { image, result } in outputs::produce_outputs(s, done, secret.as_ref(), glance.as_ref(), report)? {
        results[image.index] = Some(result.map_err(|e| named(s, &image.input, e)));
    }
    report.detail(&format!("time per phase: {}", report.phase_totals()));
    Ok(results.into_iter().map(|r| r.expect("every input has a result")).collect())
}

/// The edits of every image, in input order, each with its output when it was edited (not for a dry
/// run), written by the output writer while the appliance goes on with the next image.
fn edit_all<'a>(
    s: &Customize,
    ready: &'a [Prepared],
    secret: Option<&Secret>,
    work: &Path,
    report: &Reporter,
) -> Result<Vec<Edited<'a>>> {
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
        let Round { mut edited, alone } = in_appliance(s, &all, secret, work, writer.as_mut(), report);
        for image in alone {
            edited.extend(in_appliance(s, &[image], secret, work, writer.as_mut(), report).edited);
        }
        edited.sort_by_key(|e| e.image.index);
        let Some(writer) = writer else { return Ok(edited) };
        // What is left to wait for once the last appliance is gone: the serial tail of the run.
        let waiting = Instant::now();
        let mut converted: BTreeMap<usize, _> = writer.finish().into_iter().flatten().collect();
        report.took("waiting for the writer", waiting);
        for e in &mut edited {
            e.converted = converted.remove(&e.image.index);
        }
        Ok(edited)
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
    let info = header::inspect(input)?;
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
            crate::cli::settings::check_output_path(input, &dest, *replace)?;
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
/// filesystems are unmounted.
fn in_appliance<'scope, 'a: 'scope>(
    s: &Customize,
    group: &[&'a Prepared],
    secret: Option<&Secret>,
    tmpdir: &Path,
    mut writer: Option<&mut Writer<'scope, 'a>>,
    report: &Reporter,
) -> Round<'a> {
    let edited = |image: &'a Prepared, result: ImageResult| Edited { image, result, converted: None };
    if group.is_empty() {
        return Round { edited: Vec::new(), alone: Vec::new() };
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
        session::Options { accel: s.accel, timeout: s.timeout, debug: s.verbosity == Verbosity::Debug, tmpdir };
    let shared = match session::launch(&drives, &names, &options, report) {
        Ok(shared) => shared,
        Err(e) => {
            let failed = group.iter().map(|p| edited(p, Err(session::copy_error(&e)))).collect();
            return Round { edited: failed, alone: Vec::new() };
        }
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
    let mut out: Vec<Edited> =
        shared.each(group.len(), job, unmounted).into_iter().map(|(pos, result)| edited(group[pos], result)).collect();
    let alone = shared.alone().into_iter().map(|pos| group[pos]).collect();
    if s.output == Output::DryRun {
        return Round { edited: out, alone };
    }
    cleanup::fault_point("edited");
    let shutting = Instant::now();
    let shut = shared.guest.shutdown();
    report.took("shutdown", shutting);
    cleanup::fault_point("shut-down");
    if let Err(e) = shut {
        for edit in out.iter_mut().filter(|edit| edit.result.is_ok()) {
            edit.result = Err(session::copy_error(&e));
        }
    }
    Round { edited: out, alone }
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
    let root = locate::find_root(guest, s.root.as_deref(), disk)?;
    report.detail(&format!("root {} ({}), {}", root.device, root.fs_type, root.os.as_deref().unwrap_or("unknown OS")));
    for note in locate::mount_root(guest, &root, dry_run, disk)? {
        report.warn(&note);
    }

    report.phase(&format!("Reading the image's configuration{of}"));
    let image = read_image(guest, s, &locate::Mounted { root: &root, readonly: dry_run, disk }, report)?;
    let facts = guest_facts(guest, &image, disk.map_or("/dev/sda", |d| d.device.as_str()))?;
    let mut decision = if s.lock { decide_lock(&image)? } else { decide_credentials(s, &image, secret, report)? };
    let disagreements = image.cloud.iter().flat_map(|c| c.detection.disagreements());
    decision.decided.findings.extend(disagreements.map(|message| Finding {
        severity: Severity::Warning,
        message,
        fix: version::Detection::DISAGREEMENT_FIX.into(),
    }));
    report.detail(&format!("method {}: {}", decision.decided.method, decision.decided.method_reason));
    refuse_if_ineffective(&decision.decided.findings, s.allow_ineffective, report)?;
    drop(deadline);
    decision.decided.notes.iter().for_each(|n| report.detail(n));

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
        decided: decision.decided,
        instance_state_cleaned: false,
        properties: manifest::properties(&facts),
        openstack_command: None,
        manifest: None,
        upload: None,
        elapsed_seconds: 0.0,
    };
    if !dry_run {
        summary.instance_state_cleaned = write_back(guest, s, p, &image, &decision.writes, report)?;
    }
    Ok((summary, decision.diff))
}

/// Applies a job's writes to the mounted guest, then what --clean-instance-state and --trim ask;
/// returns whether the instance state was cleaned.
fn write_back(
    guest: &Guest,
    s: &Customize,
    p: &Prepared,
    image: &ImageFacts,
    writes: &[Write],
    report: &Reporter,
) -> Result<bool> {
    let files: Vec<&str> = writes.iter().map(|w| w.path.as_str()).collect();
    let files = if files.is_empty() { "nothing (no change)".to_string() } else { files.join(", ") };
    let (of, into) = match s.inputs.len() {
        1 => (String::new(), String::new()),
        _ => (format!(" of {}", p.input.display()), format!(" in {}", p.input.display())),
    };
    report.phase(&format!("Writing {files}{into}"));
    for write in writes {
        apply(guest, write)?;
    }
    if image.journal_files.contains(&lock::OLD_JOURNAL) {
        guest.remove_dir_if_empty(lock::OLD_JOURNAL_DIR)?;
    }
    let cleaned = s.clean_instance_state && image.booted_before;
    if cleaned {
        config::clean_instance_state(guest)?;
    }
    if s.trim {
        report.phase(&format!("Trimming free space{of}"));
        for failure in guest.trim_mounted()? {
            report.warn(&format!("{failure}; the output keeps that filesystem's free blocks"));
        }
    }
    Ok(cleaned)
}

/// Removes what killed runs left in `dir`, and says so.
fn sweep(dir: &Path, marker: &str, report: &Reporter) {
    for path in cleanup::sweep_leftovers(dir, marker) {
        report.warn(&format!("removed {}, left behind by an interrupted cloudimg run", path.display()));
    }
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
