//! Which cloud-config entries give a user a password, for the cloud-init version in the image, and
//! what cloud-init will really do with a given configuration (an emulation of its `set_passwords`).

use std::sync::LazyLock;

use anyhow::{bail, Result};
use regex::Regex;

use super::merge;
use super::version::CloudInitVersion;
use super::yaml11::{Mapping, Value};

/// How a password is stored in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A crypt(3) hash such as `$6$…`.
    Hash(String),
    Plain(String),
}

impl Stored {
    pub fn text(&self) -> &str {
        match self {
            Stored::Hash(s) | Stored::Plain(s) => s,
        }
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            Stored::Hash(_) => "hash",
            Stored::Plain(_) => "text",
        }
    }
}

/// The cloud-config structure that carries the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Form {
    /// `password:` at the top level, which cloud-init applies to the default user.
    TopLevelPassword,
    /// `chpasswd: {list: "user:password"}`.
    ChpasswdList,
    /// `chpasswd: {users: [{name, password, type}]}`.
    ChpasswdUsers,
}

impl Form {
    pub fn describe(self) -> &'static str {
        match self {
            Form::TopLevelPassword => "top-level `password`",
            Form::ChpasswdList => "`chpasswd.list`",
            Form::ChpasswdUsers => "`chpasswd.users`",
        }
    }
}

/// Chooses the form that `version` honours; `list_in_use` says whether the configuration already has
/// a `chpasswd.list` (which makes cloud-init ignore the top-level `password`).
pub fn form_for(version: CloudInitVersion, default_user: bool, plaintext: bool, list_in_use: bool) -> Result<Form> {
    if version < CloudInitVersion::HASHES && !plaintext {
        bail!(
            "cloud-init {version} in this image cannot take a password hash (that needs 17.1 or later); \
             pass --plaintext to store the password in clear text, as the manual routine does"
        );
    }
    Ok(if version >= CloudInitVersion::CHPASSWD_USERS {
        Form::ChpasswdUsers
    } else if default_user && !list_in_use {
        Form::TopLevelPassword
    } else {
        Form::ChpasswdList
    })
}

/// What the user asked for.
pub struct Request<'a> {
    pub user: &'a str,
    pub default_user: bool,
    pub stored: Stored,
    /// Whether an existing stored value already stands for the requested password (so that a second
    /// identical run leaves a salted hash alone).
    pub already_set: &'a dyn Fn(&str) -> bool,
    pub expire: bool,
    pub ssh_pwauth: Option<bool>,
}

/// The top-level entries to set in `target` (the file being edited). `lower` is the merged
/// configuration of the files with lower priority than `target`: a list written to `target` replaces
/// theirs whole, so their entries for other users are carried over.
pub fn entries(
    target: &Mapping,
    lower: &Mapping,
    version: CloudInitVersion,
    req: &Request,
) -> Result<(Form, Vec<(String, Value)>)> {
    let target_chpasswd = match target.get("chpasswd") {
        None | Some(Value::Null) => Mapping::default(),
        Some(Value::Map(m)) => m.clone(),
        Some(_) => bail!("`chpasswd` is not a mapping; fix it by hand first"),
    };
    let combined = merge::overlay(lower, target);
    let list_in_use = merge::lookup(&combined, &["chpasswd", "list"]).is_some_and(Value::is_truthy);
    let form = form_for(version, req.default_user, matches!(req.stored, Stored::Plain(_)), list_in_use)?;
    let inherited = |key: &str| target_chpasswd.get(key).or_else(|| merge::lookup(lower, &["chpasswd", key])).cloned();

    let mut chpasswd = target_chpasswd.clone();
    let mut out = Vec::new();
    match form {
        Form::TopLevelPassword => {
            let keep = target.get("password").and_then(Value::as_str).is_some_and(|p| (req.already_set)(p));
            if !keep {
                out.push(("password".to_string(), Value::Str(req.stored.text().to_string())));
            }
        }
        Form::ChpasswdUsers => {
            let users = match inherited("users") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Seq(items)) => items,
                Some(_) => bail!("`chpasswd.users` is not a list; fix it by hand first"),
            };
            chpasswd.insert("users", Value::Seq(upsert_user_entry(users, req)));
        }
        Form::ChpasswdList => {
            let list = inherited("list").unwrap_or(Value::Null);
            chpasswd.insert("list", upsert_list_line(list, version, req)?);
        }
    }
    chpasswd.insert("expire", Value::Bool(req.expire));
    out.push(("chpasswd".to_string(), Value::Map(chpasswd)));
    if let Some(on) = req.ssh_pwauth {
        out.push(("ssh_pwauth".to_string(), Value::Bool(on)));
    }
    Ok((form, out))
}

fn upsert_user_entry(mut users: Vec<Value>, req: &Request) -> Vec<Value> {
    let mut entry = Mapping::default();
    entry.insert("name", Value::Str(req.user.to_string()));
    entry.insert("password", Value::Str(req.stored.text().to_string()));
    entry.insert("type", Value::Str(req.stored.type_name().to_string()));
    let is_ours = |v: &Value| v.as_map().and_then(|m| m.get("name")).and_then(Value::as_str) == Some(req.user);
    match users.iter().position(is_ours) {
        Some(i) => {
            let existing = users[i].as_map().cloned().unwrap_or_default();
            let same_type = existing.get("type").and_then(Value::as_str).unwrap_or("hash") == req.stored.type_name();
            let same_password = existing.get("password").and_then(Value::as_str).is_some_and(|p| (req.already_set)(p));
            if !(same_type && same_password && existing.get("type").is_some()) {
                users[i] = Value::Map(entry);
            }
            // A later entry for the same user would win over ours.
            let mut seen = false;
            users.retain(|v| !is_ours(v) || !std::mem::replace(&mut seen, true));
        }
        None => users.push(Value::Map(entry)),
    }
    users
}

/// `chpasswd.list` with `user`'s line set. cloud-init reads a YAML list from 17.1 on and reports the
/// multi-line string as deprecated from 22.2, so the list form is written wherever it is understood; an
/// existing string stays a string where that is not deprecated.
fn upsert_list_line(list: Value, version: CloudInitVersion, req: &Request) -> Result<Value> {
    let (mut lines, as_string): (Vec<String>, bool) = match list {
        Value::Null => (Vec::new(), version < CloudInitVersion::HASHES),
        Value::Str(s) => (
            s.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect(),
            version < CloudInitVersion::CHPASSWD_STRING_DEPRECATED,
        ),
        Value::Seq(items) => {
            (items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<_>>().unwrap_or_default(), false)
        }
        _ => bail!("`chpasswd.list` is neither text nor a list; fix it by hand first"),
    };
    let ours = format!("{}:{}", req.user, req.stored.text());
    let prefix = format!("{}:", req.user);
    match lines.iter().position(|l| l.starts_with(&prefix)) {
        Some(i) if (req.already_set)(&lines[i][prefix.len()..]) => {}
        Some(i) => lines[i] = ours,
        None => lines.push(ours),
    }
    let mut seen = false;
    lines.retain(|l| !l.starts_with(&prefix) || !std::mem::replace(&mut seen, true));
    Ok(if as_string { Value::Str(lines.join("\n")) } else { Value::Seq(lines.into_iter().map(Value::Str).collect()) })
}

/// What cloud-init's `set_passwords` will do for one user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserOutcome {
    /// The password value as configured (hash or clear text) and how cloud-init reads it; `None` when
    /// cloud-init leaves this user's password alone.
    #[serde(skip)]
    pub password: Option<Stored>,
    /// `hash`, `text`, `random` or `none`, for reports.
    pub password_kind: &'static str,
    /// Where the password comes from: the key cloud-init uses.
    pub password_key: Option<&'static str>,
    pub expire: bool,
    /// `true`/`false`: cloud-init sets sshd's PasswordAuthentication; `None`: it leaves sshd alone.
    pub ssh_pwauth: Option<bool>,
}

static HASHED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\$(1|2a|2y|5|6)(\$.+){2}").expect("valid pattern"));

/// Emulates `set_passwords` on the merged configuration for `user`.
pub fn outcome(effective: &Mapping, version: CloudInitVersion, user: &str, default_user: Option<&str>) -> UserOutcome {
    let chpasswd = effective.get("chpasswd").and_then(Value::as_map).cloned().unwrap_or_default();
    let users = if version >= CloudInitVersion::CHPASSWD_USERS { chpasswd.get("users").cloned() } else { None };
    let list = chpasswd.get("list").filter(|v| v.is_truthy()).cloned();
    let classify = |text: &str, declared: Option<&str>| -> (Option<Stored>, &'static str) {
        match (text, declared) {
            (_, Some(t)) if t.eq_ignore_ascii_case("random") => (None, "random"),
            ("R" | "RANDOM", None) => (None, "random"),
            (_, Some("text")) => (Some(Stored::Plain(text.into())), "text"),
            (_, Some(_)) => (Some(Stored::Hash(text.into())), "hash"),
            _ if version >= CloudInitVersion::HASHES && HASHED.is_match(text) => {
                (Some(Stored::Hash(text.into())), "hash")
            }
            _ => (Some(Stored::Plain(text.into())), "text"),
        }
    };
    let mut found: Option<((Option<Stored>, &'static str), &'static str)> = None;
    if let Some(Value::Seq(entries)) = &users {
        for entry in entries.iter().filter_map(Value::as_map) {
            if entry.get("name").and_then(Value::as_str) == Some(user) {
                let declared = entry.get("type").and_then(Value::as_str).unwrap_or("hash");
                let text = entry.get("password").and_then(Value::as_str).unwrap_or("");
                found = Some((classify(text, Some(declared)), "chpasswd.users"));
            }
        }
    }
    if let Some(list) = &list {
        let lines: Vec<String> = match list {
            Value::Str(s) => s.lines().map(str::to_string).collect(),
            Value::Seq(items) => items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        for line in lines {
            if let Some((name, text)) = line.split_once(':') {
                if name.trim() == user {
                    found = Some((classify(text.trim(), None), "chpasswd.list"));
                }
            }
        }
    }
    let uses_lists = users.as_ref().is_some_and(Value::is_truthy) || list.is_some();
    if !uses_lists && default_user == Some(user) {
        if let Some(text) = effective.get("password").filter(|v| v.is_truthy()) {
            let text = match text {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => format!("{other:?}"),
            };
            found = Some((classify(&text, None), "password"));
        }
    }
    let ((password, password_kind), key) = match found {
        Some((classified, key)) => (classified, Some(key)),
        None => ((None, "none"), None),
    };
    UserOutcome {
        password,
        password_kind,
        password_key: key,
        expire: chpasswd.get("expire").map(is_true_like).unwrap_or(true),
        ssh_pwauth: match effective.get("ssh_pwauth") {
            Some(v) if is_true_like(v) => Some(true),
            Some(v) if is_false_like(v) => Some(false),
            _ => None,
        },
    }
}

/// cloud-init's `util.is_true` / `is_false`: booleans, or the strings it accepts for them.
pub(crate) fn is_true_like(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Str(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "on" | "yes"),
        Value::Int(i) => *i == 1,
        _ => false,
    }
}

pub(crate) fn is_false_like(v: &Value) -> bool {
    match v {
        Value::Bool(b) => !*b,
        Value::Str(s) => matches!(s.to_ascii_lowercase().as_str(), "false" | "0" | "off" | "no"),
        Value::Int(i) => *i == 0,
        _ => false,
    }
}

/// Whether a module list of the merged configuration runs `set_passwords` (spelt with `_` or `-`,
/// alone or as `[name, frequency]`).
pub fn runs_set_passwords(effective: &Mapping) -> bool {
    ["cloud_init_modules", "cloud_config_modules", "cloud_final_modules"].iter().any(|list| {
        matches!(effective.get(list), Some(Value::Seq(items)) if items.iter().any(|item| {
            let name = match item {
                Value::Str(s) => Some(s.as_str()),
                Value::Seq(parts) => parts.first().and_then(Value::as_str),
                _ => None,
            };
            name.is_some_and(|n| n.replace('-', "_") == "set_passwords")
        }))
    })
}

/// The default user's name (`system_info.default_user.name`), when the configuration creates one.
pub fn default_user(effective: &Mapping) -> Option<String> {
    let name = merge::lookup(effective, &["system_info", "default_user", "name"])?.as_str()?.to_string();
    let created = match effective.get("users") {
        None => true,
        Some(Value::Seq(items)) => items.iter().any(|u| u.as_str() == Some("default")),
        Some(Value::Str(s)) => s.split(',').any(|u| u.trim() == "default"),
        Some(_) => false,
    };
    created.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    fn v(s: &str) -> CloudInitVersion {
        s.parse().unwrap()
    }

    #[test]
    fn version_table_picks_the_form_each_release_honours() {
        let cases = [
            ("0.7.5", true, true, false, Some(Form::TopLevelPassword)),
            ("0.7.5", false, true, false, Some(Form::ChpasswdList)),
            ("0.7.5", true, false, false, None),
            ("17.1", true, false, false, Some(Form::TopLevelPassword)),
            ("17.1", false, false, false, Some(Form::ChpasswdList)),
            ("22.2", true, false, true, Some(Form::ChpasswdList)),
            ("22.2.1", true, false, false, Some(Form::TopLevelPassword)),
            ("22.3", true, false, false, Some(Form::ChpasswdUsers)),
            ("24.1.3", false, true, false, Some(Form::ChpasswdUsers)),
        ];
        for (version, default_user, plaintext, list, expected) in cases {
            let got = form_for(v(version), default_user, plaintext, list).ok();
            assert_eq!(got, expected, "{version} default={default_user} plain={plaintext} list={list}");
        }
    }

    fn request<'a>(user: &'a str, stored: &str, already: &'a dyn Fn(&str) -> bool) -> Request<'a> {
        Request {
            user,
            default_user: user == "debian",
            stored: Stored::Hash(stored.into()),
            already_set: already,
            expire: false,
            ssh_pwauth: Some(true),
        }
    }

    #[test]
    fn users_entries_replace_the_same_user_and_keep_others() {
        let target = parse("chpasswd:\n  expire: true\n  users:\n    - {name: other, password: x, type: text}\n    - {name: debian, password: old}\n    - {name: debian, password: older}\n").unwrap().root;
        let never = |_: &str| false;
        let (form, entries) =
            entries(&target, &Mapping::default(), v("23.1"), &request("debian", "$6$s$h", &never)).unwrap();
        assert_eq!(form, Form::ChpasswdUsers);
        let chpasswd = entries.iter().find(|(k, _)| k == "chpasswd").unwrap().1.as_map().unwrap().clone();
        let Value::Seq(users) = chpasswd.get("users").unwrap() else { panic!() };
        assert_eq!(users.len(), 2);
        assert_eq!(merge::lookup(users[1].as_map().unwrap(), &["password"]), Some(&Value::Str("$6$s$h".into())));
        assert_eq!(merge::lookup(users[1].as_map().unwrap(), &["type"]), Some(&Value::Str("hash".into())));
        assert_eq!(chpasswd.get("expire"), Some(&Value::Bool(false)));
        assert!(entries.contains(&("ssh_pwauth".into(), Value::Bool(true))));
    }

    #[test]
    fn a_drop_in_carries_over_lower_priority_list_entries() {
        let lower = parse("chpasswd:\n  list: |\n    other:pw\n    debian:old\n").unwrap().root;
        let never = |_: &str| false;
        let (form, entries) =
            entries(&Mapping::default(), &lower, v("20.1"), &request("debian", "$6$s$h", &never)).unwrap();
        assert_eq!(form, Form::ChpasswdList);
        let chpasswd = entries.iter().find(|(k, _)| k == "chpasswd").unwrap().1.as_map().unwrap().clone();
        assert_eq!(chpasswd.get("list"), Some(&Value::Str("other:pw\ndebian:$6$s$h".into())));
    }

    #[test]
    fn list_lines_take_the_form_that_is_not_deprecated_for_the_version() {
        let never = |_: &str| false;
        let list_after = |lower: &str, version: &str, plain: bool| {
            let mut req = request("ops", "$6$s$h", &never);
            if plain {
                req.stored = Stored::Plain("pw".into());
            }
            let (form, e) = entries(&Mapping::default(), &parse(lower).unwrap().root, v(version), &req).unwrap();
            assert_eq!(form, Form::ChpasswdList, "{version}");
            let chpasswd = e.iter().find(|(k, _)| k == "chpasswd").unwrap().1.as_map().unwrap().clone();
            chpasswd.get("list").cloned().unwrap()
        };
        let seq = |items: &[&str]| Value::Seq(items.iter().map(|i| Value::Str(i.to_string())).collect());
        // 0.7.x reads only a string; from 17.1 a list; a string is deprecated from 22.2.
        assert_eq!(list_after("{}", "0.7.5", true), Value::Str("ops:pw".into()));
        assert_eq!(list_after("{}", "17.1", false), seq(&["ops:$6$s$h"]));
        assert_eq!(list_after("chpasswd: {list: \"a:b\"}", "22.1", false), Value::Str("a:b\nops:$6$s$h".into()));
        assert_eq!(list_after("chpasswd: {list: \"a:b\"}", "22.2", false), seq(&["a:b", "ops:$6$s$h"]));
    }

    #[test]
    fn a_hash_that_already_matches_is_kept() {
        let target = parse("password: $6$old$hash\n").unwrap().root;
        let always = |_: &str| true;
        let (form, entries) =
            entries(&target, &Mapping::default(), v("20.1"), &request("debian", "$6$new$hash", &always)).unwrap();
        assert_eq!(form, Form::TopLevelPassword);
        assert!(!entries.iter().any(|(k, _)| k == "password"));
    }

    #[test]
    fn outcome_follows_set_passwords_rules() {
        let cfg = |t: &str| parse(t).unwrap().root;
        let top = outcome(&cfg("password: $6$a$b\nssh_pwauth: yes\n"), v("22.4"), "debian", Some("debian"));
        assert_eq!(
            (top.password_kind, top.password_key, top.expire, top.ssh_pwauth),
            ("hash", Some("password"), true, Some(true))
        );
        let ignored = outcome(
            &cfg("password: pw\nchpasswd: {list: 'other:x', expire: false}\n"),
            v("22.4"),
            "debian",
            Some("debian"),
        );
        assert_eq!((ignored.password_kind, ignored.expire), ("none", false));
        let old = outcome(&cfg("password: $6$a$b\n"), v("0.7.5"), "debian", Some("debian"));
        assert_eq!(old.password_kind, "text");
        let users_before_22_3 =
            outcome(&cfg("chpasswd: {users: [{name: debian, password: x}]}\n"), v("22.2"), "debian", Some("debian"));
        assert_eq!(users_before_22_3.password_kind, "none");
        let unchanged = outcome(&cfg("ssh_pwauth: unchanged\n"), v("22.4"), "debian", Some("debian"));
        assert_eq!(unchanged.ssh_pwauth, None);
    }

    #[test]
    fn module_lists_and_default_user_are_read_from_real_files() {
        for (file, user) in [("debian-12-22.4.2", "debian"), ("ubuntu-26", "ubuntu"), ("rocky-26", "rocky")] {
            let text = std::fs::read_to_string(format!("fixtures/cloud-cfg/{file}.cloud.cfg")).unwrap();
            let root = parse(&text).unwrap().root;
            assert!(runs_set_passwords(&root), "{file}");
            assert_eq!(default_user(&root).as_deref(), Some(user), "{file}");
        }
        assert!(!runs_set_passwords(&parse("cloud_config_modules: [ssh, [runcmd, always]]\n").unwrap().root));
        assert!(runs_set_passwords(&parse("cloud_config_modules: [[set-passwords, always]]\n").unwrap().root));
        assert_eq!(
            default_user(&parse("users: [alice]\nsystem_info: {default_user: {name: x}}\n").unwrap().root),
            None
        );
    }
}
