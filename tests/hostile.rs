//! Hostile input: guests whose cloud-init files are links, devices, huge, malformed or malicious, and
//! image files at awkward paths. Each has a defined outcome (README.md, "Hostile input"): a clear
//! refusal with its exit status, or a correct edit; never a hang, a crash, or a write elsewhere.

mod common;

use std::sync::Mutex;

use common::{cloudimg, fixtures, p, text, ESCAPING_PRETTY_NAME, HOSTILE_GUESTS, MATCHING_HASH, MATCHING_SECRET};

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
    // Refused at once, before a single file is read (reading them took hours).
    (
        "cloud.cfg.d holds 100 000 hard links to 1 MiB files",
        4,
        "/etc/cloud/cloud.cfg.d in the guest holds 100001 files, more than the 256 cloudimg reads",
    ),
    // sshd itself refuses to start; following the Includes took 20^16 steps.
    ("sshd_config.d drop-ins each include the directory", 4, "Too many recursive configuration includes"),
    (
        "os-release and a drop-in name carry terminal escape sequences",
        0,
        "50-\\x1b[31mred.cfg in the guest is a symbolic link",
    ),
    // The image's own password is replaced (these runs give another one) and shown masked.
    ("cloud.cfg holds the hash of the password being set", 0, "-    password: '<hidden>'"),
    ("cloud.cfg holds the password being set in clear text", 0, "-    password: '<hidden>'"),
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
                let leaked = said.contains(MATCHING_HASH) || said.contains(MATCHING_SECRET) || said.contains('\x1b');
                if out.status.code() != Some(*code) || !said.contains(needle) || leaked {
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

/// `--root` for one of the hostile guests.
fn root_of(case: &str) -> String {
    format!("/dev/sda{}", HOSTILE_GUESTS.iter().position(|c| *c == case).unwrap() + 1)
}

/// Runs `cloudimg` with each argument list, two at a time (each is one appliance launch).
fn run_pairs(jobs: Vec<Vec<String>>) -> Vec<std::process::Output> {
    let mut outputs = Vec::new();
    for pair in jobs.chunks(2) {
        let handles: Vec<_> = pair
            .iter()
            .cloned()
            .map(|args| {
                std::thread::spawn(move || cloudimg(&args.iter().map(String::as_str).collect::<Vec<_>>(), None, &[]))
            })
            .collect();
        outputs.extend(handles.into_iter().map(|h| h.join().unwrap()));
    }
    outputs
}

#[test]
fn a_dry_run_never_prints_the_secret_or_its_hash_whatever_the_path() {
    // The image already holds this password (hash, or clear text for --plaintext), so the entry is
    // kept, and the chpasswd block around it is re-rendered (expire changes); with -v and --json too.
    let image = fixtures().image("hostile-guests");
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{MATCHING_SECRET}\n")).unwrap();
    // The kept hash is not the one this run would write: `<hidden>`; the clear text is: `********`.
    let cases = [
        ("cloud.cfg holds the hash of the password being set", None, "<hidden>"),
        ("cloud.cfg holds the password being set in clear text", Some("--plaintext"), "********"),
    ];
    let mut jobs = Vec::new();
    let mut masks = Vec::new();
    for (case, plaintext, mask) in cases {
        for extra in [&[][..], &["-v", "--json"][..]] {
            let root = root_of(case);
            let mut args = vec!["customize", p(&image), "--dry-run", "--root", &root, "--password-file", p(&pw)];
            args.extend(plaintext);
            args.extend(extra);
            jobs.push(args.into_iter().map(str::to_string).collect());
            masks.push(mask);
        }
    }
    let outputs = run_pairs(jobs.clone());
    let hash_part = MATCHING_HASH.rsplit('$').next().unwrap();
    for ((args, out), mask) in jobs.iter().zip(&outputs).zip(masks) {
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{args:?}: {said}");
        assert!(!said.contains(MATCHING_SECRET) && !said.contains(hash_part), "{args:?} printed the secret:\n{said}");
        if !args.contains(&"--json".to_string()) {
            let kept = format!("     password: '{mask}'\n");
            assert!(said.contains("+  expire: false") && said.contains(&kept), "{args:?}: {said}");
        }
    }
}

#[test]
fn inspect_refuses_an_sshd_include_bomb_instead_of_following_it() {
    // inspect asks for sshd's settings with nothing setting them (no `ssh_pwauth`): the resolver used
    // to follow the drop-ins' 20^16 Include paths (stopped after 300 s without an answer).
    let image = fixtures().image("hostile-guests");
    let root = root_of("sshd_config.d drop-ins each include the directory");
    let out = cloudimg(&["inspect", p(&image), "--root", &root], None, &[]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(4), "{said}");
    assert!(
        said.contains("/etc/ssh/sshd_config.d/00.conf line 1 includes /etc/ssh/sshd_config.d/00.conf")
            && said.contains("Too many recursive configuration includes"),
        "{said}"
    );
}

#[test]
fn guest_strings_reach_the_terminal_escaped() {
    let image = fixtures().image("hostile-guests");
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "hostile pw\n").unwrap();
    let root = root_of("os-release and a drop-in name carry terminal escape sequences");
    let outputs = run_pairs(vec![
        ["inspect", p(&image), "--root", &root].iter().map(|s| s.to_string()).collect(),
        ["customize", p(&image), "--dry-run", "-v", "--root", &root, "--password-file", p(&pw)]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    ]);
    let shown = ESCAPING_PRETTY_NAME.replace('\x1b', "\\x1b").replace('\x07', "\\x07");
    for out in &outputs {
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!said.contains('\x1b') && !said.contains('\x07'), "raw control characters:\n{said:?}");
        assert!(said.contains(&shown), "the name, escaped: {said}");
        assert!(said.contains("50-\\x1b[31mred.cfg"), "{said}");
    }
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
