//! Choosing how a password gets into the image: through cloud-init at first boot, or straight into
//! `/etc/shadow` now. Pure.

use anyhow::{bail, Result};

use crate::cloud_config::version::CloudInitVersion;

/// How the password gets into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// cloud-init sets it at first boot (cloud.cfg or --drop-in).
    CloudInit,
    /// The hash goes into /etc/shadow now, and sshd's configuration takes passwords.
    Shadow,
    /// cloud-init where it will work, else /etc/shadow.
    Auto,
}

/// What decides the method.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub cloud_init: bool,
    pub version: Option<CloudInitVersion>,
    pub plaintext: bool,
    pub set_passwords_runs: bool,
    /// Booted before and not cleaned by this run.
    pub booted_before: bool,
    pub user_in_shadow: bool,
}

/// The method to use (never `Auto`) and why.
pub fn choose(requested: Method, facts: &Facts) -> Result<(Method, String)> {
    match requested {
        Method::CloudInit => return Ok((Method::CloudInit, "asked for with --method cloud-init".into())),
        Method::Shadow => return Ok((Method::Shadow, "asked for with --method shadow".into())),
        Method::Auto => {}
    }
    let why_not_cloud_init = match facts.version {
        _ if !facts.cloud_init => Some("the image has no cloud-init".to_string()),
        None => Some("cloud-init's version cannot be read from the image".into()),
        Some(v) if v < CloudInitVersion::HASHES && !facts.plaintext => {
            Some(format!("cloud-init {v} cannot take a password hash (17.1 or later can)"))
        }
        Some(_) if !facts.set_passwords_runs => {
            Some("cloud-init's set_passwords is in none of its module lists".into())
        }
        Some(_) if facts.booted_before => {
            Some("the disk was booted before, and cloud-init will not run set_passwords again for that instance".into())
        }
        Some(v) => {
            return Ok((
                Method::CloudInit,
                format!("cloud-init {v} will set it at the first boot of each new instance"),
            ))
        }
    };
    let reason = why_not_cloud_init.expect("every other case returned");
    if !facts.user_in_shadow {
        bail!("{reason}, and the user has no entry in /etc/shadow to set directly; name an existing user with --user");
    }
    Ok((Method::Shadow, format!("{reason}; /etc/shadow is set directly")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            cloud_init: true,
            version: Some(CloudInitVersion(22, 4, 2)),
            plaintext: false,
            set_passwords_runs: true,
            booted_before: false,
            user_in_shadow: true,
        }
    }

    #[test]
    fn auto_prefers_cloud_init_and_says_why_it_does_not() {
        assert_eq!(choose(Method::Auto, &facts()).unwrap().0, Method::CloudInit);
        let cases: [(Facts, &str); 5] = [
            (Facts { cloud_init: false, version: None, ..facts() }, "no cloud-init"),
            (Facts { version: None, ..facts() }, "version cannot be read"),
            (Facts { version: Some(CloudInitVersion(0, 7, 5)), ..facts() }, "cannot take a password hash"),
            (Facts { set_passwords_runs: false, ..facts() }, "module lists"),
            (Facts { booted_before: true, ..facts() }, "booted before"),
        ];
        for (f, why) in cases {
            let (method, reason) = choose(Method::Auto, &f).unwrap();
            assert_eq!(method, Method::Shadow, "{why}");
            assert!(reason.contains(why), "{reason}");
        }
        let old_plain = Facts { version: Some(CloudInitVersion(0, 7, 5)), plaintext: true, ..facts() };
        assert_eq!(choose(Method::Auto, &old_plain).unwrap().0, Method::CloudInit);
        let err = choose(Method::Auto, &Facts { cloud_init: false, user_in_shadow: false, ..facts() }).unwrap_err();
        assert!(err.to_string().contains("--user"), "{err}");
        assert_eq!(choose(Method::Shadow, &facts()).unwrap().0, Method::Shadow);
    }
}
