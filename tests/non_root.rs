//! cloudimg as an ordinary user: it works where libguestfs allows it, and writes nothing outside the
//! output directory and the temporary directory it was given. Needs root to create the user; skipped
//! (with a message) otherwise.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{fixtures, text, ReadBack};

const USER: &str = "cloudimg-nonroot";

fn ensure_user() {
    if !Command::new("id").arg(USER).output().unwrap().status.success() {
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER])
            .status()
            .unwrap();
        assert!(made.success(), "useradd {USER}");
    }
}

fn chown_to_user(path: &Path) {
    assert!(Command::new("chown").args([&format!("{USER}:"), path.to_str().unwrap()]).status().unwrap().success());
}

fn as_user(binary: &Path, args: &[&str], home: &Path, tmp: &Path) -> Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .arg(format!("HOME={}", home.display()))
        .arg(format!("TMPDIR={}", tmp.display()))
        .arg(binary)
        .args(args)
        .output()
        .unwrap()
}

/// Files the user owns anywhere it could write, outside `allowed`.
fn files_owned_outside(allowed: &Path) -> Vec<String> {
    let out = Command::new("find")
        .args(["/", "/tmp", "/var/tmp", "/dev/shm", "/run", "-xdev", "-user", USER])
        .output()
        .unwrap();
    text(&out.stdout).lines().filter(|l| !Path::new(l).starts_with(allowed)).map(str::to_string).collect()
}

#[test]
fn an_ordinary_user_customizes_an_image_and_writes_only_where_told() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating a test user needs root");
        return;
    }
    ensure_user();
    let base = tempfile::Builder::new().prefix("cloudimg-nonroot-").tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = |name: &str| {
        let d = base.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (input_dir, out_dir, tmp, home) = (dir("input"), dir("out"), dir("tmp"), dir("home"));
    for d in [&out_dir, &tmp, &home] {
        chown_to_user(d);
    }
    // The binary is copied: the checkout may sit under a directory the user cannot enter (/root).
    let binary = input_dir.join("cloudimg");
    std::fs::copy(env!("CARGO_BIN_EXE_cloudimg"), &binary).unwrap();
    let input = input_dir.join("debian.qcow2");
    std::fs::copy(fixtures().image("debian-ext4"), &input).unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    let password = home.join("pw");
    std::fs::write(&password, "non-root secret\n").unwrap();
    chown_to_user(&password);
    let input_sum = common::sha256(&input);
    let before = files_owned_outside(base.path());

    let doctor = as_user(&binary, &["doctor", "--quick", "--json"], &home, &tmp);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let user_check = &report["checks"][0];
    assert!(user_check["detail"].as_str().unwrap().contains("not root"), "{report:#}");

    let output = out_dir.join("debian-pw.qcow2");
    let run = as_user(
        &binary,
        &[
            "customize",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--password-file",
            password.to_str().unwrap(),
        ],
        &home,
        &tmp,
    );
    assert!(run.status.success(), "{}\n{}", text(&run.stdout), text(&run.stderr));

    assert_eq!(common::sha256(&input), input_sum, "the input is unchanged");
    let after = files_owned_outside(base.path());
    assert_eq!(after, before, "files the user created outside the output and temporary directories");
    let leftovers: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".guestfs-"))
        .collect();
    assert!(leftovers.is_empty(), "temporaries left in TMPDIR: {leftovers:?}");
    let home_entries: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(home_entries, vec![std::ffi::OsString::from("pw")], "nothing written to HOME");
    let owner = std::fs::metadata(&output).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&owner), user_uid(), "the output belongs to the user");

    let rb = ReadBack::open(&[&output]);
    let files = rb.read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]);
    let cfg = text(files["/etc/cloud/cloud.cfg"].as_ref().unwrap());
    let doc = &common::pyyaml(&[cfg])[0];
    let entry = &doc["chpasswd"]["users"][0];
    assert_eq!(entry["name"], "debian", "{doc:#}");
    assert!(common::system_crypt_verifies("non-root secret", entry["password"].as_str().unwrap()), "{doc:#}");
}

fn user_uid() -> u32 {
    let out = Command::new("id").args(["-u", USER]).output().unwrap();
    text(&out.stdout).trim().parse().unwrap()
}
