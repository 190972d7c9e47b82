//! Reads what the guest sees through the working overlay (the untouched input plus the edits): where
//! its data lies and in which file, from `qemu-img map`; plain clusters are then read straight from
//! the overlay or the input at the offsets qemu gave, and data only qemu can decode (compressed
//! clusters) through a read-only `qemu-nbd` on a private Unix socket.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cleanup;

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
}

/// The virtual size of `overlay` and its extents, in order, covering the whole disk.
pub fn extents(overlay: &Path) -> Result<(u64, Vec<Extent>)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(overlay)
        .stdin(Stdio::null())
        .output()
        .context("running qemu-img map (is qemu-utils installed?)")?;
    if !out.status.success() {
        bail!("qemu-img map failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_map(&out.stdout).context("reading qemu-img map's answer")
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

fn parse_map(json: &[u8]) -> Result<(u64, Vec<Extent>)> {
    let entries: Vec<MapEntry> = serde_json::from_slice(json)?;
    let size = entries.iter().map(|e| e.start + e.length).max().unwrap_or(0);
    let extents = entries
        .iter()
        .map(|e| Extent {
            start: e.start,
            length: e.length,
            source: match (e.data && !e.zero, e.offset) {
                (false, _) => Source::Zeros,
                (true, Some(offset)) if e.depth <= 1 => Source::File { depth: e.depth, offset },
                (true, _) => Source::Decoded,
            },
        })
        .collect();
    Ok((size, extents))
}

/// A read-only NBD export of the overlay, served by a qemu-nbd child that ends with it.
pub struct Export {
    client: nbd::client::NbdClient<UnixStream>,
    server: Child,
    _socket_dir: tempfile::TempDir,
}

impl Export {
    pub fn open(overlay: &Path) -> Result<Export> {
        let socket_dir =
            tempfile::Builder::new().prefix("cloudimg-nbd-").tempdir().context("creating a socket directory")?;
        let socket = socket_dir.path().join("s");
        let mut cmd = Command::new("qemu-nbd");
        // The overlay names its backing file and that file's format, so nothing is probed.
        cmd.args(["--read-only", "--format=qcow2", "--shared=1", "--cache=writeback"])
            .arg(format!("--socket={}", socket.display()))
            .arg(overlay)
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
                let mut text = String::new();
                let _ = server.stderr.take().map(|mut e| e.read_to_string(&mut text));
                bail!("qemu-nbd stopped ({status}): {}", text.trim());
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = server.kill();
                let _ = server.wait();
                bail!("qemu-nbd did not listen within {} s", START_TIMEOUT.as_secs());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut handshaken = &stream;
        let export = nbd::client::handshake(&mut handshaken, b"").context("greeting qemu-nbd")?;
        let client = nbd::client::NbdClient::new(stream, &export);
        Ok(Export { client, server, _socket_dir: socket_dir })
    }

    /// Fills `buf` with the guest's bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.client.seek(SeekFrom::Start(offset))?;
        self.client
            .read_exact(buf)
            .with_context(|| format!("reading {} bytes at offset {offset} through qemu-nbd", buf.len()))
    }
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
        let (size, extents) = parse_map(json).unwrap();
        assert_eq!(size, 1310720);
        let sources: Vec<Source> = extents.iter().map(|e| e.source).collect();
        let file = Source::File { depth: 0, offset: 327680 };
        assert_eq!(sources, [file, Source::Zeros, Source::Decoded, Source::Zeros]);
        assert!(parse_map(b"{}").is_err());
    }
}
