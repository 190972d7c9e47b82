//! SSH public keys: validating `authorized_keys` lines, and the cloud-config entries that give them to
//! a user (`ssh_authorized_keys` at the top level for the default user, an entry in `users` for
//! anyone else).

use anyhow::{bail, Result};
use base64::Engine;

use super::credentials::Stored;
use super::merge;
use super::yaml11::{Mapping, Value};

/// Key types OpenSSH accepts in `authorized_keys` (ssh-dss is gone from OpenSSH 9.8 and refused).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
];

/// The key lines of an `authorized_keys`-style file; blank lines and comments are skipped, anything
/// else must be a public key OpenSSH would accept. `source` names the file in errors.
pub fn parse_public_keys(text: &str, source: &str) -> Result<Vec<String>> {
    if text.contains("PRIVATE KEY-----") {
        bail!("{source} is a private key; give the public key (the .pub file) instead");
    }
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match identity(line) {
            Ok(_) => keys.push(line.to_string()),
            Err(e) => bail!("{source} line {}: {e}", number + 1),
        }
    }
    if keys.is_empty() {
        bail!("{source} holds no public key");
    }
    Ok(keys)
}

/// `(type, key blob)`: what makes two key lines the same key, whatever their options and comments.
fn identity(line: &str) -> Result<(String, String)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    // Options (`from="…",no-pty`) may come first; the key type is the first word that is one.
    let Some(at) = words.iter().position(|w| KEY_TYPES.contains(w)) else {
        if words.first().is_some_and(|w| *w == "ssh-dss") {
            bail!("ssh-dss (DSA) keys are refused by current OpenSSH; use an ed25519 or RSA key");
        }
        bail!("not a public key (no known key type such as ssh-ed25519 or ssh-rsa)");
    };
    let kind = words[at];
    let Some(blob) = words.get(at + 1) else { bail!("the {kind} key has no key data") };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| anyhow::anyhow!("the {kind} key data is not base64"))?;
    let declared = bytes
        .get(..4)
        .map(|n| u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize)
        .and_then(|n| bytes.get(4..4 + n))
        .map(|t| String::from_utf8_lossy(t).into_owned());
    if declared.as_deref() != Some(kind) {
        bail!("the key data does not hold a {kind} key (truncated or mislabelled)");
    }
    Ok((kind.to_string(), blob.to_string()))
}

/// What a non-default user's `users` entry says about the account's password.
pub enum Account<'a> {
    /// A password is set in the same run: the entry carries it as well, with `lock_passwd: false`
    /// (cloud-init 24.3 and later warn about `lock_passwd: false` in an entry without a password,
    /// and such a warning makes `cloud-init status` degraded). `already_set` says whether an
    /// existing value already stands for it.
    Password { stored: &'a Stored, already_set: &'a dyn Fn(&str) -> bool },
    /// The account has a password that must stay usable: `lock_passwd: false`.
    KeepPassword,
    /// Nothing to unlock: cloud-init's default (locked) is left alone.
    Locked,
}

/// The top-level entries that give `keys` to `user`. `target` is the file being edited and `lower`
/// the merged files below it (a list written to `target` replaces theirs whole, so theirs is carried
/// over). Keys the user already has are not added again.
pub fn entries(
    target: &Mapping,
    lower: &Mapping,
    user: &str,
    default_user: bool,
    keys: &[String],
    account: Account,
) -> Result<Vec<(String, Value)>> {
    let inherited = |key: &str| target.get(key).or_else(|| lower.get(key)).cloned();
    if default_user {
        let existing = match inherited("ssh_authorized_keys") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Seq(items)) => items,
            Some(Value::Str(s)) => vec![Value::Str(s)],
            Some(_) => bail!("`ssh_authorized_keys` is not a list; fix it by hand first"),
        };
        return Ok(added(existing, keys)
            .map(|list| ("ssh_authorized_keys".to_string(), Value::Seq(list)))
            .into_iter()
            .collect());
    }
    let mut users = match inherited("users") {
        // cloud-init's own default when `users` is absent.
        None | Some(Value::Null) => vec![Value::Str("default".into())],
        Some(Value::Seq(items)) => items,
        Some(Value::Str(s)) => s.split(',').map(|u| Value::Str(u.trim().to_string())).collect(),
        Some(_) => bail!("`users` is not a list; fix it by hand first"),
    };
    let is_user = |v: &Value| v.as_map().and_then(|m| m.get("name")).and_then(Value::as_str) == Some(user);
    let position = users.iter().position(is_user);
    let mut entry = match position {
        Some(i) => users[i].as_map().cloned().unwrap_or_default(),
        None => {
            let mut m = Mapping::default();
            m.insert("name", Value::Str(user.to_string()));
            if !matches!(account, Account::Locked) {
                // A `users` entry for an existing account would otherwise lock its password.
                m.insert("lock_passwd", Value::Bool(false));
            }
            m
        }
    };
    let existing = match entry.get("ssh_authorized_keys") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Seq(items)) => items.clone(),
        Some(Value::Str(s)) => vec![Value::Str(s.clone())],
        Some(_) => bail!("`ssh_authorized_keys` of user `{user}` is not a list; fix it by hand first"),
    };
    let mut changed = false;
    if let Some(list) = added(existing, keys) {
        entry.insert("ssh_authorized_keys", Value::Seq(list));
        changed = true;
    }
    if let Account::Password { stored, already_set } = account {
        let key = match stored {
            Stored::Hash(_) => "hashed_passwd",
            Stored::Plain(_) => "plain_text_passwd",
        };
        let other = if key == "hashed_passwd" { "plain_text_passwd" } else { "hashed_passwd" };
        let current = entry.get(key).and_then(Value::as_str).is_some_and(already_set);
        if !current || entry.get(other).is_some() || entry.get("lock_passwd") != Some(&Value::Bool(false)) {
            entry.remove(other);
            entry.insert(key, Value::Str(stored.text().to_string()));
            entry.insert("lock_passwd", Value::Bool(false));
            changed = true;
        }
    }
    if !changed {
        return Ok(Vec::new());
    }
    match position {
        Some(i) => users[i] = Value::Map(entry),
        None => users.push(Value::Map(entry)),
    }
    Ok(vec![("users".to_string(), Value::Seq(users))])
}

/// `existing` with the keys it lacks appended; `None` when it has them all.
fn added(mut existing: Vec<Value>, keys: &[String]) -> Option<Vec<Value>> {
    let mut have: Vec<(String, String)> =
        existing.iter().filter_map(Value::as_str).filter_map(|k| identity(k).ok()).collect();
    let before = existing.len();
    for key in keys {
        let id = identity(key).expect("keys are validated when read");
        if !have.contains(&id) {
            have.push(id);
            existing.push(Value::Str(key.clone()));
        }
    }
    (existing.len() > before).then_some(existing)
}

/// Every key a configuration gives `user`, for reports.
pub fn configured_for(cfg: &Mapping, user: &str, default_user: bool) -> usize {
    let count = |v: Option<&Value>| match v {
        Some(Value::Seq(items)) => items.len(),
        Some(Value::Str(_)) => 1,
        _ => 0,
    };
    let top = if default_user { count(cfg.get("ssh_authorized_keys")) } else { 0 };
    let in_users = match cfg.get("users") {
        Some(Value::Seq(items)) => items
            .iter()
            .filter_map(Value::as_map)
            .filter(|m| m.get("name").and_then(Value::as_str) == Some(user))
            .map(|m| count(merge::lookup(m, &["ssh_authorized_keys"])))
            .sum(),
        _ => 0,
    };
    top + in_users
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINcBP2Hlv715+49uDDvU+ZdmzRat/4M9S78A5XhQM7FV alice@laptop";
    const ED2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMbfnvdnQIN2a637fGdm4Bqj5r2dtoJsjAWxYyxmm6t1 bob";

    #[test]
    fn key_files_are_validated_line_by_line() {
        let keys = parse_public_keys(&format!("# mine\n\n{ED}\nno-pty,from=\"10.0.0.0/8\" {ED2}\n"), "k.pub").unwrap();
        assert_eq!(keys.len(), 2);
        let err = |t: &str| parse_public_keys(t, "k.pub").unwrap_err().to_string();
        assert!(err(&format!("{ED}\nssh-rsa AAAA!!\n")).contains("k.pub line 2"));
        assert!(err("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAINcBP2Hlv715+49uDDvU+ZdmzRat/4M9S78A5XhQM7FV\n")
            .contains("does not hold a ssh-rsa"));
        assert!(err("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n").contains("private key"));
        assert!(err("ssh-dss AAAAB3NzaC1kc3MAAACBAP\n").contains("DSA"));
        assert!(err("# only a comment\n").contains("no public key"));
        assert!(err("hello world\n").contains("not a public key"));
    }

    #[test]
    fn the_default_user_gets_top_level_keys_without_duplicates() {
        let target = parse(&format!("ssh_authorized_keys:\n  - {ED2}\n")).unwrap().root;
        let e = entries(
            &target,
            &Mapping::default(),
            "debian",
            true,
            &[ED.into(), format!("{ED2} other comment")],
            Account::KeepPassword,
        )
        .unwrap();
        assert_eq!(
            e,
            vec![("ssh_authorized_keys".into(), Value::Seq(vec![Value::Str(ED2.into()), Value::Str(ED.into())]))]
        );
        let again = parse(&format!("ssh_authorized_keys: ['{ED2}', '{ED}']\n")).unwrap().root;
        assert!(entries(&again, &Mapping::default(), "debian", true, &[ED.into()], Account::KeepPassword)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn other_users_get_a_users_entry_and_the_default_user_stays() {
        let lower = parse("users: [default]\n").unwrap().root;
        let e = entries(&Mapping::default(), &lower, "root", false, &[ED.into()], Account::KeepPassword).unwrap();
        let Value::Seq(users) = &e[0].1 else { panic!() };
        assert_eq!(users[0], Value::Str("default".into()));
        let root = users[1].as_map().unwrap();
        assert_eq!(root.get("name"), Some(&Value::Str("root".into())));
        assert_eq!(root.get("lock_passwd"), Some(&Value::Bool(false)));
        assert_eq!(
            configured_for(
                &parse(&format!("users: [default, {{name: root, ssh_authorized_keys: ['{ED}']}}]\n")).unwrap().root,
                "root",
                false
            ),
            1
        );
        let absent =
            entries(&Mapping::default(), &Mapping::default(), "ops", false, &[ED.into()], Account::KeepPassword)
                .unwrap();
        let Value::Seq(users) = &absent[0].1 else { panic!() };
        assert_eq!(users[0], Value::Str("default".into()));
    }

    #[test]
    fn a_users_entry_carries_the_password_set_with_it_and_locks_nothing_it_need_not() {
        let entry_of = |e: &[(String, Value)]| {
            let Value::Seq(users) = &e[0].1 else { panic!() };
            users.last().unwrap().as_map().unwrap().clone()
        };
        let never = |_: &str| false;
        let hash = Stored::Hash("$6$salt$hash".into());
        let with = |account| entries(&Mapping::default(), &Mapping::default(), "alice", false, &[ED.into()], account);
        let e = entry_of(&with(Account::Password { stored: &hash, already_set: &never }).unwrap());
        assert_eq!(e.get("hashed_passwd"), Some(&Value::Str("$6$salt$hash".into())));
        assert_eq!(e.get("lock_passwd"), Some(&Value::Bool(false)));
        let plain = Stored::Plain("pw".into());
        let e = entry_of(&with(Account::Password { stored: &plain, already_set: &never }).unwrap());
        assert_eq!((e.get("plain_text_passwd"), e.get("hashed_passwd")), (Some(&Value::Str("pw".into())), None));
        let e = entry_of(&with(Account::Locked).unwrap());
        assert_eq!(e.get("lock_passwd"), None, "a new account has nothing to unlock");

        // A second run with the same keys changes a stale password and keeps a current one.
        let existing =
            parse(&format!("users: [default, {{name: alice, lock_passwd: false, hashed_passwd: old, ssh_authorized_keys: ['{ED}']}}]\n"))
                .unwrap()
                .root;
        let again = |already: &dyn Fn(&str) -> bool| {
            entries(
                &existing,
                &Mapping::default(),
                "alice",
                false,
                &[ED.into()],
                Account::Password { stored: &hash, already_set: already },
            )
            .unwrap()
        };
        assert_eq!(entry_of(&again(&never)).get("hashed_passwd"), Some(&Value::Str("$6$salt$hash".into())));
        assert!(again(&|old: &str| old == "old").is_empty());
    }
}
