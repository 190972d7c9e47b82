//! Booting the instance: which boot path the disk allows (pure), qemu's command line for it (pure),
//! and the running qemu, killed when dropped (and by the signal handler, as a child of ours).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::verdict::BootPath;
use crate::appliance::accel::Accel;
use crate::guest::partition_table::Table;

/// The boot path a disk allows: UEFI when it can only boot that way (as the manifest's
/// `hw_firmware_type` says), BIOS when its MBR starts a bootloader, else none of its own.
pub fn choose(table: Option<&Table>) -> BootPath {
    match table {
        Some(t) if crate::openstack::manifest::uefi_only(Some(t.kind), &t.gpt_types) => BootPath::Uefi,
        Some(t) if t.bios_boot => BootPath::Bios,
        _ => BootPath::DirectKernel,
    }
}

/// OVMF's code and variable-store templates, where Debian's `ovmf` package (and older releases of
/// it, and Fedora's edk2-ovmf) put them.
const OVMF: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
];

/// The first OVMF installed here: (code, variables template).
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    OVMF.iter().map(|(c, v)| (PathBuf::from(c), PathBuf::from(v))).find(|(c, v)| c.is_file() && v.is_file())
}

/// The kernel, initrd and command line for an image without a bootloader.
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The root as the image's fstab names it (`LABEL=root`, `UUID=...`, a device).
    pub root: String,
}

/// Everything qemu is started with.
pub struct Plan<'a> {
    pub accel: Accel,
    pub overlay: &'a Path,
    pub seed: &'a Path,
    pub port: u16,
    pub serial: &'a Path,
    /// qemu's QMP socket, through which the instance is shut down (ACPI power button).
    pub qmp: &'a Path,
    pub direct: Option<&'a DirectKernel>,
    /// UEFI: OVMF's code and this instance's own copy of its variable store.
    pub uefi: Option<(&'a Path, &'a Path)>,
}

/// qemu's arguments for `plan`. Nothing secret is in them.
pub fn qemu_args(plan: &Plan) -> Vec<OsString> {
    let machine = if plan.uefi.is_some() { "q35" } else { "pc" };
    let (accel, cpu, cpus) = match plan.accel {
        Accel::Kvm => ("kvm", "host", "2"),
        // 5-level paging emulated by TCG stops newer kernels early (libguestfs turns it off too).
        // Without svm and vmx the guest does not load its KVM modules, seconds of emulated work
        // for a feature a login check never uses.
        Accel::Tcg => ("tcg", "max,la57=off,svm=off,vmx=off", "1"),
    };
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-machine", &format!("{machine},accel={accel}"), "-cpu", cpu, "-m", "1024", "-smp", cpus]);
    push(&["-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none", "-vga", "none"]);
    if let Some((code, vars)) = plan.uefi {
        push(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", drive_path(code))]);
        push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", drive_path(vars))]);
    }
    if let Some(direct) = plan.direct {
        push(&["-kernel", &direct.kernel.to_string_lossy()]);
        if let Some(initrd) = &direct.initrd {
            push(&["-initrd", &initrd.to_string_lossy()]);
        }
        // Images made for direct kernel boot (Debian's debootstrap ones) name their NIC eth0.
        push(&["-append", &format!("root={} ro console=ttyS0 net.ifnames=0", direct.root)]);
    }
    push(&["-drive", &format!("file={},if=virtio,format=qcow2,discard=unmap", drive_path(plan.overlay))]);
    push(&["-drive", &format!("file={},if=virtio,format=raw,readonly=on", drive_path(plan.seed))]);
    push(&["-netdev", &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:22", plan.port)]);
    push(&["-device", "virtio-net-pci,netdev=n0", "-serial", &format!("file:{}", plan.serial.display())]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", plan.qmp.display())]);
    args
}

/// A path inside a `-drive` option, where a comma is doubled.
fn drive_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// A loopback port nobody listens on now (qemu binds it a moment later).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// A running instance; qemu is killed when this is dropped, on every path out.
pub struct Vm {
    child: Child,
    pub started: Instant,
    serial: PathBuf,
    stderr: PathBuf,
    qmp: PathBuf,
    pub addr: SocketAddr,
}

impl Vm {
    /// Starts qemu in a process group of its own (a Ctrl-C on the terminal reaches cloudimg, which
    /// kills it), dying with cloudimg even when cloudimg is killed outright.
    pub fn start(plan: &Plan, stderr: &Path) -> Result<Vm> {
        let err = File::create_new(stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(qemu_args(plan)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).process_group(0);
        crate::support::cleanup::die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)")?;
        Ok(Vm {
            child,
            started: Instant::now(),
            serial: plan.serial.to_path_buf(),
            stderr: stderr.to_path_buf(),
            qmp: plan.qmp.to_path_buf(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, plan.port)),
        })
    }

    /// Waits until cloud-init's final stage has reported on the serial console; the time it took.
    pub fn wait_for_cloud_init(&mut self, deadline: Instant) -> Result<Duration, String> {
        while Instant::now() < deadline {
            let console = self.console(CONSOLE_WINDOW);
            if console.contains("Cloud-init v. ") && console.contains(" finished at ") {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let said = std::fs::read(&self.stderr).map(|b| String::from_utf8_lossy(&b).into_owned());
                let said = said.unwrap_or_default();
                let last = said.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("nothing on stderr");
                return Err(format!("qemu exited ({status}) before cloud-init finished: {last}"));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Err(format!(
            "cloud-init did not report its end on the serial console within {:.0} s (--timeout)",
            self.started.elapsed().as_secs_f64()
        ))
    }

    /// The last `window` bytes of the serial console (a guest can write without end).
    pub fn console(&self, window: u64) -> String {
        let Ok(mut file) = File::open(&self.serial) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(window)));
        let mut bytes = Vec::new();
        let _ = file.take(window).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Presses the ACPI power button and waits up to `limit` for the guest to power off (its
    /// filesystems then are clean); kills it after that. Whether it powered off by itself.
    pub fn power_off(&mut self, limit: Duration) -> bool {
        let pressed = self.qmp_command("system_powerdown").is_ok();
        let end = Instant::now() + limit;
        while pressed && Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.stop();
        false
    }

    /// One QMP command, after the capabilities handshake; every read and write bounded.
    fn qmp_command(&self, command: &str) -> std::io::Result<()> {
        use std::io::{BufRead, BufReader, Write};
        let stream = std::os::unix::net::UnixStream::connect(&self.qmp)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?.take(1 << 16));
        let mut line = String::new();
        reader.read_line(&mut line)?; // the greeting
        for execute in ["qmp_capabilities", command] {
            writeln!(&stream, "{{\"execute\": \"{execute}\"}}")?;
            line.clear();
            reader.read_line(&mut line)?;
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How much of the console's end is searched and shown.
pub const CONSOLE_WINDOW: u64 = 256 << 10;

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kind: &'static str, types: &[&str], bios_boot: bool) -> Table {
        Table { kind, gpt_types: types.iter().map(|t| t.to_string()).collect(), bios_boot }
    }

    const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";

    #[test]
    fn the_disk_decides_the_boot_path() {
        let cases = [
            (Some(table("gpt", &[ESP], false)), BootPath::Uefi),
            (Some(table("gpt", &[ESP], true)), BootPath::Uefi),
            (Some(table("gpt", &[BIOS_BOOT, ESP], true)), BootPath::Bios),
            (Some(table("msdos", &[], true)), BootPath::Bios),
            (Some(table("msdos", &[], false)), BootPath::DirectKernel),
            (Some(table("gpt", &[BIOS_BOOT], false)), BootPath::DirectKernel),
            (None, BootPath::DirectKernel),
        ];
        for (t, expected) in cases {
            assert_eq!(choose(t.as_ref()), expected, "{t:?}");
        }
    }

    #[test]
    fn qemu_gets_the_boot_path_and_nothing_else() {
        let direct =
            DirectKernel { kernel: "/w/vmlinux".into(), initrd: Some("/w/initrd".into()), root: "LABEL=root".into() };
        let plan = Plan {
            accel: Accel::Tcg,
            overlay: Path::new("/w/a,b.qcow2"),
            seed: Path::new("/w/seed.img"),
            port: 2222,
            serial: Path::new("/w/serial.log"),
            qmp: Path::new("/w/qmp.sock"),
            direct: Some(&direct),
            uefi: None,
        };
        let args: Vec<String> = qemu_args(&plan).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = args.join(" ");
        assert!(line.contains("-machine pc,accel=tcg -cpu max,la57=off,svm=off,vmx=off"), "{line}");
        assert!(
            line.contains("-kernel /w/vmlinux -initrd /w/initrd -append root=LABEL=root ro console=ttyS0"),
            "{line}"
        );
        assert!(line.contains("file=/w/a,,b.qcow2,if=virtio,format=qcow2"), "{line}");
        assert!(line.contains("hostfwd=tcp:127.0.0.1:2222-:22"), "{line}");
        assert!(!line.contains("pflash"), "{line}");

        let uefi =
            Plan { accel: Accel::Kvm, direct: None, uefi: Some((Path::new("/c.fd"), Path::new("/w/vars.fd"))), ..plan };
        let line = qemu_args(&uefi).iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(line.contains("-machine q35,accel=kvm -cpu host"), "{line}");
        assert!(line.contains("if=pflash,format=raw,unit=0,readonly=on,file=/c.fd"), "{line}");
        assert!(!line.contains("-kernel"), "{line}");
    }
}
