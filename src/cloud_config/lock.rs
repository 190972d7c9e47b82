//! `--lock`: the reverse job. cloudimg's own earlier edits are undone exactly from the journal it
//! keeps in the image; then whatever password cloud-init would still set is removed and an
//! `ssh_pwauth` that enables password login is turned off. Pure functions over the files' text.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::credentials::is_true_like;
use super::edit;
use super::merge::{self, ConfigFile};
use super::yaml11::{self, Mapping, Value};
use crate::support::exit_codes::{with_code, BAD_GUEST};

/// Where cloudimg keeps the originals of the cloud-init files it changed. cloud-init reads only
/// `cloud.cfg` and `cloud.cfg.d/*.cfg`, so it never sees this. A file beside cloud.cfg rather than
/// in a directory of its own: ext4 gives a new directory a block away from its parent's, which on a
/// tightly packed image costs every output one more cluster than its input.
pub const JOURNAL: &str = "/etc/cloud/cloudimg-undo.json";
/// Where cloudimg kept its journal until 2026-12: still read, and removed (with its directory, once
/// empty) whenever the journal is written again or undone.
pub const OLD_JOURNAL: &str = "/etc/cloud/cloudimg/undo.json";
pub const OLD_JOURNAL_DIR: &str = "/etc/cloud/cloudimg";
/// Where to look for the journal, the one to use first.
pub const JOURNALS: [&str; 2] = [JOURNAL, OLD_JOURNAL];

/// The originals of the files cloudimg changed, and a digest of what it wrote to each.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Journal {
    pub files: BTreeMap<String, JournalEntry>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JournalEntry {
    /// The file before cloudimg first changed it; `None` when cloudimg created it.
    pub original: Option<String>,
    pub written_sha256: String,
}

pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl Journal {
    /// A journal that is not cloudimg's makes the guest a bad guest (exit status 4).
    pub fn parse(path: &str, text: &str) -> Result<Journal> {
        serde_json::from_str(text)
            .with_context(|| format!("{path} in the guest is not cloudimg's journal"))
            .map_err(with_code(BAD_GUEST))
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("a journal serializes") + "\n"
    }

    /// Notes that `path`, which held `current`, now holds `written`. An earlier original is kept
    /// while the file still holds what cloudimg wrote then, so repeated runs undo to the first state.
    pub fn record(&mut self, path: &str, current: Option<&str>, written: &str) {
        let original = match self.files.get(path) {
            Some(entry) if current.map(sha256_hex).as_deref() == Some(entry.written_sha256.as_str()) => {
                entry.original.clone()
            }
            _ => current.map(str::to_string),
        };
        self.files.insert(path.to_string(), JournalEntry { original, written_sha256: sha256_hex(written) });
    }
}

/// What undoing the journal does to one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Put the original back (`None`: delete the file cloudimg created).
    Restore(Option<String>),
    /// The file changed after cloudimg wrote it: left to the generic lock.
    ChangedSince,
}

pub fn undo(journal: &Journal, current: &BTreeMap<String, String>) -> BTreeMap<String, Undo> {
    journal
        .files
        .iter()
        .map(|(path, entry)| {
            let still_ours = current.get(path).map(|t| sha256_hex(t)).as_deref() == Some(entry.written_sha256.as_str());
            (path.clone(), if still_ours { Undo::Restore(entry.original.clone()) } else { Undo::ChangedSince })
        })
        .collect()
}

/// The generic lock on cloud-init files (lowest priority first, as `(path, text)`): every password
/// entry is removed (top-level `password`, `chpasswd.users` and `chpasswd.list`, and `passwd`,
/// `hashed_passwd`, `plain_text_passwd` in `users`), and if `ssh_pwauth` would still enable SSH
/// password login, the file that decides it sets `ssh_pwauth: false`. Returns the changed files'
/// new text and one line per change.
pub fn lock(files: &[(String, String)]) -> Result<(BTreeMap<String, String>, Vec<String>)> {
    let mut texts: Vec<(String, String)> = files.to_vec();
    let mut changed = BTreeMap::new();
    let mut notes = Vec::new();
    for (path, text) in texts.iter_mut() {
        let root = yaml11::parse(text).with_context(|| format!("reading {path} in the guest"))?.root;
        let changes = password_removals(&root);
        if changes.is_empty() {
            continue;
        }
        let edited = edit::edit_top_level(text, &changes).with_context(|| format!("editing {path} in the guest"))?;
        notes.extend(edited.changed_keys.iter().map(|k| format!("removed the passwords in `{k}` from {path}")));
        *text = edited.text;
        changed.insert(path.clone(), text.clone());
    }
    let parsed: Vec<ConfigFile> = texts
        .iter()
        .map(|(path, text)| Ok(ConfigFile { path: path.clone(), root: yaml11::parse(text)?.root }))
        .collect::<Result<_>>()?;
    let enables = merge::effective(&parsed).get("ssh_pwauth").is_some_and(is_true_like);
    if enables {
        let decider = merge::deciding_file(&parsed, &["ssh_pwauth"]).expect("a file sets ssh_pwauth").path.clone();
        let (_, text) = texts.iter_mut().find(|(p, _)| *p == decider).expect("the deciding file is listed");
        let edited = edit::set_top_level(text, &[("ssh_pwauth".into(), Value::Bool(false))])
            .with_context(|| format!("editing {decider} in the guest"))?;
        *text = edited.text;
        changed.insert(decider.clone(), text.clone());
        notes.push(format!("set `ssh_pwauth: false` in {decider}"));
    }
    Ok((changed, notes))
}

/// The top-level changes that take every password out of one file's root mapping.
fn password_removals(root: &Mapping) -> Vec<(String, Option<Value>)> {
    let mut out = Vec::new();
    if root.get("password").is_some() {
        out.push(("password".to_string(), None));
    }
    if let Some(Value::Map(chpasswd)) = root.get("chpasswd") {
        let mut new = chpasswd.clone();
        if let Some(Value::Seq(users)) = chpasswd.get("users") {
            let kept: Vec<Value> = users
                .iter()
                .filter(|u| u.as_map().is_none_or(|m| m.get("password").is_none() && m.get("type").is_none()))
                .cloned()
                .collect();
            if kept.is_empty() {
                new.remove("users");
            } else {
                new.insert("users", Value::Seq(kept));
            }
        }
        if chpasswd.get("list").is_some() {
            new.remove("list");
        }
        if &new != chpasswd {
            out.push(("chpasswd".to_string(), (!new.is_empty()).then_some(Value::Map(new))));
        }
    }
    if let Some(Value::Seq(users)) = root.get("users") {
        let new: Vec<Value> = users
            .iter()
            .map(|u| match u {
                Value::Map(m) => {
                    let mut m = m.clone();
                    for key in ["passwd", "hashed_passwd", "plain_text_passwd"] {
                        m.remove(key);
                    }
                    Value::Map(m)
                }
                other => other.clone(),
            })
            .collect();
        if &new != users {
            out.push(("users".to_string(), Some(Value::Seq(new))));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
    }

    #[test]
    fn every_password_goes_and_other_keys_stay() {
        let (changed, notes) = lock(&files(&[
            (
                "/etc/cloud/cloud.cfg",
                "# keep me\npassword: secret\nchpasswd:\n  expire: false\n  users:\n  - {name: debian, password: x, type: text}\n  - {name: bob, type: RANDOM}\n  list: |\n    a:b\nusers:\n- default\n- {name: ops, plain_text_passwd: pw, shell: /bin/sh}\nssh_pwauth: true\n",
            ),
            ("/etc/cloud/cloud.cfg.d/50-x.cfg", "ssh_pwauth: yes\n"),
        ]))
        .unwrap();
        assert_eq!(
            changed["/etc/cloud/cloud.cfg"],
            "# keep me\nchpasswd:\n  expire: false\nusers:\n- default\n- name: ops\n  shell: '/bin/sh'\nssh_pwauth: true\n"
        );
        assert_eq!(changed["/etc/cloud/cloud.cfg.d/50-x.cfg"], "ssh_pwauth: false\n");
        assert_eq!(notes.len(), 4, "{notes:?}");
    }

    #[test]
    fn a_locked_configuration_is_left_alone() {
        let (changed, _) = lock(&files(&[("/etc/cloud/cloud.cfg", "users: [default]\nssh_pwauth: false\n")])).unwrap();
        assert!(changed.is_empty());
    }

    #[test]
    fn the_journal_keeps_the_first_original_and_notices_later_edits() {
        let mut journal = Journal::default();
        journal.record("/etc/cloud/cloud.cfg", Some("orig\n"), "first\n");
        journal.record("/etc/cloud/cloud.cfg", Some("first\n"), "second\n");
        journal.record("/etc/cloud/cloud.cfg.d/99-cloudimg.cfg", None, "new\n");
        let journal = Journal::parse(JOURNAL, &journal.to_text()).unwrap();
        let current: BTreeMap<String, String> = [
            ("/etc/cloud/cloud.cfg".to_string(), "second\n".to_string()),
            ("/etc/cloud/cloud.cfg.d/99-cloudimg.cfg".to_string(), "edited by hand\n".to_string()),
        ]
        .into();
        let undo = undo(&journal, &current);
        assert_eq!(undo["/etc/cloud/cloud.cfg"], Undo::Restore(Some("orig\n".into())));
        assert_eq!(undo["/etc/cloud/cloud.cfg.d/99-cloudimg.cfg"], Undo::ChangedSince);
        let mut moved = Journal::default();
        moved.record("/etc/cloud/cloud.cfg", Some("orig\n"), "first\n");
        moved.record("/etc/cloud/cloud.cfg", Some("changed by someone\n"), "third\n");
        assert_eq!(moved.files["/etc/cloud/cloud.cfg"].original.as_deref(), Some("changed by someone\n"));
    }
}
