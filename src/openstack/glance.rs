//! The Glance v2 calls an upload needs: create the record, send the data, read it back, delete it.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::keystone::Session;
use super::{error_text, Http};

/// Properties Glance manages itself or takes as top-level fields: not settable with --property.
pub const RESERVED: &[&str] = &[
    "id",
    "name",
    "status",
    "disk_format",
    "container_format",
    "min_disk",
    "min_ram",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "owner",
    "visibility",
    "protected",
    "tags",
    "created_at",
    "updated_at",
    "file",
    "schema",
    "self",
    "direct_url",
    "locations",
    "os_hidden",
];

/// What a new image record holds.
pub struct NewImage<'a> {
    pub name: &'a str,
    pub disk_format: &'a str,
    pub min_disk: u64,
    pub visibility: Option<&'a str>,
    pub properties: &'a BTreeMap<String, String>,
}

pub fn create_body(image: &NewImage) -> Value {
    let mut body = json!({
        "name": image.name,
        "disk_format": image.disk_format,
        "container_format": "bare",
        "min_disk": image.min_disk,
    });
    if let Some(visibility) = image.visibility {
        body["visibility"] = json!(visibility);
    }
    for (key, value) in image.properties {
        body[key] = json!(value);
    }
    body
}

fn images_url(session: &Session) -> String {
    let base = session.image_url.trim_end_matches('/').trim_end_matches("/v2");
    format!("{base}/v2/images")
}

pub struct Glance<'a> {
    pub http: &'a Http,
    pub session: &'a Session,
}

impl Glance<'_> {
    fn image_url(&self, id: &str) -> String {
        format!("{}/{id}", images_url(self.session))
    }

    /// Creates the record (status `queued`); returns its id.
    pub fn create(&self, image: &NewImage) -> Result<String> {
        let url = images_url(self.session);
        let answer = self.http.post_json(&url, Some(&self.session.token), &create_body(image))?;
        if answer.status != 201 {
            bail!("Glance refused to create the image (HTTP {}): {}", answer.status, error_text(&answer.body));
        }
        let record: Value = serde_json::from_str(&answer.body).context("Glance's answer is not JSON")?;
        record["id"].as_str().map(str::to_string).context("Glance's answer has no image id")
    }

    /// Sends the image data.
    pub fn upload(&self, id: &str, length: u64, data: &mut dyn Read) -> Result<()> {
        let url = format!("{}/file", self.image_url(id));
        let answer = self.http.put_stream(&url, &self.session.token, length, data).context("sending the image data")?;
        if answer.status != 204 {
            bail!("Glance rejected the image data (HTTP {}): {}", answer.status, error_text(&answer.body));
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Value> {
        let answer = self.http.get(&self.image_url(id), &self.session.token)?;
        if answer.status != 200 {
            bail!("reading image {id} from Glance (HTTP {}): {}", answer.status, error_text(&answer.body));
        }
        serde_json::from_str(&answer.body).context("Glance's answer is not JSON")
    }

    /// Waits until the image is `active`; `killed`, `deleted` or the deadline are errors.
    pub fn wait_active(&self, id: &str, limit: Duration) -> Result<Value> {
        let start = Instant::now();
        loop {
            let record = self.get(id)?;
            match record["status"].as_str().unwrap_or("") {
                "active" => return Ok(record),
                status @ ("killed" | "deleted" | "pending_delete") => {
                    bail!("Glance set image {id} to `{status}` after the upload")
                }
                status if start.elapsed() > limit => {
                    bail!("image {id} is still `{status}` after {} s", limit.as_secs())
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Deletes the image, retrying while Glance does not answer (a server that just dropped the
    /// connection is often restarting), all within `patience`: a server that stalls cannot hold us longer.
    pub fn delete(&self, id: &str, patience: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let left = patience.saturating_sub(start.elapsed()).max(Duration::from_secs(1));
            let result = self.http.delete(&self.image_url(id), &self.session.token, left);
            match result {
                Ok(a) if a.status == 204 || a.status == 404 => return Ok(()),
                Ok(a) if a.status < 500 => {
                    bail!("Glance refused to delete image {id} (HTTP {}): {}", a.status, error_text(&a.body))
                }
                Ok(_) | Err(_) if start.elapsed() < patience => std::thread::sleep(Duration::from_secs(1)),
                Ok(a) => bail!("Glance could not delete image {id} (HTTP {}): {}", a.status, error_text(&a.body)),
                Err(e) => return Err(e.context(format!("deleting image {id}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_gives_up_within_its_patience_when_glance_stalls() {
        // A Glance that takes connections and never answers: the Ctrl-C handler's delete must not wait
        // for the agent's 600 s answer timeout.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().collect();
            drop(held);
        });
        let creds = crate::openstack::credentials::from_env(&|k| {
            Some(
                match k {
                    "OS_AUTH_URL" => "http://127.0.0.1:1",
                    "OS_USERNAME" => "u",
                    "OS_PASSWORD" => "p",
                    "OS_PROJECT_NAME" => "p",
                    _ => return None,
                }
                .to_string(),
            )
        })
        .unwrap();
        let http = Http::new(&creds).unwrap();
        let session = Session { token: "t".into(), image_url: format!("http://127.0.0.1:{port}") };
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(Glance { http: &http, session: &session }.delete("x", Duration::from_secs(2)));
        });
        // Far longer than the patience, far shorter than the agent's timeouts: a hang, not a speed, check.
        let outcome = result.recv_timeout(Duration::from_secs(120)).expect("the delete returned");
        assert!(format!("{:#}", outcome.unwrap_err()).contains("deleting image x"));
    }

    #[test]
    fn the_record_carries_formats_min_disk_and_properties() {
        let props: BTreeMap<String, String> = [("os_distro".to_string(), "debian".to_string())].into();
        let body = create_body(&NewImage {
            name: "n",
            disk_format: "qcow2",
            min_disk: 3,
            visibility: Some("private"),
            properties: &props,
        });
        assert_eq!(
            body,
            json!({"name": "n", "disk_format": "qcow2", "container_format": "bare", "min_disk": 3,
                   "visibility": "private", "os_distro": "debian"})
        );
        let session = Session { token: String::new(), image_url: "http://g:9292/v2/".into() };
        assert_eq!(images_url(&session), "http://g:9292/v2/images");
    }
}
