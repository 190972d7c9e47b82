//! `cloudimg verify` without booting: what it refuses before starting anything, and its NoCloud
//! seed as the system's own tools read it, and `customize --verify --keep-failed` on an output that
//! cannot boot (the boots are in tests/boot.rs).

mod common;

use std::process::Command;

use common::{cloudimg, p, text};

#[test]
fn refusals_come_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let not_an_image = dir.path().join("notes.txt");
    std::fs::write(&not_an_image, "hello\n".repeat(200)).unwrap();
    let kept = dir.path().join("kept.qcow2");
    std::fs::write(&kept, "already here").unwrap();
    let (image, pw) = (not_an_image.to_str().unwrap(), pw.to_str().unwrap());
    let table: [(&[&str], i32, &str); 4] = [
        (&["verify", image], 2, "--password-file"),
        (&["verify", image, "--password-file", pw, "--password-stdin"], 2, "cannot be used with"),
        (&["verify", image, "--password-file", pw, "--keep-disk", kept.to_str().unwrap()], 7, "exists"),
        (&["verify", image, "--password-file", pw], 3, "notes.txt"),
    ];
    for (args, code, said) in table {
        let out = cloudimg(args, None, &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(&kept).unwrap(), b"already here");
}

#[test]
fn the_seed_is_a_vfat_volume_labelled_cidata_for_blkid() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.img");
    let files = cloudimg::verify::seed::files("iid-test", "verify");
    cloudimg::verify::seed::write(&seed, &files).unwrap();
    // blkid (util-linux) is what cloud-init's NoCloud data source asks for a `cidata` volume.
    let out = Command::new("blkid").args(["-p", "-o", "export"]).arg(&seed).output().expect("blkid");
    let said = text(&out.stdout);
    assert!(out.status.success(), "blkid: {}", text(&out.stderr));
    assert!(said.lines().any(|l| l == "TYPE=vfat"), "{said}");
    assert!(said.lines().any(|l| l == "LABEL=CIDATA"), "{said}");
}

#[test]
fn keep_failed_keeps_an_output_that_failed_its_verification_beside_the_output_name() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "keep-failed test\n").unwrap();
    let out = dir.path().join("out.qcow2");
    // The phony guest has no kernel: it is edited and written, but cannot boot.
    let image = common::fixtures().image("debian-ext4");
    let args = ["customize", p(&image), "-o", p(&out), "--password-file", p(&pw), "--verify", "--keep-failed"];
    let run = cloudimg(&args, None, &[]);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("no kernel in /boot"), "{stderr}");
    assert!(stderr.contains("nothing was written under that name"), "{stderr}");
    let kept = dir.path().join("out.failed.qcow2");
    assert!(stderr.contains(&format!("kept as {}", kept.display())), "{stderr}");
    assert!(!out.exists(), "nothing under the output name");
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&kept).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", text(&check.stdout));
    let cfg = common::ReadBack::open(&[&kept]).read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]);
    assert!(common::file_text(&cfg, "/etc/cloud/cloud.cfg").contains("ssh_pwauth: true"), "{cfg:?}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 2, "only the password file and the kept image: {names:?}");
}
