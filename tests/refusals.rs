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
    // Relative backing file, and a chain through a second qcow2.
    let in_tmp = |args: &[&str]| {
        assert!(Command::new("qemu-img").args(args).current_dir(tmp.path()).status().unwrap().success())
    };
    in_tmp(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "relative.qcow2"]);
    in_tmp(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "child.qcow2", "chain.qcow2"]);
    let whole = std::fs::read(t("base.qcow2")).unwrap();
    // Header fields patched: an unknown incompatible feature bit; a virtual size its L1 table cannot map.
    let patched = |name: &str, at: usize, bytes: &[u8]| {
        let mut copy = whole.clone();
        copy[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(t(name), copy).unwrap();
    };
    patched("feature.qcow2", 72, &(1u64 << 40).to_be_bytes());
    patched("liar.qcow2", 24, &(1u64 << 50).to_be_bytes());
    // A "raw" disk whose first bytes are a qcow2 header pointing at a host file: read as what it is.
    let mut disguised = vec![0u8; 1 << 20];
    disguised[..4].copy_from_slice(b"QFI\xfb");
    disguised[4..8].copy_from_slice(&3u32.to_be_bytes());
    disguised[8..16].copy_from_slice(&512u64.to_be_bytes());
    disguised[16..20].copy_from_slice(&11u32.to_be_bytes());
    disguised[512..523].copy_from_slice(b"/etc/shadow");
    disguised[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(t("disguised.raw"), disguised).unwrap();
    let fifo = t("fifo.img");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::fs::write(t("truncated.qcow2"), &whole[..whole.len() / 2]).unwrap();
    std::fs::create_dir(t("dir.img")).unwrap();

    refused(&t("text.img"), &out, &[], 3, "not a disk image");
    refused(&t("empty.img"), &out, &[], 3, "the file is empty");
    refused(&t("child.qcow2"), &out, &[], 3, "names a backing file");
    refused(&t("datafile.qcow2"), &out, &[], 3, "external data file");
    refused(&t("relative.qcow2"), &out, &[], 3, "names a backing file `base.qcow2`");
    refused(&t("chain.qcow2"), &out, &[], 3, "names a backing file `child.qcow2`");
    refused(&t("feature.qcow2"), &out, &[], 3, "incompatible features this tool does not know (bits 0x10000000000)");
    refused(&t("liar.qcow2"), &out, &[], 3, "header lies about its size");
    refused(&t("disguised.raw"), &out, &[], 3, "names a backing file `/etc/shadow`");
    refused(&fifo, &out, &[], 3, "device, pipe or socket");
    refused(Path::new("/dev/zero"), &out, &[], 3, "device, pipe or socket");
    refused(Path::new("/dev/null"), &out, &[], 3, "device, pipe or socket");
    refused(&t("truncated.qcow2"), &out, &[], 3, "truncated");
    refused(&t("dir.img"), &out, &[], 3, "is a directory");
    refused(&t("missing.img"), &out, &[], 3, "missing.img");
    refused(&t("base.qcow2"), &t("./base.qcow2"), &[], 3, "is the input; use --in-place");
    std::fs::write(&out, b"keep me").unwrap();
    refused(&t("base.qcow2"), &out, &[], 7, "exists; use --force");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}

/// A petabyte disk costs a few MiB as a qcow2 (qemu-img makes one) and nothing as a sparse raw file;
/// written raw with a manifest, every byte of it would be hashed. Refused at once, before any launch.
#[test]
fn a_petabyte_disk_is_refused_before_launch() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = tmp.path().join("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", huge.to_str().unwrap(), "1P"]);
    let out = tmp.path().join("out.raw");
    let limit = "over cloudimg's limit of 64 TiB";
    refused(&huge, &out, &["--output-format", "raw", "--manifest"], 3, limit);
    let inspected = cloudimg(&["inspect", huge.to_str().unwrap()], None, &[]);
    assert_eq!(inspected.status.code(), Some(3), "{}", text(&inspected.stderr));
    assert!(text(&inspected.stdout).contains(limit), "{}", text(&inspected.stdout));

    // ext4 stops at 16 TiB a file; tmpfs takes a sparse petabyte.
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let raw = shm.path().join("huge.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(1 << 50).expect("a sparse 1 PiB file on /dev/shm");
    let mut mbr = [0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&1000u32.to_le_bytes());
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::os::unix::fs::FileExt::write_all_at(&file, &mbr, 0).unwrap();
    refused(&raw, &out, &[], 3, limit);
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
