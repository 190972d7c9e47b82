//! `cloudimg verify`'s command line.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use crate::appliance::accel;

pub const VERIFY_HELP: &str = "\
Boots a throw-away copy-on-write overlay of IMAGE (IMAGE itself is opened read-only) under qemu:
through its own bootloader with SeaBIOS, with UEFI (OVMF) when the disk can only boot that way, or,
when it has no bootloader, its kernel and initrd read out of the image with the root from its
fstab. cloud-init gets a NoCloud seed with a fresh instance-id and user-data that sets no password,
so the image's own configuration is what is tested. Once cloud-init has finished, cloudimg logs in
over SSH with password authentication only (or the key), runs `id -un` and `cloud-init status
--long --wait`, tries a wrong password, and prints the verdict. On failure it prints the reason, the
serial console's last lines and the tails of cloud-init's and sshd's logs read from the overlay.

Examples:
  cloudimg verify out.qcow2 --password-file pw.txt
  printf '%s\\n' \"$PW\" | cloudimg verify out.qcow2 --user debian --password-stdin --json
  cloudimg verify out.qcow2 --ssh-key-file ~/.ssh/id_ed25519 --accel kvm --timeout 180
  # A disk booted before and reset through /etc/shadow, booted again as the same instance
  cloudimg verify reset.qcow2 --password-file pw.txt --same-instance
";

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("password").args(["password_file", "password_stdin"])))]
#[command(group(ArgGroup::new("credential").required(true).multiple(true).args(["password_file", "password_stdin", "ssh_key_file"])))]
pub struct VerifyArgs {
    /// The image to boot (qcow2 or raw); it is never changed
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// The user to log in as [default: the image's cloud-init default user]
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Read the password from the first line of FILE
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Read the password from the first line of standard input (no echo on a terminal)
    #[arg(long)]
    pub password_stdin: bool,

    /// Log in with this private key (without a passphrase); with a password too, both must work
    #[arg(long, value_name = "KEY")]
    pub ssh_key_file: Option<PathBuf>,

    /// Give up when the instance has not booted and answered within this many seconds [default:
    /// 600 under TCG, 240 with KVM]
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,

    /// Accelerator for the instance and the libguestfs appliance
    #[arg(long, value_enum, default_value_t = accel::Requested::Auto)]
    pub accel: accel::Requested,

    /// Boot as the instance the image was last booted as (its /var/lib/cloud/data/instance-id), not
    /// as a new one: for a disk reset with `customize --method shadow`, where cloud-init must not
    /// run its per-instance modules again
    #[arg(long)]
    pub same_instance: bool,

    /// Keep the instance's disk, shut down through ACPI after the verdict, as a standalone qcow2 at
    /// FILE (which must not exist)
    #[arg(long, value_name = "FILE")]
    pub keep_disk: Option<PathBuf>,

    /// Print the verdict as JSON on stdout
    #[arg(long)]
    pub json: bool,

    /// No progress lines, only the verdict
    #[arg(short, long)]
    pub quiet: bool,
}
