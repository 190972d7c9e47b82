//! Everything cloud-init configuration: reading YAML as cloud-init does, editing it, merging files,
//! and working out what cloud-init will do with the result. Pure functions only.
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
