//! The whole decision, without touching the image: which user, which entries in which file, the new
//! text, and what cloud-init and sshd will make of it.

use anyhow::{Context, Result};

use crate::cloud_config::credentials::{self, Form, Stored};
use crate::cloud_config::deprecations::{self, Account};
use crate::cloud_config::merge::{self, ConfigFile};
use crate::cloud_config::version::CloudInitVersion;
use crate::cloud_config::yaml11::Value;
use crate::cloud_config::CloudFile;
use crate::cloud_config::{edit, keys, secrets, yaml11};
use crate::login::checks::{self, Effective, Finding, Intent};
use crate::login::shadow;
use crate::login::sshd;
use crate::support::exit_codes::{with_code, BAD_GUEST};

/// What was read from the image.
pub struct Facts<'a> {
    /// cloud-init's files from lowest to highest priority (`cloud.cfg` first).
    pub files: &'a [CloudFile],
    pub version: CloudInitVersion,
    pub passwd_users: &'a [String],
    pub sshd: Option<&'a sshd::Files>,
    /// `/etc/shadow`, when the image has one: whether an account has a password to keep usable.
    pub shadow: Option<&'a str>,
    pub booted_before: bool,
}

/// What the user asked for, with the password already in its stored form.
pub struct Request<'a> {
    pub user: Option<&'a str>,
    /// `None`: no password, only keys or `ssh_pwauth`.
    pub stored: Option<Stored>,
    /// Validated public key lines for the user.
    pub ssh_keys: &'a [String],
    /// Whether an existing value already stands for the password (keeps salted hashes stable).
    pub already_set: &'a dyn Fn(&str) -> bool,
    pub expire: bool,
    pub ssh_pwauth: Option<bool>,
    /// The file to edit.
    pub target: &'a str,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub user: String,
    /// `None` when no password is set.
    pub form: Option<Form>,
    pub target: String,
    /// `None` when the target file does not exist yet.
    pub old_text: Option<String>,
    pub new_text: String,
    /// The old and new texts with every password masked, for diffs.
    masked_old: String,
    masked_new: String,
    /// Whether the new text holds a password (its own or another user's).
    pub holds_secret: bool,
    pub changed_keys: Vec<String>,
    pub effective: Effective,
    /// What cloud-init will log at WARNING or DEPRECATED level with the edited files.
    pub logged: Vec<deprecations::Logged>,
    pub findings: Vec<Finding>,
}

const DROP_IN_HEADER: &str = "# Written by cloudimg: password login settings for cloud-init.\n";

impl Plan {
    pub fn changed(&self) -> bool {
        !self.changed_keys.is_empty()
    }

    /// A unified diff of the target file, with every password masked.
    pub fn masked_diff(&self) -> String {
        similar::TextDiff::from_lines(&self.masked_old, &self.masked_new)
            .unified_diff()
            .header(&format!("a{}", self.target), &format!("b{}", self.target))
            .to_string()
    }
}

pub fn plan(facts: &Facts, req: &Request) -> Result<Plan> {
    let parsed: Vec<ConfigFile> = facts.files.iter().map(|f| f.parsed.clone()).collect();
    let before = merge::effective(&parsed);
    let default_user = credentials::default_user(&before);
    let user = chosen_user(facts, req, default_user.as_deref(), &before)?;

    let target_index = facts.files.iter().position(|f| f.path == req.target);
    let old_text = target_index.map(|i| facts.files[i].text.clone());
    let base_text = old_text.clone().unwrap_or_else(|| DROP_IN_HEADER.to_string());
    let target_root = target_index.map(|i| facts.files[i].parsed.root.clone()).unwrap_or_default();
    // Files are in priority order, which is path order: those before the target rank below it.
    let lower_files: Vec<ConfigFile> = parsed.iter().filter(|f| f.path.as_str() < req.target).cloned().collect();
    let lower = merge::effective(&lower_files);

    let is_default_user = default_user.as_deref() == Some(user.as_str());
    let (form, entries) = entries(facts, req, &user, is_default_user, &target_root, &lower)?;
    let edited = edit::set_top_level(&base_text, &entries)
        .with_context(|| format!("editing {} in the guest", req.target))
        .map_err(with_code(BAD_GUEST))?;

    let new_parsed = ConfigFile {
        path: req.target.to_string(),
        root: yaml11::parse(&edited.text).context("re-reading the edited text")?.root,
    };
    let ours = req.stored.as_ref().map(|stored| match stored {
        Stored::Hash(text) | Stored::Plain(text) => text.as_str(),
    });
    let masked_old = old_text.as_deref().map_or(String::new(), |old| secrets::masked_text(old, ours));
    let masked_new = secrets::masked_text(&edited.text, ours);
    let holds_secret = secrets::holds_secret(&new_parsed.root);
    let mut after: Vec<ConfigFile> = parsed.iter().filter(|f| f.path != req.target).cloned().collect();
    after.push(new_parsed);
    merge::sort_by_priority(&mut after);
    let (effective, mut findings) = check_after(facts, req, &after, default_user.as_deref(), &user);
    let logged = deprecations::logged(&after, facts.version, &|name| shadow::account(facts.shadow, name));
    findings.extend(logged.iter().map(|l| checks::logged_finding(l, facts.version)));
    Ok(Plan {
        user,
        form,
        target: req.target.to_string(),
        old_text,
        new_text: edited.text,
        masked_old,
        masked_new,
        holds_secret,
        changed_keys: edited.changed_keys,
        effective,
        logged,
        findings,
    })
}

/// The user asked for, or cloud-init's default user; one that the image or cloud-init creates.
fn chosen_user(facts: &Facts, req: &Request, default_user: Option<&str>, before: &yaml11::Mapping) -> Result<String> {
    let user = match (req.user, default_user) {
        (Some(u), _) => u.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
                "the image's cloud-init configuration creates no default user (system_info.default_user); name the user with --user"
            )))
        }
    };
    let created_by_cloud_init = default_user == Some(user.as_str()) || configured_users(before).any(|u| u == user);
    if !created_by_cloud_init && !facts.passwd_users.contains(&user) {
        return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
            "user `{user}` exists neither in the image's /etc/passwd nor in its cloud-init `users`"
        )));
    }
    Ok(user)
}

/// A top-level key of the target file and the value it gets.
type Entry = (String, Value);

/// The top-level entries the target file gets: the password's (or `ssh_pwauth` alone), then the keys'.
fn entries(
    facts: &Facts,
    req: &Request,
    user: &str,
    is_default_user: bool,
    target_root: &yaml11::Mapping,
    lower: &yaml11::Mapping,
) -> Result<(Option<Form>, Vec<Entry>)> {
    let (form, mut entries) = match req.stored.clone() {
        Some(stored) => {
            let creq = credentials::Request {
                user,
                default_user: is_default_user,
                stored,
                already_set: req.already_set,
                expire: req.expire,
                ssh_pwauth: req.ssh_pwauth,
            };
            let (form, entries) =
                credentials::entries(target_root, lower, facts.version, &creq).map_err(with_code(BAD_GUEST))?;
            (Some(form), entries)
        }
        None => (None, req.ssh_pwauth.map(|on| ("ssh_pwauth".to_string(), Value::Bool(on))).into_iter().collect()),
    };
    if !req.ssh_keys.is_empty() {
        let account = match &req.stored {
            Some(stored) => keys::Account::Password { stored, already_set: req.already_set },
            None if shadow::account(facts.shadow, user) == Account::WithPassword => keys::Account::KeepPassword,
            None => keys::Account::Locked,
        };
        entries.extend(
            keys::entries(target_root, lower, user, is_default_user, req.ssh_keys, account)
                .map_err(with_code(BAD_GUEST))?,
        );
    }
    Ok((form, entries))
}

/// The checks of the login on the files as they will be after the edit.
fn check_after(
    facts: &Facts,
    req: &Request,
    after: &[ConfigFile],
    default_user: Option<&str>,
    user: &str,
) -> (Effective, Vec<Finding>) {
    let is_ours = |stored: &Stored| match (stored, &req.stored) {
        (Stored::Hash(t), Some(Stored::Hash(_))) | (Stored::Plain(t), Some(Stored::Plain(_))) => {
            (req.already_set)(t) || Some(stored) == req.stored.as_ref()
        }
        _ => false,
    };
    checks::check(
        &checks::Image {
            files: after,
            version: facts.version,
            default_user,
            sshd: facts.sshd,
            booted_before: facts.booted_before,
        },
        &Intent {
            user,
            password: req.stored.is_some(),
            keys: !req.ssh_keys.is_empty(),
            is_ours: &is_ours,
            expire: req.expire,
            ssh_pwauth: req.ssh_pwauth,
            target: req.target,
        },
    )
}

/// Names of users that cloud-config's `users` creates.
fn configured_users(cfg: &yaml11::Mapping) -> impl Iterator<Item = String> + '_ {
    let items = match cfg.get("users") {
        Some(yaml11::Value::Seq(items)) => items.as_slice(),
        _ => &[],
    };
    items.iter().filter_map(|u| match u {
        yaml11::Value::Str(name) if name != "default" => Some(name.clone()),
        yaml11::Value::Map(m) => m.get("name").and_then(yaml11::Value::as_str).map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::parse_file;
    use crate::cloud_config::{CLOUD_CFG, DROP_IN};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINcBP2Hlv715+49uDDvU+ZdmzRat/4M9S78A5XhQM7FV alice@laptop";
    /// `ops` exists with a password, `nopw` exists locked, `alice` is new.
    const SHADOW: &str = "root:*:19000::::::\nops:$6$a$b:19000::::::\nnopw:!:19000::::::\n";

    /// What cloudimg writes makes the image's own cloud-init log no WARNING or DEPRECATED line, in
    /// every release line it supports and for every kind of request, on each distribution's file.
    #[test]
    fn what_cloudimg_writes_is_never_reported_by_that_cloud_init() {
        let versions = [
            "0.7.5", "17.1", "18.5", "21.4", "22.1", "22.2", "22.3", "22.4.2", "23.4", "24.1", "24.3", "25.1.4", "26.2",
        ];
        let passwd: Vec<String> = ["root", "ops", "nopw"].iter().map(|u| u.to_string()).collect();
        let keys = vec![KEY.to_string()];
        let never = |_: &str| false;
        let mut checked = 0;
        for name in ["debian-12-22.4.2", "ubuntu-26", "rocky-26"] {
            let cfg = std::fs::read_to_string(format!("fixtures/cloud-cfg/{name}.cloud.cfg")).unwrap();
            let files = vec![parse_file(CLOUD_CFG, cfg).unwrap()];
            for version in versions {
                let version: CloudInitVersion = version.parse().unwrap();
                let plain = version < CloudInitVersion::HASHES;
                let stored = if plain { Stored::Plain("pw".into()) } else { Stored::Hash("$6$salt$hash".into()) };
                let requests: [(Option<&str>, bool, &[String]); 7] = [
                    (None, true, &[]),
                    (None, true, &keys),
                    (None, false, &keys),
                    (Some("ops"), true, &keys),
                    (Some("nopw"), false, &keys),
                    (Some("nopw"), true, &keys),
                    (Some("alice"), true, &keys),
                ];
                for (user, with_password, ssh_keys) in requests {
                    for target in [CLOUD_CFG, DROP_IN] {
                        let facts = Facts {
                            files: &files,
                            version,
                            passwd_users: &passwd,
                            sshd: None,
                            shadow: Some(SHADOW),
                            booted_before: false,
                        };
                        let request = Request {
                            user,
                            stored: with_password.then(|| stored.clone()),
                            ssh_keys,
                            already_set: &never,
                            expire: false,
                            ssh_pwauth: Some(true),
                            target,
                        };
                        let what = format!(
                            "{name} {version} {user:?} password={with_password} keys={} {target}",
                            ssh_keys.len()
                        );
                        let planned = match (plan(&facts, &request), user) {
                            (Ok(planned), _) => planned,
                            // `alice` is neither in /etc/passwd nor created by cloud-init: refused, as it must be.
                            (Err(e), Some("alice")) if e.to_string().contains("exists neither") => continue,
                            (Err(e), _) => panic!("{what}: {e:#}"),
                        };
                        assert_eq!(planned.logged, Vec::new(), "{what}:\n{}", planned.new_text);
                        checked += 1;
                    }
                }
            }
        }
        // Every combination but the refused user was planned and judged.
        assert_eq!(checked, 3 * 13 * 6 * 2);
    }

    const BASE: &str = "cloud_config_modules: [set_passwords]\nsystem_info: {default_user: {name: debian}}\n";

    fn plan_for(old: &str, stored: Stored, already_set: &dyn Fn(&str) -> bool) -> Plan {
        let files = [parse_file("/etc/cloud/cloud.cfg", format!("{BASE}{old}")).unwrap()];
        let facts = Facts {
            files: &files,
            version: "23.1".parse().unwrap(),
            passwd_users: &[],
            sshd: None,
            shadow: None,
            booted_before: false,
        };
        let request = Request {
            user: None,
            stored: Some(stored),
            ssh_keys: &[],
            already_set,
            expire: false,
            ssh_pwauth: None,
            target: "/etc/cloud/cloud.cfg",
        };
        plan(&facts, &request).unwrap()
    }

    #[test]
    fn the_diff_shows_no_password_whatever_put_it_in_the_text() {
        // An entry that already stands for the password is kept, and the block is re-rendered around it
        // (expire changes) with another user's clear text in it.
        let kept = "$6$kept$KEPTHASHKEPTHASHKEPT";
        let old = format!(
            "chpasswd:\n  expire: true\n  users:\n  - {{name: debian, password: {kept}, type: hash}}\n  - {{name: ops, password: opspass, type: text}}\n"
        );
        let p = plan_for(&old, Stored::Hash("$6$new$NEWHASHNEWHASHNEW".into()), &|t| t == kept);
        assert!(p.new_text.contains(kept), "the matching entry is kept: {}", p.new_text);
        let diff = p.masked_diff();
        assert!(diff.contains("+  expire: false"), "{diff}");
        for secret in ["KEPTHASH", "opspass", "NEWHASH"] {
            assert!(!diff.contains(secret), "{secret} in:\n{diff}");
        }
        assert!(p.holds_secret);

        // --plaintext, with the same clear text already there.
        let old = "chpasswd:\n  expire: true\n  users:\n  - {name: debian, password: correct horse, type: text}\n";
        let p = plan_for(old, Stored::Plain("correct horse".into()), &|t| t == "correct horse");
        let diff = p.masked_diff();
        assert!(diff.contains("+  expire: false") && !diff.contains("correct horse"), "{diff}");

        // A replaced password shows as a change of mask.
        let old = format!("chpasswd:\n  users: [{{name: debian, password: {kept}}}]\n");
        let p = plan_for(&old, Stored::Hash("$6$new$NEWHASHNEWHASHNEW".into()), &|_| false);
        let diff = p.masked_diff();
        assert!(diff.contains("-    password: '<hidden>'\n") && diff.contains("+    password: '********'\n"), "{diff}");
        assert!(!diff.contains("KEPTHASH") && !diff.contains("NEWHASH"), "{diff}");
    }
}
