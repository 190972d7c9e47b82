//! The NoCloud seed: a small FAT volume labelled `CIDATA` holding `meta-data` (a fresh instance-id,
//! so that cloud-init treats the boot as a new instance) and `user-data` that sets no password, so
//! that any password that works comes from the image itself. Written with the `fatfs` crate: no
//! `mkfs.vfat` or `mcopy` needed on the host.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};

/// 2 MiB: FAT12, plenty for two small files.
const SIZE: u64 = 2 << 20;

/// The seed's two files for instance `instance_id`.
pub fn files(instance_id: &str, hostname: &str) -> [(&'static str, String); 2] {
    [
        ("meta-data", format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")),
        // Nothing about users, passwords or sshd: only what the image says is tested.
        ("user-data", "#cloud-config\n{}\n".to_string()),
    ]
}

/// A fresh instance-id: random, so that no earlier boot of the image counts as this instance.
pub fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    format!("iid-cloudimg-verify-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Writes the seed volume into `path`, a new file (never an existing one or a link).
pub fn write(path: &Path, files: &[(&str, String)]) -> Result<()> {
    let mut file = File::create_new(path).with_context(|| format!("creating the NoCloud seed {}", path.display()))?;
    format_into(&mut file, files).with_context(|| format!("writing the NoCloud seed {}", path.display()))?;
    file.sync_all().context("flushing the NoCloud seed")
}

fn format_into(file: &mut File, files: &[(&str, String)]) -> Result<()> {
    file.set_len(SIZE)?;
    file.seek(SeekFrom::Start(0))?;
    let options = fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     ");
    fatfs::format_volume(&mut *file, options)?;
    file.seek(SeekFrom::Start(0))?;
    let fs = fatfs::FileSystem::new(&mut *file, fatfs::FsOptions::new())?;
    for (name, text) in files {
        let mut f = fs.root_dir().create_file(name)?;
        f.truncate()?;
        f.write_all(text.as_bytes())?;
        f.flush()?;
    }
    fs.unmount()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_seed_is_a_cidata_volume_with_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let id = instance_id();
        assert_ne!(id, instance_id(), "each verification is a new instance");
        write(&path, &files(&id, "verify")).unwrap();
        assert!(write(&path, &files(&id, "verify")).is_err(), "an existing file is never reused");

        // Read back through a separate handle: the label and both files.
        let fs = fatfs::FileSystem::new(File::open(&path).unwrap(), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let read = |name: &str| {
            let mut text = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut text).unwrap();
            text
        };
        assert_eq!(read("meta-data"), format!("instance-id: {id}\nlocal-hostname: verify\n"));
        let user_data = read("user-data");
        assert!(user_data.starts_with("#cloud-config\n"));
        assert!(!user_data.contains("password") && !user_data.contains("ssh_pwauth"), "{user_data}");
    }
}
