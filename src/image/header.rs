//! What kind of disk image a file is, read from its own header by this code, so that neither qemu nor
//! libguestfs ever probes the format of an untrusted file.
//!
//! A qcow2 that names a backing file or an external data file would make qemu read another host file
//! into the guest (and into our output), so it is refused, as are unknown incompatible features,
//! encryption, and headers whose tables lie beyond the end of the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::support::exit_codes::{with_code, BAD_INPUT};

/// A disk image format we pass to libguestfs and qemu-img explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// The facts about an image file that decide whether it is safe to open.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImageInfo {
    pub format: Format,
    pub virtual_size: u64,
    pub file_size: u64,
    /// qcow2 version (2 or 3); `None` for raw.
    pub qcow2_version: Option<u32>,
    /// The file itself, copied, would be a valid output of its format: a regular raw file, or a
    /// qcow2 compat 1.1 that holds nothing but the disk (no snapshots, bitmaps or feature flags).
    pub copyable: bool,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// qcow2 incompatible feature bits we understand: dirty, corrupt, external data file, compression
/// type, extended L2 entries. Anything else may change how the file must be read.
const QCOW2_KNOWN_INCOMPATIBLE: u64 = 0b1_1111;
const QCOW2_CORRUPT: u64 = 1 << 1;
const QCOW2_EXTERNAL_DATA: u64 = 1 << 2;
const QCOW2_EXT_DATA_FILE_NAME: u32 = 0x4441_5441;
const QCOW2_EXT_END: u32 = 0;

/// How much of the file the header checks need: the qcow2 header and its extensions live in the
/// first cluster (at most 2 MiB); for raw files the partition tables and superblocks are in the first
/// 68 KiB.
const HEADER_READ: usize = 2 << 20;

/// The largest virtual size accepted, 64 TiB: the largest disk the big clouds offer (AWS io2 Block
/// Express, Google Persistent Disk, Azure Ultra Disk) and the VHDX format's maximum. A header may claim
/// anything up to exabytes in a file of a few MiB, and a raw output with a manifest hashes every byte
/// of the disk (zeros included: MD5 and SHA-512 cannot skip them), at a few hundred MB/s.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Opens nothing but the file itself: reads its first bytes and decides. An input that is refused
/// here is refused before opening (exit status 3).
pub fn inspect(path: &Path) -> Result<ImageInfo> {
    open(path).and_then(|file| inspect_file(&file, path)).map_err(with_code(BAD_INPUT))
}

/// Opens an image file for reading, after looking at what the name refers to: opening a FIFO would
/// block, and opening a device can have effects of its own.
pub fn open(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    refuse_special(meta.file_type(), path)?;
    File::open(path).with_context(|| format!("opening {}", path.display()))
}

/// [`inspect`] for a file already open, read through its descriptor (never by its name, which others
/// may have changed since); `path` names it in messages.
pub fn inspect_file(file: &File, path: &Path) -> Result<ImageInfo> {
    let meta = file.metadata().with_context(|| format!("reading {}", path.display()))?;
    refuse_special(meta.file_type(), path)?;
    let head = read_head(file).with_context(|| format!("reading {}", path.display()))?;
    // A block device (a disk, an LVM volume, a loop device) has no file size: its end is its size.
    let size = if meta.file_type().is_block_device() {
        let mut device = file;
        device.seek(SeekFrom::End(0)).with_context(|| format!("finding the size of {}", path.display()))?
    } else {
        meta.len()
    };
    let info = classify(&head, size).with_context(|| format!("{} cannot be used", path.display()))?;
    Ok(ImageInfo { copyable: info.copyable && meta.is_file(), ..info })
}

fn refuse_special(file_type: std::fs::FileType, path: &Path) -> Result<()> {
    if file_type.is_dir() {
        bail!("{} is a directory, not a disk image", path.display());
    }
    if file_type.is_char_device() || file_type.is_fifo() || file_type.is_socket() {
        bail!("{} is a device, pipe or socket, not a disk image file", path.display());
    }
    Ok(())
}

/// The first [`HEADER_READ`] bytes (fewer in a smaller file), read at offset 0 whatever the file's
/// position (an output is checked right after it was written).
fn read_head(file: &File) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; HEADER_READ];
    let mut len = 0;
    while len < head.len() {
        match file.read_at(&mut head[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(len);
    Ok(head)
}

/// What a qcow2 header says, even when the file is refused: (version, virtual size).
pub fn qcow2_basics(path: &Path) -> Option<(u32, u64)> {
    let mut head = [0u8; 32];
    File::open(path).ok()?.read_exact(&mut head).ok()?;
    head.starts_with(QCOW2_MAGIC).then(|| Some((be32(&head, 4)?, be64(&head, 24)?))).flatten()
}

/// Decides from the first bytes of a file of `file_size` bytes.
pub fn classify(head: &[u8], file_size: u64) -> Result<ImageInfo> {
    if file_size == 0 {
        bail!("the file is empty");
    }
    if head.starts_with(QCOW2_MAGIC) {
        return qcow2(head, file_size);
    }
    if let Some(name) = foreign_format(head) {
        bail!(
            "it is a {name} image; convert it first, e.g. `qemu-img convert -f {} -O qcow2 IN OUT.qcow2`",
            name.to_lowercase()
        );
    }
    raw(head, file_size)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn qcow2(h: &[u8], file_size: u64) -> Result<ImageInfo> {
    let truncated = || anyhow::anyhow!("the qcow2 header is truncated");
    let version = be32(h, 4).ok_or_else(truncated)?;
    if !(2..=3).contains(&version) {
        bail!("qcow2 version {version} is not supported (only 2 and 3 exist)");
    }
    let backing_offset = be64(h, 8).ok_or_else(truncated)?;
    let backing_size = be32(h, 16).ok_or_else(truncated)?;
    if backing_offset != 0 || backing_size != 0 {
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|o| h.get(o..o + backing_size as usize))
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        bail!(
            "the qcow2 names a backing file `{name}`, which would pull another file's contents in; \
             make it standalone first with `qemu-img convert -O qcow2 IN OUT.qcow2` if you trust it"
        );
    }
    let cluster_bits = be32(h, 20).ok_or_else(truncated)?;
    if !(9..=21).contains(&cluster_bits) {
        bail!("the qcow2 header has an impossible cluster size (2^{cluster_bits})");
    }
    let virtual_size = be64(h, 24).ok_or_else(truncated)?;
    if be32(h, 32).ok_or_else(truncated)? != 0 {
        bail!("the qcow2 is encrypted; cloudimg does not handle encrypted images");
    }
    let l1_size = u64::from(be32(h, 36).ok_or_else(truncated)?);
    let l1_offset = be64(h, 40).ok_or_else(truncated)?;
    let refcount_offset = be64(h, 48).ok_or_else(truncated)?;
    let refcount_clusters = u64::from(be32(h, 56).ok_or_else(truncated)?);
    let cluster_size = 1u64 << cluster_bits;
    // Each L1 entry maps one L2 table's worth of clusters; a virtual size the L1 table cannot map is a lie.
    let bytes_per_l1_entry = u128::from(cluster_size) * u128::from(cluster_size / 8);
    let l1_needed = u128::from(virtual_size).div_ceil(bytes_per_l1_entry);
    if l1_needed > u128::from(l1_size) {
        bail!(
            "the qcow2 header lies about its size: {virtual_size} bytes need {l1_needed} L1 table entries, \
             the header gives {l1_size}"
        );
    }
    check_virtual_size(virtual_size)?;
    let within = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= file_size);
    if !within(l1_offset, l1_size * 8) || !within(refcount_offset, refcount_clusters * cluster_size) {
        bail!("the file is truncated: its qcow2 tables point beyond its end ({file_size} bytes)");
    }
    if version == 3 {
        let incompatible = be64(h, 72).ok_or_else(truncated)?;
        if incompatible & QCOW2_EXTERNAL_DATA != 0 || has_data_file_extension(h) {
            bail!("the qcow2 keeps its data in an external data file, which would pull another file's contents in");
        }
        if incompatible & QCOW2_CORRUPT != 0 {
            bail!("the qcow2 is marked corrupt; check it with `qemu-img check -r all`");
        }
        let unknown = incompatible & !QCOW2_KNOWN_INCOMPATIBLE;
        if unknown != 0 {
            bail!("the qcow2 uses incompatible features this tool does not know (bits {unknown:#x})");
        }
    }
    // Snapshots keep old states of the disk in the file, bitmaps and the dirty flag need qemu's care.
    let copyable = version == 3 && be64(h, 72) == Some(0) && be32(h, 60) == Some(0) && be64(h, 88) == Some(0);
    Ok(ImageInfo { format: Format::Qcow2, virtual_size, file_size, qcow2_version: Some(version), copyable })
}

fn check_virtual_size(virtual_size: u64) -> Result<()> {
    if virtual_size > MAX_VIRTUAL_SIZE {
        bail!(
            "its header claims a disk of {virtual_size} bytes ({:.1} TiB), over cloudimg's limit of {} TiB \
             (the largest disk a cloud offers)",
            virtual_size as f64 / (1u64 << 40) as f64,
            MAX_VIRTUAL_SIZE >> 40
        );
    }
    Ok(())
}

fn has_data_file_extension(h: &[u8]) -> bool {
    let Some(header_len) = be32(h, 100) else {
        return false;
    };
    let mut at = header_len as usize;
    while let (Some(kind), Some(len)) = (be32(h, at), be32(h, at + 4)) {
        if kind == QCOW2_EXT_DATA_FILE_NAME {
            return true;
        }
        if kind == QCOW2_EXT_END {
            return false;
        }
        at += 8 + (len as usize).div_ceil(8) * 8;
    }
    false
}

fn foreign_format(h: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| h.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("VMDK")
    } else if at(0, b"conectix") {
        Some("VPC")
    } else if at(0, b"vhdxfile") {
        Some("VHDX")
    } else if at(64, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("VDI")
    } else if at(0, b"QED\0") {
        Some("QED")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS")
    } else {
        None
    }
}

const SECTOR: u64 = 512;

fn raw(h: &[u8], file_size: u64) -> Result<ImageInfo> {
    check_virtual_size(file_size)?;
    let info =
        ImageInfo { format: Format::Raw, virtual_size: file_size, file_size, qcow2_version: None, copyable: true };
    let mbr_signature = h.get(510..512) == Some(&[0x55, 0xaa]);
    if h.get(512..520) == Some(b"EFI PART") {
        let alternate_lba = u64::from_le_bytes(h[512 + 32..512 + 40].try_into().expect("8 bytes"));
        let last_usable_lba = u64::from_le_bytes(h[512 + 48..512 + 56].try_into().expect("8 bytes"));
        if last_usable_lba.max(alternate_lba).saturating_add(1).saturating_mul(SECTOR) > file_size {
            bail!("the file is truncated: its GPT partition table describes a disk larger than the file ({file_size} bytes)");
        }
        return Ok(info);
    }
    if mbr_signature && h.len() >= 512 {
        let ends = (0..4).map(|i| {
            let e = &h[446 + 16 * i..446 + 16 * (i + 1)];
            let start = u64::from(u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")));
            let len = u64::from(u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")));
            (e[4], start + len)
        });
        let mut any = false;
        for (kind, end) in ends {
            if kind == 0 || kind == 0xee {
                any |= kind == 0xee;
                continue;
            }
            any = true;
            if end * SECTOR > file_size {
                bail!("the file is truncated: a partition ends past the end of the file ({file_size} bytes)");
            }
        }
        if any {
            return Ok(info);
        }
    }
    if has_filesystem_signature(h) {
        return Ok(info);
    }
    bail!("it is not a disk image: no qcow2 header, partition table or filesystem signature")
}

/// Whole-disk filesystems (no partition table) of the kinds a Linux root uses.
fn has_filesystem_signature(h: &[u8]) -> bool {
    let at = |offset: usize, magic: &[u8]| h.get(offset..offset + magic.len()) == Some(magic);
    at(0x438, &[0x53, 0xef]) // ext2/3/4
        || at(0, b"XFSB")
        || at(0x10040, b"_BHRfS_M") // btrfs
        || at(0x218, b"LVM2 001")
        || at(0x418, b"LVM2 001")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes()); // 64 KiB clusters
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        h[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    fn err(head: &[u8], size: u64) -> String {
        format!("{:#}", classify(head, size).unwrap_err())
    }

    #[test]
    fn a_plain_qcow2_is_accepted() {
        let info = classify(&qcow2_header(3), 0x40000).unwrap();
        assert_eq!((info.format, info.virtual_size, info.qcow2_version), (Format::Qcow2, 1 << 30, Some(3)));
        assert!(info.copyable);
    }

    #[test]
    fn only_a_plain_compat_1_1_qcow2_is_copied_as_it_is() {
        let copyable = |h: &[u8]| classify(h, 0x40000).unwrap().copyable;
        assert!(!copyable(&qcow2_header(2)), "compat 0.10 is not what Glance is given");
        for (at, value, what) in [
            (60, 1u64 << 32, "a snapshot"),
            (88, 1, "a bitmap (autoclear bit)"),
            (72, 1, "the dirty flag"),
            (72, 1 << 3, "zstd compression"),
        ] {
            let mut h = qcow2_header(3);
            // Offset 60 is a 32-bit field: the value's high half lands in it.
            h[at..at + 8].copy_from_slice(&value.to_be_bytes());
            assert!(!copyable(&h), "{what}");
        }
    }

    #[test]
    fn dangerous_or_broken_qcow2_headers_are_refused() {
        let mut backing = qcow2_header(3);
        backing[8..16].copy_from_slice(&200u64.to_be_bytes());
        backing[16..20].copy_from_slice(&10u32.to_be_bytes());
        backing[200..210].copy_from_slice(b"/etc/passw");
        assert!(err(&backing, 0x40000).contains("backing file `/etc/passw`"));

        let mut data_bit = qcow2_header(3);
        data_bit[72..80].copy_from_slice(&QCOW2_EXTERNAL_DATA.to_be_bytes());
        assert!(err(&data_bit, 0x40000).contains("external data file"));

        let mut data_ext = qcow2_header(3);
        data_ext[104..108].copy_from_slice(&QCOW2_EXT_DATA_FILE_NAME.to_be_bytes());
        data_ext[108..112].copy_from_slice(&4u32.to_be_bytes());
        assert!(err(&data_ext, 0x40000).contains("external data file"));

        let mut unknown = qcow2_header(3);
        unknown[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        assert!(err(&unknown, 0x40000).contains("bits 0x200"));

        let mut encrypted = qcow2_header(2);
        encrypted[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(err(&encrypted, 0x40000).contains("encrypted"));

        assert!(err(&qcow2_header(3), 0x20000).contains("truncated"));
        assert!(err(&qcow2_header(3)[..30], 0x40000).contains("header is truncated"));
        assert!(err(&qcow2_header(4), 0x40000).contains("version 4"));
    }

    #[test]
    fn a_petabyte_disk_is_refused_whatever_the_format() {
        const PIB: u64 = 1 << 50;
        // A consistent header: an L1 table big enough for 1 PiB (2 Mi entries of 512 MiB), inside the file.
        let mut huge = qcow2_header(3);
        huge[24..32].copy_from_slice(&PIB.to_be_bytes());
        huge[36..40].copy_from_slice(&(2u32 << 20).to_be_bytes());
        let file_size = 0x30000 + (16 << 20);
        assert!(err(&huge, file_size).contains("claims a disk of 1125899906842624 bytes (1024.0 TiB)"));
        let mut at_limit = huge.clone();
        at_limit[24..32].copy_from_slice(&MAX_VIRTUAL_SIZE.to_be_bytes());
        assert_eq!(classify(&at_limit, file_size).unwrap().virtual_size, MAX_VIRTUAL_SIZE);

        let mut mbr = vec![0u8; 1024];
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(err(&mbr, PIB).contains("over cloudimg's limit of 64 TiB"));
        assert_eq!(classify(&mbr, MAX_VIRTUAL_SIZE).unwrap().virtual_size, MAX_VIRTUAL_SIZE);
    }

    #[test]
    fn raw_images_need_a_partition_table_or_filesystem() {
        let mut mbr = vec![0u8; 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr[446 + 4] = 0x83;
        mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[446 + 12..446 + 16].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(classify(&mbr, 4 << 20).unwrap().format, Format::Raw);
        assert!(err(&mbr, 100 * 1024).contains("truncated"));

        let mut ext4 = vec![0u8; 4096];
        ext4[0x438] = 0x53;
        ext4[0x439] = 0xef;
        assert_eq!(classify(&ext4, 1 << 20).unwrap().format, Format::Raw);

        assert!(err(b"hello, world", 12).contains("not a disk image"));
        assert_eq!(err(b"", 0), "the file is empty");
        assert!(err(b"KDMV....", 8).contains("VMDK"));
    }
}
