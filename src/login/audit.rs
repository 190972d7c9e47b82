//! What an instance booted from an image will do about passwords: the effective cloud-init
//! configuration for every user it names, sshd's decision after cloud-init acts, `/etc/shadow`, and
//! the findings worth reporting. Pure: `inspect` and `customize` feed it what they read.

use crate::cloud_config::credentials;
use crate::cloud_config::deprecations;
use crate::cloud_config::merge::{self, ConfigFile};
use crate::cloud_config::version::{CloudInitVersion, Detection, Found};
use crate::cloud_config::yaml11::{Mapping, Value};
use crate::login::checks::{self, Finding, Severity};
use crate::login::shadow;
use crate::login::sshd;

/// What the image holds, as read.
pub struct Image<'a> {
    /// cloud-init's files, lowest priority first; empty without cloud-init.
    pub files: &'a [ConfigFile],
    /// `None`: no cloud-init in the image (or its version is unknown); else where it was read.
    pub version: Option<Found>,
    /// Sources that give another version than the one used.
    pub version_disagreements: Vec<String>,
    pub sshd: Option<&'a sshd::Files>,
    pub shadow: Option<&'a str>,
    pub booted_before: bool,
    /// The user the caller asks about, whose shadow state is reported too.
    pub user: Option<&'a str>,
}

/// One password cloud-init will set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfiguredPassword {
    pub user: String,
    /// `hash`, `text` (plaintext in the file) or `random`.
    pub kind: String,
    /// The key that carries it, e.g. `chpasswd.users`.
    pub key: String,
    /// The file whose value cloud-init uses.
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CloudInit {
    /// The version and where it was read.
    pub version: Found,
    pub default_user: Option<String>,
    pub set_passwords_runs: bool,
    pub passwords: Vec<ConfiguredPassword>,
    /// `chpasswd.expire` (cloud-init's default: true).
    pub expire: bool,
    /// `true`/`false`, or `None`: cloud-init leaves sshd's setting alone.
    pub ssh_pwauth: Option<bool>,
    /// `disable_root` (default true): root's keys get a command that refuses the login.
    pub disable_root: bool,
    /// What cloud-init will log at WARNING or DEPRECATED level because of these keys.
    pub logged: Vec<deprecations::Logged>,
    /// Whether `cloud-init status` will end `degraded` (exit 2) because of them (23.4 and later).
    pub degraded: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sshd {
    /// `PasswordAuthentication` as sshd will read it once cloud-init has acted.
    pub password_authentication: sshd::Decision,
    pub permit_root_login: sshd::RootLogin,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Analysis {
    pub cloud_init: Option<CloudInit>,
    pub sshd: Option<Sshd>,
    /// The shadow state of the users that matter (the configured ones, root, and the one asked about).
    pub shadow: Vec<(String, shadow::State)>,
    pub booted_before: bool,
    pub findings: Vec<Finding>,
}

/// Whether an instance from the image accepts an SSH password login for one user, and why not.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Login {
    pub user: Option<String>,
    pub works: bool,
    pub reasons: Vec<String>,
}

pub fn analyse(image: &Image) -> Analysis {
    let login = image.version.as_ref().map(|found| checks::login(image.files, found.version, "", None, image.sshd));
    let mut findings: Vec<Finding> = image
        .version_disagreements
        .iter()
        .map(|message| Finding {
            severity: Severity::Warning,
            message: message.clone(),
            fix: Detection::DISAGREEMENT_FIX.into(),
        })
        .collect();
    let cloud_init = image.version.clone().zip(login.as_ref()).map(|(found, login)| {
        let version = found.version;
        let merged = &login.merged;
        let default_user = credentials::default_user(merged);
        let passwords = configured_passwords(image.files, merged, version, default_user.as_deref());
        let logged = deprecations::logged(image.files, version, &|name| shadow::account(image.shadow, name));
        CloudInit {
            version: found,
            set_passwords_runs: login.set_passwords_runs,
            passwords,
            expire: login.outcome.expire,
            ssh_pwauth: login.outcome.ssh_pwauth,
            disable_root: merged.get("disable_root").is_none_or(credentials::is_true_like),
            degraded: !logged.is_empty() && version >= deprecations::DEGRADES_STATUS,
            logged,
            default_user,
        }
    });
    if let Some(ci) = &cloud_init {
        findings.extend(ci.logged.iter().map(|l| checks::logged_finding(l, ci.version.version)));
        for p in ci.passwords.iter().filter(|p| p.kind == "text") {
            findings.push(Finding {
                severity: Severity::Security,
                message: format!("{} gives `{}` a plaintext password in `{}`", p.file, p.user, p.key),
                fix: "store a hash instead: `cloudimg customize` writes SHA-512 hashes".into(),
            });
        }
        if !ci.passwords.is_empty() && !ci.set_passwords_runs {
            findings.push(Finding {
                severity: Severity::Warning,
                message: "passwords are configured but set_passwords is in none of cloud-init's module lists".into(),
                fix: "add `- set_passwords` to `cloud_config_modules`".into(),
            });
        }
    }
    // Without cloud-init, sshd reads its files as they are.
    let sshd_after = login.and_then(|l| l.sshd_after).or_else(|| image.sshd.cloned());
    let sshd = sshd_after.map(|after| Sshd {
        password_authentication: sshd::password_authentication(&after),
        permit_root_login: sshd::permit_root_login(&after),
    });
    if image.booted_before {
        findings.push(Finding {
            severity: Severity::Info,
            message: "the image was booted before (/var/lib/cloud holds instance state): booting this disk again as the same instance does not rerun cloud-init's per-instance modules such as set_passwords; a new instance from it does".into(),
            fix: "`cloudimg customize --clean-instance-state` clears it; `--method shadow` sets a password that works either way".into(),
        });
    }
    let shadow = image
        .shadow
        .map(|text| {
            users_that_matter(image.user, cloud_init.as_ref()).map(|u| (u.clone(), shadow::state(text, &u))).collect()
        })
        .unwrap_or_default();
    Analysis { cloud_init, sshd, shadow, booted_before: image.booted_before, findings }
}

/// root, the user asked about, cloud-init's default user and every user it sets a password for; each
/// once, in that order.
fn users_that_matter(asked: Option<&str>, cloud_init: Option<&CloudInit>) -> impl Iterator<Item = String> {
    let mut users: Vec<String> = vec!["root".into()];
    users.extend(asked.map(str::to_string));
    if let Some(ci) = cloud_init {
        users.extend(ci.default_user.iter().cloned());
        users.extend(ci.passwords.iter().map(|p| p.user.clone()));
    }
    let mut seen = std::collections::BTreeSet::new();
    users.into_iter().filter(move |u| seen.insert(u.clone()))
}

/// Every password cloud-init would set, for any user: `set_passwords` (chpasswd, top-level
/// `password`) and users-groups (`passwd`, `hashed_passwd`, `plain_text_passwd` in `users`).
fn configured_passwords(
    files: &[ConfigFile],
    merged: &Mapping,
    version: CloudInitVersion,
    default_user: Option<&str>,
) -> Vec<ConfiguredPassword> {
    let mut names: Vec<String> = default_user.map(str::to_string).into_iter().collect();
    if let Some(Value::Seq(users)) = merge::lookup(merged, &["chpasswd", "users"]) {
        names.extend(users.iter().filter_map(|u| u.as_map()?.get("name")?.as_str().map(str::to_string)));
    }
    let list_lines: Vec<String> = match merge::lookup(merged, &["chpasswd", "list"]) {
        Some(Value::Str(s)) => s.lines().map(str::to_string).collect(),
        Some(Value::Seq(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    names.extend(list_lines.iter().filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string())));
    let mut out: Vec<ConfiguredPassword> = Vec::new();
    for name in names {
        if out.iter().any(|p| p.user == name) {
            continue;
        }
        let outcome = credentials::outcome(merged, version, &name, default_user);
        if let Some(key) = outcome.password_key {
            let path: Vec<&str> = key.split('.').collect();
            let file = merge::deciding_file(files, &path).map(|f| f.path.clone()).unwrap_or_default();
            out.push(ConfiguredPassword { user: name, kind: outcome.password_kind.into(), key: key.into(), file });
        }
    }
    let decider = merge::deciding_file(files, &["users"]).map(|f| f.path.clone()).unwrap_or_default();
    if let Some(Value::Seq(users)) = merged.get("users") {
        for user in users.iter().filter_map(Value::as_map) {
            let Some(name) = user.get("name").and_then(Value::as_str) else { continue };
            for (key, kind) in [("plain_text_passwd", "text"), ("hashed_passwd", "hash"), ("passwd", "hash")] {
                if user.get(key).is_some_and(Value::is_truthy) {
                    out.push(ConfiguredPassword {
                        user: name.into(),
                        kind: kind.into(),
                        key: format!("users[{name}].{key}"),
                        file: decider.clone(),
                    });
                    break;
                }
            }
        }
    }
    out
}

/// Whether an instance from this image will accept an SSH password login as `user` (default: the
/// cloud-init default user).
pub fn password_login(analysis: &Analysis, user: Option<&str>) -> Login {
    let mut reasons = Vec::new();
    let default_user = analysis.cloud_init.as_ref().and_then(|c| c.default_user.clone());
    let Some(user) = user.map(str::to_string).or(default_user) else {
        return Login {
            user: None,
            works: false,
            reasons: vec!["no user named and cloud-init creates no default user".into()],
        };
    };
    let from_cloud_init = analysis.cloud_init.as_ref().and_then(|ci| {
        ci.passwords.iter().find(|p| p.user == user).map(|p| (p, ci.set_passwords_runs || p.key.starts_with("users[")))
    });
    let shadow = analysis.shadow.iter().find(|(u, _)| *u == user).map(|(_, s)| s.clone());
    match (from_cloud_init, shadow) {
        (Some((p, true)), _) if p.kind != "random" => {}
        (Some((p, true)), _) => {
            reasons.push(format!("cloud-init gives `{user}` a random password ({} in {})", p.key, p.file))
        }
        (Some((p, false)), _) => {
            reasons.push(format!("{} sets a password for `{user}`, but set_passwords never runs", p.file))
        }
        (None, Some(shadow::State::Hash(_))) => {}
        (None, _) => {
            reasons.push(format!("nothing sets a password for `{user}` (cloud-init configuration or /etc/shadow)"))
        }
    }
    match &analysis.sshd {
        None => reasons.push("the image has no sshd configuration (no SSH server)".into()),
        Some(s) => {
            if !s.password_authentication.password_authentication {
                reasons.push(format!(
                    "sshd refuses passwords: {} sets PasswordAuthentication no",
                    s.password_authentication.set_by.as_deref().unwrap_or("its configuration")
                ));
            }
            if user == "root" && !s.permit_root_login.allows_passwords() {
                reasons.push(format!(
                    "sshd refuses root passwords: PermitRootLogin {} ({})",
                    s.permit_root_login.value,
                    s.permit_root_login.set_by.as_deref().unwrap_or("OpenSSH's default")
                ));
            }
        }
    }
    Login { user: Some(user), works: reasons.is_empty(), reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    fn file(path: &str, text: &str) -> ConfigFile {
        ConfigFile { path: path.into(), root: parse(text).unwrap().root }
    }

    fn found(version: &str) -> Found {
        Found {
            version: version.parse().unwrap(),
            source: crate::cloud_config::version::Source::CommandLine,
            path: "the command line".into(),
            raw: version.into(),
        }
    }

    const BASE: &str = "cloud_config_modules: [set_passwords]\nsystem_info: {default_user: {name: debian}}\n";
    const SSHD: &str = "Include /etc/ssh/sshd_config.d/*.conf\n";

    fn image<'a>(files: &'a [ConfigFile], sshd: Option<&'a sshd::Files>, shadow: Option<&'a str>) -> Image<'a> {
        Image {
            files,
            version: Some(found("23.4")),
            version_disagreements: Vec::new(),
            sshd,
            shadow,
            booted_before: false,
            user: None,
        }
    }

    #[test]
    fn plaintext_passwords_are_found_with_their_file_and_key_but_not_their_value() {
        let files = [
            file(
                "/etc/cloud/cloud.cfg",
                &format!("{BASE}users: [default, {{name: ops, plain_text_passwd: hunter2}}]\n"),
            ),
            file(
                "/etc/cloud/cloud.cfg.d/50-pw.cfg",
                "chpasswd: {users: [{name: debian, password: s3cret, type: text}]}\nssh_pwauth: true\n",
            ),
        ];
        let a = analyse(&image(&files, None, None));
        let ci = a.cloud_init.as_ref().unwrap();
        assert_eq!(ci.passwords.len(), 2, "{:?}", ci.passwords);
        assert_eq!(
            (ci.passwords[0].kind.as_str(), ci.passwords[0].file.as_str()),
            ("text", "/etc/cloud/cloud.cfg.d/50-pw.cfg")
        );
        assert_eq!(ci.passwords[1].key, "users[ops].plain_text_passwd");
        let security: Vec<_> = a.findings.iter().filter(|f| f.severity == Severity::Security).collect();
        assert_eq!(security.len(), 2);
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains("hunter2") && !json.contains("s3cret"), "{json}");
    }

    #[test]
    fn password_login_needs_a_password_and_an_sshd_that_takes_it() {
        let sshd: sshd::Files = [(sshd::MAIN_CONFIG.to_string(), format!("{SSHD}PasswordAuthentication no\n"))].into();
        let stock = [file("/etc/cloud/cloud.cfg", BASE)];
        let login = password_login(&analyse(&image(&stock, Some(&sshd), None)), None);
        assert!(!login.works);
        assert_eq!(login.reasons.len(), 2, "{:?}", login.reasons);

        let set = [file(
            "/etc/cloud/cloud.cfg",
            &format!("{BASE}chpasswd: {{users: [{{name: debian, password: $6$a$b}}]}}\nssh_pwauth: true\n"),
        )];
        let login = password_login(&analyse(&image(&set, Some(&sshd), None)), None);
        assert!(login.works, "cloud-init 23.4 writes its drop-in, read first: {:?}", login.reasons);
        let root = password_login(&analyse(&image(&set, Some(&sshd), Some("root:$6$a$b:1::::::\n"))), Some("root"));
        assert!(!root.works);
        assert!(root.reasons[0].contains("PermitRootLogin prohibit-password"), "{:?}", root.reasons);
    }

    #[test]
    fn inspect_and_customize_read_the_same_login_from_the_same_files() {
        let sshd_files: sshd::Files = [
            (sshd::MAIN_CONFIG.to_string(), format!("{SSHD}PasswordAuthentication no\n")),
            ("/etc/ssh/sshd_config.d/60-site.conf".to_string(), "PasswordAuthentication no\n".to_string()),
        ]
        .into();
        let variants = [
            "chpasswd: {expire: false, users: [{name: debian, password: $6$a$b}]}\nssh_pwauth: true\n",
            "chpasswd: {expire: true}\nssh_pwauth: false\n",
            "ssh_pwauth: true\n",
            "password: $6$a$b\n",
        ];
        let mut sshd_answers = std::collections::BTreeSet::new();
        for version in ["22.4.2", "23.4", "26.2"] {
            for extra in variants {
                let files = [file("/etc/cloud/cloud.cfg", &format!("{BASE}{extra}"))];
                for sshd in [None, Some(&sshd_files)] {
                    let inspected = analyse(&Image { version: Some(found(version)), ..image(&files, sshd, None) });
                    let (customize_view, _) = checks::check(
                        &checks::Image {
                            files: &files,
                            version: version.parse().unwrap(),
                            default_user: Some("debian"),
                            sshd,
                            booted_before: false,
                        },
                        &checks::Intent {
                            user: "debian",
                            password: false,
                            keys: false,
                            is_ours: &|_| false,
                            expire: false,
                            ssh_pwauth: None,
                            target: "/etc/cloud/cloud.cfg",
                        },
                    );
                    let ci = inspected.cloud_init.as_ref().unwrap();
                    let case = format!("cloud-init {version}, `{extra}`, sshd {}", sshd.is_some());
                    assert_eq!(ci.expire, customize_view.outcome.expire, "{case}");
                    assert_eq!(ci.ssh_pwauth, customize_view.outcome.ssh_pwauth, "{case}");
                    assert_eq!(ci.set_passwords_runs, customize_view.set_passwords_runs, "{case}");
                    assert_eq!(inspected.sshd.map(|s| s.password_authentication), customize_view.sshd, "{case}");
                    sshd_answers.extend(customize_view.sshd.map(|d| d.password_authentication));
                }
            }
        }
        assert_eq!(sshd_answers.len(), 2, "the cases make sshd both take and refuse passwords");
    }

    #[test]
    fn real_distribution_files_analyse_as_their_images_behave() {
        let cfg = |name: &str| {
            let text = std::fs::read_to_string(format!("fixtures/cloud-cfg/{name}.cloud.cfg")).unwrap();
            [file("/etc/cloud/cloud.cfg", &text)]
        };
        let ubuntu_sshd: sshd::Files = [
            (sshd::MAIN_CONFIG.to_string(), format!("{SSHD}KbdInteractiveAuthentication no\n")),
            ("/etc/ssh/sshd_config.d/60-cloudimg-settings.conf".to_string(), "PasswordAuthentication no\n".to_string()),
        ]
        .into();
        let cases = [
            ("debian-12-22.4.2", "22.4.2", "debian", None, true),
            ("ubuntu-26", "24.4.1", "ubuntu", None, false),
            ("rocky-26", "23.4", "rocky", Some(false), false),
        ];
        for (name, version, user, ssh_pwauth, sshd_yes) in cases {
            let files = cfg(name);
            let debian_sshd: sshd::Files = [(sshd::MAIN_CONFIG.to_string(), SSHD.to_string())].into();
            let sshd = if name.starts_with("ubuntu") { &ubuntu_sshd } else { &debian_sshd };
            let mut rocky_sshd = debian_sshd.clone();
            rocky_sshd.insert(sshd::MAIN_CONFIG.into(), format!("{SSHD}PasswordAuthentication no\n"));
            let sshd = if name.starts_with("rocky") { &rocky_sshd } else { sshd };
            let a = analyse(&Image {
                files: &files,
                version: Some(found(version)),
                version_disagreements: Vec::new(),
                sshd: Some(sshd),
                shadow: None,
                booted_before: false,
                user: None,
            });
            let ci = a.cloud_init.as_ref().unwrap();
            assert_eq!(ci.default_user.as_deref(), Some(user), "{name}");
            assert!(ci.set_passwords_runs && ci.disable_root && ci.expire, "{name}");
            assert_eq!(ci.passwords, vec![], "{name}: stock images set no password");
            assert_eq!(ci.ssh_pwauth, ssh_pwauth, "{name}");
            let decision = &a.sshd.as_ref().unwrap().password_authentication;
            assert_eq!(decision.password_authentication, sshd_yes, "{name}: {decision:?}");
            let login = password_login(&a, None);
            assert!(!login.works && login.reasons[0].contains("nothing sets a password"), "{name}: {login:?}");
        }
    }

    #[test]
    fn without_cloud_init_the_shadow_file_decides() {
        let sshd: sshd::Files = [(sshd::MAIN_CONFIG.to_string(), String::new())].into();
        let img = Image {
            files: &[],
            version: None,
            version_disagreements: Vec::new(),
            sshd: Some(&sshd),
            shadow: Some("ops:$y$j9T$a$b:1::::::\n"),
            booted_before: true,
            user: Some("ops"),
        };
        let a = analyse(&img);
        assert!(a.cloud_init.is_none());
        assert!(password_login(&a, Some("ops")).works);
        assert!(!password_login(&a, None).works);
        assert!(a.findings.iter().any(|f| f.severity == Severity::Info));
    }
}
