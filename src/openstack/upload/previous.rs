//! The older images of the same name: which to hide and delete (--hide-previous, --keep), and which
//! already holds the file's bytes (--if-changed).

use serde_json::Value;

use crate::image::hashing::Digests;

/// A step taken on another image of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Set `os_hidden` (--hide-previous).
    Hide,
    /// Delete (--keep N).
    Delete,
}

/// One destructive step on an older image: planned (`done` false, in a dry run) or taken.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    pub action: Action,
    pub image_id: String,
    pub created_at: String,
    pub done: bool,
}

/// What to do to the older images of the name (`previous`: the project's active ones, newest first,
/// the new image not among them): hide them, and delete those beyond the `keep` newest (the new one
/// counts) unless protected. Returns the steps and the protected images kept.
pub fn plan_previous(previous: &[Value], hide: bool, keep: Option<usize>) -> (Vec<Step>, Vec<String>) {
    let mut steps = Vec::new();
    let mut kept_protected = Vec::new();
    for (index, image) in previous.iter().enumerate() {
        let id = image["id"].as_str().unwrap_or_default().to_string();
        let created_at = image["created_at"].as_str().unwrap_or_default().to_string();
        let step = |action| Step { action, image_id: id.clone(), created_at: created_at.clone(), done: false };
        let beyond = keep.is_some_and(|n| index + 1 >= n);
        if beyond && image["protected"] == true {
            kept_protected.push(id.clone());
        } else if beyond {
            steps.push(step(Action::Delete));
            continue;
        }
        if hide && image["os_hidden"] != true {
            steps.push(step(Action::Hide));
        }
    }
    (steps, kept_protected)
}

/// The visible image among `previous` holding exactly the file's bytes (--if-changed).
pub(super) fn same_bytes<'a>(previous: &'a [Value], size: u64, local: &Digests) -> Option<&'a Value> {
    previous.iter().find(|i| {
        i["os_hidden"] != true
            && i["os_hash_algo"] == "sha512"
            && i["os_hash_value"].as_str() == Some(local.sha512.as_str())
            && i["checksum"].as_str() == Some(local.md5.as_str())
            && i["size"].as_u64() == Some(size)
    })
}

pub(super) fn describe_steps(steps: &[Step]) -> String {
    if steps.is_empty() {
        return "nothing".to_string();
    }
    steps
        .iter()
        .map(|s| format!("{} {}", if s.action == Action::Hide { "hid" } else { "deleted" }, s.image_id))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(id: &str, created: &str, hidden: bool, protected: bool) -> Value {
        json!({"id": id, "created_at": created, "os_hidden": hidden, "protected": protected})
    }

    #[test]
    fn older_images_are_hidden_and_those_beyond_keep_deleted_unless_protected() {
        // Newest first, as Glance::images_named returns them; the new image is not among them.
        let previous = [
            image("c", "2026-11-24T00:00:00Z", false, false),
            image("b", "2026-11-17T00:00:00Z", true, false),
            image("p", "2026-11-10T00:00:00Z", false, true),
            image("a", "2026-11-03T00:00:00Z", false, false),
        ];
        let actions = |hide, keep| {
            let (steps, kept) = plan_previous(&previous, hide, keep);
            (steps.iter().map(|s| (s.action, s.image_id.clone())).collect::<Vec<_>>(), kept)
        };
        assert_eq!(
            actions(true, None),
            (vec![(Action::Hide, "c".into()), (Action::Hide, "p".into()), (Action::Hide, "a".into())], vec![])
        );
        assert_eq!(
            actions(false, Some(2)),
            (vec![(Action::Delete, "b".into()), (Action::Delete, "a".into())], vec!["p".into()]),
            "the new image and c are the two kept"
        );
        assert_eq!(
            actions(true, Some(2)),
            (
                vec![
                    (Action::Hide, "c".into()),
                    (Action::Delete, "b".into()),
                    (Action::Hide, "p".into()),
                    (Action::Delete, "a".into())
                ],
                vec!["p".into()]
            )
        );
        assert_eq!(actions(false, Some(1)).0.len(), 3, "only the new image is kept");
        assert_eq!(actions(false, None), (vec![], vec![]));
    }

    #[test]
    fn if_changed_finds_a_visible_image_with_the_same_bytes() {
        let local = Digests { md5: "m".into(), sha512: "s".into() };
        let with = |id: &str, hidden: bool, sha: &str| json!({"id": id, "os_hidden": hidden, "os_hash_algo": "sha512", "os_hash_value": sha, "checksum": "m", "size": 5});
        let previous = [with("other", false, "x"), with("hidden", true, "s"), with("same", false, "s")];
        assert_eq!(same_bytes(&previous, 5, &local).map(|i| i["id"].clone()), Some(json!("same")));
        assert!(same_bytes(&previous, 6, &local).is_none(), "a different size is different bytes");
        assert!(same_bytes(&previous[..2], 5, &local).is_none(), "a hidden image does not count");
    }
}
