//! `cloudimg inspect`, `--ssh-key`, `--user root`, `--lock` and `--method shadow|auto` on the phony
//! guests, judged by reading the written images back, PyYAML and the system's crypt(3).

mod common;

use std::path::Path;

use common::{cloudimg, file_text, fixtures, p, pyyaml, sha256, system_crypt_verifies, text, ReadBack};
use serde_json::Value;

const PASSWORD: &str = "Tr0ub4dor &3: 'x'";
const KEY1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINcBP2Hlv715+49uDDvU+ZdmzRat/4M9S78A5XhQM7FV alice@laptop";
const KEY2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMbfnvdnQIN2a637fGdm4Bqj5r2dtoJsjAWxYyxmm6t1 bob";

fn run(args: &[&str]) -> std::process::Output {
    cloudimg(args, None, &[])
}

fn ok(out: std::process::Output, what: &str) -> std::process::Output {
    assert!(out.status.success(), "{what}: {:?}\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[test]
fn inspect_then_customize_with_keys_then_lock_restores_the_original_bytes() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(t("k1.pub"), format!("{KEY1}\n")).unwrap();
    std::fs::write(t("pw2"), "a second password\n").unwrap();
    std::fs::write(t("k2.pub"), format!("# team keys\n{KEY1}\n{KEY2}\n")).unwrap();
    let (debian, rocky) = (fx.image("debian-ext4"), fx.image("rocky-lvm-xfs"));
    let sums = (sha256(&debian), sha256(&rocky));
    let overlay = t("overlay.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&debian)
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(made.success());

    let audit = run(&["inspect", p(&debian), p(&rocky), p(&overlay), "--json"]);
    assert_eq!(audit.status.code(), Some(3), "a refused file: {}", text(&audit.stderr));
    let reports = json(&audit);
    let d = &reports[0];
    assert_eq!(d["system"]["os_id"], "debian");
    assert_eq!(d["file"]["compat"], "1.1");
    assert_eq!(d["analysis"]["cloud_init"]["version"]["version"], "22.4.2");
    assert_eq!(d["analysis"]["cloud_init"]["version"]["source"], "version-py");
    assert_eq!(d["analysis"]["cloud_init"]["default_user"], "debian");
    assert_eq!(d["analysis"]["cloud_init"]["passwords"], serde_json::json!([]));
    assert_eq!(d["analysis"]["booted_before"], false);
    assert_eq!(d["password_login"]["works"], false);
    assert_eq!(d["system"]["partition_table"], "msdos");
    assert_eq!(d["system"]["lvm_root"], false);
    let r = &reports[1];
    assert_eq!(r["system"]["root"]["device"], "/dev/rl/root");
    assert_eq!(r["system"]["lvm_root"], true);
    assert_eq!(r["analysis"]["booted_before"], true);
    assert_eq!(r["analysis"]["cloud_init"]["ssh_pwauth"], false);
    assert_eq!(r["analysis"]["sshd"]["password_authentication"]["password_authentication"], false);
    let shadow_states = r["analysis"]["shadow"].as_array().unwrap();
    assert!(shadow_states.contains(&serde_json::json!(["root", "no-password"])), "{shadow_states:?}");
    let o = &reports[2];
    assert!(o["file"]["refused"].as_str().unwrap().contains("backing file"), "{o}");
    assert_eq!(o["findings"][0]["severity"], "security");
    assert!(o["analysis"].is_null());
    assert_eq!((sha256(&debian), sha256(&rocky)), sums, "inspect must not change an image");

    let keyed = ok(
        run(&[
            "customize",
            p(&debian),
            "-o",
            p(&t("keys.qcow2")),
            "--password-file",
            p(&t("pw")),
            "--ssh-key",
            p(&t("k1.pub")),
            "--ssh-key",
            p(&t("k2.pub")),
        ]),
        "customize with keys",
    );
    // Not a terminal: the progress comes as plain lines, one per quarter. A qcow2 compat 1.1 input
    // with a qcow2 output is copied ahead (then only the edits are written), so the long step is the
    // copy.
    let progress: Vec<String> =
        text(&keyed.stdout).lines().filter(|l| l.contains("copying: ")).map(|l| l.trim().to_string()).collect();
    assert_eq!(progress.last().map(String::as_str), Some("copying: 100%"), "{}", text(&keyed.stdout));
    let lock = ok(run(&["customize", p(&t("keys.qcow2")), "-o", p(&t("locked.qcow2")), "--lock"]), "lock");
    assert!(text(&lock.stdout).contains("restored as it was before cloudimg changed it"), "{}", text(&lock.stdout));
    // An image customized by a cloudimg that kept its journal in a directory of its own.
    std::fs::copy(t("keys.qcow2"), t("old-journal.qcow2")).unwrap();
    common::edit_image(&t("old-journal.qcow2"), "/dev/sda1", |g| {
        g.mkdir("/etc/cloud/cloudimg").unwrap();
        g.mv("/etc/cloud/cloudimg-undo.json", "/etc/cloud/cloudimg/undo.json").unwrap();
    });
    let lock = ok(
        run(&["customize", p(&t("old-journal.qcow2")), "-o", p(&t("locked-old.qcow2")), "--lock"]),
        "lock with the journal in its old place",
    );
    assert!(text(&lock.stdout).contains("restored as it was before cloudimg changed it"), "{}", text(&lock.stdout));
    ok(
        run(&["customize", p(&t("old-journal.qcow2")), "-o", p(&t("rekeyed.qcow2")), "--password-file", p(&t("pw2"))]),
        "a new password with the journal in its old place",
    );

    let gate = run(&[
        "inspect",
        p(&t("keys.qcow2")),
        p(&t("locked.qcow2")),
        "--require",
        "password-login",
        "--require",
        "no-plaintext",
        "--json",
    ]);
    assert_eq!(gate.status.code(), Some(8), "{}", text(&gate.stderr));
    let reports = json(&gate);
    assert_eq!(reports[0]["unmet"], serde_json::json!([]), "{}", reports[0]);
    assert_eq!(reports[0]["password_login"]["works"], true);
    assert_eq!(reports[0]["analysis"]["cloud_init"]["passwords"][0]["kind"], "hash");
    assert_eq!(reports[0]["analysis"]["cloud_init"]["passwords"][0]["file"], "/etc/cloud/cloud.cfg");
    let exposed = reports[0]["findings"].as_array().unwrap().iter().find(|f| {
        f["message"].as_str().unwrap().starts_with("/etc/cloud/cloud.cfg holds a password and is readable by its group")
    });
    assert!(exposed.is_some_and(|f| f["fix"].as_str().unwrap().contains("--drop-in")), "{}", reports[0]["findings"]);
    assert!(
        reports[1]["unmet"][0].as_str().unwrap().starts_with("password-login: nothing sets a password"),
        "{}",
        reports[1]
    );

    let (journal, old_journal, old_dir) =
        ("/etc/cloud/cloudimg-undo.json", "/etc/cloud/cloudimg/undo.json", "/etc/cloud/cloudimg");
    let paths = ["/etc/cloud/cloud.cfg", journal, old_journal, old_dir];
    let back =
        ReadBack::open(&[&debian, &t("keys.qcow2"), &t("locked.qcow2"), &t("locked-old.qcow2"), &t("rekeyed.qcow2")]);
    let original = back.read("/dev/sda1", "", &paths);
    let keyed = back.read("/dev/sdb1", "", &paths);
    let locked = back.read("/dev/sdc1", "", &paths);
    let locked_old = back.read("/dev/sdd1", "", &paths);
    let rekeyed = back.read("/dev/sde1", "", &paths);
    let cfg = &pyyaml(&[file_text(&keyed, "/etc/cloud/cloud.cfg")])[0];
    assert_eq!(cfg["ssh_authorized_keys"], serde_json::json!([KEY1, KEY2]), "each key once");
    for (image, device, how) in
        [(&keyed, "/dev/sdb1", "customize"), (&rekeyed, "/dev/sde1", "customize over the old journal")]
    {
        assert_eq!(back.owner_mode(device, "", journal), (0o600, 0, 0), "the journal after {how}");
        assert_eq!(
            image[old_dir], None,
            "after {how}, the journal lives beside cloud.cfg, not in a directory of its own"
        );
        let recorded: Value = serde_json::from_str(&file_text(image, journal)).unwrap();
        assert_eq!(
            recorded["files"]["/etc/cloud/cloud.cfg"]["original"].as_str(),
            Some(file_text(&original, "/etc/cloud/cloud.cfg").as_str()),
            "the journal after {how} holds the image's first cloud.cfg"
        );
    }
    for (locked, how) in [(&locked, "--lock"), (&locked_old, "--lock with the journal in its old place")] {
        assert_eq!(locked["/etc/cloud/cloud.cfg"], original["/etc/cloud/cloud.cfg"], "byte-identical after {how}");
        assert_eq!(locked[journal], None, "the journal is gone after {how}");
        assert_eq!(locked[old_dir], None, "no old journal or its directory after {how}");
    }
}

#[test]
fn shadow_route_on_a_booted_image_and_on_an_image_without_cloud_init() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    let (rocky, bare) = (fx.image("rocky-lvm-xfs"), fx.image("debian-no-cloud-init"));
    let shadow_job = |input: &Path, output: &str, extra: &[&str]| -> Vec<String> {
        let (out, pw) = (t(output), t("pw"));
        let base =
            ["customize", p(input), "-o", p(&out), "--password-file", p(&pw), "--method", "auto", "--user", "ops"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let jobs = [shadow_job(&rocky, "rocky.qcow2", &[]), shadow_job(&bare, "bare.qcow2", &["--expire"])];
    let outs: Vec<_> = jobs
        .into_iter()
        .map(|args| {
            std::thread::spawn(move || cloudimg(&args.iter().map(String::as_str).collect::<Vec<_>>(), None, &[]))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let rocky_out = text(&ok(outs[0].clone(), "rocky shadow").stdout);
    assert!(rocky_out.contains("Method: /etc/shadow, because the disk was booted before"), "{rocky_out}");
    let bare_out = text(&ok(outs[1].clone(), "bare shadow").stdout);
    assert!(bare_out.contains("Method: /etc/shadow, because the image has no cloud-init"), "{bare_out}");

    let refused = run(&["customize", p(&bare), "--dry-run", "--password-file", p(&t("pw"))]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(text(&refused.stderr).contains("use --method shadow"), "{}", text(&refused.stderr));

    let gate = run(&["inspect", p(&t("bare.qcow2")), "--user", "ops", "--require", "password-login"]);
    assert!(gate.status.success(), "{}\n{}", text(&gate.stdout), text(&gate.stderr));

    let paths = ["/etc/shadow", "/etc/ssh/sshd_config"];
    let back = ReadBack::open(&[&t("rocky.qcow2"), &t("bare.qcow2")]);
    let rocky_files = back.read("/dev/rl/root", "", &paths);
    let bare_files = back.read("/dev/sdb1", "", &paths);
    let today = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    for (files, prefix, lastchg) in [(&rocky_files, "$6$", today), (&bare_files, "$y$", 0)] {
        let shadow = file_text(files, "/etc/shadow");
        let fields: Vec<&str> = shadow.lines().find(|l| l.starts_with("ops:")).unwrap().split(':').collect();
        assert!(fields[1].starts_with(prefix), "{shadow}");
        assert!(system_crypt_verifies(PASSWORD, fields[1]), "the system's crypt accepts {}", fields[1]);
        assert_eq!(fields[2], lastchg.to_string(), "last change: today, or 0 with --expire");
        assert_eq!(fields[7], "", "the past expiry date is cleared");
        let others: Vec<&str> = shadow.lines().filter(|l| !l.starts_with("ops:")).collect();
        assert_eq!(others, common::SHADOW.lines().filter(|l| !l.starts_with("ops:")).collect::<Vec<_>>());
    }
    assert_eq!(back.owner_mode("/dev/rl/root", "", "/etc/shadow"), (0o640, 0, 42));
    assert_eq!(back.selinux_label("/dev/rl/root", "/etc/shadow").as_deref(), Some(common::SHADOW_LABEL));
    assert_eq!(
        file_text(&bare_files, "/etc/ssh/sshd_config"),
        format!("PasswordAuthentication yes\n{}", common::SSHD_WITH_INCLUDE)
    );
    assert_eq!(
        file_text(&rocky_files, "/etc/ssh/sshd_config"),
        format!("{}PasswordAuthentication yes\n", common::SSHD_WITH_INCLUDE),
        "the line sshd reads first (no drop-in sets it) is switched"
    );
}

#[test]
fn root_with_keys_warns_and_plaintext_is_a_finding_that_never_shows_the_secret() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(t("k.pub"), format!("{KEY2}\n")).unwrap();
    let out = ok(
        run(&[
            "customize",
            p(&fx.image("ubuntu-gpt-efi-boot")),
            "-o",
            p(&t("root.qcow2")),
            "--user",
            "root",
            "--plaintext",
            "--password-file",
            p(&t("pw")),
            "--ssh-key",
            p(&t("k.pub")),
            "--ssh-pwauth",
            "true",
        ]),
        "root",
    );
    let warnings = text(&out.stderr);
    assert!(warnings.contains("disable_root is true"), "{warnings}");
    assert!(warnings.contains("PermitRootLogin is prohibit-password"), "{warnings}");

    let gate = run(&[
        "inspect",
        p(&t("root.qcow2")),
        "--user",
        "root",
        "--require",
        "no-plaintext",
        "--require",
        "password-login",
        "--json",
    ]);
    assert_eq!(gate.status.code(), Some(8));
    let all = format!("{}{}", text(&gate.stdout), text(&gate.stderr));
    assert!(!all.contains("Tr0ub4dor"), "the secret is never printed");
    let report = &json(&gate)[0];
    let unmet: Vec<&str> = report["unmet"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert!(unmet[0].contains("/etc/cloud/cloud.cfg `chpasswd.users` for root"), "{unmet:?}");
    assert!(unmet[1].contains("PermitRootLogin prohibit-password"), "{unmet:?}");
    let cfg = ReadBack::open(&[&t("root.qcow2")]).read("/dev/sda3", "", &["/etc/cloud/cloud.cfg"]);
    let parsed = &pyyaml(&[file_text(&cfg, "/etc/cloud/cloud.cfg")])[0];
    let users = parsed["users"].as_array().unwrap();
    assert_eq!(users[0], "default");
    assert_eq!(users[1]["name"], "root");
    assert_eq!(users[1]["ssh_authorized_keys"], serde_json::json!([KEY2]));
}
