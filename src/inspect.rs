//! `cloudimg inspect`: the read-only audit. Each image is checked as a file first; only a file that
//! is safe to open is attached, read-only, and its guest read for the shared analysis (`audit`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::appliance::accel;
use crate::cloud_config::merge::ConfigFile;
use crate::cloud_config::secrets;
use crate::cloud_config::version::CloudInitVersion;
use crate::guest::config::{self, CloudInit};
use crate::guest::locate::{self, Root};
use crate::guest::session;
use crate::guest::{Drive, Guest};
use crate::image::header::{self, Format};
use crate::login::audit::{self, Analysis, Login};
use crate::login::checks::{self, Finding, Severity};
use crate::login::shadow;
use crate::support::exit_codes::{code_of, with_code, APPLIANCE, BAD_GUEST, BAD_INPUT, SUCCESS, UNMET};
use crate::support::os_release;
use crate::support::report::Reporter;

/// A condition `inspect --require` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Requirement {
    PasswordLogin,
    NoPlaintext,
    Standalone,
    NotBooted,
}

impl Requirement {
    /// Its name on the command line and in unmet-requirement messages.
    pub fn name(self) -> &'static str {
        match self {
            Requirement::PasswordLogin => "password-login",
            Requirement::NoPlaintext => "no-plaintext",
            Requirement::Standalone => "standalone",
            Requirement::NotBooted => "not-booted",
        }
    }
}

pub struct Options {
    pub user: Option<String>,
    pub root: Option<String>,
    pub require: Vec<Requirement>,
    pub accel: accel::Requested,
    pub timeout: Duration,
    /// `--cloud-init-version`: what to assume when the image's own cannot be read.
    pub cloud_init_version: Option<CloudInitVersion>,
}

/// The file as a file: nothing here comes from inside the guest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileFacts {
    pub format: Option<Format>,
    /// qcow2 compat level: `0.10` (version 2) or `1.1` (version 3).
    pub compat: Option<String>,
    pub virtual_size: Option<u64>,
    pub file_size: u64,
    /// Bytes the file really occupies on the host's disk.
    pub allocated_bytes: u64,
    /// Why cloudimg will not open it (backing or external data file, unknown features, ...).
    pub refused: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct System {
    pub root: Root,
    /// The disk's partition table (`gpt`, `msdos`), `None` for a whole-disk filesystem.
    pub partition_table: Option<String>,
    /// Whether the root is an LVM logical volume.
    pub lvm_root: bool,
    /// os-release `ID` and `VERSION_ID`.
    pub os_id: Option<String>,
    pub os_version: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageReport {
    pub path: PathBuf,
    pub file: FileFacts,
    pub system: Option<System>,
    pub analysis: Option<Analysis>,
    pub password_login: Option<Login>,
    /// All findings: the file's and the analysis's.
    pub findings: Vec<Finding>,
    /// Why the guest could not be read.
    pub error: Option<String>,
    /// The `--require` conditions this image does not meet, with the reason.
    pub unmet: Vec<String>,
    #[serde(skip)]
    pub exit_code: i32,
}

impl ImageReport {
    /// A report with the file's facts and nothing read from the guest yet.
    fn new(path: &Path, file: FileFacts) -> Self {
        ImageReport {
            path: path.to_path_buf(),
            file,
            system: None,
            analysis: None,
            password_login: None,
            findings: Vec::new(),
            error: None,
            unmet: Vec::new(),
            exit_code: SUCCESS,
        }
    }
}

/// Inspects every image: each is checked as a file, then those that can be opened share one
/// read-only appliance launch (images that cannot share it get one of their own).
pub fn run(images: &[PathBuf], opts: &Options, report: &Reporter) -> Vec<ImageReport> {
    let mut reports = Vec::new();
    let mut openable = Vec::new();
    for path in images {
        report.phase(&format!("Inspecting {}", path.display()));
        let (file, info) = file_facts(path);
        let mut out = ImageReport::new(path, file);
        if let Some(reason) = &out.file.refused {
            let pulls_in = reason.contains("backing file") || reason.contains("external data file");
            out.findings.push(Finding {
                severity: if pulls_in { Severity::Security } else { Severity::Error },
                message: format!("the file is not opened: {reason}"),
                fix: "cloudimg never follows a backing or data file out of an image".into(),
            });
            out.exit_code = BAD_INPUT;
        }
        if let Some(info) = info {
            openable.push((reports.len(), info.format));
        }
        reports.push(out);
    }
    let read = match crate::support::cleanup::work_dir() {
        Ok(work) => {
            let mut read = read_guests(images, &openable, opts, work.path(), report);
            let alone = std::mem::take(&mut read.1);
            for pos in alone {
                read.0.extend(read_guests(images, &openable[pos..=pos], opts, work.path(), report).0);
            }
            read.0
        }
        Err(e) => openable.iter().map(|(index, _)| (*index, Err(session::copy_error(&e)))).collect(),
    };
    for (index, result) in read {
        let out = &mut reports[index];
        match result {
            Ok((system, analysis)) => {
                out.password_login = Some(audit::password_login(&analysis, opts.user.as_deref()));
                out.findings.extend(analysis.findings.iter().cloned());
                out.system = Some(system);
                out.analysis = Some(analysis);
            }
            Err(e) => {
                out.exit_code = code_of(&e);
                out.error = Some(format!("{e:#}"));
            }
        }
    }
    for out in &mut reports {
        out.unmet = unmet(out, &opts.require);
        if !out.unmet.is_empty() && matches!(out.exit_code, SUCCESS | BAD_INPUT) {
            out.exit_code = UNMET;
        }
    }
    reports
}

/// Reads the guests of `group` (report index, format) in one read-only appliance. Returns each
/// one's result by report index, and the positions in `group` that need an appliance of their own.
#[allow(clippy::type_complexity)]
fn read_guests(
    images: &[PathBuf],
    group: &[(usize, Format)],
    opts: &Options,
    tmpdir: &Path,
    report: &Reporter,
) -> (Vec<(usize, Result<(System, Analysis)>)>, Vec<usize>) {
    if group.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let drives: Vec<Drive> =
        group.iter().map(|(index, format)| Drive { path: &images[*index], format: *format, readonly: true }).collect();
    let names: Vec<&Path> = group.iter().map(|(index, _)| images[*index].as_path()).collect();
    let launch = session::Options { accel: opts.accel, timeout: opts.timeout, debug: false, tmpdir };
    let shared = match session::launch(&drives, &names, &launch, report) {
        Ok(shared) => shared,
        Err(e) => return (group.iter().map(|(index, _)| (*index, Err(session::copy_error(&e)))).collect(), Vec::new()),
    };
    let results = shared
        .each(
            group.len(),
            |pos, disk| {
                report.phase(&format!("Reading the guest in {}", names[pos].display()));
                let _deadline = crate::support::cleanup::Deadline::analysis(names[pos], opts.timeout);
                read_guest(&shared.guest, disk, opts, report)
            },
            |_, _| {},
        )
        .into_iter()
        .map(|(pos, result)| (group[pos].0, result))
        .collect();
    // Read-only: nothing to flush; the appliance goes with the handle.
    (results, shared.alone())
}

/// The exit status for a set of reports: an error first, then unmet requirements, then refusals.
pub fn exit_code(reports: &[ImageReport]) -> i32 {
    let worst = |codes: &[i32]| reports.iter().map(|r| r.exit_code).find(|c| codes.contains(c));
    worst(&[APPLIANCE])
        .or_else(|| reports.iter().map(|r| r.exit_code).find(|c| ![SUCCESS, BAD_INPUT, UNMET].contains(c)))
        .or_else(|| worst(&[UNMET]))
        .or_else(|| worst(&[BAD_INPUT]))
        .unwrap_or(SUCCESS)
}

fn file_facts(path: &Path) -> (FileFacts, Option<header::ImageInfo>) {
    let meta = std::fs::metadata(path).ok();
    let file_size = meta.as_ref().map_or(0, |m| m.len());
    let allocated_bytes = meta.as_ref().map_or(0, |m| m.blocks() * 512);
    let compat = |version: u32| if version >= 3 { "1.1" } else { "0.10" }.to_string();
    match header::inspect(path) {
        Ok(info) => (
            FileFacts {
                format: Some(info.format),
                compat: info.qcow2_version.map(compat),
                virtual_size: Some(info.virtual_size),
                file_size,
                allocated_bytes,
                refused: None,
            },
            Some(info),
        ),
        Err(e) => {
            let basics = header::qcow2_basics(path);
            (
                FileFacts {
                    format: basics.map(|_| Format::Qcow2),
                    compat: basics.map(|(v, _)| compat(v)),
                    virtual_size: basics.map(|(_, size)| size),
                    file_size,
                    allocated_bytes,
                    refused: Some(format!("{e:#}")),
                },
                None,
            )
        }
    }
}

/// One image's system and analysis, read from its disk of the shared appliance.
fn read_guest(
    guest: &Guest,
    disk: Option<&locate::Disk>,
    opts: &Options,
    report: &Reporter,
) -> Result<(System, Analysis)> {
    let root = locate::find_root(guest, opts.root.as_deref(), disk)?;
    let device = disk.map_or("/dev/sda", |d| d.device.as_str());
    let partition_table = guest.partition_table(device)?.map(|t| t.kind.to_string());
    for note in locate::mount_root(guest, &root, true, disk)? {
        report.warn(&note);
    }
    analyse_guest(guest, root, disk, opts, report)
        .map(|(system, analysis)| (System { partition_table, ..system }, analysis))
        .map_err(with_code(BAD_GUEST))
}

fn analyse_guest(
    guest: &Guest,
    root: Root,
    disk: Option<&locate::Disk>,
    opts: &Options,
    report: &Reporter,
) -> Result<(System, Analysis)> {
    let mounted = locate::Mounted { root: &root, readonly: true, disk };
    let sources = config::read_login_sources(guest, &mounted, opts.cloud_init_version, report)?;
    let (files, detection, exposed) = match sources.cloud_init {
        Some(CloudInit { detection, .. }) if detection.chosen().is_none() => {
            return Err(config::version_unknown(&detection))
        }
        Some(CloudInit { files, detection }) => {
            let exposed: Vec<Finding> = files
                .iter()
                .filter(|f| secrets::holds_secret(&f.parsed.root))
                .filter_map(|f| checks::readable_password_finding(&f.path, f.mode?))
                .collect();
            (files.into_iter().map(|f| f.parsed).collect::<Vec<ConfigFile>>(), Some(detection), exposed)
        }
        None => (Vec::new(), None, Vec::new()),
    };
    // Read, never shown: only each user's state is reported.
    let shadow_text = config::read_text(guest, shadow::SHADOW)?;
    let mut analysis = audit::analyse(&audit::Image {
        files: &files,
        version: detection.as_ref().and_then(|d| d.chosen().cloned()),
        version_disagreements: detection.map(|d| d.disagreements()).unwrap_or_default(),
        sshd: sources.sshd.as_ref(),
        shadow: shadow_text.as_deref(),
        booted_before: sources.booted_before,
        user: opts.user.as_deref(),
    });
    analysis.findings.extend(exposed);
    let system = System {
        lvm_root: !root.device.starts_with("/dev/sd") && !root.device.starts_with("/dev/vd"),
        root,
        partition_table: None,
        os_id: os_release::field(&sources.os_release, "ID"),
        os_version: os_release::field(&sources.os_release, "VERSION_ID"),
    };
    Ok((system, analysis))
}

fn unmet(r: &ImageReport, required: &[Requirement]) -> Vec<String> {
    let not_read = || r.error.clone().or(r.file.refused.clone()).unwrap_or_else(|| "the guest was not read".into());
    required
        .iter()
        .filter_map(|req| {
            let reason = match req {
                Requirement::Standalone => r.file.refused.clone(),
                Requirement::PasswordLogin => match &r.password_login {
                    Some(login) if login.works => None,
                    Some(login) => Some(login.reasons.join("; ")),
                    None => Some(not_read()),
                },
                Requirement::NoPlaintext => match &r.analysis {
                    Some(a) => {
                        let plain: Vec<String> = a
                            .cloud_init
                            .iter()
                            .flat_map(|c| c.passwords.iter())
                            .filter(|p| p.kind == "text")
                            .map(|p| format!("{} `{}` for {}", p.file, p.key, p.user))
                            .collect();
                        (!plain.is_empty()).then(|| format!("plaintext passwords: {}", plain.join(", ")))
                    }
                    None => Some(not_read()),
                },
                Requirement::NotBooted => match &r.analysis {
                    Some(a) if a.booted_before => {
                        Some("the image holds cloud-init instance state (/var/lib/cloud)".into())
                    }
                    Some(_) => None,
                    None => Some(not_read()),
                },
            };
            reason.map(|why| format!("{}: {why}", req.name()))
        })
        .collect()
}

/// The human report for one image: a labelled line per fact, then the findings.
pub fn render(r: &ImageReport) -> String {
    let mut lines = vec![("file", file_summary(&r.file))];
    if let Some(s) = &r.system {
        lines.push(("system", system_summary(s)));
    }
    if let Some(a) = &r.analysis {
        analysis_lines(a, &mut lines);
    }
    if let Some(login) = &r.password_login {
        let who = login.user.as_deref().unwrap_or("?");
        lines.push((
            "login",
            if login.works {
                format!("{who}: a new instance accepts an SSH password login")
            } else {
                format!("{who}: no SSH password login: {}", login.reasons.join("; "))
            },
        ));
    }
    if let Some(e) = &r.error {
        lines.push(("error", e.clone()));
    }
    for finding in &r.findings {
        let label = match finding.severity {
            Severity::Security => "SECURITY",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "note",
        };
        lines.push((label, format!("{} (fix: {})", finding.message, finding.fix)));
    }
    lines.extend(r.unmet.iter().map(|u| ("UNMET", u.clone())));
    let mut out = format!("== {}\n", r.path.display());
    for (label, text) in lines {
        out.push_str(&format!("{label:<10} {text}\n"));
    }
    out
}

fn file_summary(f: &FileFacts) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    format!(
        "{}{}, virtual {}, allocated {}{}",
        f.format.map_or("unknown", |x| x.as_str()),
        f.compat.as_ref().map(|c| format!(" (compat {c})")).unwrap_or_default(),
        f.virtual_size.map_or("unknown".into(), mib),
        mib(f.allocated_bytes),
        if f.refused.is_some() { ", NOT OPENED" } else { ", standalone" }
    )
}

fn system_summary(s: &System) -> String {
    let table = s.partition_table.as_ref().map_or("no partition table".to_string(), |t| format!("{t} partition table"));
    format!(
        "{} on {} ({}{}), {table}",
        s.root.os.as_deref().unwrap_or("unknown OS"),
        s.root.device,
        s.root.fs_type,
        if s.lvm_root { ", LVM" } else { "" },
    )
}

/// What cloud-init, sshd and the shadow file will do, a line per subject.
fn analysis_lines(a: &Analysis, lines: &mut Vec<(&'static str, String)>) {
    match &a.cloud_init {
        Some(ci) => {
            lines.push((
                "cloud-init",
                format!(
                    "{} (from {} {}), default user {}, set_passwords {}",
                    ci.version.version,
                    ci.version.source.describe(),
                    ci.version.path,
                    ci.default_user.as_deref().unwrap_or("none"),
                    if ci.set_passwords_runs { "runs" } else { "NEVER RUNS" }
                ),
            ));
            if ci.passwords.is_empty() {
                lines.push(("passwords", "none".into()));
            }
            for p in &ci.passwords {
                lines.push(("passwords", format!("{}: {} in `{}` of {}", p.user, p.kind, p.key, p.file)));
            }
            lines.push((
                "settings",
                format!(
                    "chpasswd.expire {}, ssh_pwauth {}, disable_root {}",
                    ci.expire,
                    ci.ssh_pwauth.map_or("unset (sshd decides)".into(), |b| b.to_string()),
                    ci.disable_root
                ),
            ));
        }
        None => lines.push(("cloud-init", "not installed".into())),
    }
    lines.push((
        "sshd",
        match &a.sshd {
            Some(s) => format!(
                "once cloud-init has run: PasswordAuthentication {} ({}), PermitRootLogin {} ({})",
                if s.password_authentication.password_authentication { "yes" } else { "no" },
                s.password_authentication.set_by.as_deref().unwrap_or("default"),
                s.permit_root_login.value,
                s.permit_root_login.set_by.as_deref().unwrap_or("default")
            ),
            None => "not installed".into(),
        },
    ));
    let states: Vec<String> = a.shadow.iter().map(|(u, s)| format!("{u}: {}", shadow_state(s))).collect();
    lines.push(("shadow", if states.is_empty() { "no /etc/shadow".into() } else { states.join(", ") }));
    lines.push(("booted", if a.booted_before { "yes (instance state in /var/lib/cloud)".into() } else { "no".into() }));
}

fn shadow_state(s: &shadow::State) -> String {
    match s {
        shadow::State::Missing => "no entry".into(),
        shadow::State::Empty => "EMPTY password".into(),
        shadow::State::NoPassword => "no password".into(),
        shadow::State::Locked => "locked".into(),
        shadow::State::Hash(alg) => format!("{alg} hash"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(exit_code: i32) -> ImageReport {
        let file = FileFacts {
            format: Some(Format::Qcow2),
            compat: Some("1.1".into()),
            virtual_size: Some(1),
            file_size: 1,
            allocated_bytes: 1,
            refused: None,
        };
        ImageReport { exit_code, ..ImageReport::new(Path::new("x.qcow2"), file) }
    }

    #[test]
    fn the_most_serious_status_wins() {
        let codes = |list: &[i32]| exit_code(&list.iter().map(|c| report(*c)).collect::<Vec<_>>());
        assert_eq!(codes(&[SUCCESS, SUCCESS]), SUCCESS);
        assert_eq!(codes(&[BAD_INPUT, SUCCESS]), BAD_INPUT);
        assert_eq!(codes(&[BAD_INPUT, UNMET]), UNMET);
        assert_eq!(codes(&[UNMET, BAD_GUEST]), BAD_GUEST);
        assert_eq!(codes(&[BAD_GUEST, APPLIANCE, UNMET]), APPLIANCE);
    }

    #[test]
    fn requirements_name_their_reason_and_an_unread_guest_fails_them() {
        let mut r = report(SUCCESS);
        r.file.refused = Some("the qcow2 names a backing file `base.img`".into());
        let all =
            [Requirement::Standalone, Requirement::PasswordLogin, Requirement::NoPlaintext, Requirement::NotBooted];
        let unmet = unmet(&r, &all);
        assert_eq!(unmet.len(), 4, "{unmet:?}");
        assert!(unmet[0].starts_with("standalone: the qcow2 names a backing file"));
        assert!(unmet[1].starts_with("password-login: the qcow2 names"));
        assert!(super::unmet(&report(SUCCESS), &[Requirement::Standalone]).is_empty());
    }
}
