//! Whether the edit will really give a password login, judged on the files as they will be: every
//! finding names what stands in the way and how to fix it.

use crate::cloud_config::credentials::{self, UserOutcome};
use crate::cloud_config::deprecations;
use crate::cloud_config::merge::{self, ConfigFile};
use crate::cloud_config::version::CloudInitVersion;
use crate::cloud_config::yaml11::Mapping;
use crate::cloud_config::DROP_IN;
use crate::login::sshd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The password login would not work: nothing is written unless the user insists.
    Error,
    /// A secret stored in the clear, or a file that would pull another file in.
    Security,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// A line cloud-init will log because of the configuration, as a finding: a warning, since it makes
/// `cloud-init status` degraded from 23.4 on (the login itself still works).
pub fn logged_finding(logged: &deprecations::Logged, version: CloudInitVersion) -> Finding {
    let status = if version >= deprecations::DEGRADES_STATUS {
        "; `cloud-init status` will end `degraded` (exit 2)"
    } else {
        ""
    };
    Finding {
        severity: Severity::Warning,
        message: format!(
            "{}: cloud-init {version} logs a {} line for `{}`: {}{status}",
            logged.file,
            logged.level.to_uppercase(),
            logged.key,
            logged.message
        ),
        fix: logged.fix.clone(),
    }
}

/// What the edit is meant to achieve.
pub struct Intent<'a> {
    pub user: &'a str,
    /// Whether a password is being set (not only keys).
    pub password: bool,
    /// Whether SSH keys are being added.
    pub keys: bool,
    /// Whether a stored password value stands for the requested password, and is of the requested kind.
    pub is_ours: &'a dyn Fn(&credentials::Stored) -> bool,
    pub expire: bool,
    pub ssh_pwauth: Option<bool>,
    /// The file cloudimg edits.
    pub target: &'a str,
}

/// The image as the checks see it, after the edit.
pub struct Image<'a> {
    /// cloud-init's files from lowest to highest priority.
    pub files: &'a [ConfigFile],
    pub version: CloudInitVersion,
    pub default_user: Option<&'a str>,
    /// sshd's configuration files; `None` when the image has no `/etc/ssh/sshd_config`.
    pub sshd: Option<&'a sshd::Files>,
    pub booted_before: bool,
}

/// The effective configuration facts that reports show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Effective {
    #[serde(flatten)]
    pub outcome: UserOutcome,
    pub set_passwords_runs: bool,
    pub sshd: Option<sshd::Decision>,
}

/// What an instance booted from the files will do about one user's password login: cloud-init's
/// merged configuration and what it sets, then sshd's configuration as cloud-init leaves it. The one
/// derivation that `customize`'s checks, `inspect`'s analysis and the shadow route's warning share.
pub struct Login {
    pub merged: Mapping,
    pub outcome: UserOutcome,
    pub set_passwords_runs: bool,
    /// sshd's files once cloud-init has applied `ssh_pwauth`; `None` without sshd.
    pub sshd_after: Option<sshd::Files>,
}

/// `user` is the one whose password matters (`""`: none; the outcome's `expire` and `ssh_pwauth` do
/// not depend on it).
pub fn login(
    files: &[ConfigFile],
    version: CloudInitVersion,
    user: &str,
    default_user: Option<&str>,
    sshd: Option<&sshd::Files>,
) -> Login {
    let merged = merge::effective(files);
    let outcome = credentials::outcome(&merged, version, user, default_user);
    let set_passwords_runs = credentials::runs_set_passwords(&merged);
    let sshd_after = sshd.map(|files| sshd::after_cloud_init(files, outcome.ssh_pwauth, version));
    Login { merged, outcome, set_passwords_runs, sshd_after }
}

impl Login {
    /// sshd's decision about passwords once cloud-init has acted.
    pub fn sshd_decision(&self) -> Option<sshd::Decision> {
        self.sshd_after.as_ref().map(sshd::password_authentication)
    }
}

pub fn check(image: &Image, intent: &Intent) -> (Effective, Vec<Finding>) {
    let login = login(image.files, image.version, intent.user, image.default_user, image.sshd);
    let sshd_decision = login.sshd_decision();
    let Login { merged, outcome, set_passwords_runs, .. } = login;
    let mut findings = overridden_findings(image, intent, &outcome);
    if intent.password && !set_passwords_runs {
        findings.push(Finding {
            severity: Severity::Error,
            message: "cloud-init's set_passwords module is in none of the module lists, so no password would be set"
                .into(),
            fix: "add `- set_passwords` to `cloud_config_modules` in /etc/cloud/cloud.cfg".into(),
        });
    }
    findings.extend(sshd_findings(image, intent, &outcome, sshd_decision.as_ref()));
    if image.booted_before {
        findings.push(Finding {
            severity: Severity::Warning,
            message: "the image has been booted before (/var/lib/cloud holds instance state): cloud-init will not run set_passwords again for that same instance, only for new ones".into(),
            fix: "pass --clean-instance-state to clear it, as `cloud-init clean` would".into(),
        });
    }
    if intent.user == "root" {
        findings.extend(root_findings(image, intent, &merged));
    }
    if intent.password
        && outcome.password_key != Some("password")
        && merged.get("password").is_some_and(|v| v.is_truthy())
        && image.default_user == Some(intent.user)
    {
        let file = overridden(image, intent, &["password"]).unwrap_or_else(|| intent.target.to_string());
        findings.push(Finding {
            severity: Severity::Warning,
            message: format!(
                "{file} still has a top-level `password`, which cloud-init ignores because `chpasswd` lists passwords"
            ),
            fix: format!("remove `password` from {file}"),
        });
    }
    (Effective { outcome, set_passwords_runs, sshd: sshd_decision }, findings)
}

/// The file other than the edited one whose value of `path` cloud-init uses, if any.
fn overridden(image: &Image, intent: &Intent, path: &[&str]) -> Option<String> {
    merge::deciding_file(image.files, path).filter(|f| f.path != intent.target).map(|f| f.path.clone())
}

/// How to get past `culprit`'s `key`: a drop-in read after it, or removing the key.
fn fix_for(intent: &Intent, culprit: &str, key: &str) -> String {
    if intent.target != DROP_IN && culprit < DROP_IN {
        format!("use --drop-in, which writes {DROP_IN}, read after {culprit}")
    } else {
        format!("remove `{key}` from {culprit}")
    }
}

/// Where another file's password, `chpasswd.expire` or `ssh_pwauth` wins over the edit.
fn overridden_findings(image: &Image, intent: &Intent, outcome: &UserOutcome) -> Vec<Finding> {
    let overridden = |path: &[&str]| overridden(image, intent, path);
    let fix_for = |culprit: &str, key: &str| fix_for(intent, culprit, key);
    let mut findings = Vec::new();
    match &outcome.password {
        _ if !intent.password => {}
        Some(stored) if (intent.is_ours)(stored) => {}
        _ => {
            let key = outcome.password_key.unwrap_or("password");
            let path: Vec<&str> = key.split('.').collect();
            let (message, fix) = match overridden(&path) {
                Some(culprit) => (
                    format!("cloud-init would not set this password: {culprit} sets `{key}`, which takes precedence"),
                    fix_for(&culprit, key),
                ),
                None => (
                    format!(
                        "cloud-init {} would not set this password for `{}` (it would use `{key}`)",
                        image.version, intent.user
                    ),
                    "report this image layout as a cloudimg bug".to_string(),
                ),
            };
            findings.push(Finding { severity: Severity::Error, message, fix });
        }
    }
    if intent.password && outcome.expire != intent.expire {
        let culprit = overridden(&["chpasswd", "expire"]).unwrap_or_else(|| intent.target.to_string());
        findings.push(Finding {
            severity: Severity::Error,
            message: format!("{culprit} sets `chpasswd.expire: {}`, which wins over this edit", outcome.expire),
            fix: fix_for(&culprit, "chpasswd.expire"),
        });
    }
    if let Some(wanted) = intent.ssh_pwauth {
        if outcome.ssh_pwauth != Some(wanted) {
            let culprit = overridden(&["ssh_pwauth"]).unwrap_or_else(|| intent.target.to_string());
            findings.push(Finding {
                severity: Severity::Error,
                message: format!("{culprit} sets `ssh_pwauth`, which wins over this edit"),
                fix: fix_for(&culprit, "ssh_pwauth"),
            });
        }
    }
    findings
}

/// What sshd, once cloud-init has acted, does with the SSH password login the edit asks for.
fn sshd_findings(
    image: &Image,
    intent: &Intent,
    outcome: &UserOutcome,
    sshd_decision: Option<&sshd::Decision>,
) -> Option<Finding> {
    match (sshd_decision, intent.ssh_pwauth) {
        (None, _) => Some(Finding {
            severity: Severity::Warning,
            message: format!("the image has no {}: the password will work on the console, not over SSH", sshd::MAIN_CONFIG),
            fix: "install openssh-server in the image if you need SSH".into(),
        }),
        // When cloud-init itself would write `no`, the ssh_pwauth finding above already says why.
        (Some(d), Some(true)) if !d.password_authentication && outcome.ssh_pwauth == Some(true) => Some(Finding {
            severity: Severity::Error,
            message: format!(
                "sshd would still refuse passwords: {} sets PasswordAuthentication no and sshd reads it before the setting cloud-init {} writes",
                d.set_by.as_deref().unwrap_or("its configuration"),
                image.version
            ),
            fix: "remove that line from the image, or pass --ssh-pwauth unchanged to accept console-only password login".into(),
        }),
        (Some(d), None) if !d.password_authentication => Some(Finding {
            severity: Severity::Warning,
            message: format!(
                "sshd refuses passwords ({} sets PasswordAuthentication no): the password will work on the console only",
                d.set_by.as_deref().unwrap_or("its configuration")
            ),
            fix: "drop --ssh-pwauth unchanged to let cloud-init enable SSH password login".into(),
        }),
        _ => None,
    }
}

/// What still stops root logging in once its password or keys are set.
fn root_findings(image: &Image, intent: &Intent, merged: &Mapping) -> Vec<Finding> {
    let mut findings = Vec::new();
    if intent.keys && merged.get("disable_root").is_none_or(credentials::is_true_like) {
        findings.push(Finding {
            severity: Severity::Warning,
            message: "cloud-init's disable_root is true: it puts the instance's own key pair (from the metadata) in root's authorized_keys with a command that refuses the login, so root logs in only with keys that are not also the instance's key pair".into(),
            fix: "add `disable_root: false` in a drop-in such as /etc/cloud/cloud.cfg.d/99-root.cfg".into(),
        });
    }
    if let (true, Some(files)) = (intent.password, image.sshd) {
        findings.extend(root_password_finding(files));
    }
    findings
}

/// sshd refusing root's password (OpenSSH's default `PermitRootLogin prohibit-password`).
pub fn root_password_finding(files: &sshd::Files) -> Option<Finding> {
    let root_login = sshd::permit_root_login(files);
    (!root_login.allows_passwords()).then(|| Finding {
        severity: Severity::Warning,
        message: format!(
            "sshd's PermitRootLogin is {} ({}): root's password works on the console, not over SSH",
            root_login.value,
            root_login.set_by.as_deref().unwrap_or("OpenSSH's default")
        ),
        fix: "add `PermitRootLogin yes` before anything else sshd reads, e.g. in /etc/ssh/sshd_config.d/00-root.conf, or log in as the default user and use sudo".into(),
    })
}

/// A password (hash or clear text) in a file that others than root can read on an instance: anyone
/// with a shell there can try to guess it offline. `None` for a file only root reads.
pub fn readable_password_finding(file: &str, mode: u32) -> Option<Finding> {
    let who = match mode {
        m if m & 0o004 != 0 => "every user",
        m if m & 0o040 != 0 => "its group",
        _ => return None,
    };
    Some(Finding {
        severity: Severity::Warning,
        message: format!(
            "{file} holds a password and is readable by {who} on an instance (mode {mode:04o}): anyone with a shell there can try to guess it offline"
        ),
        fix: format!("keep the password where only root reads it: --drop-in writes it to {DROP_IN} with mode 0600"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::credentials::Stored;
    use crate::cloud_config::yaml11::parse;

    fn file(path: &str, text: &str) -> ConfigFile {
        ConfigFile { path: path.into(), root: parse(text).unwrap().root }
    }

    const BASE: &str = "cloud_config_modules: [set-passwords]\nsystem_info: {default_user: {name: debian}}\n";
    const OURS: &str =
        "chpasswd:\n  expire: false\n  users:\n  - {name: debian, password: $6$s$h, type: hash}\nssh_pwauth: true\n";

    fn run(files: &[ConfigFile], sshd_main: Option<&str>, target: &str) -> (Effective, Vec<Finding>) {
        let sshd: Option<sshd::Files> = sshd_main.map(|t| [(sshd::MAIN_CONFIG.to_string(), t.to_string())].into());
        let is_ours = |s: &Stored| s == &Stored::Hash("$6$s$h".into());
        let image = Image {
            files,
            version: "23.4".parse().unwrap(),
            default_user: Some("debian"),
            sshd: sshd.as_ref(),
            booted_before: false,
        };
        let intent = Intent {
            user: "debian",
            password: true,
            keys: false,
            is_ours: &is_ours,
            expire: false,
            ssh_pwauth: Some(true),
            target,
        };
        check(&image, &intent)
    }

    #[test]
    fn a_clean_edit_has_no_findings() {
        let files = [file("/etc/cloud/cloud.cfg", &format!("{BASE}{OURS}"))];
        let (effective, findings) =
            run(&files, Some("Include /etc/ssh/sshd_config.d/*.conf\n"), "/etc/cloud/cloud.cfg");
        assert_eq!(findings, vec![]);
        assert_eq!(effective.outcome.password_kind, "hash");
        assert!(effective.sshd.unwrap().password_authentication);
    }

    #[test]
    fn a_password_readable_by_others_than_root_is_a_finding() {
        let f = readable_password_finding("/etc/cloud/cloud.cfg", 0o644).unwrap();
        assert!(f.message.contains("every user") && f.message.contains("mode 0644"), "{}", f.message);
        assert!(f.fix.contains("--drop-in"));
        assert!(readable_password_finding("/etc/cloud/cloud.cfg", 0o640).unwrap().message.contains("its group"));
        assert_eq!(readable_password_finding(DROP_IN, 0o600), None);
    }

    #[test]
    fn a_later_drop_in_that_overrides_is_an_error_naming_it() {
        let files = [
            file("/etc/cloud/cloud.cfg", &format!("{BASE}{OURS}")),
            file("/etc/cloud/cloud.cfg.d/50-lock.cfg", "ssh_pwauth: false\nchpasswd: {expire: true}\n"),
        ];
        let (_, findings) = run(&files, Some(""), "/etc/cloud/cloud.cfg");
        let errors: Vec<_> =
            findings.iter().filter(|f| f.severity == Severity::Error).map(|f| f.message.as_str()).collect();
        assert_eq!(errors.len(), 2, "{findings:?}");
        assert!(errors.iter().all(|m| m.contains("50-lock.cfg")));
        assert!(findings[0].fix.contains("--drop-in"));
        let (_, findings) = run(&files, Some(""), DROP_IN);
        assert!(
            findings[0].fix.contains("remove `chpasswd.expire` from /etc/cloud/cloud.cfg.d/50-lock.cfg"),
            "{findings:?}"
        );
    }

    #[test]
    fn missing_module_sshd_refusal_and_no_sshd_are_reported() {
        let files = [file("/etc/cloud/cloud.cfg", &format!("system_info: {{default_user: {{name: debian}}}}\n{OURS}"))];
        let (_, findings) = run(&files, Some("Include /etc/ssh/sshd_config.d/*.conf\n"), "/etc/cloud/cloud.cfg");
        assert!(findings.iter().any(|f| f.message.contains("set_passwords module")));
        let files = [file("/etc/cloud/cloud.cfg", &format!("{BASE}{OURS}"))];
        let (_, findings) = run(&files, None, "/etc/cloud/cloud.cfg");
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].severity, Severity::Warning);
    }
}
