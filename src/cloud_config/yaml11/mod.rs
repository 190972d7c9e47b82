//! YAML with the meaning cloud-init gives it: PyYAML's `safe_load`, which implements YAML 1.1.
//!
//! YAML 1.2 libraries read `yes`, `on` or `0777` as strings or decimals where PyYAML reads a boolean
//! or an octal integer, so the scalars of yaml-rust2's event stream are resolved here with PyYAML's
//! own implicit-resolver patterns. The loader also records where each top-level key sits in the text,
//! which is what lets the editor replace one key's lines and keep every other byte.

use std::hash::{Hash, Hasher};

use anyhow::{bail, Result};
use indexmap::IndexMap;

mod load;
mod render;

pub use load::resolve_plain;
use load::Loader;
pub use render::{quote_str, render_entry, render_mapping};

/// A YAML value as PyYAML's `safe_load` builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    /// Kept as text in a canonical form, so that equality is exact and NaN equals NaN.
    Float(String),
    Str(String),
    /// Values that PyYAML turns into other Python types (timestamps, binary, sets, big integers):
    /// compared by their source text.
    Other {
        kind: &'static str,
        text: String,
    },
    Seq(Vec<Value>),
    Map(Mapping),
}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            // Exactly as a `str` hashes, so that a mapping can be searched with a `&str` (see `Equivalent`).
            Value::Str(s) => s.hash(state),
            other => {
                std::mem::discriminant(other).hash(state);
                match other {
                    Value::Null | Value::Str(_) => {}
                    Value::Bool(b) => b.hash(state),
                    Value::Int(i) => i.hash(state),
                    Value::Float(f) => f.hash(state),
                    Value::Other { kind, text } => (kind, text).hash(state),
                    Value::Seq(items) => items.hash(state),
                    // Mappings are equal whatever their order, so their hash may not depend on it.
                    Value::Map(m) => m.len().hash(state),
                }
            }
        }
    }
}

impl indexmap::Equivalent<Value> for str {
    fn equivalent(&self, key: &Value) -> bool {
        key.as_str() == Some(self)
    }
}

/// A mapping in document order; a repeated key keeps its first place and its last value, as in
/// PyYAML. Indexed by key, so that building or merging one with many keys stays linear (a hostile
/// file may hold 100 000).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping(IndexMap<Value, Value>);

impl Mapping {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn get_value(&self, key: &Value) -> Option<&Value> {
        self.0.get(key)
    }

    /// Sets `key`, keeping its position when it exists.
    pub fn insert(&mut self, key: &str, value: Value) {
        self.insert_value(Value::Str(key.to_string()), value);
    }

    /// Sets `key`, keeping its position when it exists.
    pub fn insert_value(&mut self, key: Value, value: Value) {
        self.0.insert(key, value);
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.shift_remove(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Value, &Value)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&Mapping> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Python's truthiness, which is how cloud-init tests most settings.
    pub fn is_truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => f.parse::<f64>().map(|f| f != 0.0).unwrap_or(true),
            Value::Str(s) => !s.is_empty(),
            Value::Other { .. } => true,
            Value::Seq(s) => !s.is_empty(),
            Value::Map(m) => !m.is_empty(),
        }
    }
}

/// Where a top-level key's entry lies in the text: lines `first_line..end_line` (0-based, end
/// exclusive), trailing blank lines and column-0 comments excluded (they usually introduce the next key).
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpan {
    pub key: String,
    pub first_line: usize,
    pub end_line: usize,
}

/// A parsed cloud-config file.
#[derive(Debug, Clone)]
pub struct Document {
    /// The root mapping; an empty or comment-only file is an empty mapping, as cloud-init treats it.
    pub root: Mapping,
    /// Spans of the root mapping's keys, in order, when the root is a block mapping at column 0.
    pub spans: Vec<KeySpan>,
    /// Whether the root is a block mapping at column 0 (or empty), i.e. keys can be edited line-wise.
    pub editable_layout: bool,
    /// Whether a top-level key is given more than once (only its last entry is in `spans`).
    pub repeated_keys: bool,
}

/// Limits that keep hostile input from costing unbounded memory or stack.
const MAX_NODES: usize = 200_000;
const MAX_DEPTH: usize = 128;

/// Parses `text` as PyYAML's `safe_load` would, refusing anything it would refuse and anything that is
/// not a mapping at the top.
pub fn parse(text: &str) -> Result<Document> {
    let mut loader = Loader::new(text);
    let root = loader.load()?;
    let root = match root {
        None | Some(Value::Null) => Mapping::default(),
        Some(Value::Map(m)) => m,
        Some(other) => bail!("the top level is a {}, not a mapping", kind_name(&other)),
    };
    let (spans, editable_layout) = loader.finish_spans(text);
    Ok(Document { root, spans, editable_layout, repeated_keys: loader.repeated_root_keys })
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float(_) => "float",
        Value::Str(_) => "string",
        Value::Other { kind, .. } => kind,
        Value::Seq(_) => "list",
        Value::Map(_) => "mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_each_top_level_key_and_leave_comments_for_the_next() {
        let text = "# head\na: 1\nb:\n  c: 2\n  # inner\n\n# about d\nd: [1, 2]\n";
        let doc = parse(text).unwrap();
        assert!(doc.editable_layout);
        let spans: Vec<_> = doc.spans.iter().map(|s| (s.key.as_str(), s.first_line, s.end_line)).collect();
        assert_eq!(spans, vec![("a", 1, 2), ("b", 2, 5), ("d", 7, 8)]);
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_and_merge_keys_fill_in() {
        let doc = parse("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nk: 1\nk: 2\n").unwrap();
        assert_eq!(doc.root.get("k"), Some(&Value::Int(2)));
        let m = doc.root.get("m").unwrap().as_map().unwrap();
        assert_eq!(m.get("x"), Some(&Value::Int(1)));
        assert_eq!(m.get("y"), Some(&Value::Int(3)));
    }

    #[test]
    fn a_hundred_thousand_keys_load_in_linear_time_with_pyyamls_rules_for_repeats() {
        // With a linear search per insert this took minutes (a hostile cloud.cfg may be built so).
        let mut text = String::new();
        for i in 0..80_000 {
            text.push_str(&format!("k{i}: {i}\n"));
        }
        for i in (0..80_000).step_by(8) {
            text.push_str(&format!("k{i}: again\n"));
        }
        let doc = parse(&text).unwrap();
        assert_eq!(doc.root.len(), 80_000);
        assert_eq!(doc.root.get("k8"), Some(&Value::Str("again".into())), "a repeated key keeps its last value");
        assert_eq!(doc.root.get("k9"), Some(&Value::Int(9)));
        let first: Vec<_> = doc.root.iter().take(3).map(|(k, _)| k.as_str().unwrap()).collect();
        assert_eq!(first, ["k0", "k1", "k2"], "and its first place");
        assert_eq!(doc.spans.len(), 80_000);
        let span = doc.spans.iter().find(|s| s.key == "k8").unwrap();
        assert_eq!(span.first_line, 80_001, "its entry in the text is the last one, which PyYAML reads");
        let merged = crate::cloud_config::merge::overlay(&doc.root, &doc.root);
        assert_eq!(merged, doc.root);
        let mut changed = doc.root.clone();
        changed.insert("k79999", Value::Null);
        assert_ne!(changed, doc.root);
    }

    #[test]
    fn refuses_what_cloud_init_cannot_use() {
        for (text, why) in [
            ("- a\n- b\n", "not a mapping"),
            ("a: 1\n---\nb: 2\n", "second YAML document"),
            ("a: [1\n", "invalid YAML"),
            ("a: !python/object x\n", "tag"),
            ("a:\n\t- b\n", "invalid YAML"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = (b'a' + i) as char;
            let next = (b'a' + i + 1) as char;
            bomb.push_str(&format!("{next}: &{next} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        assert!(format!("{:#}", parse(&bomb).unwrap_err()).contains("alias bomb"));
        let deep = format!("a: {}{}\n", "[".repeat(500), "]".repeat(500));
        assert!(parse(&deep).is_err());
    }
}
