//! Exit statuses, documented in `--help` and README.md.

use std::fmt;

pub const SUCCESS: i32 = 0;
/// An unexpected failure (I/O error, bug).
pub const FAILURE: i32 = 1;
/// Bad command line (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// The input file was refused before opening it: not a disk image, truncated, a backing or external
/// data file, unknown qcow2 features, the output is the input.
pub const BAD_INPUT: i32 = 3;
/// The guest cannot be edited: no OS root, several roots, no cloud-init, unreadable or invalid
/// configuration, unsupported cloud-init version.
pub const BAD_GUEST: i32 = 4;
/// The checks found that the password login would not work (see the message); nothing was written.
pub const INEFFECTIVE: i32 = 5;
/// The libguestfs appliance failed to start or timed out.
pub const APPLIANCE: i32 = 6;
/// The output could not be written, or exists already (use --force), or its temporary file was replaced
/// or moved by someone else while it was written.
pub const OUTPUT: i32 = 7;
/// `inspect --require`: an image does not meet a required condition.
pub const UNMET: i32 = 8;
/// Upload: Keystone or Glance refused, the upload failed, or Glance's copy differs from the file; the
/// half-created image was deleted (unless --keep-failed).
pub const UPLOAD: i32 = 9;
/// `verify`: the instance booted and sshd answered, but the login was refused (a verdict on the image,
/// not a failure of the tool).
pub const REFUSED: i32 = 10;
/// `verify`: the login worked, but cloud-init ended `degraded` or in `error`, or a wrong password was
/// accepted too.
pub const UNHEALTHY: i32 = 11;
/// `verify`: no verdict: the instance did not boot, or cloud-init did not finish or sshd did not
/// answer within --timeout.
pub const NO_BOOT: i32 = 12;
/// Interrupted by a signal; temporary files were removed (128 + SIGINT, as shells report it).
pub const INTERRUPTED: i32 = 130;

/// Text for `--help`.
pub const HELP: &str = "\
Exit status:
  0    success (with --dry-run: the edit would be made)
  1    unexpected failure
  2    bad command line (also --in-place on a block device)
  3    input refused (not a disk image, truncated, backing/data file, output is the input)
  4    guest cannot be edited (no OS, several OS roots, no cloud-init, invalid cloud.cfg, an fstab
       naming another image's volume), or its analysis outlasted --timeout (the run is stopped)
  5    the password login would not work (overridden settings, sshd); nothing written
  6    the libguestfs appliance failed to start or timed out, or its cache cannot be trusted
  7    the output exists (use --force) or could not be written (also: its temporary file was
       replaced or moved by someone else while cloudimg wrote it)
  9    --upload: Keystone or Glance refused, the upload failed, or Glance's copy differs (the output
       is kept; the half-created Glance image was deleted unless --keep-failed)
  10   --verify: the booted output refused the login (nothing written under the output name;
       with --keep-failed the image is kept as NAME.failed.EXT)
  11   --verify: cloud-init ended degraded or in error, or a wrong password worked too
  12   --verify: the output did not boot or answer within the time limit
  130  interrupted; temporary files removed";

/// Text for `upload --help`.
pub const UPLOAD_HELP: &str = "\
Exit status:
  0    uploaded, and Glance's size, checksum and os_hash_value match the file (or, --if-changed,
       Glance already had it; or --dry-run)
  1    unexpected failure
  2    bad command line, no credentials, an auth type cloudimg does not speak, or an import method
       or store the cloud does not offer
  3    the file was refused (not a standalone qcow2 or raw image, or not the manifest's file)
  9    Keystone or Glance refused, the upload or import failed or was cut, or Glance's copy differs;
       the half-created image was deleted (unless --keep-failed); or, after a verified upload, an
       older image could not be hidden or deleted
  130  interrupted; the half-created image was deleted";

/// Text for `inspect --help`.
pub const INSPECT_HELP: &str = "\
Exit status:
  0    every image was inspected (and meets every --require)
  1    unexpected failure
  2    bad command line
  3    an image file was refused before opening (it is still reported, with the reason)
  4    an image's guest could not be read, or its analysis outlasted --timeout (the run is stopped)
  6    the libguestfs appliance failed to start or timed out, or its cache cannot be trusted
  8    an image does not meet a --require condition (the reasons are printed)
  130  interrupted";

/// Text for `verify --help`.
pub const VERIFY_HELP: &str = "\
Exit status:
  0    the login was accepted, a wrong password refused, and cloud-init is done (not degraded)
  1    unexpected failure
  2    bad command line
  3    the image file was refused before opening
  4    the guest cannot be booted: no kernel or no root in its fstab (no bootloader either), or its
       files cannot be read
  6    the libguestfs appliance (which reads the kernel, the logs) failed to start or timed out
  10   the instance booted and sshd answered, but the login was refused
  11   the login worked, but cloud-init ended degraded or in error, or a wrong password worked too
  12   no verdict: qemu failed, or the instance did not boot, finish cloud-init or answer on SSH
       within --timeout
  130  interrupted; qemu killed and temporary files removed";

/// An error with the exit status it should end the program with.
#[derive(Debug)]
pub struct Coded {
    pub code: i32,
    pub error: anyhow::Error,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}

/// Tags errors with an exit status: `result.map_err(with_code(BAD_INPUT))?`.
pub fn with_code(code: i32) -> impl FnOnce(anyhow::Error) -> anyhow::Error {
    move |error| {
        if error.chain().any(|e| e.downcast_ref::<Coded>().is_some()) {
            error
        } else {
            anyhow::Error::new(Coded { code, error })
        }
    }
}

/// The exit status for an error: the innermost tag, else [`FAILURE`].
pub fn code_of(error: &anyhow::Error) -> i32 {
    error.chain().find_map(|e| e.downcast_ref::<Coded>()).map_or(FAILURE, |c| c.code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_survive_added_context_and_the_first_tag_wins() {
        let err = with_code(BAD_INPUT)(anyhow::anyhow!("not an image"));
        let err = with_code(OUTPUT)(err);
        let err = Err::<(), _>(err).context("customizing x.img").unwrap_err();
        assert_eq!(code_of(&err), BAD_INPUT);
        assert_eq!(format!("{err:#}"), "customizing x.img: not an image");
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILURE);
    }
}
