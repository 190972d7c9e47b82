//! Several images in one appliance: which filesystems belong to which image, and which images cannot
//! share the appliance safely because they are copies of another one.
//!
//! Identical copies have identical filesystem UUIDs and labels, LVM physical volume UUIDs and volume
//! group names. ext4 does not mind; xfs is mounted with `nouuid`; UUID and label lookups are made per
//! disk. LVM shows only one of two physical volumes with the same UUID, and the kernel treats btrfs
//! devices with the same filesystem UUID as one filesystem: such images get an appliance of their own.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::guest::locate::Disk;
use crate::guest::Guest;

/// The disks of a shared appliance, and the images (by position) that need one of their own, with why.
pub struct Split {
    pub disks: Vec<Disk>,
    pub alone: Vec<(usize, String)>,
}

/// What one disk holds, as far as sharing is concerned.
#[derive(Debug, Default, Clone, PartialEq)]
struct DiskFacts {
    /// UUIDs of the LVM physical volumes on the disk.
    pv_uuids: Vec<String>,
    btrfs_uuids: Vec<String>,
}

pub fn split(guest: &Guest) -> Result<Split> {
    let devices = guest.devices()?;
    let filesystems = guest.probe_filesystems()?;
    let pv_devices: Vec<&String> = filesystems.iter().filter(|(_, t)| t == "LVM2_member").map(|(d, _)| d).collect();
    // LVM questions cost ~0.2-0.4 s each under TCG: only asked when a disk holds a physical volume.
    let lvm = !pv_devices.is_empty();
    // PV UUIDs are read once: each guest call costs time, and every LV needs them.
    let visible_pvs: Vec<(String, String)> = if lvm {
        guest.lvm_pvs()?.into_iter().filter_map(|pv| guest.lvm_pv_uuid(&pv).ok().map(|uuid| (pv, uuid))).collect()
    } else {
        Vec::new()
    };
    let mut facts = vec![DiskFacts::default(); devices.len()];
    let mut disks: Vec<Disk> = devices.iter().map(|d| Disk { device: d.clone(), filesystems: Vec::new() }).collect();
    for pv in pv_devices {
        if let (Some(i), Ok(uuid)) = (disk_of(&devices, pv), guest.lvm_pv_uuid(pv)) {
            facts[i].pv_uuids.push(uuid);
        }
    }
    let mut vg_names = if lvm { guest.lvm_vgs()? } else { Vec::new() };
    vg_names.sort();
    let duplicate_vg = vg_names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0].clone());
    let mut alone = BTreeMap::new();
    for (device, fs_type) in filesystems {
        let owner = match disk_of(&devices, &device) {
            Some(i) => Some(i),
            None => {
                // An LVM logical volume, /dev/VG/LV: its disk is the one whose PV belongs to VG.
                let vg = device.split('/').nth(2).unwrap_or_default().to_string();
                let uuids = guest.lvm_vg_pv_uuids(&vg).unwrap_or_default();
                let owners: Vec<usize> = visible_pvs
                    .iter()
                    .filter(|(_, uuid)| uuids.contains(uuid))
                    .filter_map(|(pv, _)| disk_of(&devices, pv))
                    .collect();
                match owners[..] {
                    [one] => Some(one),
                    _ => {
                        for i in owners {
                            alone.insert(i, format!("its LVM volume group {vg} spans several disks"));
                        }
                        None
                    }
                }
            }
        };
        let Some(i) = owner else { continue };
        if fs_type == "btrfs" {
            if let Ok(uuid) = guest.vfs_uuid(&device) {
                facts[i].btrfs_uuids.push(uuid);
            }
        }
        disks[i].filesystems.push((device, fs_type));
    }
    for (i, why) in conflicts(&facts, duplicate_vg.as_deref()) {
        alone.entry(i).or_insert(why);
    }
    Ok(Split { disks, alone: alone.into_iter().collect() })
}

/// The disk (by position) a partition, whole device or btrfs subvolume is on; `None` for LVM volumes.
fn disk_of(devices: &[String], device: &str) -> Option<usize> {
    let device = device.strip_prefix("btrfsvol:").map_or(device, |rest| {
        let end = rest.match_indices('/').nth(2).map_or(rest.len(), |(at, _)| at);
        &rest[..end]
    });
    let base = device.trim_end_matches(|c: char| c.is_ascii_digit());
    devices.iter().position(|d| d == device || d == base)
}

/// Images that share an LVM physical volume UUID or a btrfs filesystem UUID with another (LVM will
/// not activate a volume group whose physical volumes appear twice), and, when two volume groups have
/// the same name (LVM then activates neither), every image with LVM.
fn conflicts(facts: &[DiskFacts], duplicate_vg: Option<&str>) -> Vec<(usize, String)> {
    let shared = |i: usize, pick: fn(&DiskFacts) -> &Vec<String>| -> Option<String> {
        pick(&facts[i])
            .iter()
            .find(|u| facts.iter().enumerate().any(|(j, other)| j != i && pick(other).contains(u)))
            .cloned()
    };
    let mut out = Vec::new();
    for (i, disk) in facts.iter().enumerate() {
        if let Some(uuid) = shared(i, |f| &f.pv_uuids) {
            out.push((
                i,
                format!(
                    "another image has an LVM physical volume with the same UUID ({uuid}), and LVM activates neither"
                ),
            ));
        } else if let (Some(vg), false) = (duplicate_vg, disk.pv_uuids.is_empty()) {
            out.push((i, format!("two images have an LVM volume group named {vg}, and LVM activates neither")));
        } else if let Some(uuid) = shared(i, |f| &f.btrfs_uuids) {
            out.push((i, format!("another image has a btrfs filesystem with the same UUID ({uuid}), and the kernel cannot tell them apart")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Vec<String> {
        ["/dev/sda", "/dev/sdb", "/dev/sdc"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn devices_map_to_their_disk() {
        let d = devices();
        assert_eq!(disk_of(&d, "/dev/sdb2"), Some(1));
        assert_eq!(disk_of(&d, "/dev/sdc"), Some(2));
        assert_eq!(disk_of(&d, "btrfsvol:/dev/sdc1/@"), Some(2));
        assert_eq!(disk_of(&d, "btrfsvol:/dev/sda1/@/nested"), Some(0));
        assert_eq!(disk_of(&d, "/dev/rl/root"), None);
    }

    #[test]
    fn copies_that_lvm_or_btrfs_cannot_tell_apart_need_their_own_launch() {
        let facts = [
            DiskFacts { pv_uuids: vec!["p1".into()], btrfs_uuids: vec![] },
            DiskFacts { pv_uuids: vec!["p1".into()], btrfs_uuids: vec![] },
            DiskFacts { pv_uuids: vec![], btrfs_uuids: vec!["u1".into()] },
            DiskFacts { pv_uuids: vec![], btrfs_uuids: vec!["u1".into()] },
            DiskFacts { pv_uuids: vec!["p2".into()], btrfs_uuids: vec!["u2".into()] },
            DiskFacts::default(),
        ];
        let out = conflicts(&facts, None);
        let who: Vec<usize> = out.iter().map(|(i, _)| *i).collect();
        assert_eq!(who, vec![0, 1, 2, 3]);
        assert!(out[0].1.contains("p1"));
        let named: Vec<usize> = conflicts(&facts, Some("rl")).iter().map(|(i, _)| *i).collect();
        assert_eq!(named, vec![0, 1, 2, 3, 4]);
    }
}
