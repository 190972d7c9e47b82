//! Handing one of cloudimg's open files to a child process (qemu-img, qemu-nbd) by descriptor.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Lets a child about to be spawned inherit `file`, and returns the name under which the child opens
/// it: `/proc/self/fd/N`, which the kernel resolves to the file behind the descriptor itself, not by
/// looking a name up again. So qemu-img writes exactly the file cloudimg created, whatever has become
/// of its name. (The alternative, a path inside a private 0700 directory, would need that directory
/// on the destination's filesystem for the final rename, hence inside the destination's directory,
/// whose owner can rename the private directory away and put one of their own in its place.)
pub fn inherit(cmd: &mut Command, file: &File) -> PathBuf {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) is async-signal-safe, as pre_exec requires, and only changes the child's copy of
    // the descriptor. std keeps descriptors 0-2 open from the start, so `fd` is not one of the
    // standard descriptors it replaces in the child before this runs.
    unsafe {
        cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}
