//! Reading what the decisions need out of the mounted guest: cloud-init's files, its version, sshd's
//! configuration and cloud-init's instance state.

use anyhow::{Context, Result};

use crate::cloud_config::merge;
use crate::cloud_config::version::{self, CloudInitVersion, Detection, Source, VersionPy};
use crate::cloud_config::{parse_file, CloudFile, CLOUD_CFG, CLOUD_CFG_D};
use crate::guest::locate::{self, Mounted};
use crate::guest::rpm_database;
use crate::guest::Guest;
use crate::login::sshd;
use crate::support::exit_codes::{with_code, BAD_GUEST};
use crate::support::report::Reporter;

/// cloud-init's files and the version they are read for.
pub struct CloudInit {
    pub files: Vec<CloudFile>,
    /// The version from --cloud-init-version or the image, and every source asked.
    pub detection: Detection,
}

impl CloudInit {
    /// `None` when no source gave it.
    pub fn version(&self) -> Option<CloudInitVersion> {
        self.detection.chosen().map(|found| found.version)
    }
}

/// What decides whether a password login works, as read from the mounted guest: the one reader that
/// `inspect` and `customize` share.
pub struct LoginSources {
    /// `None` when the image has no cloud-init.
    pub cloud_init: Option<CloudInit>,
    pub sshd: Option<sshd::Files>,
    /// cloud-init has run in this image (instance state under /var/lib/cloud).
    pub booted_before: bool,
    pub os_release: String,
}

/// Reads [`LoginSources`]; `given` is `--cloud-init-version`. Warnings about files cloudimg cannot
/// see into go to `report`.
pub fn read_login_sources(
    guest: &Guest,
    mounted: &Mounted,
    given: Option<CloudInitVersion>,
    report: &Reporter,
) -> Result<LoginSources> {
    let read = || -> Result<LoginSources> {
        let cloud_init = if has_cloud_init(guest)? {
            let (files, warnings) = read_cloud_files(guest)?;
            warnings.iter().for_each(|w| report.warn(w));
            let remount = || locate::mount_root(guest, mounted.root, mounted.readonly, mounted.disk).map(drop);
            let detection = cloud_init_version(guest, given, &mounted.root.device, remount)?;
            Some(CloudInit { files, detection })
        } else {
            None
        };
        Ok(LoginSources {
            cloud_init,
            sshd: sshd_files(guest)?,
            booted_before: booted_before(guest)?,
            os_release: os_release(guest)?,
        })
    };
    read().map_err(with_code(BAD_GUEST))
}

/// `cloud.cfg` and the drop-ins cloud-init reads, from lowest to highest priority, plus warnings about
/// drop-ins that cloudimg cannot see into.
pub fn read_cloud_files(guest: &Guest) -> Result<(Vec<CloudFile>, Vec<String>)> {
    let (base, mode) = read_text_with_mode(guest, CLOUD_CFG)?.with_context(|| {
        format!("the image has no {CLOUD_CFG}, so no cloud-init to set the password; cloudimg needs an image with cloud-init")
    })?;
    let base = CloudFile { mode: Some(mode), ..parse_file(CLOUD_CFG, base)? };
    let mut files = vec![base];
    let mut warnings = Vec::new();
    let names: Vec<String> = guest.list_dir(CLOUD_CFG_D)?.into_iter().filter(|n| merge::is_drop_in_name(n)).collect();
    for (path, read) in read_dir_files(guest, CLOUD_CFG_D, &names, "cloud-init reads every *.cfg file there")? {
        let (text, mode) = match read {
            Ok(Some(read)) => read,
            Ok(None) => continue,
            Err(e) => {
                warnings.push(format!("{e:#}; the checks cannot see what it sets"));
                continue;
            }
        };
        match parse_file(&path, text) {
            Ok(file) => files.push(CloudFile { mode: Some(mode), ..file }),
            // cloud-init logs and skips a drop-in it cannot parse.
            Err(e) => warnings.push(format!("{e:#}; cloud-init will ignore this file")),
        }
    }
    Ok((files, warnings))
}

/// At most this many files are read from one configuration directory of the guest, and this many bytes
/// in all. Distributions ship a handful of small files; cloud-init and sshd read every one, so the
/// checks are only right when cloudimg does too: a directory beyond the caps is refused, not read in
/// part.
pub const MAX_DIR_FILES: usize = 256;
pub const MAX_DIR_BYTES: usize = 8 << 20;

/// The files `names` of `dir` with their modes, each read on its own (an unreadable one is its
/// caller's decision); more files than [`MAX_DIR_FILES`] or more bytes than [`MAX_DIR_BYTES`] refuse
/// the guest. `reader` says who reads them all in the guest.
fn read_dir_files(guest: &Guest, dir: &str, names: &[String], reader: &str) -> Result<Vec<(String, Result<TextFile>)>> {
    if names.len() > MAX_DIR_FILES {
        return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
            "{dir} in the guest holds {} files, more than the {MAX_DIR_FILES} cloudimg reads; {reader}, so checking only some would give wrong answers: remove the files that are not needed",
            names.len()
        )));
    }
    let mut bytes = 0;
    let mut out = Vec::new();
    for name in names {
        let path = format!("{dir}/{name}");
        let read = read_text_with_mode(guest, &path);
        bytes += read.as_ref().ok().and_then(|t| t.as_ref()).map_or(0, |(text, _)| text.len());
        if bytes > MAX_DIR_BYTES {
            return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
                "the files in {dir} in the guest add up to more than {MAX_DIR_BYTES} bytes, more than cloudimg reads; {reader}, so checking only some would give wrong answers: remove the files that are not needed"
            )));
        }
        out.push((path, read));
    }
    Ok(out)
}

/// Whether the image has cloud-init's main configuration file (a link counts: reading it will say why
/// it cannot be used).
pub fn has_cloud_init(guest: &Guest) -> Result<bool> {
    Ok(guest.exists(CLOUD_CFG)? || guest.is_symlink(CLOUD_CFG)?)
}

/// A text file of the guest; `None` when it does not exist. One that cannot be read as text makes
/// the guest a bad guest (exit status 4).
pub fn read_text(guest: &Guest, path: &str) -> Result<Option<String>> {
    read_text_with_mode(guest, path).map(|file| file.map(|(text, _)| text)).map_err(with_code(BAD_GUEST))
}

/// A text file of the guest and its permission bits; `None` when it does not exist.
type TextFile = Option<(String, u32)>;

/// [`read_text`], with the file's permission bits.
fn read_text_with_mode(guest: &Guest, path: &str) -> Result<TextFile> {
    let Some((bytes, mode)) = guest.read_config_file_with_mode(path)? else { return Ok(None) };
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{path} in the guest is not UTF-8 text"))?;
    Ok(Some((text, mode)))
}

/// Where Python packages are installed: the distribution's directories (`/usr/lib/python3/dist-packages`,
/// `/usr/lib64/python3.9/site-packages`, Python 2's for 0.7.x) and pip's under `/usr/local`.
const PYTHON_PACKAGE_GLOBS: &[&str] =
    &["/usr/lib*/python*/*-packages/cloud*", "/usr/local/lib*/python*/*-packages/cloud*"];
/// A guest has one cloud-init, perhaps for two Python versions; more entries than this are not read.
const MAX_PYTHON_ENTRIES: usize = 16;
const DPKG_STATUS: &str = "/var/lib/dpkg/status";
/// dpkg's status file is 1–3 MiB on a cloud image, rarely over 10 on a loaded server.
const MAX_DPKG_STATUS: i64 = 64 << 20;
/// Where rpm keeps its database (the second since rpm 4.17's move to /usr).
const RPM_DATABASES: &[&str] = &["/var/lib/rpm", "/usr/lib/sysimage/rpm"];
/// An rpm database is 10–100 MiB; it is copied to a private temporary file, not held in memory.
const MAX_RPM_DATABASE: i64 = 1 << 30;

/// The cloud-init version for the mounted root: `given` (`--cloud-init-version`) first, then every
/// source in the image that can be read from its files (version.py or meson's module, the Python
/// package metadata, dpkg), and, only when none of them answers, rpm's database: `rpmdb.sqlite` read by
/// cloudimg, else older formats through libguestfs's inspection, which unmounts the guest and calls
/// `remount`.
pub fn cloud_init_version(
    guest: &Guest,
    given: Option<CloudInitVersion>,
    root_device: &str,
    remount: impl FnOnce() -> Result<()>,
) -> Result<Detection> {
    let mut detection = Detection::default();
    if let Some(version) = given {
        detection.answer(Source::CommandLine, "the command line", &version.to_string());
    }
    let mut entries = Vec::new();
    for pattern in PYTHON_PACKAGE_GLOBS {
        entries.extend(guest.glob(pattern)?);
    }
    entries.truncate(MAX_PYTHON_ENTRIES);
    read_version_py(guest, &entries, &mut detection)?;
    let metadata: Vec<(&String, String)> = entries
        .iter()
        .filter_map(|path| Some((path, version::python_metadata_version(path.rsplit('/').next()?)?)))
        .collect();
    if metadata.is_empty() {
        detection.miss("cloud_init-*.egg-info or .dist-info (Python package metadata)");
    }
    for (path, raw) in metadata {
        detection.answer(Source::PythonMetadata, path, &raw);
    }
    match guest.read_regular_file(DPKG_STATUS, MAX_DPKG_STATUS) {
        Ok(Some((bytes, _))) => match version::dpkg_version(&String::from_utf8_lossy(&bytes)) {
            Some(raw) => detection.answer(Source::Dpkg, DPKG_STATUS, &raw),
            None => detection.miss(format!("no installed cloud-init package in {DPKG_STATUS}")),
        },
        Ok(None) => detection.miss(format!("{DPKG_STATUS} (no dpkg database)")),
        Err(e) => detection.miss(format!("{e:#}")),
    }
    if detection.chosen().is_none() {
        read_rpm_database(guest, root_device, remount, &mut detection)?;
    }
    Ok(detection)
}

/// `cloudinit/version.py` in each Python package directory, and meson's module where it points there.
fn read_version_py(guest: &Guest, entries: &[String], detection: &mut Detection) -> Result<()> {
    let packages: Vec<&String> = entries.iter().filter(|p| p.ends_with("/cloudinit")).collect();
    if packages.is_empty() {
        detection
            .miss("cloudinit/version.py (no cloudinit package in /usr/lib*/python*/*-packages or /usr/local/lib*)");
    }
    for package in packages {
        let path = format!("{package}/version.py");
        let text = match read_text(guest, &path) {
            Ok(Some(text)) => text,
            Ok(None) => {
                detection.miss(format!("{path} (missing)"));
                continue;
            }
            Err(e) => {
                detection.miss(format!("{e:#}"));
                continue;
            }
        };
        match version::parse_version_py(&text) {
            VersionPy::Literal(raw) => detection.answer(Source::VersionPy, &path, &raw),
            VersionPy::FromMesonModule { packaged } => {
                let meson = format!("{package}/meson_versions.py");
                match read_text(guest, &meson) {
                    Ok(Some(text)) => match version::parse_meson_versions(&text) {
                        Some(raw) => detection.answer(Source::MesonVersions, &meson, &raw),
                        None => detection.miss(format!("{meson} (no UPSTREAM_VERSION in it)")),
                    },
                    Ok(None) => match packaged {
                        Some(raw) => detection.answer(Source::VersionPy, &path, &raw),
                        None => detection.miss(format!("{meson} (version.py imports it, but it is missing)")),
                    },
                    Err(e) => detection.miss(format!("{e:#}")),
                }
            }
            VersionPy::Unknown => detection.miss(format!("{path} (no version in a form cloudimg knows)")),
        }
    }
    Ok(())
}

fn read_rpm_database(
    guest: &Guest,
    root_device: &str,
    remount: impl FnOnce() -> Result<()>,
    detection: &mut Detection,
) -> Result<()> {
    for dir in RPM_DATABASES {
        let path = format!("{dir}/rpmdb.sqlite");
        let mut copy = tempfile::NamedTempFile::new().context("creating a temporary file for the rpm database")?;
        match guest.copy_regular_file(&path, MAX_RPM_DATABASE, copy.as_file_mut()) {
            Ok(None) => continue,
            Ok(Some(_)) => match rpm_database::installed_version(copy.path(), version::PACKAGE_NAMES) {
                Ok(Some(raw)) => detection.answer(Source::Rpm, &path, &raw),
                Ok(None) => detection.miss(format!("cloud-init in {path} (not installed)")),
                Err(e) => detection.miss(format!("{path}: {e:#}")),
            },
            Err(e) => detection.miss(format!("{e:#}")),
        }
        return Ok(());
    }
    let mut has_database = false;
    for dir in RPM_DATABASES {
        has_database |= guest.is_dir(dir)?;
    }
    if !has_database {
        detection.miss(format!("an rpm database ({})", RPM_DATABASES.join(" or ")));
        return Ok(());
    }
    // Older formats (Berkeley DB, ndb) through libguestfs's inspection, which reads them with the
    // host's librpm where that can.
    match guest.inspected_packages(root_device, remount) {
        Ok(packages) => {
            let installed = version::PACKAGE_NAMES
                .iter()
                .find_map(|name| packages.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()));
            match installed {
                Some(raw) => detection.answer(Source::Rpm, "the rpm database", &raw),
                None => detection.miss("cloud-init in the rpm database (not installed)"),
            }
        }
        // The guest is mounted again even when inspection fails; an appliance that died is not a miss.
        Err(e) if crate::support::exit_codes::code_of(&e) == crate::support::exit_codes::APPLIANCE => return Err(e),
        Err(e) => detection.miss(format!("the rpm database: {e:#}")),
    }
    Ok(())
}

/// The error for an image whose cloud-init version no source gave.
pub fn version_unknown(detection: &Detection) -> anyhow::Error {
    with_code(BAD_GUEST)(anyhow::anyhow!(detection.failure()))
}

/// os-release (`/etc/os-release`, else `/usr/lib/os-release`), empty when there is none.
pub fn os_release(guest: &Guest) -> Result<String> {
    for path in ["/etc/os-release", "/usr/lib/os-release"] {
        // /etc/os-release is usually a relative link into /usr/lib, which read_config_file refuses.
        if guest.is_symlink(path)? {
            continue;
        }
        if let Some(text) = read_text(guest, path)? {
            return Ok(text);
        }
    }
    Ok(String::new())
}

/// sshd's main file and its drop-in directory; `None` without `/etc/ssh/sshd_config`. Files whose
/// Includes sshd itself would refuse, or that are an Include bomb, refuse the guest.
pub fn sshd_files(guest: &Guest) -> Result<Option<sshd::Files>> {
    let Some(main) = read_text(guest, sshd::MAIN_CONFIG)? else { return Ok(None) };
    let mut files = sshd::Files::new();
    files.insert(sshd::MAIN_CONFIG.to_string(), main);
    let names = guest.list_dir(sshd::DROP_IN_DIR)?;
    for (path, read) in read_dir_files(guest, sshd::DROP_IN_DIR, &names, "sshd reads every file its Includes name")? {
        if let Some((text, _)) = read? {
            files.insert(path, text);
        }
    }
    if let Some(problem) = sshd::include_problem(&files) {
        return Err(with_code(BAD_GUEST)(anyhow::anyhow!("sshd's configuration in the guest: {problem}")));
    }
    Ok(Some(files))
}

const CLOUD_STATE_DIR: &str = "/var/lib/cloud";

/// Whether cloud-init has run in this image (it leaves per-instance state behind).
pub fn booted_before(guest: &Guest) -> Result<bool> {
    Ok(!guest.list_dir(&format!("{CLOUD_STATE_DIR}/instances"))?.is_empty()
        || guest.exists(&format!("{CLOUD_STATE_DIR}/instance"))?)
}

/// Removes cloud-init's state as `cloud-init clean` does: everything in /var/lib/cloud but `seed`.
pub fn clean_instance_state(guest: &Guest) -> Result<()> {
    for name in guest.list_dir(CLOUD_STATE_DIR)?.into_iter().filter(|n| n != "seed") {
        guest.remove_tree(&format!("{CLOUD_STATE_DIR}/{name}"))?;
    }
    Ok(())
}

/// Users with an entry in the guest's /etc/passwd.
pub fn passwd_users(guest: &Guest) -> Result<Vec<String>> {
    let text = read_text(guest, "/etc/passwd")?.unwrap_or_default();
    Ok(text.lines().filter_map(|l| l.split(':').next()).filter(|n| !n.is_empty()).map(str::to_string).collect())
}

/// Programs every Linux image has, in the order they are tried: the shell, then the dynamic loader.
const ELF_PROBES: &[&str] = &["/bin/sh", "/usr/bin/sh", "/lib*/ld-linux*.so.*", "/lib/ld-musl-*.so.1"];
/// A glob above matches one loader per architecture a guest supports; a few are enough.
const MAX_LOADERS: usize = 4;

/// The architecture the guest's programs are built for, from the ELF header of its shell or of its
/// dynamic loader; `None` when none of them can be read (a link loop, a missing file).
pub fn architecture(guest: &Guest) -> Result<Option<&'static str>> {
    for pattern in ELF_PROBES {
        let paths = if pattern.contains('*') { guest.glob(pattern)? } else { vec![pattern.to_string()] };
        for path in paths.iter().take(MAX_LOADERS) {
            let header = guest.read_head(path, 64).unwrap_or_default();
            if let Some(architecture) = header.as_deref().and_then(crate::openstack::manifest::elf_architecture) {
                return Ok(Some(architecture));
            }
        }
    }
    Ok(None)
}
