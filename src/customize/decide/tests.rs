use super::*;
use crate::cloud_config::CLOUD_CFG;

const ORIGINAL: &str = "users:\n- default\nssh_pwauth: false\n";
const WRITTEN: &str = "users:\n- default\nssh_pwauth: true\nchpasswd:\n  expire: false\n  users:\n  - {name: debian, password: 'secret', type: text}\n";

fn image(cloud_cfg: &str, journals: &[&'static str]) -> ImageFacts {
    let mut journal = lock::Journal::default();
    journal.record(CLOUD_CFG, Some(ORIGINAL), WRITTEN);
    ImageFacts {
        cloud: Some(CloudInit {
            files: vec![crate::cloud_config::parse_file(CLOUD_CFG, cloud_cfg.to_string()).unwrap()],
            detection: crate::cloud_config::version::Detection::default(),
        }),
        sshd: None,
        booted_before: false,
        passwd_users: Vec::new(),
        shadow: None,
        os_release: String::new(),
        login_defs: None,
        journal: (!journals.is_empty()).then_some(journal),
        journal_files: journals.to_vec(),
    }
}

fn writes(decision: &Decision) -> Vec<(&str, Option<&str>)> {
    decision.writes.iter().map(|w| (w.path.as_str(), w.content.as_deref())).collect()
}

#[test]
fn the_route_reads_in_json_as_the_method_names_of_the_command_line() {
    let names: Vec<String> =
        [Route::CloudInit, Route::Shadow, Route::Lock].iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    assert_eq!(names, ["\"cloud-init\"", "\"shadow\"", "\"lock\""]);
    assert_eq!(Route::CloudInit.to_string(), "cloud-init");
}

#[test]
fn lock_restores_from_the_journal_wherever_it_is_kept_and_removes_it() {
    for kept in [vec![lock::JOURNAL], vec![lock::OLD_JOURNAL], lock::JOURNALS.to_vec()] {
        let decision = decide_lock(&image(WRITTEN, &kept)).unwrap();
        let mut expected = vec![(CLOUD_CFG, Some(ORIGINAL))];
        expected.extend(kept.iter().map(|path| (*path, None)));
        assert_eq!(writes(&decision), expected, "journal kept at {kept:?}");
        assert!(
            decision.decided.notes.iter().any(|n| n.contains("restored as it was")),
            "{:?}",
            decision.decided.notes
        );
    }
}

#[test]
fn lock_without_a_journal_removes_the_password_and_writes_no_journal() {
    let decision = decide_lock(&image(WRITTEN, &[])).unwrap();
    let writes = writes(&decision);
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].0, CLOUD_CFG);
    let locked = writes[0].1.unwrap();
    assert!(!locked.contains("secret") && locked.contains("ssh_pwauth: false"), "{locked}");
}

#[test]
fn lock_names_the_journal_it_read_when_a_file_changed_since() {
    let changed = format!("{WRITTEN}# edited by hand\n");
    let decision = decide_lock(&image(&changed, &[lock::OLD_JOURNAL])).unwrap();
    let finding =
        decision.decided.findings.iter().find(|f| f.message.contains("changed after cloudimg wrote it")).unwrap();
    assert!(finding.fix.contains(lock::OLD_JOURNAL), "{}", finding.fix);
    assert!(writes(&decision).contains(&(lock::OLD_JOURNAL, None)));
}

fn secret(text: &str) -> Secret {
    Secret::new(text.to_string()).unwrap()
}

#[test]
fn a_stored_value_stands_for_the_password_only_when_it_is_that_password_in_the_kind_asked() {
    let pw = secret("Tr0ub4dor &3");
    let (own, other) = (password::hash(&pw), password::hash(&secret("another")));
    let hashed = Comparer::new(Some(&pw), false);
    assert!(hashed.stands_for(&own));
    assert!(!hashed.stands_for(&other));
    assert!(!hashed.stands_for("Tr0ub4dor &3"), "clear text is not a hash");
    let plain = Comparer::new(Some(&pw), true);
    assert!(plain.stands_for("Tr0ub4dor &3"));
    assert!(!plain.stands_for(&own), "a hash is not the clear text asked for");
    assert!(!Comparer::new(None, false).stands_for(&own), "no password stands for nothing");
    assert_eq!(hashed.findings().len(), 0);
}

#[test]
fn a_hash_too_costly_to_check_counts_as_another_password_with_a_warning() {
    let pw = secret("x");
    let comparer = Comparer::new(Some(&pw), false);
    let costly = "$6$rounds=999999999$saltsaltsaltsalt$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    assert!(!comparer.stands_for(costly));
    assert!(!comparer.stands_for(costly), "checked once");
    let findings = comparer.findings();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].severity, Severity::Warning);
    assert!(findings[0].message.contains("999999999 rounds"), "{}", findings[0].message);
}

fn finding(severity: Severity, message: &str) -> Finding {
    Finding { severity, message: message.into(), fix: "the fix".into() }
}

#[test]
fn an_error_finding_refuses_the_write_unless_allowed_and_warnings_never_do() {
    let quiet = Reporter::new(crate::support::report::Verbosity::Quiet, false);
    let warning = finding(Severity::Warning, "only a warning");
    assert!(refuse_if_ineffective(std::slice::from_ref(&warning), false, &quiet).is_ok());
    let findings = [warning, finding(Severity::Error, "ssh_pwauth is overridden")];
    let refused = refuse_if_ineffective(&findings, false, &quiet).unwrap_err();
    assert_eq!(crate::support::exit_codes::code_of(&refused), INEFFECTIVE);
    assert_eq!(
        format!("{refused:#}"),
        "the password login would not work, so nothing was written: ssh_pwauth is overridden (fix: the fix); \
         --allow-ineffective writes anyway"
    );
    assert!(refuse_if_ineffective(&findings, true, &quiet).is_ok());
}

#[test]
fn cloud_init_turning_sshd_passwords_off_again_is_named_by_its_file() {
    let with_version = |cloud_cfg: &str| {
        let mut facts = image(cloud_cfg, &[]);
        let detection = &mut facts.cloud.as_mut().unwrap().detection;
        detection.answer(crate::cloud_config::version::Source::VersionPy, "version.py", "22.4.2");
        facts
    };
    let sshd: sshd::Files = [(sshd::MAIN_CONFIG.to_string(), "PasswordAuthentication yes\n".to_string())].into();
    let off = with_version("users:\n- default\nssh_pwauth: false\n");
    let found = cloud_init_undoes_sshd(&off, &sshd).expect("ssh_pwauth: false wins on a new instance");
    assert!(found.message.starts_with("/etc/cloud/cloud.cfg sets `ssh_pwauth: false`"), "{}", found.message);
    assert!(cloud_init_undoes_sshd(&with_version("users:\n- default\nssh_pwauth: true\n"), &sshd).is_none());
}
