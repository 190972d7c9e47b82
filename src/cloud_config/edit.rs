//! Replaces top-level entries of a cloud-config file while keeping every other byte.
//!
//! An entry whose value already equals the wanted one is not touched; a changed entry is re-rendered
//! in place; a new entry is appended. The result is parsed again and must equal the old mapping with
//! exactly the intended keys changed, or nothing is returned.

use anyhow::{bail, Context, Result};

use super::yaml11::{self, Mapping, Value};

/// The result of an edit.
#[derive(Debug, Clone, PartialEq)]
pub struct Edited {
    pub text: String,
    /// Keys whose entries were rewritten or added, in the order given.
    pub changed_keys: Vec<String>,
}

/// Sets each `(key, value)` at the top level of `text`.
pub fn set_top_level(text: &str, changes: &[(String, Value)]) -> Result<Edited> {
    let changes: Vec<(String, Option<Value>)> = changes.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
    edit_top_level(text, &changes)
}

/// Sets (`Some`) or removes (`None`) each top-level key of `text`.
pub fn edit_top_level(text: &str, changes: &[(String, Option<Value>)]) -> Result<Edited> {
    let doc = yaml11::parse(text)?;
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    if lines.last().is_some_and(|l| !l.ends_with('\n')) {
        lines.last_mut().expect("checked above").push('\n');
    }
    let mut appended = String::new();
    let mut changed_keys = Vec::new();
    let mut expected = doc.root.clone();
    // Replace from the bottom up so earlier spans keep their line numbers.
    let mut replacements = Vec::new();
    // A key given twice is set once, to its last value.
    let mut unique: Vec<(&String, Option<&Value>)> = Vec::new();
    for (key, value) in changes {
        match unique.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value.as_ref(),
            None => unique.push((key, value.as_ref())),
        }
    }
    for (key, value) in unique {
        if doc.root.get(key) == value {
            continue;
        }
        changed_keys.push(key.clone());
        let Some(value) = value else {
            expected.remove(key);
            match doc.spans.iter().find(|s| &s.key == key) {
                Some(span) => replacements.push((span.first_line, span.end_line, String::new())),
                None => bail!("cannot remove `{key}`: the file's top level is not a plain block mapping"),
            }
            continue;
        };
        expected.insert(key, value.clone());
        let rendered = yaml11::render_entry(key, value, 0);
        match doc.spans.iter().find(|s| &s.key == key) {
            Some(span) => replacements.push((span.first_line, span.end_line, rendered)),
            None if doc.root.get(key).is_some() || !doc.editable_layout => {
                bail!("cannot edit `{key}`: the file's top level is not a plain block mapping")
            }
            None => appended.push_str(&rendered),
        }
    }
    if changed_keys.is_empty() {
        return Ok(Edited { text: text.to_string(), changed_keys });
    }
    replacements.sort_by_key(|(first, _, _)| std::cmp::Reverse(*first));
    for (first, end, rendered) in replacements {
        lines.splice(first..end, std::iter::once(rendered));
    }
    let mut new_text = lines.concat();
    new_text.push_str(&appended);
    verify(&new_text, &expected)?;
    Ok(Edited { text: new_text, changed_keys })
}

fn verify(new_text: &str, expected: &Mapping) -> Result<()> {
    let reparsed = yaml11::parse(new_text).context("the edited text no longer parses (this is a bug in cloudimg)")?;
    if &reparsed.root != expected {
        bail!("the edited text does not read back as intended (this is a bug in cloudimg); nothing was written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: Value) -> (String, Value) {
        (key.to_string(), value)
    }

    #[test]
    fn replaces_an_entry_in_place_and_keeps_comments_around_it() {
        let text = "# top\na: 1 # why a\nssh_pwauth: false\n\n# about b\nb:\n  - x\n";
        let edited = set_top_level(text, &[change("ssh_pwauth", Value::Bool(true))]).unwrap();
        assert_eq!(edited.text, "# top\na: 1 # why a\nssh_pwauth: true\n\n# about b\nb:\n  - x\n");
        assert_eq!(edited.changed_keys, vec!["ssh_pwauth"]);
    }

    #[test]
    fn appends_new_entries_and_adds_a_missing_final_newline() {
        let edited = set_top_level("a: 1", &[change("password", Value::Str("yes".into()))]).unwrap();
        assert_eq!(edited.text, "a: 1\npassword: 'yes'\n");
    }

    #[test]
    fn an_equal_value_leaves_the_text_alone() {
        let text = "ssh_pwauth: yes   # YAML 1.1 true\n";
        let edited = set_top_level(text, &[change("ssh_pwauth", Value::Bool(true))]).unwrap();
        assert_eq!(edited.text, text);
        assert!(edited.changed_keys.is_empty());
    }

    #[test]
    fn a_multi_line_entry_is_replaced_whole() {
        let text = "chpasswd:\n  list: |\n    a:b\n  expire: true\nz: 1\n";
        let mut m = Mapping::default();
        m.insert("expire", Value::Bool(false));
        let edited = set_top_level(text, &[change("chpasswd", Value::Map(m))]).unwrap();
        assert_eq!(edited.text, "chpasswd:\n  expire: false\nz: 1\n");
    }

    #[test]
    fn empty_and_comment_only_files_get_entries() {
        for text in ["", "# nothing\n"] {
            let edited = set_top_level(text, &[change("ssh_pwauth", Value::Bool(true))]).unwrap();
            assert_eq!(edited.text, format!("{text}ssh_pwauth: true\n"));
        }
    }

    #[test]
    fn removing_a_key_takes_its_lines_and_nothing_else() {
        let text = "# top\na: 1\npassword: x # old\n\n# about b\nb:\n  - x\n";
        let edited = edit_top_level(text, &[("password".into(), None), ("nothere".into(), None)]).unwrap();
        assert_eq!(edited.text, "# top\na: 1\n\n# about b\nb:\n  - x\n");
        assert_eq!(edited.changed_keys, vec!["password"]);
    }

    #[test]
    fn flow_style_roots_are_refused_rather_than_rewritten() {
        let err = set_top_level("{a: 1, ssh_pwauth: false}\n", &[change("ssh_pwauth", Value::Bool(true))]).unwrap_err();
        assert!(err.to_string().contains("not a plain block mapping"), "{err}");
    }

    #[test]
    fn text_after_a_document_end_marker_stays_after_it() {
        let text = "a: 1\n...\n# trailer\n";
        let edited = set_top_level(text, &[change("a", Value::Int(2))]).unwrap();
        assert_eq!(edited.text, "a: 2\n...\n# trailer\n");
    }
}
