//! Property tests of the pure parts: the cloud.cfg editor never panics, and whenever it returns text,
//! that text parses (with cloudimg's PyYAML-rules loader, and for a sample with PyYAML itself) to
//! exactly the old mapping with the intended keys set; the image header parser never panics, and
//! never accepts a qcow2 that could pull in another file.

mod common;

use cloudimg::cloud_config::edit::set_top_level;
use cloudimg::cloud_config::yaml11::{self, Mapping, Value};
use cloudimg::image::header::{classify, Format};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Strings that PyYAML would read as something else when written plain, and other troublemakers.
const TRICKY: &[&str] = &[
    "yes",
    "No",
    "on",
    "OFF",
    "y",
    "~",
    "null",
    "NULL",
    "true",
    "12:30:00",
    "1:20",
    "2001-12-14",
    "0o17",
    "017",
    "0x1F",
    "1_000",
    "+12",
    ".inf",
    "-.Inf",
    ".NaN",
    "1e3",
    "-",
    ":",
    "? x",
    "#x",
    "x #y",
    "- a",
    "a: b",
    "'",
    "\"",
    "",
    " lead",
    "trail ",
    "\t",
    "a\tb",
    "multi\nline",
    "€uro",
    "*alias",
    "&anchor",
    "!tag",
    "%x",
    "@x",
    "`x",
    "<<",
    "=",
    "---",
    "...",
    "[x]",
    "{x}",
    "\\",
    "\u{85}",
    "\u{2028}",
    "\u{feff}x",
];

fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![proptest::sample::select(TRICKY).prop_map(str::to_string), "\\PC{0,12}", "[a-z0-9 :#'\"-]{0,10}"]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(&["users", "ssh_pwauth", "chpasswd", "password", "disable_root", "system_info"][..])
            .prop_map(str::to_string),
        "[a-z_]{1,8}",
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        text_value().prop_map(Value::Str),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Int(i.into())),
        Just(Value::Null),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Seq),
            proptest::collection::vec((key(), inner), 0..4).prop_map(|entries| {
                let mut map = Mapping::default();
                for (k, v) in entries {
                    map.insert(&k, v);
                }
                Value::Map(map)
            }),
        ]
    })
}

/// A cloud.cfg-like text: entries in cloudimg's own style and in hand-written styles, with comments.
fn document() -> impl Strategy<Value = String> {
    let entry = prop_oneof![
        (key(), value()).prop_map(|(k, v)| yaml11::render_entry(&k, &v, 0)),
        (key(), "[a-z]{1,6}").prop_map(|(k, w)| format!("{k}: {w}  # a comment\n")),
        (key(), "[a-z]{1,6}", "[a-z]{1,6}").prop_map(|(k, a, b)| format!("{k}: [{a}, {b}]\n")),
        (key(), "[a-z]{1,6}").prop_map(|(k, w)| format!("{k}:\n   - {w}\n   - {{x: 1}}\n")),
        "[a-z ]{0,20}".prop_map(|c| format!("# {c}\n")),
        Just("\n".to_string()),
    ];
    (any::<bool>(), proptest::collection::vec(entry, 0..8))
        .prop_map(|(start, entries)| format!("{}{}", if start { "#cloud-config\n" } else { "" }, entries.concat()))
}

fn changes() -> impl Strategy<Value = Vec<(String, Value)>> {
    proptest::collection::vec((key(), value()), 1..4)
}

/// What the edit must produce: the old mapping with each change set.
fn expected(old: &str, changes: &[(String, Value)]) -> Option<Mapping> {
    let mut mapping = yaml11::parse(old).ok()?.root;
    for (k, v) in changes {
        mapping.insert(k, v.clone());
    }
    Some(mapping)
}

proptest! {
    #![proptest_config(Config { cases: 2000, ..Config::default() })]

    #[test]
    fn the_editor_never_panics_on_any_text(text in "\\PC{0,200}", changes in changes()) {
        let _ = set_top_level(&text, &changes);
    }

    #[test]
    fn the_header_parser_never_panics(head in proptest::collection::vec(any::<u8>(), 0..2048), size in any::<u64>()) {
        let _ = classify(&head, size);
    }
}

/// Runs `property` on `cases` generated inputs and returns how many of them it counted as exercising
/// the claim, so that a property cannot pass only because every input was turned away.
fn run_counting<S: Strategy>(
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) -> usize {
    let exercised = std::cell::Cell::new(0);
    TestRunner::new(Config { cases, ..Config::default() })
        .run(&strategy, |input| {
            if property(input)? {
                exercised.set(exercised.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    exercised.get()
}

#[test]
fn edited_text_parses_to_exactly_the_intended_mapping() {
    let edited = run_counting(2000, (document(), changes()), |(doc, changes)| {
        let Ok(edited) = set_top_level(&doc, &changes) else { return Ok(false) };
        let reparsed = yaml11::parse(&edited.text).expect("edited text parses").root;
        prop_assert_eq!(Some(reparsed), expected(&doc, &changes), "{}", edited.text);
        Ok(true)
    });
    assert!(edited >= 1000, "only {edited} of 2000 documents were edited: the property says little");
}

#[test]
fn a_mutated_qcow2_header_is_never_accepted_with_a_backing_or_data_file() {
    let strategy = (proptest::collection::vec((0usize..128, any::<u8>()), 1..6), 0u64..(1 << 32));
    let accepted = run_counting(2000, strategy, |(flips, size)| {
        let mut head = qcow2_header();
        for (at, byte) in flips {
            head[at] = byte;
        }
        match classify(&head, size) {
            Ok(info) if info.format == Format::Qcow2 => {
                prop_assert!(head[8..20].iter().all(|b| *b == 0), "accepted a backing file");
                prop_assert_eq!(head[72 + 7] & 0b100, 0, "accepted an external data file");
                Ok(true)
            }
            _ => Ok(false),
        }
    });
    // Flips in unused header bytes keep it valid; if none were accepted, the parser refuses everything.
    assert!(accepted >= 100, "only {accepted} of 2000 mutated headers were accepted as qcow2");
}

/// A valid qcow2 v3 header of a 64 MiB image, as qemu-img writes it, padded with zeros.
fn qcow2_header() -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes()); // 64 KiB clusters
    h[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
    h[36..40].copy_from_slice(&1u32.to_be_bytes()); // one L1 entry
    h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
    h[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount order
    h[100..104].copy_from_slice(&112u32.to_be_bytes()); // header length
    h
}

fn to_json(value: &Value) -> Option<serde_json::Value> {
    Some(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => i64::try_from(*i).ok()?.into(),
        Value::Str(s) => s.clone().into(),
        Value::Seq(items) => items.iter().map(to_json).collect::<Option<Vec<_>>>()?.into(),
        Value::Map(map) => map_to_json(map)?,
        Value::Float(_) | Value::Other { .. } => return None,
    })
}

fn map_to_json(map: &Mapping) -> Option<serde_json::Value> {
    let mut object = serde_json::Map::new();
    for (k, v) in map.iter() {
        object.insert(k.as_str()?.to_string(), to_json(v)?);
    }
    Some(object.into())
}

/// The same property judged by PyYAML itself, on a fixed sample (one Python process for all).
#[test]
fn pyyaml_reads_edited_text_as_the_intended_mapping() {
    let mut runner = TestRunner::deterministic();
    let mut texts = Vec::new();
    let mut wanted = Vec::new();
    for _ in 0..4000 {
        if texts.len() == 400 {
            break;
        }
        let doc = document().new_tree(&mut runner).unwrap().current();
        let changes = changes().new_tree(&mut runner).unwrap().current();
        let (Ok(edited), Some(expected)) = (set_top_level(&doc, &changes), expected(&doc, &changes)) else { continue };
        let Some(json) = map_to_json(&expected) else { continue };
        texts.push(edited.text);
        wanted.push(json);
    }
    assert_eq!(texts.len(), 400, "too few generated documents were edited to judge");
    let read = common::pyyaml(&texts);
    for ((text, want), got) in texts.iter().zip(&wanted).zip(&read) {
        let got = if got.is_null() { serde_json::json!({}) } else { got.clone() };
        assert_eq!(&got, want, "PyYAML reads this differently:\n{text}");
    }
}
