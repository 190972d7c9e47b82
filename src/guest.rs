//! The only code that calls libguestfs. Thin: each method is one guest operation with its error
//! context; decisions live in the callers.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use guestfs::{AddDriveOptArgs, CreateFlags, GlobExpandOptArgs, Handle};

use crate::accel::Accel;
use crate::cleanup::Watchdog;
use crate::exit_codes::{with_code, APPLIANCE};
use crate::fast_boot;
use crate::image_file::Format;
use crate::partition_table;

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

/// One file's ownership, permissions and SELinux label, to carry over when it is replaced.
struct Attributes {
    mode: i64,
    uid: i64,
    gid: i64,
    selinux: Option<String>,
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
        crate::cleanup::checkpoint();
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
    pub fn partition_table(&self, disk: &str) -> Result<Option<partition_table::Table>> {
        let head = self.pread(disk, partition_table::HEAD, 0)?;
        let entries = match partition_table::gpt_entries_at(&head) {
            Some((offset, len)) if offset + len as u64 > head.len() as u64 => Some(self.pread(disk, len, offset)?),
            _ => None,
        };
        Ok(partition_table::parse(&head, entries.as_deref()))
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
                Err(e) if crate::exit_codes::code_of(&e) == APPLIANCE => return Err(e),
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

    pub fn is_dir(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| {
            g.is_dir(path, guestfs::IsDirOptArgs { followsymlinks: Some(false) })
        })
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| g.exists(path))
    }

    pub fn is_symlink(&self, path: &str) -> Result<bool> {
        self.bounded(&format!("checking {path}"), |g| g.is_symlink(path))
    }

    /// Paths matching a glob inside the guest, sorted.
    pub fn glob(&self, pattern: &str) -> Result<Vec<String>> {
        let mut paths = self.bounded(&format!("listing {pattern}"), |g| {
            g.glob_expand(pattern, GlobExpandOptArgs { directoryslash: Some(false) })
        })?;
        paths.sort();
        Ok(paths)
    }

    /// Names in a directory (empty when it does not exist).
    pub fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        if !self.is_dir(dir)? {
            return Ok(Vec::new());
        }
        let mut names = self.bounded(&format!("listing {dir}"), |g| g.ls(dir))?;
        names.sort();
        Ok(names)
    }

    /// A configuration file's bytes: `None` when it does not exist. Refuses symlinks, anything that is
    /// not a regular file, and files over [`MAX_CONFIG_FILE`], so that a hostile image cannot send the
    /// tool elsewhere or exhaust its memory.
    pub fn read_config_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.read_config_file_with_mode(path)?.map(|(bytes, _)| bytes))
    }

    /// [`Guest::read_config_file`], with the file's permission bits.
    pub fn read_config_file_with_mode(&self, path: &str) -> Result<Option<(Vec<u8>, u32)>> {
        self.read_regular_file(path, MAX_CONFIG_FILE)
    }

    /// Like [`Guest::read_config_file_with_mode`] with a limit of `max` bytes, for the few larger files
    /// cloudimg reads (dpkg's status file).
    pub fn read_regular_file(&self, path: &str, max: i64) -> Result<Option<(Vec<u8>, u32)>> {
        let mut bytes = Vec::new();
        Ok(self.copy_regular_file(path, max, &mut bytes)?.map(|mode| (bytes, mode)))
    }

    /// Copies a regular guest file of at most `max` bytes into `out`, with the refusals of
    /// [`Guest::read_config_file`]; its permission bits, `None` when it does not exist.
    pub fn copy_regular_file(&self, path: &str, max: i64, out: &mut impl std::io::Write) -> Result<Option<u32>> {
        if !self.exists(path)? && !self.is_symlink(path)? {
            return Ok(None);
        }
        let stat = self.bounded(&format!("checking {path}"), |g| g.lstatns(path))?;
        match stat.st_mode & S_IFMT {
            S_IFREG => {}
            S_IFLNK => {
                let target = self.bounded(&format!("reading link {path}"), |g| g.readlink(path)).unwrap_or_default();
                bail!("{path} in the guest is a symbolic link (to `{target}`); cloudimg edits only regular files, replace it with a file first");
            }
            _ => bail!("{path} in the guest is not a regular file"),
        }
        let size = stat.st_size;
        if size > max {
            bail!("{path} in the guest is {size} bytes, larger than the {max} bytes cloudimg reads from such a file");
        }
        // pread answers in one message (read_file goes through a download, ~0.12 s a file under TCG);
        // a message holds at most a few MiB, so larger files come in pieces.
        const PIECE: i64 = 1 << 20;
        let mut copied: i64 = 0;
        while copied < size.max(1) {
            let count = i32::try_from((size - copied).clamp(1, PIECE)).expect("at most PIECE");
            let piece = self.bounded(&format!("reading {path} in the guest"), |g| g.pread(path, count, copied))?;
            if piece.is_empty() {
                break;
            }
            out.write_all(&piece).with_context(|| format!("copying {path} out of the guest"))?;
            copied += piece.len() as i64;
        }
        Ok(Some((stat.st_mode & 0o7777) as u32))
    }

    /// The last `lines` lines that the programs `identifiers` logged to the systemd journal kept in
    /// the guest's `dir`, as the guest's own `journalctl` prints them; `None` when there is no such
    /// journal or no journalctl. It runs inside the appliance, chrooted into the mounted guest: only
    /// the guest's systemd surely reads its journal's format, and guestfs 0.1.0's `journal_get`
    /// cannot be used (its XAttr declares a `usize` length where libguestfs has a `uint32_t`, so
    /// every field's length is read with padding bytes in it). Callers run it on disks they throw
    /// away (verify's overlay); its output is one bounded message.
    pub fn journal_lines(&self, dir: &str, identifiers: &[&str], lines: usize) -> Result<Option<String>> {
        let Some(journalctl) =
            ["/usr/bin/journalctl", "/bin/journalctl"].into_iter().find(|p| self.exists(p).unwrap_or(false))
        else {
            return Ok(None);
        };
        if !self.is_dir(dir)? {
            return Ok(None);
        }
        let count = lines.to_string();
        let mut args = vec![journalctl, "-D", dir, "--no-pager", "-q", "-o", "short-iso", "-n", &count];
        identifiers.iter().for_each(|id| args.extend(["-t", id]));
        self.bounded(&format!("reading the journal in {dir} with the guest's journalctl"), |g| g.command(&args))
            .map(Some)
    }

    /// The first `count` bytes of the regular file `path` resolves to (symbolic links are followed
    /// inside the guest); `None` when there is no such file.
    pub fn read_head(&self, path: &str, count: i32) -> Result<Option<Vec<u8>>> {
        if !self.exists(path)? {
            return Ok(None);
        }
        let stat = self.bounded(&format!("checking {path}"), |g| g.statns(path))?;
        if stat.st_mode & S_IFMT != S_IFREG {
            return Ok(None);
        }
        self.bounded(&format!("reading {path} in the guest"), |g| g.pread(path, count, 0)).map(Some)
    }

    /// The packages libguestfs's inspection finds installed in the operating system whose root is
    /// `root`, as `(name, version-release)`. It reads package databases cloudimg does not parse itself
    /// (rpm's). Inspection unmounts every filesystem first and needs the guest's own mounted again
    /// before the listing, so `mount` is called in between.
    pub fn inspected_packages(&self, root: &str, mount: impl FnOnce() -> Result<()>) -> Result<Vec<(String, String)>> {
        let roots = self.bounded("inspecting the image (libguestfs inspection)", |g| g.inspect_os());
        mount()?;
        if !roots?.iter().any(|r| r == root) {
            bail!("libguestfs's inspection does not recognise {root} as an operating system root");
        }
        let apps = self.bounded("listing the installed packages", |g| g.inspect_list_applications2(root))?;
        Ok(apps
            .into_iter()
            .map(|a| {
                let release = if a.app2_release.is_empty() { String::new() } else { format!("-{}", a.app2_release) };
                (a.app2_name, format!("{}{release}", a.app2_version))
            })
            .collect())
    }

    /// Replaces (or creates) `path` with `content` through a temporary file in the same directory and a
    /// rename, so the file is never half-written. An existing file's mode, owner and SELinux label are
    /// kept; a new file takes them from `like` (a sibling configuration file), else root-owned 0644.
    pub fn replace_file(&self, path: &str, content: &[u8], like: &str) -> Result<()> {
        let attrs = match self.attributes(path)? {
            Some(a) => a,
            None => self.attributes(like)?.unwrap_or(Attributes { mode: 0o644, uid: 0, gid: 0, selinux: None }),
        };
        self.write_with(path, content, attrs)
    }

    /// Like [`Guest::replace_file`], but the file is root's alone (0600) whatever it was, with the
    /// SELinux label of `like`.
    pub fn replace_private_file(&self, path: &str, content: &[u8], like: &str) -> Result<()> {
        let selinux = self.attributes(like)?.and_then(|a| a.selinux);
        self.write_with(path, content, Attributes { mode: 0o600, uid: 0, gid: 0, selinux })
    }

    fn write_with(&self, path: &str, content: &[u8], attrs: Attributes) -> Result<()> {
        let dir = path.rsplit_once('/').map(|(d, _)| if d.is_empty() { "/" } else { d }).unwrap_or("/");
        self.bounded(&format!("creating {dir} in the guest"), |g| g.mkdir_p(dir))?;
        let temp = format!("{dir}/.cloudimg-new");
        self.bounded(&format!("writing {temp} in the guest"), |g| g.write(&temp, content))?;
        self.bounded(&format!("setting the owner of {temp}"), |g| g.chown(attrs.uid as i32, attrs.gid as i32, &temp))?;
        self.bounded(&format!("setting the mode of {temp}"), |g| g.chmod((attrs.mode & 0o7777) as i32, &temp))?;
        if let Some(label) = &attrs.selinux {
            self.bounded(&format!("setting the SELinux label of {temp}"), |g| {
                g.lsetxattr("security.selinux", label, label.len() as i32, &temp)
            })?;
        }
        self.bounded(&format!("renaming {temp} to {path} in the guest"), |g| g.rename(&temp, path))
    }

    fn attributes(&self, path: &str) -> Result<Option<Attributes>> {
        if !self.exists(path)? {
            return Ok(None);
        }
        let st = self.bounded(&format!("reading the attributes of {path}"), |g| g.lstatns(path))?;
        // Listing all attributes, rather than asking for the one, keeps a missing label from being an error.
        let selinux = self
            .bounded(&format!("reading the extended attributes of {path}"), |g| g.lgetxattrs(path))?
            .into_iter()
            .find(|x| x.attrname == "security.selinux")
            .map(|x| String::from_utf8_lossy(&x.attrval).trim_end_matches('\0').to_string())
            .filter(|l| !l.is_empty());
        Ok(Some(Attributes { mode: st.st_mode, uid: st.st_uid, gid: st.st_gid, selinux }))
    }

    pub fn remove_file(&self, path: &str) -> Result<()> {
        self.bounded(&format!("removing {path} in the guest"), |g| g.rm(path))
    }

    /// Removes a directory when it is empty (and leaves it otherwise).
    pub fn remove_dir_if_empty(&self, path: &str) -> Result<()> {
        if self.is_dir(path)? && self.list_dir(path)?.is_empty() {
            self.bounded(&format!("removing {path} in the guest"), |g| g.rmdir(path))?;
        }
        Ok(())
    }

    pub fn remove_tree(&self, path: &str) -> Result<()> {
        self.bounded(&format!("removing {path} in the guest"), |g| g.rm_rf(path))
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
