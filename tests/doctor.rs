//! `cloudimg doctor` on this host: a real check that starts the appliance, and settings broken on
//! purpose, each of which must fail with its own fix and the documented exit status.

mod common;

use common::{cloudimg, text};
use std::os::unix::fs::MetadataExt;

use serde_json::Value;

fn doctor(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Value, String) {
    let out = cloudimg(&[&["doctor", "--json"], args].concat(), None, env);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), text(&out.stderr)));
    (out.status.code(), report, text(&out.stderr))
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name}: {report}"))
}

fn failed(report: &Value) -> Vec<String> {
    let checks = report["checks"].as_array().unwrap();
    checks.iter().filter(|c| c["status"] == "fail").map(|c| c["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn doctor_builds_and_starts_the_appliance_here() {
    let (code, report, stderr) = doctor(&[], &[]);
    assert_eq!(code, Some(0), "{report:#} {stderr}");
    assert_eq!(report["works"], true);
    assert_eq!(check(&report, "launch")["status"], "ok");
    assert!(report["launch_seconds"].as_f64().unwrap() > 0.0);
    let expected_accel = if common::force_tcg() { "tcg" } else { "kvm" };
    assert_eq!(report["accel"], expected_accel);
    let launch = check(&report, "launch")["detail"].as_str().unwrap();
    if common::force_tcg() {
        // doctor has just built (or checked) libguestfs's appliance, so the launch boots the fast-boot
        // copy of it, and that copy started.
        let dir = launch
            .split_once("fast-boot copy")
            .and_then(|(_, rest)| rest.split(" in ").nth(1))
            .unwrap_or_else(|| panic!("{launch}"));
        let dir = std::path::Path::new(dir.trim());
        let kernel = std::fs::File::open(dir.join("kernel")).unwrap();
        assert!(cloudimg::appliance::fast_boot::has_pvh_entry(kernel).unwrap(), "{launch}");
        let meta = |p: &std::path::Path| std::fs::metadata(p).unwrap();
        let cache = dir.parent().and_then(|base| base.parent()).unwrap();
        let source = cache.join(format!(".guestfs-{}", meta(dir).uid())).join("appliance.d");
        for file in ["initrd", "root"] {
            assert_eq!(meta(&dir.join(file)).ino(), meta(&source.join(file)).ino(), "{file} of {launch}");
        }
    } else {
        assert!(launch.contains("libguestfs's own"), "{launch}");
    }
    assert!(report["verdict"].as_str().unwrap().starts_with("cloudimg works on this host"), "{report:#}");
}

#[test]
fn each_broken_setting_fails_its_check_with_the_command_that_fixes_it() {
    let cases: &[(&str, &str, &str, &str)] = &[
        ("SUPERMIN_KERNEL", "/nonexistent/vmlinuz", "kernel", "unset SUPERMIN_KERNEL"),
        ("LIBGUESTFS_HV", "/nonexistent/qemu-system-x86_64", "qemu", "unset LIBGUESTFS_HV"),
        ("LIBGUESTFS_PATH", "/nonexistent/appliance", "appliance files", "unset LIBGUESTFS_PATH"),
        ("TMPDIR", "/nonexistent/tmp", "temporary directory", "export TMPDIR="),
        ("PATH", "/nonexistent/bin", "qemu-utils", "sudo apt install qemu-utils"),
    ];
    for (variable, value, name, fix) in cases {
        let (code, report, _) = doctor(&["--quick"], &[(variable, value)]);
        assert_eq!(code, Some(6), "{variable}={value}: {report:#}");
        assert_eq!(failed(&report), vec![name.to_string()], "{variable}={value}: only {name} fails");
        let fixes = check(&report, name)["fix"].as_str().unwrap_or_default();
        assert!(fixes.contains(fix), "{variable}={value}: fix {fixes:?} should contain {fix:?}");
        assert!(report["verdict"].as_str().unwrap().contains("cannot work"), "{report:#}");
    }

    // The human form prints the same finding and fix.
    let out = cloudimg(&["doctor", "--quick"], None, &[("SUPERMIN_KERNEL", "/nonexistent/vmlinuz")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(6));
    assert!(stdout.contains("FAIL     kernel") && stdout.contains("fix: unset SUPERMIN_KERNEL"), "{stdout}");

    // --accel kvm fails exactly where the host cannot run KVM.
    let (code, report, _) = doctor(&["--quick", "--accel", "kvm"], &[]);
    let kvm_unusable = cloudimg::appliance::accel::HostKvm::probe().problem().is_some();
    assert_eq!(code, Some(if kvm_unusable { 6 } else { 0 }), "{report:#}");
    assert_eq!(check(&report, "kvm")["status"], if kvm_unusable { "fail" } else { "ok" });

    // What verify needs: qemu-system-x86_64 and SeaBIOS are here (libguestfs's qemu brings both);
    // OVMF decides between ok and a note with its fix.
    let verify = check(&report, "verify boot");
    let ovmf = cloudimg::verify::boot::ovmf().is_some();
    assert_eq!(verify["status"], if ovmf { "ok" } else { "info" }, "{verify:#}");
    assert!(ovmf || verify["fix"] == "apt-get install ovmf", "{verify:#}");
}

#[test]
fn an_appliance_that_does_not_start_in_time_is_a_failure_with_its_cause() {
    let (code, report, _) = doctor(&["--timeout", "1"], &[]);
    assert_eq!(code, Some(6), "{report:#}");
    // The build is usually up to date (fast); if it is not, it is the step that runs out of time.
    let failures = failed(&report);
    assert_eq!(failures.len(), 1, "{report:#}");
    let detail = check(&report, &failures[0])["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("within 1 s"), "{detail}");
    assert!(report["launch_seconds"].is_null());
}

#[test]
fn an_appliance_that_cannot_be_built_in_time_is_the_one_failure_and_no_launch_is_tried() {
    // supermin waits for the lock on its cache, which this test holds (lockf, as supermin takes it):
    // the build is the step that runs out of time, and a launch without an appliance is not tried.
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    let dir = cache.path().join(format!(".guestfs-{}", unsafe { libc::geteuid() }));
    std::fs::create_dir(&dir).unwrap();
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    // SAFETY: lockf on a file this test opened; released when `lock` is closed.
    assert_eq!(unsafe { libc::lockf(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::F_LOCK, 0) }, 0);
    let tmpdir = cache.path().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let env = [("LIBGUESTFS_CACHEDIR", cache.path().to_str().unwrap()), ("TMPDIR", tmpdir.to_str().unwrap())];
    let (code, report, _) = doctor(&["--timeout", "1"], &env);
    assert_eq!(code, Some(6), "{report:#}");
    assert_eq!(failed(&report), ["appliance"], "{report:#}");
    let left: Vec<_> = std::fs::read_dir(&tmpdir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the stopped supermin left {left:?} in TMPDIR");
    let detail = check(&report, "appliance")["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("did not finish within 1 s"), "{detail}");
    assert_eq!(check(&report, "launch")["status"], "skipped", "{report:#}");
    assert!(report["launch_seconds"].is_null());
}
