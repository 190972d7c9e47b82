//! The one-pass output writer against qemu's own reading of the result: images built with qemu-img and
//! qemu-io (no appliance), written by cloudimg, then judged by `qemu-img check`, `qemu-img compare`
//! and coreutils' hashes.

use std::path::{Path, PathBuf};
use std::process::Command;

use cloudimg::image::header::Format;
use cloudimg::image::output::{self, Pending};

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(image));
}

fn digest(tool: &str, path: &Path) -> String {
    run(Command::new(tool).arg(path)).split_whitespace().next().unwrap().to_string()
}

/// A qcow2 base, compressed (like Ubuntu's images, read through qemu-nbd) or not (read straight from
/// the file), with data in three L2 ranges and a disk size that ends inside a cluster, under an overlay
/// that changes, adds and discards data. Returns the base and the overlay.
fn images(dir: &Path, compressed: bool) -> (PathBuf, PathBuf) {
    let raw = dir.join("base.raw");
    let size = 1536 * MIB + 512;
    run(Command::new("qemu-img").args(["create", "-q", "-f", "raw"]).arg(&raw).arg(size.to_string()));
    qemu_io(
        &raw,
        "raw",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 600M 1M",
            "write -P 0x33 1100M 65k",
            &format!("write -P 0x44 {} 512", size - 512),
        ],
    );
    let base = dir.join(format!("base-{compressed}.qcow2"));
    let compress = if compressed { "-c" } else { "-q" };
    run(Command::new("qemu-img").args(["convert", "-q", compress, "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&base));
    let overlay = dir.join(format!("overlay-{compressed}.qcow2"));
    output::create_overlay(&base, Format::Qcow2, &overlay).unwrap();
    qemu_io(&overlay, "qcow2", &["write -P 0x55 1M 64k", "write -z 600M 1M", "write -P 0x66 900M 4k", "discard 0 64k"]);
    (base, overlay)
}

#[test]
fn written_images_read_back_as_the_overlay_with_the_hashes_of_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = images(dir.path(), true);
    let (plain_base, plain_overlay) = images(dir.path(), false);
    let cases = [
        ("plain", &plain_base, &plain_overlay, Format::Qcow2, false),
        ("qcow2", &base, &overlay, Format::Qcow2, false),
        ("raw", &base, &overlay, Format::Raw, false),
        ("compressed", &base, &overlay, Format::Qcow2, true),
    ];
    for (name, base, overlay, format, compress) in cases {
        let out = dir.path().join(name);
        let pending = Pending::beside(&out).unwrap();
        let mut last = 0.0;
        let digests =
            output::write_image(overlay, base, format, compress, &pending, true, &mut |p| last = p).unwrap().unwrap();
        assert!((99.9..=100.0).contains(&last), "progress ends at 100 % ({last})");
        // The test data has no partition table, which check_written would ask of a raw image.
        let info =
            (format == Format::Qcow2).then(|| output::check_written(&pending, format, 1536 * MIB + 512).unwrap());
        pending.commit(0o644, None, false).unwrap();
        if format == Format::Qcow2 {
            let check = run(Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(&out));
            let check: serde_json::Value = serde_json::from_str(&check).unwrap();
            assert!(check.get("corruptions").is_none() && check.get("leaks").is_none(), "{check}");
            assert_eq!(check["check-errors"], 0, "{check}");
        }
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", format.as_str()])
            .arg(overlay)
            .arg(&out));
        assert_eq!(digests.md5, digest("md5sum", &out), "{}", out.display());
        assert_eq!(digests.sha512, digest("sha512sum", &out), "{}", out.display());
        let Some(info) = info else {
            assert_eq!(std::fs::metadata(&out).unwrap().len(), 1536 * MIB + 512);
            continue;
        };
        if !compress {
            // Only the clusters that hold data are stored: ~3 MiB + 64 KiB + 2 clusters + 4 KiB, plus tables.
            assert!(info.file_size < 4 * MIB, "{} bytes", info.file_size);
        }
    }
    // A compressed image without hashing still reports its progress to the end.
    let mut last = 0.0;
    let compressed = Pending::beside(&dir.path().join("compressed-unhashed")).unwrap();
    assert!(output::write_image(&overlay, &base, Format::Qcow2, true, &compressed, false, &mut |p| last = p)
        .unwrap()
        .is_none());
    assert!((99.9..=100.0).contains(&last), "progress ends at 100 % ({last})");
    // Without hashing nothing is hashed, and the image is the same.
    let again = dir.path().join("again");
    let pending = Pending::beside(&again).unwrap();
    assert!(output::write_image(&overlay, &base, Format::Qcow2, false, &pending, false, &mut |_| {})
        .unwrap()
        .is_none());
    pending.commit(0o644, None, false).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.path().join("qcow2")).unwrap());
    // Read straight from the files or decoded by qemu: the same image.
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.path().join("plain")).unwrap());
}

#[test]
fn an_empty_disk_is_written_whole() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("empty.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&base).arg("10G"));
    let overlay = dir.path().join("overlay.qcow2");
    output::create_overlay(&base, Format::Qcow2, &overlay).unwrap();
    let out = dir.path().join("out");
    let pending = Pending::beside(&out).unwrap();
    let digests =
        output::write_image(&overlay, &base, Format::Qcow2, false, &pending, true, &mut |_| {}).unwrap().unwrap();
    pending.commit(0o644, None, false).unwrap();
    run(Command::new("qemu-img").args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"]).arg(&overlay).arg(&out));
    assert_eq!(digests.md5, digest("md5sum", &out));
}

/// Whether `path` holds `len` bytes of `byte` in a row at a 4 KiB boundary (where a stale cluster of
/// a qemu-io pattern would start).
fn holds_run(path: &Path, byte: u8, len: usize) -> bool {
    let bytes = std::fs::read(path).unwrap();
    (0..bytes.len().saturating_sub(len)).step_by(4096).any(|at| bytes[at..at + len].iter().all(|&b| b == byte))
}

/// The quick path: the input file copied, then only the overlay's own clusters written into the copy
/// through qemu-nbd. The result must read as the overlay (qemu-img compare), be a sound image
/// (qemu-img check), keep the input's holes, and keep none of the data the edits zeroed in the file.
#[test]
fn an_inputs_copy_with_the_edits_written_in_reads_back_as_the_overlay() {
    use cloudimg::image::patch::Copied;
    let dir = tempfile::tempdir().unwrap();
    let (plain_base, plain_overlay) = images(dir.path(), false);
    let (compressed_base, compressed_overlay) = images(dir.path(), true);
    let raw_base = dir.path().join("base.raw");
    let raw_overlay = dir.path().join("overlay-raw.qcow2");
    output::create_overlay(&raw_base, Format::Raw, &raw_overlay).unwrap();
    qemu_io(
        &raw_overlay,
        "qcow2",
        &["write -P 0x55 1M 64k", "write -z 600M 1M", "write -P 0x66 900M 4k", "discard 0 64k"],
    );
    let cases = [
        ("plain", &plain_base, &plain_overlay, Format::Qcow2),
        ("compressed", &compressed_base, &compressed_overlay, Format::Qcow2),
        ("raw", &raw_base, &raw_overlay, Format::Raw),
    ];
    for (name, base, overlay, format) in cases {
        let out = dir.path().join(format!("patched-{name}"));
        let copied = Copied::make(base, format, Pending::beside(&out).unwrap(), &mut |_| {}).unwrap();
        let edits = copied.edits(overlay).unwrap();
        // The 1 MiB zeroed and the 64 KiB discarded, where the input had data.
        assert_eq!(edits.zeroed(), MIB + 64 * 1024, "{name}");
        let written = copied.apply(edits, overlay, format).unwrap();
        // 64 KiB changed, 1 MiB zeroed, 4 KiB added (a cluster, in qcow2), 64 KiB discarded.
        assert!((MIB + 68 * 1024..=MIB + 192 * 1024).contains(&written), "{name}: {written} bytes written");
        copied.pending.commit(0o644, None, false).unwrap();
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", format.as_str()])
            .arg(overlay)
            .arg(&out));
        let base_len = std::fs::metadata(base).unwrap().len();
        let out_len = std::fs::metadata(&out).unwrap().len();
        if format == Format::Qcow2 {
            let check = run(Command::new("qemu-img").args(["check", "--output=json", "-f", "qcow2"]).arg(&out));
            let check: serde_json::Value = serde_json::from_str(&check).unwrap();
            assert!(check.get("corruptions").is_none() && check.get("leaks").is_none(), "{name}: {check}");
            assert_eq!(check["check-errors"], 0, "{name}: {check}");
            // Plain: the new cluster takes the place of a zeroed one. Compressed: the edits are stored
            // as they are, beside what stays compressed.
            let most = if name == "plain" { base_len } else { base_len + 192 * 1024 };
            assert!(out_len <= most, "{name}: {out_len} bytes from {base_len}");
        } else {
            assert_eq!(out_len, base_len, "{name}: a raw disk keeps its size");
        }
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
        assert!(allocated < 8 * MIB, "{name}: the copy keeps the holes ({allocated} bytes allocated)");
        if name != "compressed" {
            assert!(holds_run(base, 0x22, 65536), "{name}: the judge finds the pattern in the input");
            assert!(!holds_run(&out, 0x22, 65536), "{name}: zeroed data is gone from the file");
        }
    }
}
