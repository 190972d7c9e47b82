//! What sshd will decide about password logins, given its configuration files as text.
//!
//! sshd keeps the first value it reads for an option; an `Include` line reads the matching files (in
//! sorted order) at that point; options after a `Match` line apply only to matching connections.
//! cloud-init's `ssh_pwauth` changes those files before sshd starts, in a way that depends on its
//! version, so the decision is made on the files as cloud-init will leave them.

use std::collections::BTreeMap;

use crate::cloud_config::version::CloudInitVersion;

pub const MAIN_CONFIG: &str = "/etc/ssh/sshd_config";
pub const DROP_IN_DIR: &str = "/etc/ssh/sshd_config.d";
/// The drop-in cloud-init (22.4+) writes `ssh_pwauth` to.
pub const CLOUD_INIT_DROP_IN: &str = "/etc/ssh/sshd_config.d/50-cloud-init.conf";
const DROP_IN_INCLUDE: &str = "/etc/ssh/sshd_config.d/*.conf";

/// sshd's configuration files by absolute path.
pub type Files = BTreeMap<String, String>;

/// Where sshd's value for `PasswordAuthentication` comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub password_authentication: bool,
    /// `file:line` that set it, or `None` for sshd's built-in default (yes).
    pub set_by: Option<String>,
}

/// sshd's global `PasswordAuthentication`.
pub fn password_authentication(files: &Files) -> Decision {
    first_value(files, MAIN_CONFIG, "passwordauthentication", 0)
        .map(|(value, set_by)| Decision {
            password_authentication: value.eq_ignore_ascii_case("yes"),
            set_by: Some(set_by),
        })
        .unwrap_or(Decision { password_authentication: true, set_by: None })
}

/// sshd's global `PermitRootLogin` and where it is set (`None`: OpenSSH's default since 7.0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RootLogin {
    /// `yes`, `prohibit-password` (alias `without-password`), `forced-commands-only` or `no`.
    pub value: String,
    pub set_by: Option<String>,
}

impl RootLogin {
    pub fn allows_passwords(&self) -> bool {
        self.value.eq_ignore_ascii_case("yes")
    }
}

pub fn permit_root_login(files: &Files) -> RootLogin {
    match first_value(files, MAIN_CONFIG, "permitrootlogin", 0) {
        Some((value, set_by)) => RootLogin { value: value.to_ascii_lowercase(), set_by: Some(set_by) },
        None => RootLogin { value: "prohibit-password".into(), set_by: None },
    }
}

/// The edit that makes sshd accept passwords, the way it reads its files: the line that decides
/// `PasswordAuthentication` (the first one read) is switched to `yes` where it stands. Returns the
/// changed files; empty when sshd already accepts passwords.
pub fn enable_password_authentication(files: &Files) -> Files {
    let mut current = files.clone();
    let mut changed = Files::new();
    // Each round fixes the deciding line; a line can only be fixed once, so this ends.
    for _ in 0..files.values().map(|t| t.lines().count()).sum::<usize>() + 1 {
        let decision = password_authentication(&current);
        let Some((path, line)) = decision.set_by.as_deref().and_then(|s| s.rsplit_once(':')) else { break };
        if decision.password_authentication {
            break;
        }
        let (path, number) = (path.to_string(), line.parse::<usize>().unwrap_or(0));
        let text = &current[&path];
        let new_text: String = text
            .split_inclusive('\n')
            .enumerate()
            .map(|(i, l)| {
                if i + 1 == number {
                    let ending = if l.ends_with('\n') { "\n" } else { "" };
                    let indent = &l[..l.len() - l.trim_start().len()];
                    format!("{indent}PasswordAuthentication yes{ending}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        current.insert(path.clone(), new_text.clone());
        changed.insert(path, new_text);
    }
    changed
}

fn first_value(files: &Files, path: &str, option: &str, depth: usize) -> Option<(String, String)> {
    let text = files.get(path)?;
    if depth > 16 {
        return None;
    }
    for (number, line) in text.lines().enumerate() {
        let Some((keyword, args)) = split_option(line) else {
            continue;
        };
        match keyword.to_ascii_lowercase().as_str() {
            "match" => return None,
            "include" => {
                for pattern in args.split_whitespace() {
                    let pattern =
                        if pattern.starts_with('/') { pattern.to_string() } else { format!("/etc/ssh/{pattern}") };
                    let Ok(glob) = glob::Pattern::new(&pattern) else {
                        continue;
                    };
                    // BTreeMap keys are already in sorted order, as sshd's glob() gives them.
                    for included in files.keys().filter(|p| glob.matches(p)) {
                        if let Some(found) = first_value(files, included, option, depth + 1) {
                            return Some(found);
                        }
                    }
                }
            }
            k if k == option => {
                let value = args.split_whitespace().next().unwrap_or("").to_string();
                return Some((value, format!("{path}:{}", number + 1)));
            }
            _ => {}
        }
    }
    None
}

/// `Keyword args` or `Keyword=args`, skipping blanks and comments.
fn split_option(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    Some((keyword, rest.trim_start().trim_start_matches('=').trim_start()))
}

/// The files as cloud-init `version` leaves them after applying `ssh_pwauth` (`None`: unchanged).
pub fn after_cloud_init(files: &Files, ssh_pwauth: Option<bool>, version: CloudInitVersion) -> Files {
    let Some(on) = ssh_pwauth else {
        return files.clone();
    };
    let value = if on { "yes" } else { "no" };
    let mut out = files.clone();
    let includes_drop_ins = files.get(MAIN_CONFIG).is_some_and(|t| {
        t.lines().any(|l| matches!(split_option(l), Some((k, a)) if k.eq_ignore_ascii_case("include") && a.split_whitespace().any(|p| p == DROP_IN_INCLUDE)))
    });
    let target =
        if version >= CloudInitVersion::SSHD_DROP_IN && includes_drop_ins { CLOUD_INIT_DROP_IN } else { MAIN_CONFIG };
    let text = out.entry(target.to_string()).or_default();
    *text = set_option_everywhere(text, "PasswordAuthentication", value);
    out
}

/// cloud-init's `update_ssh_config_lines`: every line of the option gets the value (inside `Match`
/// blocks too); when there is none, a line is appended.
fn set_option_everywhere(text: &str, option: &str, value: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|line| match split_option(line) {
            Some((k, _)) if k.eq_ignore_ascii_case(option) => {
                found = true;
                format!("{option} {value}")
            }
            _ => line.to_string(),
        })
        .collect();
    if !found {
        out.push(format!("{option} {value}"));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> Files {
        entries.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect()
    }

    const UBUNTU_MAIN: &str =
        "Include /etc/ssh/sshd_config.d/*.conf\n#PasswordAuthentication yes\nKbdInteractiveAuthentication no\n";
    const UBUNTU_60: (&str, &str) = ("/etc/ssh/sshd_config.d/60-cloudimg-settings.conf", "PasswordAuthentication no\n");

    #[test]
    fn first_value_wins_and_drop_ins_come_first_at_the_include() {
        let f = files(&[(MAIN_CONFIG, UBUNTU_MAIN), UBUNTU_60]);
        let d = password_authentication(&f);
        assert!(!d.password_authentication);
        assert_eq!(d.set_by.as_deref(), Some("/etc/ssh/sshd_config.d/60-cloudimg-settings.conf:1"));
    }

    #[test]
    fn defaults_to_yes_and_ignores_match_blocks() {
        let f = files(&[(MAIN_CONFIG, "Match User x\n  PasswordAuthentication no\n")]);
        assert_eq!(password_authentication(&f), Decision { password_authentication: true, set_by: None });
        let f = files(&[(MAIN_CONFIG, "passwordauthentication=No\n")]);
        assert!(!password_authentication(&f).password_authentication);
    }

    #[test]
    fn new_cloud_init_wins_over_ubuntus_drop_in_but_old_cloud_init_does_not() {
        let f = files(&[(MAIN_CONFIG, UBUNTU_MAIN), UBUNTU_60]);
        let new = after_cloud_init(&f, Some(true), "22.4.2".parse().unwrap());
        assert_eq!(new.get(CLOUD_INIT_DROP_IN).map(String::as_str), Some("PasswordAuthentication yes\n"));
        assert!(password_authentication(&new).password_authentication);

        let old = after_cloud_init(&f, Some(true), "22.2".parse().unwrap());
        assert!(old.get(MAIN_CONFIG).unwrap().ends_with("PasswordAuthentication yes\n"));
        let d = password_authentication(&old);
        assert!(!d.password_authentication, "Ubuntu's 60- drop-in is read first");
    }

    #[test]
    fn enabling_passwords_switches_the_line_sshd_reads_first_and_nothing_else() {
        let f = files(&[
            (MAIN_CONFIG, "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication no\n"),
            ("/etc/ssh/sshd_config.d/10-a.conf", "# keep\n  passwordauthentication=no # x\n"),
        ]);
        let changed = enable_password_authentication(&f);
        assert_eq!(changed, files(&[("/etc/ssh/sshd_config.d/10-a.conf", "# keep\n  PasswordAuthentication yes\n")]));
        let mut after = f.clone();
        after.extend(changed);
        let d = password_authentication(&after);
        assert!(d.password_authentication);
        assert_eq!(d.set_by.as_deref(), Some("/etc/ssh/sshd_config.d/10-a.conf:2"));
        assert!(enable_password_authentication(&files(&[(MAIN_CONFIG, "UsePAM yes\n")])).is_empty());
    }

    #[test]
    fn root_login_defaults_to_prohibit_password() {
        assert!(!permit_root_login(&files(&[(MAIN_CONFIG, "#PermitRootLogin yes\n")])).allows_passwords());
        let f = files(&[
            (MAIN_CONFIG, "Include /etc/ssh/sshd_config.d/*.conf\n"),
            ("/etc/ssh/sshd_config.d/a.conf", "PermitRootLogin Yes\n"),
        ]);
        let r = permit_root_login(&f);
        assert!(r.allows_passwords());
        assert_eq!(r.set_by.as_deref(), Some("/etc/ssh/sshd_config.d/a.conf:1"));
    }

    #[test]
    fn without_an_include_cloud_init_edits_the_main_file_in_place() {
        let f = files(&[(MAIN_CONFIG, "PasswordAuthentication no\nUsePAM yes\n")]);
        let after = after_cloud_init(&f, Some(true), "23.1".parse().unwrap());
        assert_eq!(after[MAIN_CONFIG], "PasswordAuthentication yes\nUsePAM yes\n");
        assert_eq!(after_cloud_init(&f, None, "23.1".parse().unwrap()), f);
    }
}
