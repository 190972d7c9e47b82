//! What a verification found, read from what the instance answered, and how it is told. Pure.

use serde::Serialize;

use crate::appliance::accel::Accel;
use crate::support::exit_codes;

/// What `cloud-init status --long` said, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloudInit {
    /// `done`, `error`, `running`, `disabled`, ...
    pub status: String,
    /// `degraded done` and the like (cloud-init 23.4+), else the status.
    pub extended_status: String,
    /// The command's exit status: 0 done, 1 error, 2 degraded (23.4+).
    pub exit: Option<i32>,
    pub errors: Vec<String>,
    pub recoverable_errors: Vec<String>,
}

impl CloudInit {
    /// `done`, and not degraded where cloud-init can say so.
    pub fn healthy(&self) -> bool {
        self.status == "done" && !self.extended_status.contains("degraded") && self.exit.unwrap_or(0) == 0
    }
}

/// The marker after which the remote command prints `cloud-init status`'s exit status.
pub const EXIT_MARKER: &str = "cloudimg-status-exit=";
/// The marker before the lines cloud-init logged at WARNING or DEPRECATED level.
pub const LOGGED_MARKER: &str = "cloudimg-logged:";

/// The command run in the instance: who we are, cloud-init's status (waiting for it to finish), and
/// the warnings in its log (readable by the `adm` group, which cloud-init's default users are in;
/// else through passwordless sudo; else nothing).
pub const REMOTE_COMMAND: &str = "id -un; cloud-init status --long --wait; echo \"cloudimg-status-exit=$?\"; \
     echo cloudimg-logged:; { grep -E 'WARNING|DEPRECATED' /var/log/cloud-init.log 2>/dev/null || \
     sudo -n grep -E 'WARNING|DEPRECATED' /var/log/cloud-init.log 2>/dev/null; } | tail -n 50; true";

/// What the remote command printed: the user, cloud-init's status, and the warnings it logged.
pub fn parse_answer(stdout: &str) -> (Option<String>, CloudInit, Vec<String>) {
    let user = stdout.lines().next().map(|l| l.trim().to_string()).filter(|u| !u.is_empty());
    let (status_part, logged) = stdout.split_once(LOGGED_MARKER).unwrap_or((stdout, ""));
    let logged = logged.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    (user, parse_status(status_part), logged)
}

/// Parses `cloud-init status --long` (YAML-like: `key: value` lines, lists under `errors:` and
/// `recoverable_errors:` indented below them or inline as `[]`).
pub fn parse_status(text: &str) -> CloudInit {
    let mut status = String::new();
    let mut extended = String::new();
    let mut exit = None;
    let (mut errors, mut recoverable) = (Vec::new(), Vec::new());
    let mut section: Option<&mut Vec<String>> = None;
    for line in text.lines() {
        if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
            exit = code.trim().parse().ok();
            section = None;
            continue;
        }
        let indented = line.starts_with([' ', '\t']) || line.trim_start().starts_with("- ");
        if indented {
            if let Some(list) = section.as_mut() {
                let item = line.trim().trim_start_matches("- ").trim();
                if !item.is_empty() {
                    list.push(item.to_string());
                }
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        section = None;
        match key.trim() {
            "status" => status = value.to_string(),
            "extended_status" => extended = value.to_string(),
            "errors" if value.is_empty() => section = Some(&mut errors),
            "recoverable_errors" if value.is_empty() || value == "{}" => {
                section = (value.is_empty()).then_some(&mut recoverable)
            }
            "errors" if value != "[]" => errors.push(value.to_string()),
            // Inside recoverable_errors, levels are keys (`WARNING:`) with items below them.
            level @ ("WARNING" | "DEPRECATED" | "ERROR" | "CRITICAL") if value.is_empty() => {
                recoverable.push(format!("{level}:"));
                section = Some(&mut recoverable);
            }
            _ => {}
        }
    }
    let extended_status = if extended.is_empty() { status.clone() } else { extended };
    CloudInit { status, extended_status, exit, errors, recoverable_errors: recoverable }
}

/// How the instance was booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootPath {
    /// The image's own bootloader, started by SeaBIOS.
    Bios,
    /// The image's own bootloader, started by OVMF.
    Uefi,
    /// No bootloader in the image: its kernel and initrd, with the root from its fstab.
    DirectKernel,
}

impl BootPath {
    pub fn describe(self) -> &'static str {
        match self {
            BootPath::Bios => "the image's bootloader through SeaBIOS (BIOS)",
            BootPath::Uefi => "the image's bootloader through OVMF (UEFI)",
            BootPath::DirectKernel => "the image's kernel and initrd directly (it has no bootloader)",
        }
    }
}

/// How the login went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result", content = "detail")]
pub enum Login {
    Accepted,
    /// sshd answered and said no; why, with the methods it offered.
    Refused(String),
    /// No verdict: the instance did not get that far.
    NotReached(String),
}

/// Everything a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub image: String,
    pub user: String,
    /// `password` or `key`.
    pub auth: &'static str,
    pub boot_path: BootPath,
    pub accel: Accel,
    pub login: Login,
    /// What `id -un` answered.
    pub logged_in_as: Option<String>,
    pub cloud_init: Option<CloudInit>,
    /// WARNING and DEPRECATED lines from cloud-init's log (as far as the user could read it).
    pub cloud_init_logged: Vec<String>,
    /// Whether a wrong password was refused (password logins only).
    pub wrong_password_refused: Option<bool>,
    /// With a password and a key: whether the key was accepted too.
    pub key_accepted: Option<bool>,
    /// From qemu's start until cloud-init reported that it had finished.
    pub boot_seconds: Option<f64>,
    pub total_seconds: f64,
    /// Why it failed, in one line.
    pub failure: Option<String>,
    pub console_tail: Vec<String>,
    pub cloud_init_log_tail: Vec<String>,
    pub sshd_log_tail: Vec<String>,
}

impl Verdict {
    /// The one-line reason for failure, if any, judged from the facts.
    pub fn judge(&self) -> Option<String> {
        match &self.login {
            Login::NotReached(why) => return Some(why.clone()),
            Login::Refused(why) => return Some(format!("the login as {} was refused: {why}", self.user)),
            Login::Accepted => {}
        }
        if self.logged_in_as.as_deref() != Some(self.user.as_str()) {
            return Some(format!(
                "logged in, but `id -un` answered {:?}, not {}",
                self.logged_in_as.as_deref().unwrap_or(""),
                self.user
            ));
        }
        if self.key_accepted == Some(false) {
            return Some(format!("the login as {} with the key was refused (the password worked)", self.user));
        }
        if self.wrong_password_refused == Some(false) {
            return Some(format!("a wrong password was accepted for {} too", self.user));
        }
        match &self.cloud_init {
            None => Some("`cloud-init status` did not answer".into()),
            Some(ci) if !ci.healthy() => Some(format!(
                "cloud-init ended `{}` (exit {}){}",
                ci.extended_status,
                ci.exit.map_or("?".into(), |e| e.to_string()),
                ci.errors.first().map(|e| format!(": {e}")).unwrap_or_default()
            )),
            Some(_) => None,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match (&self.login, &self.failure) {
            (_, None) => exit_codes::SUCCESS,
            (Login::Refused(_), _) => exit_codes::REFUSED,
            (Login::Accepted, _) if self.key_accepted == Some(false) => exit_codes::REFUSED,
            (Login::NotReached(_), _) => exit_codes::NO_BOOT,
            (Login::Accepted, Some(_)) => exit_codes::UNHEALTHY,
        }
    }
}

/// The verdict for a terminal.
pub fn render(v: &Verdict) -> String {
    let mut out = format!("Booted {} with {}\n", v.image, v.boot_path.describe());
    let accel = if v.accel == Accel::Kvm { "KVM" } else { "TCG" };
    match v.boot_seconds {
        Some(s) => out += &format!("cloud-init finished {s:.0} s after qemu started ({accel})\n"),
        None => out += &format!("accelerator: {accel}\n"),
    }
    out += &match &v.login {
        Login::Accepted => format!("login as {} with the {}: accepted\n", v.user, v.auth),
        Login::Refused(why) => format!("login as {} with the {}: REFUSED ({why})\n", v.user, v.auth),
        Login::NotReached(why) => format!("login as {}: not attempted ({why})\n", v.user),
    };
    if let Some(accepted) = v.key_accepted {
        out += if accepted { "login with the key: accepted\n" } else { "login with the key: REFUSED\n" };
    }
    if let Some(refused) = v.wrong_password_refused {
        out += if refused { "a wrong password: refused\n" } else { "a wrong password: ACCEPTED\n" };
    }
    if let Some(ci) = &v.cloud_init {
        out +=
            &format!("cloud-init: {} (exit {})\n", ci.extended_status, ci.exit.map_or("?".into(), |e| e.to_string()));
        for e in &ci.errors {
            out += &format!("  error: {e}\n");
        }
        for e in &ci.recoverable_errors {
            out += &format!("  recoverable: {e}\n");
        }
    }
    for l in &v.cloud_init_logged {
        out += &format!("  logged: {l}\n");
    }
    for (title, lines) in [
        ("serial console", &v.console_tail),
        ("cloud-init.log", &v.cloud_init_log_tail),
        ("sshd log", &v.sshd_log_tail),
    ] {
        if !lines.is_empty() {
            out += &format!("--- {title} (last {} lines)\n{}\n", lines.len(), lines.join("\n"));
        }
    }
    out += &match &v.failure {
        None => format!("VERIFIED: {} logs in to {} ({:.0} s in all)\n", v.user, v.image, v.total_seconds),
        Some(why) => format!("NOT VERIFIED: {why}\n"),
    };
    out
}

/// The last `n` lines of `text`, each cut at [`MAX_LINE`] characters (the guest wrote them).
pub fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| l.chars().take(MAX_LINE).collect()).collect()
}

/// The longest line of a log or console shown.
pub const MAX_LINE: usize = 400;

#[cfg(test)]
mod tests {
    use super::*;

    // `cloud-init status --long` as 25.1 prints it for a degraded boot, and as 22.4 prints it.
    const DEGRADED_25: &str = "status: done\nextended_status: degraded done\nboot_status_code: enabled-by-generator\nlast_update: Thu, 01 Jan 1970 00:00:53 +0000\ndetail: DataSourceNoCloud [seed=/dev/vdb]\nerrors: []\nrecoverable_errors:\nWARNING:\n\t- Failed to set password for debian\n\t- Invalid cloud-config provided\ncloudimg-status-exit=2\n";
    const DONE_22: &str =
        "status: done\ntime: Thu, 01 Jan 1970 00:00:53 +0000\ndetail:\nDataSourceNoCloud [seed=/dev/vdb][dsmode=net]\ncloudimg-status-exit=0\n";
    const ERROR_23: &str = "status: error\nextended_status: error - done\nerrors:\n\t- ('set_passwords', KeyError('x'))\nrecoverable_errors: {}\ncloudimg-status-exit=1\n";

    #[test]
    fn statuses_of_three_generations_are_read() {
        // (output, status, extended status, exit, errors, recoverable errors, healthy)
        type Case<'a> = (&'a str, &'a str, &'a str, Option<i32>, usize, usize, bool);
        let table: [Case; 3] = [
            (DEGRADED_25, "done", "degraded done", Some(2), 0, 3, false),
            (DONE_22, "done", "done", Some(0), 0, 0, true),
            (ERROR_23, "error", "error - done", Some(1), 1, 0, false),
        ];
        for (text, status, extended, exit, errors, recoverable, healthy) in table {
            let ci = parse_status(text);
            assert_eq!(
                (
                    ci.status.as_str(),
                    ci.extended_status.as_str(),
                    ci.exit,
                    ci.errors.len(),
                    ci.recoverable_errors.len()
                ),
                (status, extended, exit, errors, recoverable),
                "{text}"
            );
            assert_eq!(ci.healthy(), healthy, "{text}");
        }
        let ci = parse_status(DEGRADED_25);
        assert_eq!(
            ci.recoverable_errors,
            ["WARNING:", "Failed to set password for debian", "Invalid cloud-config provided"]
        );
        assert_eq!(parse_status(ERROR_23).errors, ["('set_passwords', KeyError('x'))"]);
    }

    #[test]
    fn the_answer_gives_user_status_and_logged_lines() {
        let answer = format!("debian\n{DONE_22}{LOGGED_MARKER}\n2026-12-01 WARNING: x\n\n");
        let (user, ci, logged) = parse_answer(&answer);
        assert_eq!(user.as_deref(), Some("debian"));
        assert_eq!(ci.status, "done");
        assert_eq!(logged, ["2026-12-01 WARNING: x"]);
    }

    fn verdict(login: Login, as_user: Option<&str>, status: &str, wrong: Option<bool>) -> Verdict {
        let mut v = Verdict {
            image: "out.qcow2".into(),
            user: "debian".into(),
            auth: "password",
            boot_path: BootPath::DirectKernel,
            accel: Accel::Tcg,
            login,
            logged_in_as: as_user.map(str::to_string),
            cloud_init: Some(parse_status(status)),
            cloud_init_logged: vec![],
            wrong_password_refused: wrong,
            key_accepted: None,
            boot_seconds: Some(61.0),
            total_seconds: 90.0,
            failure: None,
            console_tail: vec![],
            cloud_init_log_tail: vec![],
            sshd_log_tail: vec![],
        };
        v.failure = v.judge();
        v
    }

    #[test]
    fn verdicts_map_to_their_exit_statuses() {
        let table = [
            (verdict(Login::Accepted, Some("debian"), DONE_22, Some(true)), exit_codes::SUCCESS),
            (verdict(Login::Accepted, Some("debian"), DEGRADED_25, Some(true)), exit_codes::UNHEALTHY),
            (verdict(Login::Accepted, Some("debian"), DONE_22, Some(false)), exit_codes::UNHEALTHY),
            (verdict(Login::Accepted, Some("root"), DONE_22, Some(true)), exit_codes::UNHEALTHY),
            (verdict(Login::Refused("publickey only".into()), None, "", None), exit_codes::REFUSED),
            (verdict(Login::NotReached("qemu exited".into()), None, "", None), exit_codes::NO_BOOT),
        ];
        for (v, code) in table {
            assert_eq!(v.exit_code(), code, "{:?}", v.failure);
            let text = render(&v);
            assert_eq!(text.contains("VERIFIED: debian logs in"), code == 0, "{text}");
        }
        let refused = render(&verdict(Login::Refused("publickey only".into()), None, "", None));
        assert!(refused.contains("NOT VERIFIED: the login as debian was refused: publickey only"), "{refused}");
    }

    #[test]
    fn tails_keep_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), ["b", "c"]);
        assert_eq!(tail("a", 5), ["a"]);
        assert_eq!(tail(&"x".repeat(10_000), 1)[0].len(), MAX_LINE);
    }
}
