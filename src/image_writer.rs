//! Writes the output image in one front-to-back pass over the guest's data, hashing the bytes as they
//! go to the file. qemu-img convert cannot do this: it writes qcow2 data first and rewrites the tables
//! at the front afterwards, and refuses a pipe as its output, so its output must be read again to be
//! hashed. Here the qcow2 layout is planned up front ([`crate::qcow2_layout`]), the data is read from
//! the overlay through qemu-nbd on one thread, and written (and handed to the hashing threads) on
//! another.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::hashing::{Digests, Hashing, CHUNK};
use crate::image_file::Format;
use crate::overlay_reader::{self, Export};
use crate::qcow2_layout::{Layout, CLUSTER};

/// Reads in flight between the reading and the writing thread.
const READ_AHEAD: usize = 4;

/// Writes the overlay's guest contents to `dest` (an existing, empty file) as a standalone `format`
/// image; returns the file's digests when `hash` is set. `progress` gets the percentage of data done.
pub fn write(
    overlay: &Path,
    format: Format,
    dest: &Path,
    hash: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Option<Digests>> {
    let (virtual_size, extents) = overlay_reader::data_extents(overlay)?;
    let layout = Layout::plan(virtual_size, &extents);
    let reads = reads(layout.runs().iter().map(|r| (r.start * CLUSTER, r.count * CLUSTER)), virtual_size);
    let total: u64 = reads.iter().map(|&(_, len)| len as u64).sum::<u64>().max(1);
    let export = Export::open(overlay).context("opening the edited image for reading")?;
    let file =
        File::options().write(true).truncate(true).open(dest).with_context(|| format!("opening {}", dest.display()))?;
    let mut sink = Sink { file, hashing: hash.then(Hashing::start), at: 0 };
    let write_error = |e| anyhow::Error::from(e).context(format!("writing {}", dest.display()));
    if format == Format::Qcow2 {
        layout.write_metadata(&mut |cluster| sink.data(Arc::from(cluster))).map_err(write_error)?;
    }
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = sync_channel::<Result<(u64, Arc<[u8]>)>>(READ_AHEAD);
        let reads = &reads;
        scope.spawn(move || {
            let mut export = export;
            for &(offset, len) in reads {
                let mut buf = vec![0u8; len];
                let piece = export.read_at(offset, &mut buf).map(|()| (offset, Arc::from(buf)));
                let failed = piece.is_err();
                if tx.send(piece).is_err() || failed {
                    return;
                }
            }
        });
        let mut done = 0u64;
        for piece in rx {
            let (offset, bytes) = piece.context("reading the edited image")?;
            if format == Format::Raw {
                sink.hole(offset - sink.at).map_err(write_error)?;
            }
            done += bytes.len() as u64;
            sink.data(bytes).map_err(write_error)?;
            progress(done as f64 * 100.0 / total as f64);
        }
        Ok(())
    })?;
    match format {
        // The last cluster is whole even where the disk ends inside it.
        Format::Qcow2 => sink.data(Arc::from(vec![0u8; (layout.file_size() - sink.at) as usize])),
        Format::Raw => sink.hole(virtual_size - sink.at),
    }
    .map_err(write_error)?;
    sink.file.set_len(sink.at).map_err(write_error)?;
    Ok(sink.hashing.map(Hashing::finish))
}

/// The reads that cover `spans` (byte ranges in guest order), clipped to the disk's end and cut into
/// pieces of at most [`CHUNK`] bytes.
fn reads(spans: impl Iterator<Item = (u64, u64)>, virtual_size: u64) -> Vec<(u64, usize)> {
    let mut reads = Vec::new();
    for (start, len) in spans {
        let end = (start + len).min(virtual_size);
        let mut at = start;
        while at < end {
            let piece = (end - at).min(CHUNK as u64);
            reads.push((at, piece as usize));
            at += piece;
        }
    }
    reads
}

/// The output file with its position, and the hashes of everything that went into it.
struct Sink {
    file: File,
    hashing: Option<Hashing>,
    at: u64,
}

impl Sink {
    fn data(&mut self, bytes: Arc<[u8]>) -> std::io::Result<()> {
        self.file.write_all(&bytes)?;
        self.at += bytes.len() as u64;
        if let Some(hashing) = &self.hashing {
            hashing.update_shared(bytes);
        }
        Ok(())
    }

    /// `len` bytes of zeros left as a hole in the file (raw images), hashed as the zeros they read as.
    fn hole(&mut self, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.at = self.file.seek(SeekFrom::Current(len as i64))?;
        if let Some(hashing) = &self.hashing {
            let zeros: Arc<[u8]> = Arc::from(vec![0u8; CHUNK]);
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                hashing.update_shared(if n == CHUNK { Arc::clone(&zeros) } else { Arc::from(&zeros[..n]) });
                left -= n as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_clipped_to_the_disk_and_cut_into_chunks() {
        let chunk = CHUNK as u64;
        let reads = reads([(0, 2 * chunk + 10), (5 * chunk, 4 * chunk)].into_iter(), 6 * chunk + 7);
        assert_eq!(reads, vec![(0, CHUNK), (chunk, CHUNK), (2 * chunk, 10), (5 * chunk, CHUNK), (6 * chunk, 7)]);
    }
}
