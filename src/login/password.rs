//! Where the password comes from, and the crypt(3) hash that is stored instead of it.
//!
//! The password is held in a [`Secret`], which never prints itself: no message, error, diff or
//! trace can show it by accident.

use std::fmt;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha_crypt::{PasswordHasher, PasswordVerifier, ShaCrypt};

use crate::image::output::Created;
use crate::support::exit_codes::{with_code, USAGE};

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
    /// Obtains the password. For a random one, the caller shows or saves it (customize's `reveal_random_password`).
    /// A password that cannot be read is a usage error (exit status 2).
    pub fn read(&self) -> Result<Secret> {
        self.obtain().map_err(with_code(USAGE))
    }

    fn obtain(&self) -> Result<Secret> {
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

/// Hashes in an image are verified only within these costs, so that a guest cannot make cloudimg
/// compute for hours or allocate without bound. glibc and libxcrypt default to 5 000 SHA-crypt rounds;
/// passlib (Ansible's `password_hash`) writes 656 000; glibc accepts up to 999 999 999.
pub const MAX_SHA_CRYPT_ROUNDS: u64 = 1_000_000;
/// yescrypt's memory, 128·N·r·p bytes: libxcrypt writes N = 4096, r = 32 (16 MiB) by default and at
/// most 1 GiB (`YESCRYPT_COST_FACTOR` 11), always with p = 1 and t = 0.
pub const MAX_YESCRYPT_MEMORY: u64 = 1 << 30;
/// No crypt(3) hash is longer (yescrypt's default is 73 characters, SHA-512's at most 123).
const MAX_HASH_LEN: usize = 256;

/// Whether `stored` (a hash or clear text from an existing configuration) stands for `secret`; an
/// error, saying why, for a hash whose cost parameters are beyond what cloudimg computes.
pub fn matches(secret: &Secret, stored: &str) -> Result<bool> {
    let crypt = ["$y$", "$5$", "$6$"].iter().any(|id| stored.starts_with(id));
    if !crypt {
        return Ok(stored == secret.expose());
    }
    if stored.len() > MAX_HASH_LEN {
        bail!("a {}-character hash, longer than any crypt(3) hash", stored.len());
    }
    let password = secret.expose().as_bytes();
    if stored.starts_with("$y$") {
        check_yescrypt_cost(stored)?;
        return Ok(yescrypt::PasswordHashRef::new(stored)
            .is_ok_and(|hash| yescrypt::Yescrypt::default().verify_password(password, hash).is_ok()));
    }
    let rounds = sha_crypt_rounds(stored);
    if rounds > MAX_SHA_CRYPT_ROUNDS {
        bail!("a SHA-crypt hash with {rounds} rounds, more than the {MAX_SHA_CRYPT_ROUNDS} cloudimg computes");
    }
    Ok(sha_crypt::PasswordHashRef::new(stored)
        .is_ok_and(|hash| ShaCrypt::default().verify_password(password, hash).is_ok()))
}

/// The `rounds=` of a `$5$`/`$6$` hash (5 000 when absent), saturating.
fn sha_crypt_rounds(stored: &str) -> u64 {
    let Some(digits) = stored[3..].strip_prefix("rounds=").and_then(|r| r.split('$').next()) else { return 5000 };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    digits.parse().unwrap_or(u64::MAX)
}

/// Refuses a `$y$` hash whose parameters (flavor, N, r, then optional p, t, g, NROM) ask for more
/// than libxcrypt ever writes. Decoded here, before the yescrypt crate allocates N·r blocks.
fn check_yescrypt_cost(stored: &str) -> Result<()> {
    let params = stored[3..].split('$').next().unwrap_or("");
    let cost = YescryptCost::decode(params).context("a yescrypt hash with unreadable parameters")?;
    let memory = 128u128 * (1u128 << cost.n_log2) * u128::from(cost.r) * u128::from(cost.p);
    if memory > u128::from(MAX_YESCRYPT_MEMORY) || cost.t > 0 {
        bail!(
            "a yescrypt hash asking for N = 2^{}, r = {}, p = {}, t = {} ({} MiB), beyond libxcrypt's largest ({} MiB, t = 0)",
            cost.n_log2,
            cost.r,
            cost.p,
            cost.t,
            memory >> 20,
            MAX_YESCRYPT_MEMORY >> 20
        );
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
struct YescryptCost {
    n_log2: u32,
    r: u32,
    p: u32,
    t: u32,
}

impl YescryptCost {
    /// yescrypt's variable-width base-64 integers (its reference implementation's `decode64_uint32`).
    fn decode(params: &str) -> Option<YescryptCost> {
        let mut bytes = params.bytes();
        let mut next = |min: u32| decode64_uint32(&mut bytes, min);
        let _flavor = next(0)?;
        let n_log2 = next(1)?;
        let r = next(1)?;
        let (mut p, mut t) = (1, 0);
        if let Some(have) = decode64_uint32(&mut bytes, 1) {
            if have & 1 != 0 {
                p = decode64_uint32(&mut bytes, 2)?;
            }
            if have & 2 != 0 {
                t = decode64_uint32(&mut bytes, 1)?;
            }
        }
        (n_log2 <= 63).then_some(YescryptCost { n_log2, r, p, t })
    }
}

fn decode64_uint32(bytes: &mut impl Iterator<Item = u8>, min: u32) -> Option<u32> {
    const ITOA64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut digit = || {
        let byte = bytes.next()?;
        ITOA64.iter().position(|&c| c == byte).map(|d| d as u32)
    };
    let first = digit()?;
    let (mut start, mut end, mut chars, mut bits) = (0u32, 47u32, 1u32, 0u32);
    let mut value = min;
    while first > end {
        value = value.checked_add((end + 1 - start).checked_shl(bits)?)?;
        start = end + 1;
        end = start + (62 - end) / 2;
        chars += 1;
        bits += 6;
    }
    value = value.checked_add((first - start).checked_shl(bits)?)?;
    while chars > 1 {
        chars -= 1;
        bits -= 6;
        value = value.checked_add(digit()?.checked_shl(bits)?)?;
    }
    Some(value)
}

/// Keeps secrets (the password, `OS_PASSWORD` and the Keystone token, the guests' hashes) out of core
/// dumps and away from other processes of the same user, for commands that hold them:
/// - `RLIMIT_CORE` 0: no core file. Children inherit it: qemu, qemu-img and qemu-nbd hold guest data
///   (the hash written, the image's own /etc/shadow), so they dump no core either.
/// - `PR_SET_DUMPABLE` 0: no core even where the kernel hands cores to a helper (`core_pattern`
///   starting with `|`, which ignores the limit), and `/proc/PID/{mem,environ}` become root's alone
///   (ptrace refused). execve resets it, so the programs libguestfs and cloudimg start keep their
///   usual state; libguestfs's recovery process (forked, not exec'd) keeps it, and only signals qemu.
///   A process may still read its own `/proc/self`, and nothing else reads cloudimg's.
pub fn keep_out_of_core_dumps() {
    let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit and prctl with valid arguments; they only change this process's attributes.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
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
        assert!(matches(&secret, &h).unwrap());
        assert!(!matches(&Secret::new("wrong".into()).unwrap(), &h).unwrap());
        assert_ne!(hash(&secret), h, "salts must differ");
    }

    #[test]
    fn yescrypt_hashes_use_libxcrypts_defaults_and_verify() {
        let secret = Secret::new("correct horse".into()).unwrap();
        let h = hash_yescrypt(&secret);
        assert!(h.starts_with("$y$j9T$"), "{h}");
        assert!(matches(&secret, &h).unwrap());
        assert!(!matches(&Secret::new("wrong".into()).unwrap(), &h).unwrap());
    }

    /// A real `$y$` hash with its parameters replaced by these, as yescrypt encodes them.
    fn yescrypt_hash(n: u64, r: u32, p: u32, t: u32) -> String {
        let params = yescrypt::Params::new_with_all_params(yescrypt::Mode::default(), n, r, p, t, 0).unwrap();
        let real = hash_yescrypt(&Secret::new("another password".into()).unwrap());
        real.replacen("$y$j9T$", &format!("$y${params}$"), 1)
    }

    #[test]
    fn yescrypt_parameters_are_decoded_as_the_crate_encodes_them() {
        for (n_log2, r, p, t) in [(12, 32, 1, 0), (18, 32, 1, 0), (10, 8, 1, 0), (30, 1000, 1, 0), (12, 32, 3, 2)] {
            let hash = yescrypt_hash(1 << n_log2, r, p, t);
            let params = hash[3..].split('$').next().unwrap();
            assert_eq!(YescryptCost::decode(params), Some(YescryptCost { n_log2, r, p, t }), "{hash}");
        }
        assert_eq!(YescryptCost::decode("j9T"), Some(YescryptCost { n_log2: 12, r: 32, p: 1, t: 0 }));
        assert_eq!(YescryptCost::decode("j9"), None);
        assert_eq!(YescryptCost::decode("j9~"), None);
    }

    #[test]
    fn hashes_asking_for_more_than_libxcrypt_writes_are_refused_before_any_work() {
        let secret = Secret::new("correct horse".into()).unwrap();
        // 128 · 2^30 · 32 bytes (4 TiB; 64 GiB for its pre-hash): the allocation used to abort the process.
        let err = format!("{:#}", matches(&secret, &yescrypt_hash(1 << 30, 32, 1, 0)).unwrap_err());
        assert!(err.contains("N = 2^30, r = 32") && err.contains("beyond libxcrypt's largest (1024 MiB"), "{err}");
        let err = format!("{:#}", matches(&secret, &yescrypt_hash(1 << 12, 32, 1, 1_000_000)).unwrap_err());
        assert!(err.contains("t = 1000000"), "{err}");
        assert!(matches(&secret, &yescrypt_hash(1 << 19, 32, 1, 0)).is_err(), "2 GiB: beyond cost factor 11");
        // glibc's maximum rounds: hours of work.
        let glibc_max = hash(&secret).replacen("$6$", "$6$rounds=999999999$", 1);
        let err = format!("{:#}", matches(&secret, &glibc_max).unwrap_err());
        assert!(err.contains("999999999 rounds, more than the 1000000"), "{err}");
        assert!(matches(&secret, "$5$rounds=99999999999999999999999$s$h").is_err(), "saturates");
        assert!(matches(&secret, &format!("$6${}", "a".repeat(300))).is_err(), "no hash is that long");
        // What distributions and tools write is verified (and here does not match).
        assert!(!matches(&secret, &yescrypt_hash(1 << 12, 32, 1, 0)).unwrap());
        let passlib = hash(&Secret::new("another password".into()).unwrap()).replacen("$6$", "$6$rounds=656000$", 1);
        assert!(!matches(&secret, &passlib).unwrap(), "passlib's default rounds");
    }

    #[test]
    fn the_process_can_dump_no_core() {
        keep_out_of_core_dumps();
        let mut limit = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
        // SAFETY: getrlimit and prctl read this process's attributes into valid memory.
        let dumpable = unsafe {
            libc::getrlimit(libc::RLIMIT_CORE, &mut limit);
            libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0)
        };
        assert_eq!((limit.rlim_cur, limit.rlim_max, dumpable), (0, 0, 0));
    }

    #[test]
    fn clear_text_matches_only_itself() {
        let secret = Secret::new("pw".into()).unwrap();
        assert!(matches(&secret, "pw").unwrap());
        assert!(!matches(&secret, "pw2").unwrap());
        assert!(!matches(&secret, "$6$broken").unwrap());
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
