//! Where the appliance comes from: its files along libguestfs's search path, and for a supermin
//! appliance a host kernel that supermin can read.

use std::path::{Path, PathBuf};

use super::{Check, Status};

/// What libguestfs boots: a supermin appliance built on this host from its own packages, or a
/// prebuilt ("fixed") kernel, initrd and root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ApplianceKind {
    Supermin { supermin_d: PathBuf },
    Fixed { dir: PathBuf },
    Missing { path: String },
}

impl ApplianceKind {
    pub(super) fn probe(path: &Path) -> Self {
        // libguestfs's path is a colon-separated search list.
        for dir in path.to_string_lossy().split(':').map(PathBuf::from) {
            if dir.join("supermin.d").is_dir() {
                return ApplianceKind::Supermin { supermin_d: dir.join("supermin.d") };
            }
            if ["kernel", "initrd", "root"].iter().all(|f| dir.join(f).is_file()) {
                return ApplianceKind::Fixed { dir };
            }
        }
        ApplianceKind::Missing { path: path.to_string_lossy().into_owned() }
    }
}

pub(super) fn appliance_source_check(kind: Option<&ApplianceKind>) -> Check {
    let fix = if std::env::var_os("LIBGUESTFS_PATH").is_some() {
        "unset LIBGUESTFS_PATH, or point it at a directory holding supermin.d or a fixed appliance"
    } else {
        "sudo apt install --reinstall libguestfs0 supermin"
    };
    match kind {
        None => Check::new("appliance files", Status::Skipped, "unknown without libguestfs"),
        Some(ApplianceKind::Supermin { supermin_d }) if !Path::new(SUPERMIN).is_file() => Check::new(
            "appliance files",
            Status::Fail,
            format!("{} needs {SUPERMIN} to build the appliance, and it is missing", supermin_d.display()),
        )
        .fix("sudo apt install supermin"),
        Some(ApplianceKind::Supermin { supermin_d }) => Check::new(
            "appliance files",
            Status::Ok,
            format!("supermin appliance description in {}", supermin_d.display()),
        ),
        Some(ApplianceKind::Fixed { dir }) => {
            Check::new("appliance files", Status::Ok, format!("fixed appliance in {}", dir.display()))
        }
        Some(ApplianceKind::Missing { path }) => Check::new(
            "appliance files",
            Status::Fail,
            format!("no appliance in {path} (neither supermin.d nor kernel, initrd and root)"),
        )
        .fix(fix),
    }
}

pub(super) const SUPERMIN: &str = "/usr/bin/supermin";

/// One kernel supermin could copy into the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kernel {
    path: PathBuf,
    exists: bool,
    readable: bool,
    /// Its modules directory exists (supermin skips kernels without one).
    has_modules: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KernelFacts {
    /// `SUPERMIN_KERNEL`, which replaces the search in /boot.
    forced: Option<Kernel>,
    in_boot: Vec<Kernel>,
}

impl KernelFacts {
    pub(super) fn probe() -> Self {
        let forced = std::env::var_os("SUPERMIN_KERNEL").map(|path| {
            let modules = std::env::var_os("SUPERMIN_MODULES").map(PathBuf::from);
            Kernel::probe(PathBuf::from(path), modules)
        });
        let in_boot = glob::glob("/boot/vmlinuz-*")
            .map(|paths| paths.flatten().map(|p| Kernel::probe(p, None)).collect())
            .unwrap_or_default();
        KernelFacts { forced, in_boot }
    }
}

impl Kernel {
    pub(super) fn probe(path: PathBuf, modules: Option<PathBuf>) -> Self {
        let version = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("vmlinuz-")).unwrap_or("");
        let modules = modules.unwrap_or_else(|| Path::new("/lib/modules").join(version));
        Kernel {
            exists: path.is_file(),
            readable: std::fs::File::open(&path).is_ok(),
            has_modules: modules.is_dir(),
            path,
        }
    }
}

pub(super) fn kernel_check(facts: &KernelFacts) -> Check {
    if let Some(k) = &facts.forced {
        let shown = k.path.display();
        return match (k.exists, k.readable) {
            (false, _) => {
                Check::new("kernel", Status::Fail, format!("SUPERMIN_KERNEL names {shown}, which does not exist"))
                    .fix("unset SUPERMIN_KERNEL, or point it at a kernel image that exists")
            }
            (true, false) => Check::new(
                "kernel",
                Status::Fail,
                format!("SUPERMIN_KERNEL names {shown}, which this user cannot read"),
            )
            .fix(format!("sudo chmod 0644 {shown}")),
            (true, true) => Check::new("kernel", Status::Ok, format!("{shown} (from SUPERMIN_KERNEL)")),
        };
    }
    let usable: Vec<&Kernel> = facts.in_boot.iter().filter(|k| k.has_modules).collect();
    let unreadable: Vec<String> = usable.iter().filter(|k| !k.readable).map(|k| k.path.display().to_string()).collect();
    if usable.is_empty() {
        Check::new("kernel", Status::Fail, "no kernel in /boot with its modules in /lib/modules for the appliance")
            .fix("sudo apt install linux-image-amd64   (Ubuntu: linux-image-generic)")
    } else if !unreadable.is_empty() {
        // Ubuntu installs kernels readable by root only; supermin may pick any of them.
        Check::new("kernel", Status::Fail, format!("this user cannot read {}", unreadable.join(", ")))
            .fix("sudo chmod 0644 /boot/vmlinuz-*")
    } else {
        let names: Vec<String> = usable.iter().map(|k| k.path.display().to_string()).collect();
        Check::new("kernel", Status::Ok, format!("readable: {}", names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(path: &str, readable: bool, has_modules: bool) -> Kernel {
        Kernel { path: PathBuf::from(path), exists: true, readable, has_modules }
    }

    #[test]
    fn kernels_supermin_cannot_read_are_named_with_the_chmod_fix() {
        let ubuntu = KernelFacts {
            forced: None,
            in_boot: vec![
                kernel("/boot/vmlinuz-6.8.0-31-generic", false, true),
                kernel("/boot/vmlinuz-old", true, false),
            ],
        };
        let check = kernel_check(&ubuntu);
        assert_eq!(check.status, Status::Fail);
        assert!(check.detail.contains("/boot/vmlinuz-6.8.0-31-generic"), "{check:?}");
        assert!(!check.detail.contains("vmlinuz-old"), "a kernel without modules is not a candidate: {check:?}");
        assert_eq!(check.fix.as_deref(), Some("sudo chmod 0644 /boot/vmlinuz-*"));

        let none = KernelFacts { forced: None, in_boot: vec![kernel("/boot/vmlinuz-x", true, false)] };
        assert!(kernel_check(&none).fix.unwrap().contains("linux-image-amd64"));

        let debian = KernelFacts { forced: None, in_boot: vec![kernel("/boot/vmlinuz-6.1.0-56-amd64", true, true)] };
        assert_eq!(kernel_check(&debian).status, Status::Ok);

        let forced = KernelFacts {
            forced: Some(Kernel { exists: false, ..kernel("/nope", false, false) }),
            in_boot: debian.in_boot.clone(),
        };
        let check = kernel_check(&forced);
        assert_eq!(check.status, Status::Fail, "SUPERMIN_KERNEL replaces the search");
        assert!(check.detail.contains("SUPERMIN_KERNEL") && check.fix.unwrap().contains("unset SUPERMIN_KERNEL"));
    }

    #[test]
    fn appliance_sources_are_found_along_the_search_path() {
        let dir = tempfile::tempdir().unwrap();
        let fixed = dir.path().join("fixed");
        std::fs::create_dir(&fixed).unwrap();
        for f in ["kernel", "initrd", "root"] {
            std::fs::write(fixed.join(f), b"").unwrap();
        }
        let path = format!("{}:{}", dir.path().join("nothing").display(), fixed.display());
        assert_eq!(ApplianceKind::probe(Path::new(&path)), ApplianceKind::Fixed { dir: fixed });
        let missing = ApplianceKind::probe(&dir.path().join("nothing"));
        assert_eq!(appliance_source_check(Some(&missing)).status, Status::Fail);
    }
}
