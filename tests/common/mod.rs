//! Test support: phony guest images built with libguestfs (once, cached by recipe), a separate
//! read-only handle to read results back, and PyYAML / system crypt as independent judges.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use guestfs::{Handle, MkfsOptArgs};

pub const DEBIAN_CFG: &str = include_str!("../../fixtures/cloud-cfg/debian-12-22.4.2.cloud.cfg");
pub const UBUNTU_CFG: &str = include_str!("../../fixtures/cloud-cfg/ubuntu-26.cloud.cfg");
pub const ROCKY_CFG: &str = include_str!("../../fixtures/cloud-cfg/rocky-26.cloud.cfg");
const RECIPE: &str = include_str!("mod.rs");

/// sshd_config as Debian 12 and Ubuntu ship it (the parts that matter): drop-ins first.
pub const SSHD_WITH_INCLUDE: &str =
    "Include /etc/ssh/sshd_config.d/*.conf\n\n#PasswordAuthentication yes\nKbdInteractiveAuthentication no\nUsePAM yes\n";
/// Ubuntu cloud images' drop-in (facts in shared/fixtures/README.md).
pub const UBUNTU_60_CLOUDIMG: &str = "PasswordAuthentication no\n";
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nops:x:1001:1001::/home/ops:/bin/bash\n";

/// Shadow entries for PASSWD: `ops` has a password but is locked.
pub const SHADOW: &str =
    "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nops:!$6$oldsalt$oldhash:19000:0:99999:7::19001:\n";

/// The phony guests, by name. Each is a qcow2 file in the cache directory.
pub struct Fixtures {
    pub dir: PathBuf,
}

impl Fixtures {
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.qcow2"))
    }
}

/// Layouts: (name, size in MiB, builder).
type Build = fn(&Handle, &str);
const LAYOUTS: &[(&str, i64, Build)] = &[
    ("debian-ext4", 256, build_debian_ext4),
    ("ubuntu-gpt-efi-boot", 512, build_ubuntu_gpt),
    ("rocky-lvm-xfs", 1024, build_rocky_lvm_xfs),
    ("ubuntu-btrfs-subvol", 512, build_ubuntu_btrfs),
    ("no-os", 64, build_no_os),
    ("two-roots", 256, build_two_roots),
    ("hostile-guests", 420, build_hostile_guests),
    ("debian-no-cloud-init", 64, build_debian_no_cloud_init),
    ("debian-xfs", 320, build_debian_xfs),
    ("debian-deleted-data", 128, build_debian_deleted_data),
    ("debian-aarch64", 64, build_debian_aarch64),
    ("gen-0.7.5", 64, |g, dev| build_generation(g, dev, "0.7.5")),
    ("gen-17.1", 64, |g, dev| build_generation(g, dev, "17.1")),
    ("gen-22.4.2-ubuntu", 64, |g, dev| build_generation(g, dev, "22.4.2-ubuntu")),
    ("gen-25.1.4", 64, |g, dev| build_generation(g, dev, "25.1.4")),
    ("gen-26.2-meson", 64, |g, dev| build_generation(g, dev, "26.2-meson")),
    ("gen-dpkg-only", 64, |g, dev| build_generation(g, dev, "dpkg-only")),
    ("gen-rpm-only", 64, |g, dev| build_generation(g, dev, "rpm-only")),
    ("gen-disagreeing", 64, |g, dev| build_generation(g, dev, "disagreeing")),
    ("gen-unknown", 64, |g, dev| build_generation(g, dev, "unknown")),
    ("debian-fstab-borrows-lvm", 64, build_debian_fstab_borrows_lvm),
];

/// The cloud-init generations (`gen-*` fixtures) and what each must be read as:
/// (fixture, version, source, the cloud-config form a password takes).
pub const GENERATIONS: &[(&str, &str, &str, &str)] = &[
    ("gen-0.7.5", "0.7.5", "version-py", "top_level_password"),
    ("gen-17.1", "17.1.0", "version-py", "top_level_password"),
    ("gen-22.4.2-ubuntu", "22.4.2", "version-py", "chpasswd_users"),
    ("gen-25.1.4", "25.1.4", "version-py", "chpasswd_users"),
    ("gen-26.2-meson", "26.2.0", "meson-versions", "chpasswd_users"),
    ("gen-dpkg-only", "25.1.4", "dpkg", "chpasswd_users"),
    ("gen-rpm-only", "23.4.0", "rpm", "chpasswd_users"),
    ("gen-disagreeing", "24.1.0", "version-py", "chpasswd_users"),
];

/// Ubuntu 14.04's cloud.cfg in the shape its cloud-init 0.7.5 reads (module names with hyphens,
/// `set-passwords` among the config modules, a default user).
pub const UBUNTU_14_CFG: &str = "# The top level settings are used as module\n# and system configuration.\n\nusers:\n - default\n\ndisable_root: true\npreserve_hostname: false\n\ncloud_init_modules:\n - migrator\n - seed_random\n - bootcmd\n - write-files\n - growpart\n - resizefs\n - set_hostname\n - update_hostname\n - update_etc_hosts\n - ca-certs\n - rsyslog\n - users-groups\n - ssh\n\ncloud_config_modules:\n - emit_upstart\n - disk_setup\n - mounts\n - ssh-import-id\n - locale\n - set-passwords\n - grub-dpkg\n - apt-pipelining\n - apt-configure\n - package-update-upgrade-install\n - landscape\n - timezone\n - runcmd\n - byobu\n\ncloud_final_modules:\n - scripts-vendor\n - scripts-per-once\n - scripts-per-boot\n - scripts-per-instance\n - scripts-user\n - ssh-authkey-fingerprints\n - keys-to-console\n - phone-home\n - final-message\n - power-state-change\n\nsystem_info:\n   distro: ubuntu\n   default_user:\n     name: ubuntu\n     lock_passwd: True\n     gecos: Ubuntu\n     groups: [adm, audio, cdrom, dialout, dip, floppy, netdev, plugdev, sudo, video]\n     sudo: [\"ALL=(ALL) NOPASSWD:ALL\"]\n     shell: /bin/bash\n   paths:\n      cloud_dir: /var/lib/cloud/\n      templates_dir: /etc/cloud/templates/\n      upstart_dir: /etc/init/\n   ssh_svcname: ssh\n";

/// cloudinit/version.py as each release line installed it, and the generated module of 26.1+.
const VERSION_PY_0_7_5: &str = "# vi: ts=4 expandtab\n\nfrom distutils import version as vr\n\n\ndef version():\n    return vr.StrictVersion(\"0.7.5\")\n\n\ndef version_string():\n    return str(version())\n";
const VERSION_PY_MESON: &str = "try:\n    from cloudinit import meson_versions  # type: ignore\n\n    __VERSION__ = meson_versions.UPSTREAM_VERSION\n    _DOWNSTREAM_VERSION = meson_versions.DOWNSTREAM_VERSION\nexcept ImportError:\n    __VERSION__ = \"@MISSING_MESON_BUILD_ARTIFACT@\"\n    _DOWNSTREAM_VERSION = \"@DOWNSTREAM_VERSION@\"  # Optional for packagers\n\n\nFEATURES = [\n    \"NETWORK_CONFIG_V1\",\n    \"NETWORK_CONFIG_V2\",\n]\n\n\ndef version_string():\n    if \"DOWNSTREAM_VERSION\" not in _DOWNSTREAM_VERSION:\n        return _DOWNSTREAM_VERSION\n    return __VERSION__\n";
const MESON_VERSIONS_26_2: &str = "# This file is part of cloud-init. See LICENSE file for license information.\n# Automatically generated by Meson. Do not edit this file directly\n\nUPSTREAM_VERSION = \"26.2\"      # Required to release\nDOWNSTREAM_VERSION = \"26.2-1\"  # Optional for downstream packagers\n";

fn version_py(upstream: &str, packaged: &str) -> String {
    format!("__VERSION__ = \"{upstream}\"\n_PACKAGED_VERSION = \"{packaged}\"\n\nFEATURES = [\n    \"NETWORK_CONFIG_V1\",\n    \"NETWORK_CONFIG_V2\",\n]\n\n\ndef version_string():\n    if not _PACKAGED_VERSION.startswith(\"@@\"):\n        return _PACKAGED_VERSION\n    return __VERSION__\n")
}

fn dpkg_status(version: &str) -> String {
    format!("Package: cloud-guest-utils\nStatus: install ok installed\nVersion: 0.33-1\n\nPackage: cloud-init\nStatus: install ok installed\nPriority: optional\nSection: admin\nArchitecture: all\nVersion: {version}\nDepends: python3\nDescription: initialization and customization tool for cloud instances\n\n")
}

/// An rpm database (`rpmdb.sqlite`) holding one package, made by rpm itself (`rpmbuild` and
/// `rpm --justdb`, from Debian's `rpm` package).
fn rpm_database(name: &str, version: &str, release: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("package.spec");
    std::fs::write(
        &spec,
        format!("Name: {name}\nVersion: {version}\nRelease: {release}\nSummary: phony\nLicense: none\nBuildArch: noarch\n%description\nphony\n%files\n"),
    )
    .unwrap();
    let top = dir.path().join("top");
    let built = Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("-bb")
        .arg(&spec)
        .output()
        .expect("rpmbuild (Debian's rpm package, which scripts/install-deps installs)");
    assert!(built.status.success(), "rpmbuild: {}", text(&built.stderr));
    let package = top.join(format!("RPMS/noarch/{name}-{version}-{release}.noarch.rpm"));
    let root = dir.path().join("root");
    for args in [vec!["--initdb"], vec!["-i", "--justdb", "--nodeps", "--noscripts", package.to_str().unwrap()]] {
        let out = Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["--dbpath", "/var/lib/rpm"])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rpm {args:?}: {}", text(&out.stderr));
    }
    std::fs::read(root.join("var/lib/rpm/rpmdb.sqlite")).unwrap()
}

/// One guest per cloud-init generation, with the files that generation's packages leave.
fn build_generation(g: &Handle, dev: &str, which: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "ext4", &root, None);
    g.mount(&root, "/").unwrap();
    let py3 = "/usr/lib/python3/dist-packages";
    let (release, cfg) = match which {
        "0.7.5" => ("PRETTY_NAME=\"Ubuntu 14.04.6 LTS\"\nID=ubuntu\nVERSION_ID=\"14.04\"\n", UBUNTU_14_CFG),
        "22.4.2-ubuntu" => ("PRETTY_NAME=\"Ubuntu 22.04.5 LTS\"\nID=ubuntu\nVERSION_ID=\"22.04\"\n", UBUNTU_CFG),
        "25.1.4" => ("PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\nVERSION_ID=\"13\"\n", DEBIAN_CFG),
        "26.2-meson" => ("PRETTY_NAME=\"Debian GNU/Linux forky/sid\"\nID=debian\n", DEBIAN_CFG),
        "rpm-only" => (ROCKY_RELEASE, ROCKY_CFG),
        _ => (DEBIAN_RELEASE, DEBIAN_CFG),
    };
    os_root(g, release, Some(cfg), None, "LABEL=root / ext4 defaults 0 1\n");
    match which {
        "0.7.5" => {
            put(g, "/usr/lib/python2.7/dist-packages/cloudinit/version.py", VERSION_PY_0_7_5);
            g.mkdir_p("/usr/lib/python2.7/dist-packages/cloud_init-0.7.5.egg-info").unwrap();
            put(g, "/var/lib/dpkg/status", &dpkg_status("0.7.5-0ubuntu1.22"));
        }
        "17.1" => put(g, &format!("{py3}/cloudinit/version.py"), "__VERSION__ = \"17.1\"\n\nFEATURES = [\n    'NETWORK_CONFIG_V1',\n    'NETWORK_CONFIG_V2',\n]\n\n\ndef version_string():\n    return __VERSION__\n"),
        "22.4.2-ubuntu" => {
            put(g, &format!("{py3}/cloudinit/version.py"), &version_py("22.4.2", "22.4.2-0ubuntu0~22.04.1"));
            put(g, "/var/lib/dpkg/status", &dpkg_status("22.4.2-0ubuntu0~22.04.1"));
        }
        "25.1.4" => {
            put(g, &format!("{py3}/cloudinit/version.py"), &version_py("25.1.4", "@@PACKAGED_VERSION@@"));
            g.mkdir_p(&format!("{py3}/cloud_init-25.1.4.egg-info")).unwrap();
            put(g, "/var/lib/dpkg/status", &dpkg_status("25.1.4-1"));
        }
        "26.2-meson" => {
            put(g, &format!("{py3}/cloudinit/version.py"), VERSION_PY_MESON);
            put(g, &format!("{py3}/cloudinit/meson_versions.py"), MESON_VERSIONS_26_2);
            // A form cloud-init 26 reports as deprecated (so `status` ends degraded), not cloudimg's.
            put(g, "/etc/cloud/cloud.cfg.d/50-legacy.cfg", "users: default\n");
            put(g, "/var/lib/dpkg/status", &dpkg_status("26.2-1"));
        }
        "dpkg-only" => {
            // A layout cloudimg does not know (a future release): the package database still answers.
            put(g, &format!("{py3}/cloudinit/version.py"), "from cloudinit._build import VERSION as __VERSION__\n");
            put(g, "/var/lib/dpkg/status", &dpkg_status("25.1.4-1+deb13u1"));
        }
        "rpm-only" => {
            // A version.py cloudimg cannot read; rpm's own database (sqlite, as on RHEL 9) answers.
            put(g, "/usr/lib/python3.9/site-packages/cloudinit/version.py", "from cloudinit._build import VERSION as __VERSION__\n");
            g.mkdir_p("/var/lib/rpm").unwrap();
            g.write("/var/lib/rpm/rpmdb.sqlite", &rpm_database("cloud-init", "23.4", "7.el9_4.1")).unwrap();
        }
        "disagreeing" => {
            // cloud-init replaced by hand after the package: the file and the database disagree.
            put(g, &format!("{py3}/cloudinit/version.py"), &version_py("24.1", "@@PACKAGED_VERSION@@"));
            put(g, "/var/lib/dpkg/status", &dpkg_status("25.1.4-1"));
        }
        "unknown" => g.mkdir_p(&format!("{py3}/cloudinit")).unwrap(),
        other => panic!("no recipe for {other}"),
    }
}

/// Builds the fixtures once per recipe (this file and the cloud.cfg fixtures), shared by all test
/// binaries through a lock; two appliance launches side by side build them all.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (RECIPE, DEBIAN_CFG, UBUNTU_CFG, ROCKY_CFG).hash(&mut hasher);
        let root = std::env::var_os("CLOUDIMG_FIXTURE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixtures"));
        let dir = root.join(format!("{:016x}", hasher.finish()));
        std::fs::create_dir_all(&root).unwrap();
        let lock = std::fs::File::create(root.join(".lock")).unwrap();
        // SAFETY: flock on a file we own; released when `lock` is dropped.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        if !dir.join("done").exists() {
            let building = root.join("building");
            let _ = std::fs::remove_dir_all(&building);
            std::fs::create_dir_all(&building).unwrap();
            build_all(&building);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&building, &dir).unwrap();
            std::fs::write(dir.join("done"), b"").unwrap();
        }
        Fixtures { dir }
    })
}

/// The accelerator the tests' own handles use: the same choice the tool makes.
pub fn force_tcg() -> bool {
    let (accel, _) = cloudimg::appliance::accel::choose(
        cloudimg::appliance::accel::Requested::Auto,
        &cloudimg::appliance::accel::HostKvm::probe(),
    )
    .unwrap();
    accel == cloudimg::appliance::accel::Accel::Tcg
}

/// A libguestfs handle for the tests' own work (building, editing and reading back images), started
/// as cloudimg starts its own: under TCG, from cloudimg's fast-boot copy of the appliance once
/// libguestfs has built its appliance (seconds less per launch), else from libguestfs's own.
pub fn handle() -> Handle {
    use cloudimg::appliance::fast_boot;
    let g = Handle::create().expect("libguestfs handle");
    if force_tcg() {
        g.set_backend_setting("force_tcg", "1").unwrap();
        let cachedir = g.get_cachedir().unwrap();
        if let Ok(cache) = fast_boot::check_cache(Path::new(&cachedir)) {
            if let fast_boot::Choice::Copy { dir, .. } = fast_boot::choose(&cache) {
                g.set_path(Some(dir.to_str().unwrap())).unwrap();
            }
        }
    }
    g
}

/// Builds the fixtures in two appliances side by side (each is one busy vCPU under TCG): the hostile
/// guests in one, everything else in the other.
fn build_all(dir: &Path) {
    let (hostile, others): (Vec<_>, Vec<_>) = LAYOUTS.iter().partition(|(name, _, _)| *name == "hostile-guests");
    std::thread::scope(|s| {
        s.spawn(|| build_group(dir, &hostile));
        build_group(dir, &others);
    });
}

fn build_group(dir: &Path, layouts: &[&(&str, i64, Build)]) {
    let g = handle();
    for (name, mib, _) in layouts {
        let raw = dir.join(format!("{name}.raw"));
        std::fs::File::create(&raw).unwrap().set_len((*mib as u64) << 20).unwrap();
        g.add_drive(raw.to_str().unwrap(), cloudimg::guest::drive_options("raw", false)).unwrap();
    }
    g.launch().expect("launching the appliance to build fixtures");
    for (i, (name, _, build)) in layouts.iter().enumerate() {
        let device = format!("/dev/sd{}", (b'a' + i as u8) as char);
        build(&g, &device);
        g.umount_all().unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    g.shutdown().expect("flushing fixtures");
    for (name, _, _) in layouts {
        let raw = dir.join(format!("{name}.raw"));
        let status = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(dir.join(format!("{name}.qcow2")))
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::remove_file(raw).unwrap();
    }
}

fn mkfs(g: &Handle, fstype: &str, device: &str, label: Option<&str>) {
    g.mkfs(fstype, device, MkfsOptArgs { blocksize: None, features: None, inode: None, sectorsize: None, label })
        .unwrap_or_else(|e| panic!("mkfs {fstype} {device}: {e:?}"));
}

fn put(g: &Handle, path: &str, content: &str) {
    let dir = path.rsplit_once('/').unwrap().0;
    if !dir.is_empty() {
        g.mkdir_p(dir).unwrap();
    }
    g.write(path, content.as_bytes()).unwrap_or_else(|e| panic!("writing {path}: {e:?}"));
}

/// What every phony OS root has; `cloud_cfg` `None` means no cloud-init.
fn os_root(g: &Handle, os_release: &str, cloud_cfg: Option<&str>, version_py: Option<(&str, &str)>, fstab: &str) {
    put(g, "/etc/os-release", os_release);
    put(g, "/etc/fstab", fstab);
    put(g, "/etc/passwd", PASSWD);
    put(g, "/etc/shadow", SHADOW);
    g.chmod(0o640, "/etc/shadow").unwrap();
    g.chown(0, 42, "/etc/shadow").unwrap();
    put(g, "/etc/ssh/sshd_config", SSHD_WITH_INCLUDE);
    g.mkdir_p("/etc/ssh/sshd_config.d").unwrap();
    g.mkdir_p("/var/lib/cloud").unwrap();
    if let Some(cfg) = cloud_cfg {
        put(g, "/etc/cloud/cloud.cfg", cfg);
        put(
            g,
            "/etc/cloud/cloud.cfg.d/05_logging.cfg",
            "# Logging is not what this fixture is about.\n_log:\n - '[loggers]'\n",
        );
        put(
            g,
            "/etc/cloud/cloud.cfg.d/README",
            "# All files with the '.cfg' extension in this directory will be read by\n# cloud-init.\n",
        );
    }
    if let Some((path, version)) = version_py {
        put(g, path, &format!("__VERSION__ = \"{version}\"\n_PACKAGED_VERSION = \"@@PACKAGED_VERSION@@\"\n"));
    }
}

const DEBIAN_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n";
const UBUNTU_RELEASE: &str = "PRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\nID=ubuntu\nVERSION_ID=\"24.04\"\n";
const ROCKY_RELEASE: &str = "PRETTY_NAME=\"Rocky Linux 9.4 (Blue Onyx)\"\nID=\"rocky\"\nVERSION_ID=\"9.4\"\n";
pub const DEBIAN_VERSION_PY: &str = "/usr/lib/python3/dist-packages/cloudinit/version.py";

fn build_debian_ext4(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "ext4", &root, None);
    g.mount(&root, "/").unwrap();
    os_root(g, DEBIAN_RELEASE, Some(DEBIAN_CFG), Some((DEBIAN_VERSION_PY, "22.4.2")), "PARTUUID=1 / ext4 rw 0 1\n");
    g.chmod(0o640, "/etc/cloud/cloud.cfg").unwrap();
    g.chown(0, 4, "/etc/cloud/cloud.cfg").unwrap();
}

fn build_ubuntu_gpt(g: &Handle, dev: &str) {
    g.part_init(dev, "gpt").unwrap();
    g.part_add(dev, "p", 2048, 133_119).unwrap(); // 64 MiB EFI system partition
    g.part_add(dev, "p", 133_120, 395_263).unwrap(); // 128 MiB /boot
    g.part_add(dev, "p", 395_264, -2048).unwrap(); // root
    g.part_set_gpt_type(dev, 1, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B").unwrap();
    mkfs(g, "vfat", &format!("{dev}1"), Some("UEFI"));
    mkfs(g, "ext4", &format!("{dev}2"), Some("BOOT"));
    mkfs(g, "ext4", &format!("{dev}3"), Some("cloudimg-rootfs"));
    g.mount(&format!("{dev}2"), "/").unwrap();
    put(g, "/vmlinuz-6.8.0-49-generic", "not a kernel\n");
    g.umount_all().unwrap();
    g.mount(&format!("{dev}3"), "/").unwrap();
    os_root(
        g,
        UBUNTU_RELEASE,
        Some(UBUNTU_CFG),
        Some((DEBIAN_VERSION_PY, "24.4.1")),
        "LABEL=cloudimg-rootfs / ext4 discard,errors=remount-ro 0 1\nLABEL=BOOT /boot ext4 defaults 0 2\nLABEL=UEFI /boot/efi vfat umask=0077 0 1\n",
    );
    put(g, "/etc/ssh/sshd_config.d/60-cloudimg-settings.conf", UBUNTU_60_CLOUDIMG);
}

fn build_rocky_lvm_xfs(g: &Handle, dev: &str) {
    g.part_init(dev, "mbr").unwrap();
    g.part_add(dev, "p", 2048, 206_847).unwrap();
    g.part_add(dev, "p", 206_848, -2048).unwrap();
    mkfs(g, "ext4", &format!("{dev}1"), None);
    g.pvcreate(&format!("{dev}2")).unwrap();
    g.vgcreate("rl", &[&format!("{dev}2")]).unwrap();
    g.lvcreate("root", "rl", 700).unwrap();
    mkfs(g, "xfs", "/dev/rl/root", None);
    g.mount("/dev/rl/root", "/").unwrap();
    os_root(
        g,
        ROCKY_RELEASE,
        Some(ROCKY_CFG),
        Some(("/usr/lib/python3.9/site-packages/cloudinit/version.py", "23.4")),
        "/dev/mapper/rl-root / xfs defaults 0 0\n",
    );
    // Rocky's sshd_config says no after the Include; cloud-init 23.4 writes its drop-in, read first.
    put(g, "/etc/ssh/sshd_config", &format!("{SSHD_WITH_INCLUDE}PasswordAuthentication no\n"));
    g.lsetxattr("security.selinux", SELINUX_LABEL, SELINUX_LABEL.len() as i32, "/etc/cloud/cloud.cfg").unwrap();
    g.lsetxattr("security.selinux", SHADOW_LABEL, SHADOW_LABEL.len() as i32, "/etc/shadow").unwrap();
    booted_instance(g);
}

pub const SELINUX_LABEL: &str = "system_u:object_r:etc_t:s0";
pub const SHADOW_LABEL: &str = "system_u:object_r:shadow_t:s0";

/// Debian on a plain xfs root (xfs refuses a second filesystem with the same UUID unless told).
fn build_debian_xfs(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "xfs", &root, None);
    g.mount(&root, "/").unwrap();
    os_root(g, DEBIAN_RELEASE, Some(DEBIAN_CFG), Some((DEBIAN_VERSION_PY, "22.4.2")), "/dev/sda1 / xfs defaults 0 1\n");
}

/// A Debian with qemu-guest-agent whose filesystem still holds 48 MiB of a deleted file: only a trim
/// keeps those blocks out of an output.
fn build_debian_deleted_data(g: &Handle, dev: &str) {
    build_debian_ext4(g, dev);
    put(g, "/usr/bin/qemu-ga", "#!/bin/sh\n");
    g.mkdir_p("/bin").unwrap();
    put_elf(g, "/bin/sh", 62);
    g.mkdir_p("/var/tmp").unwrap();
    g.fill_pattern("deleted data", 48 << 20, "/var/tmp/deleted").unwrap();
    // On the disk before it is deleted (ext4's delayed allocation would never write it otherwise).
    g.sync().unwrap();
    g.rm("/var/tmp/deleted").unwrap();
}

/// A Debian whose fstab mounts /var from an LVM volume it does not have: `rl/root`, the root of the
/// rocky-lvm-xfs fixture, when both are customized in one run.
fn build_debian_fstab_borrows_lvm(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "ext4", &root, None);
    g.mount(&root, "/").unwrap();
    os_root(
        g,
        DEBIAN_RELEASE,
        Some(DEBIAN_CFG),
        Some((DEBIAN_VERSION_PY, "22.4.2")),
        "PARTUUID=1 / ext4 rw 0 1\n/dev/mapper/rl-root /var xfs defaults 0 0\n",
    );
}

/// The start of an ELF executable for `machine` (62: x86_64, 183: aarch64), 64-bit little endian.
fn put_elf(g: &Handle, path: &str, machine: u16) {
    let mut header = vec![0u8; 64];
    header[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    header[16] = 3; // ET_DYN, as a PIE
    header[18..20].copy_from_slice(&machine.to_le_bytes());
    header[20] = 1;
    header.extend_from_slice(b"not a real program");
    g.write(path, &header).unwrap_or_else(|e| panic!("writing {path}: {e:?}"));
}

/// A Debian for arm64, merged /usr: /bin/sh is /bin -> usr/bin, then sh -> dash, an aarch64 ELF.
fn build_debian_aarch64(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "ext4", &root, None);
    g.mount(&root, "/").unwrap();
    os_root(g, DEBIAN_RELEASE, Some(DEBIAN_CFG), Some((DEBIAN_VERSION_PY, "22.4.2")), "PARTUUID=1 / ext4 rw 0 1\n");
    g.mkdir_p("/usr/bin").unwrap();
    g.ln_s("usr/bin", "/bin").unwrap();
    put_elf(g, "/usr/bin/dash", 183);
    g.ln_s("dash", "/usr/bin/sh").unwrap();
}

/// A Debian without cloud-init whose sshd refuses passwords in its main file.
fn build_debian_no_cloud_init(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let root = format!("{dev}1");
    mkfs(g, "ext4", &root, None);
    g.mount(&root, "/").unwrap();
    os_root(g, DEBIAN_RELEASE, None, None, "PARTUUID=1 / ext4 rw 0 1\n");
    put(g, "/etc/ssh/sshd_config", &format!("PasswordAuthentication no\n{SSHD_WITH_INCLUDE}"));
}

/// cloud-init's state after a first boot, and a NoCloud seed that `cloud-init clean` keeps.
fn booted_instance(g: &Handle) {
    put(g, "/var/lib/cloud/instances/i-0123/sem/config_set_passwords", "");
    g.ln_s("/var/lib/cloud/instances/i-0123", "/var/lib/cloud/instance").unwrap();
    put(g, "/var/lib/cloud/data/instance-id", "i-0123\n");
    put(g, "/var/lib/cloud/seed/nocloud/meta-data", "instance-id: i-0123\n");
}

fn build_ubuntu_btrfs(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    let part = format!("{dev}1");
    mkfs(g, "btrfs", &part, None);
    g.mount(&part, "/").unwrap();
    g.btrfs_subvolume_create("/@", guestfs::BtrfsSubvolumeCreateOptArgs { qgroupid: None }).unwrap();
    g.umount_all().unwrap();
    g.mount_options("subvol=@", &part, "/").unwrap();
    os_root(
        g,
        UBUNTU_RELEASE,
        Some(UBUNTU_CFG),
        Some((DEBIAN_VERSION_PY, "24.4.1")),
        "/dev/sda1 / btrfs subvol=@ 0 0\n",
    );
    booted_instance(g);
}

fn build_no_os(g: &Handle, dev: &str) {
    g.part_disk(dev, "mbr").unwrap();
    mkfs(g, "ext4", &format!("{dev}1"), None);
    g.mount(&format!("{dev}1"), "/").unwrap();
    put(g, "/data/readme.txt", "just data\n");
}

fn build_two_roots(g: &Handle, dev: &str) {
    g.part_init(dev, "mbr").unwrap();
    g.part_add(dev, "p", 2048, 260_095).unwrap();
    g.part_add(dev, "p", 260_096, -2048).unwrap();
    mkfs(g, "ext4", &format!("{dev}1"), None);
    mkfs(g, "ext4", &format!("{dev}2"), None);
    g.mount(&format!("{dev}1"), "/").unwrap();
    // Invalid YAML: a tab where indentation is expected.
    os_root(g, DEBIAN_RELEASE, Some("users:\n\t- default\n"), Some((DEBIAN_VERSION_PY, "22.4.2")), "");
    g.umount_all().unwrap();
    g.mount(&format!("{dev}2"), "/").unwrap();
    os_root(g, DEBIAN_RELEASE, None, None, "");
}

/// One hostile guest per partition of the `hostile-guests` image: (name, what its root holds).
/// `tests/hostile.rs` customizes each with `--root /dev/sdaN`, N being its position from 1.
pub const HOSTILE_GUESTS: &[&str] = &[
    "cloud.cfg relative symlink to ../shadow",
    "cloud.cfg absolute symlink to /etc/shadow",
    "cloud.cfg symlink escaping the root",
    "cloud.cfg is a directory",
    "cloud.cfg is a FIFO",
    "cloud.cfg is 100 MiB",
    "cloud.cfg is not UTF-8",
    "cloud.cfg is a YAML alias bomb",
    "cloud.cfg is nested 10000 deep",
    "cloud.cfg has duplicate keys",
    "cloud.cfg has tabs in values and comments",
    "cloud.cfg has tab indentation",
    "cloud.cfg.d holds a symlink to /etc/shadow",
    "cloud.cfg.d holds a mode-000 file",
    "cloud.cfg.d holds a directory named .cfg",
    "cloud.cfg.d holds 100 000 hard links to 1 MiB files",
    "sshd_config.d drop-ins each include the directory",
    "os-release and a drop-in name carry terminal escape sequences",
    "cloud.cfg holds the hash of the password being set",
    "cloud.cfg holds the password being set in clear text",
];

/// The password some hostile guests already hold, and its SHA-512 hash there.
pub const MATCHING_SECRET: &str = "matching secret";
pub const MATCHING_HASH: &str =
    "$6$cloudimgknownsa$VkUz3S42Gb4LUozoYvMnMDw8nDxxSzwovgvt.oAfcSTHvSMY0EPkC67MmcHDn/q7FbmKKbjYbZn5IednUNfCn1";
/// The PRETTY_NAME of the escape-sequence guest: sets the terminal's title and clears the screen.
pub const ESCAPING_PRETTY_NAME: &str = "Debian \x1b]0;pwned\x07\x1b[2J12";

pub const GUEST_SHADOW: &str = "root:*:19000:0:99999:7:::\ndebian:!:19000:0:99999:7:::\n";

fn build_hostile_guests(g: &Handle, dev: &str) {
    const SECTORS: i64 = 40_960; // 20 MiB each
    g.part_init(dev, "gpt").unwrap();
    for i in 0..HOSTILE_GUESTS.len() as i64 {
        g.part_add(dev, "p", 2048 + i * SECTORS, 2048 + (i + 1) * SECTORS - 1).unwrap();
    }
    for (i, case) in HOSTILE_GUESTS.iter().enumerate() {
        let part = format!("{dev}{}", i + 1);
        mkfs(g, "ext4", &part, None);
        g.mount(&part, "/").unwrap();
        os_root(g, DEBIAN_RELEASE, Some(DEBIAN_CFG), Some((DEBIAN_VERSION_PY, "22.4.2")), "");
        put(g, "/etc/shadow", GUEST_SHADOW);
        make_hostile(g, case);
        g.umount_all().unwrap();
    }
}

/// Ten levels of nine aliases each: 9^10 "lol"s once expanded.
fn alias_bomb() -> String {
    let mut y =
        String::from("a: &a [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
    for (prev, name) in
        ["a", "b", "c", "d", "e", "f", "g", "h", "i"].iter().zip(["b", "c", "d", "e", "f", "g", "h", "i", "j"])
    {
        y.push_str(&format!(
            "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    y
}

/// Turns the Debian guest mounted at `/` into the hostile guest `case`.
fn make_hostile(g: &Handle, case: &str) {
    let cfg = "/etc/cloud/cloud.cfg";
    let replace_with_link = |target: &str| {
        g.rm(cfg).unwrap();
        g.ln_s(target, cfg).unwrap();
    };
    match case {
            "cloud.cfg relative symlink to ../shadow" => replace_with_link("../shadow"),
            "cloud.cfg absolute symlink to /etc/shadow" => replace_with_link("/etc/shadow"),
            "cloud.cfg symlink escaping the root" => replace_with_link("../../../../../../../../etc/hostname"),
            "cloud.cfg is a directory" => {
                g.rm(cfg).unwrap();
                g.mkdir(cfg).unwrap();
            }
            "cloud.cfg is a FIFO" => {
                g.rm(cfg).unwrap();
                g.mkfifo(0o644, cfg).unwrap();
            }
            "cloud.cfg is 100 MiB" => g.truncate_size(cfg, 100 << 20).unwrap(),
            "cloud.cfg is not UTF-8" => g.write(cfg, b"users:\n  - default\n# caf\xe9 \xff\xfe\n").unwrap(),
            "cloud.cfg is a YAML alias bomb" => put(g, cfg, &format!("{DEBIAN_CFG}{}", alias_bomb())),
            "cloud.cfg is nested 10000 deep" => {
                put(g, cfg, &format!("{DEBIAN_CFG}deep: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)))
            }
            "cloud.cfg has duplicate keys" => {
                put(g, cfg, &format!("{DEBIAN_CFG}ssh_pwauth: false\nssh_pwauth: false\n"))
            }
            "cloud.cfg has tabs in values and comments" => {
                put(g, cfg, &format!("{DEBIAN_CFG}#\tcomment with a tab\nmotd: \"a\tb\"\n"))
            }
            "cloud.cfg has tab indentation" => put(g, cfg, &format!("{DEBIAN_CFG}extra:\n\tkey: value\n")),
            "cloud.cfg.d holds a symlink to /etc/shadow" => {
                g.ln_s("/etc/shadow", "/etc/cloud/cloud.cfg.d/50-link.cfg").unwrap()
            }
            "cloud.cfg.d holds a mode-000 file" => {
                put(g, "/etc/cloud/cloud.cfg.d/50-locked.cfg", "ssh_pwauth: false\n");
                g.chmod(0, "/etc/cloud/cloud.cfg.d/50-locked.cfg").unwrap();
            }
            "cloud.cfg.d holds a directory named .cfg" => g.mkdir("/etc/cloud/cloud.cfg.d/50-dir.cfg").unwrap(),
            "cloud.cfg.d holds 100 000 hard links to 1 MiB files" => {
                let tarball = hard_link_tarball();
                let options = guestfs::TarInOptArgs { compress: Some("gzip"), xattrs: None, selinux: None, acls: None };
                g.tar_in(tarball.path().join("links.tar.gz").to_str().unwrap(), "/etc/cloud/cloud.cfg.d", options)
                    .unwrap();
            }
            "sshd_config.d drop-ins each include the directory" => {
                for i in 0..20 {
                    put(g, &format!("/etc/ssh/sshd_config.d/{i:02}.conf"), "Include /etc/ssh/sshd_config.d/*.conf\n");
                }
            }
            "os-release and a drop-in name carry terminal escape sequences" => {
                put(g, "/etc/os-release", &format!("PRETTY_NAME=\"{ESCAPING_PRETTY_NAME}\"\nID=debian\n"));
                g.ln_s("/etc/shadow", "/etc/cloud/cloud.cfg.d/50-\x1b[31mred.cfg").unwrap();
            }
            "cloud.cfg holds the hash of the password being set" => put(
                g,
                cfg,
                &format!("{DEBIAN_CFG}chpasswd:\n  expire: true\n  users:\n  - {{name: debian, password: {MATCHING_HASH}, type: hash}}\n"),
            ),
            "cloud.cfg holds the password being set in clear text" => put(
                g,
                cfg,
                &format!("{DEBIAN_CFG}chpasswd:\n  expire: true\n  users:\n  - {{name: debian, password: {MATCHING_SECRET}, type: text}}\n"),
            ),
            other => panic!("no recipe for {other}"),
        }
}

/// A gzipped tar of 100 000 `.cfg` names: hard links to two 1 MiB files (ext4 allows 65 000 links
/// to one file). Made on the host, where linking is fast; unpacked in the appliance in one call.
fn hard_link_tarball() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let megabyte: String = "# a comment line to fill one MiB of YAML\n".repeat((1 << 20) / 41);
    for file in ["a", "b"] {
        let first = dir.join(format!("{file}00000.cfg"));
        std::fs::write(&first, &megabyte).unwrap();
        for i in 1..50_000 {
            std::fs::hard_link(&first, dir.join(format!("{file}{i:05}.cfg"))).unwrap();
        }
    }
    let status = Command::new("tar")
        .arg("-czf")
        .arg(tmp.path().join("links.tar.gz"))
        .arg("-C")
        .arg(&dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar failed");
    tmp
}

/// Changes `image` in place the way a user would with guestfish: `edit` runs with `device` mounted
/// at `/`, then the appliance is shut down so that every write reaches the file.
pub fn edit_image(image: &Path, device: &str, edit: impl FnOnce(&Handle)) {
    let g = handle();
    let format = cloudimg::image::header::inspect(image).unwrap().format.as_str();
    g.add_drive(image.to_str().unwrap(), cloudimg::guest::drive_options(format, false)).unwrap();
    g.launch().expect("launching the appliance that edits a test image");
    g.mount(device, "/").unwrap_or_else(|e| panic!("mounting {device}: {e:?}"));
    edit(&g);
    g.umount_all().unwrap();
    g.shutdown().expect("the edited test image is flushed");
}

/// Reads files back from several images through one read-only appliance.
pub struct ReadBack {
    g: Handle,
}

impl ReadBack {
    /// Attaches `images` read-only, in order (the first is /dev/sda).
    pub fn open(images: &[&Path]) -> ReadBack {
        let g = handle();
        for image in images {
            let format = cloudimg::image::header::inspect(image).unwrap().format.as_str();
            g.add_drive(image.to_str().unwrap(), cloudimg::guest::drive_options(format, true)).unwrap();
        }
        g.launch().expect("launching the read-back appliance");
        ReadBack { g }
    }

    /// The files at `paths` on filesystem `device` (mounted with `options`); `None` where missing.
    pub fn read(&self, device: &str, options: &str, paths: &[&str]) -> BTreeMap<String, Option<Vec<u8>>> {
        self.g
            .mount_options(&format!("ro{}{options}", if options.is_empty() { "" } else { "," }), device, "/")
            .unwrap_or_else(|e| panic!("mounting {device}: {e:?}"));
        // A directory (or a link to one) is reported as present with no content.
        let read = |p: &str| match self.g.is_file(p, guestfs::IsFileOptArgs { followsymlinks: Some(true) }).unwrap() {
            true => self.g.read_file(p).unwrap(),
            false => Vec::new(),
        };
        let out = paths.iter().map(|p| (p.to_string(), self.g.exists(p).unwrap().then(|| read(p)))).collect();
        self.g.umount_all().unwrap();
        out
    }

    /// The SELinux label of a file, if any.
    pub fn selinux_label(&self, device: &str, path: &str) -> Option<String> {
        self.g.mount_ro(device, "/").unwrap();
        let label = self.g.lgetxattrs(path).unwrap().into_iter().find(|x| x.attrname == "security.selinux");
        self.g.umount_all().unwrap();
        label.map(|x| text(&x.attrval).trim_end_matches('\0').to_string())
    }

    /// (mode, uid, gid) of a file.
    pub fn owner_mode(&self, device: &str, options: &str, path: &str) -> (i64, i64, i64) {
        self.g
            .mount_options(&format!("ro{}{options}", if options.is_empty() { "" } else { "," }), device, "/")
            .unwrap();
        let st = self.g.lstatns(path).unwrap();
        self.g.umount_all().unwrap();
        (st.st_mode & 0o7777, st.st_uid, st.st_gid)
    }
}

/// A scenario shared by several tests of one binary, so that each asserts one behaviour without
/// launching the appliance again: `build` runs once, when the first of them asks; a panic in it
/// fails each of them with its message, without running it again.
pub fn shared<T: Sync>(cell: &'static OnceLock<Result<T, String>>, build: fn() -> T) -> &'static T {
    let built = cell.get_or_init(|| {
        std::panic::catch_unwind(build).map_err(|panic| {
            let message = panic.downcast_ref::<String>().cloned();
            message.or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        })
    });
    built.as_ref().unwrap_or_else(|why| panic!("the scenario these tests share failed: {why}"))
}

/// Runs the cloudimg binary.
pub fn cloudimg(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudimg"));
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    text(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// Debian's Python, whose PyYAML (`python3-yaml`, installed by scripts/install-deps) is the one Debian's
/// cloud-init reads with; a `python3` earlier on PATH may be another interpreter without it.
pub const PYTHON: &str = "/usr/bin/python3";

/// Parses YAML documents with PyYAML's safe_load (what cloud-init uses) and returns them as JSON.
pub fn pyyaml(documents: &[String]) -> Vec<serde_json::Value> {
    let script =
        "import json, sys, yaml\nprint(json.dumps([yaml.safe_load(d) for d in json.load(sys.stdin)], default=str))";
    let mut child =
        Command::new(PYTHON).args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), documents).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether the system's crypt(3) (glibc/libxcrypt through Python) accepts `password` for `hash`. The
/// judge must answer: a Python that fails or prints anything but True/False fails the test, so that
/// "does not verify" can only mean the judge said no.
pub fn system_crypt_verifies(password: &str, hash: &str) -> bool {
    let script = "import crypt, sys, warnings\nwarnings.simplefilter('ignore')\np, h = sys.stdin.read().split('\\0')\nprint(crypt.crypt(p, h) == h)";
    let mut child = Command::new(PYTHON)
        .args(["-W", "ignore", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{password}\0{hash}").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the crypt judge failed: {}", text(&out.stderr));
    match text(&out.stdout).trim() {
        "True" => true,
        "False" => false,
        other => panic!("the crypt judge answered {other:?}"),
    }
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The text of a file read back from a guest, failing the test with its name when it is missing.
pub fn file_text(files: &BTreeMap<String, Option<Vec<u8>>>, path: &str) -> String {
    text(files.get(path).and_then(Option::as_ref).unwrap_or_else(|| panic!("{path} is missing in the image")))
}
