//! The pure pipeline judged by independent implementations: PyYAML (what cloud-init reads with) and
//! the system's crypt(3). Golden outputs pin the exact bytes written into real distribution files.

mod common;

use cloudimg::cloud_config::credentials::Stored;
use cloudimg::cloud_config::{parse_file, CloudFile};
use cloudimg::cloud_config::{CLOUD_CFG, DROP_IN};
use cloudimg::login::password::{self, Secret};
use cloudimg::login::plan::{plan, Facts, Plan, Request};
use serde_json::{json, Value};

const FIXED_HASH: &str =
    "$6$0123456789abcdef$fixedhashusedonlyforgoldenfilesfixedhashusedonlyforgoldenfilesfixedhashusedonly";

fn files(cfg: &str) -> Vec<CloudFile> {
    vec![
        parse_file(CLOUD_CFG, cfg.to_string()).unwrap(),
        parse_file("/etc/cloud/cloud.cfg.d/05_logging.cfg", "_log: ['[loggers]']\n".into()).unwrap(),
    ]
}

fn run_plan(files: &[CloudFile], version: &str, user: Option<&str>, stored: Stored, target: &str) -> Plan {
    let never = |_: &str| false;
    let users = vec!["root".to_string(), "ops".to_string()];
    plan(
        &Facts {
            files,
            version: version.parse().unwrap(),
            passwd_users: &users,
            sshd: None,
            shadow: None,
            booted_before: false,
        },
        &Request {
            user,
            stored: Some(stored),
            ssh_keys: &[],
            already_set: &never,
            expire: false,
            ssh_pwauth: Some(true),
            target,
        },
    )
    .unwrap()
}

const NASTY: &[&str] = &[
    "yes",
    "No",
    "on",
    "OFF",
    "true",
    "null",
    "~",
    "12:30:00",
    "2001-12-14",
    "2001-12-14 21:59:43.10 -5",
    "0777",
    "0x1F",
    "1_000",
    "1e3",
    "1.5",
    ".inf",
    ".NaN",
    "-",
    "- item",
    "a: b",
    "a:b",
    "#comment",
    "x #y",
    " leading",
    "trailing ",
    "'single'",
    "\"double\"",
    "it's",
    "back\\slash",
    "tab\tin",
    "\u{1}ctrl\u{7f}",
    "é ü 日本",
    "emoji 🎉",
    "%percent",
    "@at",
    "`tick",
    "!bang",
    "!!str",
    "&anchor",
    "*alias",
    "|pipe",
    ">fold",
    "{brace}",
    "[bracket]",
    ",comma",
    "?q",
    "a\rb",
    "nel\u{85}",
    "ls\u{2028}",
    "\u{feff}bom",
    "...",
    "---",
    "=",
    "<<",
    "$6$looks$likeahash",
    "p@ss:w0rd!",
];

#[test]
fn every_nasty_password_reads_back_identically_through_pyyaml_in_every_form() {
    let base = files(common::DEBIAN_CFG);
    let mut documents = Vec::new();
    let mut expected = Vec::new();
    for password in NASTY {
        let stored = || Stored::Plain(password.to_string());
        // chpasswd.users (22.3+), top-level password (17.1+, default user), chpasswd.list (other user;
        // a YAML list from 17.1 on).
        documents.push(run_plan(&base, "22.4.2", None, stored(), CLOUD_CFG).new_text);
        expected.push(("/chpasswd/users/0/password", password.to_string()));
        documents.push(run_plan(&base, "20.1", None, stored(), CLOUD_CFG).new_text);
        expected.push(("/password", password.to_string()));
        documents.push(run_plan(&base, "20.1", Some("ops"), stored(), DROP_IN).new_text);
        expected.push(("/chpasswd/list/0", format!("ops:{password}")));
    }
    let parsed = common::pyyaml(&documents);
    for ((pointer, want), doc) in expected.iter().zip(&parsed) {
        assert_eq!(doc.pointer(pointer), Some(&json!(want)), "{pointer} for {want:?}");
        assert_eq!(doc.pointer("/chpasswd/expire"), Some(&json!(false)));
        assert_eq!(doc.pointer("/ssh_pwauth"), Some(&json!(true)));
    }
}

#[test]
fn edits_of_real_distribution_files_change_only_the_intended_keys_for_pyyaml() {
    for cfg in [common::DEBIAN_CFG, common::UBUNTU_CFG, common::ROCKY_CFG] {
        let plan = run_plan(&files(cfg), "24.1", None, Stored::Hash(FIXED_HASH.into()), CLOUD_CFG);
        let docs = common::pyyaml(&[cfg.to_string(), plan.new_text.clone()]);
        let (Value::Object(mut old), Value::Object(new)) = (docs[0].clone(), docs[1].clone()) else {
            panic!("not mappings")
        };
        for key in ["chpasswd", "ssh_pwauth"] {
            old.remove(key);
        }
        let mut rest = new.clone();
        rest.remove("chpasswd");
        rest.remove("ssh_pwauth");
        assert_eq!(Value::Object(old), Value::Object(rest), "untouched keys differ");
        assert_eq!(new["chpasswd"]["users"][0]["password"], json!(FIXED_HASH));
        assert_eq!(new["chpasswd"]["users"][0]["type"], json!("hash"));
        assert_eq!(new["ssh_pwauth"], json!(true));
        // Every original line is still there, in order: only additions or the replaced entry.
        let kept: Vec<&str> = cfg.lines().filter(|l| !l.starts_with("ssh_pwauth")).collect();
        let new_lines: Vec<&str> = plan.new_text.lines().collect();
        let mut it = new_lines.iter();
        assert!(kept.iter().all(|l| it.any(|n| n == l)), "an original line was lost or reordered");
    }
}

/// Golden files: the exact text written into each distribution's file, for cloud.cfg and drop-in.
/// `UPDATE_GOLDEN=1 cargo test --test judges` rewrites them (then review the diff).
#[test]
fn golden_outputs_for_real_distribution_files() {
    let cases = [
        ("debian-12", common::DEBIAN_CFG, "22.4.2"),
        ("ubuntu-26", common::UBUNTU_CFG, "24.4.1"),
        ("rocky-26", common::ROCKY_CFG, "23.4"),
        ("debian-12-cloud-init-20.1", common::DEBIAN_CFG, "20.1"),
    ];
    for (name, cfg, version) in cases {
        for (suffix, target) in [("cloud.cfg", CLOUD_CFG), ("drop-in.cfg", DROP_IN)] {
            let plan = run_plan(&files(cfg), version, None, Stored::Hash(FIXED_HASH.into()), target);
            let path = format!("{}/fixtures/golden/{name}.{suffix}", env!("CARGO_MANIFEST_DIR"));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(std::path::Path::new(&path).parent().unwrap()).unwrap();
                std::fs::write(&path, &plan.new_text).unwrap();
            }
            let golden =
                std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing {path}; run with UPDATE_GOLDEN=1"));
            assert_eq!(plan.new_text, golden, "{path}");
            assert!(!plan.masked_diff().contains(FIXED_HASH), "the diff shows the hash");
        }
    }
}

#[test]
fn hashes_verify_with_the_system_crypt() {
    for pw in ["openstack", "p@ss:w0rd!", "é ü 日本", " spaces ", "x"] {
        let secret = Secret::new(pw.to_string()).unwrap();
        let hash = password::hash(&secret);
        assert!(hash.starts_with("$6$") && hash.split('$').nth(2).unwrap().len() == 16, "{hash}");
        assert!(common::system_crypt_verifies(pw, &hash), "glibc rejects {hash}");
        assert!(!common::system_crypt_verifies("wrong", &hash));
    }
    // And our verifier agrees with glibc on a hash glibc made.
    let glibc = std::process::Command::new(common::PYTHON)
        .args(["-W", "ignore", "-c", "import crypt; print(crypt.crypt('openstack', '$6$abcdefghijklmnop$'))"])
        .output()
        .unwrap();
    assert!(glibc.status.success(), "Python's crypt failed: {}", common::text(&glibc.stderr));
    let glibc = common::text(&glibc.stdout).trim().to_string();
    assert!(glibc.starts_with("$6$abcdefghijklmnop$"), "{glibc}");
    assert!(password::matches(&Secret::new("openstack".into()).unwrap(), &glibc).unwrap(), "{glibc}");
}
