//! The whole decision, without touching the image: which user, which entries in which file, the new
//! text, and what cloud-init and sshd will make of it.

use anyhow::{Context, Result};

use crate::checks::{self, Effective, Finding, Intent};
use crate::cloud_config::credentials::{self, Form, Stored};
use crate::cloud_config::merge::{self, ConfigFile};
use crate::cloud_config::version::CloudInitVersion;
use crate::cloud_config::yaml11::Value;
use crate::cloud_config::{edit, keys, yaml11};
use crate::exit_codes::{with_code, BAD_GUEST};
use crate::guest_config::CloudFile;
use crate::shadow;
use crate::sshd;

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
    /// The new text with the stored password replaced by a mask, for diffs.
    pub masked_text: String,
    pub changed_keys: Vec<String>,
    pub effective: Effective,
    pub findings: Vec<Finding>,
}

const MASK: &str = "********";
const DROP_IN_HEADER: &str = "# Written by cloudimg: password login settings for cloud-init.\n";

impl Plan {
    pub fn changed(&self) -> bool {
        !self.changed_keys.is_empty()
    }

    /// A unified diff of the target file, with the secret masked.
    pub fn masked_diff(&self) -> String {
        let old = self.old_text.as_deref().unwrap_or("");
        similar::TextDiff::from_lines(old, &self.masked_text)
            .unified_diff()
            .header(&format!("a{}", self.target), &format!("b{}", self.target))
            .to_string()
    }
}

pub fn plan(facts: &Facts, req: &Request) -> Result<Plan> {
    let parsed: Vec<ConfigFile> = facts.files.iter().map(|f| f.parsed.clone()).collect();
    let before = merge::effective(&parsed);
    let default_user = credentials::default_user(&before);
    let user = match (req.user, &default_user) {
        (Some(u), _) => u.to_string(),
        (None, Some(d)) => d.clone(),
        (None, None) => {
            return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
                "the image's cloud-init configuration creates no default user (system_info.default_user); name the user with --user"
            )))
        }
    };
    let created_by_cloud_init =
        default_user.as_deref() == Some(user.as_str()) || configured_users(&before).any(|u| u == user);
    if !created_by_cloud_init && !facts.passwd_users.contains(&user) {
        return Err(with_code(BAD_GUEST)(anyhow::anyhow!(
            "user `{user}` exists neither in the image's /etc/passwd nor in its cloud-init `users`"
        )));
    }

    let target_index = facts.files.iter().position(|f| f.path == req.target);
    let old_text = target_index.map(|i| facts.files[i].text.clone());
    let base_text = old_text.clone().unwrap_or_else(|| DROP_IN_HEADER.to_string());
    let target_root = target_index.map(|i| facts.files[i].parsed.root.clone()).unwrap_or_default();
    // Files are in priority order, which is path order: those before the target rank below it.
    let lower_files: Vec<ConfigFile> = parsed.iter().filter(|f| f.path.as_str() < req.target).cloned().collect();
    let lower = merge::effective(&lower_files);

    let is_default_user = default_user.as_deref() == Some(user.as_str());
    let edit_with = |stored: Option<Stored>| -> Result<(Option<Form>, edit::Edited)> {
        let (form, mut entries) = match stored.clone() {
            Some(stored) => {
                let creq = credentials::Request {
                    user: &user,
                    default_user: is_default_user,
                    stored,
                    already_set: req.already_set,
                    expire: req.expire,
                    ssh_pwauth: req.ssh_pwauth,
                };
                let (form, entries) =
                    credentials::entries(&target_root, &lower, facts.version, &creq).map_err(with_code(BAD_GUEST))?;
                (Some(form), entries)
            }
            None => (None, req.ssh_pwauth.map(|on| ("ssh_pwauth".to_string(), Value::Bool(on))).into_iter().collect()),
        };
        if !req.ssh_keys.is_empty() {
            let account = match &stored {
                Some(stored) => keys::Account::Password { stored, already_set: req.already_set },
                None if has_password(facts.shadow, &user) => keys::Account::KeepPassword,
                None => keys::Account::Locked,
            };
            entries.extend(
                keys::entries(&target_root, &lower, &user, is_default_user, req.ssh_keys, account)
                    .map_err(with_code(BAD_GUEST))?,
            );
        }
        let edited = edit::set_top_level(&base_text, &entries)
            .with_context(|| format!("editing {} in the guest", req.target))
            .map_err(with_code(BAD_GUEST))?;
        Ok((form, edited))
    };
    let (form, edited) = edit_with(req.stored.clone())?;
    let masked = req.stored.as_ref().map(|stored| match stored {
        Stored::Hash(_) => Stored::Hash(MASK.into()),
        Stored::Plain(_) => Stored::Plain(MASK.into()),
    });
    let (_, masked_edit) = edit_with(masked)?;

    let new_parsed = ConfigFile {
        path: req.target.to_string(),
        root: yaml11::parse(&edited.text).context("re-reading the edited text")?.root,
    };
    let mut after: Vec<ConfigFile> = parsed.iter().filter(|f| f.path != req.target).cloned().collect();
    after.push(new_parsed);
    merge::sort_by_priority(&mut after);
    let is_ours = |stored: &Stored| match (stored, &req.stored) {
        (Stored::Hash(t), Some(Stored::Hash(_))) | (Stored::Plain(t), Some(Stored::Plain(_))) => {
            (req.already_set)(t) || Some(stored) == req.stored.as_ref()
        }
        _ => false,
    };
    let (effective, findings) = checks::check(
        &checks::Image {
            files: &after,
            version: facts.version,
            default_user: default_user.as_deref(),
            sshd: facts.sshd,
            booted_before: facts.booted_before,
        },
        &Intent {
            user: &user,
            password: req.stored.is_some(),
            keys: !req.ssh_keys.is_empty(),
            is_ours: &is_ours,
            expire: req.expire,
            ssh_pwauth: req.ssh_pwauth,
            target: req.target,
        },
    );
    Ok(Plan {
        user,
        form,
        target: req.target.to_string(),
        old_text,
        new_text: edited.text,
        masked_text: masked_edit.text,
        changed_keys: edited.changed_keys,
        effective,
        findings,
    })
}

/// Whether `user` has a password in `/etc/shadow` (without the file, assume so: unlocking is harmless).
fn has_password(shadow: Option<&str>, user: &str) -> bool {
    shadow.is_none_or(|text| matches!(shadow::state(text, user), shadow::State::Hash(_)))
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
