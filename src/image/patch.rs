//! The quick way to an output of the input's own format when the input file is itself a valid output
//! (`ImageInfo::copyable`): the input file is copied beside the destination while the appliance
//! starts, when the disk has nothing else to do, and once the image's edits are done only what they
//! changed is written into the copy, through a qemu-nbd serving it, so that qemu keeps the qcow2
//! tables right. Writing the output afresh (`writer`) reads and writes the whole disk after the
//! edits; this leaves a few MiB for then.
//!
//! What the edits changed is what the working overlay holds itself (depth 0 in qemu's map): its data,
//! and the zeros that trimming left where the input had data. Zeros are written as zeros that give
//! their space back (see [`Export::writable`]), so deleted files do not stay in the copy.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::image::hashing::CHUNK;
use crate::image::header::{self, Format};
use crate::image::output::Pending;
use crate::image::overlay_reader::{self, Export, Extent, Source};

/// The input copied into the output's temporary file, with the input's map as it was copied.
pub struct Copied {
    pub pending: Pending,
    input_map: Vec<Extent>,
    /// Bytes of data copied (holes are not).
    pub bytes: u64,
}

/// Whether qemu finds the `format` image `input` sound (`qemu-img check`: no corruption, no leaked
/// cluster). Only a sound image is given to a writable qemu: an unsound one is written afresh, read
/// as the guest sees it.
pub fn sound(input: &Path, format: Format) -> bool {
    if format == Format::Raw {
        return true;
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "-q", "-U", "-f", "qcow2"])
        .arg(input)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    crate::support::cleanup::die_with_parent(&mut cmd);
    cmd.status().is_ok_and(|status| status.success())
}

impl Copied {
    /// Copies the `format` image `input` into `pending`, hole for hole, and flushes it; `progress`
    /// gets the percentage done.
    pub fn make(input: &Path, format: Format, pending: Pending, progress: &mut dyn FnMut(f64)) -> Result<Copied> {
        let (_, input_map) = overlay_reader::map(input, format)?;
        let source = header::open(input)?;
        let bytes = copy_data(&source, pending.file(), progress)
            .with_context(|| format!("copying {} to {}", input.display(), pending.path().display()))?;
        pending.flush()?;
        Ok(Copied { pending, input_map, bytes })
    }

    /// What the edits in `overlay` (whose backing file is the input) changed, to write into the copy.
    pub fn edits(&self, overlay: &Path) -> Result<Edits> {
        let (_, overlay_map) = overlay_reader::extents(overlay)?;
        let mut patches = plan(&self.input_map, &overlay_map)?;
        // Zeros first: the clusters they free are where qemu then puts the new data, instead of at the
        // end of the file, which would make the output larger than the input.
        patches.sort_by_key(|patch| patch.data_at.is_some());
        Ok(Edits { patches })
    }

    /// Writes `edits`, read from `overlay`, into the copy and flushes it; returns the bytes written.
    pub fn apply(&self, Edits { patches }: Edits, overlay: &Path, format: Format) -> Result<u64> {
        let edits = File::open(overlay).with_context(|| format!("opening {}", overlay.display()))?;
        let mut export = Export::writable(self.pending.file(), format)
            .with_context(|| format!("opening {} to write the edits into it", self.pending.path().display()))?;
        let zeros = vec![0u8; CHUNK];
        let mut buf = vec![0u8; CHUNK];
        let mut written = 0;
        for patch in patches {
            let mut done = 0;
            while done < patch.length {
                let n = (patch.length - done).min(CHUNK as u64) as usize;
                let bytes = match patch.data_at {
                    Some(offset) => {
                        edits.read_exact_at(&mut buf[..n], offset + done).context("reading the edits")?;
                        &buf[..n]
                    }
                    None => &zeros[..n],
                };
                export.write_at(patch.start + done, bytes)?;
                done += n as u64;
            }
            written += patch.length;
        }
        export.finish()?;
        Ok(written)
    }
}

/// Beyond this many bytes of the input's data zeroed by the edits (a deleted file, trimmed), the copy
/// would keep their room in the file (freed clusters inside it: holes on disk, but not in its size,
/// nor in what an upload sends): the output is then written afresh instead, as small as its data.
pub const MOST_ZEROED: u64 = 4 << 20;

/// The ranges to write into the copy of the input.
pub struct Edits {
    patches: Vec<Patch>,
}

impl Edits {
    /// Bytes of the input's data the edits turned into zeros.
    pub fn zeroed(&self) -> u64 {
        self.patches.iter().filter(|p| p.data_at.is_none()).map(|p| p.length).sum()
    }
}

/// A guest range to write into the copy of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Patch {
    start: u64,
    length: u64,
    /// Where the overlay file holds the range's new bytes; `None`: it now reads as zeros.
    data_at: Option<u64>,
}

/// What turns the input (mapped as `input`) into the edited disk (the overlay, mapped as `overlay`):
/// the overlay's own data, and its own zeros where the input had data (elsewhere the copy reads as
/// zeros already). Both maps are in guest order, as qemu-img gives them.
fn plan(input: &[Extent], overlay: &[Extent]) -> Result<Vec<Patch>> {
    let mut patches = Vec::new();
    let mut next = 0;
    for e in overlay.iter().filter(|e| e.depth == 0) {
        let end = e.start + e.length;
        match e.source {
            Source::File { offset, .. } => {
                patches.push(Patch { start: e.start, length: e.length, data_at: Some(offset) })
            }
            Source::Decoded => bail!("the working overlay holds compressed data at offset {}", e.start),
            Source::Zeros => {
                while input.get(next).is_some_and(|i| i.start + i.length <= e.start) {
                    next += 1;
                }
                for i in input[next..].iter().take_while(|i| i.start < end).filter(|i| i.source != Source::Zeros) {
                    let start = i.start.max(e.start);
                    patches.push(Patch { start, length: (i.start + i.length).min(end) - start, data_at: None });
                }
            }
        }
    }
    Ok(patches)
}

/// Copies the data of `source` into `dest` (empty) at the same offsets, leaving holes where `source`
/// has them, and gives `dest` its length; returns the bytes copied. Where the filesystem shares
/// blocks between files (XFS, btrfs) the copy is a reflink and costs nothing. `progress` gets the
/// percentage of the file done.
fn copy_data(source: &File, dest: &File, progress: &mut dyn FnMut(f64)) -> std::io::Result<u64> {
    let len = source.metadata()?.len();
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open.
    if unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE, source.as_raw_fd()) } == 0 {
        progress(100.0);
        return Ok(len);
    }
    let (mut at, mut copied) = (0, 0);
    while at < len {
        let Some(start) = seek(source, at, libc::SEEK_DATA)? else { break };
        let end = seek(source, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut piece = start;
        while piece < end {
            let n = (end - piece).min(PROGRESS_STEP);
            copy_range(source, dest, piece, n)?;
            piece += n;
            progress(piece as f64 * 100.0 / len as f64);
        }
        copied += end - start;
        at = end;
    }
    dest.set_len(len)?;
    progress(100.0);
    Ok(copied)
}

/// How much is copied between two progress reports.
const PROGRESS_STEP: u64 = 64 << 20;

/// `FICLONE` from linux/fs.h: `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// The next offset from `from` where data (`SEEK_DATA`) or a hole (`SEEK_HOLE`) starts; `None` when no
/// data follows. A filesystem that cannot tell holes has data everywhere.
fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) on a descriptor this process holds open.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) if whence == libc::SEEK_DATA => Ok(None),
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(from as u64)),
        Some(libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

/// Copies `len` bytes at `offset` of `source` to the same offset of `dest`, in the kernel where it can
/// (copy_file_range), through a buffer otherwise.
fn copy_range(source: &File, dest: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (mut from, mut to) = (offset as libc::loff_t, offset as libc::loff_t);
    let end = offset + len;
    while (from as u64) < end {
        let want = (end - from as u64).min(1 << 30) as usize;
        // SAFETY: copy_file_range(2) on descriptors this process holds open, with offsets it owns.
        let n = unsafe { libc::copy_file_range(source.as_raw_fd(), &mut from, dest.as_raw_fd(), &mut to, want, 0) };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the input ended while it was copied"));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                return copy_through_buffer(source, dest, from as u64, end - from as u64)
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

fn copy_through_buffer(source: &File, dest: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        source.read_exact_at(&mut buf[..n], offset + done)?;
        dest.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(start: u64, length: u64, source: Source, depth: u32) -> Extent {
        Extent { start, length, source, depth }
    }

    #[test]
    fn the_overlays_own_data_and_zeros_over_the_inputs_data_are_written() {
        let data = |offset| Source::File { depth: 1, offset };
        let input = [
            extent(0, 100, data(1000), 0),
            extent(100, 100, Source::Zeros, 0),
            extent(200, 100, Source::Decoded, 0),
            extent(300, 700, Source::Zeros, 0),
        ];
        let overlay = [
            // Unchanged input data: nothing to write.
            extent(0, 50, data(1000), 1),
            // Trimmed: the input had data in 50..100 and 200..300, not in 100..200.
            extent(50, 250, Source::Zeros, 0),
            extent(300, 100, Source::Zeros, 1),
            // New data where the input read as zeros.
            extent(400, 64, Source::File { depth: 0, offset: 7 }, 0),
            // Zeros where the input had none: nothing to write.
            extent(464, 536, Source::Zeros, 0),
        ];
        assert_eq!(
            plan(&input, &overlay).unwrap(),
            [
                Patch { start: 50, length: 50, data_at: None },
                Patch { start: 200, length: 100, data_at: None },
                Patch { start: 400, length: 64, data_at: Some(7) },
            ]
        );
        let compressed = [extent(0, 64, Source::Decoded, 0)];
        assert!(plan(&input, &compressed).unwrap_err().to_string().contains("compressed"));
        assert_eq!(plan(&input, &[]).unwrap(), []);
    }

    #[test]
    fn a_copy_keeps_the_holes_and_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let source = File::options().read(true).write(true).create_new(true).open(dir.path().join("in")).unwrap();
        source.write_all_at(b"first", 4096).unwrap();
        source.write_all_at(b"second", 10 << 20).unwrap();
        source.set_len(20 << 20).unwrap();
        let dest = File::options().read(true).write(true).create_new(true).open(dir.path().join("out")).unwrap();
        let mut last = 0.0;
        let copied = copy_data(&source, &dest, &mut |p| last = p).unwrap();
        assert_eq!(last, 100.0);
        assert_eq!(dest.metadata().unwrap().len(), 20 << 20);
        let mut buf = [0u8; 6];
        dest.read_exact_at(&mut buf[..5], 4096).unwrap();
        assert_eq!(&buf[..5], b"first");
        dest.read_exact_at(&mut buf, 10 << 20).unwrap();
        assert_eq!(&buf, b"second");
        // Both written blocks, not the 20 MiB around them (tmpfs and ext4 tell holes at 4 KiB).
        assert!(copied < 1 << 20, "{copied} bytes copied");
        use std::os::unix::fs::MetadataExt;
        assert!(dest.metadata().unwrap().blocks() * 512 < 1 << 20, "the holes stayed holes");
    }
}
