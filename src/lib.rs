//! cloudimg: prepare cloud images offline for OpenStack.
//!
//! The folders follow a customize run: `cli` (arguments, settings) → `image` (the input's header
//! checked, the overlay the edits go to) → `appliance` (what libguestfs starts with: accelerator, a
//! cache this user controls) → `guest` (the launch, the image's root found, its files read) →
//! `cloud_config` and `login` (pure decisions: what to write, and whether the login will work) →
//! `image` again (the output written) → `openstack` (the hand-off to Glance). `customize`,
//! `inspect`, `doctor` and `verify` are the commands; `support` holds what every step uses (exit
//! codes, reporting, cleanup).
pub mod appliance;
pub mod cli;
pub mod cloud_config;
pub mod customize;
pub mod doctor;
pub mod guest;
pub mod image;
pub mod inspect;
pub mod login;
pub mod openstack;
pub mod support;
pub mod verify;
