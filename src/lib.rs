//! cloudimg: prepare cloud images offline for OpenStack.
pub mod accel;
pub mod checks;
pub mod cleanup;
pub mod cloud_config;
pub mod guest;
pub mod image_file;
pub mod locate;
pub mod output;
pub mod password;
pub mod sshd;
