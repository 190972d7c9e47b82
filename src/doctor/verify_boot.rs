//! What `cloudimg verify` needs beyond the appliance: qemu-system-x86_64 to boot the instance, SeaBIOS
//! for images with a BIOS bootloader, OVMF for images that boot only with UEFI.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{Check, Status};

/// Where qemu looks for SeaBIOS (Debian's `seabios` package, qemu's own data directory).
const SEABIOS: &[&str] = &["/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin"];

pub struct Facts {
    /// qemu-system-x86_64's version line, or why it could not be run.
    pub qemu: Result<String, String>,
    pub seabios: Option<PathBuf>,
    /// OVMF's code file.
    pub ovmf: Option<PathBuf>,
}

impl Facts {
    pub fn probe(version: impl Fn(&str, &[&str]) -> Result<String>) -> Facts {
        Facts {
            qemu: version("qemu-system-x86_64", &["--version"]).map_err(|e| format!("{e:#}")),
            seabios: SEABIOS.iter().map(PathBuf::from).find(|p| p.is_file()),
            ovmf: crate::verify::boot::ovmf().map(|(code, _)| code),
        }
    }
}

/// `verify` is an extra: without what it needs, customize still works (a warning, not a failure).
pub fn check(f: &Facts) -> Check {
    let shown = |p: &Option<PathBuf>| p.as_deref().map_or("missing".to_string(), |p: &Path| p.display().to_string());
    match (&f.qemu, &f.seabios, &f.ovmf) {
        (Err(why), _, _) => Check::new("verify boot", Status::Warning, format!("cloudimg verify cannot boot: {why}"))
            .fix("apt-get install qemu-system-x86"),
        (Ok(_), None, _) => Check::new(
            "verify boot",
            Status::Warning,
            "no SeaBIOS (bios-256k.bin): cloudimg verify cannot boot images through their BIOS bootloader",
        )
        .fix("apt-get install seabios"),
        (Ok(qemu), Some(_), None) => Check::new(
            "verify boot",
            Status::Info,
            format!(
                "{qemu}; SeaBIOS {}; no OVMF: images that boot only with UEFI cannot be verified",
                shown(&f.seabios)
            ),
        )
        .fix("apt-get install ovmf"),
        (Ok(qemu), Some(_), Some(_)) => Check::new(
            "verify boot",
            Status::Ok,
            format!("{qemu}; SeaBIOS {}; OVMF {}", shown(&f.seabios), shown(&f.ovmf)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_verify_lacks_is_a_warning_or_a_note_never_a_failure() {
        let facts = |qemu: Result<&str, &str>, seabios: bool, ovmf: bool| Facts {
            qemu: qemu.map(str::to_string).map_err(str::to_string),
            seabios: seabios.then(|| PathBuf::from(SEABIOS[0])),
            ovmf: ovmf.then(|| PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd")),
        };
        let table = [
            (facts(Err("running qemu-system-x86_64: not found"), true, true), Status::Warning, Some("qemu-system-x86")),
            (facts(Ok("QEMU emulator version 7.2.19"), false, true), Status::Warning, Some("seabios")),
            (facts(Ok("QEMU emulator version 7.2.19"), true, false), Status::Info, Some("apt-get install ovmf")),
            (facts(Ok("QEMU emulator version 7.2.19"), true, true), Status::Ok, None),
        ];
        for (f, status, fix) in table {
            let c = check(&f);
            assert_eq!(c.status, status, "{c:?}");
            assert_eq!(c.fix.is_some(), fix.is_some(), "{c:?}");
            if let Some(fix) = fix {
                assert!(c.fix.as_deref().unwrap().contains(fix), "{c:?}");
            }
        }
    }
}
