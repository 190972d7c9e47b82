//! The job's two touches of the mounted guest: reading what the decisions need, and applying them.

use anyhow::Result;

use super::decide::{merged, ImageFacts, Write};
use crate::cli::settings::Customize;
use crate::cloud_config::credentials;
use crate::cloud_config::lock;
use crate::guest::config;
use crate::guest::locate::Mounted;
use crate::guest::Guest;
use crate::login::shadow;
use crate::openstack::manifest::GuestFacts;
use crate::support::exit_codes::{with_code, BAD_GUEST};
use crate::support::os_release;
use crate::support::report::Reporter;

pub(super) fn read_image(guest: &Guest, s: &Customize, mounted: &Mounted, report: &Reporter) -> Result<ImageFacts> {
    let sources = config::read_login_sources(guest, mounted, s.cloud_init_version, report)?;
    match &sources.cloud_init {
        Some(c) => match c.detection.chosen() {
            Some(found) => report.detail(&format!("cloud-init {found}; {} configuration files", c.files.len())),
            None => report.detail(&format!("cloud-init of unknown version: {}", c.detection.failure())),
        },
        None => report.detail("no cloud-init in the image"),
    }
    let read = |path: &str| config::read_text(guest, path);
    let mut journal = None;
    let mut journal_files = Vec::new();
    for path in lock::JOURNALS {
        if let Some(text) = read(path)? {
            if journal.is_none() {
                journal = Some(lock::Journal::parse(path, &text)?);
            }
            journal_files.push(path);
        }
    }
    Ok(ImageFacts {
        cloud: sources.cloud_init,
        sshd: sources.sshd,
        booted_before: sources.booted_before,
        passwd_users: config::passwd_users(guest)?,
        // Only the shadow route needs it; a run that cannot read it fails there, not here.
        shadow: read(shadow::SHADOW).ok().flatten(),
        os_release: sources.os_release,
        login_defs: read(shadow::LOGIN_DEFS).ok().flatten(),
        journal,
        journal_files,
    })
}

/// What the image says about itself for Glance; `disk` is its whole-disk device. A guest that cannot
/// be read for them is a bad guest (exit status 4).
pub(super) fn guest_facts(guest: &Guest, image: &ImageFacts, disk: &str) -> Result<GuestFacts> {
    read_guest_facts(guest, image, disk).map_err(with_code(BAD_GUEST))
}

fn read_guest_facts(guest: &Guest, image: &ImageFacts, disk: &str) -> Result<GuestFacts> {
    let table = guest.partition_table(disk)?;
    Ok(GuestFacts {
        os_id: os_release::field(&image.os_release, "ID"),
        os_version: os_release::field(&image.os_release, "VERSION_ID"),
        admin_user: image.cloud.as_ref().and_then(|c| credentials::default_user(&merged(&c.files))),
        guest_agent: guest.exists("/usr/bin/qemu-ga")? || guest.exists("/usr/sbin/qemu-ga")?,
        partition_table: table.as_ref().map(|t| t.kind.to_string()),
        gpt_types: table.map(|t| t.gpt_types).unwrap_or_default(),
        architecture: config::architecture(guest)?,
    })
}

pub(super) fn apply(guest: &Guest, write: &Write) -> Result<()> {
    match (&write.content, write.private) {
        (None, _) => guest.remove_file(&write.path),
        (Some(text), true) => guest.replace_private_file(&write.path, text.as_bytes(), write.like),
        (Some(text), false) => guest.replace_file(&write.path, text.as_bytes(), write.like),
    }
}
