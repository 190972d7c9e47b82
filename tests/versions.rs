//! Every cloud-init generation a user brings: the version read from the files that generation leaves
//! (0.7's `StrictVersion`, `__VERSION__`, a packager's `_PACKAGED_VERSION`, meson's generated module,
//! dpkg's database), the source named, disagreement warned about, and the password written in the
//! form that cloud-init reads. One `customize` batch, one `inspect` run and one read-back serve all.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::sync::OnceLock;

use common::{cloudimg, file_text, fixtures, pyyaml, text, ReadBack, GENERATIONS};
use serde_json::Value;

const PASSWORD: &str = "generations: every cloud-init";

struct Batch {
    _dir: tempfile::TempDir,
    out_dir: PathBuf,
    output: Output,
    /// `inspect --json` over the same images.
    inspected: Output,
    /// The JSON entry of each input, by fixture name.
    entries: Vec<(String, Value)>,
}

const INPUTS: &[&str] = &[
    "gen-0.7.5",
    "gen-17.1",
    "gen-22.4.2-ubuntu",
    "gen-25.1.4",
    "gen-26.2-meson",
    "gen-dpkg-only",
    "gen-rpm-only",
    "gen-disagreeing",
    "gen-unknown",
];

/// `customize --out-dir --json` over every generation, once for all the tests here, and beside it
/// (a test waiting for it holds a test thread, so its core is free) `inspect --json` over them.
fn batch() -> &'static Batch {
    static BATCH: OnceLock<Batch> = OnceLock::new();
    BATCH.get_or_init(|| {
        let fx = fixtures();
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        let images: Vec<PathBuf> = INPUTS.iter().map(|n| fx.image(n)).collect();
        let mut args = vec!["customize"];
        args.extend(images.iter().map(|i| i.to_str().unwrap()));
        args.extend(["--out-dir", out_dir.to_str().unwrap(), "--password-file", pw.to_str().unwrap(), "--json"]);
        let (output, inspected) = std::thread::scope(|s| {
            let inspected = s.spawn(|| {
                let mut args = vec!["inspect", "--json"];
                args.extend(images.iter().map(|i| i.to_str().unwrap()));
                cloudimg(&args, None, &[])
            });
            (cloudimg(&args, None, &[]), inspected.join().unwrap())
        });
        let report: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&output.stdout), text(&output.stderr)));
        let entries = INPUTS
            .iter()
            .zip(report.as_array().expect("one entry per input"))
            .map(|(name, entry)| (name.to_string(), entry.clone()))
            .collect();
        Batch { _dir: dir, out_dir, output, inspected, entries }
    })
}

fn entry(name: &str) -> &'static Value {
    &batch().entries.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no entry for {name}")).1
}

#[test]
fn each_generation_is_read_from_its_own_files_and_says_where() {
    for (name, version, source, _) in GENERATIONS.iter().filter(|g| g.0 != "gen-0.7.5") {
        let e = entry(name);
        assert_eq!(e["ok"], true, "{name}: {e:#}");
        let report = &e["report"];
        assert_eq!(report["cloud_init_version"], *version, "{name}");
        assert_eq!(report["cloud_init_version_source"]["source"], *source, "{name}: {report:#}");
        assert_eq!(report["cloud_init_version_source"]["version"], *version, "{name}");
    }
    // The 26.2 answer comes from the module meson generated, and names it.
    assert_eq!(
        entry("gen-26.2-meson")["report"]["cloud_init_version_source"]["path"],
        "/usr/lib/python3/dist-packages/cloudinit/meson_versions.py"
    );
    assert_eq!(entry("gen-dpkg-only")["report"]["cloud_init_version_source"]["raw"], "25.1.4-1+deb13u1");
    // customize warns about what the image's cloud-init will report, though it is not cloudimg's.
    let findings = entry("gen-26.2-meson")["report"]["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["message"]
            .as_str()
            .unwrap()
            .contains("50-legacy.cfg: cloud-init 26.2.0 logs a DEPRECATED line for `users`")),
        "{findings:#?}"
    );
    let rpm = &entry("gen-rpm-only")["report"]["cloud_init_version_source"];
    assert_eq!(
        (&rpm["path"], &rpm["raw"]),
        (&Value::from("/var/lib/rpm/rpmdb.sqlite"), &Value::from("23.4-7.el9_4.1"))
    );
}

#[test]
fn each_generation_gets_the_form_its_cloud_init_reads() {
    let b = batch();
    let written: Vec<(&str, &str, PathBuf)> = GENERATIONS
        .iter()
        .filter(|g| g.0 != "gen-0.7.5")
        .map(|(name, _, _, form)| (*name, *form, b.out_dir.join(format!("{name}.qcow2"))))
        .collect();
    for (name, form, _) in &written {
        assert_eq!(entry(name)["report"]["form"], *form, "{name}");
    }
    let paths: Vec<&std::path::Path> = written.iter().map(|(_, _, p)| p.as_path()).collect();
    let back = ReadBack::open(&paths);
    let texts: Vec<String> = (0..written.len())
        .map(|i| {
            let device = format!("/dev/sd{}1", (b'a' + i as u8) as char);
            let files = back.read(&device, "", &["/etc/cloud/cloud.cfg"]);
            file_text(&files, "/etc/cloud/cloud.cfg")
        })
        .collect();
    for ((name, form, _), cfg) in written.iter().zip(pyyaml(&texts)) {
        let hash = match *form {
            "top_level_password" => cfg["password"].as_str(),
            "chpasswd_users" => cfg["chpasswd"]["users"][0]["password"].as_str(),
            other => panic!("{name}: unexpected form {other}"),
        };
        let hash = hash.unwrap_or_else(|| panic!("{name}: no password in the {form} form: {cfg:#}"));
        assert!(common::system_crypt_verifies(PASSWORD, hash), "{name}: {hash}");
        assert_eq!(cfg["chpasswd"]["expire"], false, "{name}");
        assert_eq!(cfg["ssh_pwauth"], true, "{name}");
    }
}

#[test]
fn cloud_init_0_7_is_refused_without_plaintext_for_the_right_reason() {
    let e = entry("gen-0.7.5");
    assert_eq!((&e["ok"], &e["exit_code"]), (&Value::Bool(false), &Value::from(4)), "{e:#}");
    let error = e["error"].as_str().unwrap();
    assert!(
        error.contains("cloud-init 0.7.5 in this image cannot take a password hash") && error.contains("--plaintext"),
        "{error}"
    );
    // The batch's status is the first failure's: this one, not the unknown image's.
    assert_eq!(batch().output.status.code(), Some(4));
}

#[test]
fn cloud_init_0_7_takes_a_plaintext_password_at_the_top_level() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (pw, out) = (dir.path().join("pw"), dir.path().join("out.qcow2"));
    std::fs::write(&pw, "plain-0.7\n").unwrap();
    let input = fx.image("gen-0.7.5");
    let args = [
        "customize",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--password-file",
        pw.to_str().unwrap(),
        "--plaintext",
        "--json",
    ];
    let result = cloudimg(&args, None, &[]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let report: Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(report["cloud_init_version"], "0.7.5");
    assert_eq!(report["cloud_init_version_source"]["path"], "/usr/lib/python2.7/dist-packages/cloudinit/version.py");
    assert_eq!(report["form"], "top_level_password");
    let files = ReadBack::open(&[&out]).read("/dev/sda1", "", &["/etc/cloud/cloud.cfg"]);
    let cfg = &pyyaml(&[file_text(&files, "/etc/cloud/cloud.cfg")])[0];
    assert_eq!(cfg["password"], "plain-0.7");
    assert_eq!(cfg["ssh_pwauth"], true);
}

#[test]
fn sources_that_disagree_are_reported_with_both_answers() {
    let findings = entry("gen-disagreeing")["report"]["findings"].as_array().unwrap();
    let warning = findings
        .iter()
        .find(|f| f["message"].as_str().unwrap().starts_with("cloud-init's version differs between sources"))
        .unwrap_or_else(|| panic!("no disagreement warning: {findings:#?}"));
    let message = warning["message"].as_str().unwrap();
    assert!(message.contains("24.1.0, from cloud-init's version.py"), "{message}");
    assert!(message.contains("25.1.4, from the dpkg database (/var/lib/dpkg/status: `25.1.4-1`)"), "{message}");
    assert_eq!(warning["severity"], "warning");
    assert!(text(&batch().output.stderr).contains("cloud-init's version differs between sources"));
    // Sources that agree raise nothing.
    let agreeing = entry("gen-25.1.4")["report"]["findings"].as_array().unwrap();
    assert!(agreeing.iter().all(|f| !f["message"].as_str().unwrap().contains("differs between sources")));
}

#[test]
fn an_image_without_any_version_source_says_what_was_looked_for() {
    let e = entry("gen-unknown");
    assert_eq!(e["exit_code"], 4, "{e:#}");
    let error = e["error"].as_str().unwrap();
    for looked_for in [
        "/usr/lib/python3/dist-packages/cloudinit/version.py (missing)",
        "/var/lib/dpkg/status",
        "rpm",
        "--cloud-init-version",
    ] {
        assert!(error.contains(looked_for), "{looked_for} not in: {error}");
    }
}

#[test]
fn inspect_reads_every_generation_in_one_appliance_launch() {
    let out = &batch().inspected;
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches("Launching the appliance").count(), 1, "{stderr}");
    assert_eq!(out.status.code(), Some(4), "the unknown image is a guest that cannot be judged: {stderr}");
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reports = reports.as_array().unwrap();
    for (name, version, source, _) in GENERATIONS {
        let r = &reports[INPUTS.iter().position(|n| n == name).unwrap()];
        let found = &r["analysis"]["cloud_init"]["version"];
        assert_eq!(
            (&found["version"], &found["source"]),
            (&Value::from(*version), &Value::from(*source)),
            "{name}: {r:#}"
        );
    }
    // What the image's own cloud-init will report, with the file and key, and its effect on `status`.
    for (name, _, _, _) in GENERATIONS {
        let ci = &reports[INPUTS.iter().position(|n| n == name).unwrap()]["analysis"]["cloud_init"];
        let expected = if *name == "gen-26.2-meson" { 1 } else { 0 };
        assert_eq!(ci["logged"].as_array().unwrap().len(), expected, "{name}: {ci:#}");
        assert_eq!(ci["degraded"], expected == 1, "{name}");
    }
    let legacy =
        &reports[INPUTS.iter().position(|n| *n == "gen-26.2-meson").unwrap()]["analysis"]["cloud_init"]["logged"][0];
    assert_eq!(
        (&legacy["file"], &legacy["key"], &legacy["level"]),
        (&Value::from("/etc/cloud/cloud.cfg.d/50-legacy.cfg"), &Value::from("users"), &Value::from("deprecated"))
    );
    let unknown = &reports[INPUTS.iter().position(|n| *n == "gen-unknown").unwrap()];
    assert!(unknown["error"].as_str().unwrap().contains("cannot find cloud-init's version"), "{unknown:#}");
}
