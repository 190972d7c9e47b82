//! What cloud-init will log at WARNING or DEPRECATED level because of the password-related keys of a
//! configuration. Since 23.4 any such line makes `cloud-init status` end `degraded` (exit 2), which
//! pipelines treat as a failed boot.
//!
//! The rules follow cloud-init's own code per release (`cc_set_passwords`, `ug_util`, `distros`):
//! - a string `ssh_pwauth` (even `unchanged`), from 22.2;
//! - `chpasswd.list` as a multi-line string, from 22.2, and `chpasswd.list` in any form, from 22.3;
//! - `users` given as a string or a mapping, and `user` as a string, from 22.2;
//! - a `users` entry with `lock_passwd: false` and no password, from 24.3 ("Not unlocking ...");
//! - `passwd` in the entry of an account that already exists, from 24.3 (it is ignored);
//! - a top-level `password` with no default user (every release).
//!
//! Keys in `/etc/cloud` are not schema-validated at boot from 23.4 on, so schema-only deprecations
//! (hyphenated user keys) are not listed. Distributions may lower the level of deprecations newer than
//! their release (Ubuntu's deprecation boundary); the verdict here is upstream cloud-init's.

use super::merge::{self, ConfigFile};
use super::version::CloudInitVersion;
use super::yaml11::{Mapping, Value};

/// From this release on a WARNING or DEPRECATED line makes `cloud-init status` exit 2.
pub const DEGRADES_STATUS: CloudInitVersion = CloudInitVersion(23, 4, 0);
const STRING_FORMS: CloudInitVersion = CloudInitVersion(22, 2, 0);
const LIST_KEY: CloudInitVersion = CloudInitVersion(22, 3, 0);
const UNLOCK_WARNINGS: CloudInitVersion = CloudInitVersion(24, 3, 0);

/// One line cloud-init will log because of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Logged {
    /// The file whose value cloud-init uses.
    pub file: String,
    /// The key, e.g. `chpasswd.list` or `users[alice].lock_passwd`.
    pub key: String,
    /// `deprecated` or `warning`.
    pub level: &'static str,
    /// What cloud-init says, in short.
    pub message: String,
    /// What to write instead.
    pub fix: String,
}

/// What an account looks like in the image, for the 24.3 unlocking rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// No such user yet: cloud-init creates it.
    New,
    /// The user exists and has a password hash.
    WithPassword,
    /// The user exists with no usable password (empty or locked).
    WithoutPassword,
}

/// Everything the merged `files` make cloud-init `version` log at WARNING or DEPRECATED level.
/// `account` tells how each user exists in the image.
pub fn logged(files: &[ConfigFile], version: CloudInitVersion, account: &dyn Fn(&str) -> Account) -> Vec<Logged> {
    let cfg = merge::effective(files);
    let file_of = |path: &[&str]| merge::deciding_file(files, path).map(|f| f.path.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut push = |path: &[&str], key: String, level, message: String, fix: &str| {
        out.push(Logged { file: file_of(path), key, level, message, fix: fix.to_string() })
    };
    deprecated_forms(&cfg, version, &mut push);
    if version >= UNLOCK_WARNINGS {
        for (name, entry) in user_entries(&cfg) {
            unlocking_warnings(&name, entry, account(&name), &mut push);
        }
    }
    let uses_lists =
        ["users", "list"].iter().any(|key| merge::lookup(&cfg, &["chpasswd", key]).is_some_and(Value::is_truthy));
    if !uses_lists
        && cfg.get("password").is_some_and(Value::is_truthy)
        && super::credentials::default_user(&cfg).is_none()
    {
        push(
            &["password"],
            "password".into(),
            "warning",
            "top-level `password` with no default user: \"No default or defined user to change password for.\"".into(),
            "name the user in `chpasswd.users` (`cloudimg customize --user NAME`)",
        );
    }
    out
}

/// The key forms cloud-init `version` reports as deprecated.
fn deprecated_forms(
    cfg: &Mapping,
    version: CloudInitVersion,
    push: &mut impl FnMut(&[&str], String, &'static str, String, &str),
) {
    if version >= STRING_FORMS && matches!(cfg.get("ssh_pwauth"), Some(Value::Str(_))) {
        push(
            &["ssh_pwauth"],
            "ssh_pwauth".into(),
            "deprecated",
            "a string value for `ssh_pwauth` is deprecated since 22.2".into(),
            "write `ssh_pwauth: true` or `false` (YAML booleans), or remove the key to leave sshd alone",
        );
    }
    if let Some(list) = merge::lookup(cfg, &["chpasswd", "list"]).filter(|v| v.is_truthy()) {
        if version >= LIST_KEY {
            push(
                &["chpasswd", "list"],
                "chpasswd.list".into(),
                "deprecated",
                "`chpasswd.list` is deprecated since 22.3".into(),
                "use `chpasswd.users` (`cloudimg customize` converts the entry it writes)",
            );
        }
        if version >= STRING_FORMS && matches!(list, Value::Str(_)) {
            push(
                &["chpasswd", "list"],
                "chpasswd.list".into(),
                "deprecated",
                "`chpasswd.list` as a multi-line string is deprecated since 22.2".into(),
                "write it as a YAML list of `user:password` strings",
            );
        }
    }
    if version >= STRING_FORMS {
        if let Some(kind) = match cfg.get("users") {
            Some(Value::Str(_)) => Some("a string"),
            Some(Value::Map(_)) => Some("a mapping"),
            _ => None,
        } {
            push(
                &["users"],
                "users".into(),
                "deprecated",
                format!("`users` given as {kind} is deprecated since 22.2"),
                "write `users` as a list",
            );
        }
        if matches!(cfg.get("user"), Some(Value::Str(_))) {
            push(
                &["user"],
                "user".into(),
                "deprecated",
                "`user` given as a string is deprecated since 22.2".into(),
                "write `user: {name: NAME}` or use `users`",
            );
        }
    }
}

/// The `users` entries that are mappings with a name.
fn user_entries(cfg: &Mapping) -> Vec<(String, &Mapping)> {
    let Some(Value::Seq(items)) = cfg.get("users") else { return Vec::new() };
    items.iter().filter_map(Value::as_map).filter_map(|m| Some((m.get("name")?.as_str()?.to_string(), m))).collect()
}

/// cloud-init 24.3's warnings about an entry's password and `lock_passwd`.
fn unlocking_warnings(
    name: &str,
    entry: &Mapping,
    account: Account,
    push: &mut impl FnMut(&[&str], String, &'static str, String, &str),
) {
    let has = |key: &str| entry.get(key).is_some_and(Value::is_truthy);
    let unlock = entry.get("lock_passwd").is_some_and(super::credentials::is_false_like);
    let gives_password = has("hashed_passwd") || has("plain_text_passwd");
    let fix = "give the entry `hashed_passwd` (what `cloudimg customize --user NAME --password-file F` writes), or drop `lock_passwd: false`";
    match account {
        Account::New if unlock && !gives_password && !has("passwd") => push(
            &["users"],
            format!("users[{name}].lock_passwd"),
            "warning",
            format!("\"Not unlocking password for user {name}\": `lock_passwd: false` without a password in the entry"),
            fix,
        ),
        Account::WithoutPassword if unlock && !gives_password => push(
            &["users"],
            format!("users[{name}].lock_passwd"),
            "warning",
            format!(
                "\"Not unlocking blank password for existing user {name}\": `lock_passwd: false` without a password"
            ),
            fix,
        ),
        _ => {}
    }
    if account != Account::New && has("passwd") {
        push(
            &["users"],
            format!("users[{name}].passwd"),
            "warning",
            format!("\"'passwd' in user-data is ignored for existing user {name}\""),
            "use `hashed_passwd`, or `chpasswd.users`, for an account that exists",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    fn files(texts: &[(&str, &str)]) -> Vec<ConfigFile> {
        texts.iter().map(|(p, t)| ConfigFile { path: p.to_string(), root: parse(t).unwrap().root }).collect()
    }

    fn keys(texts: &[(&str, &str)], version: &str, account: Account) -> Vec<String> {
        logged(&files(texts), version.parse().unwrap(), &|_| account)
            .into_iter()
            .map(|l| format!("{} {} {}", l.file, l.key, l.level))
            .collect()
    }

    const CFG: &str = "/etc/cloud/cloud.cfg";
    const DEFAULT: &str = "system_info: {default_user: {name: debian}}\n";

    #[test]
    fn each_deprecated_form_is_reported_from_its_release_on() {
        let string_list = format!("{DEFAULT}chpasswd: {{list: \"debian:x\"}}\n");
        assert_eq!(keys(&[(CFG, &string_list)], "22.1", Account::New), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, &string_list)], "22.2", Account::New), vec![format!("{CFG} chpasswd.list deprecated")]);
        assert_eq!(keys(&[(CFG, &string_list)], "22.3", Account::New).len(), 2);
        let seq_list = format!("{DEFAULT}chpasswd: {{list: [\"debian:x\"]}}\n");
        assert_eq!(keys(&[(CFG, &seq_list)], "22.2", Account::New), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, &seq_list)], "26.2", Account::New).len(), 1);
        let pwauth = format!("{DEFAULT}ssh_pwauth: unchanged\n");
        assert_eq!(keys(&[(CFG, &pwauth)], "22.1", Account::New), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, &pwauth)], "25.1", Account::New), vec![format!("{CFG} ssh_pwauth deprecated")]);
        assert_eq!(keys(&[(CFG, &format!("{DEFAULT}ssh_pwauth: yes\n"))], "25.1", Account::New), Vec::<String>::new());
        let users_string = format!("{DEFAULT}users: default\nuser: ops\n");
        assert_eq!(
            keys(&[(CFG, &users_string)], "23.4", Account::New),
            vec![format!("{CFG} users deprecated"), format!("{CFG} user deprecated")]
        );
    }

    #[test]
    fn the_file_that_decides_is_named() {
        let drop_in = "/etc/cloud/cloud.cfg.d/50-x.cfg";
        let f = [(CFG, "ssh_pwauth: true\n"), (drop_in, "ssh_pwauth: 'yes'\n")];
        assert_eq!(keys(&f, "24.1", Account::New), vec![format!("{drop_in} ssh_pwauth deprecated")]);
    }

    #[test]
    fn unlocking_without_a_password_warns_from_24_3() {
        let entry =
            format!("{DEFAULT}users: [default, {{name: alice, lock_passwd: false, ssh_authorized_keys: [k]}}]\n");
        assert_eq!(keys(&[(CFG, &entry)], "24.2", Account::New), Vec::<String>::new());
        assert_eq!(
            keys(&[(CFG, &entry)], "24.3", Account::New),
            vec![format!("{CFG} users[alice].lock_passwd warning")]
        );
        assert_eq!(keys(&[(CFG, &entry)], "26.2", Account::WithPassword), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, &entry)], "26.2", Account::WithoutPassword).len(), 1);
        let with_hash =
            format!("{DEFAULT}users: [default, {{name: alice, lock_passwd: false, hashed_passwd: $6$a$b}}]\n");
        for account in [Account::New, Account::WithPassword, Account::WithoutPassword] {
            assert_eq!(keys(&[(CFG, &with_hash)], "26.2", account), Vec::<String>::new(), "{account:?}");
        }
        let passwd = format!("{DEFAULT}users: [default, {{name: alice, passwd: $6$a$b}}]\n");
        assert_eq!(keys(&[(CFG, &passwd)], "26.2", Account::New), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, &passwd)], "26.2", Account::WithPassword).len(), 1);
    }

    #[test]
    fn a_top_level_password_needs_a_default_user() {
        assert_eq!(keys(&[(CFG, &format!("{DEFAULT}password: x\n"))], "26.2", Account::New), Vec::<String>::new());
        assert_eq!(keys(&[(CFG, "users: []\npassword: x\n")], "17.1", Account::New).len(), 1);
    }

    #[test]
    fn the_distributions_files_as_shipped_log_nothing() {
        for name in ["debian-12-22.4.2", "ubuntu-26", "rocky-26"] {
            let text = std::fs::read_to_string(format!("fixtures/cloud-cfg/{name}.cloud.cfg")).unwrap();
            assert_eq!(keys(&[(CFG, &text)], "26.2", Account::New), Vec::<String>::new(), "{name}");
        }
    }
}
