//! What an upload and a dry run report, as JSON and for people.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::previous::{Action, Step};
use crate::openstack::glance::Member;

/// What Glance holds, for the report.
#[derive(Debug, serde::Serialize)]
pub struct Uploaded {
    pub image_id: String,
    pub name: String,
    pub glance_url: String,
    /// `true` with --if-changed when Glance already had these bytes under this name: `image_id` is
    /// that image and nothing was uploaded.
    pub unchanged: bool,
    /// `put` or `glance-direct` (`null` when unchanged).
    pub import_method: Option<&'static str>,
    /// The stores holding the image (multi-store clouds).
    pub stores: Vec<String>,
    pub status: String,
    pub disk_format: String,
    pub size: u64,
    pub checksum: String,
    pub os_hash_algo: String,
    pub os_hash_value: String,
    pub min_disk: u64,
    pub min_ram: u64,
    pub visibility: String,
    pub protected: bool,
    pub tags: Vec<String>,
    pub properties: BTreeMap<String, String>,
    pub members: Vec<Member>,
    /// What was done to the older images of the name.
    pub previous: Vec<Step>,
    /// Older images --keep left because they are protected.
    pub kept_protected: Vec<String>,
    /// Glance's size and hashes equal the file's (always true in a report: a difference is an error).
    pub verified: bool,
    pub elapsed_seconds: f64,
}

/// What `upload --dry-run` found and would do.
#[derive(Debug, serde::Serialize)]
pub struct Plan {
    pub image: PathBuf,
    pub name: String,
    pub glance_url: String,
    pub dry_run: bool,
    /// With --if-changed: the image that already holds these bytes (nothing would be uploaded).
    pub unchanged_image_id: Option<String>,
    pub import_method: &'static str,
    pub stores: Vec<String>,
    pub disk_format: String,
    pub size: u64,
    pub properties: BTreeMap<String, String>,
    pub previous: Vec<Step>,
    pub kept_protected: Vec<String>,
}

fn render_previous(out: &mut String, steps: &[Step], kept_protected: &[String], would: bool) {
    for step in steps {
        let verb = match (step.action, would) {
            (Action::Hide, true) => "Would hide",
            (Action::Hide, false) => "Hid",
            (Action::Delete, true) => "Would delete",
            (Action::Delete, false) => "Deleted",
        };
        out.push_str(&format!("{verb} the older image {} (created {})\n", step.image_id, step.created_at));
    }
    for id in kept_protected {
        out.push_str(&format!("Kept the older image {id}: it is protected\n"));
    }
}

/// The report of an upload, for people.
pub fn render(u: &Uploaded) -> String {
    if u.unchanged {
        return format!(
            "Glance already holds {} as image {} ({}, {} bytes, the same {}); nothing was uploaded.\n",
            u.name, u.image_id, u.disk_format, u.size, u.os_hash_algo
        );
    }
    let stores = if u.stores.is_empty() { String::new() } else { format!(" into {}", u.stores.join(", ")) };
    let mut out = format!(
        "Uploaded {} as image {} ({}, {} bytes, {}{stores}); Glance's size, checksum and {} match the file.\n",
        u.name,
        u.image_id,
        u.disk_format,
        u.size,
        u.import_method.unwrap_or_default(),
        u.os_hash_algo
    );
    for m in &u.members {
        out.push_str(&format!("Shared with project {} ({})\n", m.project, m.status));
    }
    render_previous(&mut out, &u.previous, &u.kept_protected, false);
    out
}

/// The report of a dry run, for people.
pub fn render_plan(p: &Plan) -> String {
    if let Some(id) = &p.unchanged_image_id {
        return format!("Glance already holds these bytes as {} (image {id}); nothing would be uploaded.\n", p.name);
    }
    let stores = if p.stores.is_empty() { "the default store".to_string() } else { p.stores.join(", ") };
    let mut out = format!(
        "Would upload {} as {} ({}, {} bytes) with {} into {stores}\n",
        p.image.display(),
        p.name,
        p.disk_format,
        p.size,
        p.import_method
    );
    render_previous(&mut out, &p.previous, &p.kept_protected, true);
    out
}
