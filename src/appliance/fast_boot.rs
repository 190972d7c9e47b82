//! A copy of libguestfs's appliance that boots faster under software emulation.
//!
//! Under TCG about 5 s of every launch (of 20-25 s) go to the appliance kernel decompressing itself:
//! distribution kernels are xz- or zstd-compressed bzImages, and the decompressor runs emulated. qemu
//! can instead start an uncompressed kernel ELF directly at its PVH entry point. So cloudimg keeps,
//! beside libguestfs's cache, a libguestfs "fixed appliance" (kernel, initrd, root, README.fixed)
//! whose kernel is libguestfs's own kernel stored decompressed, and whose initrd and root are hard
//! links to libguestfs's files: same appliance, same modules, ~65 MiB more on disk.
//!
//! The copy is only as fresh as libguestfs's appliance, which libguestfs rebuilds (with supermin) when
//! the host's packages change; libguestfs does that on a standard launch only. So when the package
//! database is newer than libguestfs's appliance, cloudimg launches the standard way, and makes a new
//! copy the next time. The source files are hard-linked into the copy (the kernel too), so the copy's
//! name, made of their inode numbers, cannot be reused by a later build.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::read::ReadCache;

use crate::appliance::trusted_dir::{Dir, Distrust, FileId};

/// Set to 1 to always launch libguestfs's own appliance.
pub const OPT_OUT_VARIABLE: &str = "CLOUDIMG_STOCK_APPLIANCE";

/// Where host package managers keep their database; a change there may change the appliance.
const PACKAGE_DATABASES: &[&str] =
    &["/var/lib/dpkg/status", "/var/lib/rpm", "/usr/lib/sysimage/rpm", "/var/lib/pacman/local"];

const FILES: [&str; 3] = ["kernel", "initrd", "root"];

/// Which appliance a launch uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The fast-boot copy in this directory (for libguestfs's `set_path`); `made` when this run made it.
    Copy { dir: PathBuf, made: bool },
    /// libguestfs's own appliance, and why.
    Stock(String),
    /// libguestfs's own appliance, because cloudimg's fast-boot directory is not this user's alone.
    Distrusted(Distrust),
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Copy { dir, made: true } => write!(f, "a fast-boot copy, made now in {}", dir.display()),
            Choice::Copy { dir, made: false } => write!(f, "the fast-boot copy in {}", dir.display()),
            Choice::Stock(why) => write!(f, "libguestfs's own ({why})"),
            Choice::Distrusted(why) => write!(f, "libguestfs's own (the fast-boot copy was not used: {why})"),
        }
    }
}

impl Choice {
    /// What the user must hear about, even without -v: a fast-boot directory someone else may have
    /// prepared.
    pub fn warning(&self) -> Option<String> {
        match self {
            Choice::Distrusted(why) => Some(format!(
                "not using the fast-boot appliance: {why}; booted libguestfs's own instead (about 5 s slower \
                 under TCG) (fix: {})",
                why.fix
            )),
            _ => None,
        }
    }
}

/// libguestfs's appliance cache, reached through directories this user controls alone.
#[derive(Debug)]
pub struct Cache {
    /// The cache directory (`$LIBGUESTFS_CACHEDIR`, `$TMPDIR` or /var/tmp).
    root: Dir,
    /// `.guestfs-UID/appliance.d`, once libguestfs has built it.
    built: Option<Built>,
}

#[derive(Debug)]
struct Built {
    dir: Dir,
    /// kernel, initrd and root, when all three are there.
    files: Option<[FileId; 3]>,
}

/// Checks libguestfs's cache in `cachedir` before anything boots from it: `.guestfs-UID`, its
/// `appliance.d` and the files in it must be this user's alone. libguestfs checks only
/// `.guestfs-UID`, and only when it builds the appliance itself; it boots whatever `appliance.d`
/// holds, and a fast-boot copy would skip even that check.
pub fn check_cache(cachedir: &Path) -> Result<Cache, Distrust> {
    let root = Dir::cache_root(cachedir)?;
    let built = match root.open(&libguestfs_cache_name())? {
        Some(cache) => cache.open("appliance.d")?,
        None => None,
    };
    let built = match built {
        Some(dir) => {
            let mut ids = Vec::new();
            for file in FILES {
                ids.extend(dir.file(file)?);
            }
            Some(Built { files: ids.try_into().ok(), dir })
        }
        None => None,
    };
    Ok(Cache { root, built })
}

impl Cache {
    /// cloudimg's fast-boot directory, checked, if it exists.
    pub fn fast_boot_dir(&self) -> Result<Option<Dir>, Distrust> {
        self.root.open(&fast_boot_name())
    }
}

/// Finds or makes the fast-boot copy of the appliance in libguestfs's `cache`. Never fails: whatever
/// goes wrong means the stock appliance, with the reason.
pub fn choose(cache: &Cache) -> Choice {
    if std::env::var_os(OPT_OUT_VARIABLE).is_some_and(|v| v == "1") {
        return Choice::Stock(format!("{OPT_OUT_VARIABLE}=1"));
    }
    if std::env::var_os("LIBGUESTFS_PATH").is_some() {
        return Choice::Stock("LIBGUESTFS_PATH names the appliance to use".into());
    }
    outcome(find_or_make(cache, packages_changed()))
}

fn outcome(made: Result<Choice>) -> Choice {
    made.unwrap_or_else(|e| match e.downcast::<Distrust>() {
        Ok(why) => Choice::Distrusted(why),
        Err(e) => Choice::Stock(format!("{e:#}")),
    })
}

/// libguestfs's per-user cache in `cachedir`, where supermin builds `appliance.d`.
pub fn libguestfs_cache(cachedir: &Path) -> PathBuf {
    cachedir.join(libguestfs_cache_name())
}

/// Creates libguestfs's per-user cache in `cachedir` as libguestfs would (0755), or finds it, checked.
pub fn create_cache(cachedir: &Path) -> Result<PathBuf, Distrust> {
    let cache = Dir::cache_root(cachedir)?.open_or_create(&libguestfs_cache_name(), 0o755)?;
    Ok(cache.path().to_path_buf())
}

fn libguestfs_cache_name() -> String {
    format!(".guestfs-{}", crate::support::identity::effective_uid())
}

fn fast_boot_name() -> String {
    format!("cloudimg-appliance-{}", crate::support::identity::effective_uid())
}

/// `packages_changed`: when the host's package database last changed, if known.
fn find_or_make(cache: &Cache, packages_changed: Option<SystemTime>) -> Result<Choice> {
    let Some(built) = &cache.built else {
        bail!("libguestfs has not built its appliance yet (it does on this launch)")
    };
    match packages_changed {
        Some(changed) if changed < built.dir.modified()? => {}
        Some(_) => bail!("host packages changed since libguestfs built its appliance: it checks it on this launch"),
        None => bail!("no known package database to tell whether libguestfs's appliance is up to date"),
    }
    let Some(ids @ [kernel, initrd, root]) = built.files else { bail!("{} is incomplete", built.dir.path().display()) };
    let base = cache.root.open_or_create(&fast_boot_name(), 0o700)?;
    let name = copy_name(kernel, initrd, root);
    if let Some(copy) = base.open(&name)? {
        check_copy(&copy, ids)?;
        remove_stale(base.path(), &name);
        return Ok(Choice::Copy { dir: copy.path().to_path_buf(), made: false });
    }
    let building = tempfile::Builder::new().prefix(".new-").tempdir_in(base.path())?;
    make_copy(&built.dir, building.path(), ids)?;
    let dir = base.path().join(&name);
    if let Err(e) = fs::rename(building.path(), &dir) {
        // Another run made the same copy meanwhile.
        let Some(copy) = base.open(&name)? else {
            return Err(e).with_context(|| format!("renaming the new copy to {}", dir.display()));
        };
        check_copy(&copy, ids)?;
        return Ok(Choice::Copy { dir, made: false });
    }
    remove_stale(base.path(), &name);
    Ok(Choice::Copy { dir, made: true })
}

/// The newest modification among the package databases present, if any is.
fn packages_changed() -> Option<SystemTime> {
    PACKAGE_DATABASES.iter().filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok()).max()
}

fn copy_name(kernel: FileId, initrd: FileId, root: FileId) -> String {
    format!("{:x}-{:x}-{:x}-{:x}", kernel.0, kernel.1, initrd.1, root.1)
}

/// An existing copy is booted only if it is whole, this user's alone, and still linked to the
/// appliance it was made from (`source`: kernel, initrd, root).
fn check_copy(copy: &Dir, source: [FileId; 3]) -> Result<(), Distrust> {
    let linked = [("kernel.source", source[0]), ("initrd", source[1]), ("root", source[2])];
    for file in ["kernel", "kernel.source", "initrd", "root", "README.fixed"] {
        let path = copy.path().join(file);
        let fix = format!("rm -rf {}", copy.path().display());
        let Some(id) = copy.file(file)? else {
            return Err(Distrust { path, problem: "is missing: the copy is incomplete".into(), fix });
        };
        if linked.iter().any(|(name, source)| *name == file && *source != id) {
            return Err(Distrust { path, problem: "is no longer a link to libguestfs's file".into(), fix });
        }
    }
    Ok(())
}

/// Fills `into` with the copy: links to the source's files, the decompressed kernel, README.fixed
/// last (its presence says the copy is whole).
fn make_copy(source: &Dir, into: &Path, ids: [FileId; 3]) -> Result<()> {
    for file in FILES {
        let link = if file == "kernel" { "kernel.source" } else { file };
        // Without AT_SYMLINK_FOLLOW this links the checked name itself, never what a link names.
        rustix::fs::linkat(source.fd(), file, rustix::fs::CWD, into.join(link), rustix::fs::AtFlags::empty())
            .with_context(|| format!("linking {} into {}", source.path().join(file).display(), into.display()))?;
    }
    // libguestfs may have replaced its appliance between our look and the links.
    for (file, id) in ["kernel.source", "initrd", "root"].iter().zip(ids) {
        let m = fs::symlink_metadata(into.join(file))?;
        ensure!((m.dev(), m.ino()) == id, "libguestfs's appliance changed while it was being copied");
    }
    let mut image = Vec::new();
    File::open(into.join("kernel.source"))?.read_to_end(&mut image)?;
    let (compression, payload) = kernel_payload(&image)?;
    let kernel_path = into.join("kernel");
    let mut out = BufWriter::new(File::create(&kernel_path)?);
    decompress(compression, payload, &mut out).with_context(|| format!("decompressing the {compression:?} kernel"))?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    ensure!(
        has_pvh_entry(File::open(&kernel_path)?)?,
        "the appliance kernel has no PVH entry point, so qemu cannot start it uncompressed"
    );
    fs::write(
        into.join("README.fixed"),
        "A copy of libguestfs's appliance with its kernel decompressed, made by cloudimg.\n",
    )?;
    Ok(())
}

/// Removes the other copies (older appliances) and what killed runs left behind.
fn remove_stale(base: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        // A copy being made right now by another run is young.
        let leftover = name.starts_with(".new-") && old.is_some_and(|age| age > Duration::from_secs(3600));
        if name != keep && (!name.starts_with(".new-") || leftover) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    Gzip,
}

/// The compressed kernel inside an x86 bzImage, found through the boot protocol header (2.08+:
/// `payload_offset` and `payload_length`, counted from the protected-mode code after the setup sectors).
pub fn kernel_payload(image: &[u8]) -> Result<(Compression, &[u8])> {
    let u32_at = |at: usize| image.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    ensure!(image.get(0x202..0x206) == Some(b"HdrS"), "the appliance kernel is not a bzImage");
    let version = image.get(0x206..0x208).map(|b| u16::from_le_bytes([b[0], b[1]])).unwrap_or(0);
    ensure!(version >= 0x208, "the appliance kernel's boot protocol {version:#x} does not locate its payload");
    let setup_sectors = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else { bail!("truncated bzImage header") };
    let start = (setup_sectors + 1) * 512 + offset as usize;
    let payload = image.get(start..start + length as usize).context("the bzImage payload lies outside the file")?;
    let compression = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0x1f, 0x8b, ..] => Compression::Gzip,
        _ => bail!("the appliance kernel is compressed in a way cloudimg does not decompress"),
    };
    Ok((compression, payload))
}

/// Decompresses the first stream of `payload` (the kernel build appends the size after it).
pub fn decompress(compression: Compression, payload: &[u8], out: &mut impl Write) -> Result<u64> {
    let copied = match compression {
        Compression::Xz => first_xz_stream(payload, out)?,
        Compression::Zstd => std::io::copy(&mut zstd::stream::read::Decoder::new(payload)?.single_frame(), out)?,
        Compression::Gzip => std::io::copy(&mut flate2::read::GzDecoder::new(payload), out)?,
    };
    Ok(copied)
}

/// xz2's reader goes on decoding after the end of the stream, and takes the appended size for a
/// corrupt stream; liblzma itself stops there.
fn first_xz_stream(payload: &[u8], out: &mut impl Write) -> Result<u64> {
    let mut stream = xz2::stream::Stream::new_stream_decoder(u64::MAX, 0)?;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let before = (stream.total_in(), stream.total_out());
        let rest = payload.get(stream.total_in() as usize..).unwrap_or_default();
        let status = stream.process(rest, &mut buffer, xz2::stream::Action::Run)?;
        out.write_all(&buffer[..(stream.total_out() - before.1) as usize])?;
        if status == xz2::stream::Status::StreamEnd {
            return Ok(stream.total_out());
        }
        ensure!((stream.total_in(), stream.total_out()) != before, "the xz stream is truncated");
    }
}

/// Whether a kernel ELF has the Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`) qemu starts it by.
pub fn has_pvh_entry(file: impl Read + std::io::Seek) -> Result<bool> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let cache = ReadCache::new(file);
    let elf =
        ElfFile64::<object::Endianness, _>::parse(&cache).context("the decompressed kernel is not an ELF file")?;
    let (endian, data) = (elf.endian(), elf.data());
    for segment in elf.elf_header().program_headers(endian, data)? {
        let Some(mut notes) = segment.notes(endian, data)? else { continue };
        while let Some(note) = notes.next()? {
            if note.name() == b"Xen" && note.n_type(endian).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file: `setup` setup sectors, then protected-mode code holding `payload` at
    /// `offset`, then the 4 size bytes the kernel build appends.
    fn bzimage(setup: u8, offset: u32, payload: &[u8]) -> Vec<u8> {
        // 0 setup sectors stands for 4, as in old kernels.
        let sectors = if setup == 0 { 4 } else { setup as usize };
        let mut image = vec![0u8; (sectors + 1) * 512 + offset as usize];
        image[0x1f1] = setup;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&1234u32.to_le_bytes());
        image
    }

    fn kernel_text() -> Vec<u8> {
        (0..200_000u32).flat_map(|i| (i * 7919 % 251).to_le_bytes()).collect()
    }

    #[test]
    fn each_compression_is_found_and_decompressed_up_to_the_appended_size() {
        let text = kernel_text();
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&text).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::stream::encode_all(&text[..], 3).unwrap();
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&text).unwrap();
            e.finish().unwrap()
        };
        for (setup, packed, kind) in
            [(0, xz, Compression::Xz), (27, zstd, Compression::Zstd), (3, gzip, Compression::Gzip)]
        {
            let image = bzimage(setup, 0x3a5, &packed);
            let (found, payload) = kernel_payload(&image).unwrap();
            assert_eq!(found, kind);
            let mut out = Vec::new();
            decompress(found, payload, &mut out).unwrap();
            assert!(out == text, "{kind:?} round trip");
        }
    }

    #[test]
    fn kernels_that_cannot_be_unpacked_are_refused() {
        assert!(kernel_payload(b"\x7fELF not a bzImage").is_err());
        let mut old = bzimage(4, 0, b"\xfd7zXZ\0");
        old[0x206..0x208].copy_from_slice(&0x207u16.to_le_bytes());
        assert!(kernel_payload(&old).is_err());
        assert!(kernel_payload(&bzimage(4, 0, b"BZh91AY&SY")).is_err(), "bzip2 is not supported");
        let mut truncated = bzimage(4, 16, b"\x1f\x8b");
        truncated[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(kernel_payload(&truncated).is_err());
    }

    /// A minimal ELF64 with one PT_NOTE segment holding one note.
    fn elf_with_note(name: &[u8], n_type: u32) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&n_type.to_le_bytes());
        note.extend_from_slice(name);
        note.resize(12 + (name.len() + 1).div_ceil(4) * 4, 0);
        note.extend_from_slice(&0x100_0000u64.to_le_bytes());
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        elf[6] = 1;
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4u64.to_le_bytes()); // p_align
        elf.extend_from_slice(&ph);
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn the_pvh_entry_note_is_recognised() {
        let has = |elf: Vec<u8>| has_pvh_entry(std::io::Cursor::new(elf)).unwrap();
        assert!(has(elf_with_note(b"Xen", 18)));
        assert!(!has(elf_with_note(b"Xen", 17)), "another Xen note");
        assert!(!has(elf_with_note(b"GNU", 18)), "another owner's note");
        assert!(has_pvh_entry(std::io::Cursor::new(b"MZ not an ELF".to_vec())).is_err());
    }

    /// A cache directory holding a libguestfs appliance whose kernel is `elf`, xz-compressed.
    fn cache_with_appliance(elf: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let source = libguestfs_cache(cache.path()).join("appliance.d");
        fs::create_dir_all(&source).unwrap();
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(elf).unwrap();
        fs::write(source.join("kernel"), bzimage(27, 0x100, &e.finish().unwrap())).unwrap();
        fs::write(source.join("initrd"), b"initrd").unwrap();
        fs::write(source.join("root"), b"root").unwrap();
        (cache, source)
    }

    /// What a launch would boot from the cache in `cachedir`, had the host's packages last changed at
    /// `changed`.
    fn make(cachedir: &Path, changed: Option<SystemTime>) -> Result<Choice> {
        find_or_make(&check_cache(cachedir).unwrap(), changed)
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_copy_is_made_once_per_appliance_build_and_replaces_older_ones() {
        let elf = elf_with_note(b"Xen", 18);
        let (cache, source) = cache_with_appliance(&elf);
        let long_ago = Some(SystemTime::UNIX_EPOCH);
        let Choice::Copy { dir, made: true } = make(cache.path(), long_ago).unwrap() else { panic!("no copy") };
        assert_eq!(fs::read(dir.join("kernel")).unwrap(), elf, "the kernel is stored decompressed");
        for file in ["initrd", "root"] {
            assert_eq!(ino(&dir.join(file)), ino(&source.join(file)), "{file} is libguestfs's own file");
        }
        assert!(dir.join("README.fixed").is_file(), "libguestfs takes it for a fixed appliance");
        assert_eq!(make(cache.path(), long_ago).unwrap(), Choice::Copy { dir: dir.clone(), made: false });

        // libguestfs rebuilds its appliance: new files, a new copy, the old one gone.
        fs::remove_file(source.join("initrd")).unwrap();
        fs::write(source.join("initrd"), b"new initrd").unwrap();
        let Choice::Copy { dir: new, made: true } = make(cache.path(), long_ago).unwrap() else { panic!() };
        assert_ne!(new, dir);
        assert_eq!(fs::read(new.join("initrd")).unwrap(), b"new initrd");
        assert!(!dir.exists(), "the copy of the old build is removed");
    }

    #[test]
    fn the_stock_appliance_is_used_when_the_copy_would_be_stale_or_cannot_boot() {
        let (cache, _) = cache_with_appliance(&elf_with_note(b"Xen", 18));
        let err = |r: Result<Choice>| format!("{:#}", r.unwrap_err());
        assert!(err(make(cache.path(), Some(SystemTime::now() + Duration::from_secs(60)))).contains("packages changed"));
        assert!(err(make(cache.path(), None)).contains("no known package database"));
        let empty = tempfile::tempdir().unwrap();
        assert!(err(make(empty.path(), Some(SystemTime::UNIX_EPOCH))).contains("not built its appliance yet"));
        let (no_pvh, _) = cache_with_appliance(&elf_with_note(b"Xen", 17));
        assert!(err(make(no_pvh.path(), Some(SystemTime::UNIX_EPOCH))).contains("no PVH entry point"));
        let base = no_pvh.path().join(format!("cloudimg-appliance-{}", crate::support::identity::effective_uid()));
        assert_eq!(fs::read_dir(base).unwrap().count(), 0, "nothing half-made is left");
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn an_appliance_cache_others_can_write_is_not_booted_from() {
        let (cache, source) = cache_with_appliance(&elf_with_note(b"Xen", 18));
        chmod(&source, 0o777);
        let err = check_cache(cache.path()).unwrap_err();
        assert_eq!(err.path, std::fs::canonicalize(&source).unwrap());
        assert!(err.problem.contains("writable by group or others"), "{err}");
        chmod(&source, 0o755);
        chmod(&source.join("initrd"), 0o666);
        let err = check_cache(cache.path()).unwrap_err();
        assert!(err.path.ends_with("appliance.d/initrd") && err.fix.contains("rm -rf"), "{err:?}");
        chmod(&source.join("initrd"), 0o644);
        let cache_dir = source.parent().unwrap();
        fs::rename(cache_dir, cache.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(cache.path().join("elsewhere"), cache_dir).unwrap();
        assert!(check_cache(cache.path()).unwrap_err().problem.contains("symbolic link"));
    }

    #[test]
    fn an_appliance_someone_else_planted_is_not_booted_from() {
        if crate::support::identity::effective_uid() != 0 {
            return; // only root can give files away
        }
        let (cache, source) = cache_with_appliance(&elf_with_note(b"Xen", 18));
        std::os::unix::fs::chown(source.join("root"), Some(65534), None).unwrap();
        let err = check_cache(cache.path()).unwrap_err();
        assert!(err.path.ends_with("appliance.d/root") && err.problem.contains("owned by uid 65534"), "{err}");
        std::os::unix::fs::chown(source.parent().unwrap(), Some(65534), None).unwrap();
        let err = check_cache(cache.path()).unwrap_err();
        assert!(err.path.ends_with(libguestfs_cache_name()) && err.problem.contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn a_fast_boot_directory_that_is_not_ours_alone_means_the_stock_appliance_and_a_warning() {
        let elf = elf_with_note(b"Xen", 18);
        let (cache, _) = cache_with_appliance(&elf);
        let long_ago = Some(SystemTime::UNIX_EPOCH);
        let base = cache.path().join(fast_boot_name());
        fs::create_dir(&base).unwrap();
        chmod(&base, 0o777);
        let choice = outcome(make(cache.path(), long_ago));
        let Choice::Distrusted(why) = &choice else { panic!("{choice:?}") };
        assert!(why.problem.contains("mode 0777"), "{why}");
        assert!(choice.warning().unwrap().contains(&format!("fix: rm -rf {}", why.path.display())), "{choice:?}");
        assert_eq!(fs::read_dir(&base).unwrap().count(), 0, "nothing was made in it");

        // A copy whose initrd is no longer libguestfs's file is not booted.
        chmod(&base, 0o700);
        let Choice::Copy { dir, .. } = outcome(make(cache.path(), long_ago)) else { panic!("no copy") };
        fs::remove_file(dir.join("initrd")).unwrap();
        fs::write(dir.join("initrd"), b"someone else's initrd").unwrap();
        let Choice::Distrusted(why) = outcome(make(cache.path(), long_ago)) else { panic!("booted a changed copy") };
        assert!(why.path.ends_with("initrd") && why.problem.contains("no longer a link"), "{why}");
    }

    #[test]
    fn copies_are_named_by_their_sources_inodes() {
        assert_eq!(copy_name((0x803, 17), (0x803, 18), (0x803, 255)), "803-11-12-ff");
    }
}
