//! What Glance needs to know about an output image, in one JSON file: the fields `openstack image
//! create` takes, the hashes Glance will record, and properties read from the image itself. Pure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::image::hashing::Digests;
use crate::image::header::ImageInfo;

const GIB: u64 = 1 << 30;
const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub path: PathBuf,
    pub disk_format: String,
    pub container_format: String,
    /// Bytes in the file (what Glance stores as `size`).
    pub size: u64,
    pub virtual_size: u64,
    /// MD5, Glance's `checksum`.
    pub checksum: String,
    pub os_hash_algo: String,
    pub os_hash_value: String,
    /// GiB, rounded up from the virtual size.
    pub min_disk: u64,
    pub properties: BTreeMap<String, String>,
}

/// What the image itself says about how it should be scheduled and used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuestFacts {
    /// os-release `ID` and `VERSION_ID`.
    pub os_id: Option<String>,
    pub os_version: Option<String>,
    /// cloud-init's default user.
    pub admin_user: Option<String>,
    pub guest_agent: bool,
    /// The image's disk: its partition table and, for GPT, each partition's type GUID.
    pub partition_table: Option<String>,
    pub gpt_types: Vec<String>,
    /// The machine the guest's programs are built for, from an ELF header ([`elf_architecture`]).
    pub architecture: Option<&'static str>,
}

impl Manifest {
    pub fn new(path: &Path, info: &ImageInfo, digests: Digests, properties: BTreeMap<String, String>) -> Self {
        Manifest {
            path: path.to_path_buf(),
            disk_format: info.format.as_str().to_string(),
            container_format: "bare".to_string(),
            size: info.file_size,
            virtual_size: info.virtual_size,
            checksum: digests.md5,
            os_hash_algo: "sha512".to_string(),
            os_hash_value: digests.sha512,
            min_disk: min_disk(info.virtual_size),
            properties,
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the manifest {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a cloudimg manifest", path.display()))
    }

    pub fn digests(&self) -> Digests {
        Digests { md5: self.checksum.clone(), sha512: self.os_hash_value.clone() }
    }
}

/// The smallest root disk, in whole GiB, that holds the image.
pub fn min_disk(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(GIB)
}

/// Glance image properties (names from Glance's "useful image properties"; `os_distro` values are
/// libosinfo's short ids).
pub fn properties(facts: &GuestFacts) -> BTreeMap<String, String> {
    let mut props = BTreeMap::new();
    let mut set = |key: &str, value: &str| {
        props.insert(key.to_string(), value.to_string());
    };
    set("os_type", "linux");
    if let Some(distro) = facts.os_id.as_deref().and_then(libosinfo_distro) {
        set("os_distro", distro);
    }
    if let Some(version) = &facts.os_version {
        set("os_version", version);
    }
    if let Some(user) = &facts.admin_user {
        set("os_admin_user", user);
    }
    if let Some(architecture) = facts.architecture {
        set("architecture", architecture);
    }
    if facts.guest_agent {
        set("hw_qemu_guest_agent", "yes");
        // Snapshots freeze the filesystems through the agent, and fail rather than go on without it.
        set("os_require_quiesce", "yes");
    }
    if uefi_only(facts.partition_table.as_deref(), &facts.gpt_types) {
        set("hw_firmware_type", "uefi");
        // Distributions ship x86 UEFI firmware (OVMF) for q35 only; other architectures have
        // machine types of their own.
        if facts.architecture == Some("x86_64") {
            set("hw_machine_type", "q35");
        }
    }
    props
}

/// The architecture, in libosinfo's and Nova's names, that an ELF file's header (its first 64
/// bytes) is built for; `None` for anything else.
pub fn elf_architecture(header: &[u8]) -> Option<&'static str> {
    use object::elf::{self, FileHeader32, FileHeader64};
    use object::read::elf::FileHeader;
    use object::{Endianness, FileKind};

    let (machine, wide, little) = match FileKind::parse(header).ok()? {
        FileKind::Elf64 => {
            let h = FileHeader64::<Endianness>::parse(header).ok()?;
            (h.e_machine(h.endian().ok()?), true, h.is_little_endian())
        }
        FileKind::Elf32 => {
            let h = FileHeader32::<Endianness>::parse(header).ok()?;
            (h.e_machine(h.endian().ok()?), false, h.is_little_endian())
        }
        _ => return None,
    };
    Some(match (machine, wide, little) {
        (elf::EM_X86_64, true, true) => "x86_64",
        (elf::EM_386, false, true) => "i686",
        (elf::EM_AARCH64, true, true) => "aarch64",
        (elf::EM_ARM, false, true) => "armv7l",
        (elf::EM_PPC64, true, true) => "ppc64le",
        (elf::EM_PPC64, true, false) => "ppc64",
        (elf::EM_S390, true, false) => "s390x",
        (elf::EM_RISCV, true, true) => "riscv64",
        (elf::EM_LOONGARCH, true, true) => "loongarch64",
        (elf::EM_MIPS, true, true) => "mips64el",
        (elf::EM_MIPS, false, true) => "mipsel",
        _ => return None,
    })
}

/// os-release `ID` → libosinfo's distro id, for the distributions that ship cloud images.
fn libosinfo_distro(os_id: &str) -> Option<&'static str> {
    Some(match os_id {
        "ubuntu" => "ubuntu",
        "debian" => "debian",
        "rocky" => "rocky",
        "almalinux" => "almalinux",
        "centos" => "centos",
        "rhel" => "rhel",
        "fedora" => "fedora",
        "ol" => "ol",
        "opensuse-leap" | "opensuse-tumbleweed" | "opensuse" => "opensuse",
        "sles" => "sles",
        "arch" => "arch",
        "alpine" => "alpinelinux",
        "gentoo" => "gentoo",
        "freebsd" => "freebsd",
        _ => return None,
    })
}

/// A GPT disk with an EFI system partition and no BIOS boot partition only boots with UEFI (GRUB's
/// BIOS stage needs that partition on GPT); an MBR disk boots with BIOS.
pub fn uefi_only(partition_table: Option<&str>, gpt_types: &[String]) -> bool {
    let has = |guid: &str| gpt_types.iter().any(|t| t.eq_ignore_ascii_case(guid));
    partition_table == Some("gpt") && has(EFI_SYSTEM) && !has(BIOS_BOOT)
}

/// The `openstack image create` command that uploads `file` with this metadata.
pub fn openstack_command(
    disk_format: &str,
    virtual_size: u64,
    properties: &BTreeMap<String, String>,
    file: &Path,
    name: &str,
) -> String {
    let mut words = vec![
        "openstack".to_string(),
        "image".to_string(),
        "create".to_string(),
        "--disk-format".to_string(),
        disk_format.to_string(),
        "--container-format".to_string(),
        "bare".to_string(),
        "--min-disk".to_string(),
        min_disk(virtual_size).to_string(),
    ];
    for (key, value) in properties {
        words.push("--property".to_string());
        words.push(format!("{key}={value}"));
    }
    words.push("--file".to_string());
    words.push(file.to_string_lossy().into_owned());
    words.push(name.to_string());
    words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "_-./=:@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> GuestFacts {
        GuestFacts {
            os_id: Some("debian".into()),
            os_version: Some("12".into()),
            admin_user: Some("debian".into()),
            guest_agent: true,
            partition_table: Some("gpt".into()),
            gpt_types: vec![EFI_SYSTEM.to_lowercase(), "0FC63DAF-8483-4772-8E79-3D69D8477DE4".into()],
            architecture: Some("x86_64"),
        }
    }

    /// The first 64 bytes of an ELF file: class (1: 32-bit, 2: 64-bit), data (1: little endian, 2:
    /// big), e_machine.
    fn elf_header(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', class, data, 1]);
        let m = if data == 1 { machine.to_le_bytes() } else { machine.to_be_bytes() };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn the_architecture_comes_from_an_elf_header() {
        assert_eq!(elf_architecture(&elf_header(2, 1, 62)), Some("x86_64"));
        assert_eq!(elf_architecture(&elf_header(2, 1, 183)), Some("aarch64"));
        assert_eq!(elf_architecture(&elf_header(2, 1, 21)), Some("ppc64le"));
        assert_eq!(elf_architecture(&elf_header(2, 2, 21)), Some("ppc64"));
        assert_eq!(elf_architecture(&elf_header(2, 2, 22)), Some("s390x"));
        assert_eq!(elf_architecture(&elf_header(2, 1, 243)), Some("riscv64"));
        assert_eq!(elf_architecture(&elf_header(1, 1, 3)), Some("i686"));
        assert_eq!(elf_architecture(&elf_header(1, 1, 40)), Some("armv7l"));
        assert_eq!(elf_architecture(&elf_header(2, 1, 0xbeef)), None, "an unknown machine");
        assert_eq!(elf_architecture(&elf_header(2, 3, 62)), None, "an unknown byte order");
        assert_eq!(elf_architecture(&elf_header(2, 1, 62)[..40]), None, "a cut header");
        assert_eq!(elf_architecture(b"#!/bin/sh\n"), None, "a script");
    }

    #[test]
    fn properties_come_from_the_image() {
        let p = properties(&facts());
        let get = |k: &str| p.get(k).map(String::as_str);
        assert_eq!(get("os_distro"), Some("debian"));
        assert_eq!(get("os_version"), Some("12"));
        assert_eq!(get("os_type"), Some("linux"));
        assert_eq!(get("os_admin_user"), Some("debian"));
        assert_eq!(get("hw_qemu_guest_agent"), Some("yes"));
        assert_eq!(get("hw_firmware_type"), Some("uefi"));
        assert_eq!(get("hw_machine_type"), Some("q35"), "x86 UEFI firmware is built for q35");
        assert_eq!(get("os_require_quiesce"), Some("yes"));
        assert_eq!(get("architecture"), Some("x86_64"));

        let arm = properties(&GuestFacts { architecture: Some("aarch64"), ..facts() });
        assert_eq!(arm.get("architecture").map(String::as_str), Some("aarch64"));
        assert_eq!(arm.get("hw_firmware_type").map(String::as_str), Some("uefi"));
        assert_eq!(arm.get("hw_machine_type"), None, "q35 is an x86 machine");

        let mut hybrid = facts();
        hybrid.gpt_types.push(BIOS_BOOT.into());
        hybrid.guest_agent = false;
        hybrid.os_id = Some("opensuse-leap".into());
        let p = properties(&hybrid);
        assert_eq!(p.get("hw_firmware_type"), None, "a BIOS boot partition makes it boot with BIOS too");
        assert_eq!(p.get("hw_qemu_guest_agent"), None);
        assert_eq!((p.get("os_require_quiesce"), p.get("hw_machine_type")), (None, None));
        assert_eq!(p.get("os_distro").map(String::as_str), Some("opensuse"));

        let mbr = GuestFacts { partition_table: Some("msdos".into()), os_id: Some("plan9".into()), ..facts() };
        let p = properties(&mbr);
        assert_eq!((p.get("hw_firmware_type"), p.get("os_distro")), (None, None));
    }

    #[test]
    fn min_disk_rounds_up_to_whole_gib() {
        assert_eq!(min_disk(GIB), 1);
        assert_eq!(min_disk(GIB + 1), 2);
        assert_eq!(min_disk(2560 << 20), 3);
    }

    #[test]
    fn the_openstack_command_is_quoted_for_the_shell() {
        let cmd = openstack_command(
            "qcow2",
            3 * GIB,
            &properties(&facts()),
            Path::new("out dir/img.qcow2"),
            "Debian 12 (pw)",
        );
        assert!(cmd.starts_with("openstack image create --disk-format qcow2 --container-format bare --min-disk 3 "));
        assert!(cmd.contains("--property os_distro=debian"));
        assert!(cmd.ends_with("--file 'out dir/img.qcow2' 'Debian 12 (pw)'"));
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn a_manifest_round_trips_through_json() {
        use crate::image::header::Format;
        let info =
            ImageInfo { format: Format::Raw, virtual_size: GIB, file_size: GIB, qcow2_version: None, copyable: true };
        let m =
            Manifest::new(Path::new("a.raw"), &info, Digests { md5: "1".into(), sha512: "2".into() }, BTreeMap::new());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(Manifest::read(&path).unwrap(), m);
        std::fs::write(&path, "{}").unwrap();
        assert!(format!("{:#}", Manifest::read(&path).unwrap_err()).contains("not a cloudimg manifest"));
    }
}
