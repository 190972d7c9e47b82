//! `cloudimg upload`: hand an image to Glance and prove that Glance stored exactly these bytes.
//! Create the record → stream the file (hashing it on the way) → wait for `active` → compare Glance's
//! size, checksum and os_hash_value with ours. Any failure deletes the half-created image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cleanup;
use crate::cli::GlanceArgs;
use crate::exit_codes::{with_code, BAD_INPUT, UPLOAD, USAGE};
use crate::hashing::{Digests, HashingReader};
use crate::image_file;
use crate::manifest::{self, Manifest};
use crate::openstack::credentials::{self, Credentials};
use crate::openstack::glance::{self, Glance, NewImage};
use crate::openstack::keystone::{self, Session};
use crate::openstack::Http;
use crate::report::Reporter;

/// How long a failed upload keeps trying to delete its image while Glance does not answer.
const DELETE_PATIENCE: Duration = Duration::from_secs(60);

pub struct Options {
    pub image: PathBuf,
    /// The image already open (customize's output, read through the descriptor it was written with);
    /// `None`: `image` is opened, once.
    pub file: Option<File>,
    pub manifest: Option<Manifest>,
    pub name: String,
    /// `--property K=V`, over the manifest's.
    pub properties: BTreeMap<String, String>,
    /// Declared format instead of the file's own.
    pub disk_format: Option<String>,
    pub visibility: Option<String>,
    pub keep_failed: bool,
    /// How long to wait for Glance to make the image `active`.
    pub wait: Duration,
}

/// What Glance holds, for the report.
#[derive(Debug, serde::Serialize)]
pub struct Uploaded {
    pub image_id: String,
    pub name: String,
    pub glance_url: String,
    pub status: String,
    pub disk_format: String,
    pub size: u64,
    pub checksum: String,
    pub os_hash_algo: String,
    pub os_hash_value: String,
    pub min_disk: u64,
    pub properties: BTreeMap<String, String>,
    /// Glance's size and hashes equal the file's (always true in a report: a difference is an error).
    pub verified: bool,
    pub elapsed_seconds: f64,
}

/// The options for one image, from the command line's Glance arguments.
pub fn options(
    image: &Path,
    manifest: Option<&Path>,
    disk_format: Option<String>,
    args: &GlanceArgs,
) -> Result<Options> {
    Ok(Options {
        image: image.to_path_buf(),
        file: None,
        manifest: manifest.map(Manifest::read).transpose().map_err(with_code(USAGE))?,
        name: args.name.clone().unwrap_or_else(|| default_name(image)),
        properties: args.properties.iter().cloned().collect(),
        disk_format,
        visibility: args.visibility.clone(),
        keep_failed: args.keep_failed,
        wait: Duration::from_secs(args.wait),
    })
}

/// Parses `K=V`.
pub fn parse_property(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("`{text}` is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("`{text}` has an empty key"));
    }
    if glance::RESERVED.contains(&key) {
        return Err(format!("`{key}` is set by cloudimg or Glance itself, not as a property"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Finds the credentials: a named cloud in clouds.yaml, else the `OS_*` variables.
pub fn resolve_credentials(cloud: Option<&str>) -> Result<Credentials> {
    let env = |name: &str| std::env::var(name).ok();
    let cloud = cloud.map(str::to_string).or_else(|| env("OS_CLOUD").filter(|c| !c.is_empty()));
    let Some(cloud) = cloud else {
        return credentials::from_env(&env).map_err(|e| {
            with_code(USAGE)(e.context("no credentials: pass --os-cloud NAME (clouds.yaml) or set the OS_* variables"))
        });
    };
    let first_existing = |name: &str| {
        let explicit = (name == "clouds.yaml").then(|| env("OS_CLIENT_CONFIG_FILE")).flatten().map(PathBuf::from);
        let candidates = explicit.into_iter().chain(credentials::search_path(name, &env));
        candidates.into_iter().find(|p| p.is_file())
    };
    let read = |path: PathBuf| -> Result<(PathBuf, String)> {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok((path, text))
    };
    let clouds = first_existing("clouds.yaml")
        .with_context(|| {
            let places: Vec<String> =
                credentials::search_path("clouds.yaml", &env).iter().map(|p| p.display().to_string()).collect();
            format!("--os-cloud {cloud}: no clouds.yaml in {}", places.join(", "))
        })
        .and_then(read)
        .map_err(with_code(USAGE))?;
    let secure = first_existing("secure.yaml").map(read).transpose().map_err(with_code(USAGE))?;
    credentials::from_clouds_yaml(
        &cloud,
        (&clouds.0, &clouds.1),
        secure.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
    )
    .map_err(with_code(USAGE))
}

/// Reads the file's facts and checks them against the manifest, before anything is sent.
fn local_facts(opts: &Options, file: &File, report: &Reporter) -> Result<(image_file::ImageInfo, String)> {
    let info = image_file::inspect_file(file, &opts.image)
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
    report.phase(&format!("Authenticating with Keystone at {}", creds.auth_url));
    let http = Http::new(creds).map_err(with_code(USAGE))?;
    let session = keystone::authenticate(&http, creds).map_err(with_code(UPLOAD))?;
    report.detail(&format!("image service {}", session.image_url));
    Ok(Connection { http, session })
}

pub fn run(opts: &Options, conn: &Connection, report: &Reporter) -> Result<Uploaded> {
    let opened;
    let file = match &opts.file {
        Some(file) => file,
        None => {
            opened = image_file::open(&opts.image).map_err(with_code(BAD_INPUT))?;
            &opened
        }
    };
    let (info, disk_format) = local_facts(opts, file, report)?;
    let mut properties = opts.manifest.as_ref().map(|m| m.properties.clone()).unwrap_or_default();
    properties.extend(opts.properties.clone());
    let min_disk = opts.manifest.as_ref().map_or_else(|| manifest::min_disk(info.virtual_size), |m| m.min_disk);
    let (http, session) = (&conn.http, &conn.session);
    let glance = Glance { http, session };

    report.phase(&format!("Creating image `{}` in Glance", opts.name));
    let new = NewImage {
        name: &opts.name,
        disk_format: &disk_format,
        min_disk,
        visibility: opts.visibility.as_deref(),
        properties: &properties,
    };
    let id = glance.create(&new).map_err(with_code(UPLOAD))?;
    report.detail(&format!("image id {id}"));
    cleanup::on_interrupt(Some(undo_on_interrupt(http, session, &id, opts.keep_failed)));
    let result = send_and_verify(&glance, &id, (opts, file), &info, report);
    cleanup::on_interrupt(None);
    let record = match result {
        Ok(record) => record,
        Err(e) => return Err(with_code(UPLOAD)(give_up(&glance, &id, opts.keep_failed, e))),
    };
    Ok(Uploaded {
        image_id: id,
        name: opts.name.clone(),
        glance_url: session.image_url.clone(),
        status: record["status"].as_str().unwrap_or_default().to_string(),
        disk_format,
        size: info.file_size,
        checksum: record["checksum"].as_str().unwrap_or_default().to_string(),
        os_hash_algo: record["os_hash_algo"].as_str().unwrap_or_default().to_string(),
        os_hash_value: record["os_hash_value"].as_str().unwrap_or_default().to_string(),
        min_disk,
        properties,
        verified: true,
        elapsed_seconds: report.elapsed_secs(),
    })
}

/// Streams the file, waits for `active` and compares; returns Glance's record.
fn send_and_verify(
    glance: &Glance,
    id: &str,
    (opts, mut file): (&Options, &File),
    info: &image_file::ImageInfo,
    report: &Reporter,
) -> Result<serde_json::Value> {
    report.phase(&format!("Uploading {} ({} bytes)", opts.image.display(), info.file_size));
    file.seek(SeekFrom::Start(0)).with_context(|| format!("reading {}", opts.image.display()))?;
    let mut progress = report.progress("uploading");
    let total = info.file_size.max(1) as f64;
    let mut on_read = |n: u64| progress.set(n as f64 * 100.0 / total);
    let mut reader = HashingReader::new(file, &mut on_read);
    glance.upload(id, info.file_size, &mut reader)?;
    let sent = reader.bytes;
    let local = reader.finish();
    drop(progress);
    if sent != info.file_size {
        bail!(
            "{} changed size during the upload ({} bytes sent, {} expected)",
            opts.image.display(),
            sent,
            info.file_size
        );
    }
    if let Some(m) = &opts.manifest {
        if m.digests() != local {
            bail!("{} is not the file its manifest describes: its hashes differ", opts.image.display());
        }
    }
    report.phase("Waiting for Glance to make the image active");
    let record = glance.wait_active(id, opts.wait)?;
    compare(&record, info.file_size, &local)?;
    Ok(record)
}

/// Glance's record against the file: size and both hashes.
pub fn compare(record: &serde_json::Value, size: u64, local: &Digests) -> Result<()> {
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
    fn properties_are_key_value_and_not_reserved() {
        assert_eq!(parse_property("os_distro=debian").unwrap(), ("os_distro".into(), "debian".into()));
        assert_eq!(parse_property("note=a=b").unwrap(), ("note".into(), "a=b".into()));
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
        assert!(parse_property("checksum=abc").unwrap_err().contains("set by cloudimg or Glance"));
    }

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
