//! Setting a password directly in `/etc/shadow`, for images where cloud-init cannot do it. Pure
//! functions over the file's text; the caller reads and writes the file.

use anyhow::{bail, Result};

use crate::cloud_config::deprecations::Account;
use crate::support::os_release;

pub const SHADOW: &str = "/etc/shadow";
pub const LOGIN_DEFS: &str = "/etc/login.defs";

/// The hash algorithm written to `/etc/shadow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    Yescrypt,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Yescrypt => "yescrypt",
            Algorithm::Sha512 => "SHA-512",
        }
    }
}

/// The distribution's default algorithm, when its libc can check it: yescrypt on Debian 11+ and
/// Ubuntu 20.04+ (libxcrypt), or wherever `login.defs` asks for it; SHA-512 everywhere else, which
/// every glibc since 2.7 reads.
pub fn default_algorithm(os_release: &str, login_defs: Option<&str>) -> (Algorithm, String) {
    let id = os_release::field(os_release, "ID").unwrap_or_default();
    let version = os_release::field(os_release, "VERSION_ID").unwrap_or_default();
    let at_least = |wanted: (u32, u32)| {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= wanted
    };
    if (id == "debian" && at_least((11, 0))) || (id == "ubuntu" && at_least((20, 4))) {
        return (Algorithm::Yescrypt, format!("{id} {version} uses yescrypt"));
    }
    let method = login_defs.and_then(|text| {
        text.lines().find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("ENCRYPT_METHOD")).then(|| words.next().unwrap_or("").to_ascii_uppercase())
        })
    });
    match method.as_deref() {
        Some("YESCRYPT") => (Algorithm::Yescrypt, "login.defs sets ENCRYPT_METHOD YESCRYPT".into()),
        _ => (
            Algorithm::Sha512,
            format!(
                "{} has no yescrypt default; SHA-512 works with every glibc",
                if id.is_empty() { "the image" } else { &id }
            ),
        ),
    }
}

/// What `/etc/shadow` says about one user's password, without the hash itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No line for the user.
    Missing,
    /// Empty field: login without a password (where PAM allows it).
    Empty,
    /// `!` or `*` alone: no password.
    NoPassword,
    /// A hash behind `!`: a password exists but the account is locked.
    Locked,
    /// A usable hash, named by its crypt prefix (`yescrypt`, `sha512`, ...).
    Hash(String),
}

/// The password field of `user`'s line (`None` without a line).
pub fn hash_of<'a>(shadow: &'a str, user: &str) -> Option<&'a str> {
    shadow.lines().find_map(|l| {
        let mut fields = l.split(':');
        (fields.next() == Some(user)).then(|| fields.next().unwrap_or(""))
    })
}

pub fn state(shadow: &str, user: &str) -> State {
    let Some(hash) = hash_of(shadow, user) else {
        return State::Missing;
    };
    match hash {
        "" => State::Empty,
        h if h.starts_with('!') && h.trim_start_matches('!').starts_with('$') => State::Locked,
        h if h.starts_with('!') || h.starts_with('*') => State::NoPassword,
        h => State::Hash(algorithm_name(h).to_string()),
    }
}

/// How cloud-init's user module will find `user`: missing (it creates it), or existing with or
/// without a password it can unlock. Without `/etc/shadow` nothing is known: an existing password is
/// assumed, which claims no warning cloud-init might not log.
pub fn account(shadow: Option<&str>, user: &str) -> Account {
    match shadow.map(|text| state(text, user)) {
        Some(State::Missing) => Account::New,
        Some(State::Empty | State::NoPassword) => Account::WithoutPassword,
        None | Some(State::Locked | State::Hash(_)) => Account::WithPassword,
    }
}

fn algorithm_name(hash: &str) -> &'static str {
    match hash.split('$').nth(1) {
        Some("y") => "yescrypt",
        Some("6") => "sha512",
        Some("5") => "sha256",
        Some("2a" | "2b" | "2y") => "bcrypt",
        Some("1") => "md5",
        Some("gy") => "gost-yescrypt",
        _ if hash.len() == 13 => "des",
        _ => "unknown",
    }
}

/// The new `/etc/shadow` text with `user`'s hash set: the account unlocked, the date of the last
/// change set to `today` (days since 1970) or to 0 with `expire` (change at next login), and an
/// account expiry date already past cleared. Every other line and field is kept. Returns the notes
/// worth telling the user.
pub fn set_password(shadow: &str, user: &str, hash: &str, today: u64, expire: bool) -> Result<(String, Vec<String>)> {
    if hash.contains(':') || hash.contains('\n') {
        bail!("a password hash cannot contain `:` or a line break");
    }
    let mut notes = Vec::new();
    let mut found = false;
    let mut out = String::with_capacity(shadow.len() + hash.len());
    for line in shadow.split_inclusive('\n') {
        let (body, ending) = line.strip_suffix('\n').map_or((line, ""), |b| (b, "\n"));
        let mut fields: Vec<String> = body.split(':').map(str::to_string).collect();
        if fields[0] != user || found {
            out.push_str(line);
            continue;
        }
        found = true;
        if fields.len() < 9 {
            fields.resize(9, String::new());
        }
        if matches!(state(body, user), State::Locked) {
            notes.push(format!("the account `{user}` was locked; it is unlocked"));
        }
        fields[1] = hash.to_string();
        fields[2] = if expire { "0".into() } else { today.to_string() };
        if fields[7].parse::<u64>().is_ok_and(|day| day <= today) {
            notes.push(format!("the account `{user}` had expired (day {}); its expiry date is cleared", fields[7]));
            fields[7].clear();
        }
        out.push_str(&fields.join(":"));
        out.push_str(ending);
    }
    if !found {
        bail!("`{user}` has no line in the image's {SHADOW}");
    }
    Ok((out, notes))
}

/// Days since 1970-01-01, as `/etc/shadow` counts them.
pub fn days_since_epoch(now: std::time::SystemTime) -> u64 {
    now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHADOW_TEXT: &str =
        "root:*:19000:0:99999:7:::\ndebian:!$6$old$x:19000:0:99999:7::19001:\nops:!:19000:0:99999:7:::\n";

    #[test]
    fn the_users_line_changes_and_no_other_byte() {
        let (new, notes) = set_password(SHADOW_TEXT, "debian", "$y$j9T$s$h", 20_000, false).unwrap();
        assert_eq!(new, "root:*:19000:0:99999:7:::\ndebian:$y$j9T$s$h:20000:0:99999:7:::\nops:!:19000:0:99999:7:::\n");
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(state(&new, "debian"), State::Hash("yescrypt".into()));
        let (expired, _) = set_password(SHADOW_TEXT, "ops", "$6$s$h", 20_000, true).unwrap();
        assert!(expired.ends_with("ops:$6$s$h:0:0:99999:7:::\n"), "{expired}");
    }

    #[test]
    fn missing_users_and_bad_hashes_are_refused() {
        assert!(set_password(SHADOW_TEXT, "nobody", "$6$s$h", 1, false).is_err());
        assert!(set_password(SHADOW_TEXT, "ops", "a:b", 1, false).is_err());
    }

    #[test]
    fn short_lines_and_missing_final_newline_are_handled() {
        let (new, _) = set_password("a:x", "a", "$6$s$h", 5, false).unwrap();
        assert_eq!(new, "a:$6$s$h:5::::::");
    }

    #[test]
    fn states_never_need_the_hash() {
        assert_eq!(state(SHADOW_TEXT, "root"), State::NoPassword);
        assert_eq!(state(SHADOW_TEXT, "debian"), State::Locked);
        assert_eq!(state(SHADOW_TEXT, "ops"), State::NoPassword);
        assert_eq!(state(SHADOW_TEXT, "x"), State::Missing);
        assert_eq!(state("u::1::::::\n", "u"), State::Empty);
    }

    #[test]
    fn algorithm_follows_the_distribution() {
        let release = |id: &str, v: &str| format!("ID={id}\nVERSION_ID=\"{v}\"\n");
        assert_eq!(default_algorithm(&release("debian", "12"), None).0, Algorithm::Yescrypt);
        assert_eq!(default_algorithm(&release("debian", "10"), None).0, Algorithm::Sha512);
        assert_eq!(default_algorithm(&release("ubuntu", "20.04"), None).0, Algorithm::Yescrypt);
        assert_eq!(default_algorithm(&release("ubuntu", "18.04"), None).0, Algorithm::Sha512);
        assert_eq!(default_algorithm(&release("rocky", "9.4"), Some("ENCRYPT_METHOD SHA512\n")).0, Algorithm::Sha512);
        assert_eq!(
            default_algorithm(&release("fedora", "40"), Some("ENCRYPT_METHOD YESCRYPT\n")).0,
            Algorithm::Yescrypt
        );
    }
}
