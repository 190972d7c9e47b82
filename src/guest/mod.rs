//! The only code that calls libguestfs. Thin: each method is one guest operation with its error
//! context; decisions live in the callers.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use guestfs::{AddDriveOptArgs, CreateFlags, Handle};

use crate::appliance::accel::Accel;
use crate::appliance::fast_boot;
use crate::image::header::Format;
use crate::support::cleanup::Watchdog;
use crate::support::exit_codes::{with_code, APPLIANCE, BAD_GUEST};

pub mod batch;
pub mod config;
mod files;
pub mod locate;
pub mod partition_table;
pub mod rpm_database;
pub mod session;

const S_IFMT: i64 = 0o170000;
const S_IFREG: i64 = 0o100000;
const S_IFLNK: i64 = 0o120000;

/// Files larger than this are not read into memory (cloud.cfg is a few KiB; a huge one is hostile).
pub const MAX_CONFIG_FILE: i64 = 1 << 20;

/// libguestfs errors carry their message in private fields that only `Debug` shows; this is the one
/// place that turns them into ordinary errors.
fn gerr(err: guestfs::Error) -> anyhow::Error {
    let debug = format!("{err:?}");
    let message = debug
        .split_once("message: \"")
        .and_then(|(_, rest)| rest.rsplit_once("\", errno:"))
        .map(|(m, _)| m.replace("\\\"", "\"").replace("\\n", " ").replace("\\\\", "\\"))
        .unwrap_or(debug);
    anyhow!("{}", message.trim())
}

/// Options for attaching a disk: the format always stated (never probed), discard passed through so
/// that freed blocks can be trimmed.
pub fn drive_options(format: &str, readonly: bool) -> AddDriveOptArgs<'_> {
    AddDriveOptArgs {
        readonly: Some(readonly),
        format: Some(format),
        iface: None,
        name: None,
        label: None,
        protocol: None,
        server: None,
        username: None,
        secret: None,
        cachemode: None,
        discard: Some("besteffort"),
        copyonread: None,
    }
}

/// How this host's libguestfs is set up (environment variables included), read from a handle that is
/// never launched.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Setup {
    pub version: String,
    pub backend: String,
    /// The qemu binary (`LIBGUESTFS_HV` or the built-in default).
    pub hv: String,
    /// Where the appliance (supermin.d, or a fixed kernel/initrd/root) is looked for (`LIBGUESTFS_PATH`).
    pub appliance_path: String,
    /// Where the built appliance is cached (`LIBGUESTFS_CACHEDIR`, else `TMPDIR`, else /var/tmp).
    pub cachedir: String,
}

pub fn setup() -> Result<Setup> {
    let g = Handle::create().map_err(gerr).context("creating a libguestfs handle")?;
    let v = g.version().map_err(gerr)?;
    Ok(Setup {
        version: format!("{}.{}.{}{}", v.major, v.minor, v.release, v.extra),
        backend: g.get_backend().map_err(gerr)?,
        hv: g.get_hv().map_err(gerr)?,
        appliance_path: g.get_path().map_err(gerr)?.to_string(),
        cachedir: g.get_cachedir().map_err(gerr)?,
    })
}

/// One disk to attach.
pub struct Drive<'a> {
    pub path: &'a Path,
    pub format: Format,
    pub readonly: bool,
}

pub struct LaunchOptions<'a> {
    pub accel: Accel,
    pub timeout: Duration,
    /// libguestfs's own debug output (appliance boot messages) on stderr. Call tracing stays off
    /// always: it would print file contents, i.e. password hashes, as call arguments.
    pub debug: bool,
    /// Where libguestfs keeps its per-run sockets and overlays.
    pub tmpdir: &'a Path,
}

/// A launched appliance with the image's disks attached.
pub struct Guest {
    g: Handle,
    timeout: Duration,
    /// The appliance it booted.
    pub appliance: fast_boot::Choice,
    /// Set when libguestfs was configured for another backend than the one used.
    backend_note: Option<String>,
}

impl Guest {
    pub fn launch(drives: &[Drive], opts: &LaunchOptions) -> Result<Guest> {
        // No close-on-exit: the signal handler kills the appliance itself, and libguestfs's own exit
        // hook could block on a handle the main thread is using.
        // libguestfs puts its socket directory in $XDG_RUNTIME_DIR, else /tmp, as it reads them when the
        // handle is created; point it at our own directory unless that would make the socket path too
        // long for a Unix socket (108 bytes, with "/libguestfsXXXXXX/guestfsd.sock" appended).
        let runtime_dir = (opts.tmpdir.as_os_str().len() <= 64).then_some(opts.tmpdir);
        let runtime_env = ScopedEnv::set("XDG_RUNTIME_DIR", runtime_dir);
        let g = Handle::create_flags(CreateFlags::none().create_no_close_on_exit_flag(true))
            .map_err(gerr)
            .context("creating the libguestfs handle")?;
        drop(runtime_env);
        g.set_trace(false).map_err(gerr)?;
        g.set_verbose(opts.debug).map_err(gerr)?;
        g.set_network(false).map_err(gerr)?;
        g.set_tmpdir(Some(&opts.tmpdir.to_string_lossy())).map_err(gerr)?;
        if opts.accel == Accel::Tcg {
            g.set_backend_setting("force_tcg", "1").map_err(gerr)?;
        }
        for drive in drives {
            let path = drive.path.to_str().with_context(|| format!("{} is not a UTF-8 path", drive.path.display()))?;
            g.add_drive(path, drive_options(drive.format.as_str(), drive.readonly))
                .map_err(gerr)
                .with_context(|| format!("attaching {}", drive.path.display()))?;
        }
        // supermin, which libguestfs runs to build or check the appliance, keeps temporary files in
        // $TMPDIR and leaves them behind when it is killed (Ctrl-C, timeout). Pin libguestfs's cache
        // (which defaults to $TMPDIR) where it is, then point $TMPDIR at our own temporary directory for
        // the launch, so that supermin's files go wherever ours go.
        let cachedir = g.get_cachedir().map_err(gerr)?;
        g.set_cachedir(Some(&cachedir)).map_err(gerr)?;
        let cache = fast_boot::check_cache(Path::new(&cachedir)).map_err(|why| {
            with_code(APPLIANCE)(anyhow!(
                "the appliance cache cannot be trusted, so nothing was booted from it: {why} (fix: {})",
                why.fix
            ))
        })?;
        let appliance = match opts.accel {
            Accel::Tcg => fast_boot::choose(&cache),
            Accel::Kvm => {
                fast_boot::Choice::Stock("with KVM the kernel decompresses itself in a fraction of a second".into())
            }
        };
        if let fast_boot::Choice::Copy { dir, .. } = &appliance {
            g.set_path(Some(&dir.to_string_lossy())).map_err(gerr)?;
        }
        let backend_note = force_direct_backend(&g)?;
        let guest = Guest { g, timeout: opts.timeout, appliance, backend_note };
        let tmpdir_env = ScopedEnv::set("TMPDIR", Some(opts.tmpdir));
        let launched = guest.bounded("launching the libguestfs appliance", |g| g.launch());
        drop(tmpdir_env);
        launched.map_err(|e| explain_launch_failure(e, opts, &guest.appliance))?;
        Ok(guest)
    }

    /// What the user must be told about how the appliance was started.
    pub fn warnings(&self) -> Vec<String> {
        self.appliance.warning().into_iter().chain(self.backend_note.clone()).collect()
    }

    /// Runs one guest call under the watchdog, so that a hung appliance becomes an error.
    fn bounded<T>(&self, what: &str, call: impl FnOnce(&Handle) -> Result<T, guestfs::Error>) -> Result<T> {
        let dog = Watchdog::arm(self.timeout);
        let result = call(&self.g);
        crate::support::cleanup::checkpoint();
        if dog.fired() {
            let err = anyhow!("{what} did not finish within {} s and was stopped", self.timeout.as_secs());
            return Err(with_code(APPLIANCE)(err));
        }
        result.map_err(|e| {
            let err = gerr(e).context(what.to_string());
            // A call that fails because the appliance died (qemu killed, out of memory) says nothing
            // about the guest: it is an appliance failure, whatever the caller was doing.
            if self.g.is_ready().unwrap_or(false) {
                err
            } else {
                with_code(APPLIANCE)(err.context("the libguestfs appliance stopped"))
            }
        })
    }

    /// Filesystems by device, e.g. `("/dev/sda1", "ext4")`, sorted: what `list_filesystems` gives,
    /// without its slow extra probes (it runs partitioning tools on every partition, ~2.5 s under
    /// TCG): partitions, disks without partitions, LVM logical volumes and md arrays with a
    /// filesystem signature, and btrfs subvolumes as `btrfsvol:DEVICE/PATH`.
    pub fn probe_filesystems(&self) -> Result<Vec<(String, String)>> {
        let partitions = self.partitions()?;
        let whole_disks = self.devices()?.into_iter().filter(|d| !partitions.iter().any(|p| p.starts_with(d.as_str())));
        let mut found = Vec::new();
        let mut more = Vec::new();
        for device in partitions.iter().cloned().chain(whole_disks) {
            // No recognisable signature (BIOS boot partition, extended partition, empty) is no filesystem.
            let Ok(fs_type) = self.vfs_type(&device) else { continue };
            found.push((device, fs_type));
        }
        // Listing LVM volumes costs ~0.4 s under TCG: only when there is a physical volume.
        if found.iter().any(|(_, t)| t == "LVM2_member") {
            more.extend(self.bounded("listing LVM logical volumes", |g| g.lvs())?);
        }
        if found.iter().any(|(_, t)| t == "linux_raid_member") {
            more.extend(self.bounded("listing md arrays", |g| g.list_md_devices())?);
        }
        for device in more {
            let Ok(fs_type) = self.vfs_type(&device) else { continue };
            found.push((device, fs_type));
        }
        let btrfs: Vec<String> = found.iter().filter(|(_, t)| t == "btrfs").map(|(d, _)| d.clone()).collect();
        for device in btrfs {
            let subvolumes =
                self.bounded(&format!("listing the btrfs subvolumes of {device}"), |g| g.btrfs_subvolume_list(&device));
            for sub in subvolumes.unwrap_or_default() {
                found.push((format!("btrfsvol:{device}/{}", sub.btrfssubvolume_path), "btrfs".to_string()));
            }
        }
        found.retain(|(_, t)| !t.is_empty());
        found.sort();
        Ok(found)
    }

    /// The attached disks, in the order they were added (`/dev/sda`, `/dev/sdb`, ...).
    pub fn devices(&self) -> Result<Vec<String>> {
        self.bounded("listing the disks", |g| g.list_devices())
    }

    pub fn partitions(&self) -> Result<Vec<String>> {
        self.bounded("listing partitions", |g| g.list_partitions())
    }

    /// The LVM physical volumes LVM uses (a duplicate of one is left out).
    pub fn lvm_pvs(&self) -> Result<Vec<String>> {
        self.bounded("listing LVM physical volumes", |g| g.pvs())
    }

    pub fn lvm_pv_uuid(&self, device: &str) -> Result<String> {
        self.bounded(&format!("reading the LVM PV UUID of {device}"), |g| g.pvuuid(device))
    }

    /// The UUIDs of the physical volumes of volume group `vg`.
    pub fn lvm_vg_pv_uuids(&self, vg: &str) -> Result<Vec<String>> {
        self.bounded(&format!("reading the physical volumes of {vg}"), |g| g.vgpvuuids(vg))
    }

    pub fn lvm_vgs(&self) -> Result<Vec<String>> {
        self.bounded("listing LVM volume groups", |g| g.vgs())
    }

    pub fn vfs_uuid(&self, device: &str) -> Result<String> {
        self.bounded(&format!("reading the filesystem UUID of {device}"), |g| g.vfs_uuid(device))
    }

    pub fn vfs_label(&self, device: &str) -> Result<String> {
        self.bounded(&format!("reading the filesystem label of {device}"), |g| g.vfs_label(device))
    }

    /// The filesystem type on one device (`ext4`, `xfs`, ...).
    pub fn vfs_type(&self, device: &str) -> Result<String> {
        self.bounded(&format!("reading the filesystem type of {device}"), |g| g.vfs_type(device))
    }

    /// The partition table of `disk`, read from its first sectors; `None` for a disk without one.
    /// A disk that cannot be read is a bad guest (exit status 4).
    pub fn partition_table(&self, disk: &str) -> Result<Option<partition_table::Table>> {
        let read = || {
            let head = self.pread(disk, partition_table::HEAD, 0)?;
            let entries = match partition_table::gpt_entries_at(&head) {
                Some((offset, len)) if offset + len as u64 > head.len() as u64 => Some(self.pread(disk, len, offset)?),
                _ => None,
            };
            Ok(partition_table::parse(&head, entries.as_deref()))
        };
        read().map_err(with_code(BAD_GUEST))
    }

    fn pread(&self, device: &str, len: usize, offset: u64) -> Result<Vec<u8>> {
        let (len, offset) = (i32::try_from(len)?, i64::try_from(offset)?);
        self.bounded(&format!("reading {device}"), |g| g.pread_device(device, len, offset))
    }

    /// Tells every mounted filesystem's free blocks to the disk as discarded, so that the output
    /// conversion skips them. A filesystem that cannot be trimmed only costs space: it is returned
    /// with the reason, not an error (a lost appliance still is).
    pub fn trim_mounted(&self) -> Result<Vec<String>> {
        let mut mountpoints: Vec<String> =
            self.bounded("listing mountpoints", |g| g.mountpoints())?.into_values().collect();
        mountpoints.sort();
        let mut untrimmed = Vec::new();
        for mountpoint in mountpoints {
            // Free extents smaller than a qcow2 cluster (64 KiB) cannot be dropped from the output.
            let options = guestfs::FstrimOptArgs { offset: None, length: None, minimumfreeextent: Some(64 << 10) };
            match self.bounded(&format!("trimming free space on {mountpoint}"), |g| g.fstrim(&mountpoint, options)) {
                Ok(()) => {}
                Err(e) if crate::support::exit_codes::code_of(&e) == APPLIANCE => return Err(e),
                Err(e) => untrimmed.push(format!("{e:#}")),
            }
        }
        Ok(untrimmed)
    }

    /// Mounts a filesystem of type `fs_type`. xfs gets `nouuid`: an identical copy of the image may be
    /// attached too, and xfs refuses a second filesystem with a UUID it has seen.
    pub fn mount(&self, device: &str, fs_type: &str, mountpoint: &str, readonly: bool) -> Result<()> {
        let options = match (readonly, fs_type == "xfs") {
            (true, true) => "ro,nouuid",
            (true, false) => "ro",
            (false, true) => "nouuid",
            (false, false) => "",
        };
        self.bounded(&format!("mounting {device} on {mountpoint}"), |g| g.mount_options(options, device, mountpoint))
    }

    pub fn umount_all(&self) -> Result<()> {
        self.bounded("unmounting filesystems", |g| g.umount_all())
    }

    pub fn findfs_uuid(&self, uuid: &str) -> Result<String> {
        self.bounded(&format!("finding the filesystem with UUID {uuid}"), |g| g.findfs_uuid(uuid))
    }

    pub fn findfs_label(&self, label: &str) -> Result<String> {
        self.bounded(&format!("finding the filesystem labelled {label}"), |g| g.findfs_label(label))
    }

    /// Unmounts, then shuts the appliance down and checks that it flushed every write.
    pub fn shutdown(self) -> Result<()> {
        self.umount_all()?;
        self.bounded("shutting the appliance down (flushing writes to the disk)", |g| g.shutdown())
    }
}

/// An environment variable changed for a while (libguestfs and supermin read their directories from
/// the environment only), restored when dropped.
struct ScopedEnv {
    name: &'static str,
    saved: Option<std::ffi::OsString>,
}

impl ScopedEnv {
    /// Sets `name` to `value`; `None` leaves it as it is.
    fn set(name: &'static str, value: Option<&Path>) -> Self {
        let saved = std::env::var_os(name);
        if let Some(value) = value {
            std::env::set_var(name, value);
        }
        ScopedEnv { name, saved }
    }
}

impl Drop for ScopedEnv {
    fn drop(&mut self) {
        match &self.saved {
            Some(value) => std::env::set_var(self.name, value),
            None => std::env::remove_var(self.name),
        }
    }
}

/// Launches with the direct backend whatever libguestfs was configured with: only then is qemu this
/// process's child, which the watchdog (--timeout), Ctrl-C and `die_with_parent` rely on to stop it
/// (with the libvirt backend libvirtd starts qemu, and nothing cloudimg does would stop it). Returns a
/// note when another backend was asked for.
fn force_direct_backend(g: &Handle) -> Result<Option<String>> {
    let requested = g.get_backend().map_err(gerr)?;
    g.set_backend(DIRECT_BACKEND).map_err(gerr)?;
    // `appliance` is the old name of `direct`.
    Ok((requested != DIRECT_BACKEND && requested != "appliance").then(|| {
        format!(
            "libguestfs is set to the `{requested}` backend (LIBGUESTFS_BACKEND or its build's default); cloudimg \
             uses `{DIRECT_BACKEND}` instead, so that qemu is its own child and --timeout and Ctrl-C can stop it \
             (export LIBGUESTFS_BACKEND={DIRECT_BACKEND} to silence this)"
        )
    }))
}

/// The only libguestfs backend cloudimg launches with.
pub const DIRECT_BACKEND: &str = "direct";

fn explain_launch_failure(err: anyhow::Error, opts: &LaunchOptions, appliance: &fast_boot::Choice) -> anyhow::Error {
    let text = format!("{err:#}");
    let hint = if text.contains("did not finish within") {
        match opts.accel {
            Accel::Kvm => "the appliance hung; KVM may not work on this host: try --accel tcg, or a longer --timeout",
            Accel::Tcg => "software emulation is slow on a busy host: try a longer --timeout, and run `libguestfs-test-tool` to see where it stops",
        }
    } else if text.contains("supermin") || text.contains("appliance") && text.contains("kernel") {
        "the appliance could not be built: run `update-guestfs-appliance` (Debian/Ubuntu) or `libguestfs-test-tool`; on Ubuntu the host kernel must be readable: `sudo chmod 0644 /boot/vmlinuz-*`"
    } else {
        "run `libguestfs-test-tool` to see why the appliance does not start"
    };
    let copy = match appliance {
        fast_boot::Choice::Copy { dir, .. } => format!(
            " (this launch booted cloudimg's fast-boot copy of the appliance in {}; {}=1 boots libguestfs's own)",
            dir.display(),
            fast_boot::OPT_OUT_VARIABLE
        ),
        fast_boot::Choice::Stock(_) | fast_boot::Choice::Distrusted(_) => String::new(),
    };
    anyhow!("{text}; {hint}{copy}")
}
