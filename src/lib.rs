//! cloudimg: prepare cloud images offline for OpenStack.
pub mod cloud_config;
pub mod image_file;
pub mod password;
pub mod sshd;
