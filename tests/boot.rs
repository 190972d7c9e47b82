//! Proof by booting: a real Debian 12 cloud image (debootstrap, cached by recipe), customized by
//! cloudimg, booted under qemu with a NoCloud seed that sets no password; SSH with password
//! authentication only must get in with the right password, and only then.
//!
//! Slow (minutes), so ignored by plain `cargo test`; run it with
//! `cargo test --locked --test boot -- --ignored --nocapture`.

mod common;

use std::hash::{Hash, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cloudimg, text};

const RECIPE: &str = include_str!("../scripts/build-debian-image");
const PASSWORD: &str = "boot-test: Correct horse 'battery'";
const BOOT_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// The Debian image, kernel and initrd, built once per recipe.
struct Image {
    dir: PathBuf,
}

impl Image {
    fn get() -> Image {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        RECIPE.hash(&mut hasher);
        let root = std::env::var_os("CLOUDIMG_BOOT_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("boot-image"));
        let dir = root.join(format!("{:016x}", hasher.finish()));
        if !dir.join("debian-12.qcow2").exists() {
            let started = Instant::now();
            let status = Command::new("timeout")
                .args(["1200", concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-debian-image")])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "building the Debian image failed");
            eprintln!("boot: built the Debian image in {:.0} s", started.elapsed().as_secs_f64());
        }
        Image { dir }
    }

    fn qcow2(&self) -> PathBuf {
        self.dir.join("debian-12.qcow2")
    }
}

/// A running VM; qemu is killed when this is dropped, on every path out of the test.
struct Vm {
    name: &'static str,
    /// The instance-id its NoCloud seed gives it.
    instance: String,
    child: Child,
    port: u16,
    serial: PathBuf,
    overlay: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

impl Vm {
    /// Boots a copy-on-write overlay of `disk` with the image's own kernel and a fresh NoCloud seed.
    fn boot(name: &'static str, disk: &Path, image: &Image) -> Vm {
        Vm::boot_as(name, disk, image, &format!("iid-cloudimg-{}-{}", name, std::process::id()))
    }

    /// Like [`Vm::boot`], as instance `instance` (the same id as an earlier boot: the same instance).
    fn boot_as(name: &'static str, disk: &Path, image: &Image, instance: &str) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(disk)
            .arg(&overlay));
        std::fs::write(dir.path().join("meta-data"), format!("instance-id: {instance}\nlocal-hostname: {name}\n"))
            .unwrap();
        // User-data that sets no password: any password login must come from the image.
        std::fs::write(dir.path().join("user-data"), "#cloud-config\ntimezone: UTC\n").unwrap();
        let seed = dir.path().join("seed.img");
        run(Command::new("mkfs.vfat").args(["-n", "CIDATA", "-C"]).arg(&seed).arg("2048"));
        run(Command::new("mcopy")
            .arg("-i")
            .arg(&seed)
            .arg(dir.path().join("meta-data"))
            .arg(dir.path().join("user-data"))
            .arg("::"));
        let port = free_port();
        let serial = dir.path().join("serial.log");
        let accel = if common::force_tcg() { "tcg" } else { "kvm" };
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", &format!("pc,accel={accel}"), "-cpu", "max", "-m", "1024", "-smp", "1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none"])
            .arg("-kernel")
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initrd.img"))
            .args(["-append", "root=LABEL=root ro console=ttyS0 net.ifnames=0"])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,readonly=on", seed.display()))
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Vm { name, instance: instance.to_string(), child, port, serial, overlay, _dir: dir }
    }

    /// Stops the VM once its writes have reached the disk, and writes its disk as a standalone qcow2.
    fn stop_and_save_disk(&mut self, dest: &Path) {
        // ext4 commits its journal every 5 s; cloud-init finished before this is called.
        std::thread::sleep(Duration::from_secs(12));
        let _ = self.child.kill();
        let _ = self.child.wait();
        run(Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&self.overlay).arg(dest));
    }

    fn console(&self) -> String {
        std::fs::read(&self.serial).map(|b| text(&b)).unwrap_or_default()
    }

    /// Waits until cloud-init's final stage has reported on the console.
    fn wait_for_cloud_init(&mut self, deadline: Instant) -> Result<(), String> {
        while Instant::now() < deadline {
            let console = self.console();
            if console.contains("Cloud-init v.") && console.contains(" finished at ") {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu exited early: {status}"));
            }
            std::thread::sleep(Duration::from_secs(3));
        }
        Err("cloud-init did not finish before the deadline".into())
    }

    /// SSH with password authentication only (no keys, no agent); the password goes through the
    /// environment, never the command line.
    fn ssh(&self, user: &str, password: &str, command: &str) -> Output {
        Command::new("timeout")
            .args(["90", "sshpass", "-e", "ssh", "-p", &self.port.to_string()])
            .args(["-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no"])
            .args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-o", "NumberOfPasswordPrompts=1"])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20"])
            .args(["-o", "LogLevel=ERROR", &format!("{user}@127.0.0.1"), command])
            .env("SSHPASS", password)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Everything that explains a failure: the console's end and cloud-init's log from the disk.
    fn diagnose(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let console = self.console();
        let tail: Vec<&str> = console.lines().rev().take(60).collect();
        let mut cmd = Command::new("guestfish");
        cmd.args(["--ro", "--format=qcow2", "-a"]).arg(&self.overlay).args([
            "-m",
            "/dev/sda1",
            "tail-n",
            "80",
            "/var/log/cloud-init.log",
        ]);
        if common::force_tcg() {
            cmd.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        let log = cmd.output().map(|o| text(&o.stdout) + &text(&o.stderr)).unwrap_or_default();
        format!(
            "--- {}: serial console (last 60 lines)\n{}\n--- cloud-init.log (last 80 lines)\n{log}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

/// What one VM showed: `Ok(())` when it behaved as `expect_login` says.
fn verdict(vm: &mut Vm, expect_login: bool, deadline: Instant) -> Result<String, String> {
    vm.wait_for_cloud_init(deadline)?;
    let mut report = String::new();
    if !expect_login {
        let out = vm.ssh("debian", PASSWORD, "id -un");
        return match out.status.success() {
            true => Err("the unmodified image accepted the password".into()),
            false => Ok(format!("{}: the right password was refused, as it must be", vm.name)),
        };
    }
    // sshd may be restarted by cloud-init right after it finishes: retry a few times.
    let mut last = None;
    for _ in 0..5 {
        // The exit status is the login's: cloud-init's own verdict is judged from its output.
        let out = vm.ssh("debian", PASSWORD, "id -un && { cloud-init status --long --wait; true; }");
        if out.status.success() {
            last = Some(out);
            break;
        }
        last = Some(out);
        std::thread::sleep(Duration::from_secs(10));
    }
    let out = last.unwrap();
    let stdout = text(&out.stdout);
    if !out.status.success() {
        // sshpass exits with 5 when the password was refused.
        return Err(format!("password login failed (exit {:?}): {}{stdout}", out.status.code(), text(&out.stderr)));
    }
    if stdout.lines().next() != Some("debian") || !stdout.contains("status: done") {
        return Err(format!("unexpected answer from the VM:\n{stdout}"));
    }
    report.push_str(&format!("{}: logged in with the password; `id -un` and cloud-init said:\n{stdout}", vm.name));
    let wrong = vm.ssh("debian", "not the password", "id -un");
    if wrong.status.success() {
        return Err("a wrong password was accepted".into());
    }
    report.push_str(&format!("{}: a wrong password was refused\n", vm.name));
    Ok(report)
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn an_instance_booted_from_the_output_accepts_the_password() {
    let started = Instant::now();
    let image = Image::get();
    let tmp = tempfile::tempdir().unwrap();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let default_out = tmp.path().join("default.qcow2");
    let drop_in_out = tmp.path().join("drop-in.qcow2");
    let original = image.qcow2();
    for (out, extra) in [(&default_out, None), (&drop_in_out, Some("--drop-in"))] {
        let mut args = vec!["customize", original.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(["--password-file", pw.to_str().unwrap()]);
        args.extend(extra);
        let result = cloudimg(&args, None, &[]);
        assert!(result.status.success(), "cloudimg {args:?}: {}", text(&result.stderr));
        eprint!("{}", text(&result.stdout));
    }
    eprintln!("boot: image and customizations ready after {:.0} s", started.elapsed().as_secs_f64());

    let deadline = Instant::now() + BOOT_DEADLINE;
    let mut vms = vec![
        (Vm::boot("default", &default_out, &image), true),
        (Vm::boot("drop-in", &drop_in_out, &image), true),
        (Vm::boot("unmodified", &image.qcow2(), &image), false),
    ];
    let mut failures = Vec::new();
    for (vm, expect_login) in &mut vms {
        match verdict(vm, *expect_login, deadline) {
            Ok(report) => eprintln!("{report}"),
            Err(why) => {
                let diagnosis = vm.diagnose();
                failures.push(format!("{}: {why}\n{diagnosis}", vm.name));
            }
        }
    }
    eprintln!("boot: all verdicts after {:.0} s", started.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The disk of the instance that booted the unmodified image: cloud-init has created `debian`
    // with a locked password and will not run set_passwords again for this instance. `--method
    // auto` must choose /etc/shadow, and the same instance, booted again, must accept the password.
    let (booted, _) = vms.pop().expect("the unmodified VM");
    drop(vms);
    let mut booted = booted;
    let booted_disk = tmp.path().join("booted.qcow2");
    booted.stop_and_save_disk(&booted_disk);
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
    let result = cloudimg(&args, None, &[]);
    assert!(result.status.success(), "cloudimg {args:?}: {}", text(&result.stderr));
    let said = text(&result.stdout);
    eprint!("{said}");
    assert!(said.contains("Method: /etc/shadow, because the disk was booted before"), "{said}");
    let mut again = Vm::boot_as("shadow-reset", &reset, &image, &booted.instance);
    match verdict(&mut again, true, Instant::now() + BOOT_DEADLINE) {
        Ok(report) => eprintln!("{report}"),
        Err(why) => panic!("shadow-reset: {why}\n{}", again.diagnose()),
    }
    eprintln!("boot: shadow reset verified after {:.0} s", started.elapsed().as_secs_f64());
}
