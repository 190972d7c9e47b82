//! cloudimg: prepare cloud images offline for OpenStack.
pub mod cloud_config;
