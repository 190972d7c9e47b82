//! What verification reads from the image through the appliance: before the boot, the boot path,
//! the default user and, for an image without a bootloader, its kernel, initrd and fstab root;
//! after a failed boot, the ends of cloud-init's and sshd's logs from the instance's overlay.

use std::cmp::Ordering;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::boot::{self, DirectKernel};
use super::verdict::{tail, BootPath};
use crate::appliance::fast_boot;
use crate::cloud_config::{credentials, merge};
use crate::guest::Guest;
use crate::guest::{config, locate};

/// A kernel or initrd larger than this is not one (a hostile image could name a huge file).
const MAX_BOOT_FILE: i64 = 512 << 20;
const MAX_LOG: i64 = 64 << 20;

/// What the boot needs to know.
pub struct Before {
    pub path: BootPath,
    pub default_user: Option<String>,
    pub direct: Option<DirectKernel>,
    /// The instance the image was last booted as, when it was booted and the id is a plain one.
    pub instance_id: Option<String>,
}

/// Reads the boot path and the default user, and copies the kernel and initrd into `dir` when the
/// disk has no bootloader; `decompress`: store the kernel decompressed, for its PVH entry (TCG).
pub fn read_before(guest: &Guest, dir: &Path, decompress: bool) -> Result<Before> {
    let table = guest.partition_table("/dev/sda")?;
    let path = boot::choose(table.as_ref());
    let root = locate::find_root(guest, None, None)?;
    locate::mount_root(guest, &root, true, None)?;
    let default_user = if config::has_cloud_init(guest)? {
        let (files, _) = config::read_cloud_files(guest)?;
        let parsed: Vec<_> = files.into_iter().map(|f| f.parsed).collect();
        credentials::default_user(&merge::effective(&parsed))
    } else {
        None
    };
    let direct = match path {
        BootPath::DirectKernel => Some(direct_kernel(guest, dir, decompress)?),
        _ => None,
    };
    let instance_id = config::read_text(guest, INSTANCE_ID)?.and_then(|t| plain_instance_id(&t));
    Ok(Before { path, default_user, direct, instance_id })
}

const INSTANCE_ID: &str = "/var/lib/cloud/data/instance-id";

/// The id in cloud-init's instance-id file, when it is one that can go into the seed's YAML as it is
/// (the guest wrote it; a newline or a colon in it must not become another key).
fn plain_instance_id(text: &str) -> Option<String> {
    let id = text.trim();
    let plain = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    (!id.is_empty() && id.len() <= 128 && id.chars().all(plain)).then(|| id.to_string())
}

fn direct_kernel(guest: &Guest, dir: &Path, decompress: bool) -> Result<DirectKernel> {
    let fstab = config::read_text(guest, "/etc/fstab")?.unwrap_or_default();
    let root = locate::fstab_entries(&fstab)
        .into_iter()
        .find(|e| e.mountpoint == "/")
        .map(|e| e.spec)
        .context("the image has no bootloader and its /etc/fstab names no root filesystem to boot")?;
    let kernels = guest.glob("/boot/vmlinuz-*")?;
    let Some(kernel) = newest_kernel(&kernels) else {
        bail!("the image has no bootloader and no kernel in /boot (vmlinuz-*) to boot directly");
    };
    let version = kernel.trim_start_matches("/boot/vmlinuz-").to_string();
    let bzimage = dir.join("vmlinuz");
    copy_out(guest, &kernel, &bzimage)?;
    let kernel_path = if decompress { pvh_kernel(&bzimage, &dir.join("vmlinux")).unwrap_or(bzimage) } else { bzimage };
    let initrd = dir.join("initrd.img");
    let mut found = None;
    for candidate in [format!("/boot/initrd.img-{version}"), format!("/boot/initramfs-{version}.img")] {
        if guest.exists(&candidate)? {
            copy_out(guest, &candidate, &initrd)?;
            found = Some(initrd);
            break;
        }
    }
    Ok(DirectKernel { kernel: kernel_path, initrd: found, root })
}

/// The kernel with the highest version, comparing the digit runs of their names as numbers.
pub fn newest_kernel(paths: &[String]) -> Option<String> {
    paths.iter().filter(|p| !p.ends_with(".old")).max_by(|a, b| version_order(a, b)).cloned()
}

fn version_order(a: &str, b: &str) -> Ordering {
    let chunks = |s: &str| {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            match out.last_mut() {
                Some((digits, run)) if *digits == c.is_ascii_digit() => run.push(c),
                _ => out.push((c.is_ascii_digit(), c.to_string())),
            }
        }
        out
    };
    for (x, y) in chunks(a).iter().zip(chunks(b).iter()) {
        let order = match (x, y) {
            ((true, m), (true, n)) => {
                let (m, n) = (m.trim_start_matches('0'), n.trim_start_matches('0'));
                m.len().cmp(&n.len()).then_with(|| m.cmp(n))
            }
            ((_, m), (_, n)) => m.cmp(n),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

fn copy_out(guest: &Guest, path: &str, dest: &Path) -> Result<()> {
    let mut file = File::create_new(dest).with_context(|| format!("creating {}", dest.display()))?;
    guest
        .copy_regular_file(path, MAX_BOOT_FILE, &mut file)?
        .with_context(|| format!("{path} disappeared from the image"))?;
    Ok(())
}

/// Under TCG the kernel spends seconds decompressing itself; qemu starts the decompressed ELF
/// directly through its PVH entry, as cloudimg does for its appliance. `None`: keep the bzImage.
fn pvh_kernel(bzimage: &Path, dest: &Path) -> Option<std::path::PathBuf> {
    let image = std::fs::read(bzimage).ok()?;
    let (compression, payload) = fast_boot::kernel_payload(&image).ok()?;
    let mut out = File::create_new(dest).ok()?;
    fast_boot::decompress(compression, payload, &mut out).ok()?;
    let pvh = fast_boot::has_pvh_entry(File::open(dest).ok()?).ok()?;
    if pvh {
        Some(dest.to_path_buf())
    } else {
        let _ = std::fs::remove_file(dest);
        None
    }
}

/// The ends of cloud-init's log and of sshd's lines in the system log (or, on images that log to the
/// journal only, in the persistent journal), from the booted overlay.
pub fn read_logs(guest: &Guest) -> Result<(Vec<String>, Vec<String>)> {
    let root = locate::find_root(guest, None, None)?;
    locate::mount_root(guest, &root, true, None)?;
    let text = |path: &str| -> Result<Option<String>> {
        Ok(guest.read_regular_file(path, MAX_LOG)?.map(|(b, _)| String::from_utf8_lossy(&b).into_owned()))
    };
    let cloud_init = text("/var/log/cloud-init.log")?.map_or_else(
        || vec!["(no /var/log/cloud-init.log in the instance: cloud-init did not run)".to_string()],
        |t| tail(&t, 40),
    );
    for path in ["/var/log/auth.log", "/var/log/secure"] {
        if let Some(log) = text(path)? {
            let lines: Vec<&str> = log.lines().filter(|l| l.contains("sshd")).collect();
            return Ok((cloud_init, tail(&lines.join("\n"), SSHD_LINES)));
        }
    }
    // OpenSSH 9.8 and later log sessions as `sshd-session`.
    let sshd = match guest.journal_lines("/var/log/journal", &["sshd", "sshd-session"], SSHD_LINES) {
        Ok(Some(lines)) if !lines.trim().is_empty() => tail(&lines, SSHD_LINES),
        Ok(_) => {
            vec!["(no sshd lines: no /var/log/auth.log or /var/log/secure, and none in a persistent journal)".into()]
        }
        Err(e) => vec![format!("(no /var/log/auth.log or /var/log/secure, and the journal could not be read: {e:#})")],
    };
    Ok((cloud_init, sshd))
}

const SSHD_LINES: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_kernel_is_booted() {
        let names = |v: &[&str]| v.iter().map(|s| format!("/boot/vmlinuz-{s}")).collect::<Vec<_>>();
        let table = [
            (names(&["6.1.0-9-amd64", "6.1.0-28-amd64"]), "6.1.0-28-amd64"),
            (names(&["6.12.9-amd64", "6.1.0-28-amd64"]), "6.12.9-amd64"),
            (names(&["5.10.0-30-cloud-amd64"]), "5.10.0-30-cloud-amd64"),
            (names(&["6.2.0-1-amd64", "6.10.0-1-amd64.old"]), "6.2.0-1-amd64"),
        ];
        for (paths, newest) in table {
            assert_eq!(newest_kernel(&paths), Some(format!("/boot/vmlinuz-{newest}")), "{paths:?}");
        }
        assert_eq!(newest_kernel(&[]), None);
    }

    #[test]
    fn only_plain_instance_ids_are_reused() {
        assert_eq!(plain_instance_id("iid-cloudimg-bookworm-42\n").as_deref(), Some("iid-cloudimg-bookworm-42"));
        assert_eq!(plain_instance_id("i-0abc.def_1").as_deref(), Some("i-0abc.def_1"));
        for hostile in ["", "a\nlocal-hostname: x", "a: b", "a b", &"x".repeat(200)] {
            assert_eq!(plain_instance_id(hostile), None, "{hostile:?}");
        }
    }
}
