//! Where cloud-config keeps passwords, and a file's text with every one of them masked: what a dry
//! run may show, whatever the path that put a password into the text (an entry written now, one kept
//! because it already stands for the password, another user's entry in a re-rendered block, a
//! comment).

use std::sync::LazyLock;

use regex::Regex;

use super::yaml11::{self, Mapping, Value};

/// What stands in for the password being written.
pub const MASK: &str = "********";
/// What stands in for any other password the file holds (an existing hash, another user's).
pub const HIDDEN: &str = "<hidden>";

/// Keys whose value is a password wherever they appear: `password` (top level, `chpasswd.users`),
/// and users-groups' `passwd`, `hashed_passwd` and `plain_text_passwd` (in `users` and
/// `system_info.default_user`).
const PASSWORD_KEYS: &[&str] = &["password", "passwd", "hashed_passwd", "plain_text_passwd"];

/// Anything that looks like a crypt(3) hash, wherever it stands (comments, `runcmd`, `write_files`).
static CRYPT_HASH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\$(?:1|2[abxy]|5|6|7|y|gy|md5|sha1)\$[./0-9A-Za-z=,$]{8,}").expect("valid pattern"));

/// `root` with every password replaced: by [`MASK`] where it is `ours` (the value being written),
/// by [`HIDDEN`] elsewhere. `chpasswd.list` holds `user:password` lines.
pub fn masked(root: &Mapping, ours: Option<&str>) -> Mapping {
    let mut out = masked_map(root, ours);
    if let Some(Value::Map(chpasswd)) = out.get("chpasswd") {
        if let Some(list) = chpasswd.get("list") {
            let mut chpasswd = chpasswd.clone();
            chpasswd.insert("list", masked_list(list, ours));
            out.insert("chpasswd", Value::Map(chpasswd));
        }
    }
    out
}

/// Whether the configuration holds a password anywhere.
pub fn holds_secret(root: &Mapping) -> bool {
    masked(root, None) != *root
}

fn masked_value(value: &Value, ours: Option<&str>) -> Value {
    match value {
        Value::Map(m) => Value::Map(masked_map(m, ours)),
        Value::Seq(items) => Value::Seq(items.iter().map(|v| masked_value(v, ours)).collect()),
        scalar => scalar.clone(),
    }
}

fn masked_map(map: &Mapping, ours: Option<&str>) -> Mapping {
    let mut out = Mapping::default();
    for (key, value) in map.iter() {
        let is_password = key.as_str().is_some_and(|k| PASSWORD_KEYS.contains(&k));
        let value = match value {
            Value::Null => Value::Null,
            Value::Str(s) if s.is_empty() => value.clone(),
            Value::Seq(_) | Value::Map(_) => masked_value(value, ours),
            Value::Str(s) if is_password => Value::Str(mask_for(s, ours).into()),
            // A number or a boolean is a password too where cloud-init takes the value as text.
            _ if is_password => Value::Str(HIDDEN.into()),
            scalar => scalar.clone(),
        };
        out.insert_value(key.clone(), value);
    }
    out
}

fn mask_for(password: &str, ours: Option<&str>) -> &'static str {
    if Some(password) == ours {
        MASK
    } else {
        HIDDEN
    }
}

/// `chpasswd.list` as text (`user:password` lines) or as a list of such lines.
fn masked_list(list: &Value, ours: Option<&str>) -> Value {
    let line = |line: &str| match line.split_once(':') {
        Some((user, password)) => format!("{user}:{}", mask_for(password, ours)),
        None if line.trim().is_empty() => line.to_string(),
        None => HIDDEN.to_string(),
    };
    match list {
        Value::Str(text) => Value::Str(text.split('\n').map(line).collect::<Vec<_>>().join("\n")),
        Value::Seq(items) => Value::Seq(
            items
                .iter()
                .map(|item| match item {
                    Value::Str(s) => Value::Str(line(s)),
                    other => masked_value(other, ours),
                })
                .collect(),
        ),
        other => masked_value(other, ours),
    }
}

/// `text` (a cloud-config file that parses) with every password masked and every other byte kept
/// where possible: a top-level entry that holds a password is shown rendered from its masked value.
/// When that cannot account for every password (a layout that is not a block mapping, a key given
/// twice, whose earlier entry no span covers), the whole file is shown rendered from its masked
/// configuration. `ours` is the value being written (hash or `--plaintext` clear text): it is masked
/// wherever it appears, as is anything that looks like a crypt(3) hash.
pub fn masked_text(text: &str, ours: Option<&str>) -> String {
    let Ok(doc) = yaml11::parse(text) else {
        return format!("# ({} lines that do not parse as YAML, not shown)\n", text.lines().count());
    };
    let masked_root = masked(&doc.root, ours);
    let mut out = if masked_root == doc.root {
        text.to_string()
    } else {
        entries_masked(text, &doc, &masked_root)
            .filter(|t| yaml11::parse(t).is_ok_and(|d| d.root == masked_root))
            .unwrap_or_else(|| yaml11::render_mapping(&masked_root))
    };
    if let Some(ours) = ours.filter(|o| out.contains(o)) {
        out = mask_occurrences(&out, ours);
    }
    CRYPT_HASH.replace_all(&out, HIDDEN).into_owned()
}

/// `text` with [`MASK`] for every occurrence of `secret` that stands on its own, not glued inside a
/// longer word (a short password such as `pw` inside `ssh_pwauth` is not that password).
fn mask_occurrences(text: &str, secret: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let (first, last) = (secret.chars().next(), secret.chars().next_back());
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (at, _) in text.match_indices(secret) {
        let before = text[..at].chars().next_back();
        let after = text[at + secret.len()..].chars().next();
        if (word(before) && word(first)) || (word(after) && word(last)) {
            continue;
        }
        out.push_str(&text[done..at]);
        out.push_str(MASK);
        done = at + secret.len();
    }
    out.push_str(&text[done..]);
    out
}

/// The text with each top-level entry whose value changes when masked re-rendered; `None` when the
/// layout does not allow it.
fn entries_masked(text: &str, doc: &yaml11::Document, masked_root: &Mapping) -> Option<String> {
    if !doc.editable_layout || doc.repeated_keys {
        return None;
    }
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    for span in doc.spans.iter().rev() {
        let masked = masked_root.get(&span.key)?;
        if doc.root.get(&span.key) != Some(masked) {
            lines.splice(span.first_line..span.end_line, [yaml11::render_entry(&span.key, masked, 0)]);
        }
    }
    Some(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "$6$ours$OURHASHOURHASHOURHASH";

    #[test]
    fn every_password_key_is_masked_and_nothing_else() {
        let text = "# the hash $6$comment$COMMENTHASHCOMMENT was here\n\
            password: s3cret # the default user's\n\
            chpasswd:\n  expire: true\n  users:\n  - {name: debian, password: $6$ours$OURHASHOURHASHOURHASH, type: hash}\n  \
            - {name: bob, password: 123456, type: text}\n  list: |\n    ops:hunter2\n    root:$6$r$ROOTHASHROOTHASH\n\
            users:\n- default\n- {name: ops, plain_text_passwd: hunter3, lock_passwd: false}\n\
            system_info:\n  default_user: {name: debian, passwd: $1$x$DEFAULTUSERHASH}\n\
            ssh_pwauth: true\n";
        let shown = masked_text(text, Some(OURS));
        for secret in
            ["s3cret", "OURHASH", "123456", "hunter2", "ROOTHASH", "hunter3", "DEFAULTUSERHASH", "COMMENTHASH"]
        {
            assert!(!shown.contains(secret), "{secret} shown:\n{shown}");
        }
        let doc = yaml11::parse(&shown).unwrap();
        assert_eq!(doc.root.get("password"), Some(&Value::Str(HIDDEN.into())));
        let users = crate::cloud_config::merge::lookup(&doc.root, &["chpasswd", "users"]).unwrap();
        let Value::Seq(users) = users else { panic!("{users:?}") };
        assert_eq!(users[0].as_map().unwrap().get("password"), Some(&Value::Str(MASK.into())));
        assert_eq!(users[1].as_map().unwrap().get("name"), Some(&Value::Str("bob".into())));
        assert_eq!(
            crate::cloud_config::merge::lookup(&doc.root, &["chpasswd", "list"]),
            Some(&Value::Str("ops:<hidden>\nroot:<hidden>\n".into()))
        );
        assert!(shown.starts_with("# the hash <hidden> was here\n"), "{shown}");
        assert!(shown.ends_with("ssh_pwauth: true\n"), "entries without passwords keep their bytes: {shown}");
        assert!(holds_secret(&yaml11::parse(text).unwrap().root));
        assert!(!holds_secret(&yaml11::parse("users: [default]\nchpasswd: {expire: false}\n").unwrap().root));
    }

    #[test]
    fn a_repeated_key_or_a_flow_root_shows_the_file_rendered_from_its_masked_values() {
        for text in ["password: first\nx: 1\npassword: second\n", "{password: first, x: 1}\n"] {
            let shown = masked_text(text, None);
            assert!(!shown.contains("first") && !shown.contains("second"), "{shown}");
            assert_eq!(yaml11::parse(&shown).unwrap().root.get("password"), Some(&Value::Str(HIDDEN.into())));
        }
    }

    #[test]
    fn the_value_written_is_masked_wherever_it_appears_and_files_without_passwords_are_untouched() {
        let plain = "ntp: {servers: [a]}\n# our plaintext: correct horse\nruncmd: [echo $1$2]\n";
        assert_eq!(masked_text(plain, Some("correct horse")), plain.replace("correct horse", MASK));
        assert_eq!(masked_text(plain, None), plain);
        let short = "ssh_pwauth: true\n# pw, or pw2\n";
        assert_eq!(masked_text(short, Some("pw")), "ssh_pwauth: true\n# ********, or pw2\n");
    }
}
