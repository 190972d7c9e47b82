//! A disk's partition table read from its first sectors by this code: one read of the device instead
//! of a partitioning tool per question (each costs a process start in the appliance, ~0.5 s under
//! TCG). Pure.

/// Sector size of the appliance's virtual disks.
pub const SECTOR: usize = 512;
/// MBR, GPT header and the usual 128 × 128-byte entry array.
pub const HEAD: usize = 34 * SECTOR;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `gpt` or `msdos`, as libguestfs names them.
    pub kind: &'static str,
    /// GPT partition type GUIDs (upper case), in entry order, unused entries left out.
    pub gpt_types: Vec<String>,
    /// The MBR's code starts a BIOS bootloader: GRUB's boot.img (which names itself), or generic code
    /// (extlinux's mbr.bin, DOS's) with a partition marked active, whose boot sector it chains to.
    /// Generic code without an active partition starts nothing: parted writes such code on every
    /// disk it labels, bootloader or not.
    pub bios_boot: bool,
}

/// Where the GPT entry array lies, when it is not within [`HEAD`]: (byte offset, byte length).
pub fn gpt_entries_at(head: &[u8]) -> Option<(u64, usize)> {
    let (start, count, size) = gpt_geometry(head)?;
    let offset = start.checked_mul(SECTOR as u64)?;
    let len = count.checked_mul(size)?;
    // A hostile header must not make us read gigabytes.
    (len <= 1 << 20).then_some((offset, len))
}

fn gpt_geometry(head: &[u8]) -> Option<(u64, usize, usize)> {
    let header = head.get(SECTOR..2 * SECTOR)?;
    if &header[..8] != b"EFI PART" {
        return None;
    }
    let start = u64::from_le_bytes(header[72..80].try_into().ok()?);
    let count = u32::from_le_bytes(header[80..84].try_into().ok()?) as usize;
    let size = u32::from_le_bytes(header[84..88].try_into().ok()?) as usize;
    (size >= 128).then_some((start, count, size))
}

/// Parses the first sectors of a disk; `entries` is the GPT entry array when it had to be read
/// separately (see [`gpt_entries_at`]). `None`: no partition table.
pub fn parse(head: &[u8], entries: Option<&[u8]>) -> Option<Table> {
    let mbr = head.get(..SECTOR)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return None;
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    // The first 440 bytes are code; a disk partitioned by a tool that installs none has zeros there.
    let code = &mbr[..440];
    let active = (0..4).any(|i| mbr[446 + 16 * i] == 0x80);
    let bios_boot = code.iter().any(|&b| b != 0) && (active || code.windows(4).any(|w| w == b"GRUB"));
    if !protective {
        return Some(Table { kind: "msdos", gpt_types: Vec::new(), bios_boot });
    }
    let (start, count, size) = gpt_geometry(head)?;
    let array = match entries {
        Some(array) => array,
        None => head.get(start as usize * SECTOR..)?,
    };
    let gpt_types = array
        .chunks_exact(size)
        .take(count)
        .map(|entry| guid(&entry[..16]))
        .filter(|g| g != "00000000-0000-0000-0000-000000000000")
        .collect();
    Some(Table { kind: "gpt", gpt_types, bios_boot })
}

/// A GUID's mixed-endian bytes as text.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        u16::from_le_bytes(b[4..6].try_into().expect("2 bytes")),
        u16::from_le_bytes(b[6..8].try_into().expect("2 bytes")),
        b[8],
        b[9],
        b[10..16].iter().map(|x| format!("{x:02X}")).collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESP: [u8; 16] =
        [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b];

    fn gpt(entries_lba: u64, types: &[[u8; 16]]) -> Vec<u8> {
        let mut d = vec![0u8; HEAD];
        d[510] = 0x55;
        d[511] = 0xaa;
        d[446 + 4] = 0xee;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&entries_lba.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let at = entries_lba as usize * SECTOR + i * 128;
            if at + 16 <= d.len() {
                d[at..at + 16].copy_from_slice(t);
            }
        }
        d
    }

    #[test]
    fn gpt_types_are_read_in_guid_form() {
        let table = parse(&gpt(2, &[ESP, [0xaa; 16]]), None).unwrap();
        assert_eq!(table.kind, "gpt");
        assert_eq!(table.gpt_types[0], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(table.gpt_types.len(), 2);
        assert_eq!(gpt_entries_at(&gpt(2, &[])), Some((1024, 128 * 128)));
    }

    #[test]
    fn an_entry_array_elsewhere_is_read_separately() {
        let head = gpt(2048, &[]);
        assert_eq!(gpt_entries_at(&head), Some((2048 * 512, 128 * 128)));
        let mut array = vec![0u8; 128 * 128];
        array[..16].copy_from_slice(&ESP);
        assert_eq!(parse(&head, Some(&array)).unwrap().gpt_types, vec!["C12A7328-F81F-11D2-BA4B-00A0C93EC93B"]);
        assert_eq!(parse(&head, None), None, "entries beyond the first sectors need their own read");
    }

    #[test]
    fn mbr_or_nothing() {
        let mut mbr = vec![0u8; HEAD];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr[446 + 4] = 0x83;
        assert_eq!(parse(&mbr, None), Some(Table { kind: "msdos", gpt_types: vec![], bios_boot: false }));
        // Generic code (as parted writes it) starts something only through an active partition.
        let mut generic = mbr.clone();
        generic[..4].copy_from_slice(&[0xfa, 0xb8, 0x00, 0x10]);
        assert!(!parse(&generic, None).unwrap().bios_boot);
        let mut active = generic.clone();
        active[446] = 0x80;
        assert!(parse(&active, None).unwrap().bios_boot);
        let mut grub = generic.clone();
        grub[0x180..0x185].copy_from_slice(b"GRUB ");
        assert!(parse(&grub, None).unwrap().bios_boot);
        assert_eq!(parse(&vec![0u8; HEAD], None), None);
        assert_eq!(parse(&[0u8; 10], None), None);
    }
}
