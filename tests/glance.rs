//! Uploads to a real Keystone and Glance (scripts/openstack-services: PyPI packages, sqlite, two
//! filesystem stores and a staging store, on 127.0.0.1), never a mock: what Glance stores is read back
//! through its API and from its stores, and compared with the file, the manifest and the hashes of
//! coreutils. The services start once; one appliance launch customizes two images, one more run
//! shows that an output failing `--verify` is not uploaded (and is kept with --keep-failed), every
//! other case uploads files made with qemu-img.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{fixtures, p, text};
use serde_json::Value;

const PASSWORD: &str = "glance-bound password";

/// The running services; stopped when dropped (a panicking test included), and by the script's own
/// watcher if this process is killed.
struct Services {
    dir: PathBuf,
    env: BTreeMap<String, String>,
}

impl Services {
    fn start(dir: &Path) -> Services {
        let status = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir)
            .arg(std::process::id().to_string())
            .status()
            .expect("running scripts/openstack-services");
        let mut services = Services { dir: dir.to_path_buf(), env: BTreeMap::new() };
        assert!(status.success(), "the OpenStack services did not start (logs in {})", dir.display());
        services.env = read_env(&dir.join("demo.env")).into_iter().collect();
        services
    }

    fn var(&self, name: &str) -> &str {
        &self.env[name]
    }

    /// The demo user's OS_* variables.
    fn os_env(&self) -> Vec<(&str, &str)> {
        self.env.iter().filter(|(k, _)| k.starts_with("OS_")).map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    /// The OS_* variables of another account the script made (admin, builder, putonly).
    fn account(&self, name: &str) -> Vec<(String, String)> {
        read_env(&self.dir.join(format!("{name}.env"))).into_iter().filter(|(k, _)| k.starts_with("OS_")).collect()
    }

    /// A project-scoped token for the demo user (or `account`), fetched with curl, independent of
    /// cloudimg's client; with it, the token's body.
    fn token_of(&self, account: Option<&str>) -> (String, Value) {
        let vars: BTreeMap<String, String> = match account {
            Some(name) => self.account(name).into_iter().collect(),
            None => self.env.clone(),
        };
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": vars["OS_USERNAME"], "domain": {"name": "Default"}, "password": vars["OS_PASSWORD"]}}},
            "scope": {"project": {"name": vars["OS_PROJECT_NAME"], "domain": {"name": "Default"}}}}});
        let (headers, body) =
            curl(&["-X", "POST", "-i"], &format!("{}/auth/tokens", self.var("OS_AUTH_URL")), Some(body));
        let token = headers
            .lines()
            .find_map(|l| l.strip_prefix("X-Subject-Token: ").or_else(|| l.strip_prefix("x-subject-token: ")))
            .expect("a token")
            .trim()
            .to_string();
        (token, body)
    }

    fn glance_get(&self, path: &str) -> Value {
        self.glance_get_as(None, path)
    }

    fn glance_get_as(&self, account: Option<&str>, path: &str) -> Value {
        let header = format!("X-Auth-Token: {}", self.token_of(account).0);
        curl(&["-H", &header], &format!("{}{path}", self.var("GLANCE_URL")), None).1
    }

    /// The demo project's images called `name`, hidden ones included, newest first.
    fn images_named(&self, name: &str) -> Vec<Value> {
        let mut all: Vec<Value> = ["false", "true"]
            .iter()
            .flat_map(|hidden| {
                self.glance_get(&format!("/v2/images?os_hidden={hidden}&limit=1000"))["images"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .filter(|i| i["name"] == name)
            .collect();
        all.sort_by(|a, b| b["created_at"].as_str().cmp(&a["created_at"].as_str()));
        all
    }

    fn images(&self) -> Vec<Value> {
        self.glance_get("/v2/images?limit=1000")["images"].as_array().unwrap().clone()
    }

    fn stored_file(&self, id: &str) -> PathBuf {
        Path::new(self.var("GLANCE_STORE")).join(id)
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(&self.dir).status();
    }
}

/// `export K=V` lines.
fn read_env(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// curl `url` with `args`, a JSON `body` sent on stdin (never on a command line); the answer's
/// headers (with -i) and its JSON body.
fn curl(args: &[&str], url: &str, body: Option<Value>) -> (String, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-H", "Content-Type: application/json"]).args(args).arg(url);
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(body) = body {
        stdin.write_all(body.to_string().as_bytes()).unwrap();
    }
    drop(stdin);
    let out = text(&child.wait_with_output().unwrap().stdout);
    let (headers, json) = match out.find("\r\n\r\n") {
        Some(end) if out.starts_with("HTTP/") => (out[..end].to_string(), &out[end + 4..]),
        _ => (String::new(), out.as_str()),
    };
    let value = serde_json::from_str(json).unwrap_or_else(|_| panic!("not JSON from {url}: {out}"));
    (headers, value)
}

/// A small qcow2 image whose data is `seed` repeated: different seeds, different images.
fn small_image(path: &Path, seed: &str) {
    let raw = path.with_extension("raw");
    std::fs::write(&raw, seed.repeat((256 << 10) / seed.len())).unwrap();
    let made =
        Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(path).status().unwrap();
    assert!(made.success());
    std::fs::remove_file(raw).unwrap();
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openstack-services")
}

/// Runs cloudimg with exactly these OpenStack settings (none inherited from the caller's shell).
fn cloudimg_with(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudimg"));
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("OS_")) {
        cmd.env_remove(key);
    }
    cmd.env("HOME", cwd).envs(env.iter().copied());
    cmd.output().unwrap()
}

fn coreutils_hash(tool: &str, path: &Path) -> String {
    let out = Command::new(tool).arg(path).output().unwrap();
    text(&out.stdout).split_whitespace().next().unwrap().to_string()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {} stderr {}", text(&out.stdout), text(&out.stderr)))
}

/// Glance holds an active image equal to `file`: size, checksum and os_hash_value against coreutils,
/// and the bytes in its store.
fn assert_stored(os: &Services, id: &str, file: &Path) -> Value {
    let record = os.glance_get(&format!("/v2/images/{id}"));
    assert_eq!(record["status"], "active");
    assert_eq!(record["size"].as_u64(), Some(std::fs::metadata(file).unwrap().len()));
    assert_eq!(record["checksum"].as_str().unwrap(), coreutils_hash("md5sum", file));
    assert_eq!(record["os_hash_algo"], "sha512");
    assert_eq!(record["os_hash_value"].as_str().unwrap(), coreutils_hash("sha512sum", file));
    let same = Command::new("cmp").arg(file).arg(os.stored_file(id)).status().unwrap();
    assert!(same.success(), "Glance's stored file differs from {}", file.display());
    record
}

#[test]
fn uploads_to_a_real_keystone_and_glance() {
    let tmp = tempfile::tempdir().unwrap();
    let os = Services::start(&tmp.path().join("openstack"));
    let out = customized_images_reach_glance_intact(&os, tmp.path());
    a_manifest_and_clouds_yaml_upload_it_again(&os, tmp.path(), &out);
    every_supported_credential(&os, tmp.path());
    import_methods_stores_and_policies(&os, tmp.path());
    image_lifecycle(&os, tmp.path());
    failures_leave_nothing(&os, tmp.path());
}

/// customize + --manifest + --upload of two images in one appliance (an x86_64 Debian and an arm64
/// one), credentials from OS_*. Returns the Debian output.
fn customized_images_reach_glance_intact(os: &Services, tmp: &Path) -> PathBuf {
    let t = |name: &str| tmp.join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::create_dir(t("out")).unwrap();
    let (input, arm) = (fixtures().image("debian-deleted-data"), fixtures().image("debian-aarch64"));
    let run = cloudimg_with(
        &[
            "customize",
            p(&input),
            p(&arm),
            "--out-dir",
            p(&t("out")),
            "--password-file",
            p(&t("pw")),
            "--manifest",
            "--upload",
            "--property",
            "hw_disk_bus=scsi",
            "--json",
        ],
        &os.os_env(),
        tmp,
    );
    assert!(run.status.success(), "customize --upload failed: {}", text(&run.stderr));
    let reports = json_of(&run);
    let (report, arm_report) = (&reports[0]["report"], &reports[1]["report"]);
    let out = t("out/debian-deleted-data.qcow2");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{}.json", out.display())).unwrap()).unwrap();
    assert_eq!(report["manifest"], manifest, "the manifest file is the report's");
    assert_eq!(manifest["checksum"].as_str().unwrap(), coreutils_hash("md5sum", &out));
    assert_eq!(manifest["os_hash_value"].as_str().unwrap(), coreutils_hash("sha512sum", &out));
    assert_eq!(manifest["size"].as_u64(), Some(std::fs::metadata(&out).unwrap().len()));
    let info: Value = serde_json::from_slice(
        &Command::new("qemu-img").args(["info", "--output=json", "-f", "qcow2"]).arg(&out).output().unwrap().stdout,
    )
    .unwrap();
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    assert!(info.get("backing-filename").is_none() && info["format-specific"]["data"].get("data-file").is_none());
    assert_eq!(manifest["virtual_size"], info["virtual-size"]);
    let virtual_size = info["virtual-size"].as_u64().unwrap();
    assert_eq!(manifest["min_disk"].as_u64(), Some(virtual_size.div_ceil(1 << 30)));
    let props = &manifest["properties"];
    assert_eq!(props["os_distro"], "debian");
    assert_eq!(props["os_version"], "12");
    assert_eq!(props["os_admin_user"], "debian");
    assert_eq!(props["hw_qemu_guest_agent"], "yes");
    assert_eq!(props["os_require_quiesce"], "yes", "the image has qemu-ga");
    assert_eq!(props["architecture"], "x86_64", "read from /bin/sh's ELF header");
    assert_eq!(props.get("hw_firmware_type"), None, "an MBR disk boots with BIOS");
    assert_eq!(props.get("hw_machine_type"), None);
    let (input_size, output_size) = (std::fs::metadata(&input).unwrap().len(), std::fs::metadata(&out).unwrap().len());
    assert!(
        output_size + (40 << 20) < input_size,
        "the deleted file's 48 MiB were trimmed away: input {input_size} bytes, output {output_size}"
    );
    let id = report["upload"]["image_id"].as_str().expect("an image id").to_string();
    assert_eq!(report["upload"]["import_method"], "glance-direct", "auto imports where the cloud offers it");
    let record = assert_stored(os, &id, &out);
    assert_eq!(record["name"], "debian-deleted-data");
    assert_eq!((record["disk_format"].as_str(), record["container_format"].as_str()), (Some("qcow2"), Some("bare")));
    assert_eq!(record["min_disk"], manifest["min_disk"]);
    for (key, value) in manifest["properties"].as_object().unwrap() {
        assert_eq!(&record[key], value, "property {key}");
    }
    assert_eq!(record["hw_disk_bus"], "scsi");
    // The arm64 image, edited on this x86_64 host: its architecture reaches Glance.
    let arm_out = t("out/debian-aarch64.qcow2");
    assert_eq!(arm_report["manifest"]["properties"]["architecture"], "aarch64", "via /bin -> usr/bin, sh -> dash");
    let arm_record = assert_stored(os, arm_report["upload"]["image_id"].as_str().unwrap(), &arm_out);
    assert_eq!(arm_record["architecture"], "aarch64");
    assert_eq!(arm_record.get("os_require_quiesce"), None, "no guest agent in that image");
    assert!(!text(&run.stdout).contains(os.var("OS_PASSWORD")) && !text(&run.stderr).contains(os.var("OS_PASSWORD")));
    out
}

/// `upload` of `out` with its manifest, a password from clouds.yaml + secure.yaml (no OS_* at all),
/// PUT, and a derived property left out.
fn a_manifest_and_clouds_yaml_upload_it_again(os: &Services, tmp: &Path, out: &Path) {
    let cwd = tmp.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(
        cwd.join("clouds.yaml"),
        format!(
            "clouds:\n  lab:\n    auth:\n      auth_url: {}\n      username: demo\n      project_name: demo\n      \
             user_domain_name: Default\n      project_domain_name: Default\n    region_name: RegionOne\n    interface: public\n",
            os.var("OS_AUTH_URL")
        ),
    )
    .unwrap();
    std::fs::write(
        cwd.join("secure.yaml"),
        format!("clouds:\n  lab:\n    auth:\n      password: {}\n", os.var("OS_PASSWORD")),
    )
    .unwrap();
    let manifest_path = format!("{}.json", out.display());
    let args = ["upload", p(out), "--manifest", &manifest_path, "--os-cloud", "lab", "--name", "from-clouds-yaml"];
    let more = ["--import-method", "put", "--no-property", "os_require_quiesce", "--json"];
    let run = cloudimg_with(&[&args[..], &more[..]].concat(), &[], &cwd);
    assert!(run.status.success(), "upload --os-cloud failed: {}", text(&run.stderr));
    let uploaded = json_of(&run);
    assert_eq!((&uploaded["verified"], &uploaded["import_method"]), (&Value::Bool(true), &Value::from("put")));
    let record = assert_stored(os, uploaded["image_id"].as_str().unwrap(), out);
    assert_eq!(record["os_distro"], "debian");
    assert_eq!(record.get("os_require_quiesce"), None, "--no-property os_require_quiesce");
}

/// An application credential made through Keystone's API, used from clouds.yaml + secure.yaml and
/// from OS_*; a token from OS_TOKEN; an auth type cloudimg does not speak.
fn every_supported_credential(os: &Services, tmp: &Path) {
    let image = tmp.join("creds.qcow2");
    small_image(&image, "credentials ");
    let (token, token_body) = os.token_of(None);
    let user_id = token_body["token"]["user"]["id"].as_str().unwrap().to_string();
    let project_id = token_body["token"]["project"]["id"].as_str().unwrap().to_string();
    let (_, made) = curl(
        &["-X", "POST", "-H", &format!("X-Auth-Token: {token}")],
        &format!("{}/users/{user_id}/application_credentials", os.var("OS_AUTH_URL")),
        Some(serde_json::json!({"application_credential": {"name": "cloudimg-ci"}})),
    );
    let (ac_id, ac_secret) = (
        made["application_credential"]["id"].as_str().expect("an application credential").to_string(),
        made["application_credential"]["secret"].as_str().unwrap().to_string(),
    );
    let cwd = tmp.join("appcred");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(
        cwd.join("clouds.yaml"),
        format!(
            "clouds:\n  ci:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: {}\n      \
             application_credential_id: {ac_id}\n    region_name: RegionOne\n",
            os.var("OS_AUTH_URL")
        ),
    )
    .unwrap();
    std::fs::write(
        cwd.join("secure.yaml"),
        format!("clouds:\n  ci:\n    auth:\n      application_credential_secret: {ac_secret}\n"),
    )
    .unwrap();
    let secrets = [ac_secret.as_str(), token.as_str(), os.var("OS_PASSWORD")];
    let upload = |name: &str, env: &[(&str, &str)], cwd: &Path| {
        let run = cloudimg_with(&["upload", p(&image), "--name", name, "--json"], env, cwd);
        let all = format!("{}{}", text(&run.stdout), text(&run.stderr));
        assert!(secrets.iter().all(|s| !all.contains(s)), "a secret was printed: {all}");
        run
    };
    let check = |run: &Output, what: &str| {
        assert!(run.status.success(), "{what}: {}", text(&run.stderr));
        let record = assert_stored(os, json_of(run)["image_id"].as_str().unwrap(), &image);
        assert_eq!(record["owner"].as_str(), Some(project_id.as_str()), "{what}: the credential's project owns it");
    };
    check(&upload("by-application-credential", &[("OS_CLOUD", "ci")], &cwd), "clouds.yaml + secure.yaml");
    let by_name = [
        ("OS_AUTH_URL", os.var("OS_AUTH_URL")),
        ("OS_AUTH_TYPE", "v3applicationcredential"),
        ("OS_APPLICATION_CREDENTIAL_NAME", "cloudimg-ci"),
        ("OS_APPLICATION_CREDENTIAL_SECRET", ac_secret.as_str()),
        ("OS_USERNAME", "demo"),
        ("OS_USER_DOMAIN_NAME", "Default"),
    ];
    check(&upload("by-application-credential-name", &by_name, tmp), "OS_* with the credential's name");
    // No OS_AUTH_TYPE: a token and no user name mean token authentication, as in the openstack CLI.
    let by_token = [
        ("OS_AUTH_URL", os.var("OS_AUTH_URL")),
        ("OS_TOKEN", token.as_str()),
        ("OS_PROJECT_NAME", "demo"),
        ("OS_PROJECT_DOMAIN_NAME", "Default"),
    ];
    check(&upload("by-token", &by_token, tmp), "OS_TOKEN");
    let wrong_secret = [("OS_APPLICATION_CREDENTIAL_SECRET", "not the secret")];
    let run = upload("wrong-secret", &[&by_name[..3], &wrong_secret[..], &by_name[4..]].concat(), tmp);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(9), "{stderr}");
    assert!(stderr.contains("refused the application credential") && stderr.contains("401"), "{stderr}");
    let run = upload("oidc", &[("OS_AUTH_URL", os.var("OS_AUTH_URL")), ("OS_AUTH_TYPE", "v3oidcpassword")], tmp);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("auth_type v3oidcpassword")
            && stderr.contains("password, v3password, v3applicationcredential, token, v3token"),
        "{stderr}"
    );
}

/// auto and put, both stored intact; a policy that forbids PUT, one that forbids staging; an import
/// Glance fails; two stores.
fn import_methods_stores_and_policies(os: &Services, tmp: &Path) {
    let image = tmp.join("methods.qcow2");
    small_image(&image, "import methods ");
    let upload = |account: Option<&str>, name: &str, extra: &[&str]| {
        let env = account
            .map(|a| os.account(a))
            .unwrap_or_else(|| os.os_env().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cloudimg_with(&[&["upload", p(&image), "--name", name, "--json"][..], extra].concat(), &env, tmp)
    };
    let stored_with = |run: &Output, method: &str| -> Value {
        assert!(run.status.success(), "{method}: {}", text(&run.stderr));
        let uploaded = json_of(run);
        assert_eq!(uploaded["import_method"], method);
        assert_stored(os, uploaded["image_id"].as_str().unwrap(), &image)
    };
    stored_with(&upload(None, "auto", &[]), "glance-direct");
    stored_with(&upload(None, "put", &["--import-method", "put"]), "put");

    // builder may not PUT: put fails with Glance's reason and leaves nothing; auto imports.
    let refused = upload(Some("builder"), "builder-put", &["--import-method", "put"]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(9), "{stderr}");
    assert!(
        stderr.contains("HTTP 403") && stderr.contains("upload_image") && stderr.contains("was deleted"),
        "{stderr}"
    );
    assert!(os.images_named("builder-put").is_empty());
    stored_with(&upload(Some("builder"), "builder-auto", &[]), "glance-direct");
    // putonly may not stage: auto falls back to PUT, and says so.
    let fallback = upload(Some("putonly"), "putonly-auto", &[]);
    stored_with(&fallback, "put");
    assert!(text(&fallback.stderr).contains("refused to stage the data (HTTP 403"), "{}", text(&fallback.stderr));

    // An import that Glance fails (the data is qcow2, declared vmdk): its message, and no image.
    let failed = upload(None, "failed-import", &["--disk-format", "vmdk"]);
    let stderr = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(9), "{stderr}");
    assert!(
        stderr.contains("import of image")
            && stderr.contains("into fs failed: Task failed")
            && stderr.contains("was deleted"),
        "{stderr}"
    );
    assert!(os.images_named("failed-import").is_empty());

    // Two stores: the image lands in the ones named, by import and by PUT.
    for (extra, stores) in [
        (&["--stores", "fs2"][..], &["fs2"][..]),
        (&["--stores", "fs,fs2"], &["fs", "fs2"]),
        (&["--import-method", "put", "--stores", "fs2"], &["fs2"]),
    ] {
        let run = upload(None, "stores", extra);
        assert!(run.status.success(), "{extra:?}: {}", text(&run.stderr));
        let uploaded = json_of(&run);
        assert_eq!(uploaded["verified"], true);
        let id = uploaded["image_id"].as_str().unwrap();
        let record = os.glance_get(&format!("/v2/images/{id}"));
        assert_eq!(record["stores"], stores.join(","), "{extra:?}");
        for (store, dir) in [("fs", "GLANCE_STORE"), ("fs2", "GLANCE_STORE2")] {
            let file = Path::new(os.var(dir)).join(id);
            assert_eq!(file.exists(), stores.contains(&store), "{extra:?}: {}", file.display());
            if file.exists() {
                assert!(Command::new("cmp").arg(&image).arg(&file).status().unwrap().success());
            }
        }
    }
}

/// Three builds of one name with --hide-previous --keep 2, --if-changed, a dry run, tags, members,
/// visibility and protection, all read back from Glance.
fn image_lifecycle(os: &Services, tmp: &Path) {
    let builds: Vec<PathBuf> = (1..=4).map(|i| tmp.join(format!("build{i}.qcow2"))).collect();
    for (i, build) in builds.iter().enumerate() {
        small_image(build, &format!("weekly build {i} "));
    }
    let partner = os.var("PARTNER_PROJECT_ID").to_string();
    let upload = |build: &Path, extra: &[&str], account: Option<&str>| {
        let base =
            ["upload", p(build), "--name", "weekly", "--json", "--tag", "weekly", "--tag", "ci", "--member", &partner];
        let env = account
            .map(|a| os.account(a))
            .unwrap_or_else(|| os.os_env().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let run = cloudimg_with(&[&base[..], extra].concat(), &env, tmp);
        assert!(run.status.success(), "{}", text(&run.stderr));
        json_of(&run)
    };
    let lifecycle = ["--hide-previous", "--keep", "2", "--visibility", "shared", "--min-ram", "512"];
    let ids: Vec<String> =
        builds[..3].iter().map(|b| upload(b, &lifecycle, None)["image_id"].as_str().unwrap().to_string()).collect();
    let images = os.images_named("weekly");
    let listed: Vec<(&str, bool)> =
        images.iter().map(|i| (i["id"].as_str().unwrap(), i["os_hidden"] == true)).collect();
    assert_eq!(
        listed,
        [(ids[2].as_str(), false), (ids[1].as_str(), true)],
        "the first build is deleted, the second hidden"
    );
    let newest = assert_stored(os, &ids[2], &builds[2]);
    assert_eq!(
        newest["tags"].as_array().map(|t| {
            let mut t = t.clone();
            t.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            t
        }),
        Some(vec![Value::from("ci"), Value::from("weekly")])
    );
    assert_eq!(
        (&newest["visibility"], &newest["min_ram"], &newest["protected"]),
        (&Value::from("shared"), &Value::from(512), &Value::Bool(false))
    );
    let members = os.glance_get(&format!("/v2/images/{}/members", ids[2]));
    assert_eq!(members["members"][0]["member_id"], partner.as_str());
    assert_eq!(members["members"][0]["status"], "pending", "only the partner project (or an admin) accepts");

    // The same bytes again: nothing uploaded, the existing image reported.
    let same = upload(&builds[2], &[&lifecycle[..], &["--if-changed"]].concat(), None);
    assert_eq!((&same["unchanged"], &same["image_id"]), (&Value::Bool(true), &Value::from(ids[2].as_str())));
    assert_eq!(os.images_named("weekly").len(), 2);

    // A dry run lists what it would delete, and changes nothing.
    let plan = upload(&builds[3], &["--keep", "1", "--dry-run"], None);
    let planned: Vec<(&str, &str, bool)> = plan["previous"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["action"].as_str().unwrap(), s["image_id"].as_str().unwrap(), s["done"] == true))
        .collect();
    assert_eq!(planned, [("delete", ids[2].as_str(), false), ("delete", ids[1].as_str(), false)]);
    assert_eq!(os.images_named("weekly").len(), 2, "a dry run deletes nothing");

    // A protected build survives --keep 1; the unprotected ones go.
    let protected = upload(&builds[3], &["--protected"], None)["image_id"].as_str().unwrap().to_string();
    assert_eq!(os.glance_get(&format!("/v2/images/{protected}"))["protected"], true);
    let last = upload(&builds[0], &["--keep", "1"], None);
    let deleted: Vec<&str> =
        last["previous"].as_array().unwrap().iter().map(|s| s["image_id"].as_str().unwrap()).collect();
    assert_eq!(deleted, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(last["kept_protected"], serde_json::json!([protected]));
    let left: Vec<String> = os.images_named("weekly").iter().map(|i| i["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(left, [last["image_id"].as_str().unwrap().to_string(), protected]);

    // An administrator may accept the sharing for the partner project.
    let admin = upload(&builds[1], &[], Some("admin"));
    let id = admin["image_id"].as_str().unwrap();
    assert_eq!(admin["members"][0]["status"], "accepted");
    let members = os.glance_get_as(Some("admin"), &format!("/v2/images/{id}/members"));
    assert_eq!(members["members"][0]["status"], "accepted");
}

/// A wrong password, an output that fails --verify, a format Glance refuses, and Glance killed in the
/// middle of the data: no image left behind, no secret shown.
fn failures_leave_nothing(os: &Services, tmp: &Path) {
    let t = |name: &str| tmp.join(name);
    let out = t("out/debian-deleted-data.qcow2");
    let before = os.images().len();
    let mut bad_env = os.os_env();
    bad_env.retain(|(k, _)| *k != "OS_PASSWORD");
    bad_env.push(("OS_PASSWORD", "not the password"));
    let run = cloudimg_with(&["upload", p(&out), "--name", "bad-password"], &bad_env, tmp);
    assert_eq!(run.status.code(), Some(9), "{}", text(&run.stderr));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("refused the password") && stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("not the password"));
    assert_eq!(os.images().len(), before);

    // customize --verify --upload --keep-failed of an output that cannot boot (the phony guest has no
    // kernel): the verification fails, nothing is uploaded, nothing is under the output name, and
    // the image that failed is kept beside it, whole.
    std::fs::create_dir(t("unverified")).unwrap();
    let unverified = t("unverified/out.qcow2");
    let (input, pw) = (fixtures().image("debian-ext4"), t("pw"));
    let args = ["customize", p(&input), "-o", p(&unverified), "--password-file", p(&pw)];
    let more = ["--verify", "--keep-failed", "--upload", "--name", "unverified"];
    let run = cloudimg_with(&[&args[..], &more[..]].concat(), &os.os_env(), tmp);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("by booting it") && stderr.contains("no kernel in /boot"), "{stderr}");
    assert!(stderr.contains("nothing was written under that name"), "{stderr}");
    let kept = t("unverified/out.failed.qcow2");
    assert!(stderr.contains(&format!("kept as {}", kept.display())), "{stderr}");
    let names: Vec<_> = std::fs::read_dir(t("unverified")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, ["out.failed.qcow2"], "only the kept image");
    let check = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&kept).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", text(&check.stdout));
    assert_eq!(os.images().len(), before, "nothing uploaded");

    // Glance's own format check rejects a declared format that does not match; the image is deleted.
    let run = cloudimg_with(
        &["upload", p(&out), "--name", "wrong-format", "--disk-format", "vmdk", "--import-method", "put"],
        &os.os_env(),
        tmp,
    );
    assert_eq!(run.status.code(), Some(9), "{}", text(&run.stderr));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("HTTP 415") && stderr.contains("was deleted"), "{stderr}");
    assert!(os.images().iter().all(|i| i["name"] != "wrong-format"));

    // Glance killed in the middle of the data (staging it, as auto does here): non-zero exit, and
    // once Glance is back the half-created image is gone (cloudimg keeps trying to delete it),
    // nothing queued is left.
    let big = t("big.raw");
    let converted =
        Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&out).arg(&big).status().unwrap();
    assert!(converted.success());
    std::fs::OpenOptions::new().write(true).open(&big).unwrap().set_len(3 << 30).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudimg"))
        .args(["upload", p(&big), "--name", "interrupted"])
        .envs(os.os_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines().map_while(Result::ok);
    assert!(lines.any(|l| l.contains("uploading: 25%")), "the upload never got going");
    let restarted = Command::new("bash").arg(script()).arg("restart-glance").arg(&os.dir).status().unwrap();
    assert!(restarted.success());
    let rest: Vec<String> = lines.collect();
    let result = child.wait_with_output().unwrap();
    let stderr = text(&result.stderr);
    assert_eq!(result.status.code(), Some(9), "stdout {rest:?} stderr {stderr}");
    assert!(stderr.contains("was deleted"), "{stderr}");
    let images = os.images();
    assert!(images.iter().all(|i| i["name"] != "interrupted"), "{images:?}");
    assert!(images.iter().all(|i| i["status"] == "active"), "{images:?}");
}
