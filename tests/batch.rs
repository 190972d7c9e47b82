//! Several images in one `cloudimg customize` run: identical copies (ext4, xfs, LVM), a broken guest
//! and a file that is no image among them. Each written image is read back and judged by PyYAML and
//! the system's crypt(3).

mod common;

use std::path::PathBuf;

use common::{cloudimg, file_text, fixtures, p, pyyaml, sha256, system_crypt_verifies, text, ReadBack};
use serde_json::Value;

const PASSWORD: &str = "batch: one password, many images";

/// The password hash cloud-init will set for `user`, read from the image's cloud.cfg.
fn configured_hash(files: &std::collections::BTreeMap<String, Option<Vec<u8>>>, user: &str) -> String {
    let cfg = &pyyaml(&[file_text(files, "/etc/cloud/cloud.cfg")])[0];
    let users = cfg["chpasswd"]["users"].as_array().expect("chpasswd.users");
    let entry = users.iter().find(|u| u["name"] == user).expect("an entry for the user");
    entry["password"].as_str().unwrap().to_string()
}

#[test]
fn one_run_customizes_copies_and_fails_only_the_bad_images() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    let copy = |fixture: &str, name: &str| -> PathBuf {
        std::fs::copy(fx.image(fixture), t(name)).unwrap();
        t(name)
    };
    let inputs = [
        copy("debian-ext4", "ext4-a.qcow2"),
        copy("debian-xfs", "xfs-a.qcow2"),
        copy("rocky-lvm-xfs", "lvm-a.qcow2"),
        copy("no-os", "no-os.qcow2"),
        copy("debian-ext4", "ext4-b.qcow2"),
        copy("debian-xfs", "xfs-b.qcow2"),
        copy("rocky-lvm-xfs", "lvm-b.qcow2"),
    ];
    let junk = t("junk.qcow2");
    std::fs::write(&junk, vec![0x5a; 70_000]).unwrap();
    let sums: Vec<String> = inputs.iter().map(|i| sha256(i)).collect();
    std::fs::create_dir(t("out")).unwrap();
    let (out_dir, pw) = (t("out"), t("pw"));

    let mut args = vec!["customize"];
    args.extend(inputs[..4].iter().map(|i| p(i)));
    args.push(p(&junk));
    args.extend(inputs[4..].iter().map(|i| p(i)));
    args.extend(["--out-dir", p(&out_dir), "--password-file", p(&pw), "--clean-instance-state", "--json"]);
    let out = cloudimg(&args, None, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "the first failure (no OS) decides the status: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    let entries = report.as_array().unwrap();
    assert_eq!(entries.len(), 8);
    let by_name = |name: &str| entries.iter().find(|e| e["input"].as_str().unwrap().ends_with(name)).unwrap();
    for name in ["ext4-a", "ext4-b", "xfs-a", "xfs-b", "lvm-a", "lvm-b"] {
        let e = by_name(&format!("{name}.qcow2"));
        assert_eq!(e["ok"], true, "{name}: {e}");
        assert_eq!(e["report"]["output"], p(&t(&format!("out/{name}.qcow2"))));
    }
    assert_eq!(by_name("no-os.qcow2")["exit_code"], 4);
    assert!(by_name("no-os.qcow2")["error"].as_str().unwrap().contains("no operating system"));
    assert_eq!(by_name("junk.qcow2")["exit_code"], 3);
    assert!(!t("out/no-os.qcow2").exists() && !t("out/junk.qcow2").exists());
    // The LVM copies cannot share an appliance (LVM activates neither); the others did.
    for name in ["lvm-a", "lvm-b"] {
        assert!(stderr.contains(&format!("{name}.qcow2 gets an appliance launch of its own")), "{stderr}");
    }
    assert!(!stderr.contains("ext4-a.qcow2 gets") && !stderr.contains("xfs-b.qcow2 gets"), "{stderr}");
    assert_eq!(inputs.iter().map(|i| sha256(i)).collect::<Vec<_>>(), sums, "inputs unchanged");

    // In place, several at once.
    let in_place = [copy("debian-ext4", "in-place-1.qcow2"), copy("debian-xfs", "in-place-2.qcow2")];
    let mut args = vec!["customize"];
    args.extend(in_place.iter().map(|i| p(i)));
    args.extend(["--in-place", "--password-file", p(&pw)]);
    let out = cloudimg(&args, None, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 of 2 images written"), "{}", text(&out.stdout));

    let o = |name: &str| t(&format!("out/{name}.qcow2"));
    let outputs = ["ext4-a", "ext4-b", "xfs-a", "xfs-b", "lvm-a", "lvm-b"].map(o);
    let hashes = configured_hashes(&outputs, &in_place);
    for hash in &hashes {
        assert!(system_crypt_verifies(PASSWORD, hash), "{hash}");
    }
}

/// The password hash cloud.cfg holds in each output (ext4 a and b, xfs a and b, LVM a and b) and in
/// each image edited in place (ext4, xfs); the two LVM copies need two launches (LVM activates
/// neither when both are attached).
fn configured_hashes(outputs: &[PathBuf; 6], in_place: &[PathBuf; 2]) -> Vec<String> {
    let cfg = ["/etc/cloud/cloud.cfg"];
    let [ext4_a, ext4_b, xfs_a, xfs_b, lvm_a, lvm_b] = outputs;
    let back = ReadBack::open(&[ext4_a, ext4_b, xfs_a, xfs_b, lvm_a, &in_place[0], &in_place[1]]);
    let mut hashes = vec![
        configured_hash(&back.read("/dev/sda1", "", &cfg), "debian"),
        configured_hash(&back.read("/dev/sdb1", "", &cfg), "debian"),
        configured_hash(&back.read("/dev/sdc1", "nouuid", &cfg), "debian"),
        configured_hash(&back.read("/dev/sdd1", "nouuid", &cfg), "debian"),
        configured_hash(&back.read("/dev/rl/root", "nouuid", &cfg), "rocky"),
        configured_hash(&back.read("/dev/sdf1", "", &cfg), "debian"),
        configured_hash(&back.read("/dev/sdg1", "nouuid", &cfg), "debian"),
    ];
    drop(back);
    hashes.push(configured_hash(&ReadBack::open(&[lvm_b]).read("/dev/rl/root", "", &cfg), "rocky"));
    hashes
}

#[test]
fn an_image_whose_fstab_names_another_images_volume_is_refused_alone() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name);
    std::fs::write(t("pw"), format!("{PASSWORD}\n")).unwrap();
    let (rocky, borrower) = (t("rocky.qcow2"), t("borrower.qcow2"));
    std::fs::copy(fx.image("rocky-lvm-xfs"), &rocky).unwrap();
    std::fs::copy(fx.image("debian-fstab-borrows-lvm"), &borrower).unwrap();
    std::fs::create_dir(t("out")).unwrap();
    let (out_dir, pw) = (t("out"), t("pw"));
    let args = ["customize", p(&rocky), p(&borrower), "--out-dir", p(&out_dir), "--password-file", p(&pw), "--json"];
    let out = cloudimg(&args, None, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    let (rocky_entry, borrower_entry) = (&report[0], &report[1]);
    assert_eq!(rocky_entry["ok"], true, "{rocky_entry}");
    assert_eq!(borrower_entry["exit_code"], 4, "{borrower_entry}");
    let error = borrower_entry["error"].as_str().unwrap();
    assert!(
        error.contains("/etc/fstab mounts /var from /dev/mapper/rl-root")
            && error.contains("/dev/rl/root is not one of this image's own filesystems"),
        "{error}"
    );
    assert!(!stderr.contains("gets an appliance launch of its own"), "the two shared the appliance: {stderr}");
    assert!(!t("out/borrower.qcow2").exists());
    let cfg = ["/etc/cloud/cloud.cfg"];
    let hash = configured_hash(&ReadBack::open(&[&t("out/rocky.qcow2")]).read("/dev/rl/root", "", &cfg), "rocky");
    assert!(system_crypt_verifies(PASSWORD, &hash), "the other image is customized: {hash}");
}
