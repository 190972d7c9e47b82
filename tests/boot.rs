//! Proof by booting: real Debian cloud images (debootstrap from Debian's mirror, cached by recipe) of
//! three cloud-init generations, customized by cloudimg, judged by `cloudimg verify` — which boots
//! them under qemu with a NoCloud seed that sets no password and logs in over SSH with password
//! authentication only. The right password must get in (and a wrong one not), but not into the
//! unmodified bookworm image; `cloud-init status --long` must end `done` (from 23.4 on: exit 0, not
//! `degraded`). The images have no bootloader: verify boots their kernel and initrd directly, except
//! the two trixie ones given one here (GRUB for UEFI, extlinux for BIOS).
//!
//! - bookworm: Debian 12, cloud-init 22.4, OpenSSH 9.2; also a booted disk reset through /etc/shadow;
//! - trixie: Debian 13, cloud-init 25.1, OpenSSH 10, Ubuntu's `PasswordAuthentication no` drop-in;
//! - sid: Debian unstable, cloud-init 26.x (meson build), the same drop-in, and a second account
//!   given a password and a key; `customize --verify` keeps no output when the boot refuses.
//! - trixie's default image becomes a GPT disk with an EFI system partition and GRUB, and boots
//!   through OVMF; its `--drop-in` image gets extlinux, and boots through SeaBIOS.
//!
//! Slow (minutes), so ignored by plain `cargo test`; run with
//! `cargo test --locked --test boot -- --ignored --nocapture --test-threads 4`. The suites, and each
//! suite's independent boots, run side by side; at most `CLOUDIMG_BOOT_VMS` (default 2) VMs or
//! cloudimg runs use the CPU at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use common::{cloudimg, text};

const PASSWORD: &str = "boot-test: Correct horse 'battery'";
const OPS_PASSWORD: &str = "ops: another 'secret' #2";
/// The files and keys that what cloudimg writes concerns, in cloud-init's log.
const OUR_MODULES: &[&str] = &["set_passwords", "set-passwords", "chpasswd", "ssh_pwauth", "users_groups", "ug_util"];
/// `cloudimg verify`'s documented exit status for a refused login.
const REFUSED: i32 = 10;

/// One suite's image, built once per recipe.
struct Image {
    suite: &'static str,
    dir: PathBuf,
}

impl Image {
    /// The suite's image from `scripts/boot-images`, which builds it unless its cache has it (CI
    /// starts it early, in the background) and makes two runs asking for one suite wait for one build.
    fn get(suite: &'static str) -> Image {
        let cache = std::env::var_os("CLOUDIMG_BOOT_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("boot-image"));
        let started = Instant::now();
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/boot-images"))
            .arg(&cache)
            .arg(suite)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "building the {suite} image failed");
        let listed = text(&out.stdout);
        let dir =
            listed.trim().strip_prefix(&format!("{suite} ")).unwrap_or_else(|| panic!("boot-images said: {listed}"));
        eprintln!("boot: the {suite} image was ready after {:.0} s", started.elapsed().as_secs_f64());
        Image { suite, dir: PathBuf::from(dir) }
    }

    fn qcow2(&self) -> PathBuf {
        self.dir.join("debian.qcow2")
    }

    fn cloud_init_version(&self) -> String {
        std::fs::read_to_string(self.dir.join("cloud-init-version")).unwrap().trim().to_string()
    }
}

/// At most this many VMs or cloudimg runs at once: each is one busy CPU under TCG.
static SLOTS: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

struct Slot;

impl Slot {
    fn take() -> Slot {
        let limit = std::env::var("CLOUDIMG_BOOT_VMS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
        let mut used = SLOTS.lock().unwrap();
        while *used >= limit {
            used = FREED.wait(used).unwrap();
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.lock().unwrap() -= 1;
        FREED.notify_one();
    }
}

/// cloudimg, holding a slot.
fn customize(args: &[&str]) -> Output {
    let _slot = Slot::take();
    let result = cloudimg(args, None, &[]);
    assert!(result.status.success(), "cloudimg {args:?}: {}", text(&result.stderr));
    result
}

/// One `cloudimg verify --json` run: its exit status and verdict.
struct Verified {
    name: String,
    code: Option<i32>,
    verdict: serde_json::Value,
    stderr: String,
}

impl Verified {
    fn field(&self, path: &[&str]) -> &serde_json::Value {
        path.iter().fold(&self.verdict, |v, key| &v[*key])
    }

    /// Everything that explains a failure: the verdict (console and log tails included) and stderr.
    fn explain(&self) -> String {
        format!(
            "{}: exit {:?}\n{}\n--- stderr\n{}",
            self.name,
            self.code,
            serde_json::to_string_pretty(&self.verdict).unwrap_or_default(),
            self.stderr
        )
    }
}

/// Verifies `disk` (holding a slot) with `args` added.
fn verify(image: &Image, name: &str, disk: &Path, args: &[&str]) -> Verified {
    let _slot = Slot::take();
    let name = format!("{}/{name}", image.suite);
    // The old boot test's deadline: a loaded CI host boots slowly under TCG.
    let mut all = vec!["verify", disk.to_str().unwrap(), "--json", "--timeout", "1200"];
    all.extend(args);
    let out = cloudimg(&all, None, &[]);
    let verdict = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let v = Verified { name, code: out.status.code(), verdict, stderr: text(&out.stderr) };
    eprintln!(
        "boot: {}: verify exited {:?} ({}), cloud-init finished {} s after qemu started, {} s in all",
        v.name,
        v.code,
        v.field(&["login", "result"]),
        v.field(&["boot_seconds"]).as_f64().map_or("-".into(), |s| format!("{s:.0}")),
        v.field(&["total_seconds"]).as_f64().map_or("-".into(), |s| format!("{s:.0}")),
    );
    v
}

/// The login was accepted as `user` (with the key too, when `key`), a wrong password refused,
/// cloud-init is `done` (not degraded where it can say so: verify's exit 0), through `boot_path`, and no line cloud-init logged at WARNING or DEPRECATED level
/// concerns what cloudimg wrote (every such line is printed).
fn accepted(v: &Verified, user: &str, key: bool, boot_path: &str) -> Result<String, String> {
    let logged: Vec<&str> =
        v.field(&["cloud_init_logged"]).as_array().into_iter().flatten().filter_map(|l| l.as_str()).collect();
    let mut report = format!(
        "{}: {user} logged in; cloud-init {}; {} WARNING/DEPRECATED lines logged\n",
        v.name,
        v.field(&["cloud_init", "extended_status"]),
        logged.len()
    );
    logged.iter().for_each(|l| report.push_str(&format!("  {l}\n")));
    let checks = [
        (v.code == Some(0), "verify did not exit 0"),
        (v.field(&["login", "result"]) == "accepted", "the login was not accepted"),
        (v.field(&["logged_in_as"]) == user, "`id -un` did not answer the user"),
        (v.field(&["wrong_password_refused"]) == true, "a wrong password was not refused"),
        (v.field(&["cloud_init", "status"]) == "done", "cloud-init is not done"),
        (v.field(&["boot_path"]) == boot_path, "the boot path is not the expected one"),
        (!key || v.field(&["key_accepted"]) == true, "the key was not accepted"),
    ];
    if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(format!("{why}\n{report}"));
    }
    if let Some(ours) = logged.iter().find(|l| OUR_MODULES.iter().any(|m| l.contains(m))) {
        return Err(format!("cloud-init logged about what cloudimg wrote: {ours}\n{report}"));
    }
    Ok(report)
}

/// The right password must not open the unmodified image: verify's documented "refused" verdict,
/// with sshd's side of it read back from the instance's journal (the images have no auth.log).
fn refused(v: &Verified) -> Result<String, String> {
    let sshd: Vec<&str> =
        v.field(&["sshd_log_tail"]).as_array().into_iter().flatten().filter_map(|l| l.as_str()).collect();
    match (v.code, v.field(&["login", "result"]).as_str()) {
        (Some(REFUSED), Some("refused")) if sshd.iter().any(|l| l.contains("sshd[") || l.contains("sshd-session[")) => {
            Ok(format!(
                "{}: the right password was refused, as it must be ({}); sshd's last line: {}\n",
                v.name,
                v.field(&["login", "detail"]),
                sshd.last().unwrap_or(&"")
            ))
        }
        (Some(REFUSED), Some("refused")) => {
            Err(format!("no sshd lines were read from the instance's journal: {sshd:?}"))
        }
        _ => Err("the unmodified image did not give the refused verdict".into()),
    }
}

/// Fails with every explanation unless each verdict held.
fn judge(verdicts: &[(&Verified, Result<String, String>)]) {
    let mut failures = Vec::new();
    for (v, result) in verdicts {
        match result {
            Ok(report) => eprint!("{report}"),
            Err(why) => failures.push(format!("{}: {why}\n{}", v.name, v.explain())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A libguestfs handle launched on the qcow2 `disk`, writable.
fn launched_on(disk: &Path) -> guestfs::Handle {
    let g = common::handle();
    g.add_drive(disk.to_str().unwrap(), cloudimg::guest::drive_options("qcow2", false)).unwrap();
    g.launch().unwrap();
    g
}

/// Makes `disk` boot through its own bootloader with SeaBIOS: extlinux in /boot (installed by
/// libguestfs's `extlinux`), its MBR code in the first sector, the partition marked active.
fn install_extlinux(disk: &Path) {
    let _slot = Slot::take();
    let g = launched_on(disk);
    g.mount("/dev/sda1", "/").unwrap();
    let names = g.ls("/boot").unwrap();
    let version = names.iter().find_map(|n| n.strip_prefix("vmlinuz-")).expect("a kernel in /boot").to_string();
    let conf = format!(
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /boot/vmlinuz-{version}\n  \
         INITRD /boot/initrd.img-{version}\n  APPEND root=LABEL=root ro console=ttyS0 net.ifnames=0\n"
    );
    g.write("/boot/extlinux.conf", conf.as_bytes()).unwrap();
    g.extlinux("/boot").expect("libguestfs's extlinux (Debian: extlinux, in scripts/install-deps)");
    let mbr = std::fs::read("/usr/lib/EXTLINUX/mbr.bin").expect("extlinux's MBR code");
    g.pwrite_device("/dev/sda", &mbr[..440.min(mbr.len())], 0).unwrap();
    g.part_set_bootable("/dev/sda", 1, true).unwrap();
    g.umount_all().unwrap();
    g.shutdown().unwrap();
}

/// Makes `disk` a disk that boots only with UEFI, as OVMF finds it: the MBR becomes a GPT (the
/// root partition kept where it is), an EFI system partition is added in 64 MiB grown at the end,
/// and it gets GRUB as `\EFI\BOOT\BOOTX64.EFI` (a standalone image made by the host's
/// grub-mkstandalone, its configuration inside) that boots the image's kernel from the root.
fn install_grub_efi(disk: &Path, tmp: &Path) {
    let _slot = Slot::take();
    let grow = Command::new("qemu-img").args(["resize", "-f", "qcow2"]).arg(disk).arg("+64M").output().unwrap();
    assert!(grow.status.success(), "qemu-img resize: {}", text(&grow.stderr));
    let g = launched_on(disk);
    let root = g.part_list("/dev/sda").unwrap().into_iter().next().expect("the root partition");
    let sectors = g.blockdev_getsz("/dev/sda").unwrap();
    let (start, end) = (root.part_start as i64 / 512, (root.part_end as i64 + 1) / 512 - 1);
    g.part_init("/dev/sda", "gpt").unwrap();
    g.part_add("/dev/sda", "p", start, end).unwrap();
    // The GPT's backup takes the last 33 sectors.
    g.part_add("/dev/sda", "p", (end + 2048) / 2048 * 2048, sectors - 34).unwrap();
    g.part_set_gpt_type("/dev/sda", 2, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
    g.mkfs("vfat", "/dev/sda2", Default::default()).unwrap();
    g.mount("/dev/sda1", "/").unwrap();
    let names = g.ls("/boot").unwrap();
    let version = names.iter().find_map(|n| n.strip_prefix("vmlinuz-")).expect("a kernel in /boot").to_string();
    g.umount_all().unwrap();
    let cfg = tmp.join("grub.cfg");
    std::fs::write(
        &cfg,
        format!(
            "set timeout=0\nsearch --no-floppy --label root --set=root\n\
             linux /boot/vmlinuz-{version} root=LABEL=root ro console=ttyS0 net.ifnames=0\n\
             initrd /boot/initrd.img-{version}\nboot\n"
        ),
    )
    .unwrap();
    let efi = tmp.join("BOOTX64.EFI");
    let made = Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--modules=part_gpt part_msdos ext2 search linux", "-o"])
        .arg(&efi)
        .arg(format!("boot/grub/grub.cfg={}", cfg.display()))
        .output()
        .expect("grub-mkstandalone (Debian: grub-efi-amd64-bin, in scripts/install-deps)");
    assert!(made.status.success(), "grub-mkstandalone: {}", text(&made.stderr));
    g.mount("/dev/sda2", "/").unwrap();
    g.mkdir_p("/EFI/BOOT").unwrap();
    g.upload(efi.to_str().unwrap(), "/EFI/BOOT/BOOTX64.EFI").unwrap();
    g.umount_all().unwrap();
    g.shutdown().unwrap();
}

/// A copy of `image` with a cloud-init drop-in that turns SSH password logins off again, over
/// whatever cloud.cfg says.
fn with_overriding_drop_in(image: &Image, dest: &Path) {
    let _slot = Slot::take();
    let out = Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(image.qcow2()).arg(dest).output().unwrap();
    assert!(out.status.success(), "qemu-img convert: {}", text(&out.stderr));
    let g = launched_on(dest);
    g.mount("/dev/sda1", "/").unwrap();
    g.write("/etc/cloud/cloud.cfg.d/99-site-policy.cfg", b"ssh_pwauth: false\n").unwrap();
    g.umount_all().unwrap();
    g.shutdown().unwrap();
}

/// The password file of a suite's runs, in `tmp`.
fn password_file(tmp: &Path) -> PathBuf {
    let pw = tmp.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    pw
}

/// `image` customized with the password in `pw` (and `extra`) into `out`.
fn customized(image: &Image, pw: &Path, out: &Path, extra: &[&str]) {
    let original = image.qcow2();
    let mut args = vec!["customize", original.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend(["--password-file", pw.to_str().unwrap()]);
    args.extend(extra);
    eprint!("{}", text(&customize(&args).stdout));
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn trixie_cloud_init_25_accepts_the_password_despite_the_sshd_drop_in() {
    let image = Image::get("trixie");
    let started = Instant::now();
    eprintln!("boot: trixie: cloud-init {}", image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let pw = password_file(tmp.path());
    let pw_args = ["--password-file", pw.to_str().unwrap()];
    // Each image gets a bootloader: the default one GRUB for UEFI, to boot through OVMF; the drop-in
    // one extlinux, to boot through SeaBIOS.
    let (default, drop_in) = std::thread::scope(|s| {
        let default = s.spawn(|| {
            let out = tmp.path().join("default.qcow2");
            customized(&image, &pw, &out, &[]);
            install_grub_efi(&out, tmp.path());
            verify(&image, "default-uefi", &out, &pw_args)
        });
        let drop_in = s.spawn(|| {
            let out = tmp.path().join("drop-in.qcow2");
            customized(&image, &pw, &out, &["--drop-in"]);
            install_extlinux(&out);
            verify(&image, "drop-in-extlinux", &out, &pw_args)
        });
        (default.join().unwrap(), drop_in.join().unwrap())
    });
    judge(&[
        (&default, accepted(&default, "debian", false, "uefi")),
        (&drop_in, accepted(&drop_in, "debian", false, "bios")),
    ]);
    eprintln!("boot: trixie: all verdicts after {:.0} s", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn bookworm_cloud_init_22_accepts_the_password_and_a_booted_disk_is_reset_through_shadow() {
    let image = Image::get("bookworm");
    let started = Instant::now();
    eprintln!("boot: bookworm: cloud-init {}", image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let pw = password_file(tmp.path());
    let pw_args = ["--password-file", pw.to_str().unwrap()];
    std::thread::scope(|s| {
        // The longest chain starts first. The unmodified image's instance: cloud-init creates `debian`
        // with a locked password and will not run set_passwords again for this instance. Its disk is
        // kept; `--method auto` must choose /etc/shadow for it, and the same instance, booted again,
        // must accept the password.
        s.spawn(|| {
            let booted_disk = tmp.path().join("booted.qcow2");
            let keep = [&pw_args[..], &["--keep-disk", booted_disk.to_str().unwrap()]].concat();
            let unmodified = verify(&image, "unmodified", &image.qcow2(), &keep);
            judge(&[(&unmodified, refused(&unmodified))]);
            let reset = tmp.path().join("reset.qcow2");
            let args = [
                "customize",
                booted_disk.to_str().unwrap(),
                "-o",
                reset.to_str().unwrap(),
                "--password-file",
                pw.to_str().unwrap(),
                "--method",
                "auto",
            ];
            let said = text(&customize(&args).stdout);
            eprint!("{said}");
            assert!(said.contains("Method: /etc/shadow, because the disk was booted before"), "{said}");
            let again = verify(&image, "shadow-reset", &reset, &[&pw_args[..], &["--same-instance"]].concat());
            judge(&[(&again, accepted(&again, "debian", false, "direct-kernel"))]);
        });
        let boots = [("default", &[][..]), ("drop-in", &["--drop-in"][..])].map(|(name, extra)| {
            let (image, tmp, pw, pw_args) = (&image, tmp.path(), &pw, &pw_args);
            s.spawn(move || {
                let out = tmp.join(format!("{name}.qcow2"));
                customized(image, pw, &out, extra);
                verify(image, name, &out, pw_args)
            })
        });
        let verified: Vec<Verified> = boots.into_iter().map(|b| b.join().unwrap()).collect();
        judge(&verified.iter().map(|v| (v, accepted(v, "debian", false, "direct-kernel"))).collect::<Vec<_>>());
    });
    eprintln!("boot: bookworm: all verdicts after {:.0} s", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn sid_cloud_init_26_accepts_passwords_and_a_key_for_the_default_user_and_another() {
    let image = Image::get("sid");
    let started = Instant::now();
    eprintln!("boot: sid: cloud-init {}", image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let pw = password_file(tmp.path());
    // The --drop-in image also gives `ops` (an account with no password) a password and a key.
    let (ops_pw, key) = (tmp.path().join("ops-pw"), tmp.path().join("key"));
    std::fs::write(&ops_pw, format!("{OPS_PASSWORD}\n")).unwrap();
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "boot-test", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "ssh-keygen: {}", text(&keygen.stderr));
    let pub_key = key.with_extension("pub");
    std::thread::scope(|s| {
        // `customize --verify`, told to write a configuration that a drop-in overrides
        // (--allow-ineffective): the boot refuses the password, and nothing is left under the output
        // name.
        s.spawn(|| {
            let overridden = tmp.path().join("overridden.qcow2");
            with_overriding_drop_in(&image, &overridden);
            let out_path = tmp.path().join("out.qcow2");
            let args = [
                "customize",
                overridden.to_str().unwrap(),
                "-o",
                out_path.to_str().unwrap(),
                "--password-file",
                pw.to_str().unwrap(),
                "--allow-ineffective",
                "--verify",
            ];
            let result = {
                let _slot = Slot::take();
                cloudimg(&args, None, &[])
            };
            let stderr = text(&result.stderr);
            eprintln!("boot: sid/customize --verify, overridden: exit {:?}", result.status.code());
            assert_eq!(result.status.code(), Some(REFUSED), "{stderr}");
            assert!(stderr.contains("nothing was written under that name"), "{stderr}");
            assert!(!out_path.exists(), "out.qcow2 must not exist after a failed verification");
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(!left.iter().any(|n| n.to_string_lossy().contains("out.qcow2")), "{left:?}");
        });
        let default = s.spawn(|| {
            let out = tmp.path().join("default.qcow2");
            customized(&image, &pw, &out, &[]);
            verify(&image, "default", &out, &["--password-file", pw.to_str().unwrap()])
        });
        // `ops` with its password, then with its key, in one boot.
        let ops = s.spawn(|| {
            let out = tmp.path().join("drop-in.qcow2");
            customized(&image, &pw, &out, &["--drop-in"]);
            let args = [
                "customize",
                out.to_str().unwrap(),
                "--in-place",
                "--drop-in",
                "--user",
                "ops",
                "--password-file",
                ops_pw.to_str().unwrap(),
                "--ssh-key",
                pub_key.to_str().unwrap(),
            ];
            eprint!("{}", text(&customize(&args).stdout));
            let ops_args =
                ["--user", "ops", "--password-file", ops_pw.to_str().unwrap(), "--ssh-key-file", key.to_str().unwrap()];
            verify(&image, "drop-in-and-ops", &out, &ops_args)
        });
        let (default, ops) = (default.join().unwrap(), ops.join().unwrap());
        judge(&[
            (&default, accepted(&default, "debian", false, "direct-kernel")),
            (&ops, accepted(&ops, "ops", true, "direct-kernel")),
        ]);
    });
    eprintln!("boot: sid: all verdicts after {:.0} s", started.elapsed().as_secs_f64());
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let parent = |child: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
    };
    let entries = std::fs::read_dir("/proc").unwrap().flatten();
    entries.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).filter(|c| parent(*c) == Some(pid)).collect()
}

/// The process's state letter (`T` stopped, `Z` zombie), `None` when it is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
#[ignore = "builds a Debian image and boots a VM; run with --ignored"]
fn ctrl_c_during_a_boot_kills_qemu_leaves_nothing_and_exits_130() {
    let image = Image::get("bookworm");
    let _slot = Slot::take();
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    // The run stops itself (SIGSTOP) right after starting qemu, which goes on booting.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudimg"))
        .args(["verify", image.qcow2().to_str().unwrap(), "--password-file", pw.to_str().unwrap()])
        .env("TMPDIR", &tmpdir)
        .env("LIBGUESTFS_CACHEDIR", "/var/tmp")
        .env("CLOUDIMG_STOP_AT", "booting")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(600);
    while state(child.id()) != Some('T') {
        assert!(child.try_wait().unwrap().is_none(), "verify ended before booting: {:?}", child.wait_with_output());
        assert!(Instant::now() < deadline, "verify never reached the boot");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let qemu: Vec<u32> = children_of(child.id())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().starts_with("qemu-system")
        })
        .collect();
    assert_eq!(qemu.len(), 1, "one qemu is booting the instance");
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(matches!(state(qemu[0]), Some(s) if s != 'Z'), "qemu is running when the signal comes");
    // SAFETY: kill(2) on the process this test started: Ctrl-C, then let it go on.
    unsafe {
        assert_eq!(libc::kill(child.id() as i32, libc::SIGINT), 0);
        assert_eq!(libc::kill(child.id() as i32, libc::SIGCONT), 0);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let gone = Instant::now() + std::time::Duration::from_secs(15);
    while matches!(state(qemu[0]), Some(s) if s != 'Z') {
        assert!(Instant::now() < gone, "qemu survived the Ctrl-C");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let left: Vec<_> = std::fs::read_dir(&tmpdir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    eprintln!("boot: Ctrl-C during a boot: exit 130, qemu gone, nothing left ({})", text(&out.stderr).trim());
}
