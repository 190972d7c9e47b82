//! Everything cloud-init configuration: reading YAML as cloud-init does, editing it, merging files,
//! and working out what cloud-init will do with the result. Pure functions only.
use anyhow::{Context, Result};

use crate::support::exit_codes::{with_code, BAD_GUEST};
use merge::ConfigFile;

pub mod credentials;
pub mod deprecations;
pub mod edit;
pub mod keys;
pub mod lock;
pub mod merge;
pub mod secrets;
pub mod version;
pub mod yaml11;

/// cloud-init's main configuration file.
pub const CLOUD_CFG: &str = "/etc/cloud/cloud.cfg";
/// Its drop-in directory; files in it override `cloud.cfg`.
pub const CLOUD_CFG_D: &str = "/etc/cloud/cloud.cfg.d";
/// The drop-in `--drop-in` writes; `99-` so that it sorts after the usual distribution files.
pub const DROP_IN: &str = "/etc/cloud/cloud.cfg.d/99-cloudimg.cfg";

/// One cloud-init file as text and as parsed.
pub struct CloudFile {
    pub path: String,
    pub text: String,
    pub parsed: ConfigFile,
    /// Its permission bits in the guest (`None` for text that was not read from one).
    pub mode: Option<u32>,
}

/// Parses a cloud-init file read from the guest (or an empty new drop-in).
pub fn parse_file(path: &str, text: String) -> Result<CloudFile> {
    let doc =
        yaml11::parse(&text).with_context(|| format!("reading {path} in the guest")).map_err(with_code(BAD_GUEST))?;
    Ok(CloudFile {
        path: path.to_string(),
        parsed: ConfigFile { path: path.to_string(), root: doc.root },
        text,
        mode: None,
    })
}
