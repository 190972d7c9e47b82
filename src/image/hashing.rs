//! The two digests Glance records for an image — `checksum` (MD5) and `os_hash_value` (SHA-512) —
//! computed on two threads at once from the bytes as they pass (a file read once, or an upload).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use sha2::Digest;

/// Bytes handed to the hashing threads at a time; with the channel's depth (`QUEUE`) it bounds the memory in flight.
pub const CHUNK: usize = 1 << 20;
const QUEUE: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Digests {
    /// Lower-case hex, as Glance's `checksum`.
    pub md5: String,
    /// Lower-case hex, as Glance's `os_hash_value` with `os_hash_algo: sha512`.
    pub sha512: String,
}

/// MD5 and SHA-512 running on their own threads; feed with [`Hashing::update`].
pub struct Hashing {
    senders: Vec<SyncSender<Arc<Vec<u8>>>>,
    workers: Vec<JoinHandle<String>>,
}

fn worker<D: Digest + Send + 'static>() -> (SyncSender<Arc<Vec<u8>>>, JoinHandle<String>) {
    let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(QUEUE);
    let handle = std::thread::spawn(move || {
        let mut digest = D::new();
        for chunk in rx {
            digest.update(chunk.as_slice());
        }
        hex(&digest.finalize())
    });
    (tx, handle)
}

impl Hashing {
    pub fn start() -> Self {
        let (md5_tx, md5) = worker::<md5::Md5>();
        let (sha_tx, sha) = worker::<sha2::Sha512>();
        Hashing { senders: vec![md5_tx, sha_tx], workers: vec![md5, sha] }
    }

    pub fn update(&self, bytes: &[u8]) {
        self.update_shared(Arc::new(bytes.to_vec()));
    }

    /// Like [`Hashing::update`], without copying bytes the caller already shares.
    pub fn update_shared(&self, chunk: Arc<Vec<u8>>) {
        for sender in &self.senders {
            // A worker only stops when its sender is dropped, so sending cannot fail.
            let _ = sender.send(Arc::clone(&chunk));
        }
    }

    pub fn finish(self) -> Digests {
        drop(self.senders);
        let mut results = self.workers.into_iter().map(|w| w.join().expect("a hashing thread does not panic"));
        let md5 = results.next().expect("two workers");
        let sha512 = results.next().expect("two workers");
        Digests { md5, sha512 }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `file` (called `path` in messages) once from its start and returns its digests; `progress`
/// gets the bytes read so far.
pub fn file_digests(mut file: &File, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<Digests> {
    file.seek(SeekFrom::Start(0)).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = HashingReader::new(file, progress);
    // Big reads: each one is a message to both hashing threads.
    let mut buffer = vec![0u8; CHUNK];
    while reader.read(&mut buffer).with_context(|| format!("reading {}", path.display()))? > 0 {}
    Ok(reader.finish())
}

/// A reader that hashes what passes through it (for an upload: one read of the file for both), and
/// tells `progress` the bytes read so far.
pub struct HashingReader<'a, R> {
    inner: R,
    hashing: Hashing,
    progress: &'a mut dyn FnMut(u64),
    /// Bytes read so far.
    pub bytes: u64,
}

impl<'a, R: Read> HashingReader<'a, R> {
    pub fn new(inner: R, progress: &'a mut dyn FnMut(u64)) -> Self {
        HashingReader { inner, hashing: Hashing::start(), progress, bytes: 0 }
    }

    pub fn finish(self) -> Digests {
        self.hashing.finish()
    }
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hashing.update(&buf[..n]);
        self.bytes += n as u64;
        (self.progress)(self.bytes);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_known_values() {
        let hashing = Hashing::start();
        hashing.update(b"ab");
        hashing.update(b"c");
        let d = hashing.finish();
        assert_eq!(d.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert!(d.sha512.starts_with("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"));
        assert_eq!(d.sha512.len(), 128);
    }

    #[test]
    fn a_file_read_in_chunks_hashes_like_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..(CHUNK * 2 + 12345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = 0;
        let mut file = File::open(&path).unwrap();
        file.seek(SeekFrom::End(0)).unwrap();
        let from_file = file_digests(&file, &path, &mut |n| seen = n).unwrap();
        assert_eq!(seen, bytes.len() as u64);
        let whole = Hashing::start();
        whole.update(&bytes);
        assert_eq!(from_file, whole.finish());
    }
}
