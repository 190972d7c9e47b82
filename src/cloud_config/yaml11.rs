//! YAML with the meaning cloud-init gives it: PyYAML's `safe_load`, which implements YAML 1.1.
//!
//! YAML 1.2 libraries read `yes`, `on` or `0777` as strings or decimals where PyYAML reads a boolean
//! or an octal integer, so the scalars of yaml-rust2's event stream are resolved here with PyYAML's
//! own implicit-resolver patterns. The loader also records where each top-level key sits in the text,
//! which is what lets the editor replace one key's lines and keep every other byte.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use regex::Regex;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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

struct Loader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    anchors: HashMap<usize, Value>,
    nodes: usize,
    /// (key, 1-based line, 1-based column) of each root-level key, in order, repeats included.
    root_keys: Vec<(String, usize, usize)>,
    /// 1-based line where the parser ended the root mapping.
    root_end_line: Option<usize>,
    repeated_root_keys: bool,
}

impl<'a> Loader<'a> {
    fn new(text: &'a str) -> Self {
        Loader {
            parser: Parser::new_from_str(text),
            anchors: HashMap::new(),
            nodes: 0,
            root_keys: Vec::new(),
            root_end_line: None,
            repeated_root_keys: false,
        }
    }

    fn next(&mut self) -> Result<(Event, Marker)> {
        self.parser.next_token().map_err(|e| {
            let m = e.marker();
            anyhow::anyhow!("invalid YAML at line {}, column {}: {}", m.line(), m.col() + 1, e.info())
        })
    }

    fn load(&mut self) -> Result<Option<Value>> {
        let mut root = None;
        let mut documents = 0;
        loop {
            let (event, marker) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::DocumentStart => {
                    documents += 1;
                    if documents > 1 {
                        bail!("line {}: a second YAML document; cloud-init reads exactly one", marker.line());
                    }
                }
                Event::StreamEnd => return Ok(root),
                event => root = Some(self.node(event, marker, 0)?),
            }
        }
    }

    fn count_node(&mut self, weight: usize) -> Result<()> {
        self.nodes += weight;
        if self.nodes > MAX_NODES {
            bail!("the YAML expands to more than {MAX_NODES} values (an alias bomb?)");
        }
        Ok(())
    }

    fn node(&mut self, event: Event, marker: Marker, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            bail!("line {}: YAML nested deeper than {MAX_DEPTH} levels", marker.line());
        }
        self.count_node(1)?;
        let (value, anchor) = match event {
            Event::Alias(id) => {
                let value = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .with_context(|| format!("line {}: alias to an unknown anchor", marker.line()))?;
                self.count_node(node_count(&value))?;
                return Ok(value);
            }
            Event::Scalar(text, style, anchor, tag) => (resolve_scalar(&text, style, tag.as_ref(), marker)?, anchor),
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq", marker)?;
                let mut items = Vec::new();
                loop {
                    let (event, marker) = self.next()?;
                    if event == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(event, marker, depth + 1)?);
                }
                (Value::Seq(items), anchor)
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map", marker)?;
                (Value::Map(self.mapping(depth)?), anchor)
            }
            other => bail!("line {}: unexpected YAML event {other:?}", marker.line()),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }

    fn mapping(&mut self, depth: usize) -> Result<Mapping> {
        let mut map = Mapping::default();
        let mut merges = Vec::new();
        loop {
            let (event, marker) = self.next()?;
            if event == Event::MappingEnd {
                if depth == 0 {
                    self.root_end_line = Some(marker.line());
                }
                break;
            }
            let is_merge_key = matches!(&event, Event::Scalar(t, TScalarStyle::Plain, _, None) if t == "<<");
            let key = self.node(event, marker, depth + 1)?;
            if matches!(key, Value::Seq(_) | Value::Map(_)) {
                bail!("line {}: a list or mapping used as a key", marker.line());
            }
            let (event, vmarker) = self.next()?;
            let value = self.node(event, vmarker, depth + 1)?;
            if is_merge_key {
                merges.push((value, marker));
                continue;
            }
            if depth == 0 {
                if let Value::Str(k) = &key {
                    self.root_keys.push((k.clone(), marker.line(), marker.col()));
                }
                self.repeated_root_keys |= map.get_value(&key).is_some();
            }
            map.insert_value(key, value);
        }
        // PyYAML's `<<`: keys from merged mappings fill in what the mapping does not set itself.
        for (value, marker) in merges {
            let sources = match value {
                Value::Map(m) => vec![m],
                Value::Seq(items) => items
                    .into_iter()
                    .map(|v| match v {
                        Value::Map(m) => Ok(m),
                        _ => bail!("line {}: `<<` merges only mappings", marker.line()),
                    })
                    .collect::<Result<_>>()?,
                _ => bail!("line {}: `<<` merges only mappings", marker.line()),
            };
            for source in sources {
                for (k, v) in source.0 {
                    map.0.entry(k).or_insert(v);
                }
            }
        }
        Ok(map)
    }

    fn finish_spans(&self, text: &str) -> (Vec<KeySpan>, bool) {
        let lines: Vec<&str> = text.lines().collect();
        let first_content = lines
            .iter()
            .map(|l| l.trim_start())
            .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("---") && !l.starts_with('%'));
        let flow_root = first_content.is_some_and(|l| l.starts_with('{'));
        let all_col0 = self.root_keys.iter().all(|(_, _, col)| *col == 0);
        let editable = !flow_root && all_col0;
        if !editable {
            return (Vec::new(), false);
        }
        // A repeated key's entry is its last one, which is the value PyYAML keeps.
        let mut seen = HashSet::new();
        let mut starts: Vec<(String, usize)> = self
            .root_keys
            .iter()
            .rev()
            .filter(|(k, _, _)| seen.insert(k.as_str()))
            .map(|(k, line, _)| (k.clone(), line - 1))
            .collect();
        starts.sort_by_key(|(_, line)| *line);
        let doc_end = document_end_line(&lines, self.root_end_line.map_or(lines.len(), |l| l.saturating_sub(1)));
        let spans = starts
            .iter()
            .enumerate()
            .map(|(i, (key, first))| {
                let mut end = starts.get(i + 1).map(|(_, l)| *l).unwrap_or(doc_end);
                while end > first + 1 && is_separator_line(lines.get(end - 1).copied().unwrap_or("")) {
                    end -= 1;
                }
                KeySpan { key: key.clone(), first_line: *first, end_line: end }
            })
            .collect();
        (spans, true)
    }
}

/// The parser ends a block mapping at the next token, which may sit lines after the last value, or
/// at a `...` end marker; the text after an end marker is not part of any key's entry.
fn document_end_line(lines: &[&str], parser_end: usize) -> usize {
    let end_marker = lines.iter().position(|l| *l == "..." || l.starts_with("... "));
    end_marker.unwrap_or(lines.len()).min(lines.len().max(parser_end))
}

fn is_separator_line(line: &str) -> bool {
    line.trim().is_empty() || line.starts_with('#')
}

fn node_count(v: &Value) -> usize {
    match v {
        Value::Seq(items) => 1 + items.iter().map(node_count).sum::<usize>(),
        Value::Map(m) => 1 + m.iter().map(|(k, v)| node_count(k) + node_count(v)).sum::<usize>(),
        _ => 1,
    }
}

const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

fn core_tag(tag: Option<&Tag>) -> Option<String> {
    tag.map(|t| {
        let full = format!("{}{}", t.handle, t.suffix);
        full.strip_prefix(CORE_TAG_PREFIX).map(str::to_string).unwrap_or(full)
    })
}

fn check_collection_tag(tag: Option<&Tag>, expected: &str, marker: Marker) -> Result<()> {
    match core_tag(tag) {
        None => Ok(()),
        Some(t) if t == expected || (expected == "map" && (t == "omap" || t == "set")) => Ok(()),
        Some(t) => bail!("line {}: tag `{t}` is not one that PyYAML's safe loader accepts here", marker.line()),
    }
}

static BOOL_TRUE: &[&str] = &["yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"];
static BOOL_FALSE: &[&str] = &["no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"];
static NULLS: &[&str] = &["", "~", "null", "Null", "NULL"];

// PyYAML's implicit resolver patterns (resolver.py), anchored.
static INT_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$",
    )
    .expect("valid int pattern")
});
static FLOAT_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
    )
    .expect("valid float pattern")
});
static TIMESTAMP_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$",
    )
    .expect("valid timestamp pattern")
});

/// What a plain (unquoted) scalar means to PyYAML.
pub fn resolve_plain(text: &str) -> Value {
    if BOOL_TRUE.contains(&text) {
        Value::Bool(true)
    } else if BOOL_FALSE.contains(&text) {
        Value::Bool(false)
    } else if NULLS.contains(&text) {
        Value::Null
    } else if INT_RE.is_match(text) {
        parse_int(text).unwrap_or_else(|| Value::Other { kind: "integer", text: text.to_string() })
    } else if FLOAT_RE.is_match(text) {
        Value::Float(canonical_float(text))
    } else if TIMESTAMP_RE.is_match(text) {
        Value::Other { kind: "timestamp", text: text.to_string() }
    } else if text == "=" {
        Value::Other { kind: "value", text: text.to_string() }
    } else {
        Value::Str(text.to_string())
    }
}

fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>, marker: Marker) -> Result<Value> {
    match core_tag(tag).as_deref() {
        None if style == TScalarStyle::Plain => Ok(resolve_plain(text)),
        None | Some("str") => Ok(Value::Str(text.to_string())),
        Some("bool") | Some("int") | Some("float") | Some("null") => Ok(resolve_plain(text)),
        Some(kind @ ("binary" | "timestamp")) => {
            Ok(Value::Other { kind: if kind == "binary" { "binary" } else { "timestamp" }, text: text.to_string() })
        }
        Some(t) => bail!("line {}: tag `{t}` is not one that PyYAML's safe loader accepts", marker.line()),
    }
}

/// PyYAML's `construct_yaml_int`, including its base-60 (`1:30` = 90) and leading-zero octal forms.
fn parse_int(text: &str) -> Option<Value> {
    let cleaned = text.replace('_', "");
    let (negative, digits) = match cleaned.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, cleaned.strip_prefix('+').unwrap_or(&cleaned)),
    };
    let magnitude = if digits == "0" {
        0
    } else if let Some(bin) = digits.strip_prefix("0b") {
        i128::from_str_radix(bin, 2).ok()?
    } else if let Some(hex) = digits.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = digits.strip_prefix('0') {
        i128::from_str_radix(oct, 8).ok()?
    } else if digits.contains(':') {
        digits.split(':').try_fold(0i128, |acc, part| acc.checked_mul(60)?.checked_add(part.parse::<i128>().ok()?))?
    } else {
        digits.parse::<i128>().ok()?
    };
    Some(Value::Int(if negative { -magnitude } else { magnitude }))
}

fn canonical_float(text: &str) -> String {
    let cleaned = text.replace('_', "").to_ascii_lowercase();
    if cleaned.ends_with("nan") {
        return ".nan".into();
    }
    if cleaned.ends_with("inf") {
        return if cleaned.starts_with('-') { "-.inf" } else { ".inf" }.into();
    }
    let value = if cleaned.contains(':') {
        let (sign, body) = match cleaned.strip_prefix('-') {
            Some(rest) => (-1.0, rest),
            None => (1.0, cleaned.trim_start_matches('+')),
        };
        sign * body.split(':').fold(0.0, |acc, part| acc * 60.0 + part.parse::<f64>().unwrap_or(0.0))
    } else {
        cleaned.parse::<f64>().unwrap_or(f64::NAN)
    };
    format!("{value:?}")
}

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

    #[test]
    fn plain_scalars_resolve_like_pyyaml() {
        let cases: &[(&str, Value)] = &[
            ("yes", Value::Bool(true)),
            ("On", Value::Bool(true)),
            ("off", Value::Bool(false)),
            ("NO", Value::Bool(false)),
            ("y", Value::Str("y".into())),
            ("~", Value::Null),
            ("", Value::Null),
            ("0777", Value::Int(0o777)),
            ("0x1F", Value::Int(31)),
            ("0b101", Value::Int(5)),
            ("1_000", Value::Int(1000)),
            ("12:30:00", Value::Int(45000)),
            ("-1:30", Value::Int(-90)),
            ("09", Value::Str("09".into())),
            ("1e3", Value::Str("1e3".into())),
            ("1.5", Value::Float("1.5".into())),
            ("1.0e+3", Value::Float("1000.0".into())),
            (".NaN", Value::Float(".nan".into())),
            ("-.inf", Value::Float("-.inf".into())),
            ("2001-12-14", Value::Other { kind: "timestamp", text: "2001-12-14".into() }),
            ("$6$abc", Value::Str("$6$abc".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(&resolve_plain(text), expected, "{text:?}");
        }
    }

    #[test]
    fn quoted_scalars_stay_strings() {
        let doc = parse("a: 'yes'\nb: \"on\"\nc: yes\nd: !!str 0777\n").unwrap();
        assert_eq!(doc.root.get("a"), Some(&Value::Str("yes".into())));
        assert_eq!(doc.root.get("b"), Some(&Value::Str("on".into())));
        assert_eq!(doc.root.get("c"), Some(&Value::Bool(true)));
        assert_eq!(doc.root.get("d"), Some(&Value::Str("0777".into())));
    }

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
