//! Finding the root filesystem without libguestfs inspection (which costs ~10 s under TCG): mount
//! each Linux filesystem read-only and keep those that hold an operating system's `/etc`. `/usr` and
//! `/var`, when `/etc/fstab` puts them on filesystems of their own, are mounted too, since cloud-init's
//! code and its instance state live there.

use anyhow::{bail, Context, Result};

use crate::guest::Guest;
use crate::support::exit_codes::{with_code, BAD_GUEST};
use crate::support::os_release;

/// Filesystem types a Linux root can have.
const ROOT_TYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs"];

/// An operating system root found in the image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Root {
    pub device: String,
    pub fs_type: String,
    /// `PRETTY_NAME` from os-release, when there is one.
    pub os: Option<String>,
}

/// One attached image's disk and the filesystems on it, when several images share the appliance.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    pub device: String,
    /// `(device, type)`, partitions and the LVM volumes whose physical volumes are on this disk.
    pub filesystems: Vec<(String, String)>,
}

/// Finds the root: the only one, or the one named with `--root`; with `disk`, among its filesystems.
/// A guest without a usable root is a bad guest (exit status 4).
pub fn find_root(guest: &Guest, named: Option<&str>, disk: Option<&Disk>) -> Result<Root> {
    search_root(guest, named, disk).map_err(with_code(BAD_GUEST))
}

fn search_root(guest: &Guest, named: Option<&str>, disk: Option<&Disk>) -> Result<Root> {
    if let Some(disk) = disk {
        return choose_root(roots_among(guest, disk.filesystems.clone())?, named);
    }
    if let Some(named) = named {
        // Look at the named filesystem alone first; scan the others only to list them when it is not
        // a root.
        // Listing filesystems probes every one of them, which takes seconds each under TCG.
        if let Ok(fs_type) = guest.vfs_type(named) {
            if let [root] = &roots_among(guest, vec![(named.to_string(), fs_type)])?[..] {
                return Ok(root.clone());
            }
        }
    }
    choose_root(roots_among(guest, guest.probe_filesystems()?)?, named)
}

/// The filesystems among `candidates` (device, type) that hold an operating system root.
fn roots_among(guest: &Guest, candidates: Vec<(String, String)>) -> Result<Vec<Root>> {
    let mut roots = Vec::new();
    for (device, fs_type) in candidates {
        if !ROOT_TYPES.contains(&fs_type.as_str()) {
            continue;
        }
        // A filesystem that will not mount (damaged, or a btrfs volume whose root is a subvolume
        // listed separately) is simply not a root.
        if guest.mount(&device, &fs_type, "/", true).is_err() {
            continue;
        }
        let found = looks_like_root(guest).map(|is_root| is_root.then(|| os_name(guest)));
        guest.umount_all()?;
        if let Some(os) = found? {
            roots.push(Root { device, fs_type, os });
        }
    }
    Ok(roots)
}

fn looks_like_root(guest: &Guest) -> Result<bool> {
    Ok(guest.is_dir("/etc")?
        && (guest.exists("/etc/os-release")? || guest.exists("/etc/fstab")? || guest.is_symlink("/etc/os-release")?))
}

fn os_name(guest: &Guest) -> Option<String> {
    let text =
        ["/etc/os-release", "/usr/lib/os-release"].iter().find_map(|p| guest.read_config_file(p).ok().flatten())?;
    os_release::field(&String::from_utf8_lossy(&text), "PRETTY_NAME")
}

/// The root as it is mounted, so that it can be mounted again the same way.
pub struct Mounted<'a> {
    pub root: &'a Root,
    pub readonly: bool,
    pub disk: Option<&'a Disk>,
}

/// Picks the root: the only one, or the one the user named with `--root`.
fn choose_root(roots: Vec<Root>, named: Option<&str>) -> Result<Root> {
    let listing = || {
        roots
            .iter()
            .map(|r| {
                format!("{} ({}{})", r.device, r.fs_type, r.os.as_ref().map(|o| format!(", {o}")).unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(named) = named {
        return roots.iter().find(|r| r.device == named).cloned().with_context(|| {
            format!(
                "--root {named} is not an operating system root in this image; roots found: {}",
                if roots.is_empty() { "none".into() } else { listing() }
            )
        });
    }
    match roots.len() {
        0 => bail!("no operating system found in the image (no Linux filesystem holds /etc)"),
        1 => Ok(roots.into_iter().next().expect("one root")),
        _ => bail!("the image holds several operating systems: {}; name one with --root DEVICE", listing()),
    }
}

/// Mounts the chosen root at `/`, then `/usr` and `/var` when fstab puts them elsewhere (on `disk`,
/// when several images share the appliance). A spec that cannot be resolved leaves its mountpoint
/// unmounted, with a note; one that names a filesystem outside `disk` is an error (exit status 4).
pub fn mount_root(guest: &Guest, root: &Root, readonly: bool, disk: Option<&Disk>) -> Result<Vec<String>> {
    mount_with_fstab(guest, root, readonly, disk).map_err(with_code(BAD_GUEST))
}

fn mount_with_fstab(guest: &Guest, root: &Root, readonly: bool, disk: Option<&Disk>) -> Result<Vec<String>> {
    guest.mount(&root.device, &root.fs_type, "/", readonly)?;
    let mut notes = Vec::new();
    let Some(fstab) = guest.read_config_file("/etc/fstab")? else {
        return Ok(notes);
    };
    for entry in fstab_entries(&String::from_utf8_lossy(&fstab)) {
        if !matches!(entry.mountpoint.as_str(), "/usr" | "/var") {
            continue;
        }
        let device = match resolve_spec(guest, &entry.spec, disk) {
            Ok(d) => d,
            Err(e) if e.is::<NotOnDisk>() => {
                return Err(e.context(format!("/etc/fstab mounts {} from {}", entry.mountpoint, entry.spec)))
            }
            Err(e) => {
                notes.push(format!("could not mount {} from /etc/fstab ({}): {e:#}", entry.mountpoint, entry.spec));
                continue;
            }
        };
        let fs_type = guest.vfs_type(&device)?;
        guest.mount(&device, &fs_type, &entry.mountpoint, readonly)?;
    }
    Ok(notes)
}

/// What an fstab spec names, before anything is looked up.
#[derive(Debug, PartialEq)]
enum Spec {
    Uuid(String),
    Label(String),
    /// A device path: `/dev/VG/LV` (from `/dev/mapper/VG-LV` too), `/dev/md/NAME`.
    Device(String),
}

fn parse_spec(spec: &str) -> Option<Spec> {
    if let Some(uuid) = spec.strip_prefix("UUID=") {
        Some(Spec::Uuid(uuid.trim_matches('"').to_string()))
    } else if let Some(label) = spec.strip_prefix("LABEL=") {
        Some(Spec::Label(label.trim_matches('"').to_string()))
    } else if let Some(uuid) = spec.strip_prefix("/dev/disk/by-uuid/") {
        Some(Spec::Uuid(udev_unescape(uuid)))
    } else if let Some(label) = spec.strip_prefix("/dev/disk/by-label/") {
        Some(Spec::Label(udev_unescape(label)))
    } else if let Some(name) = spec.strip_prefix("/dev/mapper/") {
        lvm_path_from_mapper(name).map(Spec::Device)
    } else if spec.starts_with("/dev/") && !spec.starts_with("/dev/disk/") && spec.matches('/').count() == 3 {
        Some(Spec::Device(spec.to_string()))
    } else {
        None
    }
}

/// udev writes unsafe characters of `/dev/disk/by-label` names as `\xNN`.
fn udev_unescape(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x'))
            .then(|| name.get(i + 2..i + 4).and_then(|hex| u8::from_str_radix(hex, 16).ok()))
            .flatten();
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An fstab spec that names a filesystem outside the image's own disk, when several images share the
/// appliance: another image's volume group or array, which must not be mounted (written, trimmed) as
/// part of this one.
#[derive(Debug)]
struct NotOnDisk(String);

impl std::fmt::Display for NotOnDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotOnDisk {}

fn resolve_spec(guest: &Guest, spec: &str, disk: Option<&Disk>) -> Result<String> {
    let parsed = parse_spec(spec).with_context(|| format!("cloudimg cannot resolve `{spec}` inside the appliance"))?;
    let Some(disk) = disk else {
        return match parsed {
            Spec::Uuid(uuid) => guest.findfs_uuid(&uuid),
            Spec::Label(label) => guest.findfs_label(&label),
            Spec::Device(device) => Ok(device),
        };
    };
    // With several images attached, a UUID or label can be on a copy: look on this disk only.
    let on_disk = |read: &dyn Fn(&str) -> Result<String>, wanted: &str| -> Result<String> {
        disk.filesystems
            .iter()
            .find(|(device, _)| read(device).is_ok_and(|v| v == wanted))
            .map(|(device, _)| device.clone())
            .with_context(|| format!("no filesystem on {} has {spec}", disk.device))
    };
    match parsed {
        Spec::Uuid(uuid) => on_disk(&|d| guest.vfs_uuid(d), &uuid),
        Spec::Label(label) => on_disk(&|d| guest.vfs_label(d), &label),
        Spec::Device(device) => own_device(device, disk),
    }
}

/// `device` if it is one of `disk`'s filesystems.
fn own_device(device: String, disk: &Disk) -> Result<String> {
    if disk.filesystems.iter().any(|(own, _)| *own == device) {
        return Ok(device);
    }
    Err(NotOnDisk(format!(
        "{device} is not one of this image's own filesystems (on {}): with several images in one run, cloudimg \
         mounts nothing outside an image's own disk, so this image is refused; if the volume is its own, \
         customize it alone",
        disk.device
    ))
    .into())
}

/// `/dev/mapper/vg--name-lv` names `/dev/vg-name/lv` (a dash inside a name is doubled).
fn lvm_path_from_mapper(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'-', Some(b'-')) => i += 2,
            (b'-', _) => {
                let (vg, lv) = (&name[..i], &name[i + 1..]);
                return Some(format!("/dev/{}/{}", vg.replace("--", "-"), lv.replace("--", "-")));
            }
            _ => i += 1,
        }
    }
    None
}

/// One line of /etc/fstab.
#[derive(Debug, PartialEq)]
pub struct FstabEntry {
    pub spec: String,
    pub mountpoint: String,
}

pub fn fstab_entries(text: &str) -> Vec<FstabEntry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let mut fields = line.split_whitespace();
            Some(FstabEntry { spec: fields.next()?.to_string(), mountpoint: fields.next()?.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(device: &str) -> Root {
        Root { device: device.into(), fs_type: "ext4".into(), os: Some("Debian GNU/Linux 12 (bookworm)".into()) }
    }

    #[test]
    fn one_root_is_chosen_several_need_a_name() {
        assert_eq!(choose_root(vec![root("/dev/sda1")], None).unwrap().device, "/dev/sda1");
        let err = choose_root(vec![root("/dev/sda1"), root("/dev/sdb1")], None).unwrap_err().to_string();
        assert!(
            err.contains("/dev/sda1 (ext4, Debian GNU/Linux 12 (bookworm)), /dev/sdb1") && err.contains("--root"),
            "{err}"
        );
        assert_eq!(
            choose_root(vec![root("/dev/sda1"), root("/dev/sdb1")], Some("/dev/sdb1")).unwrap().device,
            "/dev/sdb1"
        );
        assert!(choose_root(vec![root("/dev/sda1")], Some("/dev/sdz9")).is_err());
        assert!(choose_root(vec![], None).unwrap_err().to_string().contains("no operating system"));
    }

    #[test]
    fn fstab_specs_are_parsed_before_anything_is_looked_up() {
        let device = |d: &str| Some(Spec::Device(d.into()));
        assert_eq!(parse_spec("UUID=\"ab-cd\""), Some(Spec::Uuid("ab-cd".into())));
        assert_eq!(parse_spec("/dev/disk/by-uuid/ab-cd"), Some(Spec::Uuid("ab-cd".into())));
        assert_eq!(parse_spec("LABEL=root"), Some(Spec::Label("root".into())));
        assert_eq!(parse_spec("/dev/disk/by-label/my\\x20data"), Some(Spec::Label("my data".into())));
        assert_eq!(parse_spec("/dev/mapper/rl-root"), device("/dev/rl/root"));
        assert_eq!(parse_spec("/dev/rl/root"), device("/dev/rl/root"));
        assert_eq!(parse_spec("/dev/md/data"), device("/dev/md/data"));
        for unsupported in ["PARTUUID=1", "/dev/disk/by-id/x", "/dev/disk/by-path/pci-0", "/dev/sda2", "tmpfs"] {
            assert_eq!(parse_spec(unsupported), None, "{unsupported}");
        }
        assert_eq!(udev_unescape("a\\x2fb\\xzz\\x4"), "a/b\\xzz\\x4");
    }

    #[test]
    fn in_a_batch_a_device_must_be_on_the_images_own_disk() {
        let disk = Disk {
            device: "/dev/sdb".into(),
            filesystems: vec![("/dev/sdb1".into(), "ext4".into()), ("/dev/data/var".into(), "xfs".into())],
        };
        assert_eq!(own_device("/dev/data/var".into(), &disk).unwrap(), "/dev/data/var");
        let err = own_device("/dev/rl/root".into(), &disk).unwrap_err();
        assert!(err.is::<NotOnDisk>(), "{err:?}");
        assert!(err.to_string().contains("/dev/rl/root is not one of this image's own filesystems (on /dev/sdb)"));
    }

    #[test]
    fn fstab_lines_and_mapper_names_are_parsed() {
        let entries = fstab_entries(
            "# c\nUUID=ab-cd / ext4 defaults 0 1\n\n/dev/mapper/vg--data-var /var xfs defaults 0 0 # x\n",
        );
        assert_eq!(
            entries,
            vec![
                FstabEntry { spec: "UUID=ab-cd".into(), mountpoint: "/".into() },
                FstabEntry { spec: "/dev/mapper/vg--data-var".into(), mountpoint: "/var".into() },
            ]
        );
        assert_eq!(lvm_path_from_mapper("vg--data-var").as_deref(), Some("/dev/vg-data/var"));
        assert_eq!(lvm_path_from_mapper("rootvg-root").as_deref(), Some("/dev/rootvg/root"));
        assert_eq!(lvm_path_from_mapper("a--b-c--d").as_deref(), Some("/dev/a-b/c-d"));
        assert_eq!(lvm_path_from_mapper("nodash"), None);
        assert_eq!(
            os_release::field("NAME=x\nPRETTY_NAME=\"Ubuntu 24.04 LTS\"\n", "PRETTY_NAME").as_deref(),
            Some("Ubuntu 24.04 LTS")
        );
    }
}
