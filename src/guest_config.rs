//! Reading what the decisions need out of the mounted guest: cloud-init's files, its version, sshd's
//! configuration and cloud-init's instance state.

use anyhow::{Context, Result};

use crate::cloud_config::credentials::{self, CloudInitVersion};
use crate::cloud_config::merge::{self, ConfigFile};
use crate::cloud_config::{yaml11, CLOUD_CFG, CLOUD_CFG_D};
use crate::exit_codes::{with_code, BAD_GUEST};
use crate::guest::Guest;
use crate::sshd;

/// One cloud-init file as text and as parsed.
pub struct CloudFile {
    pub path: String,
    pub text: String,
    pub parsed: ConfigFile,
}

/// `cloud.cfg` and the drop-ins cloud-init reads, from lowest to highest priority, plus warnings about
/// drop-ins that cloudimg cannot see into.
pub fn read_cloud_files(guest: &Guest) -> Result<(Vec<CloudFile>, Vec<String>)> {
    let base = read_text(guest, CLOUD_CFG)?.with_context(|| {
        format!("the image has no {CLOUD_CFG}, so no cloud-init to set the password; cloudimg needs an image with cloud-init")
    })?;
    let base = parse_file(CLOUD_CFG, base)?;
    let mut files = vec![base];
    let mut warnings = Vec::new();
    for name in guest.list_dir(CLOUD_CFG_D)?.into_iter().filter(|n| merge::is_drop_in_name(n)) {
        let path = format!("{CLOUD_CFG_D}/{name}");
        let text = match read_text(guest, &path) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(e) => {
                warnings.push(format!("{e:#}; the checks cannot see what it sets"));
                continue;
            }
        };
        match parse_file(&path, text) {
            Ok(file) => files.push(file),
            // cloud-init logs and skips a drop-in it cannot parse.
            Err(e) => warnings.push(format!("{e:#}; cloud-init will ignore this file")),
        }
    }
    Ok((files, warnings))
}

/// Whether the image has cloud-init's main configuration file (a link counts: reading it will say why
/// it cannot be used).
pub fn has_cloud_init(guest: &Guest) -> Result<bool> {
    Ok(guest.exists(CLOUD_CFG)? || guest.is_symlink(CLOUD_CFG)?)
}

/// A text file of the guest; `None` when it does not exist.
pub fn read_text(guest: &Guest, path: &str) -> Result<Option<String>> {
    let Some(bytes) = guest.read_config_file(path)? else { return Ok(None) };
    String::from_utf8(bytes).map(Some).map_err(|_| anyhow::anyhow!("{path} in the guest is not UTF-8 text"))
}

/// Parses a cloud-init file read from the guest (or an empty new drop-in).
pub fn parse_file(path: &str, text: String) -> Result<CloudFile> {
    let doc =
        yaml11::parse(&text).with_context(|| format!("reading {path} in the guest")).map_err(with_code(BAD_GUEST))?;
    Ok(CloudFile { path: path.to_string(), parsed: ConfigFile { path: path.to_string(), root: doc.root }, text })
}

/// Where cloud-init's `version.py` lives across distributions and Python versions.
const VERSION_PY_GLOBS: &[&str] = &[
    "/usr/lib/python3*/*-packages/cloudinit/version.py",
    "/usr/lib/python3/dist-packages/cloudinit/version.py",
    "/usr/lib64/python3*/site-packages/cloudinit/version.py",
    "/usr/lib/python2*/*-packages/cloudinit/version.py",
];

/// The cloud-init version installed in the guest.
pub fn cloud_init_version(guest: &Guest) -> Result<CloudInitVersion> {
    for pattern in VERSION_PY_GLOBS {
        for path in guest.glob(pattern)? {
            if let Some(text) = guest.read_config_file(&path)? {
                if let Some(version) = credentials::version_from_version_py(&String::from_utf8_lossy(&text)) {
                    return Ok(version);
                }
            }
        }
    }
    Err(version_unknown())
}

pub fn version_unknown() -> anyhow::Error {
    with_code(BAD_GUEST)(anyhow::anyhow!(
        "cannot find cloud-init's version in the image (no cloudinit/version.py); name it with --cloud-init-version"
    ))
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

/// sshd's main file and its drop-in directory; `None` without `/etc/ssh/sshd_config`.
pub fn sshd_files(guest: &Guest) -> Result<Option<sshd::Files>> {
    let Some(main) = read_text(guest, sshd::MAIN_CONFIG)? else { return Ok(None) };
    let mut files = sshd::Files::new();
    files.insert(sshd::MAIN_CONFIG.to_string(), main);
    for name in guest.list_dir(sshd::DROP_IN_DIR)? {
        let path = format!("{}/{name}", sshd::DROP_IN_DIR);
        if let Some(text) = read_text(guest, &path)? {
            files.insert(path, text);
        }
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
