//! Reads what the guest sees through the working overlay (the untouched input plus the edits): where
//! its data lies and in which file, from `qemu-img map`; plain clusters are then read straight from
//! the overlay or the input at the offsets qemu gave, and data only qemu can decode (compressed
//! clusters) through a read-only `qemu-nbd` on a private Unix socket.
//!
//! The overlay is read while the appliance that edited it may still run (editing the next image of a
//! batch) and hold qemu's lock on it, so it is opened with force-share. That is safe because the
//! overlay is cloudimg's own file, complete once the image's filesystems are unmounted (see
//! `session::Shared::each`), and the appliance writes nothing more to it.
//!
//! The same qemu-nbd, serving an output for writing, applies the edits to a copy of the input (see
//! `patch`).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::image::header::Format;
use crate::support::cleanup;

/// How long qemu-nbd may take to open the overlay and listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a range of the guest's disk is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reads as zeros (unallocated, or the zero flag, which trimmed blocks get).
    Zeros,
    /// Plain bytes at `offset` in the overlay (`depth` 0) or in the input under it (`depth` 1), as
    /// qemu located them: read straight from the file.
    File { depth: u32, offset: u64 },
    /// Data qemu must decode (compressed clusters): read through qemu-nbd.
    Decoded,
}

/// A range of the guest's disk: `start` and `length` in bytes, and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub source: Source,
    /// The image in the chain that decides what the range reads as, zeros included: 0 for the image
    /// mapped itself (the overlay: what the edits changed), 1 for its backing file (the input).
    pub depth: u32,
}

/// The most extents read from `qemu-img map`: one per 64 KiB cluster of a 256 GiB disk whose every
/// cluster lies apart from its neighbours in the file, far more than a real image has (a Debian cloud
/// image has a few hundred). The extents are kept for the whole write (about 50 bytes each with the
/// layout's copy, so at most some 200 MiB); a hostile image can make qemu-img report one per cluster.
const MAX_EXTENTS: usize = 1 << 22;

/// The virtual size of `overlay` and its extents, in order, covering the whole disk.
pub fn extents(overlay: &Path) -> Result<(u64, Vec<Extent>)> {
    map(overlay, Format::Qcow2)
}

/// The virtual size of the `format` image `image` and its extents, in order, covering the whole disk.
/// qemu-img's answer is parsed as it arrives, so its text (about 120 bytes an extent) is never held
/// whole.
pub fn map(image: &Path, format: Format) -> Result<(u64, Vec<Extent>)> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["map", "--output=json", "-U", "-f", format.as_str()])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Only an error message comes this way, read once the answer has been parsed.
        .stderr(Stdio::piped());
    cleanup::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("running qemu-img map (is qemu-utils installed?)")?;
    let parsed = parse_map(BufReader::new(child.stdout.take().expect("stdout is piped")), MAX_EXTENTS);
    if parsed.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().context("waiting for qemu-img map")?;
    match parsed {
        Ok(map) if out.status.success() => Ok(map),
        // Killed (by us, above) or done: the answer itself was wrong.
        Err(e) if out.status.success() || out.status.code().is_none() => {
            Err(e.context("reading qemu-img map's answer"))
        }
        _ => bail!("qemu-img map failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
    }
}

#[derive(serde::Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    data: bool,
    zero: bool,
    offset: Option<u64>,
}

impl From<MapEntry> for Extent {
    fn from(e: MapEntry) -> Extent {
        Extent {
            start: e.start,
            length: e.length,
            source: match (e.data && !e.zero, e.offset) {
                (false, _) => Source::Zeros,
                (true, Some(offset)) if e.depth <= 1 => Source::File { depth: e.depth, offset },
                (true, _) => Source::Decoded,
            },
            depth: e.depth,
        }
    }
}

/// Reads qemu-img map's JSON array one entry at a time (serde's sequence access), refusing more than
/// `max` entries; returns the disk's size (the end of the last extent) and the extents.
fn parse_map(reader: impl Read, max: usize) -> Result<(u64, Vec<Extent>)> {
    let mut json = serde_json::Deserializer::from_reader(reader);
    let map = serde::de::DeserializeSeed::deserialize(MapVisitor { max }, &mut json)?;
    json.end()?;
    Ok(map)
}

struct MapVisitor {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for MapVisitor {
    type Value = (u64, Vec<Extent>);

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MapVisitor {
    type Value = (u64, Vec<Extent>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("qemu-img map's array of extents")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let (mut size, mut extents) = (0u64, Vec::new());
        while let Some(entry) = seq.next_element::<MapEntry>()? {
            if extents.len() == self.max {
                return Err(A::Error::custom(format!(
                    "the image is split into more than {} extents, more than cloudimg handles",
                    self.max
                )));
            }
            let end =
                entry.start.checked_add(entry.length).ok_or_else(|| A::Error::custom("an extent ends past 2^64"))?;
            size = size.max(end);
            extents.push(Extent::from(entry));
        }
        Ok((size, extents))
    }
}

/// An NBD export served by a qemu-nbd child that ends with it: the overlay read-only (to decode what
/// only qemu can), or an output being patched (see `patch`).
pub struct Export {
    client: nbd::client::NbdClient<UnixStream>,
    /// The same connection, for the disconnect request the client library cannot send.
    control: UnixStream,
    server: Child,
    _socket_dir: tempfile::TempDir,
}

impl Export {
    /// Serves the overlay read-only.
    pub fn open(overlay: &Path) -> Result<Export> {
        let mut cmd = Command::new("qemu-nbd");
        // The overlay names its backing file and that file's format, so nothing is probed. This
        // qemu-nbd has no --force-share: the option is given in the image's options, where a comma in
        // the file name is written twice.
        let options = format!(
            "driver=qcow2,force-share=on,file.driver=file,file.filename={}",
            overlay.to_str().context("the overlay's path is not UTF-8")?.replace(',', ",,")
        );
        cmd.args(["--read-only", "--image-opts", "--shared=1", "--cache=writeback"]).arg(options);
        Export::serve(cmd)
    }

    /// Serves `file`, a `format` image, for writing, through its descriptor. Zeros written are
    /// recorded as zeros and their space given back (a hole in the file, or a freed qcow2 cluster),
    /// so what the guest deleted and trimmed does not stay in the file.
    pub fn writable(file: &File, format: Format) -> Result<Export> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", format.as_str(), "--cache=writeback", "--discard=unmap", "--detect-zeroes=unmap"]);
        let name = crate::support::child_fd::inherit(&mut cmd, file);
        cmd.arg(name);
        Export::serve(cmd)
    }

    fn serve(mut cmd: Command) -> Result<Export> {
        let socket_dir =
            tempfile::Builder::new().prefix("cloudimg-nbd-").tempdir().context("creating a socket directory")?;
        let socket = socket_dir.path().join("s");
        cmd.arg(format!("--socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cleanup::die_with_parent(&mut cmd);
        let mut server = cmd.spawn().context("running qemu-nbd (is qemu-utils installed?)")?;
        let started = Instant::now();
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break stream;
            }
            if let Some(status) = server.try_wait()? {
                bail!("qemu-nbd stopped ({status}): {}", stderr_of(&mut server));
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = server.kill();
                let _ = server.wait();
                bail!("qemu-nbd did not listen within {} s", START_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let control = stream.try_clone().context("sharing the connection to qemu-nbd")?;
        let mut handshaken = &stream;
        let export = nbd::client::handshake(&mut handshaken, b"").context("greeting qemu-nbd")?;
        let client = nbd::client::NbdClient::new(stream, &export);
        Ok(Export { client, control, server, _socket_dir: socket_dir })
    }

    /// Fills `buf` with the guest's bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.client.seek(SeekFrom::Start(offset))?;
        self.client
            .read_exact(buf)
            .with_context(|| format!("reading {} bytes at offset {offset} through qemu-nbd", buf.len()))
    }

    /// Writes `buf` as the guest's bytes at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.client.seek(SeekFrom::Start(offset))?;
        self.client
            .write_all(buf)
            // The NBD library names the server's errno without its text.
            .map_err(|e| match e.to_string().as_str() {
                "ENOSPC" => std::io::Error::from_raw_os_error(libc::ENOSPC),
                "EIO" => std::io::Error::from_raw_os_error(libc::EIO),
                _ => e,
            })
            .with_context(|| format!("writing {} bytes at offset {offset} through qemu-nbd", buf.len()))
    }

    /// Makes qemu write everything out and flush the file, then ends the connection and waits for
    /// qemu-nbd to close the image and exit.
    pub fn finish(mut self) -> Result<()> {
        self.client.flush().context("flushing the image through qemu-nbd")?;
        // NBD_CMD_DISC: the request header with command 2 and nothing else; there is no reply.
        let mut disconnect = [0u8; 28];
        disconnect[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
        disconnect[6..8].copy_from_slice(&2u16.to_be_bytes());
        self.control.write_all(&disconnect).context("ending the connection to qemu-nbd")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.server.try_wait().context("waiting for qemu-nbd")? {
                if !status.success() {
                    bail!("qemu-nbd failed ({status}): {}", stderr_of(&mut self.server));
                }
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("qemu-nbd did not close the image within {} s", START_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What a finished qemu-nbd said on its error output.
fn stderr_of(server: &mut Child) -> String {
    let mut text = String::new();
    let _ = server.stderr.take().map(|mut e| e.read_to_string(&mut text));
    text.trim().to_string()
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_tells_where_each_range_is_read_from() {
        let json = br#"[
            {"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
            {"start": 65536, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false},
            {"start": 196608, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true},
            {"start": 262144, "length": 1048576, "depth": 1, "present": false, "zero": true, "data": false}
        ]"#;
        let (size, extents) = parse_map(&json[..], MAX_EXTENTS).unwrap();
        assert_eq!(size, 1310720);
        let sources: Vec<Source> = extents.iter().map(|e| e.source).collect();
        let file = Source::File { depth: 0, offset: 327680 };
        assert_eq!(sources, [file, Source::Zeros, Source::Decoded, Source::Zeros]);
        assert!(parse_map(&b"{}"[..], MAX_EXTENTS).is_err());
        assert!(parse_map(&b"[] trailing"[..], MAX_EXTENTS).is_err());
        let err = parse_map(&json[..], 3).unwrap_err().to_string();
        assert!(err.contains("more than 3 extents"), "{err}");
        let overflow = br#"[{"start": 18446744073709551615, "length": 2, "depth": 0, "zero": true, "data": false}]"#;
        assert!(parse_map(&overflow[..], MAX_EXTENTS).unwrap_err().to_string().contains("past 2^64"));
    }

    /// An answer that never ends, as a hostile image could make qemu-img print: the parser stops at the
    /// cap after reading only that many entries, where reading the whole answer first would never end.
    #[test]
    fn an_endless_map_is_cut_off_at_the_cap() {
        struct Endless {
            entries: u64,
            pending: std::io::Cursor<Vec<u8>>,
        }
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.pending.position() == self.pending.get_ref().len() as u64 {
                    let entry = r#"{"start": 0, "length": 1, "depth": 0, "zero": true, "data": false},"#;
                    self.pending = std::io::Cursor::new(entry.as_bytes().to_vec());
                    self.entries += 1;
                }
                self.pending.read(buf)
            }
        }
        let mut source = Endless { entries: 0, pending: std::io::Cursor::new(b"[".to_vec()) };
        let err = parse_map(BufReader::new(&mut source), 10_000).unwrap_err().to_string();
        assert!(err.contains("more than 10000 extents"), "{err}");
        assert!(source.entries < 10_200, "read {} entries", source.entries);
    }
}
