//! Producing the output image: the edits go to a qcow2 overlay on top of the untouched input, and one
//! pass over its data (cloudimg's writer, or `qemu-img convert -c` for a compressed qcow2) writes a
//! standalone image to a temporary file beside the destination, which is flushed and renamed into
//! place only when everything succeeded.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cleanup;
use crate::hashing::{self, Digests};
use crate::image_file::{self, Format, ImageInfo};
use crate::image_writer;

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

/// Writes the overlay's contents (`input` plus edits) to `dest` as a standalone image, telling
/// `progress` the percentage done; returns the file's digests when `hash` is set. Uncompressed images
/// are written by cloudimg in one pass that hashes as it writes ([`image_writer`]); a compressed
/// qcow2 is qemu-img's (its tables depend on the compressed sizes, so they cannot precede the data in
/// a one-pass file) and is read once more to be hashed.
pub fn write_image(
    overlay: &Path,
    input: &Path,
    format: Format,
    compress: bool,
    dest: &Path,
    hash: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Option<Digests>> {
    let what = format!("writing the output image {}", dest.display());
    if !(compress && format == Format::Qcow2) {
        cleanup::fault_point("converting");
        let digests = image_writer::write(overlay, input, format, dest, hash, progress).context(what)?;
        cleanup::checkpoint();
        return Ok(digests);
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "qcow2", "-O", "qcow2", "-o", "compat=1.1", "-c", "-p"]).arg(overlay).arg(dest);
    // With hashing to follow, compressing is the first half of the progress.
    let share = if hash { 0.5 } else { 1.0 };
    run_qemu_img_with(&mut cmd, &what, "converting", Some(&mut |percent| progress(percent * share)))?;
    if !hash {
        return Ok(None);
    }
    let total = std::fs::metadata(dest).with_context(|| format!("reading {}", dest.display()))?.len().max(1) as f64;
    hashing::file_digests(dest, &mut |n| progress(50.0 + n as f64 * 50.0 / total)).map(Some)
}

/// Checks a written image the way Glance's format inspection will: the declared format, standalone
/// (no backing or data file), no unknown qcow2 features, qcow2 compat 1.1, the input's virtual size.
pub fn check_written(path: &Path, format: Format, virtual_size: u64) -> Result<ImageInfo> {
    let info = image_file::inspect(path)?;
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

/// Writes a small file (a manifest) through a temporary file, so it is whole or absent.
pub fn write_small_file(path: &Path, text: &str) -> Result<()> {
    let pending = Pending::beside(path)?;
    std::fs::write(pending.path(), text).with_context(|| format!("writing {}", pending.path().display()))?;
    pending.commit(default_file_mode(), None, true)
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

/// A temporary file beside the destination that becomes the destination on [`Pending::commit`] and
/// disappears otherwise (including on Ctrl-C, through [`cleanup`]).
pub struct Pending {
    temp: Option<tempfile::TempPath>,
    dest: PathBuf,
    /// Tells a later run's sweep that this file's writer is alive.
    _alive: cleanup::Alive,
}

impl Pending {
    pub fn beside(dest: &Path) -> Result<Self> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest.file_name().with_context(|| format!("{} names no file", dest.display()))?;
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}{}{}-", name.to_string_lossy(), cleanup::PARTIAL_MARKER, cleanup::owner_tag()))
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        let alive = cleanup::Alive::hold(temp.as_file());
        let temp = temp.into_temp_path();
        cleanup::register(&temp);
        Ok(Pending { temp: Some(temp), dest: dest.to_path_buf(), _alive: alive })
    }

    /// The directory the file is in (the destination's).
    pub fn dir(&self) -> &Path {
        self.path().parent().unwrap_or(Path::new("."))
    }

    pub fn path(&self) -> &Path {
        self.temp.as_ref().expect("present until commit")
    }

    /// Flushes the file, gives it `mode` (and the owner of `like`, for in-place edits), and renames it
    /// over the destination; `replace` allows an existing destination to be replaced.
    pub fn commit(mut self, mode: u32, like: Option<&Path>, replace: bool) -> Result<()> {
        let temp = self.temp.take().expect("present until commit");
        let file = File::open(&temp).with_context(|| format!("opening {}", temp.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", temp.display()))?;
        if let Some(like) = like {
            let meta = std::fs::metadata(like).with_context(|| format!("reading {}", like.display()))?;
            std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
                .with_context(|| format!("setting the owner of {}", temp.display()))?;
        }
        file.sync_all().with_context(|| format!("flushing {} to disk", temp.display()))?;
        let dest = self.dest.clone();
        let temp_path = temp.to_path_buf();
        let result = if replace { temp.persist(&dest).map_err(|e| e.error) } else { persist_noclobber(temp, &dest) };
        result.with_context(|| format!("moving the finished image to {}", dest.display()))?;
        cleanup::unregister(&temp_path);
        cleanup::written(&dest);
        cleanup::fault_point("renamed");
        if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("flushing directory {}", dir.display()))?;
        }
        Ok(())
    }
}

fn persist_noclobber(temp: tempfile::TempPath, dest: &Path) -> std::io::Result<()> {
    // A hard link fails if the destination exists, which makes "keep an existing output" atomic.
    std::fs::hard_link(&temp, dest)?;
    drop(temp);
    Ok(())
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(temp) = &self.temp {
            cleanup::unregister(temp);
        }
    }
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
    fn commit_keeps_an_existing_destination_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        let pending = Pending::beside(&dest).unwrap();
        std::fs::write(pending.path(), b"new").unwrap();
        assert!(pending.commit(0o644, None, false).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is gone");

        let pending = Pending::beside(&dest).unwrap();
        std::fs::write(pending.path(), b"new").unwrap();
        pending.commit(0o640, None, true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o640);
    }

    #[test]
    fn a_written_image_must_be_what_glance_expects() {
        let qcow2 = ImageInfo { format: Format::Qcow2, virtual_size: 100, file_size: 50, qcow2_version: Some(3) };
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
        std::fs::write(pending.path(), b"partial").unwrap();
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
