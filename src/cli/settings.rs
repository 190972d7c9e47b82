//! What will be done, checked and decided once from what was typed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::appliance::accel;
use crate::cli::{CustomizeArgs, GlanceArgs, ImportMethodArg, SshPwauth, VerifyArgs};
use crate::cloud_config::keys;
use crate::cloud_config::version::CloudInitVersion;
use crate::cloud_config::{CLOUD_CFG, DROP_IN};
use crate::image::header::Format;
use crate::image::output;
use crate::login::method::Method;
use crate::login::password::{Secret, Source};
use crate::openstack::upload::{Destination, ImportMethod, Request};
use crate::support::exit_codes::{with_code, BAD_INPUT, OUTPUT, USAGE};
use crate::support::report::Verbosity;

/// Where the result goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A new image file; `format` `None` means qcow2.
    NewFile {
        path: PathBuf,
        format: Option<Format>,
        compress: bool,
        replace: bool,
    },
    /// Each input to `DIR/NAME.qcow2` (or `.raw`).
    Dir {
        dir: PathBuf,
        format: Option<Format>,
        compress: bool,
        replace: bool,
    },
    /// Replace the input atomically; `format` `None` keeps the input's.
    InPlace {
        format: Option<Format>,
        compress: bool,
    },
    DryRun,
}

/// How `verify` logs in: with the password, the key, or each in turn (at least one is given).
#[derive(Debug, Clone, PartialEq)]
pub struct Credential {
    pub password: Option<Source>,
    /// A private key file.
    pub key: Option<PathBuf>,
}

/// `cloudimg verify`, decided from what was typed.
#[derive(Debug)]
pub struct Verify {
    pub image: PathBuf,
    /// What the image is called in messages (the output's name, for `customize --verify`).
    pub name: String,
    /// `None`: the image's cloud-init default user.
    pub user: Option<String>,
    pub credential: Credential,
    /// `None`: the default for the accelerator chosen.
    pub timeout: Option<Duration>,
    pub accel: accel::Requested,
    pub same_instance: bool,
    pub keep_disk: Option<PathBuf>,
    pub json: bool,
    pub verbosity: Verbosity,
}

impl Verify {
    pub fn from_args(args: VerifyArgs) -> Result<Self> {
        if let Some(keep) = &args.keep_disk {
            check_output_path(&args.image, keep, false)?;
        }
        let password = match (args.password_file, args.password_stdin) {
            (Some(path), _) => Some(Source::File(path)),
            (None, true) => Some(Source::Stdin),
            (None, false) => None,
        };
        let credential = Credential { password, key: args.ssh_key_file };
        Ok(Verify {
            name: args.image.display().to_string(),
            image: args.image,
            user: args.user,
            credential,
            timeout: args.timeout.map(Duration::from_secs),
            accel: args.accel,
            same_instance: args.same_instance,
            keep_disk: args.keep_disk,
            json: args.json,
            verbosity: if args.quiet { Verbosity::Quiet } else { Verbosity::Normal },
        })
    }
}

#[derive(Debug)]
pub struct Customize {
    pub inputs: Vec<PathBuf>,
    pub output: Output,
    /// `None`: no password is set (keys alone, or --lock).
    pub password: Option<Source>,
    /// Validated public key lines.
    pub ssh_keys: Vec<String>,
    pub lock: bool,
    pub method: Method,
    pub user: Option<String>,
    pub plaintext: bool,
    pub expire: bool,
    pub ssh_pwauth: Option<bool>,
    /// The cloud-init file to edit.
    pub target: &'static str,
    pub clean_instance_state: bool,
    pub allow_ineffective: bool,
    /// Boot each output and prove the login before it is renamed into place.
    pub verify: bool,
    /// A failed verification keeps the image beside the output name
    /// ([`crate::image::output::failed_name`]).
    pub keep_failed_verification: bool,
    pub root: Option<String>,
    pub cloud_init_version: Option<CloudInitVersion>,
    pub accel: accel::Requested,
    pub timeout: Duration,
    pub verbosity: Verbosity,
    pub json: bool,
    /// Trim the guest filesystems' free space before writing.
    pub trim: bool,
    pub manifest: ManifestRequest,
    /// `--upload`, with where to.
    pub upload: Option<Destination>,
}

/// Whether and where `customize` writes a Glance manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum ManifestRequest {
    None,
    /// `OUTPUT.json` beside each output.
    Beside,
    File(PathBuf),
}

impl Customize {
    /// Whether each output is hashed as it is written: for a manifest file, or for a JSON report
    /// without an upload. An upload hashes the bytes it sends instead, so `--upload` alone costs no
    /// hashing while writing.
    pub fn hash_while_writing(&self) -> bool {
        self.manifest != ManifestRequest::None || (self.json && self.upload.is_none())
    }
}

impl Customize {
    pub fn from_args(mut args: CustomizeArgs) -> Result<Self> {
        let password = password_source(&mut args)?;
        if args.method != Method::CloudInit && password.is_none() {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "--method {} sets a password: give one",
                args.method.to_possible_value().expect("no skipped values").get_name()
            )));
        }
        if args.method == Method::Shadow && args.plaintext {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "--plaintext is for cloud-init; /etc/shadow always holds a hash"
            )));
        }
        if args.inputs.len() > 1 && args.root.is_some() {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "--root names a device of one image; give one input with it"
            )));
        }
        let has_password = password.is_some();
        if args.verify && !has_password {
            return Err(with_code(USAGE)(anyhow::anyhow!(
                "--verify logs in with the password: give one (a public key alone cannot be tried)"
            )));
        }
        let ssh_keys = read_ssh_keys(&args.ssh_key)?;
        let output = output_of(&mut args)?;
        let manifest = manifest_of(&mut args)?;
        let (upload, keep_failed_verification) = upload_of(args.glance, args.upload, args.verify, args.inputs.len())?;
        let cloud_init_version = args.cloud_init_version.map(|v| v.parse()).transpose().map_err(with_code(USAGE))?;
        let verbosity = match (args.quiet, args.verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, 1) => Verbosity::Verbose,
            (false, _) => Verbosity::Debug,
        };
        Ok(Customize {
            inputs: args.inputs,
            output,
            password,
            user: args.user,
            plaintext: args.plaintext,
            expire: args.expire,
            ssh_pwauth: match args.ssh_pwauth {
                Some(SshPwauth::True) => Some(true),
                Some(SshPwauth::False) => Some(false),
                Some(SshPwauth::Unchanged) => None,
                None if args.lock => None,
                None => has_password.then_some(true),
            },
            ssh_keys,
            lock: args.lock,
            method: args.method,
            target: if args.drop_in { DROP_IN } else { CLOUD_CFG },
            clean_instance_state: args.clean_instance_state,
            allow_ineffective: args.allow_ineffective,
            verify: args.verify,
            keep_failed_verification,
            root: args.root,
            cloud_init_version,
            accel: args.accel,
            timeout: Duration::from_secs(args.timeout),
            verbosity,
            json: args.json,
            trim: !args.no_trim,
            manifest,
            upload,
        })
    }
}

/// Where the password comes from; clap lets at most one source through.
fn password_source(args: &mut CustomizeArgs) -> Result<Option<Source>> {
    if args.random_password_file.is_some() && !args.random_password {
        return Err(with_code(USAGE)(anyhow::anyhow!("--random-password-file goes with --random-password")));
    }
    Ok(if let Some(path) = args.password_file.take() {
        Some(Source::File(path))
    } else if args.password_stdin {
        Some(Source::Stdin)
    } else if args.random_password {
        Some(Source::Random { save_to: args.random_password_file.take() })
    } else if let Some(visible) = args.visible_password.take() {
        Some(Source::Visible(Secret::new(visible).map_err(with_code(USAGE))?))
    } else {
        None
    })
}

/// The public keys of every --ssh-key file, checked.
fn read_ssh_keys(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut ssh_keys = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the SSH key file {}", path.display()))
            .map_err(with_code(USAGE))?;
        ssh_keys.extend(keys::parse_public_keys(&text, &path.display().to_string()).map_err(with_code(USAGE))?);
    }
    Ok(ssh_keys)
}

/// Where the outputs go: -o, --out-dir, --in-place or --dry-run.
fn output_of(args: &mut CustomizeArgs) -> Result<Output> {
    let (format, compress, replace) = (args.output_format, args.compress, args.force);
    if args.dry_run {
        return Ok(Output::DryRun);
    }
    if args.in_place {
        return Ok(Output::InPlace { format, compress });
    }
    if let Some(dir) = args.out_dir.take() {
        if !dir.is_dir() {
            return Err(with_code(OUTPUT)(anyhow::anyhow!("the output directory {} does not exist", dir.display())));
        }
        return Ok(Output::Dir { dir, format, compress, replace });
    }
    let path = args.output.take().expect("clap requires -o without --in-place, --out-dir or --dry-run");
    if args.inputs.len() > 1 {
        return Err(with_code(USAGE)(anyhow::anyhow!("-o names one output; with several inputs use --out-dir DIR")));
    }
    check_output_path(&args.inputs[0], &path, replace)?;
    Ok(Output::NewFile { path, format, compress, replace })
}

fn one_input(inputs: usize, what: &str) -> Result<()> {
    if inputs > 1 {
        return Err(with_code(USAGE)(anyhow::anyhow!("{what} names one image; give one input with it")));
    }
    Ok(())
}

/// Whether and where a manifest is written.
fn manifest_of(args: &mut CustomizeArgs) -> Result<ManifestRequest> {
    let manifest = match args.manifest.take() {
        None => ManifestRequest::None,
        Some(None) => ManifestRequest::Beside,
        Some(Some(path)) => {
            one_input(args.inputs.len(), "--manifest FILE")?;
            ManifestRequest::File(path)
        }
    };
    if manifest != ManifestRequest::None && args.dry_run {
        return Err(with_code(USAGE)(anyhow::anyhow!("--dry-run writes no image, so no manifest")));
    }
    Ok(manifest)
}

/// The Glance destination with --upload (checked now, before any image work), and whether a failed
/// --verify keeps its output.
fn upload_of(glance: GlanceArgs, upload: bool, verify: bool, inputs: usize) -> Result<(Option<Destination>, bool)> {
    if glance.name.is_some() {
        one_input(inputs, "--name")?;
    }
    if !upload && glance_given(&glance) {
        return Err(with_code(USAGE)(anyhow::anyhow!(
            "--name, --property, --no-property, --visibility, --tag, --min-ram, --member, --protected, \
             --hide-previous, --keep, --if-changed, --import-method, --stores, --os-cloud and --wait go \
             with --upload"
        )));
    }
    if glance.keep_failed && !upload && !verify {
        return Err(with_code(USAGE)(anyhow::anyhow!(
            "--keep-failed keeps what --verify or --upload found failing: give one of them"
        )));
    }
    let keep_failed_verification = verify && glance.keep_failed;
    Ok((upload.then(|| glance_destination(glance)).transpose()?, keep_failed_verification))
}

/// Whether any argument that means something only to `--upload` was given.
fn glance_given(g: &GlanceArgs) -> bool {
    g.name.is_some()
        || !g.properties.is_empty()
        || !g.no_properties.is_empty()
        || g.visibility.is_some()
        || !g.tags.is_empty()
        || g.min_ram.is_some()
        || !g.members.is_empty()
        || g.protected
        || g.hide_previous
        || g.keep.is_some()
        || g.if_changed
        || g.import_method != ImportMethodArg::Auto
        || !g.stores.is_empty()
        || g.os_cloud.is_some()
        || g.wait != crate::cli::DEFAULT_WAIT
}

/// The Glance arguments, checked, as what `upload` takes.
pub fn glance_destination(args: GlanceArgs) -> Result<Destination> {
    let usage = |message: String| with_code(USAGE)(anyhow::anyhow!(message));
    if !args.members.is_empty() && args.visibility.as_deref().is_some_and(|v| v != "shared") {
        return Err(usage(format!(
            "--member shares the image, which needs --visibility shared (Glance's default), not {}",
            args.visibility.as_deref().unwrap_or_default()
        )));
    }
    if let Some((key, _)) = args.properties.iter().find(|(k, _)| args.no_properties.contains(k)) {
        return Err(usage(format!("--property {key}=... and --no-property {key} contradict each other")));
    }
    let request = Request {
        visibility: args.visibility,
        tags: args.tags,
        min_ram: args.min_ram,
        members: args.members,
        protected: args.protected,
        hide_previous: args.hide_previous,
        keep: args.keep.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        if_changed: args.if_changed,
        method: match args.import_method {
            ImportMethodArg::Put => ImportMethod::Put,
            ImportMethodArg::GlanceDirect => ImportMethod::GlanceDirect,
            ImportMethodArg::Auto => ImportMethod::Auto,
        },
        stores: args.stores.into_iter().filter(|s| !s.is_empty()).collect(),
        keep_failed: args.keep_failed,
        wait: Duration::from_secs(args.wait),
    };
    Ok(Destination {
        name: args.name,
        properties: args.properties,
        no_properties: args.no_properties,
        os_cloud: args.os_cloud,
        request,
    })
}

pub fn check_output_path(input: &std::path::Path, path: &std::path::Path, force: bool) -> Result<()> {
    if output::same_file(input, path) {
        return Err(with_code(BAD_INPUT)(anyhow::anyhow!(
            "the output {} is the input; use --in-place to edit the input itself",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(with_code(OUTPUT)(anyhow::anyhow!("the output {} is a directory", path.display())));
    }
    if !force && path.symlink_metadata().is_ok() {
        return Err(with_code(OUTPUT)(anyhow::anyhow!(
            "the output {} exists; use --force to replace it",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::support::exit_codes::code_of;
    use clap::Parser;

    fn settings(args: &[&str]) -> Result<Customize> {
        let cli = Cli::try_parse_from(["cloudimg", "customize"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Customize(args) => Customize::from_args(*args),
            other => panic!("not customize: {other:?}"),
        }
    }

    #[test]
    fn outputs_and_sources_are_decided_once() {
        let s = settings(&[
            "in.img",
            "-o",
            "/nonexistent/out.img",
            "--password-stdin",
            "--ssh-pwauth",
            "unchanged",
            "--drop-in",
            "-vv",
        ])
        .unwrap();
        assert_eq!(s.password, Some(Source::Stdin));
        assert_eq!(s.ssh_pwauth, None);
        assert_eq!(s.target, DROP_IN);
        assert_eq!(s.verbosity, Verbosity::Debug);
        assert!(matches!(s.output, Output::NewFile { replace: false, .. }));
        assert_eq!(settings(&["in.img", "--dry-run", "-o", "x", "--password-stdin"]).unwrap().output, Output::DryRun);
    }

    #[test]
    fn bad_combinations_get_their_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.img");
        std::fs::write(&input, b"x").unwrap();
        let input = input.to_str().unwrap();
        let same = settings(&[input, "-o", input, "--password-stdin"]).unwrap_err();
        assert_eq!(code_of(&same), BAD_INPUT);
        let existing = dir.path().join("out.img");
        std::fs::write(&existing, b"x").unwrap();
        let exists = settings(&[input, "-o", existing.to_str().unwrap(), "--password-stdin"]).unwrap_err();
        assert_eq!(code_of(&exists), OUTPUT);
        assert!(settings(&[input, "-o", existing.to_str().unwrap(), "--password-stdin", "--force"]).is_ok());
        let lonely = settings(&[input, "--dry-run", "--password-stdin", "--random-password-file", "f"]).unwrap_err();
        assert_eq!(code_of(&lonely), USAGE);
        assert_eq!(
            code_of(&settings(&[input, "--dry-run", "--password-stdin", "--cloud-init-version", "x"]).unwrap_err()),
            USAGE
        );
    }

    #[test]
    fn glance_arguments_need_upload_and_agree_with_each_other() {
        let out = ["in.img", "-o", "/nonexistent/out.img", "--password-stdin"];
        let with = |extra: &[&str]| settings(&[&out[..], extra].concat());
        let lonely = with(&["--keep", "2"]).unwrap_err();
        assert_eq!(code_of(&lonely), USAGE);
        assert!(format!("{lonely:#}").contains("go with --upload"));
        assert_eq!(code_of(&with(&["--import-method", "put"]).unwrap_err()), USAGE);
        // --keep-failed keeps what --verify or --upload found failing, and needs one of them.
        let keep = with(&["--keep-failed"]).unwrap_err();
        assert_eq!((code_of(&keep), format!("{keep:#}").contains("--verify or --upload")), (USAGE, true), "{keep:#}");
        let verify = with(&["--verify", "--keep-failed"]).unwrap();
        assert!(verify.keep_failed_verification && verify.upload.is_none());
        assert!(!with(&["--upload", "--keep-failed"]).unwrap().keep_failed_verification);
        let private = with(&["--upload", "--member", "p1", "--visibility", "private"]).unwrap_err();
        assert!(format!("{private:#}").contains("--visibility shared"), "{private:#}");
        let both =
            with(&["--upload", "--property", "architecture=x86_64", "--no-property", "architecture"]).unwrap_err();
        assert_eq!(code_of(&both), USAGE);
        assert!(with(&["--upload", "--member", "p1", "--hide-previous", "--keep", "3", "--stores", "a,b"]).is_ok());
    }
}
