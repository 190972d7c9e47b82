//! Writes the output image in one front-to-back pass over the guest's data, hashing the bytes as they
//! go to the file. qemu-img convert cannot do this: it writes qcow2 data first and rewrites the tables
//! at the front afterwards, and refuses a pipe as its output, so its output must be read again to be
//! hashed. Here the qcow2 layout is planned up front ([`crate::image::qcow2_layout`]), the data is read on
//! one thread (plain clusters straight from the overlay or the input where qemu located them,
//! compressed ones through qemu-nbd), and written (and handed to the hashing threads) on another.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

use crate::image::hashing::{Digests, Hashing, CHUNK};
use crate::image::header::Format;
use crate::image::overlay_reader::{self, Export, Extent, Source};
use crate::image::qcow2_layout::{Layout, CLUSTER};

/// Reads in flight between the reading and the writing thread.
const READ_AHEAD: usize = 4;

/// Writes the guest contents of `overlay` (whose backing file is `input`) through `dest` (an empty
/// file, open for writing, called `name` in messages) as a standalone `format` image; returns the
/// file's digests when `hash` is set. `progress` gets the percentage of data done.
pub fn write(
    overlay: &Path,
    input: &Path,
    format: Format,
    (dest, name): (&File, &Path),
    hash: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Option<Digests>> {
    let (virtual_size, extents) = overlay_reader::extents(overlay)?;
    let data: Vec<(u64, u64)> =
        extents.iter().filter(|e| e.source != Source::Zeros).map(|e| (e.start, e.length)).collect();
    let layout = Layout::plan(virtual_size, &data);
    let spans: Vec<(u64, u64)> = layout.runs().iter().map(|r| (r.start * CLUSTER, r.count * CLUSTER)).collect();
    let total = spans.iter().map(|&(start, len)| (start + len).min(virtual_size) - start).sum::<u64>().max(1);
    let open = |path: &Path| File::open(path).with_context(|| format!("opening {}", path.display()));
    // Depth 0 in qemu's map is the overlay, depth 1 the input under it.
    let files = [open(overlay)?, open(input)?];
    let mut sink = Sink { file: dest, hashing: hash.then(Hashing::start), at: 0 };
    let write_error = |e| anyhow::Error::from(e).context(format!("writing {}", name.display()));
    if format == Format::Qcow2 {
        layout.write_metadata(&mut |cluster| sink.data(Arc::new(cluster.to_vec()))).map_err(write_error)?;
    }
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = sync_channel::<Result<(u64, Arc<Vec<u8>>)>>(READ_AHEAD);
        let (spans, extents, files) = (&spans, &extents, &files);
        scope.spawn(move || {
            let mut export: Option<Export> = None;
            for_each_piece(spans, extents, virtual_size, &mut |piece| {
                let mut buf = vec![0u8; piece.len];
                let read = match piece.source {
                    Source::Zeros => Ok(()),
                    Source::File { depth, offset } => files[depth as usize]
                        .read_exact_at(&mut buf, offset)
                        .with_context(|| format!("reading {} bytes at offset {offset} of the image's data", piece.len)),
                    Source::Decoded => match &mut export {
                        Some(export) => export.read_at(piece.at, &mut buf),
                        None => Export::open(overlay)
                            .context("opening the edited image for reading")
                            .and_then(|opened| export.insert(opened).read_at(piece.at, &mut buf)),
                    },
                };
                let failed = read.is_err();
                tx.send(read.map(|()| (piece.at, Arc::new(buf)))).is_ok() && !failed
            });
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
        Format::Qcow2 => sink.data(Arc::new(vec![0u8; (layout.file_size() - sink.at) as usize])),
        Format::Raw => sink.hole(virtual_size - sink.at),
    }
    .map_err(write_error)?;
    sink.file.set_len(sink.at).map_err(write_error)?;
    Ok(sink.hashing.map(Hashing::finish))
}

/// A read of at most [`CHUNK`] bytes of the guest's disk at `at`, from one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    at: u64,
    len: usize,
    source: Source,
}

/// Calls `read` with the pieces that cover `spans` (byte ranges in guest order), each span clipped to
/// the disk's end and cut where the sources in `extents` (in order, covering the disk) change; stops
/// when `read` returns false.
fn for_each_piece(spans: &[(u64, u64)], extents: &[Extent], virtual_size: u64, read: &mut dyn FnMut(Piece) -> bool) {
    let mut next = 0;
    for &(start, len) in spans {
        let end = (start + len).min(virtual_size);
        let mut at = start;
        while at < end {
            while next < extents.len() && extents[next].start + extents[next].length <= at {
                next += 1;
            }
            let (source, extent_end) = match extents.get(next).filter(|e| e.start <= at) {
                Some(e) => {
                    let source = match e.source {
                        Source::File { depth, offset } => Source::File { depth, offset: offset + (at - e.start) },
                        other => other,
                    };
                    (source, e.start + e.length)
                }
                None => (Source::Zeros, extents.get(next).map_or(end, |e| e.start)),
            };
            let len = (end.min(extent_end) - at).min(CHUNK as u64);
            if !read(Piece { at, len: len as usize, source }) {
                return;
            }
            at += len;
        }
    }
}

/// The output file with its position, and the hashes of everything that went into it.
struct Sink<'a> {
    file: &'a File,
    hashing: Option<Hashing>,
    at: u64,
}

impl Sink<'_> {
    fn data(&mut self, bytes: Arc<Vec<u8>>) -> std::io::Result<()> {
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
            // The zeros are never read from anywhere: one shared chunk goes to the hashes again and again.
            static ZEROS: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
            let zeros = ZEROS.get_or_init(|| Arc::new(vec![0u8; CHUNK]));
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                hashing.update_shared(if n == CHUNK { Arc::clone(zeros) } else { Arc::new(vec![0u8; n]) });
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
    fn pieces_follow_the_sources_and_are_clipped_to_the_disk() {
        let chunk = CHUNK as u64;
        let extents = [
            Extent { start: 0, length: chunk + 10, source: Source::File { depth: 1, offset: 4096 }, depth: 1 },
            Extent { start: chunk + 10, length: 4 * chunk, source: Source::Zeros, depth: 0 },
            Extent { start: 5 * chunk + 10, length: 2 * chunk, source: Source::Decoded, depth: 1 },
        ];
        let mut pieces = Vec::new();
        let spans = [(0, 2 * chunk), (5 * chunk, 4 * chunk)];
        for_each_piece(&spans, &extents, 6 * chunk + 7, &mut |p| {
            pieces.push((p.at, p.len, p.source));
            true
        });
        let file = |offset| Source::File { depth: 1, offset };
        assert_eq!(
            pieces,
            vec![
                (0, CHUNK, file(4096)),
                (chunk, 10, file(4096 + chunk)),
                (chunk + 10, CHUNK - 10, Source::Zeros),
                (5 * chunk, 10, Source::Zeros),
                (5 * chunk + 10, CHUNK - 3, Source::Decoded),
            ]
        );
        let mut first = Vec::new();
        for_each_piece(&spans, &extents, 6 * chunk, &mut |p| {
            first.push(p.at);
            false
        });
        assert_eq!(first, [0], "stops when asked");
    }
}
