//! Where the password comes from, and the crypt(3) hash that is stored instead of it.
//!
//! The password is held in a [`Secret`], which never prints itself: no message, error, diff or
//! trace can show it by accident.

use std::fmt;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};

use crate::output::Created;

/// A password that cannot be displayed or debug-printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(password: String) -> Result<Self> {
        if password.is_empty() {
            bail!("the password is empty");
        }
        Ok(Secret(password))
    }

    /// The clear text, for hashing or for `--plaintext`; the only way out.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the password comes from, as parsed from the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// The first line of a file.
    File(PathBuf),
    /// The first line of standard input (read without echo from a terminal).
    Stdin,
    /// A generated password, shown once on stderr or saved to a new file with mode 0600.
    Random { save_to: Option<PathBuf> },
    /// Given on the command line, where other users can see it (`ps`).
    Visible(Secret),
}

impl Source {
    /// Obtains the password. For a random one, the caller shows or saves it with [`reveal_random`].
    pub fn read(&self) -> Result<Secret> {
        match self {
            Source::File(path) => {
                let file =
                    std::fs::File::open(path).with_context(|| format!("opening password file {}", path.display()))?;
                first_line(std::io::BufReader::new(file))
                    .with_context(|| format!("reading password file {}", path.display()))
            }
            Source::Stdin if std::io::stdin().is_terminal() => Secret::new(
                rpassword::prompt_password("Password for the image: ")
                    .context("reading the password from the terminal")?,
            ),
            Source::Stdin => first_line(std::io::stdin().lock()).context("reading the password from standard input"),
            Source::Random { .. } => Ok(random_password()),
            Source::Visible(secret) => Ok(secret.clone()),
        }
    }
}

fn first_line(mut reader: impl BufRead) -> Result<Secret> {
    let mut line = String::new();
    reader.read_line(&mut line).context("the password must be UTF-8 text")?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    Secret::new(line.to_string())
}

/// 20 characters from an alphabet without look-alikes (about 116 bits).
fn random_password() -> Secret {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::with_capacity(20);
    while out.len() < 20 {
        let mut byte = [0u8; 1];
        getrandom::fill(&mut byte).expect("the system's random source works");
        // Rejection sampling keeps every character equally likely.
        if usize::from(byte[0]) < 256 / ALPHABET.len() * ALPHABET.len() {
            out.push(char::from(ALPHABET[usize::from(byte[0]) % ALPHABET.len()]));
        }
    }
    Secret(out)
}

/// Saves a generated password to a new file with mode 0600, refusing to replace an existing file or
/// to follow a symlink; written and flushed through the descriptor it was created with. Returns the
/// file, which the caller removes again if no image gets the password.
pub fn save_random(secret: &Secret, path: &Path) -> Result<Created> {
    let created = Created::new(path, 0o600).context("saving the generated password")?;
    let mut file = created.file();
    writeln!(file, "{}", secret.expose())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing password file {}", path.display()))?;
    Ok(created)
}

/// A SHA-512 crypt hash (`$6$…`) with a fresh 16-character salt.
///
/// glibc and libxcrypt take at most 16 salt characters; 12 random bytes encode to exactly 16.
pub fn hash(secret: &Secret) -> String {
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).expect("the system's random source works");
    ShaCrypt::SHA512
        .hash_password_with_salt(secret.expose().as_bytes(), &salt)
        .expect("SHA-512 crypt accepts any password and a 12-byte salt")
        .to_string()
        // 5000 rounds is crypt's default, which the usual form (mkpasswd, openssl passwd) leaves out.
        .replacen("$rounds=5000$", "$", 1)
}

/// A yescrypt hash (`$y$j9T$…`) with libxcrypt's default parameters and a fresh 16-byte salt, as
/// `passwd` writes on Debian 11+ and Ubuntu 20.04+.
pub fn hash_yescrypt(secret: &Secret) -> String {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the system's random source works");
    yescrypt::Yescrypt::default()
        .hash_password_with_salt(secret.expose().as_bytes(), &salt)
        .expect("yescrypt accepts any password and a 16-byte salt")
        .to_string()
}

/// Whether `stored` (a hash or clear text from an existing configuration) stands for `secret`.
pub fn matches(secret: &Secret, stored: &str) -> bool {
    if stored.starts_with("$y$") {
        return yescrypt::PasswordHashRef::new(stored)
            .is_ok_and(|hash| yescrypt::Yescrypt::default().verify_password(secret.expose().as_bytes(), hash).is_ok());
    }
    if !stored.starts_with("$5$") && !stored.starts_with("$6$") {
        return stored == secret.expose();
    }
    sha_crypt::PasswordHashRef::new(stored)
        .is_ok_and(|hash| ShaCrypt::default().verify_password(secret.expose().as_bytes(), hash).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha512_with_a_16_character_salt_and_verify() {
        let secret = Secret::new("correct horse".into()).unwrap();
        let h = hash(&secret);
        let fields: Vec<&str> = h.split('$').collect();
        assert_eq!(fields.len(), 4, "{h}");
        assert_eq!(fields[1], "6");
        let salt = fields.iter().rev().nth(1).unwrap();
        assert_eq!(salt.len(), 16, "{h}");
        assert!(matches(&secret, &h));
        assert!(!matches(&Secret::new("wrong".into()).unwrap(), &h));
        assert_ne!(hash(&secret), h, "salts must differ");
    }

    #[test]
    fn yescrypt_hashes_use_libxcrypts_defaults_and_verify() {
        let secret = Secret::new("correct horse".into()).unwrap();
        let h = hash_yescrypt(&secret);
        assert!(h.starts_with("$y$j9T$"), "{h}");
        assert!(matches(&secret, &h));
        assert!(!matches(&Secret::new("wrong".into()).unwrap(), &h));
    }

    #[test]
    fn clear_text_matches_only_itself() {
        let secret = Secret::new("pw".into()).unwrap();
        assert!(matches(&secret, "pw"));
        assert!(!matches(&secret, "pw2"));
        assert!(!matches(&secret, "$6$broken"));
    }

    #[test]
    fn first_line_strips_only_the_line_ending() {
        let read = |s: &str| first_line(s.as_bytes()).map(|p| p.expose().to_string());
        assert_eq!(read(" a b \r\nsecond\n").unwrap(), " a b ");
        assert_eq!(read("x").unwrap(), "x");
        assert!(read("\nx\n").is_err());
        assert!(read("").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2".into()).unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{:?}", Source::Visible(secret)).contains("hunter2"));
    }

    #[test]
    fn random_passwords_are_long_and_differ() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.expose().len(), 20);
        assert_ne!(a, b);
    }

    #[test]
    fn random_password_files_are_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        save_random(&random_password(), &path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(save_random(&random_password(), &path).is_err());
    }
}
