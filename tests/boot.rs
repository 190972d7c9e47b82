//! Proof by booting: real Debian cloud images (debootstrap from Debian's mirror, cached by recipe) of
//! three cloud-init generations, customized by cloudimg, booted under qemu with a NoCloud seed that
//! sets no password. SSH with password authentication only must get in with the right password, and
//! only then; `cloud-init status --long` must end `done` (from 23.4 on: exit 0, not `degraded`).
//!
//! - bookworm: Debian 12, cloud-init 22.4, OpenSSH 9.2; also a booted disk reset through /etc/shadow;
//! - trixie: Debian 13, cloud-init 25.1, OpenSSH 10, Ubuntu's `PasswordAuthentication no` drop-in;
//! - sid: Debian unstable, cloud-init 26.x (meson build), the same drop-in, and a second account
//!   given a password and a key.
//!
//! Slow (minutes), so ignored by plain `cargo test`; run with
//! `cargo test --locked --test boot -- --ignored --nocapture`. The suites run side by side; at most
//! `CLOUDIMG_BOOT_VMS` (default 2) VMs or cloudimg runs use the CPU at once.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{cloudimg, text};

const PASSWORD: &str = "boot-test: Correct horse 'battery'";
const OPS_PASSWORD: &str = "ops: another 'secret' #2";
const BOOT_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// The files and keys that what cloudimg writes concerns, in cloud-init's log.
const OUR_MODULES: &[&str] = &["set_passwords", "set-passwords", "chpasswd", "ssh_pwauth", "users_groups", "ug_util"];

/// One suite's image, kernel and initrd, built once per recipe.
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
        let image = Image { suite, dir: PathBuf::from(dir) };
        image.make_pvh_kernel();
        image
    }

    fn qcow2(&self) -> PathBuf {
        self.dir.join("debian.qcow2")
    }

    fn cloud_init_version(&self) -> String {
        std::fs::read_to_string(self.dir.join("cloud-init-version")).unwrap().trim().to_string()
    }

    /// Under TCG the kernel spends seconds decompressing itself; qemu starts the decompressed ELF
    /// directly through its PVH entry, as cloudimg does for its appliance.
    fn make_pvh_kernel(&self) {
        let vmlinux = self.dir.join("vmlinux");
        if vmlinux.exists() {
            return;
        }
        let bzimage = std::fs::read(self.dir.join("vmlinuz")).unwrap();
        let Ok((compression, payload)) = cloudimg::fast_boot::kernel_payload(&bzimage) else { return };
        let partial = self.dir.join("vmlinux.partial");
        let mut out = std::fs::File::create(&partial).unwrap();
        if cloudimg::fast_boot::decompress(compression, payload, &mut out).is_ok()
            && cloudimg::fast_boot::has_pvh_entry(std::fs::File::open(&partial).unwrap()).unwrap_or(false)
        {
            std::fs::rename(&partial, &vmlinux).unwrap();
        }
    }

    fn kernel(&self) -> PathBuf {
        let vmlinux = self.dir.join("vmlinux");
        if vmlinux.exists() {
            vmlinux
        } else {
            self.dir.join("vmlinuz")
        }
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

/// A running VM; qemu is killed when this is dropped, on every path out of the test.
struct Vm {
    name: String,
    /// The instance-id its NoCloud seed gives it.
    instance: String,
    child: Child,
    port: u16,
    serial: PathBuf,
    overlay: PathBuf,
    started: Instant,
    _dir: tempfile::TempDir,
    _slot: Slot,
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

/// How the SSH client proves who it is.
enum Auth<'a> {
    Password(&'a str),
    Key(&'a Path),
}

impl Vm {
    /// Boots a copy-on-write overlay of `disk` with the image's own kernel and a fresh NoCloud seed.
    fn boot(name: &str, disk: &Path, image: &Image) -> Vm {
        let instance = format!("iid-cloudimg-{}-{name}-{}", image.suite, std::process::id());
        Vm::boot_as(name, disk, image, &instance)
    }

    /// Like [`Vm::boot`], as instance `instance` (the same id as an earlier boot: the same instance).
    fn boot_as(name: &str, disk: &Path, image: &Image, instance: &str) -> Vm {
        let slot = Slot::take();
        let name = format!("{}/{name}", image.suite);
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(disk)
            .arg(&overlay));
        let hostname = name.replace('/', "-");
        std::fs::write(dir.path().join("meta-data"), format!("instance-id: {instance}\nlocal-hostname: {hostname}\n"))
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
        // 5-level paging emulated by TCG stops newer kernels early (libguestfs turns it off too).
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", &format!("pc,accel={accel}"), "-cpu", "max,la57=off", "-m", "1024", "-smp", "1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none"])
            .arg("-kernel")
            .arg(image.kernel())
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
        Vm {
            name,
            instance: instance.to_string(),
            child,
            port,
            serial,
            overlay,
            started: Instant::now(),
            _dir: dir,
            _slot: slot,
        }
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
    fn wait_for_cloud_init(&mut self) -> Result<(), String> {
        let deadline = self.started + BOOT_DEADLINE;
        while Instant::now() < deadline {
            let console = self.console();
            if console.contains("Cloud-init v.") && console.contains(" finished at ") {
                eprintln!(
                    "boot: {}: cloud-init finished {:.0} s after qemu started",
                    self.name,
                    self.started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu exited early: {status}"));
            }
            std::thread::sleep(Duration::from_secs(3));
        }
        Err("cloud-init did not finish before the deadline".into())
    }

    /// SSH with one way of authenticating only (no agent, no other key); a password goes through the
    /// environment, never the command line.
    fn ssh(&self, user: &str, auth: &Auth, command: &str) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.args(["90"]);
        match auth {
            Auth::Password(password) => {
                cmd.args(["sshpass", "-e", "ssh"]).env("SSHPASS", password).args([
                    "-o",
                    "PreferredAuthentications=password,keyboard-interactive",
                    "-o",
                    "PubkeyAuthentication=no",
                    "-o",
                    "NumberOfPasswordPrompts=1",
                ]);
            }
            Auth::Key(key) => {
                cmd.arg("ssh")
                    .args(["-o", "PreferredAuthentications=publickey", "-o", "PasswordAuthentication=no", "-i"])
                    .arg(key);
            }
        }
        cmd.args(["-p", &self.port.to_string()])
            .args(["-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=no"])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20"])
            .args(["-o", "LogLevel=ERROR", &format!("{user}@127.0.0.1"), command])
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

/// What the VM must show: for each (user, way in), the login works; with a wrong password it does
/// not; cloud-init is `done` with nothing logged about cloudimg's keys.
struct Expect<'a> {
    logins: Vec<(&'a str, Auth<'a>)>,
    /// Whether cloud-init's `status` distinguishes `degraded` (23.4+): then it must exit 0.
    strict_status: bool,
}

/// The VM's verdict: `Ok(report)` when it behaved as expected.
fn logins_work(vm: &mut Vm, expect: &Expect) -> Result<String, String> {
    vm.wait_for_cloud_init()?;
    let mut report = String::new();
    let check = "id -un; cloud-init status --long --wait; echo \"status-exit=$?\"; \
                 sudo -n grep -E 'WARNING|DEPRECATED' /var/log/cloud-init.log; true";
    for (i, (user, auth)) in expect.logins.iter().enumerate() {
        let command = if i == 0 { check } else { "id -un" };
        // sshd may be restarted by cloud-init right after it finishes: retry a few times.
        let mut out = vm.ssh(user, auth, command);
        for _ in 0..4 {
            if out.status.success() {
                break;
            }
            std::thread::sleep(Duration::from_secs(10));
            out = vm.ssh(user, auth, command);
        }
        let stdout = text(&out.stdout);
        let how = match auth {
            Auth::Password(_) => "password",
            Auth::Key(_) => "key",
        };
        if !out.status.success() {
            // sshpass exits with 5 when the password was refused.
            return Err(format!(
                "{user} ({how}): login failed (exit {:?}): {}{stdout}",
                out.status.code(),
                text(&out.stderr)
            ));
        }
        if stdout.lines().next() != Some(*user) {
            return Err(format!("{user} ({how}): unexpected answer from the VM:\n{stdout}"));
        }
        report.push_str(&format!("{}: {user} logged in with the {how}\n", vm.name));
        if i == 0 {
            report.push_str(&judge_cloud_init(&stdout, expect.strict_status)?);
        }
    }
    for (user, _) in expect.logins.iter().filter(|(_, auth)| matches!(auth, Auth::Password(_))) {
        if vm.ssh(user, &Auth::Password("not the password"), "id -un").status.success() {
            return Err(format!("{user}: a wrong password was accepted"));
        }
        report.push_str(&format!("{}: {user}: a wrong password was refused\n", vm.name));
    }
    Ok(report)
}

/// `cloud-init status --long` must say `done` (exit 0 where it can say `degraded`), and no line
/// cloud-init logged at WARNING or DEPRECATED level may concern what cloudimg wrote; any such line is
/// printed.
fn judge_cloud_init(stdout: &str, strict: bool) -> Result<String, String> {
    let exit = stdout.lines().find_map(|l| l.strip_prefix("status-exit=")).unwrap_or("?");
    let logged: Vec<&str> = stdout.lines().filter(|l| l.contains("WARNING") || l.contains("DEPRECATED")).collect();
    let mut report = format!("cloud-init status --long (exit {exit}):\n{stdout}");
    if !logged.is_empty() {
        report.push_str(&format!("cloud-init logged {} WARNING/DEPRECATED lines (above)\n", logged.len()));
    }
    if !stdout.lines().any(|l| l.trim() == "status: done") {
        return Err(format!("cloud-init is not done:\n{report}"));
    }
    if strict && (exit != "0" || stdout.contains("degraded")) {
        return Err(format!("cloud-init status is not a clean `done`:\n{report}"));
    }
    if let Some(ours) = logged.iter().find(|l| OUR_MODULES.iter().any(|m| l.contains(m))) {
        return Err(format!("cloud-init logged about what cloudimg wrote: {ours}\n{report}"));
    }
    Ok(report)
}

/// The right password must not open the unmodified image.
fn refuses(vm: &mut Vm) -> Result<String, String> {
    vm.wait_for_cloud_init()?;
    match vm.ssh("debian", &Auth::Password(PASSWORD), "id -un").status.success() {
        true => Err("the unmodified image accepted the password".into()),
        false => Ok(format!("{}: the right password was refused, as it must be\n", vm.name)),
    }
}

/// One VM to boot and judge: its name, disk, instance-id (`None`: a new instance) and verdict.
type Boot<'a> = (&'a str, &'a Path, Option<&'a str>, &'a dyn Fn(&mut Vm) -> Result<String, String>);

/// Boots and judges each VM in turn (one slot at a time, so that suites run side by side without
/// one waiting on another's slot), then fails with every diagnosis.
fn judge(image: &Image, boots: &[Boot]) {
    let mut failures = Vec::new();
    for (name, disk, instance, verdict) in boots {
        let mut vm = match instance {
            Some(instance) => Vm::boot_as(name, disk, image, instance),
            None => Vm::boot(name, disk, image),
        };
        match verdict(&mut vm) {
            Ok(report) => eprint!("{report}"),
            Err(why) => {
                let diagnosis = vm.diagnose();
                failures.push(format!("{}: {why}\n{diagnosis}", vm.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Writes the password file and the default and `--drop-in` customizations of `image`.
fn customized(image: &Image, tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let pw = tmp.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let (default_out, drop_in_out) = (tmp.join("default.qcow2"), tmp.join("drop-in.qcow2"));
    let original = image.qcow2();
    for (out, extra) in [(&default_out, None), (&drop_in_out, Some("--drop-in"))] {
        let mut args = vec!["customize", original.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(["--password-file", pw.to_str().unwrap()]);
        args.extend(extra);
        eprint!("{}", text(&customize(&args).stdout));
    }
    (pw, default_out, drop_in_out)
}

/// The default and --drop-in customizations log in, the unmodified image refuses.
fn default_user_logins(image: &Image, strict: bool) {
    let started = Instant::now();
    eprintln!("boot: {}: cloud-init {}", image.suite, image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let (_, default_out, drop_in_out) = customized(image, tmp.path());
    let expect = |vm: &mut Vm| {
        logins_work(vm, &Expect { logins: vec![("debian", Auth::Password(PASSWORD))], strict_status: strict })
    };
    judge(
        image,
        &[
            ("default", &default_out, None, &expect),
            ("drop-in", &drop_in_out, None, &expect),
            ("unmodified", &image.qcow2(), None, &refuses),
        ],
    );
    eprintln!("boot: {}: all verdicts after {:.0} s", image.suite, started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn trixie_cloud_init_25_accepts_the_password_despite_the_sshd_drop_in() {
    default_user_logins(&Image::get("trixie"), true);
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn bookworm_cloud_init_22_accepts_the_password_and_a_booted_disk_is_reset_through_shadow() {
    let image = Image::get("bookworm");
    let started = Instant::now();
    eprintln!("boot: bookworm: cloud-init {}", image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let (pw, default_out, drop_in_out) = customized(&image, tmp.path());
    let expect = |vm: &mut Vm| {
        logins_work(vm, &Expect { logins: vec![("debian", Auth::Password(PASSWORD))], strict_status: false })
    };
    // The unmodified image's instance: cloud-init creates `debian` with a locked password and will not
    // run set_passwords again for this instance. Its disk is kept.
    let booted_disk = tmp.path().join("booted.qcow2");
    let instance = Mutex::new(String::new());
    let refuses_and_keeps_the_disk = |vm: &mut Vm| {
        let report = refuses(vm)?;
        vm.stop_and_save_disk(&booted_disk);
        *instance.lock().unwrap() = vm.instance.clone();
        Ok(report)
    };
    judge(
        &image,
        &[
            ("default", &default_out, None, &expect),
            ("drop-in", &drop_in_out, None, &expect),
            ("unmodified", &image.qcow2(), None, &refuses_and_keeps_the_disk),
        ],
    );

    // `--method auto` must choose /etc/shadow for that disk, and the same instance, booted again,
    // must accept the password.
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
    let instance = instance.into_inner().unwrap();
    judge(&image, &[("shadow-reset", &reset, Some(&instance), &expect)]);
    eprintln!("boot: bookworm: shadow reset verified after {:.0} s", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "builds a Debian image and boots VMs (minutes); run with --ignored"]
fn sid_cloud_init_26_accepts_passwords_and_a_key_for_the_default_user_and_another() {
    let image = Image::get("sid");
    let started = Instant::now();
    eprintln!("boot: sid: cloud-init {}", image.cloud_init_version());
    let tmp = tempfile::tempdir().unwrap();
    let (_, default_out, drop_in_out) = customized(&image, tmp.path());
    // The --drop-in image also gives `ops` (an account with no password) a password and a key.
    let (ops_pw, key) = (tmp.path().join("ops-pw"), tmp.path().join("key"));
    std::fs::write(&ops_pw, format!("{OPS_PASSWORD}\n")).unwrap();
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "boot-test", "-f"]).arg(&key));
    let pub_key = key.with_extension("pub");
    let args = [
        "customize",
        drop_in_out.to_str().unwrap(),
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
    let default_only = |vm: &mut Vm| {
        logins_work(vm, &Expect { logins: vec![("debian", Auth::Password(PASSWORD))], strict_status: true })
    };
    let two_users = |vm: &mut Vm| {
        let logins =
            vec![("debian", Auth::Password(PASSWORD)), ("ops", Auth::Password(OPS_PASSWORD)), ("ops", Auth::Key(&key))];
        logins_work(vm, &Expect { logins, strict_status: true })
    };
    judge(
        &image,
        &[
            ("default", &default_out, None, &default_only),
            ("drop-in-and-ops", &drop_in_out, None, &two_users),
            ("unmodified", &image.qcow2(), None, &refuses),
        ],
    );
    eprintln!("boot: sid: all verdicts after {:.0} s", started.elapsed().as_secs_f64());
}
