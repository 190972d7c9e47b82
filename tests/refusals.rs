//! Files that must be refused before any appliance starts, with the documented exit codes.

mod common;

use std::path::Path;
use std::process::Command;

use common::{cloudimg, text};

fn refused(input: &Path, output: &Path, extra: &[&str], code: i32, message: &str) {
    let mut args =
        vec!["customize", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--visible-password", "x"];
    args.extend_from_slice(extra);
    let out = cloudimg(&args, None, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{input:?}: {stderr}");
    assert!(stderr.contains(message), "{input:?}: expected {message:?} in {stderr}");
    assert!(!text(&out.stdout).contains("Launching"), "{input:?}: the appliance was started");
}

fn qemu_img(args: &[&str]) {
    assert!(Command::new("qemu-img").args(args).status().unwrap().success());
}

#[test]
fn unsafe_or_broken_files_are_refused_before_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let out = t("out.qcow2");
    std::fs::write(t("text.img"), "just some text, not a disk\n".repeat(100)).unwrap();
    std::fs::write(t("empty.img"), b"").unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", t("base.qcow2").to_str().unwrap(), "64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        t("base.qcow2").to_str().unwrap(),
        t("child.qcow2").to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", t("data.raw").display()),
        t("datafile.qcow2").to_str().unwrap(),
        "64M",
    ]);
    let whole = std::fs::read(t("base.qcow2")).unwrap();
    std::fs::write(t("truncated.qcow2"), &whole[..whole.len() / 2]).unwrap();
    std::fs::create_dir(t("dir.img")).unwrap();

    refused(&t("text.img"), &out, &[], 3, "not a disk image");
    refused(&t("empty.img"), &out, &[], 3, "empty");
    refused(&t("child.qcow2"), &out, &[], 3, "names a backing file");
    refused(&t("datafile.qcow2"), &out, &[], 3, "external data file");
    refused(&t("truncated.qcow2"), &out, &[], 3, "truncated");
    refused(&t("dir.img"), &out, &[], 3, "is a directory");
    refused(&t("missing.img"), &out, &[], 3, "missing.img");
    refused(&t("base.qcow2"), &t("./base.qcow2"), &[], 3, "is the input; use --in-place");
    std::fs::write(&out, b"keep me").unwrap();
    refused(&t("base.qcow2"), &out, &[], 7, "exists; use --force");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}

#[test]
fn help_teaches_by_example_and_documents_exit_codes() {
    let out = cloudimg(&["customize", "--help"], None, &[]);
    let help = text(&out.stdout);
    assert!(out.status.success());
    for needle in
        ["Examples:", "--password-stdin", "--random-password-file", "--visible-password", "--in-place", "Exit status:"]
    {
        assert!(help.contains(needle), "customize --help lacks {needle:?}");
    }
    let out = cloudimg(&["customize", "in.img", "-o", "out.img"], None, &[]);
    assert_eq!(out.status.code(), Some(2), "a missing password source is a usage error");
}
