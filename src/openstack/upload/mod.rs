//! `cloudimg upload`: hand an image to Glance and prove that Glance stored exactly these bytes.
//! Read what the cloud offers and holds → create the record → send the file (PUT, or stage then
//! import), hashing it on the way → wait for `active` → compare Glance's size, checksum and
//! os_hash_value with ours → share and protect it → hide or delete the older images of its name.
//! Any failure before the new image is verified deletes it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::image::hashing::{self, Digests, HashingReader};
use crate::image::header;
use crate::openstack::credentials::{self, Credentials};
use crate::openstack::glance::{Glance, Member, NewImage, Offer};
use crate::openstack::keystone::{self, Session};
use crate::openstack::manifest::{self, Manifest};
use crate::openstack::{error_text, Http};
use crate::support::cleanup;
use crate::support::exit_codes::{with_code, BAD_INPUT, UPLOAD, USAGE};
use crate::support::report::Reporter;

mod previous;
mod render;
mod route;

use previous::{describe_steps, same_bytes};
pub use previous::{plan_previous, Action, Step};
pub use render::{render, render_plan, Plan, Uploaded};
use route::staging_refused;
pub use route::{choose_route, Route};

/// How long a failed upload keeps trying to delete its image while Glance does not answer.
const DELETE_PATIENCE: Duration = Duration::from_secs(60);

/// What is asked of Glance besides the data, checked once from the command line.
#[derive(Debug, Clone)]
pub struct Request {
    pub visibility: Option<String>,
    pub tags: Vec<String>,
    pub min_ram: Option<u64>,
    pub members: Vec<String>,
    pub protected: bool,
    pub hide_previous: bool,
    /// Keep this many images of the name, the new one included.
    pub keep: Option<usize>,
    pub if_changed: bool,
    pub method: ImportMethod,
    pub stores: Vec<String>,
    pub keep_failed: bool,
    /// How long to wait for Glance to make the image `active`.
    pub wait: Duration,
}

/// How the image data reaches Glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportMethod {
    Put,
    GlanceDirect,
    /// glance-direct where the cloud offers it, PUT otherwise or when staging is refused.
    Auto,
}

/// Where an image goes in Glance and what is asked there, as the command line said it.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `None`: the file name without its extension.
    pub name: Option<String>,
    /// `--property`: set over those derived from the image.
    pub properties: Vec<(String, String)>,
    /// `--no-property`: derived properties left out.
    pub no_properties: Vec<String>,
    /// The cloud in clouds.yaml (`None`: $OS_CLOUD, else the OS_* variables).
    pub os_cloud: Option<String>,
    pub request: Request,
}

pub struct Options {
    pub image: PathBuf,
    /// The image already open (customize's output, read through the descriptor it was written with);
    /// `None`: `image` is opened, once.
    pub file: Option<File>,
    pub manifest: Option<Manifest>,
    pub name: String,
    /// The properties to set: those read from the image, less `--no-property`, plus `--property`.
    pub properties: BTreeMap<String, String>,
    /// Declared format instead of the file's own.
    pub disk_format: Option<String>,
    pub request: Request,
}

impl Options {
    /// The options for one image: `derived` are the properties read from it (a manifest's), to which
    /// the command line's Glance arguments apply.
    pub fn new(
        image: &Path,
        manifest: Option<Manifest>,
        derived: &BTreeMap<String, String>,
        destination: &Destination,
    ) -> Self {
        let mut properties = derived.clone();
        properties.retain(|k, _| !destination.no_properties.contains(k));
        properties.extend(destination.properties.iter().cloned());
        Options {
            image: image.to_path_buf(),
            file: None,
            manifest,
            name: destination.name.clone().unwrap_or_else(|| default_name(image)),
            properties,
            disk_format: None,
            request: destination.request.clone(),
        }
    }
}

/// The options for `cloudimg upload IMAGE [--manifest FILE]`: the manifest's properties are the
/// derived ones.
pub fn options(
    image: &Path,
    manifest: Option<&Path>,
    disk_format: Option<String>,
    destination: &Destination,
) -> Result<Options> {
    let manifest = manifest.map(Manifest::read).transpose().map_err(with_code(USAGE))?;
    let derived = manifest.as_ref().map(|m| m.properties.clone()).unwrap_or_default();
    Ok(Options { disk_format, ..Options::new(image, manifest, &derived, destination) })
}

/// Finds the credentials as the `openstack` CLI does: a named cloud (--os-cloud, else OS_CLOUD) in
/// clouds.yaml with secure.yaml merged over it and the `OS_*` variables over both, else the `OS_*`
/// variables alone.
pub fn resolve_credentials(cloud: Option<&str>) -> Result<Credentials> {
    let env = |name: &str| std::env::var(name).ok();
    let cloud = cloud.map(str::to_string).or_else(|| env("OS_CLOUD").filter(|c| !c.is_empty()));
    let Some(cloud) = cloud else {
        return credentials::from_env(&env).map_err(|e| {
            with_code(USAGE)(e.context("no credentials: pass --os-cloud NAME (clouds.yaml) or set the OS_* variables"))
        });
    };
    let first_existing = |name: &str, override_var: &str| {
        let explicit = env(override_var).filter(|p| !p.is_empty()).map(PathBuf::from);
        let candidates = explicit.into_iter().chain(credentials::search_path(name, &env));
        candidates.into_iter().find(|p| p.is_file())
    };
    let read = |path: PathBuf| -> Result<(PathBuf, String)> {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok((path, text))
    };
    let clouds = first_existing("clouds.yaml", "OS_CLIENT_CONFIG_FILE")
        .with_context(|| {
            let places: Vec<String> =
                credentials::search_path("clouds.yaml", &env).iter().map(|p| p.display().to_string()).collect();
            format!("--os-cloud {cloud}: no clouds.yaml in {}", places.join(", "))
        })
        .and_then(read)
        .map_err(with_code(USAGE))?;
    let secure =
        first_existing("secure.yaml", "OS_CLIENT_SECURE_FILE").map(read).transpose().map_err(with_code(USAGE))?;
    credentials::from_clouds_yaml(
        &cloud,
        (&clouds.0, &clouds.1),
        secure.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        &env,
    )
    .map_err(with_code(USAGE))
}

/// Reads the file's facts and checks them against the manifest, before anything is sent.
fn local_facts(opts: &Options, file: &File, report: &Reporter) -> Result<(header::ImageInfo, String)> {
    let info = header::inspect_file(file, &opts.image)
        .context("Glance refuses such files too")
        .map_err(with_code(BAD_INPUT))?;
    if let Some(m) = &opts.manifest {
        if m.disk_format != info.format.as_str() || m.size != info.file_size || m.virtual_size != info.virtual_size {
            return Err(with_code(BAD_INPUT)(anyhow::anyhow!(
                "{} does not match its manifest ({} of {} bytes, virtual {}; the file is {} of {} bytes, virtual {})",
                opts.image.display(),
                m.disk_format,
                m.size,
                m.virtual_size,
                info.format.as_str(),
                info.file_size,
                info.virtual_size
            )));
        }
    }
    let disk_format = opts.disk_format.clone().unwrap_or_else(|| info.format.as_str().to_string());
    if disk_format != info.format.as_str() {
        report.warn(&format!(
            "declaring {} as {disk_format} although it is {}; Glance's format check will likely reject it",
            opts.image.display(),
            info.format.as_str()
        ));
    }
    Ok((info, disk_format))
}

/// An authenticated session with the cloud's Glance.
pub struct Connection {
    http: Http,
    session: Session,
}

/// Authenticates with Keystone and finds Glance (before any image work, so that bad credentials
/// cost nothing).
pub fn connect(creds: &Credentials, report: &Reporter) -> Result<Connection> {
    report.phase(&format!("Authenticating with Keystone at {} ({})", creds.auth_url, creds.auth.kind()));
    let http = Http::new(creds).map_err(with_code(USAGE))?;
    let session = keystone::authenticate(&http, creds).map_err(with_code(UPLOAD))?;
    report.detail(&format!("image service {}", session.image_url));
    Ok(Connection { http, session })
}

/// What the cloud offers and holds, read before anything is changed.
struct Survey {
    info: header::ImageInfo,
    disk_format: String,
    route: Route,
    previous: Vec<Value>,
    /// With --if-changed: the file's digests, and the image that already holds them.
    unchanged: Option<Value>,
    local: Option<Digests>,
}

fn survey(opts: &Options, file: &File, glance: &Glance, report: &Reporter) -> Result<Survey> {
    let (info, disk_format) = local_facts(opts, file, report)?;
    let r = &opts.request;
    let offer = if r.method == ImportMethod::Put && r.stores.is_empty() {
        Offer::default()
    } else {
        glance.offer().map_err(with_code(UPLOAD))?
    };
    let route = choose_route(r.method, &r.stores, &offer).map_err(with_code(USAGE))?;
    report.detail(&format!(
        "import method {} (the cloud offers: {}; stores: {})",
        route.method(),
        if offer.import_methods.is_empty() { "PUT only".to_string() } else { offer.import_methods.join(", ") },
        if offer.stores.is_empty() { "one".to_string() } else { offer.stores.join(", ") }
    ));
    let previous = if r.hide_previous || r.keep.is_some() || r.if_changed {
        glance.images_named(&opts.name).map_err(with_code(UPLOAD))?
    } else {
        Vec::new()
    };
    let (mut unchanged, mut local) = (None, None);
    if r.if_changed {
        report.phase(&format!("Hashing {} to compare it with Glance's images", opts.image.display()));
        let mut progress = report.progress("hashing");
        let total = info.file_size.max(1) as f64;
        let digests = hashing::file_digests(file, &opts.image, &mut |n| progress.set(n as f64 * 100.0 / total))
            .map_err(with_code(BAD_INPUT))?;
        drop(progress);
        unchanged = same_bytes(&previous, info.file_size, &digests).cloned();
        local = Some(digests);
    }
    Ok(Survey { info, disk_format, route, previous, unchanged, local })
}

fn open<'a>(opts: &'a Options, opened: &'a mut Option<File>) -> Result<&'a File> {
    match &opts.file {
        Some(file) => Ok(file),
        None => Ok(opened.insert(header::open(&opts.image).map_err(with_code(BAD_INPUT))?)),
    }
}

/// `upload --dry-run`: what would be done.
pub fn plan(opts: &Options, conn: &Connection, report: &Reporter) -> Result<Plan> {
    let mut opened = None;
    let file = open(opts, &mut opened)?;
    let glance = Glance { http: &conn.http, session: &conn.session };
    let s = survey(opts, file, &glance, report)?;
    let unchanged_image_id = s.unchanged.as_ref().and_then(|i| i["id"].as_str()).map(str::to_string);
    let (previous, kept_protected) = if unchanged_image_id.is_some() {
        (Vec::new(), Vec::new())
    } else {
        plan_previous(&s.previous, opts.request.hide_previous, opts.request.keep)
    };
    Ok(Plan {
        image: opts.image.clone(),
        name: opts.name.clone(),
        glance_url: conn.session.image_url.clone(),
        dry_run: true,
        unchanged_image_id,
        import_method: s.route.method(),
        stores: s.route.stores(),
        disk_format: s.disk_format,
        size: s.info.file_size,
        properties: opts.properties.clone(),
        previous,
        kept_protected,
    })
}

pub fn run(opts: &Options, conn: &Connection, report: &Reporter) -> Result<Uploaded> {
    let mut opened = None;
    let file = open(opts, &mut opened)?;
    let (http, session) = (&conn.http, &conn.session);
    let glance = Glance { http, session };
    let s = survey(opts, file, &glance, report)?;
    let min_disk = opts.manifest.as_ref().map_or_else(|| manifest::min_disk(s.info.virtual_size), |m| m.min_disk);
    let r = &opts.request;
    let report_of =
        |record: &Value, method, members| uploaded(record, opts, &session.image_url, min_disk, method, members);
    if let (Some(existing), Some(local)) = (&s.unchanged, &s.local) {
        // Glance's record of these very bytes: checked as an upload's would be.
        compare(existing, s.info.file_size, local).map_err(with_code(UPLOAD))?;
        report.phase(&format!("Glance already holds these bytes as image {} (--if-changed)", text(existing, "id")));
        return Ok(Uploaded { elapsed_seconds: report.elapsed_secs(), ..report_of(existing, None, Vec::new()) });
    }

    report.phase(&format!("Creating image `{}` in Glance", opts.name));
    let new = NewImage {
        name: &opts.name,
        disk_format: &s.disk_format,
        min_disk,
        min_ram: r.min_ram,
        visibility: r.visibility.as_deref(),
        tags: &r.tags,
        properties: &opts.properties,
    };
    let id = glance.create(&new).map_err(with_code(UPLOAD))?;
    report.detail(&format!("image id {id}"));
    cleanup::on_interrupt(Some(undo_on_interrupt(http, session, &id, r.keep_failed)));
    let result = send_and_verify(&glance, &id, (opts, file), &s, report).and_then(|(record, method)| {
        let members = r.members.iter().map(|p| glance.share(&id, p)).collect::<Result<Vec<_>>>()?;
        if r.protected {
            glance.set(&id, "protected", Value::Bool(true))?;
        }
        Ok((record, method, members))
    });
    cleanup::on_interrupt(None);
    let (record, method, members) = match result {
        Ok(done) => done,
        Err(e) => return Err(with_code(UPLOAD)(give_up(&glance, &id, r.keep_failed, e))),
    };
    let mut uploaded = report_of(&record, Some(method), members);
    uploaded.protected = r.protected;
    let (steps, kept_protected) = plan_previous(&s.previous, r.hide_previous, r.keep);
    uploaded.kept_protected = kept_protected;
    tidy_previous(&glance, steps, &mut uploaded.previous).map_err(|e| {
        with_code(UPLOAD)(e.context(format!(
            "image {id} is uploaded and verified, but the older images of `{}` were not all hidden or deleted \
             (done: {})",
            opts.name,
            describe_steps(&uploaded.previous)
        )))
    })?;
    uploaded.elapsed_seconds = report.elapsed_secs();
    Ok(uploaded)
}

/// The report of an image Glance holds (`method`: `None` when it already held these bytes).
fn uploaded(
    record: &Value,
    opts: &Options,
    glance_url: &str,
    min_disk: u64,
    method: Option<&'static str>,
    members: Vec<Member>,
) -> Uploaded {
    let strings =
        |v: &Value| v.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect();
    Uploaded {
        image_id: text(record, "id"),
        name: opts.name.clone(),
        glance_url: glance_url.to_string(),
        unchanged: method.is_none(),
        import_method: method,
        stores: text(record, "stores").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
        status: text(record, "status"),
        disk_format: text(record, "disk_format"),
        size: record["size"].as_u64().unwrap_or_default(),
        checksum: text(record, "checksum"),
        os_hash_algo: text(record, "os_hash_algo"),
        os_hash_value: text(record, "os_hash_value"),
        min_disk: record["min_disk"].as_u64().unwrap_or(min_disk),
        min_ram: record["min_ram"].as_u64().unwrap_or_default(),
        visibility: text(record, "visibility"),
        protected: record["protected"] == true,
        tags: strings(&record["tags"]),
        properties: opts.properties.keys().map(|k| (k.clone(), text(record, k))).collect(),
        members,
        previous: Vec::new(),
        kept_protected: Vec::new(),
        verified: true,
        elapsed_seconds: 0.0,
    }
}

/// Hides and deletes the older images as planned, recording each step once it is done.
fn tidy_previous(glance: &Glance, steps: Vec<Step>, done: &mut Vec<Step>) -> Result<()> {
    for mut step in steps {
        match step.action {
            Action::Hide => glance.set(&step.image_id, "os_hidden", Value::Bool(true))?,
            Action::Delete => glance.delete(&step.image_id, DELETE_PATIENCE)?,
        }
        step.done = true;
        done.push(step);
    }
    Ok(())
}

fn text(record: &Value, key: &str) -> String {
    record[key].as_str().unwrap_or_default().to_string()
}

/// Sends the file along the route, waits for `active` and compares; returns Glance's record and the
/// method that carried the data.
fn send_and_verify(
    glance: &Glance,
    id: &str,
    (opts, file): (&Options, &File),
    s: &Survey,
    report: &Reporter,
) -> Result<(Value, &'static str)> {
    let size = s.info.file_size;
    let put = |store: Option<&str>| -> Result<Digests> {
        stream(opts, file, size, report, |data| glance.upload(id, store, size, data))?.check(opts, size)
    };
    let (local, method, imported) = match &s.route {
        Route::Put { store } => (put(store.as_deref())?, "put", false),
        Route::GlanceDirect { stores, fallback } => {
            let mut staged = Ok(());
            let sent = stream(opts, file, size, report, |data| {
                staged = glance.stage(id, size, data)?;
                Ok(())
            })?;
            match staged {
                Ok(()) => {
                    let local = sent.check(opts, size)?;
                    report.phase(&format!("Importing image {id} (glance-direct)"));
                    glance.import(id, "glance-direct", stores)?;
                    (local, "glance-direct", true)
                }
                Err(answer) if *fallback && staging_refused(answer.status) && glance.get(id)?["status"] == "queued" => {
                    report.warn(&format!(
                        "Glance refused to stage the data (HTTP {}: {}); uploading with PUT instead",
                        answer.status,
                        error_text(&answer.body)
                    ));
                    (put(stores.first().map(String::as_str))?, "put", false)
                }
                Err(answer) => bail!(
                    "Glance refused to stage the image data (HTTP {}): {}",
                    answer.status,
                    error_text(&answer.body)
                ),
            }
        }
    };
    report.phase("Waiting for Glance to make the image active");
    let record = glance.wait_active(id, opts.request.wait, imported)?;
    compare(&record, size, &local)?;
    Ok((record, method))
}

/// What went out in one sending of the file.
struct Sent {
    bytes: u64,
    digests: Digests,
}

impl Sent {
    /// The file's digests, once the bytes sent are the file's size and, with a manifest, its hashes
    /// the manifest's.
    fn check(self, opts: &Options, size: u64) -> Result<Digests> {
        if self.bytes != size {
            bail!(
                "{} changed size during the upload ({} bytes sent, {size} expected)",
                opts.image.display(),
                self.bytes
            );
        }
        if opts.manifest.as_ref().is_some_and(|m| m.digests() != self.digests) {
            bail!("{} is not the file its manifest describes: its hashes differ", opts.image.display());
        }
        Ok(self.digests)
    }
}

/// Streams the file into `send` with a progress bar, hashing it on the way.
fn stream(
    opts: &Options,
    mut file: &File,
    size: u64,
    report: &Reporter,
    send: impl FnOnce(&mut dyn Read) -> Result<()>,
) -> Result<Sent> {
    report.phase(&format!("Uploading {} ({size} bytes)", opts.image.display()));
    file.seek(SeekFrom::Start(0)).with_context(|| format!("reading {}", opts.image.display()))?;
    let mut progress = report.progress("uploading");
    let total = size.max(1) as f64;
    let mut on_read = |n: u64| progress.set(n as f64 * 100.0 / total);
    let mut reader = HashingReader::new(file, &mut on_read);
    send(&mut reader)?;
    let bytes = reader.bytes;
    Ok(Sent { bytes, digests: reader.finish() })
}

/// Glance's record against the file: size and both hashes.
pub fn compare(record: &Value, size: u64, local: &Digests) -> Result<()> {
    let mut differences = Vec::new();
    if record["size"].as_u64() != Some(size) {
        differences.push(format!("size {} (file: {size})", record["size"]));
    }
    if record["checksum"].as_str() != Some(local.md5.as_str()) {
        differences.push(format!("checksum {} (file: {})", record["checksum"], local.md5));
    }
    if record["os_hash_algo"].as_str() != Some("sha512") {
        differences.push(format!("os_hash_algo {} (cloudimg checks sha512)", record["os_hash_algo"]));
    } else if record["os_hash_value"].as_str() != Some(local.sha512.as_str()) {
        differences.push("os_hash_value differs from the file's SHA-512".to_string());
    }
    if differences.is_empty() {
        Ok(())
    } else {
        bail!("Glance's copy is not the file: {}", differences.join("; "))
    }
}

/// After a failure: delete the image (unless asked to keep it) and say what became of it.
fn give_up(glance: &Glance, id: &str, keep: bool, error: anyhow::Error) -> anyhow::Error {
    if keep {
        return error.context(format!("upload failed; image {id} was kept (--keep-failed)"));
    }
    match glance.delete(id, DELETE_PATIENCE) {
        Ok(()) => error.context(format!("upload failed; image {id} was deleted")),
        Err(e) => error.context(format!(
            "upload failed, and image {id} could not be deleted ({e:#}); delete it with `openstack image delete {id}`"
        )),
    }
}

fn undo_on_interrupt(http: &Http, session: &Session, id: &str, keep: bool) -> Box<dyn FnOnce() + Send> {
    let (http, session, id) = (http.clone(), session.clone(), id.to_string());
    Box::new(move || {
        if keep {
            eprintln!("cloudimg: interrupted; image {id} was kept (--keep-failed)");
            return;
        }
        let glance = Glance { http: &http, session: &session };
        match glance.delete(&id, Duration::from_secs(10)) {
            Ok(()) => eprintln!("cloudimg: interrupted; image {id} was deleted from Glance"),
            Err(e) => eprintln!("cloudimg: interrupted; could not delete image {id}: {e:#}"),
        }
    })
}

/// The image name when none is given: the file name without its extension.
pub fn default_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn glance_record_must_match_the_file() {
        let local = Digests { md5: "aa".into(), sha512: "bb".into() };
        let good = json!({"size": 10, "checksum": "aa", "os_hash_algo": "sha512", "os_hash_value": "bb"});
        compare(&good, 10, &local).unwrap();
        let bad = json!({"size": 9, "checksum": "ab", "os_hash_algo": "sha512", "os_hash_value": "bc"});
        let err = format!("{:#}", compare(&bad, 10, &local).unwrap_err());
        assert!(
            err.contains("size 9 (file: 10)") && err.contains("checksum") && err.contains("os_hash_value"),
            "{err}"
        );
        let other_algo = json!({"size": 10, "checksum": "aa", "os_hash_algo": "sha256", "os_hash_value": "x"});
        assert!(format!("{:#}", compare(&other_algo, 10, &local).unwrap_err()).contains("sha256"));
    }
}
