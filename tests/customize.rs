//! `cloudimg customize` on phony guests of every supported layout, read back through a separate
//! read-only libguestfs handle and judged by PyYAML and the system's crypt(3).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{cloudimg, file_text, fixtures, p, pyyaml, sha256, system_crypt_verifies, text, ReadBack};
use serde_json::{json, Value};

const PASSWORD: &str = "Correct horse: battery 'staple' #1";

struct Case {
    name: &'static str,
    args: Vec<String>,
    stdin: Option<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

/// Runs the cases two at a time (each appliance is one busy vCPU under TCG).
fn run_all(cases: &[Case]) -> Vec<Output> {
    let mut outputs = Vec::new();
    for chunk in cases.chunks(2) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|case| {
                let args = case.args.clone();
                let (stdin, env) = (case.stdin, case.env.clone());
                std::thread::spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    cloudimg(&args, stdin, &env)
                })
            })
            .collect();
        outputs.extend(handles.into_iter().map(|h| h.join().unwrap()));
    }
    outputs
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const CFG: &str = "/etc/cloud/cloud.cfg";
const DROP_IN: &str = "/etc/cloud/cloud.cfg.d/99-cloudimg.cfg";
const SSHD_60: &str = "/etc/ssh/sshd_config.d/60-cloudimg-settings.conf";
/// Instance state `--clean-instance-state` removes, all but the last (the seed).
const STATE: [&str; 4] = [
    "/var/lib/cloud/instance",
    "/var/lib/cloud/instances/i-0123/sem/config_set_passwords",
    "/var/lib/cloud/data/instance-id",
    "/var/lib/cloud/seed/nocloud/meta-data",
];
const LAYOUTS: [&str; 4] = ["debian-ext4", "ubuntu-gpt-efi-boot", "rocky-lvm-xfs", "ubuntu-btrfs-subvol"];

/// The outputs of one customize run per layout and option set, and what was read back from them
/// through one separate read-only appliance. Made once and shared by the tests below, so that each test
/// names one behaviour without another appliance launch.
struct Layouts {
    tmp: tempfile::TempDir,
    sums_before: Vec<String>,
    runs: Vec<(&'static str, Output)>,
    back: Option<Back>,
}

/// Files, modes and labels read back from the outputs.
struct Back {
    debian: Files,
    ubuntu: Files,
    rocky: Files,
    btrfs: Files,
    rocky_state: Files,
    in_place: Files,
    debian_again: Files,
    debian_mode: (i64, i64, i64),
    ubuntu_drop_in_mode: (i64, i64, i64),
    rocky_label: Option<String>,
}

type Files = std::collections::BTreeMap<String, Option<Vec<u8>>>;

impl Layouts {
    fn t(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The output of the named run, which must have succeeded.
    fn run(&self, name: &str) -> &Output {
        let (_, out) = self.runs.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no run {name}"));
        assert!(
            out.status.success(),
            "{name}: {:?}\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    fn report(&self, name: &str) -> Value {
        serde_json::from_slice(&self.run(name).stdout).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn back(&self) -> &Back {
        self.back.as_ref().unwrap_or_else(|| {
            let failed: Vec<_> = self.runs.iter().filter(|(_, o)| !o.status.success()).map(|(n, _)| *n).collect();
            panic!("nothing to read back: runs failed: {failed:?}")
        })
    }

    /// The five edited cloud-init files, as PyYAML reads them: Debian, Ubuntu's drop-in, Rocky,
    /// btrfs and in place.
    fn docs(&self) -> Vec<Value> {
        let b = self.back();
        pyyaml(&[
            file_text(&b.debian, CFG),
            file_text(&b.ubuntu, DROP_IN),
            file_text(&b.rocky, CFG),
            file_text(&b.btrfs, CFG),
            file_text(&b.in_place, CFG),
        ])
    }

    fn random_password(&self) -> String {
        std::fs::read_to_string(self.t("rocky.pw")).unwrap().trim_end_matches('\n').to_string()
    }
}

fn layouts() -> &'static Layouts {
    static LAYOUTS_RUN: std::sync::OnceLock<Layouts> = std::sync::OnceLock::new();
    LAYOUTS_RUN.get_or_init(customize_every_layout)
}

fn customize_every_layout() -> Layouts {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\nsecond line is ignored\n")).unwrap();
    let sums_before: Vec<String> = LAYOUTS.iter().map(|n| sha256(&fx.image(n))).collect();
    std::fs::copy(fx.image("debian-ext4"), t("in-place.qcow2")).unwrap();
    std::fs::set_permissions(t("in-place.qcow2"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let cases = layout_cases(tmp.path());
    let mut runs: Vec<(&'static str, Output)> = cases.iter().map(|c| c.name).zip(run_all(&cases)).collect();
    // A second identical run over the first output, which must change nothing.
    let (first, pw) = (t("debian.qcow2"), t("pw"));
    let again = Case {
        name: "idempotent re-run",
        args: args(&["customize", p(&first), "-o", p(&t("debian-again.qcow2")), "--password-file", p(&pw), "--json"]),
        stdin: None,
        env: vec![],
    };
    runs.extend([again.name].into_iter().zip(run_all(std::slice::from_ref(&again))));
    let back = runs.iter().all(|(_, o)| o.status.success()).then(|| read_back(tmp.path()));
    Layouts { tmp, sums_before, runs, back }
}

/// The runs over the layouts, side by side: their inputs and outputs in `dir`, which holds the
/// password file and the copy to edit in place.
fn layout_cases(dir: &Path) -> Vec<Case> {
    let fx = fixtures();
    let t = |name: &str| dir.join(name);
    let (debian, pw) = (fx.image("debian-ext4"), t("pw"));
    let customize = |input: &Path, output: &str, more: &[&str]| {
        [args(&["customize", p(input), "-o", p(&t(output))]), args(more)].concat()
    };
    vec![
        Case {
            name: "debian, default, traced",
            args: customize(&debian, "debian.qcow2", &["--password-file", p(&pw), "-vv"]),
            stdin: None,
            env: vec![("LIBGUESTFS_TRACE", "1"), ("LIBGUESTFS_DEBUG", "1")],
        },
        Case {
            name: "ubuntu gpt, drop-in, stdin, json",
            args: customize(
                &fx.image("ubuntu-gpt-efi-boot"),
                "ubuntu.qcow2",
                &["--drop-in", "--password-stdin", "--json"],
            ),
            stdin: Some("Correct horse: battery 'staple' #1\n"),
            env: vec![],
        },
        Case {
            name: "rocky lvm xfs, random password, raw output",
            args: customize(
                &fx.image("rocky-lvm-xfs"),
                "rocky.raw",
                &["--output-format", "raw", "--random-password", "--random-password-file", p(&t("rocky.pw")), "--json"],
            ),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "btrfs subvolume, other user, plaintext, compressed",
            args: customize(
                &fx.image("ubuntu-btrfs-subvol"),
                "btrfs.qcow2",
                &[
                    "--user",
                    "ops",
                    "--plaintext",
                    "--compress",
                    "--visible-password",
                    "plain pw",
                    "--clean-instance-state",
                    "--json",
                ],
            ),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "in place, expire, unchanged ssh_pwauth",
            args: args(&[
                "customize",
                p(&t("in-place.qcow2")),
                "--in-place",
                "--password-file",
                p(&pw),
                "--expire",
                "--ssh-pwauth",
                "unchanged",
            ]),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "dry run",
            args: args(&["customize", p(&debian), "--dry-run", "--password-file", p(&pw)]),
            stdin: None,
            env: vec![],
        },
    ]
}

fn read_back(dir: &Path) -> Back {
    let images: Vec<PathBuf> =
        ["debian.qcow2", "ubuntu.qcow2", "rocky.raw", "btrfs.qcow2", "in-place.qcow2", "debian-again.qcow2"]
            .iter()
            .map(|n| dir.join(n))
            .collect();
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let rb = ReadBack::open(&refs);
    Back {
        debian: rb.read("/dev/sda1", "", &[CFG, DROP_IN]),
        ubuntu: rb.read("/dev/sdb3", "", &[CFG, DROP_IN, SSHD_60]),
        rocky: rb.read("/dev/rl/root", "", &[CFG]),
        btrfs: rb.read("/dev/sdd1", "subvol=@", &[&[CFG][..], &STATE].concat()),
        rocky_state: rb.read("/dev/rl/root", "", &STATE),
        in_place: rb.read("/dev/sde1", "", &[CFG]),
        debian_again: rb.read("/dev/sdf1", "", &[CFG]),
        debian_mode: rb.owner_mode("/dev/sda1", "", CFG),
        ubuntu_drop_in_mode: rb.owner_mode("/dev/sdb3", "", DROP_IN),
        rocky_label: rb.selinux_label("/dev/rl/root", CFG),
    }
}

#[test]
fn inputs_are_untouched_and_outputs_are_standalone_with_nothing_left_beside_them() {
    let l = layouts();
    let fx = fixtures();
    for (name, before) in LAYOUTS.iter().zip(&l.sums_before) {
        assert_eq!(&sha256(&fx.image(name)), before, "{name} was modified");
    }
    for (out, format) in [
        ("debian.qcow2", "qcow2"),
        ("ubuntu.qcow2", "qcow2"),
        ("rocky.raw", "raw"),
        ("btrfs.qcow2", "qcow2"),
        ("in-place.qcow2", "qcow2"),
    ] {
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format])
            .arg(l.t(out))
            .output()
            .unwrap();
        assert!(info.status.success(), "qemu-img info {out}: {}", text(&info.stderr));
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], json!(format), "{out}");
        assert!(info.get("backing-filename").is_none(), "{out} has a backing file");
        if format == "qcow2" {
            assert_eq!(info["format-specific"]["data"]["compat"], json!("1.1"), "{out}");
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(l.tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("cloudimg-partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn in_place_keeps_the_files_mode() {
    let l = layouts();
    l.run("in place, expire, unchanged ssh_pwauth");
    assert_eq!(std::fs::metadata(l.t("in-place.qcow2")).unwrap().permissions().mode() & 0o777, 0o640);
}

#[test]
fn debians_cloud_cfg_keeps_its_text_and_mode_and_the_readable_hash_is_said() {
    let l = layouts();
    let b = l.back();
    assert!(file_text(&b.debian, CFG).starts_with(common::DEBIAN_CFG), "Debian's original text must be kept");
    assert!(b.debian[DROP_IN].is_none());
    assert_eq!(b.debian_mode, (0o640, 0, 4));
    // cloud.cfg keeps its mode, so the hash is readable by its group (adm): said, with the way out.
    let warnings = text(&l.run("debian, default, traced").stderr);
    assert!(
        warnings.contains("/etc/cloud/cloud.cfg holds a password and is readable by its group on an instance")
            && warnings.contains("--drop-in writes it to /etc/cloud/cloud.cfg.d/99-cloudimg.cfg with mode 0600"),
        "{warnings}"
    );
}

#[test]
fn the_drop_in_is_roots_alone_and_leaves_ubuntus_files_as_they_were() {
    let b = layouts().back();
    // Not 0644 like the cloud.cfg it takes its label from.
    assert_eq!(b.ubuntu_drop_in_mode, (0o600, 0, 0));
    assert_eq!(file_text(&b.ubuntu, CFG), common::UBUNTU_CFG);
    assert_eq!(b.ubuntu[SSHD_60].as_deref(), Some(common::UBUNTU_60_CLOUDIMG.as_bytes()));
}

#[test]
fn every_hash_written_verifies_with_the_system_crypt_and_expire_is_as_asked() {
    let l = layouts();
    let docs = l.docs();
    let random = l.random_password();
    assert_eq!(std::fs::metadata(l.t("rocky.pw")).unwrap().permissions().mode() & 0o777, 0o600);
    for (doc, user, password, expire) in [
        (&docs[0], "debian", PASSWORD, false),
        (&docs[1], "ubuntu", PASSWORD, false),
        (&docs[2], "rocky", random.as_str(), false),
        (&docs[4], "debian", PASSWORD, true),
    ] {
        let entry = &doc["chpasswd"]["users"][0];
        assert_eq!((&entry["name"], &entry["type"]), (&json!(user), &json!("hash")), "{doc}");
        let hash = entry["password"].as_str().unwrap();
        assert!(hash.starts_with("$6$"), "{hash}");
        assert!(system_crypt_verifies(password, hash), "{user}: the hash does not verify");
        assert_eq!(doc["chpasswd"]["expire"], json!(expire));
    }
}

#[test]
fn ssh_pwauth_is_set_replaced_or_left_alone_as_asked() {
    let docs = layouts().docs();
    assert_eq!(docs[0]["ssh_pwauth"], json!(true));
    assert_eq!(docs[2]["ssh_pwauth"], json!(true), "Rocky's `ssh_pwauth: false` is replaced");
    assert!(docs[4].get("ssh_pwauth").is_none(), "--ssh-pwauth unchanged adds nothing to Debian's file");
}

#[test]
fn plaintext_for_another_user_is_written_as_text() {
    let docs = layouts().docs();
    assert_eq!(docs[3]["chpasswd"]["users"][0], json!({"name": "ops", "password": "plain pw", "type": "text"}));
}

#[test]
fn no_password_or_hash_is_printed_even_with_libguestfs_trace_and_debug() {
    let l = layouts();
    let docs = l.docs();
    let hashes: Vec<String> =
        [0, 1, 2, 4].iter().map(|i| docs[*i]["chpasswd"]["users"][0]["password"].as_str().unwrap().into()).collect();
    let random = l.random_password();
    for (name, out) in &l.runs {
        let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for secret in hashes.iter().map(String::as_str).chain([PASSWORD, random.as_str(), "plain pw"]) {
            assert!(!printed.contains(secret), "{name}: printed a password or hash");
        }
    }
}

#[test]
fn the_selinux_label_of_the_replaced_file_is_kept() {
    assert_eq!(layouts().back().rocky_label.as_deref(), Some(common::SELINUX_LABEL));
}

#[test]
fn instance_state_is_reported_and_kept_unless_cleaning_is_asked() {
    let l = layouts();
    let b = l.back();
    let rocky = l.report("rocky lvm xfs, random password, raw output");
    let findings = rocky["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["message"].as_str().unwrap().contains("booted before")
            && f["fix"].as_str().unwrap().contains("--clean-instance-state")),
        "{rocky:#}"
    );
    assert!(b.rocky_state.values().all(Option::is_some), "instance state must stay unless asked");
    let btrfs = l.report("btrfs subvolume, other user, plaintext, compressed");
    assert_eq!(btrfs["instance_state_cleaned"], json!(true));
    for gone in &STATE[..3] {
        assert!(b.btrfs[*gone].is_none(), "{gone} survived --clean-instance-state");
    }
    assert!(b.btrfs[STATE[3]].is_some(), "the seed must be kept");
}

#[test]
fn reports_name_the_form_file_root_and_what_sshd_will_do() {
    let l = layouts();
    let ubuntu = l.report("ubuntu gpt, drop-in, stdin, json");
    assert_eq!(ubuntu["form"], json!("chpasswd_users"));
    assert_eq!(ubuntu["file"], json!(DROP_IN));
    assert_eq!(ubuntu["effective"]["sshd"]["password_authentication"], json!(true));
    assert_eq!(ubuntu["root"]["device"], json!("/dev/sda3"));
    // libguestfs leaves the kernel's disk name untranslated inside `btrfsvol:` names, and the kernel
    // sometimes probes the appliance's own disk first: the letter is not stable, the rest is.
    let btrfs = l.report("btrfs subvolume, other user, plaintext, compressed");
    let btrfs_root = btrfs["root"]["device"].as_str().unwrap();
    assert!(btrfs_root.starts_with("btrfsvol:/dev/sd") && btrfs_root.ends_with("1/@"), "{btrfs_root}");
}

#[test]
fn glance_properties_and_the_manifest_come_from_the_image_and_its_bytes() {
    let l = layouts();
    let (ubuntu, rocky) =
        (l.report("ubuntu gpt, drop-in, stdin, json"), l.report("rocky lvm xfs, random password, raw output"));
    // A GPT disk with an EFI system partition and no BIOS boot partition boots only with UEFI.
    assert_eq!(ubuntu["properties"]["hw_firmware_type"], json!("uefi"));
    assert_eq!(ubuntu["properties"]["os_distro"], json!("ubuntu"));
    assert_eq!(rocky["properties"]["os_distro"], json!("rocky"));
    assert_eq!(rocky["properties"]["os_version"], json!("9.4"));
    assert_eq!(rocky["properties"].get("hw_firmware_type"), None);
    let sha512 = std::process::Command::new("sha512sum").arg(l.t("ubuntu.qcow2")).output().unwrap();
    assert!(sha512.status.success());
    assert_eq!(ubuntu["manifest"]["os_hash_value"].as_str(), text(&sha512.stdout).split_whitespace().next());
    assert_eq!(rocky["manifest"]["disk_format"], json!("raw"));
    assert!(ubuntu["openstack_command"].as_str().unwrap().contains("--property hw_firmware_type=uefi"));
}

#[test]
fn the_dry_run_shows_the_diff_with_the_secret_masked() {
    let dry = text(&layouts().run("dry run").stdout);
    assert!(dry.contains("+++ b/etc/cloud/cloud.cfg") && dry.contains("password: '********'"), "{dry}");
}

#[test]
fn a_second_identical_run_changes_nothing() {
    let l = layouts();
    assert_eq!(l.report("idempotent re-run")["changed"], json!(false));
    let b = l.back();
    assert_eq!(file_text(&b.debian_again, CFG), file_text(&b.debian, CFG), "a second identical run changed the file");
}

fn expect_failure(args: &[&str], code: i32, message: &str) -> String {
    let out = cloudimg(args, None, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}\nstderr: {stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in\n{stderr}");
    stderr
}

#[test]
fn broken_guests_fail_with_clear_errors_and_write_nothing() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let out = tmp.path().join("out.qcow2");
    let (no_os, two) = (fx.image("no-os"), fx.image("two-roots"));
    let base = |image: &Path| {
        vec![
            "customize".to_string(),
            p(image).into(),
            "-o".into(),
            p(&out).into(),
            "--password-file".into(),
            p(&pw).into(),
        ]
    };
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (base(&no_os), 4, "no operating system found"),
        (base(&two), 4, "several operating systems: /dev/sda1 (ext4, Debian GNU/Linux 12 (bookworm)), /dev/sda2"),
        (
            [base(&two), vec!["--root".into(), "/dev/sda1".into()]].concat(),
            4,
            "reading /etc/cloud/cloud.cfg in the guest: invalid YAML at line 2",
        ),
        ([base(&two), vec!["--root".into(), "/dev/sda2".into()]].concat(), 4, "has no /etc/cloud/cloud.cfg"),
        (
            [base(&fx.image("debian-ext4")), vec!["--timeout".into(), "1".into()]].concat(),
            6,
            "did not finish within 1 s",
        ),
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(args, code, message)| {
            std::thread::spawn(move || {
                expect_failure(&args.iter().map(String::as_str).collect::<Vec<_>>(), code, message)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "only the password file remains");
}

#[test]
fn settings_that_would_not_work_are_refused() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let out = tmp.path().join("out.qcow2");
    let ubuntu = fx.image("ubuntu-gpt-efi-boot");
    let debian = fx.image("debian-ext4");
    // cloud-init 22.2 writes ssh_pwauth into sshd_config itself, after Ubuntu's drop-in has said no.
    let stderr = expect_failure(
        &["customize", p(&ubuntu), "-o", p(&out), "--password-file", p(&pw), "--cloud-init-version", "22.2"],
        5,
        "sshd would still refuse passwords: /etc/ssh/sshd_config.d/60-cloudimg-settings.conf:1 sets PasswordAuthentication no",
    );
    assert!(stderr.contains("nothing was written"));
    expect_failure(
        &["customize", p(&debian), "--dry-run", "--password-file", p(&pw), "--cloud-init-version", "0.7.5"],
        4,
        "cannot take a password hash",
    );
    let plain = cloudimg(
        &[
            "customize",
            p(&debian),
            "--dry-run",
            "--password-file",
            p(&pw),
            "--cloud-init-version",
            "0.7.5",
            "--plaintext",
        ],
        None,
        &[],
    );
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let diff = text(&plain.stdout);
    assert!(
        diff.contains("+password: '********'")
            && diff.contains("+  expire: false")
            && diff.contains("+ssh_pwauth: true"),
        "{diff}"
    );
    assert!(!out.exists());
}

/// A loop device attached read-only to a file; detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    /// `None` where loop devices cannot be made (not root, no loop module).
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = std::process::Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(file).output();
        let out = out.ok().filter(|o| o.status.success())?;
        Some(LoopDevice(text(&out.stdout).trim().to_string()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["--detach", &self.0]).status();
    }
}

#[test]
fn a_block_device_is_an_input_like_a_file() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    let raw = t("disk.raw");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", p(&fx.image("debian-ext4")), p(&raw)])
        .status()
        .unwrap();
    assert!(converted.success());
    let Some(device) = LoopDevice::attach(&raw) else {
        eprintln!("skipped: no loop device can be attached here (needs root and losetup)");
        return;
    };
    let sum = sha256(&raw);

    let audit = cloudimg(&["inspect", &device.0, "--json"], None, &[]);
    assert!(audit.status.success(), "{}", text(&audit.stderr));
    let report: Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(report[0]["file"]["virtual_size"], std::fs::metadata(&raw).unwrap().len(), "{report}");

    let out = cloudimg(&["customize", &device.0, "-o", p(&t("out.qcow2")), "--password-file", p(&t("pw"))], None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let files = ReadBack::open(&[&t("out.qcow2")]).read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]);
    let cfg = &pyyaml(&[file_text(&files, "/etc/cloud/cloud.cfg")])[0];
    let hash = cfg["chpasswd"]["users"][0]["password"].as_str().unwrap_or_else(|| panic!("{cfg}"));
    assert!(system_crypt_verifies(PASSWORD, hash), "{hash}");
    assert_eq!(sha256(&raw), sum, "the device was only read");

    let refused = cloudimg(&["customize", &device.0, "--in-place", "--password-file", p(&t("pw"))], None, &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--in-place cannot rewrite the block device"), "{}", text(&refused.stderr));
}
