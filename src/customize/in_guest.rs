//! The job's two touches of the mounted guest: reading what the decisions need, and applying them.

use anyhow::Result;

use super::decide::{merged, CloudFacts, ImageFacts, Write};
use crate::cli::settings::Customize;
use crate::cloud_config::credentials;
use crate::cloud_config::lock;
use crate::guest::config;
use crate::guest::locate::{self, Root};
use crate::guest::Guest;
use crate::login::shadow;
use crate::openstack::manifest::GuestFacts;
use crate::support::exit_codes::{with_code, BAD_GUEST};
use crate::support::os_release;
use crate::support::report::Reporter;

/// The root as it is mounted, so that it can be mounted again the same way.
pub(super) struct Mounted<'a> {
    pub(super) root: &'a Root,
    pub(super) readonly: bool,
    pub(super) disk: Option<&'a locate::Disk>,
}

pub(super) fn read_image(guest: &Guest, s: &Customize, mounted: &Mounted, report: &Reporter) -> Result<ImageFacts> {
    let cloud = if config::has_cloud_init(guest).map_err(with_code(BAD_GUEST))? {
        let (files, read_warnings) = config::read_cloud_files(guest).map_err(with_code(BAD_GUEST))?;
        read_warnings.iter().for_each(|w| report.warn(w));
        let remount = || locate::mount_root(guest, mounted.root, mounted.readonly, mounted.disk).map(drop);
        let detection = config::cloud_init_version(guest, s.cloud_init_version, &mounted.root.device, remount)
            .map_err(with_code(BAD_GUEST))?;
        match detection.chosen() {
            Some(found) => report.detail(&format!("cloud-init {found}; {} configuration files", files.len())),
            None => report.detail(&format!("cloud-init of unknown version: {}", detection.failure())),
        }
        Some(CloudFacts { files, detection })
    } else {
        report.detail("no cloud-init in the image");
        None
    };
    let read = |path: &str| config::read_text(guest, path).map_err(with_code(BAD_GUEST));
    let mut journal = None;
    let mut journal_files = Vec::new();
    for path in lock::JOURNALS {
        if let Some(text) = read(path)? {
            if journal.is_none() {
                journal = Some(lock::Journal::parse(path, &text).map_err(with_code(BAD_GUEST))?);
            }
            journal_files.push(path);
        }
    }
    Ok(ImageFacts {
        cloud,
        sshd: config::sshd_files(guest).map_err(with_code(BAD_GUEST))?,
        booted_before: config::booted_before(guest).map_err(with_code(BAD_GUEST))?,
        passwd_users: config::passwd_users(guest).map_err(with_code(BAD_GUEST))?,
        // Only the shadow route needs it; a run that cannot read it fails there, not here.
        shadow: read(shadow::SHADOW).ok().flatten(),
        os_release: config::os_release(guest).map_err(with_code(BAD_GUEST))?,
        login_defs: read(shadow::LOGIN_DEFS).ok().flatten(),
        journal,
        journal_files,
    })
}

/// What the image says about itself for Glance; `disk` is its whole-disk device.
pub(super) fn guest_facts(guest: &Guest, image: &ImageFacts, disk: &str) -> Result<GuestFacts> {
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
