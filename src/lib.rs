//! cloudimg: prepare cloud images offline for OpenStack.
pub mod accel;
pub mod checks;
pub mod cleanup;
pub mod cli;
pub mod cloud_config;
pub mod customize;
pub mod exit_codes;
pub mod guest;
pub mod guest_config;
pub mod image_file;
pub mod locate;
pub mod output;
pub mod password;
pub mod plan;
pub mod report;
pub mod settings;
pub mod sshd;
