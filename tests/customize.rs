//! `cloudimg customize` on phony guests of every supported layout, read back through a separate
//! read-only libguestfs handle and judged by PyYAML and the system's crypt(3).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{cloudimg, fixtures, pyyaml, sha256, system_crypt_verifies, text, ReadBack};
use serde_json::{json, Value};

const PASSWORD: &str = "Correct horse: battery 'staple' #1";

struct Case {
    name: &'static str,
    args: Vec<String>,
    stdin: Option<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

fn run_all(cases: &[Case]) -> Vec<std::process::Output> {
    // Two at a time: each appliance is one busy vCPU under TCG.
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
    for (case, out) in cases.iter().zip(&outputs) {
        assert!(
            out.status.success(),
            "{}: {:?}\nstdout: {}\nstderr: {}",
            case.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    outputs
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn cloud_cfg_of(files: &std::collections::BTreeMap<String, Option<Vec<u8>>>, path: &str) -> String {
    text(files[path].as_ref().unwrap_or_else(|| panic!("{path} missing")))
}

#[test]
fn customized_images_of_every_layout_read_back_correctly() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\nsecond line is ignored\n")).unwrap();
    let inputs = ["debian-ext4", "ubuntu-gpt-efi-boot", "rocky-lvm-xfs", "ubuntu-btrfs-subvol"];
    let sums_before: Vec<String> = inputs.iter().map(|n| sha256(&fx.image(n))).collect();
    let in_place = t("in-place.qcow2");
    std::fs::copy(fx.image("debian-ext4"), &in_place).unwrap();
    std::fs::set_permissions(&in_place, std::fs::Permissions::from_mode(0o640)).unwrap();

    let cases = vec![
        Case {
            name: "debian, default, traced",
            args: args(&[
                "customize",
                p(&fx.image("debian-ext4")),
                "-o",
                p(&t("debian.qcow2")),
                "--password-file",
                p(&t("pw")),
                "-vv",
            ]),
            stdin: None,
            env: vec![("LIBGUESTFS_TRACE", "1"), ("LIBGUESTFS_DEBUG", "1")],
        },
        Case {
            name: "ubuntu gpt, drop-in, stdin, json",
            args: args(&[
                "customize",
                p(&fx.image("ubuntu-gpt-efi-boot")),
                "-o",
                p(&t("ubuntu.qcow2")),
                "--drop-in",
                "--password-stdin",
                "--json",
            ]),
            stdin: Some("Correct horse: battery 'staple' #1\n"),
            env: vec![],
        },
        Case {
            name: "rocky lvm xfs, random password, raw output",
            args: args(&[
                "customize",
                p(&fx.image("rocky-lvm-xfs")),
                "-o",
                p(&t("rocky.raw")),
                "--output-format",
                "raw",
                "--random-password",
                "--random-password-file",
                p(&t("rocky.pw")),
                "--json",
            ]),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "btrfs subvolume, other user, plaintext, compressed",
            args: args(&[
                "customize",
                p(&fx.image("ubuntu-btrfs-subvol")),
                "-o",
                p(&t("btrfs.qcow2")),
                "--user",
                "ops",
                "--plaintext",
                "--compress",
                "--visible-password",
                "plain pw",
                "--clean-instance-state",
                "--json",
            ]),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "in place, expire, unchanged ssh_pwauth",
            args: args(&[
                "customize",
                p(&in_place),
                "--in-place",
                "--password-file",
                p(&t("pw")),
                "--expire",
                "--ssh-pwauth",
                "unchanged",
            ]),
            stdin: None,
            env: vec![],
        },
        Case {
            name: "dry run",
            args: args(&["customize", p(&fx.image("debian-ext4")), "--dry-run", "--password-file", p(&t("pw"))]),
            stdin: None,
            env: vec![],
        },
    ];
    let outputs = run_all(&cases);
    // A second identical run over the first output must change nothing.
    let again = run_all(&[Case {
        name: "idempotent re-run",
        args: args(&[
            "customize",
            p(&t("debian.qcow2")),
            "-o",
            p(&t("debian-again.qcow2")),
            "--password-file",
            p(&t("pw")),
            "--json",
        ]),
        stdin: None,
        env: vec![],
    }]);

    // Inputs untouched; outputs standalone.
    for (name, before) in inputs.iter().zip(&sums_before) {
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
            .arg(t(out))
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], json!(format), "{out}");
        assert!(info.get("backing-filename").is_none(), "{out} has a backing file");
        if format == "qcow2" {
            assert_eq!(info["format-specific"]["data"]["compat"], json!("1.1"), "{out}");
        }
    }
    assert_eq!(std::fs::metadata(&in_place).unwrap().permissions().mode() & 0o777, 0o640, "in-place keeps the mode");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("cloudimg-partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Read everything back through one separate read-only appliance.
    let images = [
        t("debian.qcow2"),
        t("ubuntu.qcow2"),
        t("rocky.raw"),
        t("btrfs.qcow2"),
        in_place.clone(),
        t("debian-again.qcow2"),
    ];
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let rb = ReadBack::open(&refs);
    let cfg = "/etc/cloud/cloud.cfg";
    let drop_in = "/etc/cloud/cloud.cfg.d/99-cloudimg.cfg";
    let debian = rb.read("/dev/sda1", "", &[cfg, drop_in]);
    let ubuntu = rb.read("/dev/sdb3", "", &[cfg, drop_in, "/etc/ssh/sshd_config.d/60-cloudimg-settings.conf"]);
    let rocky = rb.read("/dev/rl/root", "", &[cfg]);
    let state = [
        "/var/lib/cloud/instance",
        "/var/lib/cloud/instances/i-0123/sem/config_set_passwords",
        "/var/lib/cloud/data/instance-id",
        "/var/lib/cloud/seed/nocloud/meta-data",
    ];
    let btrfs = rb.read("/dev/sdd1", "subvol=@", &[&[cfg][..], &state].concat());
    let rocky_state = rb.read("/dev/rl/root", "", &state);
    let rocky_label = rb.selinux_label("/dev/rl/root", cfg);
    let inplace = rb.read("/dev/sde1", "", &[cfg]);
    let debian_again = rb.read("/dev/sdf1", "", &[cfg]);
    let debian_mode = rb.owner_mode("/dev/sda1", "", cfg);
    let ubuntu_drop_in_mode = rb.owner_mode("/dev/sdb3", "", drop_in);

    // Debian: cloud.cfg edited, original bytes kept as a prefix, mode/owner kept.
    let debian_cfg = cloud_cfg_of(&debian, cfg);
    assert!(debian_cfg.starts_with(common::DEBIAN_CFG), "Debian's original text must be kept");
    assert!(debian[drop_in].is_none());
    assert_eq!(debian_mode, (0o640, 0, 4));
    // cloud.cfg keeps its mode, so the hash is readable by its group (adm): said, with the way out.
    let debian_warnings = text(&outputs[0].stderr);
    assert!(
        debian_warnings.contains("/etc/cloud/cloud.cfg holds a password and is readable by its group on an instance")
            && debian_warnings.contains("--drop-in writes it to /etc/cloud/cloud.cfg.d/99-cloudimg.cfg with mode 0600"),
        "{debian_warnings}"
    );
    // Ubuntu: cloud.cfg untouched, the drop-in carries the settings and is root's alone (not 0644
    // like the cloud.cfg it takes its label from).
    assert_eq!(ubuntu_drop_in_mode, (0o600, 0, 0));
    assert_eq!(cloud_cfg_of(&ubuntu, cfg), common::UBUNTU_CFG);
    assert_eq!(
        ubuntu["/etc/ssh/sshd_config.d/60-cloudimg-settings.conf"].as_deref(),
        Some(common::UBUNTU_60_CLOUDIMG.as_bytes())
    );
    let ubuntu_drop_in = cloud_cfg_of(&ubuntu, drop_in);
    let rocky_cfg = cloud_cfg_of(&rocky, cfg);
    let btrfs_cfg = cloud_cfg_of(&btrfs, cfg);
    let inplace_cfg = cloud_cfg_of(&inplace, cfg);
    assert_eq!(cloud_cfg_of(&debian_again, cfg), debian_cfg, "a second identical run changed the file");

    let docs = pyyaml(&[debian_cfg.clone(), ubuntu_drop_in, rocky_cfg, btrfs_cfg, inplace_cfg]);
    let random_pw = std::fs::read_to_string(t("rocky.pw")).unwrap();
    let random_pw = random_pw.trim_end_matches('\n');
    assert_eq!(std::fs::metadata(t("rocky.pw")).unwrap().permissions().mode() & 0o777, 0o600);
    for (doc, user, password, expire) in [
        (&docs[0], "debian", PASSWORD, false),
        (&docs[1], "ubuntu", PASSWORD, false),
        (&docs[2], "rocky", random_pw, false),
        (&docs[4], "debian", PASSWORD, true),
    ] {
        let entry = &doc["chpasswd"]["users"][0];
        assert_eq!(entry["name"], json!(user));
        assert_eq!(entry["type"], json!("hash"));
        let hash = entry["password"].as_str().unwrap();
        assert!(hash.starts_with("$6$"), "{hash}");
        assert!(system_crypt_verifies(password, hash), "{user}: the hash does not verify");
        assert_eq!(doc["chpasswd"]["expire"], json!(expire));
        for out in &outputs {
            assert!(!text(&out.stdout).contains(hash) && !text(&out.stderr).contains(hash), "a hash was printed");
        }
    }
    assert_eq!(docs[0]["ssh_pwauth"], json!(true));
    assert_eq!(docs[2]["ssh_pwauth"], json!(true), "Rocky's `ssh_pwauth: false` is replaced");
    assert!(docs[4].get("ssh_pwauth").is_none(), "--ssh-pwauth unchanged adds nothing to Debian's file");
    assert_eq!(docs[3]["chpasswd"]["users"][0], json!({"name": "ops", "password": "plain pw", "type": "text"}));

    // The password itself never appears in any output (even with libguestfs trace and debug asked for).
    for (case, out) in cases.iter().zip(&outputs) {
        for secret in [PASSWORD, random_pw, "plain pw"] {
            assert!(
                !text(&out.stdout).contains(secret) && !text(&out.stderr).contains(secret),
                "{}: printed a password",
                case.name
            );
        }
    }
    // SELinux label kept on the replaced file.
    assert_eq!(rocky_label.as_deref(), Some(common::SELINUX_LABEL));
    // Instance state: Rocky's is reported and kept; the btrfs image's is cleaned, all but the seed.
    let rocky_report: Value = serde_json::from_slice(&outputs[2].stdout).unwrap();
    assert!(rocky_report["findings"].as_array().unwrap().iter().any(|f| f["message"]
        .as_str()
        .unwrap()
        .contains("booted before")
        && f["fix"].as_str().unwrap().contains("--clean-instance-state")));
    assert!(rocky_state.values().all(Option::is_some), "instance state must stay unless asked");
    let btrfs_report: Value = serde_json::from_slice(&outputs[3].stdout).unwrap();
    assert_eq!(btrfs_report["instance_state_cleaned"], json!(true));
    // libguestfs leaves the kernel's disk name untranslated inside `btrfsvol:` names, and the kernel
    // sometimes probes the appliance's own disk first: the letter is not stable, the rest is.
    let btrfs_root = btrfs_report["root"]["device"].as_str().unwrap();
    assert!(btrfs_root.starts_with("btrfsvol:/dev/sd") && btrfs_root.ends_with("1/@"), "{btrfs_root}");
    for gone in &state[..3] {
        assert!(btrfs[*gone].is_none(), "{gone} survived --clean-instance-state");
    }
    assert!(btrfs[state[3]].is_some(), "the seed must be kept");
    let ubuntu_report: Value = serde_json::from_slice(&outputs[1].stdout).unwrap();
    assert_eq!(ubuntu_report["form"], json!("chpasswd_users"));
    assert_eq!(ubuntu_report["file"], json!(drop_in));
    assert_eq!(ubuntu_report["effective"]["sshd"]["password_authentication"], json!(true));
    assert_eq!(ubuntu_report["root"]["device"], json!("/dev/sda3"));
    // Glance properties read from the images: a GPT disk with an EFI system partition and no BIOS boot
    // partition boots only with UEFI; the JSON report carries the manifest, hashes of the output included.
    assert_eq!(ubuntu_report["properties"]["hw_firmware_type"], json!("uefi"));
    assert_eq!(ubuntu_report["properties"]["os_distro"], json!("ubuntu"));
    assert_eq!(rocky_report["properties"]["os_distro"], json!("rocky"));
    assert_eq!(rocky_report["properties"]["os_version"], json!("9.4"));
    assert_eq!(rocky_report["properties"].get("hw_firmware_type"), None);
    let sha512 = std::process::Command::new("sha512sum").arg(t("ubuntu.qcow2")).output().unwrap();
    assert_eq!(ubuntu_report["manifest"]["os_hash_value"].as_str(), text(&sha512.stdout).split_whitespace().next());
    assert_eq!(rocky_report["manifest"]["disk_format"], json!("raw"));
    assert!(ubuntu_report["openstack_command"].as_str().unwrap().contains("--property hw_firmware_type=uefi"));
    let dry = text(&outputs[5].stdout);
    assert!(dry.contains("+++ b/etc/cloud/cloud.cfg") && dry.contains("password: '********'"), "{dry}");
    let again: Value = serde_json::from_slice(&again[0].stdout).unwrap();
    assert_eq!(again["changed"], json!(false));
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
    let cfg = &pyyaml(&[cloud_cfg_of(&files, "/etc/cloud/cloud.cfg")])[0];
    let hash = cfg["chpasswd"]["users"][0]["password"].as_str().unwrap_or_else(|| panic!("{cfg}"));
    assert!(system_crypt_verifies(PASSWORD, hash), "{hash}");
    assert_eq!(sha256(&raw), sum, "the device was only read");

    let refused = cloudimg(&["customize", &device.0, "--in-place", "--password-file", p(&t("pw"))], None, &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("--in-place cannot rewrite the block device"), "{}", text(&refused.stderr));
}
