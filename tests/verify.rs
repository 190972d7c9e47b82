//! `cloudimg verify` without booting: what it refuses before starting anything, and its NoCloud
//! seed as the system's own tools read it (the boots are in tests/boot.rs; `customize --verify
//! --keep-failed` with `--upload` is in tests/glance.rs).

mod common;

use std::process::Command;

use common::{cloudimg, text};

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
