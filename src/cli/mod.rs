//! The command line as typed: clap definitions only. `settings` turns it into what will be done.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::appliance::accel;
use crate::image::header::Format;
use crate::inspect::Requirement;
use crate::login::method::Method;
use crate::support::exit_codes;

pub mod assets;
mod help;
pub mod settings;
mod verify;
use help::{CUSTOMIZE_EXAMPLES, DOCTOR_HELP, INSPECT_HELP, UPLOAD_EXAMPLES};
pub use verify::VerifyArgs;

#[derive(Debug, Parser)]
#[command(name = "cloudimg", version, about = "Prepare cloud images offline for OpenStack", after_help = exit_codes::HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Give an image a working password login through its own cloud-init
    #[command(after_long_help = format!("{CUSTOMIZE_EXAMPLES}\n{}", exit_codes::HELP), after_help = "Examples and exit statuses: cloudimg customize --help")]
    Customize(Box<CustomizeArgs>),

    /// Audit images read-only: file safety, OS, cloud-init and sshd settings, who gets a password
    #[command(after_long_help = format!("{INSPECT_HELP}\n{}", exit_codes::INSPECT_HELP), after_help = "Examples and exit statuses: cloudimg inspect --help")]
    Inspect(InspectArgs),

    /// Upload an image to Glance and check that Glance stored exactly this file
    #[command(after_long_help = format!("{UPLOAD_EXAMPLES}\n{}", exit_codes::UPLOAD_HELP), after_help = "Examples and exit statuses: cloudimg upload --help")]
    Upload(UploadArgs),

    /// Boot an image under qemu and prove that its SSH password (or key) login works
    #[command(after_long_help = format!("{}\n{}", verify::VERIFY_HELP, exit_codes::VERIFY_HELP), after_help = "Examples and exit statuses: cloudimg verify --help")]
    Verify(VerifyArgs),

    /// Check that this host can run cloudimg, and print the fix for anything that stops it
    #[command(after_long_help = DOCTOR_HELP)]
    Doctor(DoctorArgs),

    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout
    #[command(
        after_long_help = "Examples:\n  cloudimg completions bash > ~/.local/share/bash-completion/completions/cloudimg\n  cloudimg completions fish > ~/.config/fish/completions/cloudimg.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Write the man pages (cloudimg.1 and one per command) into DIR
    #[command(after_long_help = "Example:\n  cloudimg manpages ~/.local/share/man/man1 && man cloudimg-customize")]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Skip building and starting the appliance
    #[arg(long)]
    pub quick: bool,

    /// Print a JSON report on stdout
    #[arg(long)]
    pub json: bool,

    /// Accelerator to check, as `customize --accel` would use it
    #[arg(long, value_enum, default_value_t = accel::Requested::Auto)]
    pub accel: accel::Requested,

    /// Give up on the appliance build or launch after this many seconds
    #[arg(long, default_value_t = 300, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The images to audit (qcow2 or raw)
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,

    /// Print a JSON array, one report per image, on stdout
    #[arg(long)]
    pub json: bool,

    /// Exit with status 8 unless every image meets CONDITION (repeatable)
    #[arg(long, value_enum, value_name = "CONDITION")]
    pub require: Vec<Requirement>,

    /// The user whose login is judged [default: the image's cloud-init default user]
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// The root filesystem's device, when an image holds several operating systems
    #[arg(long, value_name = "DEVICE")]
    pub root: Option<String>,

    /// The cloud-init version to assume instead of the one read from the image
    #[arg(long, value_name = "X.Y[.Z]")]
    pub cloud_init_version: Option<String>,

    /// No progress lines, only the reports
    #[arg(short, long)]
    pub quiet: bool,

    /// Accelerator for the libguestfs appliance
    #[arg(long, value_enum, default_value_t = accel::Requested::Auto, help_heading = "Appliance")]
    pub accel: accel::Requested,

    /// Give up on an appliance step after this many seconds
    #[arg(long, default_value_t = 600, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Appliance")]
    pub timeout: u64,
}

/// How the image data reaches Glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportMethodArg {
    /// `PUT /v2/images/{id}/file`, the classic upload
    Put,
    /// Interoperable import: stage the data, then ask Glance to import it (its import plugins run)
    GlanceDirect,
    /// glance-direct where the cloud offers it (GET /v2/info/import), PUT otherwise or when staging
    /// is refused
    Auto,
}

/// `--wait`'s default, in seconds.
pub const DEFAULT_WAIT: u64 = 600;

/// Where the image goes in Glance; shared by `upload` and `customize --upload`.
#[derive(Debug, Clone, Args)]
pub struct GlanceArgs {
    /// Image name in Glance [default: the file name without its extension]
    #[arg(long, value_name = "NAME", help_heading = "Glance")]
    pub name: Option<String>,

    /// An image property (repeatable); overrides one derived from the image
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = crate::openstack::glance::parse_property, help_heading = "Glance")]
    pub properties: Vec<(String, String)>,

    /// Leave out a property derived from the image (repeatable), e.g. os_require_quiesce
    #[arg(long = "no-property", value_name = "NAME", help_heading = "Glance")]
    pub no_properties: Vec<String>,

    /// Image visibility [default: Glance's own, shared]
    #[arg(long, value_parser = ["private", "shared", "community", "public"], help_heading = "Glance")]
    pub visibility: Option<String>,

    /// A tag on the image (repeatable)
    #[arg(long = "tag", value_name = "TAG", help_heading = "Glance")]
    pub tags: Vec<String>,

    /// The smallest RAM, in MiB, the image boots with (Glance's min_ram)
    #[arg(long, value_name = "MIB", help_heading = "Glance")]
    pub min_ram: Option<u64>,

    /// Share the image with this project ID (repeatable); the sharing is accepted for it when the
    /// credentials allow (an administrator's), else the project accepts it itself
    #[arg(long = "member", value_name = "PROJECT_ID", help_heading = "Glance")]
    pub members: Vec<String>,

    /// Protect the new image from deletion, once it is verified
    #[arg(long, help_heading = "Glance")]
    pub protected: bool,

    /// Hide (os_hidden) the project's older images of the same name once the new one is verified
    #[arg(long, help_heading = "Glance")]
    pub hide_previous: bool,

    /// Keep the N newest images of the same name (the new one included) and delete the project's
    /// older unprotected ones, once the new one is verified
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Glance")]
    pub keep: Option<u64>,

    /// Upload nothing when the project has an image of the same name with the file's SHA-512
    /// (os_hash_value); that image's id is reported
    #[arg(long, help_heading = "Glance")]
    pub if_changed: bool,

    /// How the data reaches Glance
    #[arg(long, value_enum, default_value_t = ImportMethodArg::Auto, help_heading = "Glance")]
    pub import_method: ImportMethodArg,

    /// Store the image in these stores of a multi-store cloud (comma-separated; GET /v2/info/stores
    /// lists them) [default: the cloud's default store]
    #[arg(long, value_name = "STORE,...", value_delimiter = ',', help_heading = "Glance")]
    pub stores: Vec<String>,

    /// The cloud in clouds.yaml [default: $OS_CLOUD; without either, the OS_* variables]
    #[arg(long, value_name = "NAME", help_heading = "Glance")]
    pub os_cloud: Option<String>,

    /// Keep what failed, for inspection: an output that failed --verify, as NAME.failed.EXT beside
    /// the output name; the Glance image when the upload fails or Glance's copy differs
    #[arg(long, help_heading = "Output")]
    pub keep_failed: bool,

    /// How long to wait for Glance to make the uploaded image active (importing included)
    #[arg(long, default_value_t = DEFAULT_WAIT, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Glance")]
    pub wait: u64,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The image file: a standalone qcow2 or raw image
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,

    /// The manifest `customize --manifest` wrote for IMAGE: its formats, min_disk and properties are
    /// used, and its hashes must match the file's
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,

    /// Declare this disk_format instead of the file's own (Glance 30+ rejects content that does not match)
    #[arg(long, value_name = "FORMAT")]
    pub disk_format: Option<String>,

    #[command(flatten)]
    pub glance: GlanceArgs,

    /// Authenticate and read what Glance holds, then say what would be done (the method, the images
    /// that would be hidden or deleted) without changing anything
    #[arg(long)]
    pub dry_run: bool,

    /// Print a JSON report (image id, hashes, properties, every image hidden or deleted) on stdout
    #[arg(long)]
    pub json: bool,

    /// Print only errors and warnings
    #[arg(short, long)]
    pub quiet: bool,
}

/// How `ssh_pwauth` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SshPwauth {
    /// Enable SSH password authentication (cloud-init writes PasswordAuthentication yes)
    True,
    /// Disable it (console login only)
    False,
    /// Leave the image's setting alone
    Unchanged,
}

// The domain's enums are named for the command line here, so that clap stays in `cli/`.

impl ValueEnum for Requirement {
    fn value_variants<'a>() -> &'a [Self] {
        &[Requirement::PasswordLogin, Requirement::NoPlaintext, Requirement::Standalone, Requirement::NotBooted]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            Requirement::PasswordLogin => {
                "A new instance accepts an SSH password login for the user (--user, else the default user)"
            }
            Requirement::NoPlaintext => "No password is stored in plaintext in cloud-init's configuration",
            Requirement::Standalone => "The file is a standalone qcow2 or raw image (no backing or external data file)",
            Requirement::NotBooted => "The image carries no cloud-init instance state from an earlier boot",
        };
        Some(PossibleValue::new(self.name()).help(help))
    }
}

impl ValueEnum for accel::Requested {
    fn value_variants<'a>() -> &'a [Self] {
        &[accel::Requested::Auto, accel::Requested::Kvm, accel::Requested::Tcg]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            accel::Requested::Auto => PossibleValue::new("auto").help("KVM when the host can really use it, else TCG"),
            accel::Requested::Kvm => PossibleValue::new("kvm").help("KVM; fail when it is not usable"),
            accel::Requested::Tcg => PossibleValue::new("tcg").help("Software emulation (slower, works everywhere)"),
        })
    }
}

impl ValueEnum for Format {
    fn value_variants<'a>() -> &'a [Self] {
        &[Format::Qcow2, Format::Raw]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

/// `--method`'s values; the type is the decision's own ([`Method`]).
impl ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Self] {
        &[Method::CloudInit, Method::Shadow, Method::Auto]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Method::CloudInit => {
                PossibleValue::new("cloud-init").help("cloud-init sets it at first boot (cloud.cfg or --drop-in)")
            }
            Method::Shadow => PossibleValue::new("shadow")
                .help("Write the hash into /etc/shadow now, and enable password login in sshd's configuration"),
            Method::Auto => PossibleValue::new("auto")
                .help("cloud-init where it will work, else /etc/shadow; the choice and the reason are printed"),
        })
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("password").args(["password_file", "password_stdin", "random_password", "visible_password"])))]
#[command(group(ArgGroup::new("job").required(true).multiple(true).args(["password_file", "password_stdin", "random_password", "visible_password", "ssh_key", "lock"])))]
pub struct CustomizeArgs {
    /// The images to customize (qcow2 or raw); several share one appliance launch
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,

    /// Where to write the new image (one INPUT); it must not exist unless --force
    #[arg(short, long, value_name = "OUTPUT", required_unless_present_any = ["in_place", "dry_run", "out_dir"], conflicts_with_all = ["in_place", "out_dir"])]
    pub output: Option<PathBuf>,

    /// Write each new image into DIR, named after its INPUT (`NAME.qcow2` or `NAME.raw`)
    #[arg(long, value_name = "DIR", conflicts_with = "in_place")]
    pub out_dir: Option<PathBuf>,

    /// Edit each INPUT itself (a new image replaces it atomically at the end)
    #[arg(long)]
    pub in_place: bool,

    /// Read the password from the first line of FILE
    #[arg(long, value_name = "FILE", help_heading = "Password")]
    pub password_file: Option<PathBuf>,

    /// Read the password from the first line of standard input (no echo on a terminal)
    #[arg(long, help_heading = "Password")]
    pub password_stdin: bool,

    /// Generate a random password and print it once on stderr
    #[arg(long, help_heading = "Password")]
    pub random_password: bool,

    /// With --random-password: save it to FILE (created with mode 0600) instead of printing it
    #[arg(long, value_name = "FILE", help_heading = "Password")]
    pub random_password_file: Option<PathBuf>,

    /// Take the password from the command line, where other users can see it (ps, shell history)
    #[arg(long, value_name = "PASSWORD", help_heading = "Password")]
    pub visible_password: Option<String>,

    /// Add the public keys in FILE to the user's authorized keys through cloud-config (repeatable;
    /// every line is checked; keys already there are not added twice)
    #[arg(long, value_name = "FILE", help_heading = "Password")]
    pub ssh_key: Vec<PathBuf>,

    /// The reverse job: undo cloudimg's earlier edit exactly, remove every password cloud-init would
    /// set, and set ssh_pwauth: false where it would enable password login
    #[arg(long, visible_alias = "no-password", conflicts_with_all = ["password_file", "password_stdin", "random_password", "visible_password", "ssh_key", "plaintext", "expire", "ssh_pwauth", "drop_in"], help_heading = "Password")]
    pub lock: bool,

    /// The user whose password is set [default: the image's cloud-init default user]; `root` works,
    /// with warnings about what still stops root logging in
    #[arg(long, value_name = "NAME", help_heading = "What to write")]
    pub user: Option<String>,

    /// How the password is set
    #[arg(long, value_enum, default_value_t = Method::CloudInit, value_name = "METHOD", help_heading = "What to write")]
    pub method: Method,

    /// Store the password in clear text instead of a hash (needed for cloud-init older than 17.1)
    #[arg(long, help_heading = "What to write")]
    pub plaintext: bool,

    /// Make the user change the password at first login (chpasswd.expire: true)
    #[arg(long, help_heading = "What to write")]
    pub expire: bool,

    /// Whether cloud-init enables SSH password authentication [default: true with a password,
    /// unchanged with keys alone]
    #[arg(long, value_enum, value_name = "WHEN", help_heading = "What to write")]
    pub ssh_pwauth: Option<SshPwauth>,

    /// Write /etc/cloud/cloud.cfg.d/99-cloudimg.cfg (mode 0600: only root reads the hash) instead of
    /// editing /etc/cloud/cloud.cfg (which keeps its mode, often readable by every user)
    #[arg(long, help_heading = "What to write")]
    pub drop_in: bool,

    /// Remove cloud-init's instance state (as `cloud-init clean` does) so that a disk that was booted
    /// before sets the password again on its next boot
    #[arg(long, help_heading = "What to write")]
    pub clean_instance_state: bool,

    /// Write even when the checks find that the password login would not work
    #[arg(long, help_heading = "What to write")]
    pub allow_ineffective: bool,

    /// The root filesystem's device, when the image holds several operating systems
    #[arg(long, value_name = "DEVICE", help_heading = "Image")]
    pub root: Option<String>,

    /// The cloud-init version to write for, instead of the one read from the image (its version.py or
    /// meson_versions.py, Python package metadata, dpkg or rpm database; a source that disagrees is
    /// reported)
    #[arg(long, value_name = "X.Y[.Z]", help_heading = "Image")]
    pub cloud_init_version: Option<String>,

    /// Output format [default: qcow2; with --in-place, the input's format]
    #[arg(long, value_enum, help_heading = "Output")]
    pub output_format: Option<Format>,

    /// Compress the qcow2 output
    #[arg(long, help_heading = "Output")]
    pub compress: bool,

    /// Write the Glance manifest (formats, sizes, min_disk, MD5 and SHA-512, properties read from the
    /// image) to FILE, or without FILE beside each output as OUTPUT.json
    #[arg(long, value_name = "FILE", num_args = 0..=1, help_heading = "Output")]
    pub manifest: Option<Option<PathBuf>>,

    /// Do not trim the guest filesystems' free space before writing (the output may be larger)
    #[arg(long, help_heading = "Output")]
    pub no_trim: bool,

    /// Boot each new image (as `cloudimg verify` does) before it is renamed into place or uploaded;
    /// if the login does not work, nothing is kept under the output name (see --keep-failed) and
    /// nothing is uploaded
    #[arg(long, conflicts_with = "dry_run", help_heading = "Output")]
    pub verify: bool,

    /// Upload each new image to Glance when it is written, and check Glance's copy
    #[arg(long, conflicts_with = "dry_run", help_heading = "Glance")]
    pub upload: bool,

    #[command(flatten)]
    pub glance: GlanceArgs,

    /// Replace OUTPUT if it exists
    #[arg(long, help_heading = "Output")]
    pub force: bool,

    /// Do everything up to writing, show the change as a diff (secret masked), write nothing
    #[arg(long, help_heading = "Output")]
    pub dry_run: bool,

    /// Print a JSON report on stdout (progress goes to stderr)
    #[arg(long, help_heading = "Output")]
    pub json: bool,

    /// Print only errors and warnings
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More detail; twice (-vv) adds libguestfs's appliance messages (never its call trace, which
    /// would show file contents)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Accelerator for the libguestfs appliance
    #[arg(long, value_enum, default_value_t = accel::Requested::Auto, help_heading = "Appliance")]
    pub accel: accel::Requested,

    /// Give up on an appliance step after this many seconds
    #[arg(long, default_value_t = 600, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Appliance")]
    pub timeout: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cloudimg").chain(args.iter().copied()))
    }

    use clap::error::ErrorKind;

    /// The kind of error clap gives for `args`, or None when they parse.
    fn refusal(args: &[&str]) -> Option<ErrorKind> {
        parse(args).err().map(|e| e.kind())
    }

    #[test]
    fn a_password_source_or_keys_or_lock_is_what_customize_writes() {
        assert_eq!(refusal(&["customize", "in.img", "-o", "out.img", "--password-file", "pw"]), None);
        assert_eq!(refusal(&["customize", "in.img", "-o", "o", "--ssh-key", "k.pub"]), None);
        assert_eq!(refusal(&["customize", "in.img", "-o", "o", "--ssh-key", "k.pub", "--password-stdin"]), None);
        assert_eq!(refusal(&["customize", "in.img", "-o", "o", "--lock"]), None);
        assert_eq!(refusal(&["customize", "in.img", "-o", "o", "--no-password"]), None);
        assert_eq!(refusal(&["customize", "in.img", "-o", "out.img"]), Some(ErrorKind::MissingRequiredArgument));
    }

    #[test]
    fn two_password_sources_or_a_password_with_lock_conflict() {
        let two = ["customize", "in.img", "-o", "out.img", "--password-file", "pw", "--password-stdin"];
        assert_eq!(refusal(&two), Some(ErrorKind::ArgumentConflict));
        assert_eq!(
            refusal(&["customize", "in.img", "-o", "o", "--lock", "--password-stdin"]),
            Some(ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn exactly_one_destination_unless_dry_run() {
        assert_eq!(refusal(&["customize", "in.img", "--dry-run", "--password-file", "pw"]), None);
        assert_eq!(
            refusal(&["customize", "in.img", "--password-file", "pw"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            refusal(&["customize", "in.img", "--in-place", "-o", "x", "--password-stdin"]),
            Some(ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        assert_eq!(
            refusal(&["customize", "in.img", "-o", "o", "--password-stdin", "--timeout", "0"]),
            Some(ErrorKind::ValueValidation)
        );
    }

    #[test]
    fn inspect_needs_an_image() {
        assert_eq!(refusal(&["inspect"]), Some(ErrorKind::MissingRequiredArgument));
        assert_eq!(refusal(&["inspect", "a.img", "b.img", "--require", "password-login", "--json"]), None);
    }
}
