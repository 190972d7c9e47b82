//! Writing values back as YAML that PyYAML reads as the same values.

use std::sync::LazyLock;

use regex::Regex;

use super::{resolve_plain, Mapping, Value};

/// A scalar that PyYAML reads back as exactly this string.
///
/// Plain when that is unambiguous (an identifier-like word that resolves to a string), otherwise
/// single-quoted, or double-quoted with escapes when the string holds characters that YAML does not
/// allow unescaped (control characters and the like).
pub fn quote_str(s: &str) -> String {
    static PLAIN_SAFE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$").expect("valid pattern"));
    if PLAIN_SAFE.is_match(s) && resolve_plain(s) == Value::Str(s.to_string()) {
        return s.to_string();
    }
    if s.chars().all(is_printable_in_single_quotes) {
        return format!("'{}'", s.replace('\'', "''"));
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_printable_in_single_quotes(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// PyYAML's reader accepts only these characters unescaped (reader.py NON_PRINTABLE); a tab,
/// newline or carriage return would be folded inside a quoted scalar, so those are escaped too.
fn is_printable_in_single_quotes(c: char) -> bool {
    matches!(c, '\x20'..='\x7e' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..='\u{10ffff}')
        && c != '\u{feff}'
}

/// Renders `key: value` as a block at `indent` spaces, ending with a newline.
pub fn render_entry(key: &str, value: &Value, indent: usize) -> String {
    let mut out = String::new();
    write_entry(&mut out, &quote_str(key), value, indent);
    out
}

/// Renders a whole mapping as block entries at column 0.
pub fn render_mapping(map: &Mapping) -> String {
    let mut out = String::new();
    for (key, value) in map.iter() {
        write_entry(&mut out, &render_scalar(key), value, 0);
    }
    out
}

fn write_entry(out: &mut String, key: &str, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Map(m) if !m.is_empty() => {
            out.push_str(&format!("{pad}{key}:\n"));
            for (k, v) in m.iter() {
                write_entry(out, &render_scalar(k), v, indent + 2);
            }
        }
        Value::Seq(items) if !items.is_empty() => {
            out.push_str(&format!("{pad}{key}:\n"));
            write_items(out, items, indent);
        }
        scalar => out.push_str(&format!("{pad}{key}: {}\n", render_scalar(scalar))),
    }
}

fn write_items(out: &mut String, items: &[Value], indent: usize) {
    let pad = " ".repeat(indent);
    for item in items {
        match item {
            Value::Map(m) if !m.is_empty() => {
                let mut block = String::new();
                for (k, v) in m.iter() {
                    write_entry(&mut block, &render_scalar(k), v, indent + 2);
                }
                // The first entry shares the line with the dash.
                out.push_str(&format!("{pad}- {}", &block[indent + 2..]));
            }
            Value::Seq(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}-\n"));
                write_items(out, inner, indent + 2);
            }
            scalar => out.push_str(&format!("{pad}- {}\n", render_scalar(scalar))),
        }
    }
}

fn render_scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.clone(),
        Value::Str(s) => quote_str(s),
        Value::Other { kind: "binary", text } => format!("!!binary {}", quote_str(text)),
        Value::Other { text, .. } => text.clone(),
        Value::Seq(_) => "[]".into(),
        Value::Map(_) => "{}".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    #[test]
    fn quote_str_reads_back_as_the_same_string() {
        for s in [
            "yes",
            "on",
            "12:30:00",
            "2001-12-14",
            "null",
            "",
            "a b",
            "it's",
            "#x",
            "- x",
            "x: y",
            "plain",
            "tab\there",
            "\u{1}",
            "é",
            "\\",
        ] {
            let text = format!("k: {}\n", quote_str(s));
            let doc = parse(&text).unwrap();
            assert_eq!(doc.root.get("k"), Some(&Value::Str(s.into())), "{text:?}");
        }
    }

    #[test]
    fn rendered_entries_parse_back_to_the_value() {
        let mut user = Mapping::default();
        user.insert("name", Value::Str("debian".into()));
        user.insert("password", Value::Str("$6$salt$hash".into()));
        user.insert("type", Value::Str("hash".into()));
        let mut chpasswd = Mapping::default();
        chpasswd.insert("expire", Value::Bool(false));
        chpasswd.insert("users", Value::Seq(vec![Value::Map(user.clone()), Value::Map(user)]));
        chpasswd.insert("list", Value::Seq(vec![Value::Str("a:b".into())]));
        let value = Value::Map(chpasswd);
        let text = render_entry("chpasswd", &value, 0);
        assert_eq!(parse(&text).unwrap().root.get("chpasswd"), Some(&value), "{text}");
    }
}
