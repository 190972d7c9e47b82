//! One appliance session for one or several images, shared by `customize` and `inspect`: the
//! accelerator chosen, the appliance started, its filesystems sorted to their images, and a job run
//! on each image that can share it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::appliance::accel::{self, Accel, HostKvm};
use crate::guest::batch::{self, Split};
use crate::guest::locate::Disk;
use crate::guest::{Drive, Guest, LaunchOptions};
use crate::support::cleanup;
use crate::support::exit_codes::{code_of, with_code, APPLIANCE};
use crate::support::report::Reporter;

/// How to launch.
pub struct Options<'a> {
    pub accel: accel::Requested,
    pub timeout: Duration,
    pub debug: bool,
    /// Where libguestfs puts its sockets and overlays (cloudimg's private work directory).
    pub tmpdir: &'a Path,
}

/// A started appliance with one drive per image.
pub struct Shared {
    pub guest: Guest,
    pub accel: Accel,
    /// With several images: which filesystems belong to which, and which images need a launch of
    /// their own.
    split: Option<Split>,
}

/// Starts the appliance for `drives`; with several, sorts their filesystems to their images and
/// warns about each image that needs a launch of its own (`names` says which image is which).
pub fn launch(drives: &[Drive], names: &[&Path], opts: &Options, report: &Reporter) -> Result<Shared> {
    let (accel, why) = accel::choose(opts.accel, &HostKvm::probe()).map_err(with_code(APPLIANCE))?;
    report.phase(&format!(
        "Launching the appliance ({}{}){}",
        if accel == Accel::Kvm { "KVM" } else { "TCG" },
        why.map(|w| format!(": {w}")).unwrap_or_default(),
        if drives.len() > 1 { format!(" for {} images", drives.len()) } else { String::new() }
    ));
    let launch = LaunchOptions { accel, timeout: opts.timeout, debug: opts.debug, tmpdir: opts.tmpdir };
    let spinner = report.spinner("starting the appliance");
    let started = Instant::now();
    let guest = Guest::launch(drives, &launch).map_err(with_code(APPLIANCE))?;
    report.detail(&format!("launched in {:.1} s", report.took("launch", started)));
    drop(spinner);
    cleanup::fault_point("launched");
    report.detail(&format!("appliance: {}", guest.appliance));
    guest.warnings().iter().for_each(|w| report.warn(w));
    let split = if drives.len() > 1 {
        report.phase("Sorting out which filesystems belong to which image");
        let started = Instant::now();
        let split = batch::split(&guest).map_err(with_code(APPLIANCE))?;
        report.detail(&format!("sorted in {:.1} s", report.took("sorting", started)));
        Some(split)
    } else {
        None
    };
    for (pos, why) in split.iter().flat_map(|sp| sp.alone.iter()) {
        report.warn(&format!("{} gets an appliance launch of its own: {why}", names[*pos].display()));
    }
    Ok(Shared { guest, accel, split })
}

impl Shared {
    /// The images (by position) that cannot share this appliance.
    pub fn alone(&self) -> Vec<usize> {
        self.split.as_ref().map_or(Vec::new(), |sp| sp.alone.iter().map(|(pos, _)| *pos).collect())
    }

    /// Runs `job` on each of the `count` images that share the appliance, in order, with its disk
    /// when there are several; unmounts after each, and then calls `unmounted` with each image whose
    /// job succeeded. Once the appliance is gone the remaining images get its error.
    pub fn each<T>(
        &self,
        count: usize,
        mut job: impl FnMut(usize, Option<&Disk>) -> Result<T>,
        mut unmounted: impl FnMut(usize, &T),
    ) -> Vec<(usize, Result<T>)> {
        let alone = self.alone();
        let mut out = Vec::new();
        let mut gone: Option<anyhow::Error> = None;
        for pos in (0..count).filter(|pos| !alone.contains(pos)) {
            let result = match &gone {
                Some(e) => Err(copy_error(e)),
                None => {
                    let result = job(pos, self.split.as_ref().map(|sp| &sp.disks[pos]));
                    // Unmounting ends with a cache flush (ext2/3/4, xfs and btrfs mark their journal or
                    // superblock clean with one), which makes qemu write out the overlay's tables: from
                    // then on the overlay file holds the image's final state. A failure here is found
                    // again by the shutdown, which then fails every image.
                    if let (Ok(done), Ok(())) = (&result, self.guest.umount_all()) {
                        unmounted(pos, done);
                    }
                    result
                }
            };
            if let (Err(e), None) = (&result, &gone) {
                if code_of(e) == APPLIANCE {
                    gone = Some(copy_error(e));
                }
            }
            out.push((pos, result));
        }
        out
    }
}

/// The same error for another image of a shared launch (errors cannot be cloned), with its exit status.
pub fn copy_error(e: &anyhow::Error) -> anyhow::Error {
    with_code(code_of(e))(anyhow::anyhow!("{e:#}"))
}
