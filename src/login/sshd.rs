//! What sshd will decide about password logins, given its configuration files as text.
//!
//! sshd keeps the first value it reads for an option; an `Include` line reads the matching files (in
//! sorted order) at that point; options after a `Match` line apply only to matching connections.
//! cloud-init's `ssh_pwauth` changes those files before sshd starts, in a way that depends on its
//! version, so the decision is made on the files as cloud-init will leave them.

use std::collections::{BTreeMap, HashMap, HashSet};

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
    first_value(files, "passwordauthentication")
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
    match first_value(files, "permitrootlogin") {
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

/// sshd stops with "Too many recursive configuration includes" when Includes nest deeper than this
/// (OpenSSH's servconf.c, `SERVCONF_MAX_DEPTH`).
const MAX_INCLUDE_DEPTH: usize = 16;

/// sshd reads a file again at every Include that names it. Past this many reads (or this many Include
/// arguments) a configuration is an Include bomb: cloudimg does not follow it, and sshd would take
/// exponential time over it.
pub const MAX_INCLUDE_READS: usize = 1000;

/// The option's first value and its `file:line`, reading as sshd does from its main file. Each file is
/// read once: a file read before gave no value then and gives none again (a file that includes itself
/// is refused by [`include_problem`]), which keeps a fan-out of Includes linear.
fn first_value(files: &Files, option: &str) -> Option<(String, String)> {
    let mut walk = Walk { files, seen: HashSet::new(), budget: MAX_INCLUDE_READS };
    walk.first_value(MAIN_CONFIG, option, 0)
}

struct Walk<'a> {
    files: &'a Files,
    /// Files already read.
    seen: HashSet<&'a str>,
    /// Include arguments and included files still allowed.
    budget: usize,
}

impl<'a> Walk<'a> {
    fn first_value(&mut self, path: &'a str, option: &str, depth: usize) -> Option<(String, String)> {
        let text = self.files.get(path)?;
        if depth > MAX_INCLUDE_DEPTH || !self.seen.insert(path) {
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
                        self.budget = self.budget.checked_sub(1)?;
                        for included in included(self.files, pattern) {
                            self.budget = self.budget.checked_sub(1)?;
                            if let Some(found) = self.first_value(included, option, depth + 1) {
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
}

/// The files one `Include` argument names, in the order sshd reads them (sorted, as its glob() gives
/// them; BTreeMap keys already are).
fn included<'a>(files: &'a Files, pattern: &str) -> impl Iterator<Item = &'a str> + 'a {
    let pattern = if pattern.starts_with('/') { pattern.to_string() } else { format!("/etc/ssh/{pattern}") };
    let glob = glob::Pattern::new(&pattern).ok();
    files.keys().map(String::as_str).filter(move |p| glob.as_ref().is_some_and(|g| g.matches(p)))
}

/// Why sshd would not start with these files, or why cloudimg will not work out what it does: an
/// Include that reads a file already being read (sshd then nests until it stops), Includes nested
/// deeper than sshd allows, or more reads than [`MAX_INCLUDE_READS`]. sshd reads every Include,
/// inside `Match` blocks too, so all of them count. The work is bounded by the number of files times
/// that cap, whatever the fan-out.
pub fn include_problem(files: &Files) -> Option<String> {
    let mut check = IncludeCheck { files, reads: HashMap::new(), reading: Vec::new(), arguments: MAX_INCLUDE_READS };
    check.reads(MAIN_CONFIG, 0).err()
}

struct IncludeCheck<'a> {
    files: &'a Files,
    /// For each file read to its end: how many reads sshd makes for it (itself and its Includes,
    /// again at each repeat) and how deep its Includes nest.
    reads: HashMap<&'a str, (usize, usize)>,
    /// The chain of files being read.
    reading: Vec<&'a str>,
    /// Include arguments still allowed.
    arguments: usize,
}

impl<'a> IncludeCheck<'a> {
    fn reads(&mut self, path: &'a str, depth: usize) -> Result<(usize, usize), String> {
        let Some(text) = self.files.get(path) else { return Ok((0, 0)) };
        if let Some(&(reads, height)) = self.reads.get(path) {
            if depth + height > MAX_INCLUDE_DEPTH {
                return Err(self.too_deep(path));
            }
            return Ok((reads, height));
        }
        self.reading.push(path);
        let (mut reads, mut height) = (1usize, 0);
        for (number, line) in text.lines().enumerate() {
            let Some((keyword, args)) = split_option(line) else { continue };
            if !keyword.eq_ignore_ascii_case("include") {
                continue;
            }
            for pattern in args.split_whitespace() {
                self.arguments = self.arguments.checked_sub(1).ok_or_else(|| self.too_many(path, number))?;
                for included in included(self.files, pattern) {
                    if self.reading.contains(&included) {
                        return Err(format!(
                            "{path} line {} includes {included}, which is already being read ({}): sshd nests such Includes until it stops with \"Too many recursive configuration includes\" and does not start; remove that Include",
                            number + 1,
                            self.reading.join(" -> ")
                        ));
                    }
                    if depth + 1 > MAX_INCLUDE_DEPTH {
                        return Err(self.too_deep(included));
                    }
                    let (more, below) = self.reads(included, depth + 1)?;
                    reads = reads.saturating_add(more);
                    height = height.max(below + 1);
                    if reads > MAX_INCLUDE_READS {
                        return Err(self.too_many(path, number));
                    }
                }
            }
        }
        self.reading.pop();
        self.reads.insert(path, (reads, height));
        Ok((reads, height))
    }

    fn too_deep(&self, path: &str) -> String {
        format!(
            "sshd's Includes nest deeper than its limit of {MAX_INCLUDE_DEPTH} ({} -> {path}): sshd stops with \"Too many recursive configuration includes\" and does not start",
            self.reading.join(" -> ")
        )
    }

    fn too_many(&self, path: &str, number: usize) -> String {
        format!(
            "sshd would read more than {MAX_INCLUDE_READS} files, since its Includes read the same files again and again (from {path} line {}); cloudimg does not follow such a configuration: remove the repeated Include lines",
            number + 1
        )
    }
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

    /// Drop-ins that each include the whole directory, none setting anything: without a record of the
    /// files read, the resolver followed 20^16 paths before reaching the main file's next line.
    fn fan_out_bomb(count: usize) -> Files {
        let mut f = files(&[(MAIN_CONFIG, "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication no\n")]);
        for i in 0..count {
            f.insert(format!("{DROP_IN_DIR}/{i:02}.conf"), "Include /etc/ssh/sshd_config.d/*.conf\n".into());
        }
        f
    }

    #[test]
    fn an_include_fan_out_bomb_is_resolved_in_linear_time_and_reported() {
        let bomb = fan_out_bomb(20);
        let d = password_authentication(&bomb);
        assert!(!d.password_authentication);
        assert_eq!(d.set_by.as_deref(), Some("/etc/ssh/sshd_config:2"));
        assert_eq!(permit_root_login(&bomb).set_by, None);
        assert!(enable_password_authentication(&bomb).contains_key(MAIN_CONFIG));
        let problem = include_problem(&bomb).expect("sshd itself refuses this");
        assert!(
            problem.contains("/etc/ssh/sshd_config.d/00.conf line 1 includes /etc/ssh/sshd_config.d/00.conf")
                && problem.contains("Too many recursive configuration includes"),
            "{problem}"
        );
    }

    #[test]
    fn includes_without_a_loop_are_refused_when_sshd_would_read_too_many_files_or_nest_too_deep() {
        // Level i's three files each include all of level i + 1's: 3^16 reads for sshd, no loop.
        let mut f = files(&[(MAIN_CONFIG, "Include sshd_config.d/l01-*.conf\n")]);
        for level in 1..=16 {
            for i in 0..3 {
                let next = if level < 16 {
                    format!("Include sshd_config.d/l{:02}-*.conf\n", level + 1)
                } else {
                    String::new()
                };
                f.insert(format!("{DROP_IN_DIR}/l{level:02}-{i}.conf"), next);
            }
        }
        assert!(include_problem(&f).unwrap().contains("more than 1000 files"), "{:?}", include_problem(&f));
        assert!(password_authentication(&f).password_authentication);

        let chain = |length: usize| -> Files {
            let mut f = files(&[(MAIN_CONFIG, "Include c01.conf\n")]);
            for i in 1..=length {
                f.insert(format!("/etc/ssh/c{i:02}.conf"), format!("Include c{:02}.conf\n", i + 1));
            }
            f
        };
        assert_eq!(include_problem(&chain(16)), None, "sshd reads 16 nested Includes");
        assert!(include_problem(&chain(17)).unwrap().contains("deeper than its limit of 16"));
    }

    #[test]
    fn the_same_drop_ins_included_twice_are_fine() {
        let f = files(&[
            (MAIN_CONFIG, "Include /etc/ssh/sshd_config.d/*.conf\nInclude sshd_config.d/*.conf\nUsePAM yes\n"),
            UBUNTU_60,
        ]);
        assert_eq!(include_problem(&f), None);
        assert!(!password_authentication(&f).password_authentication);
        assert_eq!(include_problem(&files(&[(MAIN_CONFIG, UBUNTU_MAIN)])), None);
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
