//! `cloudimg inspect`, `--ssh-key`, `--user root`, `--lock` and `--method shadow|auto` on the phony
//! guests, judged by reading the written images back, PyYAML and the system's crypt(3).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::sync::OnceLock;

use common::{cloudimg, file_text, fixtures, p, pyyaml, sha256, system_crypt_verifies, text, ReadBack};
use serde_json::Value;

const PASSWORD: &str = "Tr0ub4dor &3: 'x'";
const KEY1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINcBP2Hlv715+49uDDvU+ZdmzRat/4M9S78A5XhQM7FV alice@laptop";
const KEY2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMbfnvdnQIN2a637fGdm4Bqj5r2dtoJsjAWxYyxmm6t1 bob";

fn run(args: &[&str]) -> Output {
    cloudimg(args, None, &[])
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what}: {:?}\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

/// Files read back from the images of the keys-then-lock scenario, by path.
type Files = BTreeMap<String, Option<Vec<u8>>>;

const JOURNAL: &str = "/etc/cloud/cloudimg-undo.json";
const OLD_JOURNAL: &str = "/etc/cloud/cloudimg/undo.json";
const OLD_JOURNAL_DIR: &str = "/etc/cloud/cloudimg";

/// One run of the scenario the tests below share: `inspect` of the Debian and Rocky guests and of an
/// overlay backed by the Debian one; `customize` with a password and keys; `--lock` of that output;
/// the same with the journal moved to where an earlier cloudimg kept it, then a new password over that
/// journal; `inspect --require` of the keyed and locked images; then the written images read back.
struct KeysThenLock {
    audit: Output,
    /// sha256 of the Debian and Rocky guests before and after `inspect`.
    sums_before: (String, String),
    sums_after: (String, String),
    keyed: Output,
    lock: Output,
    lock_old: Output,
    gate: Output,
    /// cloud.cfg, the journal, its old place and old directory, in the original Debian guest and in
    /// each output.
    original: Files,
    keyed_files: Files,
    locked: Files,
    locked_old: Files,
    rekeyed: Files,
    /// (mode, uid, gid) of the journal in the keyed and in the re-keyed image.
    journal_owner_mode: [(i64, i64, i64); 2],
}

impl KeysThenLock {
    fn run() -> KeysThenLock {
        let fx = fixtures();
        let tmp = tempfile::tempdir().unwrap();
        let names = ["pw", "k1.pub", "pw2", "k2.pub", "overlay.qcow2", "keys.qcow2", "locked.qcow2"];
        let [pw, k1, pw2, k2, overlay, keys, locked] = names.map(|name| tmp.path().join(name));
        let names = ["old-journal.qcow2", "locked-old.qcow2", "rekeyed.qcow2"];
        let [old_journal, locked_old, rekeyed] = names.map(|name| tmp.path().join(name));
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        std::fs::write(&k1, format!("{KEY1}\n")).unwrap();
        std::fs::write(&pw2, "a second password\n").unwrap();
        std::fs::write(&k2, format!("# team keys\n{KEY1}\n{KEY2}\n")).unwrap();
        let (debian, rocky) = (fx.image("debian-ext4"), fx.image("rocky-lvm-xfs"));
        let sums_before = (sha256(&debian), sha256(&rocky));
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&debian)
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(made.success());
        // The runs that do not wait for one another go side by side: a test waiting for this scenario
        // holds one of the test threads, and these use its core.
        let ((audit, sums_after), keyed, (lock, gate), lock_old) = std::thread::scope(|s| {
            let audit = s.spawn(|| {
                let audit = run(&["inspect", p(&debian), p(&rocky), p(&overlay), "--json"]);
                (audit, (sha256(&debian), sha256(&rocky)))
            });
            let with_keys = ["customize", p(&debian), "-o", p(&keys), "--password-file", p(&pw)];
            let keyed =
                ok(run(&[&with_keys[..], &["--ssh-key", p(&k1), "--ssh-key", p(&k2)]].concat()), "customize with keys");
            let lock_and_gate = s.spawn(|| {
                let lock = ok(run(&["customize", p(&keys), "-o", p(&locked), "--lock"]), "lock");
                let require = ["--require", "password-login", "--require", "no-plaintext", "--json"];
                (lock, run(&[&["inspect", p(&keys), p(&locked)][..], &require].concat()))
            });
            // An image customized by a cloudimg that kept its journal in a directory of its own.
            std::fs::copy(&keys, &old_journal).unwrap();
            common::edit_image(&old_journal, "/dev/sda1", |g| {
                g.mkdir(OLD_JOURNAL_DIR).unwrap();
                g.mv(JOURNAL, OLD_JOURNAL).unwrap();
            });
            let rekey = s.spawn(|| {
                ok(
                    run(&["customize", p(&old_journal), "-o", p(&rekeyed), "--password-file", p(&pw2)]),
                    "a new password with the journal in its old place",
                )
            });
            let lock_old = ok(
                run(&["customize", p(&old_journal), "-o", p(&locked_old), "--lock"]),
                "lock with the journal in its old place",
            );
            rekey.join().unwrap();
            (audit.join().unwrap(), keyed, lock_and_gate.join().unwrap(), lock_old)
        });

        let paths = ["/etc/cloud/cloud.cfg", JOURNAL, OLD_JOURNAL, OLD_JOURNAL_DIR];
        let back = ReadBack::open(&[&debian, &keys, &locked, &locked_old, &rekeyed]);
        KeysThenLock {
            audit,
            sums_before,
            sums_after,
            keyed,
            lock,
            lock_old,
            gate,
            original: back.read("/dev/sda1", "", &paths),
            keyed_files: back.read("/dev/sdb1", "", &paths),
            locked: back.read("/dev/sdc1", "", &paths),
            locked_old: back.read("/dev/sdd1", "", &paths),
            rekeyed: back.read("/dev/sde1", "", &paths),
            journal_owner_mode: ["/dev/sdb1", "/dev/sde1"].map(|device| back.owner_mode(device, "", JOURNAL)),
        }
    }
}

fn keys_then_lock() -> &'static KeysThenLock {
    static SCENARIO: OnceLock<Result<KeysThenLock, String>> = OnceLock::new();
    common::shared(&SCENARIO, KeysThenLock::run)
}

#[test]
fn inspect_reads_each_guest_refuses_a_backed_overlay_and_changes_nothing() {
    let sc = keys_then_lock();
    assert_eq!(sc.audit.status.code(), Some(3), "a refused file: {}", text(&sc.audit.stderr));
    let reports = json(&sc.audit);
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
    assert_eq!(sc.sums_after, sc.sums_before, "inspect must not change an image");
}

#[test]
fn progress_comes_as_plain_lines_when_stdout_is_not_a_terminal() {
    // One line per quarter. A qcow2 compat 1.1 input with a qcow2 output is copied ahead (then only
    // the edits are written), so the long step is the copy.
    let said = text(&keys_then_lock().keyed.stdout);
    let progress: Vec<&str> = said.lines().filter(|l| l.contains("copying: ")).map(str::trim).collect();
    assert_eq!(progress.last().copied(), Some("copying: 100%"), "{said}");
}

#[test]
fn customize_writes_each_key_once_and_a_private_journal_of_the_first_cloud_cfg() {
    let sc = keys_then_lock();
    let cfg = &pyyaml(&[file_text(&sc.keyed_files, "/etc/cloud/cloud.cfg")])[0];
    assert_eq!(cfg["ssh_authorized_keys"], serde_json::json!([KEY1, KEY2]), "each key once");
    let written = [(&sc.keyed_files, "customize"), (&sc.rekeyed, "customize over the old journal")];
    for ((image, how), owner_mode) in written.into_iter().zip(sc.journal_owner_mode) {
        assert_eq!(owner_mode, (0o600, 0, 0), "the journal after {how}");
        assert_eq!(image[OLD_JOURNAL_DIR], None, "after {how}, the journal lives beside cloud.cfg, not in a directory");
        let recorded: Value = serde_json::from_str(&file_text(image, JOURNAL)).unwrap();
        assert_eq!(
            recorded["files"]["/etc/cloud/cloud.cfg"]["original"].as_str(),
            Some(file_text(&sc.original, "/etc/cloud/cloud.cfg").as_str()),
            "the journal after {how} holds the image's first cloud.cfg"
        );
    }
}

#[test]
fn lock_restores_the_original_bytes_and_removes_the_journal_wherever_it_was() {
    let sc = keys_then_lock();
    for (lock, locked, how) in
        [(&sc.lock, &sc.locked, "--lock"), (&sc.lock_old, &sc.locked_old, "--lock with the journal in its old place")]
    {
        let said = text(&lock.stdout);
        assert!(said.contains("restored as it was before cloudimg changed it"), "{how}: {said}");
        assert_eq!(locked["/etc/cloud/cloud.cfg"], sc.original["/etc/cloud/cloud.cfg"], "byte-identical after {how}");
        assert_eq!(locked[JOURNAL], None, "the journal is gone after {how}");
        assert_eq!(locked[OLD_JOURNAL_DIR], None, "no old journal or its directory after {how}");
    }
}

#[test]
fn inspect_require_passes_the_customized_image_and_says_what_the_locked_one_lacks() {
    let gate = &keys_then_lock().gate;
    assert_eq!(gate.status.code(), Some(8), "{}", text(&gate.stderr));
    let reports = json(gate);
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
