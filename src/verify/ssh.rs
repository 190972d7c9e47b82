//! The SSH client (libssh2 through the `ssh2` crate): one way of authenticating per attempt, no
//! agent, no other key, every operation bounded. The host key is not checked: the instance was made
//! from the image a minute ago, on a loopback port of this host.
//!
//! Why `ssh2` rather than the pure-Rust `russh`: cloudimg is synchronous, and russh needs tokio and
//! pulls aws-lc-rs (a C/assembly crypto build through cmake or a prebuilt step) — 178 crates in a
//! minimal client's lock file against ssh2's 21 (libssh2 bundled, linked to the OpenSSL the system
//! already has, so the .deb gains only libssl3). Measured here (release builds, loaded host): the
//! minimal ssh2 client took 20 s of CPU and is 0.66 MiB; russh's dependencies alone took 231 s of
//! CPU (user + system), over eleven times as much.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::login::password::Secret;

/// How the client proves who it is.
pub enum Auth<'a> {
    Password(&'a Secret),
    Key(&'a Path),
}

/// What an attempt gave.
pub enum Attempt {
    /// Logged in; what the command printed on stdout (at most [`MAX_OUTPUT`] bytes).
    Ran(String),
    /// sshd answered and refused; why, with the methods it offers.
    Refused(String),
    /// No SSH conversation (nothing listening yet, connection reset, timeout): try again later.
    Unreachable(String),
}

/// Enough for `cloud-init status --long` and fifty log lines; a hostile guest cannot make us hold more.
pub const MAX_OUTPUT: u64 = 1 << 20;
/// The longest any one SSH operation may take, except the command itself.
const STEP: Duration = Duration::from_secs(30);

/// Logs in as `user` at `addr` and runs `command` (bounded by `command_limit`).
pub fn attempt(addr: SocketAddr, user: &str, auth: &Auth, command: &str, command_limit: Duration) -> Attempt {
    let session = match connect(addr) {
        Ok(s) => s,
        Err(e) => return Attempt::Unreachable(e),
    };
    // What sshd offers this user, asked before authenticating (the "none" method).
    let offered = session.auth_methods(user).unwrap_or("").to_string();
    let result = match auth {
        Auth::Password(secret) => {
            if !offered.split(',').any(|m| m == "password") {
                return Attempt::Refused(format!("sshd does not offer password authentication (it offers: {offered})"));
            }
            session.userauth_password(user, secret.expose())
        }
        Auth::Key(key) => session.userauth_pubkey_file(user, None, key, None),
    };
    match result {
        Ok(()) if session.authenticated() => {}
        Ok(()) => return Attempt::Refused(format!("not authenticated (sshd offers: {offered})")),
        Err(e) if is_auth_failure(&e) => {
            return Attempt::Refused(format!("authentication failed (sshd offers: {offered})"))
        }
        Err(e) => return Attempt::Unreachable(format!("authenticating: {e}")),
    }
    session.set_timeout(u32::try_from(command_limit.as_millis()).unwrap_or(u32::MAX));
    match run(&session, command) {
        Ok(out) => Attempt::Ran(out),
        Err(e) => Attempt::Unreachable(format!("running the check in the instance: {e}")),
    }
}

fn connect(addr: SocketAddr) -> Result<ssh2::Session, String> {
    let tcp = TcpStream::connect_timeout(&addr, STEP).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(STEP));
    let _ = tcp.set_write_timeout(Some(STEP));
    let mut session = ssh2::Session::new().map_err(|e| format!("starting an SSH session: {e}"))?;
    session.set_tcp_stream(tcp);
    session.set_timeout(u32::try_from(STEP.as_millis()).unwrap_or(u32::MAX));
    session.handshake().map_err(|e| format!("SSH handshake with {addr}: {e}"))?;
    Ok(session)
}

/// libssh2's "authentication failed" (LIBSSH2_ERROR_AUTHENTICATION_FAILED) and "public key
/// unverified" (the key was refused).
fn is_auth_failure(e: &ssh2::Error) -> bool {
    matches!(e.code(), ssh2::ErrorCode::Session(-18) | ssh2::ErrorCode::Session(-19))
}

fn run(session: &ssh2::Session, command: &str) -> Result<String, String> {
    let mut channel = session.channel_session().map_err(|e| e.to_string())?;
    channel.exec(command).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    (&mut channel).take(MAX_OUTPUT).read_to_end(&mut out).map_err(|e| e.to_string())?;
    let _ = channel.wait_close();
    Ok(String::from_utf8_lossy(&out).into_owned())
}
