//! The loader: yaml-rust2's event stream turned into PyYAML's values, with PyYAML's implicit
//! resolvers, anchors and merge keys, and the place of each top-level key in the text.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use anyhow::{bail, Context, Result};
use regex::Regex;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::{KeySpan, Mapping, Value, MAX_DEPTH, MAX_NODES};

pub(super) struct Loader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    anchors: HashMap<usize, Value>,
    nodes: usize,
    /// (key, 1-based line, 1-based column) of each root-level key, in order, repeats included.
    root_keys: Vec<(String, usize, usize)>,
    /// 1-based line where the parser ended the root mapping.
    root_end_line: Option<usize>,
    pub(super) repeated_root_keys: bool,
}

impl<'a> Loader<'a> {
    pub(super) fn new(text: &'a str) -> Self {
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

    pub(super) fn load(&mut self) -> Result<Option<Value>> {
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

    pub(super) fn finish_spans(&self, text: &str) -> (Vec<KeySpan>, bool) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

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
}
