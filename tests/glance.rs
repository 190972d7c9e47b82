//! Uploads to a real Keystone and Glance (scripts/openstack-services: PyPI packages, sqlite, Glance's
//! filesystem store, on 127.0.0.1), never a mock: what Glance stores is read back through its API and
//! from its store, and compared with the file, the manifest and the hashes of coreutils.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{fixtures, text};
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
        let env = std::fs::read_to_string(dir.join("demo.env")).unwrap();
        services.env = env
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        services
    }

    fn var(&self, name: &str) -> &str {
        &self.env[name]
    }

    /// The demo user's OS_* variables.
    fn os_env(&self) -> Vec<(&str, &str)> {
        self.env.iter().filter(|(k, _)| k.starts_with("OS_")).map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    /// A token for the demo user, fetched with curl (independent of cloudimg's client).
    fn token(&self) -> String {
        let body = serde_json::json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.var("OS_USERNAME"), "domain": {"name": "Default"}, "password": self.var("OS_PASSWORD")}}},
            "scope": {"project": {"name": self.var("OS_PROJECT_NAME"), "domain": {"name": "Default"}}}}});
        let out = Command::new("curl")
            .args(["-s", "-i", "-X", "POST", "-H", "Content-Type: application/json", "-d", &body.to_string()])
            .arg(format!("{}/auth/tokens", self.var("OS_AUTH_URL")))
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("X-Subject-Token: ").or_else(|| l.strip_prefix("x-subject-token: ")))
            .expect("a token")
            .trim()
            .to_string()
    }

    fn glance_get(&self, path: &str) -> Value {
        let out = Command::new("curl")
            .args(["-s", "-H", &format!("X-Auth-Token: {}", self.token())])
            .arg(format!("{}{path}", self.var("GLANCE_URL")))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("Glance's answer: {}", text(&out.stdout)))
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

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
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
fn images_reach_a_real_glance_intact_and_failures_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    let os = Services::start(&t("openstack"));
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    let out = t("debian-pw.qcow2");

    // 1. customize + --manifest + --upload, credentials from OS_* variables.
    let input = fixtures().image("debian-deleted-data");
    let run = cloudimg_with(
        &[
            "customize",
            p(&input),
            "-o",
            p(&out),
            "--password-file",
            p(&t("pw")),
            "--manifest",
            "--upload",
            "--name",
            "debian pw (env)",
            "--property",
            "hw_disk_bus=scsi",
            "--json",
        ],
        &os.os_env(),
        tmp.path(),
    );
    assert!(run.status.success(), "customize --upload failed: {}", text(&run.stderr));
    let report = json_of(&run);
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
    assert_eq!(manifest["properties"]["os_distro"], "debian");
    assert_eq!(manifest["properties"]["os_version"], "12");
    assert_eq!(manifest["properties"]["os_admin_user"], "debian");
    assert_eq!(manifest["properties"]["hw_qemu_guest_agent"], "yes");
    assert_eq!(manifest["properties"].get("hw_firmware_type"), None, "an MBR disk boots with BIOS");
    let (input_size, output_size) = (std::fs::metadata(&input).unwrap().len(), std::fs::metadata(&out).unwrap().len());
    assert!(
        output_size + (40 << 20) < input_size,
        "the deleted file's 48 MiB were trimmed away: input {input_size} bytes, output {output_size}"
    );
    let id = report["upload"]["image_id"].as_str().expect("an image id").to_string();
    let record = assert_stored(&os, &id, &out);
    assert_eq!(record["name"], "debian pw (env)");
    assert_eq!((record["disk_format"].as_str(), record["container_format"].as_str()), (Some("qcow2"), Some("bare")));
    assert_eq!(record["min_disk"], manifest["min_disk"]);
    for (key, value) in manifest["properties"].as_object().unwrap() {
        assert_eq!(&record[key], value, "property {key}");
    }
    assert_eq!(record["hw_disk_bus"], "scsi");
    assert!(!text(&run.stdout).contains(os.var("OS_PASSWORD")) && !text(&run.stderr).contains(os.var("OS_PASSWORD")));

    // 2. upload with the manifest, credentials from clouds.yaml + secure.yaml (no OS_* at all).
    let cwd = t("cwd");
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
    let run = cloudimg_with(
        &["upload", p(&out), "--manifest", &manifest_path, "--os-cloud", "lab", "--name", "from-clouds-yaml", "--json"],
        &[],
        &cwd,
    );
    assert!(run.status.success(), "upload --os-cloud failed: {}", text(&run.stderr));
    let uploaded = json_of(&run);
    assert_eq!(uploaded["verified"], true);
    let record = assert_stored(&os, uploaded["image_id"].as_str().unwrap(), &out);
    assert_eq!(record["os_distro"], "debian");

    // 3. A wrong password: Keystone's refusal, exit 9, no image, no secret shown.
    let before = os.images().len();
    let mut bad_env = os.os_env();
    bad_env.retain(|(k, _)| *k != "OS_PASSWORD");
    bad_env.push(("OS_PASSWORD", "not the password"));
    let run = cloudimg_with(&["upload", p(&out), "--name", "bad-password"], &bad_env, tmp.path());
    assert_eq!(run.status.code(), Some(9), "{}", text(&run.stderr));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("refused the credentials") && stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("not the password"));
    assert_eq!(os.images().len(), before);

    // 4. Glance's own format check rejects a declared format that does not match; the image is deleted.
    let run = cloudimg_with(
        &["upload", p(&out), "--name", "wrong-format", "--disk-format", "vmdk"],
        &os.os_env(),
        tmp.path(),
    );
    assert_eq!(run.status.code(), Some(9), "{}", text(&run.stderr));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("HTTP 415") && stderr.contains("was deleted"), "{stderr}");
    assert!(os.images().iter().all(|i| i["name"] != "wrong-format"));

    // 5. Glance killed in the middle of the data: non-zero exit, and once Glance is back the
    //    half-created image is gone (cloudimg keeps trying to delete it), nothing queued is left.
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
