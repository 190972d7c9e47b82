//! Which appliance cloudimg boots, and how. Never one from a cache another local user could have
//! prepared (libguestfs's cache in world-writable /var/tmp can be made by anyone first): each test
//! points LIBGUESTFS_CACHEDIR at a directory of its own where a cache is planted the way such a user
//! would. And always with qemu as cloudimg's own child (the direct backend), whatever libguestfs is
//! set to.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{cloudimg, fixtures, text};
use serde_json::Value;

fn uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// libguestfs's own cache directory on this host, holding a built appliance.
fn real_cachedir() -> PathBuf {
    let cachedir = PathBuf::from(cloudimg::guest::setup().unwrap().cachedir);
    if !cachedir.join(format!(".guestfs-{}/appliance.d/root", uid())).exists() {
        let out = cloudimg(&["doctor"], None, &[]);
        assert!(out.status.success(), "building the appliance: {}", text(&out.stdout));
    }
    cachedir
}

/// A cache directory of its own for one test, on the real cache's filesystem (for hard links).
fn test_cachedir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("appliance-test-").tempdir_in(real_cachedir()).unwrap()
}

/// `LIBGUESTFS_CACHEDIR` for a run.
fn env(cachedir: &Path) -> Vec<(&'static str, &str)> {
    vec![("LIBGUESTFS_CACHEDIR", cachedir.to_str().unwrap())]
}

fn dry_run(cachedir: &Path, extra_env: &[(&str, &str)]) -> std::process::Output {
    let image = fixtures().image("debian-ext4");
    let env = [&env(cachedir)[..], extra_env].concat();
    cloudimg(&["customize", image.to_str().unwrap(), "--dry-run", "--visible-password", "x", "-v"], None, &env)
}

fn doctor_quick(cachedir: &Path) -> (Option<i32>, Value) {
    let out = cloudimg(&["doctor", "--quick", "--json"], None, &env(cachedir));
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    (out.status.code(), report)
}

fn failures(report: &Value) -> Vec<&Value> {
    report["checks"].as_array().unwrap().iter().filter(|c| c["status"] == "fail").collect()
}

/// libguestfs's cache made in `cachedir` by someone else: an appliance of theirs (a real kernel that
/// cloudimg would decompress and boot, their initrd, a root that is not even a filesystem), either
/// owned by them or in a directory anyone can write to.
fn plant_appliance(cachedir: &Path, owner: Option<u32>) -> PathBuf {
    let cache = cachedir.join(format!(".guestfs-{}", uid()));
    let appliance = cache.join("appliance.d");
    std::fs::create_dir_all(&appliance).unwrap();
    let real = real_cachedir().join(format!(".guestfs-{}/appliance.d", uid()));
    std::fs::copy(real.join("kernel"), appliance.join("kernel")).unwrap();
    std::fs::copy(real.join("initrd"), appliance.join("initrd")).unwrap();
    std::fs::write(appliance.join("root"), vec![0x5a; 1 << 20]).unwrap();
    match owner {
        Some(owner) => {
            for path in
                [&cache, &appliance, &appliance.join("kernel"), &appliance.join("initrd"), &appliance.join("root")]
            {
                std::os::unix::fs::chown(path, Some(owner), Some(owner)).unwrap();
            }
        }
        None => chmod(&cache, 0o777),
    }
    cache
}

#[test]
fn an_appliance_someone_else_planted_is_never_booted() {
    let mut cases = vec![(None, "is writable by group or others (mode 0777)")];
    if uid() == 0 {
        cases.push((Some(65534), "is owned by uid 65534, not by this user (uid 0)"));
    }
    for (owner, problem) in cases {
        let cachedir = test_cachedir();
        let cache = plant_appliance(cachedir.path(), owner);
        let out = dry_run(cachedir.path(), &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{owner:?}: {stderr}");
        assert!(
            stderr.contains("the appliance cache cannot be trusted")
                && stderr.contains(&format!("{} {problem}", cache.display()))
                && stderr.contains(&format!("fix: rm -rf {}", cache.display())),
            "{owner:?}: {stderr}"
        );
        let copies = cachedir.path().join(format!("cloudimg-appliance-{}", uid()));
        assert!(!copies.exists(), "{owner:?}: a fast-boot copy of the planted appliance was made");
        assert!(!stderr.contains("Launching") && !text(&out.stdout).contains("appliance:"), "{owner:?}: launched");

        let (code, report) = doctor_quick(cachedir.path());
        assert_eq!(code, Some(6), "{report:#}");
        let failed = failures(&report);
        assert_eq!(failed.len(), 1, "{report:#}");
        assert_eq!(failed[0]["name"], "cache ownership");
        assert!(failed[0]["detail"].as_str().unwrap().contains(problem), "{report:#}");
        assert_eq!(failed[0]["fix"].as_str().unwrap(), format!("rm -rf {} (as its owner or root; it is rebuilt), or export LIBGUESTFS_CACHEDIR=/a/directory/of/your/own", cache.display()));
    }
}

#[test]
fn doctor_fails_a_cache_directory_that_is_a_link_with_the_fix() {
    let cachedir = test_cachedir();
    let elsewhere = cachedir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let cache = cachedir.path().join(format!(".guestfs-{}", uid()));
    std::os::unix::fs::symlink(&elsewhere, &cache).unwrap();
    let (code, report) = doctor_quick(cachedir.path());
    assert_eq!(code, Some(6), "{report:#}");
    let failed = failures(&report);
    assert_eq!(failed.len(), 1, "{report:#}");
    assert!(failed[0]["detail"].as_str().unwrap().contains("is a symbolic link"), "{report:#}");
    assert_eq!(failed[0]["fix"], format!("rm {}", cache.display()));
}

/// libguestfs's real appliance, hard-linked into `cachedir`: a cache this user controls.
fn link_real_appliance(cachedir: &Path) {
    let real = real_cachedir().join(format!(".guestfs-{}/appliance.d", uid()));
    let appliance = cachedir.join(format!(".guestfs-{}/appliance.d", uid()));
    std::fs::create_dir_all(&appliance).unwrap();
    for file in ["kernel", "initrd", "root"] {
        std::fs::hard_link(real.join(file), appliance.join(file)).unwrap();
    }
}

#[test]
fn a_fast_boot_directory_someone_else_made_means_the_stock_appliance_and_a_warning() {
    let cachedir = test_cachedir();
    link_real_appliance(cachedir.path());
    let copies = cachedir.path().join(format!("cloudimg-appliance-{}", uid()));
    std::fs::create_dir(&copies).unwrap();
    let problem = if uid() == 0 {
        std::os::unix::fs::chown(&copies, Some(65534), Some(65534)).unwrap();
        "is owned by uid 65534"
    } else {
        chmod(&copies, 0o777);
        "is writable by group or others"
    };

    let (code, report) = doctor_quick(cachedir.path());
    assert_eq!(code, Some(6), "{report:#}");
    assert_eq!(failures(&report)[0]["name"], "cache ownership", "{report:#}");

    let out = dry_run(cachedir.path(), &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("not using the fast-boot appliance: {} {problem}", copies.display()))
            && stderr.contains(&format!("fix: rm -rf {}", copies.display())),
        "{stderr}"
    );
    assert!(stdout.contains("appliance: libguestfs's own"), "{stdout}");
    assert_eq!(std::fs::read_dir(&copies).unwrap().count(), 0, "nothing was made in their directory");
}

#[test]
fn the_appliance_runs_as_cloudimgs_own_child_whatever_backend_libguestfs_is_set_to() {
    // There is no libvirtd here: with the libvirt backend the launch could not even start. cloudimg
    // launches with the direct backend, so that --timeout and Ctrl-C reach qemu.
    let image = fixtures().image("debian-ext4");
    let args = ["customize", image.to_str().unwrap(), "--dry-run", "--visible-password", "x"];
    let out = cloudimg(&args, None, &[("LIBGUESTFS_BACKEND", "libvirt")]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("libguestfs is set to the `libvirt` backend") && stderr.contains("uses `direct`"),
        "{stderr}"
    );
}
