//! Producing the output image: the edits go to a qcow2 overlay on top of the untouched input, and one
//! pass over its data (cloudimg's writer, or `qemu-img convert -c` for a compressed qcow2) writes a
//! standalone image to a temporary file beside the destination, which is flushed and renamed into
//! place only when everything succeeded.
//!
//! The destination's directory may belong to someone else (`--in-place /home/alice/vm.qcow2` run by
//! root), who can rename, remove and replace its entries at any moment. So every file made here is
//! created exclusively (`O_EXCL`: never through a symlink, never an existing file) and from then on
//! used only through the descriptor it was created with: written, read back, hashed, flushed,
//! chmodded and chowned. Its name is used once more, to rename it into place, and only after checking
//! that the name still refers to that descriptor's file.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::image::hashing::{self, Digests};
use crate::image::header::{self, Format, ImageInfo};
use crate::image::writer;
use crate::support::child_fd;
use crate::support::cleanup;

/// Creates `overlay`, a qcow2 whose backing file is `input` with its format stated, so that neither
/// qemu nor libguestfs probes it and the input is only ever opened read-only.
pub fn create_overlay(input: &Path, format: Format, overlay: &Path) -> Result<()> {
    let input = std::path::absolute(input).with_context(|| format!("resolving {}", input.display()))?;
    run_qemu_img(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", format.as_str(), "-b"])
            .arg(&input)
            .arg(overlay),
        "creating the working overlay",
        "creating-overlay",
    )
}

/// Writes the overlay's contents (`input` plus edits) through `dest` as a standalone image, telling
/// `progress` the percentage done; returns the file's digests when `hash` is set. Uncompressed images
/// are written by cloudimg in one pass that hashes as it writes ([`writer`]); a compressed
/// qcow2 is qemu-img's (its tables depend on the compressed sizes, so they cannot precede the data in
/// a one-pass file) and is read once more to be hashed.
pub fn write_image(
    overlay: &Path,
    input: &Path,
    format: Format,
    compress: bool,
    dest: &Pending,
    hash: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Option<Digests>> {
    let what = format!("writing the output image {}", dest.path().display());
    if !(compress && format == Format::Qcow2) {
        cleanup::fault_point("converting");
        let digests =
            writer::write(overlay, input, format, (dest.file(), dest.path()), hash, progress).context(what)?;
        cleanup::checkpoint();
        return Ok(digests);
    }
    let mut cmd = Command::new("qemu-img");
    // -U: the appliance may still hold the overlay's lock (see `overlay_reader`).
    cmd.args(["convert", "-U", "-f", "qcow2", "-O", "qcow2", "-o", "compat=1.1", "-c", "-p"]).arg(overlay);
    let target = child_fd::inherit(&mut cmd, dest.file());
    cmd.arg(target);
    // With hashing to follow, compressing is the first half of the progress.
    let share = if hash { 0.5 } else { 1.0 };
    run_qemu_img_with(&mut cmd, &what, "converting", Some(&mut |percent| progress(percent * share)))?;
    if !hash {
        return Ok(None);
    }
    let read = || format!("reading {}", dest.path().display());
    let total = dest.file().metadata().with_context(read)?.len().max(1) as f64;
    hashing::file_digests(dest.file(), dest.path(), &mut |n| progress(50.0 + n as f64 * 50.0 / total)).map(Some)
}

/// Checks a written image the way Glance's format inspection will (the declared format, standalone:
/// no backing or data file, no unknown qcow2 features, qcow2 compat 1.1, the input's virtual size),
/// reading it through its descriptor.
pub fn check_written(dest: &Pending, format: Format, virtual_size: u64) -> Result<ImageInfo> {
    let info = header::inspect_file(dest.file(), dest.path())?;
    verify_written(&info, format, virtual_size)?;
    Ok(info)
}

fn verify_written(info: &ImageInfo, format: Format, virtual_size: u64) -> Result<()> {
    if info.format != format {
        bail!("it is {}, not {}", info.format.as_str(), format.as_str());
    }
    if format == Format::Qcow2 && info.qcow2_version != Some(3) {
        bail!("it is not qcow2 compat 1.1 (version {:?})", info.qcow2_version);
    }
    if info.virtual_size != virtual_size {
        bail!("its virtual size is {} bytes, the input's {virtual_size}", info.virtual_size);
    }
    Ok(())
}

/// Writes a small file (a manifest, a man page) through a temporary file, so it is whole or absent;
/// an existing file (or symlink) of that name is replaced, never written through.
pub fn write_small_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let pending = Pending::beside(path)?;
    std::io::Write::write_all(&mut pending.file(), bytes)
        .with_context(|| format!("writing {}", pending.path().display()))?;
    pending.commit(default_file_mode(), None, true).map(drop)
}

/// Runs qemu-img to its end; `fault_point` names the moment it has started, for the fault tests.
fn run_qemu_img(cmd: &mut Command, what: &str, fault_point: &str) -> Result<()> {
    run_qemu_img_with(cmd, what, fault_point, None)
}

fn run_qemu_img_with(
    cmd: &mut Command,
    what: &str,
    fault_point: &str,
    progress: Option<&mut dyn FnMut(f64)>,
) -> Result<()> {
    cleanup::die_with_parent(cmd);
    let mut child = cmd
        .stdout(if progress.is_some() { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: running qemu-img (is qemu-utils installed?)"))?;
    cleanup::fault_point(fault_point);
    // Read stderr on the side so that neither pipe can fill up and stall qemu-img.
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut text);
        text
    });
    if let (Some(progress), Some(mut stdout)) = (progress, child.stdout.take()) {
        let mut buffer = [0u8; 512];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buffer) {
            if n == 0 {
                break;
            }
            if let Some(percent) = last_progress(&String::from_utf8_lossy(&buffer[..n])) {
                progress(percent);
            }
        }
    }
    let status = child.wait().with_context(|| format!("{what}: waiting for qemu-img"))?;
    let stderr = stderr.join().unwrap_or_default();
    cleanup::checkpoint();
    if !status.success() {
        bail!("{what}: qemu-img failed: {}", stderr.trim());
    }
    Ok(())
}

/// The last percentage in qemu-img's `-p` output, which redraws `    (12.34/100%)` with carriage returns.
fn last_progress(chunk: &str) -> Option<f64> {
    chunk.rsplit('(').find_map(|part| part.split_once("/100%)")?.0.trim().parse().ok())
}

/// A temporary file beside the destination, created exclusively and used through its descriptor, that
/// becomes the destination on [`Pending::commit`] and disappears otherwise (including on Ctrl-C,
/// through [`cleanup`]).
pub struct Pending {
    file: File,
    name: TempName,
    dest: PathBuf,
    /// Tells a later run's sweep that this file's writer is alive.
    _alive: cleanup::Alive,
}

/// The temporary name of a [`Pending`] file. Dropped, it is removed, but only while it still names
/// the file cloudimg created: whatever someone else put in its place is left alone.
struct TempName {
    path: Option<tempfile::TempPath>,
    /// (device, inode) of the file, from its descriptor.
    id: (u64, u64),
}

impl Pending {
    pub fn beside(dest: &Path) -> Result<Self> {
        let (dir, name) = split(dest)?;
        let (file, temp) = tempfile::Builder::new()
            .prefix(&format!(".{}{}{}-", name.to_string_lossy(), cleanup::PARTIAL_MARKER, cleanup::owner_tag()))
            .make_in(dir, |path| create_new(path, 0o600))
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?
            .into_parts();
        cleanup::register(&temp);
        let meta = file.metadata().with_context(|| format!("reading {}", temp.display()))?;
        let alive = cleanup::Alive::hold(&file);
        Ok(Pending {
            file,
            name: TempName { path: Some(temp), id: (meta.dev(), meta.ino()) },
            dest: dest.to_path_buf(),
            _alive: alive,
        })
    }

    /// The directory the file is in (the destination's).
    pub fn dir(&self) -> &Path {
        parent_dir(self.path())
    }

    /// The temporary name, for messages and for sweeping; the file is reached through [`Pending::file`].
    pub fn path(&self) -> &Path {
        self.name.path.as_ref().expect("present until commit")
    }

    /// The file, open for reading and writing.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Flushes the file's data to disk, so that [`Pending::commit`] has only metadata left to flush.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("flushing {} to disk", self.path().display()))
    }

    /// Gives the file the owner `owner` (for in-place edits) and `mode`, flushes it, and renames it
    /// over the destination once its temporary name is seen to still refer to it; `replace` allows an
    /// existing destination to be replaced. Returns the file, for reading it again.
    /// The file, when committed, is to appear as `dest` (a name in the same directory) instead.
    pub fn renamed(mut self, dest: PathBuf) -> Self {
        debug_assert_eq!(parent_dir(&dest), parent_dir(&self.dest));
        self.dest = dest;
        self
    }

    pub fn commit(mut self, mode: u32, owner: Option<(u32, u32)>, replace: bool) -> Result<File> {
        let temp_path = self.path().to_path_buf();
        // The owner first: changing it clears the set-user-ID and set-group-ID bits.
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid))
                .with_context(|| format!("setting the owner of {}", temp_path.display()))?;
        }
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", temp_path.display()))?;
        self.file.sync_all().with_context(|| format!("flushing {} to disk", temp_path.display()))?;
        let temp = self.name.path.take().expect("present until commit");
        if !names(&temp, self.name.id) {
            cleanup::unregister(&temp);
            // Whatever the name refers to now is someone else's: not removed, not renamed. The data
            // written, wherever the file was moved to, is dropped through the descriptor.
            let _ = temp.keep();
            let _ = self.file.set_len(0);
            bail!(
                "{} was replaced or moved while cloudimg wrote it (by someone who can write to {}); \
                 {} was not touched",
                temp_path.display(),
                parent_dir(&temp_path).display(),
                self.dest.display()
            );
        }
        let persisted = if replace { temp.persist(&self.dest) } else { temp.persist_noclobber(&self.dest) };
        if let Err(e) = persisted {
            self.name.path = Some(e.path);
            return Err(e.error).with_context(|| format!("moving the finished image to {}", self.dest.display()));
        }
        cleanup::unregister(&temp_path);
        cleanup::written(&self.dest);
        cleanup::fault_point("renamed");
        let dir = parent_dir(&self.dest);
        File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flushing directory {}", dir.display()))?;
        Ok(self.file)
    }
}

impl Drop for TempName {
    fn drop(&mut self) {
        if let Some(temp) = self.path.take() {
            cleanup::unregister(&temp);
            if !names(&temp, self.id) {
                let _ = temp.keep();
            }
        }
    }
}

/// Whether `path` itself (not what a symlink there points to) is the file `id`.
fn names(path: &Path, id: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// Creates `path` for reading and writing with `mode`; fails if anything is there, a symlink included.
fn create_new(path: &Path, mode: u32) -> std::io::Result<File> {
    File::options().read(true).write(true).create_new(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// A path's directory (`.` for a bare name) and file name.
fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    let name = path.file_name().with_context(|| format!("{} names no file", path.display()))?;
    Ok((parent_dir(path), name))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A file created under a name the user chose (a saved password), which is removed again only while
/// that name still refers to it. Its directory is held open, so that neither the creation nor the
/// removal goes through a directory someone swapped in between.
pub struct Created {
    dir: File,
    name: OsString,
    path: PathBuf,
    file: File,
}

impl Created {
    /// Creates `path` with `mode`, refusing an existing file or symlink.
    pub fn new(path: &Path, mode: u32) -> Result<Created> {
        use rustix::fs::{Mode, OFlags};
        let (dir_path, name) = split(path)?;
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir_path)
            .with_context(|| format!("opening directory {}", dir_path.display()))?;
        let flags = OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, name, flags, Mode::from_raw_mode(mode))
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        Ok(Created { dir, name: name.to_os_string(), path: path.to_path_buf(), file: File::from(fd) })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Removes the file, unless its name now refers to something else (which is left alone).
    pub fn remove(self) -> Result<()> {
        use rustix::fs::AtFlags;
        let ours = rustix::fs::fstat(&self.file).with_context(|| format!("reading {}", self.path.display()))?;
        match rustix::fs::statat(&self.dir, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino) => {
                rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty())
                    .with_context(|| format!("removing {}", self.path.display()))
            }
            _ => bail!("{} was replaced or moved by someone else; left as it is", self.path.display()),
        }
    }
}

/// Where `--keep-failed` keeps an output whose verification failed, beside its name:
/// `out.qcow2` becomes `out.failed.qcow2`, `out` becomes `out.failed`.
pub fn failed_name(dest: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::new();
    match (dest.file_stem(), dest.extension()) {
        (Some(stem), Some(ext)) => {
            name.push(stem);
            name.push(".failed.");
            name.push(ext);
        }
        _ => {
            name.push(dest.file_name().unwrap_or_default());
            name.push(".failed");
        }
    }
    dest.with_file_name(name)
}

/// The mode a newly created file gets under the current umask (0666 & !umask).
pub fn default_file_mode() -> u32 {
    // SAFETY: umask(2) only swaps the process's mask; it is read and restored at once.
    let mask = unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    };
    0o666 & !(mask as u32)
}

/// Whether two paths are the same file (by device and inode when both exist, else by absolute path).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_progress_is_read_from_its_redraws() {
        assert_eq!(last_progress("    (0.00/100%)\r    (12.50/100%)\r"), Some(12.5));
        assert_eq!(last_progress("    (100.00/100%)\n"), Some(100.0));
        assert_eq!(last_progress("    (50.0"), None);
        assert_eq!(last_progress("(3.00/100%)\r    (4"), Some(3.0));
    }

    #[test]
    fn a_failed_output_is_kept_under_a_name_that_says_so() {
        for (dest, kept) in [
            ("/srv/out.qcow2", "/srv/out.failed.qcow2"),
            ("out.img", "out.failed.img"),
            ("/srv/noble.server.raw", "/srv/noble.server.failed.raw"),
            ("/srv/out", "/srv/out.failed"),
            ("/srv/.hidden", "/srv/.hidden.failed"),
        ] {
            assert_eq!(failed_name(Path::new(dest)), Path::new(kept), "{dest}");
        }
    }

    #[test]
    fn commit_keeps_an_existing_destination_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        let write = |pending: &Pending| std::io::Write::write_all(&mut pending.file(), b"new").unwrap();
        let pending = Pending::beside(&dest).unwrap();
        write(&pending);
        assert!(pending.commit(0o644, None, false).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is gone");

        let pending = Pending::beside(&dest).unwrap();
        write(&pending);
        pending.commit(0o640, None, true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o640);
    }

    #[test]
    fn a_written_image_must_be_what_glance_expects() {
        let qcow2 = ImageInfo {
            format: Format::Qcow2,
            virtual_size: 100,
            file_size: 50,
            qcow2_version: Some(3),
            copyable: true,
        };
        verify_written(&qcow2, Format::Qcow2, 100).unwrap();
        let err = |info: &ImageInfo, f, v| format!("{:#}", verify_written(info, f, v).unwrap_err());
        assert!(err(&qcow2, Format::Raw, 100).contains("not raw"));
        assert!(err(&qcow2, Format::Qcow2, 101).contains("virtual size"));
        let v2 = ImageInfo { qcow2_version: Some(2), ..qcow2 };
        assert!(err(&v2, Format::Qcow2, 100).contains("compat 1.1"));
    }

    #[test]
    fn a_dropped_pending_output_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pending = Pending::beside(&dir.path().join("out.img")).unwrap();
        std::io::Write::write_all(&mut pending.file(), b"partial").unwrap();
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// What someone who can write to the directory does between two steps: the temporary name now
    /// points at another file. Nothing is written, chmodded or renamed through it, and it stays.
    #[test]
    fn a_swapped_temporary_name_is_neither_used_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        let canary = dir.path().join("canary");
        std::fs::write(&canary, b"canary").unwrap();
        std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o600)).unwrap();
        let dest = dir.path().join("out.img");
        let swap = |pending: &Pending| {
            std::fs::rename(pending.path(), dir.path().join("moved")).unwrap();
            std::os::unix::fs::symlink(&canary, pending.path()).unwrap();
        };

        let pending = Pending::beside(&dest).unwrap();
        let temp = pending.path().to_path_buf();
        swap(&pending);
        std::io::Write::write_all(&mut pending.file(), b"image").unwrap();
        let err = format!("{:#}", pending.commit(0o644, None, true).unwrap_err());
        assert!(err.contains("was replaced or moved while cloudimg wrote it"), "{err}");
        assert_eq!(std::fs::read(&canary).unwrap(), b"canary");
        assert_eq!(std::fs::metadata(&canary).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dest.exists(), "nothing was renamed into place");
        assert!(temp.symlink_metadata().unwrap().file_type().is_symlink(), "the replacement is left alone");
        assert_eq!(std::fs::metadata(dir.path().join("moved")).unwrap().len(), 0, "the data written is dropped");

        let pending = Pending::beside(&dest).unwrap();
        let temp = pending.path().to_path_buf();
        std::fs::remove_file(dir.path().join("moved")).unwrap();
        swap(&pending);
        drop(pending);
        assert!(temp.symlink_metadata().is_ok(), "a failed run leaves the replacement alone too");
        assert_eq!(std::fs::read(&canary).unwrap(), b"canary");
    }

    #[test]
    fn a_created_file_is_removed_only_while_its_name_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("saved");
        let created = Created::new(&path, 0o600).unwrap();
        assert!(Created::new(&path, 0o600).is_err(), "never an existing file");
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("link")).unwrap();
        assert!(Created::new(&dir.path().join("link"), 0o600).is_err(), "never through a symlink");
        std::io::Write::write_all(&mut created.file(), b"x").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        created.remove().unwrap();
        assert!(!path.exists());

        let created = Created::new(&path, 0o600).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        assert!(created.remove().is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[test]
    fn same_file_sees_through_links_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        assert!(same_file(&a, &dir.path().join("b")));
        assert!(same_file(&a, &dir.path().join("./a")));
        assert!(!same_file(&a, &dir.path().join("c")));
    }
}
