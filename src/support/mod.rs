//! What every step uses: exit codes, progress and timing reports, temporary files and cleanup on
//! signals, descriptors handed to child processes.
pub mod child_fd;
pub mod cleanup;
pub mod exit_codes;
pub mod identity;
pub mod os_release;
pub mod report;
