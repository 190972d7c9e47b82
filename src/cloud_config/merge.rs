//! The configuration cloud-init will use: `cloud.cfg` merged with `cloud.cfg.d/*.cfg`.
//!
//! cloud-init (`util.read_conf_with_confd`) reads the drop-ins in sorted name order and gives later
//! files priority over earlier ones and over `cloud.cfg`. Its default merger is a deep merge of
//! mappings in which the higher-priority file keeps its value for anything that is not a mapping on
//! both sides: lists are not concatenated, they are replaced whole.

use super::yaml11::{Mapping, Value};

/// One parsed configuration file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: String,
    pub root: Mapping,
}

/// Whether cloud-init reads this drop-in name (only `*.cfg`).
pub fn is_drop_in_name(name: &str) -> bool {
    name.ends_with(".cfg")
}

/// Orders files from lowest to highest priority: `cloud.cfg` first, then drop-ins by name (bytewise,
/// as Python sorts them). Since drop-in paths extend `cloud.cfg`'s, that is plain path order.
pub fn sort_by_priority(files: &mut [ConfigFile]) {
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
}

/// The merged configuration of files given from lowest to highest priority.
pub fn effective(files: &[ConfigFile]) -> Mapping {
    files.iter().fold(Mapping::default(), |merged, file| overlay(&merged, &file.root))
}

/// `higher` merged over `lower` with cloud-init's default merger.
pub fn overlay(lower: &Mapping, higher: &Mapping) -> Mapping {
    let mut out = lower.clone();
    for (key, value) in higher.iter() {
        let merged = match (out.get_value(key), value) {
            (Some(Value::Map(low)), Value::Map(high)) => Value::Map(overlay(low, high)),
            _ => value.clone(),
        };
        out.insert_value(key.clone(), merged);
    }
    out
}

/// The value at `path` (top-level key, then nested keys) in a mapping.
pub fn lookup<'a>(root: &'a Mapping, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = root.get(first)?;
    if rest.is_empty() {
        Some(value)
    } else {
        lookup(value.as_map()?, rest)
    }
}

/// The highest-priority file that sets `path`: the one whose value cloud-init uses.
pub fn deciding_file<'a>(files: &'a [ConfigFile], path: &[&str]) -> Option<&'a ConfigFile> {
    files.iter().rev().find(|f| lookup(&f.root, path).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_config::yaml11::parse;

    fn file(path: &str, text: &str) -> ConfigFile {
        ConfigFile { path: path.into(), root: parse(text).unwrap().root }
    }

    #[test]
    fn later_drop_ins_win_and_mappings_merge_deeply() {
        let mut files = vec![
            file("/etc/cloud/cloud.cfg.d/90-z.cfg", "chpasswd: {expire: false}\nl: [3]\n"),
            file("/etc/cloud/cloud.cfg", "a: 1\nchpasswd: {expire: true, list: [x]}\nl: [1, 2]\n"),
            file("/etc/cloud/cloud.cfg.d/10-a.cfg", "a: 2\nchpasswd: {expire: maybe}\n"),
        ];
        sort_by_priority(&mut files);
        assert_eq!(files[0].path, "/etc/cloud/cloud.cfg");
        let merged = effective(&files);
        assert_eq!(merged.get("a"), Some(&Value::Int(2)));
        assert_eq!(lookup(&merged, &["chpasswd", "expire"]), Some(&Value::Bool(false)));
        assert_eq!(lookup(&merged, &["chpasswd", "list"]), Some(&Value::Seq(vec![Value::Str("x".into())])));
        assert_eq!(merged.get("l"), Some(&Value::Seq(vec![Value::Int(3)])));
        assert_eq!(deciding_file(&files, &["chpasswd", "expire"]).unwrap().path, "/etc/cloud/cloud.cfg.d/90-z.cfg");
        assert_eq!(deciding_file(&files, &["a"]).unwrap().path, "/etc/cloud/cloud.cfg.d/10-a.cfg");
    }

    #[test]
    fn only_cfg_files_count() {
        assert!(is_drop_in_name("99-cloudimg.cfg"));
        assert!(!is_drop_in_name("README"));
        assert!(!is_drop_in_name("05_logging.cfg.dpkg-old"));
    }
}
