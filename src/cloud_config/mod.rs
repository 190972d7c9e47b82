//! Everything cloud-init configuration: reading YAML as cloud-init does, editing it, merging files,
//! and working out what cloud-init will do with the result. Pure functions only.
pub mod credentials;
pub mod edit;
pub mod merge;
pub mod yaml11;
