//! The decisions of one image's job, before anything is written: which method, which files change
//! and how, and what would stop the login from working. Pure: the guest has been read into
//! [`ImageFacts`] beforehand, and the writes are applied afterwards.

use std::cell::RefCell;
use std::collections::BTreeMap;

use anyhow::Result;

use crate::cli::settings::Customize;
use crate::cloud_config::credentials::{self, Form, Stored};
use crate::cloud_config::lock;
use crate::guest::config::{self, CloudInit};
use crate::login::checks::{self, Effective, Finding, Severity};
use crate::login::method;
use crate::login::method::Method;
use crate::login::password::{self, Secret};
use crate::login::plan::{self, Facts, Request};
use crate::login::shadow;
use crate::login::sshd;
use crate::support::exit_codes::{with_code, BAD_GUEST, INEFFECTIVE, USAGE};
use crate::support::report::Reporter;

/// One change to a guest file.
pub(super) struct Write {
    pub(super) path: String,
    /// `None` removes the file.
    pub(super) content: Option<String>,
    /// Root-only (0600): cloudimg's journal, which may hold an original configuration.
    pub(super) private: bool,
    /// Where a new file takes its owner, mode and label from.
    pub(super) like: &'static str,
}

/// How a job's credentials reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Written into cloud-init's configuration, which sets them at the first boot.
    CloudInit,
    /// Written into /etc/shadow (and sshd's configuration) directly.
    Shadow,
    /// `--lock`: cloudimg's edits undone and every password cloud-init would set removed.
    Lock,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Route::CloudInit => "cloud-init",
            Route::Shadow => "shadow",
            Route::Lock => "lock",
        })
    }
}

/// What a job decided, as the summary and `--json` report it.
#[derive(Debug, serde::Serialize)]
pub struct Decided {
    /// `cloud-init`, `shadow`, or `lock` in JSON.
    pub method: Route,
    pub method_reason: String,
    /// `None` for --lock.
    pub user: Option<String>,
    /// The cloud-config form of the password; `None` without one or with --method shadow.
    pub form: Option<Form>,
    /// The main file written.
    pub file: String,
    /// Every guest file written or removed.
    pub files_changed: Vec<String>,
    pub changed: bool,
    pub changed_keys: Vec<String>,
    /// `yescrypt` or `sha512` with --method shadow.
    pub shadow_algorithm: Option<shadow::Algorithm>,
    /// cloud-init's view after the edit (`None` without cloud-init).
    pub effective: Option<Effective>,
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
}

/// What a job decided, before anything is written: the report, the writes, and the diff.
pub(super) struct Decision {
    pub(super) decided: Decided,
    pub(super) writes: Vec<Write>,
    /// What a dry run shows: a diff with the secret masked.
    pub(super) diff: String,
}

impl Decided {
    /// A decision to write `file` by `method`, with nothing found, noted or changed yet.
    fn new(method: Route, method_reason: String, user: Option<String>, file: String) -> Decided {
        Decided {
            method,
            method_reason,
            user,
            form: None,
            file,
            files_changed: Vec::new(),
            changed: false,
            changed_keys: Vec::new(),
            shadow_algorithm: None,
            effective: None,
            findings: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl Decision {
    /// `decided`, reporting the files `writes` change.
    fn new(decided: Decided, writes: Vec<Write>, diff: String) -> Decision {
        let files_changed = writes.iter().map(|w| w.path.clone()).collect();
        Decision { decided: Decided { files_changed, changed: !writes.is_empty(), ..decided }, writes, diff }
    }
}

/// What the decisions need from the mounted guest.
pub(super) struct ImageFacts {
    /// `None` without /etc/cloud/cloud.cfg.
    pub(super) cloud: Option<CloudInit>,
    pub(super) sshd: Option<crate::login::sshd::Files>,
    pub(super) booted_before: bool,
    pub(super) passwd_users: Vec<String>,
    pub(super) shadow: Option<String>,
    pub(super) os_release: String,
    pub(super) login_defs: Option<String>,
    /// Read from the first of [`lock::JOURNALS`] present.
    pub(super) journal: Option<lock::Journal>,
    /// Which of [`lock::JOURNALS`] the image holds.
    pub(super) journal_files: Vec<&'static str>,
}

/// A password and/or keys, by the method chosen.
pub(super) fn decide_credentials(
    s: &Customize,
    image: &ImageFacts,
    secret: Option<&Secret>,
    report: &Reporter,
) -> Result<Decision> {
    let default_user = image.cloud.as_ref().and_then(|c| credentials::default_user(&merged(&c.files)));
    let user = s.user.clone().or(default_user.clone());
    let in_shadow = |u: &str| image.shadow.as_deref().is_some_and(|t| shadow::state(t, u) != shadow::State::Missing);
    // The login as cloud-init would leave it, derived as customize's checks and inspect derive it;
    // without a known version there is none, and the method cannot be cloud-init anyway.
    let login = image.cloud.as_ref().and_then(|c| {
        let files: Vec<_> = c.files.iter().map(|f| f.parsed.clone()).collect();
        let user = user.as_deref().unwrap_or("");
        Some(checks::login(&files, c.version()?, user, default_user.as_deref(), image.sshd.as_ref()))
    });
    let facts = method::Facts {
        cloud_init: image.cloud.is_some(),
        version: image.cloud.as_ref().and_then(|c| c.version()),
        plaintext: s.plaintext,
        set_passwords_runs: login.is_some_and(|l| l.set_passwords_runs),
        booted_before: image.booted_before && !s.clean_instance_state,
        user_in_shadow: user.as_deref().is_some_and(in_shadow),
    };
    let (method, reason) = method::choose(s.method, &facts).map_err(with_code(BAD_GUEST))?;
    if s.method == Method::Auto {
        report.phase(&format!(
            "Method: {}, because {reason}",
            if method == Method::Shadow { "/etc/shadow" } else { "cloud-init" }
        ));
    }
    match method {
        Method::Shadow => {
            let secret = secret.expect("settings require a password for --method shadow");
            if !s.ssh_keys.is_empty() {
                return Err(with_code(USAGE)(anyhow::anyhow!(
                    "--ssh-key goes through cloud-init; with --method shadow, run a second customize with --ssh-key alone"
                )));
            }
            decide_shadow(s, image, secret, user, reason)
        }
        _ => decide_cloud_init(s, image, secret, reason),
    }
}

pub(super) fn merged(files: &[crate::cloud_config::CloudFile]) -> crate::cloud_config::yaml11::Mapping {
    let parsed: Vec<_> = files.iter().map(|f| f.parsed.clone()).collect();
    crate::cloud_config::merge::effective(&parsed)
}

fn decide_cloud_init(s: &Customize, image: &ImageFacts, secret: Option<&Secret>, reason: String) -> Result<Decision> {
    let cloud = image.cloud.as_ref().ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!(
            "the image has no {}, so no cloud-init to set the password; use --method shadow (or auto) to set it in /etc/shadow",
            crate::cloud_config::CLOUD_CFG
        ))
    })?;
    let version = cloud.version().ok_or_else(|| config::version_unknown(&cloud.detection))?;
    let stored = secret.map(|secret| {
        if s.plaintext {
            Stored::Plain(secret.expose().to_string())
        } else {
            Stored::Hash(password::hash(secret))
        }
    });
    let comparer = Comparer::new(secret, s.plaintext);
    let already_set = |text: &str| comparer.stands_for(text);
    let plan = plan::plan(
        &Facts {
            files: &cloud.files,
            version,
            passwd_users: &image.passwd_users,
            sshd: image.sshd.as_ref(),
            shadow: image.shadow.as_deref(),
            booted_before: image.booted_before && !s.clean_instance_state,
        },
        &Request {
            user: s.user.as_deref(),
            stored,
            ssh_keys: &s.ssh_keys,
            already_set: &already_set,
            expire: s.expire,
            ssh_pwauth: s.ssh_pwauth,
            target: s.target,
        },
    )?;
    let in_cloud_cfg = plan.target == crate::cloud_config::CLOUD_CFG;
    let mut writes = Vec::new();
    if plan.changed() {
        writes.push(Write {
            path: plan.target.clone(),
            content: Some(plan.new_text.clone()),
            // A drop-in cloudimg writes a password to is root's alone; cloud.cfg keeps its mode.
            private: plan.holds_secret && !in_cloud_cfg,
            like: crate::cloud_config::CLOUD_CFG,
        });
        let mut journal = image.journal.clone().unwrap_or_default();
        journal.record(&plan.target, plan.old_text.as_deref(), &plan.new_text);
        writes.push(Write {
            path: lock::JOURNAL.into(),
            content: Some(journal.to_text()),
            private: true,
            like: crate::cloud_config::CLOUD_CFG,
        });
        writes.extend(image.journal_files.iter().filter(|f| **f != lock::JOURNAL).map(|old| Write {
            path: old.to_string(),
            content: None,
            private: false,
            like: crate::cloud_config::CLOUD_CFG,
        }));
    }
    let exposed = (in_cloud_cfg && secret.is_some() && plan.holds_secret)
        .then(|| cloud.files.iter().find(|f| f.path == plan.target)?.mode)
        .flatten()
        .and_then(|mode| checks::readable_password_finding(&plan.target, mode));
    let decided = Decided {
        form: plan.form,
        changed_keys: plan.changed_keys.clone(),
        effective: Some(plan.effective.clone()),
        findings: plan.findings.iter().cloned().chain(comparer.findings()).chain(exposed).collect(),
        ..Decided::new(Route::CloudInit, reason, Some(plan.user.clone()), plan.target.clone())
    };
    Ok(Decision::new(decided, writes, plan.masked_diff()))
}

fn decide_shadow(
    s: &Customize,
    image: &ImageFacts,
    secret: &Secret,
    user: Option<String>,
    reason: String,
) -> Result<Decision> {
    let user = user.ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!(
            "the image's cloud-init configuration names no default user; name the user with --user"
        ))
    })?;
    let text = image.shadow.as_deref().ok_or_else(|| {
        with_code(BAD_GUEST)(anyhow::anyhow!("the image has no {} to set the password in", shadow::SHADOW))
    })?;
    let (algorithm, why) = shadow::default_algorithm(&image.os_release, image.login_defs.as_deref());
    let mut notes = vec![format!("{} hash: {why}", algorithm.name())];
    let comparer = Comparer::new(Some(secret), false);
    let mut writes: Vec<Write> =
        new_shadow(text, &user, secret, algorithm, s.expire, &comparer, &mut notes)?.into_iter().collect();
    let mut findings = comparer.findings();
    let mut diff = String::new();
    match (&image.sshd, s.ssh_pwauth) {
        (Some(files), Some(true)) => {
            for (path, new_text) in sshd::enable_password_authentication(files) {
                diff.push_str(
                    &similar::TextDiff::from_lines(files[&path].as_str(), new_text.as_str())
                        .unified_diff()
                        .header(&format!("a{path}"), &format!("b{path}"))
                        .to_string(),
                );
                notes.push(format!("{path}: PasswordAuthentication yes where sshd reads it first"));
                writes.push(Write { path, content: Some(new_text), private: false, like: sshd::MAIN_CONFIG });
            }
            let mut after = files.clone();
            after.extend(
                writes
                    .iter()
                    .filter(|w| w.path.starts_with("/etc/ssh/"))
                    .map(|w| (w.path.clone(), w.content.clone().unwrap_or_default())),
            );
            findings.extend(cloud_init_undoes_sshd(image, &after));
            if user == "root" {
                findings.extend(checks::root_password_finding(&after));
            }
        }
        (None, _) => findings.push(Finding {
            severity: Severity::Warning,
            message: format!(
                "the image has no {}: the password will work on the console, not over SSH",
                sshd::MAIN_CONFIG
            ),
            fix: "install openssh-server in the image if you need SSH".into(),
        }),
        _ => {}
    }
    if !writes.is_empty() {
        diff = format!(
            "{} for `{user}`: a new {} hash (not shown), account unlocked\n{diff}",
            shadow::SHADOW,
            algorithm.name()
        );
    }
    let decided = Decided {
        shadow_algorithm: Some(algorithm),
        findings,
        notes,
        ..Decided::new(Route::Shadow, reason, Some(user), shadow::SHADOW.into())
    };
    Ok(Decision::new(decided, writes, diff))
}

/// /etc/shadow with a new hash for `user`, unless the one there already stands for the password.
fn new_shadow(
    text: &str,
    user: &str,
    secret: &Secret,
    algorithm: shadow::Algorithm,
    expire: bool,
    comparer: &Comparer,
    notes: &mut Vec<String>,
) -> Result<Option<Write>> {
    if shadow::hash_of(text, user).is_some_and(|h| comparer.stands_for(h)) {
        return Ok(None);
    }
    let hash = match algorithm {
        shadow::Algorithm::Yescrypt => password::hash_yescrypt(secret),
        shadow::Algorithm::Sha512 => password::hash(secret),
    };
    let today = shadow::days_since_epoch(std::time::SystemTime::now());
    let (new, more) = shadow::set_password(text, user, &hash, today, expire).map_err(with_code(BAD_GUEST))?;
    notes.extend(more);
    Ok(Some(Write { path: shadow::SHADOW.into(), content: Some(new), private: false, like: shadow::SHADOW }))
}

/// On a new instance cloud-init applies its own `ssh_pwauth`, which may turn sshd's passwords off again.
fn cloud_init_undoes_sshd(image: &ImageFacts, sshd_files: &sshd::Files) -> Option<Finding> {
    let cloud = image.cloud.as_ref()?;
    let version = cloud.version()?;
    let parsed: Vec<_> = cloud.files.iter().map(|f| f.parsed.clone()).collect();
    let after = checks::login(&parsed, version, "", None, Some(sshd_files)).sshd_decision()?;
    if after.password_authentication {
        return None;
    }
    let file =
        crate::cloud_config::merge::deciding_file(&parsed, &["ssh_pwauth"]).map(|f| f.path.clone()).unwrap_or_default();
    Some(Finding {
        severity: Severity::Warning,
        message: format!("{file} sets `ssh_pwauth: false`: on a new instance cloud-init turns SSH passwords off again (a disk booted again as the same instance keeps them)"),
        fix: "also run `cloudimg customize` with --method cloud-init, or remove `ssh_pwauth` from that file".into(),
    })
}

/// `--lock`: cloudimg's journal undone, then every remaining password removed.
pub(super) fn decide_lock(image: &ImageFacts) -> Result<Decision> {
    let cloud = image
        .cloud
        .as_ref()
        .ok_or_else(|| with_code(BAD_GUEST)(anyhow::anyhow!("the image has no cloud-init configuration to lock")))?;
    let mut current: BTreeMap<String, String> = cloud.files.iter().map(|f| (f.path.clone(), f.text.clone())).collect();
    let mut changes: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut notes = Vec::new();
    let mut findings = Vec::new();
    if let Some(journal) = &image.journal {
        for (path, undo) in lock::undo(journal, &current) {
            match undo {
                lock::Undo::Restore(Some(original)) => {
                    notes.push(format!("{path}: restored as it was before cloudimg changed it"));
                    current.insert(path.clone(), original.clone());
                    changes.insert(path, Some(original));
                }
                lock::Undo::Restore(None) => {
                    notes.push(format!("{path}: removed (cloudimg had created it)"));
                    current.remove(&path);
                    changes.insert(path, None);
                }
                lock::Undo::ChangedSince => findings.push(Finding {
                    severity: Severity::Warning,
                    message: format!("{path} changed after cloudimg wrote it, so it is not restored; its passwords are removed in place"),
                    fix: format!("compare it with the original in the input image's {} if you need it", image.journal_files[0]),
                }),
            }
        }
        changes.extend(image.journal_files.iter().map(|f| (f.to_string(), None)));
    }
    let files: Vec<(String, String)> = current.into_iter().collect();
    let (locked, more) = lock::lock(&files).map_err(with_code(BAD_GUEST))?;
    notes.extend(more);
    changes.extend(locked.into_iter().map(|(p, t)| (p, Some(t))));
    let originals: BTreeMap<&str, &str> = cloud.files.iter().map(|f| (f.path.as_str(), f.text.as_str())).collect();
    let writes: Vec<Write> = changes
        .into_iter()
        // A file restored and then locked back to what it is now needs no write.
        .filter(|(path, content)| match originals.get(path.as_str()) {
            Some(now) => Some(*now) != content.as_deref(),
            None => lock::JOURNALS.contains(&path.as_str()) || content.is_some(),
        })
        .map(|(path, content)| Write { path, content, private: false, like: crate::cloud_config::CLOUD_CFG })
        .collect();
    let diff = notes.iter().map(|n| format!("{n}\n")).collect();
    let decided = Decided {
        findings,
        notes,
        ..Decided::new(Route::Lock, "--lock".into(), None, crate::cloud_config::CLOUD_CFG.into())
    };
    Ok(Decision::new(decided, writes, diff))
}

/// Whether existing stored values already stand for the password, in the requested kind; each value
/// is checked once. A hash with cost parameters beyond what cloudimg computes is not checked: it
/// counts as another password (and is replaced), with a warning.
struct Comparer<'a> {
    secret: Option<&'a Secret>,
    plaintext: bool,
    checked: RefCell<BTreeMap<String, bool>>,
    refused: RefCell<Vec<String>>,
}

impl<'a> Comparer<'a> {
    fn new(secret: Option<&'a Secret>, plaintext: bool) -> Self {
        Comparer { secret, plaintext, checked: RefCell::default(), refused: RefCell::default() }
    }

    fn stands_for(&self, stored: &str) -> bool {
        let Some(secret) = self.secret else { return false };
        if self.plaintext {
            return stored == secret.expose();
        }
        if !stored.starts_with('$') {
            return false;
        }
        if let Some(&known) = self.checked.borrow().get(stored) {
            return known;
        }
        let same = password::matches(secret, stored).unwrap_or_else(|why| {
            self.refused.borrow_mut().push(format!("{why:#}"));
            false
        });
        self.checked.borrow_mut().insert(stored.to_string(), same);
        same
    }

    fn findings(&self) -> Vec<Finding> {
        self.refused
            .borrow()
            .iter()
            .map(|why| Finding {
                severity: Severity::Warning,
                message: format!("a password hash already in the image was not compared with the password: {why}"),
                fix: "none needed: a new hash takes its place".into(),
            })
            .collect()
    }
}

pub(super) fn refuse_if_ineffective(findings: &[Finding], allow: bool, report: &Reporter) -> Result<()> {
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Error).collect();
    for finding in findings {
        if finding.severity != Severity::Error || allow {
            report.warn(&format!("{} (fix: {})", finding.message, finding.fix));
        }
    }
    if errors.is_empty() || allow {
        return Ok(());
    }
    let reasons: Vec<String> = errors.iter().map(|f| format!("{} (fix: {})", f.message, f.fix)).collect();
    Err(with_code(INEFFECTIVE)(anyhow::anyhow!(
        "the password login would not work, so nothing was written: {}; --allow-ineffective writes anyway",
        reasons.join("; ")
    )))
}

#[cfg(test)]
mod tests;
