//! Hostile input: guests whose cloud-init files are links, devices, huge, malformed or malicious, and
//! image files at awkward paths. Each has a defined outcome (README.md, "Hostile input"): a clear
//! refusal with its exit status, or a correct edit; never a hang, a crash, or a write elsewhere.

mod common;

use std::path::Path;
use std::sync::Mutex;

use common::{cloudimg, fixtures, text, HOSTILE_GUESTS};

/// (case, exit status, text the message must contain)
const OUTCOMES: &[(&str, i32, &str)] = &[
    ("cloud.cfg relative symlink to ../shadow", 4, "is a symbolic link (to `../shadow`)"),
    ("cloud.cfg absolute symlink to /etc/shadow", 4, "is a symbolic link (to `/etc/shadow`)"),
    ("cloud.cfg symlink escaping the root", 4, "is a symbolic link"),
    ("cloud.cfg is a directory", 4, "is not a regular file"),
    ("cloud.cfg is a FIFO", 4, "is not a regular file"),
    ("cloud.cfg is 100 MiB", 4, "larger than the 1048576 bytes"),
    ("cloud.cfg is not UTF-8", 4, "UTF-8"),
    ("cloud.cfg is a YAML alias bomb", 4, "alias"),
    ("cloud.cfg is nested 10000 deep", 4, "recursion limit exceeded"),
    ("cloud.cfg has duplicate keys", 0, "+ssh_pwauth: true"),
    ("cloud.cfg has tabs in values and comments", 0, "+ssh_pwauth: true"),
    ("cloud.cfg has tab indentation", 4, "/etc/cloud/cloud.cfg"),
    // A drop-in cloudimg cannot read is not edited and not followed: the edit is made, with a warning
    // that the checks could not see what that file sets.
    ("cloud.cfg.d holds a symlink to /etc/shadow", 0, "50-link.cfg in the guest is a symbolic link (to `/etc/shadow`)"),
    ("cloud.cfg.d holds a mode-000 file", 5, "50-locked.cfg"),
    (
        "cloud.cfg.d holds a directory named .cfg",
        0,
        "50-dir.cfg in the guest is not a regular file; the checks cannot see",
    ),
];

#[test]
fn every_hostile_guest_gets_its_documented_outcome() {
    assert_eq!(OUTCOMES.len(), HOSTILE_GUESTS.len());
    let image = fixtures().image("hostile-guests");
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "hostile pw\n").unwrap();
    let jobs: Mutex<Vec<(usize, &str)>> = Mutex::new(HOSTILE_GUESTS.iter().copied().enumerate().collect());
    let failures = Mutex::new(Vec::new());
    // Two at a time: each run is one appliance launch.
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let Some((i, case)) = jobs.lock().unwrap().pop() else { break };
                let root = format!("/dev/sda{}", i + 1);
                let args = ["customize", p(&image), "--dry-run", "--root", &root, "--password-file", p(&pw)];
                let out = cloudimg(&[&args[..], &["--timeout", "300"]].concat(), None, &[]);
                let (_, code, needle) = OUTCOMES.iter().find(|(c, _, _)| *c == case).unwrap();
                let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
                if out.status.code() != Some(*code) || !said.contains(needle) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{case}: exit {:?}, expected {code} and {needle:?}:\n{said}", out.status.code()));
                } else if *code != 0 {
                    assert!(!said.contains("panicked"), "{case}: {said}");
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn paths_with_spaces_commas_colons_and_newlines_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a dir, with: odd\nnames");
    std::fs::create_dir(&dir).unwrap();
    let input = dir.join("in put,file=x:y\n.qcow2");
    std::fs::copy(fixtures().image("debian-ext4"), &input).unwrap();
    let output = dir.join("out,put\n x.qcow2");
    let pw = dir.join("pass word\n");
    std::fs::write(&pw, "odd paths\n").unwrap();
    let out = cloudimg(&["customize", p(&input), "-o", p(&output), "--password-file", p(&pw)], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rb = common::ReadBack::open(&[&output]);
    let cfg = rb.read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]).remove("/etc/cloud/cloud.cfg").unwrap().unwrap();
    let doc = &common::pyyaml(&[text(&cfg)])[0];
    assert!(common::system_crypt_verifies("odd paths", doc["chpasswd"]["users"][0]["password"].as_str().unwrap()));
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "input, output and password file only: {names:?}");
}
