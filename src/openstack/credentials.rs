//! Where OpenStack credentials come from, the way the `openstack` CLI finds them: a named cloud in
//! `clouds.yaml` (with `secure.yaml` merged over it) and the `OS_*` environment variables, which
//! override the cloud's settings one by one (the CLI takes them as its options' defaults). Pure: the
//! callers pass the environment and the files' text.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cloud_config::yaml11::{self, Mapping, Value};
use crate::login::password::Secret;

/// The `auth_type` values cloudimg speaks (keystoneauth's names).
pub const AUTH_TYPES: &str = "password, v3password, v3applicationcredential, token, v3token";

/// A user or project's domain, by name or by id.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    Name(String),
    Id(String),
}

/// A user or project, by name (within a domain) or by id.
#[derive(Debug, Clone, PartialEq)]
pub enum Named {
    Name { name: String, domain: Domain },
    Id(String),
}

/// An application credential, by id or by name with its user.
#[derive(Debug, Clone, PartialEq)]
pub enum AppCredential {
    Id(String),
    Name { name: String, user: Named },
}

/// How to prove who we are to Keystone. Secrets are [`Secret`]s: `Debug` never shows them.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// `password` / `v3password`: a user's password, scoped to a project.
    Password { user: Named, password: Secret, project: Named },
    /// `v3applicationcredential`: its scope is the project it was created in.
    ApplicationCredential { credential: AppCredential, secret: Secret },
    /// `token` / `v3token`: an existing token, rescoped to `project` when one is given.
    Token { token: Secret, project: Option<Named> },
}

impl Auth {
    /// What kind of credential, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::Password { .. } => "password",
            Auth::ApplicationCredential { .. } => "application credential",
            Auth::Token { .. } => "token",
        }
    }
}

/// Keystone v3 credentials and how to reach the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    /// Where they came from, for messages: `cloud "x" in /path/clouds.yaml` or `OS_* variables`.
    pub source: String,
    pub auth_url: String,
    pub auth: Auth,
    pub region: Option<String>,
    /// `public`, `internal` or `admin`.
    pub interface: String,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

/// One setting by its clouds.yaml name (`auth.username`) and its `OS_*` name.
struct Fields<'a> {
    get: &'a dyn Fn(&str, &str) -> Option<String>,
}

impl Fields<'_> {
    fn get(&self, yaml: &str, env: &str) -> Option<String> {
        (self.get)(yaml, env).filter(|v| !v.is_empty())
    }

    fn secret(&self, yaml: &str, env: &str) -> Option<Secret> {
        self.get(yaml, env).and_then(|v| Secret::new(v).ok())
    }

    /// The auth type as the `openstack` CLI picks it: the one named, else `password` when a user name
    /// is given, else `token` when a token is, else `password`.
    fn auth_type(&self) -> String {
        match self.get("auth_type", "OS_AUTH_TYPE") {
            Some(named) => named,
            None if self.get("auth.username", "OS_USERNAME").is_some() => "password".to_string(),
            None if self.get("auth.token", "OS_TOKEN").is_some() => "token".to_string(),
            None => "password".to_string(),
        }
    }

    fn domain(&self, kind: &str, env_kind: &str) -> Domain {
        self.get(&format!("auth.{kind}_domain_id"), &format!("OS_{env_kind}_DOMAIN_ID"))
            .map(Domain::Id)
            .or_else(|| {
                self.get(&format!("auth.{kind}_domain_name"), &format!("OS_{env_kind}_DOMAIN_NAME")).map(Domain::Name)
            })
            .or_else(|| self.get("auth.domain_id", "OS_DOMAIN_ID").map(Domain::Id))
            .or_else(|| self.get("auth.domain_name", "OS_DOMAIN_NAME").map(Domain::Name))
            .unwrap_or_else(|| Domain::Id("default".to_string()))
    }

    fn user(&self) -> Option<Named> {
        match self.get("auth.user_id", "OS_USER_ID") {
            Some(id) => Some(Named::Id(id)),
            None => Some(Named::Name {
                name: self.get("auth.username", "OS_USERNAME")?,
                domain: self.domain("user", "USER"),
            }),
        }
    }

    fn project(&self) -> Option<Named> {
        match self.get("auth.project_id", "OS_PROJECT_ID").or_else(|| self.get("auth.tenant_id", "OS_TENANT_ID")) {
            Some(id) => Some(Named::Id(id)),
            None => Some(Named::Name {
                name: self
                    .get("auth.project_name", "OS_PROJECT_NAME")
                    .or_else(|| self.get("auth.tenant_name", "OS_TENANT_NAME"))?,
                domain: self.domain("project", "PROJECT"),
            }),
        }
    }

    fn password_auth(&self, missing: &Missing<'_>) -> Result<Auth> {
        let user = self.user().ok_or_else(|| {
            let hint = if self.get("auth.application_credential_secret", "OS_APPLICATION_CREDENTIAL_SECRET").is_some() {
                "; for the application credential set auth_type v3applicationcredential (OS_AUTH_TYPE)"
            } else {
                ""
            };
            missing("user name", "auth.username", "OS_USERNAME").context(format!("password authentication{hint}"))
        })?;
        Ok(Auth::Password {
            user,
            password: self
                .secret("auth.password", "OS_PASSWORD")
                .ok_or_else(|| missing("password", "auth.password (or in secure.yaml)", "OS_PASSWORD"))?,
            project: self.project().ok_or_else(|| missing("project", "auth.project_name", "OS_PROJECT_NAME"))?,
        })
    }

    fn application_credential_auth(&self, missing: &Missing<'_>) -> Result<Auth> {
        let secret =
            self.secret("auth.application_credential_secret", "OS_APPLICATION_CREDENTIAL_SECRET").ok_or_else(|| {
                missing(
                    "application credential secret",
                    "auth.application_credential_secret (or in secure.yaml)",
                    "OS_APPLICATION_CREDENTIAL_SECRET",
                )
            })?;
        let credential = match self.get("auth.application_credential_id", "OS_APPLICATION_CREDENTIAL_ID") {
            Some(id) => AppCredential::Id(id),
            None => AppCredential::Name {
                name: self.get("auth.application_credential_name", "OS_APPLICATION_CREDENTIAL_NAME").ok_or_else(
                    || {
                        missing(
                            "application credential id or name",
                            "auth.application_credential_id",
                            "OS_APPLICATION_CREDENTIAL_ID",
                        )
                    },
                )?,
                user: self.user().ok_or_else(|| {
                    missing("user for the application credential's name", "auth.username", "OS_USERNAME")
                })?,
            },
        };
        Ok(Auth::ApplicationCredential { credential, secret })
    }

    fn build(&self, source: String) -> Result<Credentials> {
        let missing = |what: &str, yaml: &str, env: &str| {
            anyhow::anyhow!("{source} gives no {what} (`{yaml}` in clouds.yaml, or {env})")
        };
        let auth = match self.auth_type().as_str() {
            "password" | "v3password" => self.password_auth(&missing)?,
            "v3applicationcredential" => self.application_credential_auth(&missing)?,
            "token" | "v3token" => Auth::Token {
                token: self
                    .secret("auth.token", "OS_TOKEN")
                    .ok_or_else(|| missing("token", "auth.token", "OS_TOKEN"))?,
                project: self.project(),
            },
            other => bail!("{source} uses auth_type {other}; cloudimg supports {AUTH_TYPES}"),
        };
        let auth_url = self
            .get("auth.auth_url", "OS_AUTH_URL")
            .ok_or_else(|| missing("Keystone URL", "auth.auth_url", "OS_AUTH_URL"))?;
        let interface = self.get("interface", "OS_INTERFACE").unwrap_or_else(|| "public".to_string());
        // The old catalog names (`publicURL`) still appear in rc files.
        let interface = interface.trim_end_matches("URL").to_string();
        if !matches!(interface.as_str(), "public" | "internal" | "admin") {
            bail!("{source}: interface `{interface}` is not one of public, internal, admin");
        }
        let verify = self.get("verify", "").map(|v| !is_false(&v)).unwrap_or(true);
        let insecure = self.get("insecure", "OS_INSECURE").is_some_and(|v| !is_false(&v)) || !verify;
        Ok(Credentials {
            source,
            auth_url,
            auth,
            region: self.get("region_name", "OS_REGION_NAME"),
            interface,
            cacert: self.get("cacert", "OS_CACERT").map(PathBuf::from),
            insecure,
        })
    }
}

/// Says which setting is missing: what, its clouds.yaml key, its variable.
type Missing<'a> = dyn Fn(&str, &str, &str) -> anyhow::Error + 'a;

fn is_false(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off" | "")
}

/// Credentials from the `OS_*` variables alone (`env` looks one up).
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Credentials> {
    let get = |_: &str, name: &str| if name.is_empty() { None } else { env(name) };
    Fields { get: &get }.build("the OS_* environment variables".to_string())
}

/// The files to look in for `clouds.yaml` / `secure.yaml`, in the `openstack` CLI's order.
pub fn search_path(file: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from(file)];
    let config_home =
        env("XDG_CONFIG_HOME").map(PathBuf::from).or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")));
    if let Some(home) = config_home {
        paths.push(home.join("openstack").join(file));
    }
    paths.push(Path::new("/etc/openstack").join(file));
    paths
}

/// Credentials for cloud `name` from the text of a `clouds.yaml` and, optionally, a `secure.yaml`,
/// with the `OS_*` variables `env` finds over both.
pub fn from_clouds_yaml(
    name: &str,
    clouds: (&Path, &str),
    secure: Option<(&Path, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Credentials> {
    let cloud = |(path, text): (&Path, &str)| -> Result<Option<Mapping>> {
        let doc = yaml11::parse(text).with_context(|| format!("reading {}", path.display()))?;
        let clouds = doc.root.get("clouds").and_then(Value::as_map);
        Ok(clouds.and_then(|c| c.get(name)).and_then(Value::as_map).cloned())
    };
    let (clouds_path, _) = clouds;
    let main = cloud(clouds)?
        .with_context(|| format!("{} has no cloud named `{name}` (under `clouds:`)", clouds_path.display()))?;
    let extra = secure.map(cloud).transpose()?.flatten();
    let from_env = Cell::new(false);
    let get = |yaml: &str, env_name: &str| {
        if let Some(value) = (!env_name.is_empty()).then(|| env(env_name)).flatten().filter(|v| !v.is_empty()) {
            from_env.set(true);
            return Some(value);
        }
        let lookup = |m: &Mapping| {
            let mut node = m;
            let mut parts = yaml.split('.').peekable();
            while let Some(part) = parts.next() {
                let value = node.get(part)?;
                if parts.peek().is_none() {
                    return scalar(value);
                }
                node = value.as_map()?;
            }
            None
        };
        extra.as_ref().and_then(lookup).or_else(|| lookup(&main))
    };
    let source = format!("cloud `{name}` in {}", clouds_path.display());
    let result = Fields { get: &get }.build(source.clone());
    let source = if from_env.get() { format!("{source} with OS_* variables over it") } else { source };
    result.map(|c| Credentials { source, ..c }).map_err(|e| {
        if from_env.get() {
            e.context("some settings came from OS_* variables, which override clouds.yaml")
        } else {
            e
        }
    })
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Float(f) => Some(f.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s.to_string()).unwrap()
    }

    #[test]
    fn os_variables_give_v3_password_credentials() {
        let c = from_env(&env(&[
            ("OS_AUTH_URL", "https://keystone:5000/v3"),
            ("OS_USERNAME", "alice"),
            ("OS_PASSWORD", "s3cret"),
            ("OS_PROJECT_NAME", "images"),
            ("OS_USER_DOMAIN_NAME", "Users"),
            ("OS_PROJECT_DOMAIN_ID", "abc"),
            ("OS_REGION_NAME", "RegionTwo"),
            ("OS_INTERFACE", "internalURL"),
            ("OS_INSECURE", "true"),
        ]))
        .unwrap();
        assert_eq!(
            c.auth,
            Auth::Password {
                user: Named::Name { name: "alice".into(), domain: Domain::Name("Users".into()) },
                password: secret("s3cret"),
                project: Named::Name { name: "images".into(), domain: Domain::Id("abc".into()) },
            }
        );
        assert_eq!((c.region.as_deref(), c.interface.as_str(), c.insecure), (Some("RegionTwo"), "internal", true));
        assert!(!format!("{c:?}").contains("s3cret"), "Debug never shows the password");
    }

    #[test]
    fn application_credentials_and_tokens_from_os_variables() {
        let by_id = from_env(&env(&[
            ("OS_AUTH_URL", "u"),
            ("OS_AUTH_TYPE", "v3applicationcredential"),
            ("OS_APPLICATION_CREDENTIAL_ID", "ac1"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "ac-secret"),
            ("OS_PROJECT_NAME", "ignored: the credential has its own scope"),
        ]))
        .unwrap();
        assert_eq!(
            by_id.auth,
            Auth::ApplicationCredential { credential: AppCredential::Id("ac1".into()), secret: secret("ac-secret") }
        );
        assert!(!format!("{by_id:?}").contains("ac-secret"));
        let by_name = from_env(&env(&[
            ("OS_AUTH_URL", "u"),
            ("OS_AUTH_TYPE", "v3applicationcredential"),
            ("OS_APPLICATION_CREDENTIAL_NAME", "ci"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "x"),
            ("OS_USERNAME", "bob"),
            ("OS_USER_DOMAIN_NAME", "Users"),
        ]))
        .unwrap();
        assert_eq!(
            by_name.auth,
            Auth::ApplicationCredential {
                credential: AppCredential::Name {
                    name: "ci".into(),
                    user: Named::Name { name: "bob".into(), domain: Domain::Name("Users".into()) }
                },
                secret: secret("x")
            }
        );
        // No auth type and no user name: the token decides, as in the openstack CLI.
        let token = from_env(&env(&[("OS_AUTH_URL", "u"), ("OS_TOKEN", "gAAAA"), ("OS_PROJECT_ID", "p1")])).unwrap();
        assert_eq!(token.auth, Auth::Token { token: secret("gAAAA"), project: Some(Named::Id("p1".into())) });
        assert!(!format!("{token:?}").contains("gAAAA"));
    }

    #[test]
    fn the_auth_type_follows_the_openstack_cli() {
        let kind = |pairs: &[(&str, &str)]| from_env(&env(pairs)).map(|c| c.auth.kind());
        let base = [("OS_AUTH_URL", "u"), ("OS_PROJECT_NAME", "p")];
        let with = |extra: &[(&'static str, &'static str)]| [&base[..], extra].concat();
        // A user name wins over a token when no type is named...
        assert_eq!(kind(&with(&[("OS_USERNAME", "a"), ("OS_PASSWORD", "pw"), ("OS_TOKEN", "t")])).unwrap(), "password");
        // ...and a named type wins over both.
        assert_eq!(
            kind(&with(&[("OS_USERNAME", "a"), ("OS_TOKEN", "t"), ("OS_AUTH_TYPE", "v3token")])).unwrap(),
            "token"
        );
        // Without a type, an application credential alone is password auth without a user, as in the CLI.
        let err = format!(
            "{:#}",
            kind(&with(&[("OS_APPLICATION_CREDENTIAL_ID", "i"), ("OS_APPLICATION_CREDENTIAL_SECRET", "s")]))
                .unwrap_err()
        );
        assert!(err.contains("OS_USERNAME") && err.contains("auth_type v3applicationcredential"), "{err}");
        let err = format!("{:#}", kind(&with(&[("OS_AUTH_TYPE", "v3oidcpassword")])).unwrap_err());
        assert!(err.contains("auth_type v3oidcpassword") && err.contains(AUTH_TYPES), "{err}");
    }

    #[test]
    fn os_variables_override_clouds_yaml_and_secure_yaml_overrides_clouds_yaml() {
        let clouds =
            "clouds:\n  ci:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: http://k:5000\n      \
                      application_credential_id: from-clouds\n      application_credential_secret: clouds-secret\n    \
                      region_name: RegionOne\n";
        let secure = "clouds:\n  ci:\n    auth:\n      application_credential_secret: secure-secret\n";
        let read = |env_pairs: &[(&str, &str)], secure: Option<&str>| {
            from_clouds_yaml(
                "ci",
                (Path::new("clouds.yaml"), clouds),
                secure.map(|s| (Path::new("secure.yaml"), s)),
                &env(env_pairs),
            )
        };
        let plain = read(&[], None).unwrap();
        assert_eq!(
            plain.auth,
            Auth::ApplicationCredential {
                credential: AppCredential::Id("from-clouds".into()),
                secret: secret("clouds-secret")
            }
        );
        assert_eq!(plain.source, "cloud `ci` in clouds.yaml");
        let merged = read(&[], Some(secure)).unwrap();
        assert!(
            matches!(merged.auth, Auth::ApplicationCredential { ref secret, .. } if secret.expose() == "secure-secret")
        );
        let over = read(&[("OS_APPLICATION_CREDENTIAL_ID", "from-env"), ("OS_REGION_NAME", "RegionTwo")], Some(secure))
            .unwrap();
        assert_eq!(
            over.auth,
            Auth::ApplicationCredential {
                credential: AppCredential::Id("from-env".into()),
                secret: secret("secure-secret")
            }
        );
        assert_eq!(over.region.as_deref(), Some("RegionTwo"));
        assert!(over.source.contains("OS_* variables over it"), "{}", over.source);
        // OS_AUTH_TYPE overrides the cloud's auth_type too.
        let token = read(&[("OS_AUTH_TYPE", "v3token"), ("OS_TOKEN", "t")], Some(secure)).unwrap();
        assert_eq!(token.auth, Auth::Token { token: secret("t"), project: None });
        let err = read(&[("OS_AUTH_TYPE", "v3totp")], None).unwrap_err();
        assert!(format!("{err:#}").contains("override clouds.yaml"), "{err:#}");
    }

    #[test]
    fn missing_settings_are_named() {
        let err = |pairs: &[(&str, &str)]| format!("{:#}", from_env(&env(pairs)).unwrap_err());
        assert!(err(&[("OS_USERNAME", "a"), ("OS_PASSWORD", "p"), ("OS_PROJECT_ID", "1")]).contains("OS_AUTH_URL"));
        assert!(err(&[("OS_AUTH_URL", "u"), ("OS_USERNAME", "a"), ("OS_PROJECT_NAME", "p")]).contains("OS_PASSWORD"));
        assert!(err(&[("OS_AUTH_URL", "u"), ("OS_AUTH_TYPE", "token")]).contains("OS_TOKEN"));
        assert!(err(&[("OS_AUTH_TYPE", "v3applicationcredential"), ("OS_APPLICATION_CREDENTIAL_ID", "i")])
            .contains("OS_APPLICATION_CREDENTIAL_SECRET"));
        let minimal = from_env(&env(&[
            ("OS_AUTH_URL", "u"),
            ("OS_USERNAME", "a"),
            ("OS_PASSWORD", "p"),
            ("OS_PROJECT_ID", "123"),
        ]))
        .unwrap();
        assert_eq!(
            minimal.auth,
            Auth::Password {
                user: Named::Name { name: "a".into(), domain: Domain::Id("default".into()) },
                password: secret("p"),
                project: Named::Id("123".into())
            }
        );
        assert_eq!((minimal.interface.as_str(), minimal.insecure), ("public", false));
    }

    #[test]
    fn a_cloud_from_clouds_yaml_with_its_secret_in_secure_yaml() {
        let clouds = "clouds:\n  lab:\n    auth:\n      auth_url: http://k:5000\n      username: bob\n      \
                      project_name: demo\n      user_domain_name: Default\n      project_domain_name: Default\n    \
                      region_name: RegionOne\n    verify: false\n  other:\n    auth: {}\n";
        let secure = "clouds:\n  lab:\n    auth:\n      password: 'from secure'\n";
        let no_env = env(&[]);
        let c = from_clouds_yaml(
            "lab",
            (Path::new("clouds.yaml"), clouds),
            Some((Path::new("secure.yaml"), secure)),
            &no_env,
        )
        .unwrap();
        assert!(matches!(c.auth, Auth::Password { ref password, .. } if password.expose() == "from secure"));
        assert_eq!(c.auth_url, "http://k:5000");
        assert!(c.insecure, "verify: false");
        assert_eq!(c.region.as_deref(), Some("RegionOne"));
        let err = from_clouds_yaml("nope", (Path::new("clouds.yaml"), clouds), None, &no_env).unwrap_err();
        assert!(format!("{err:#}").contains("no cloud named `nope`"));
        let err = from_clouds_yaml("lab", (Path::new("clouds.yaml"), clouds), None, &no_env).unwrap_err();
        assert!(format!("{err:#}").contains("secure.yaml"), "{err:#}");
    }

    #[test]
    fn the_search_path_follows_the_openstack_cli() {
        let paths = search_path("clouds.yaml", &env(&[("HOME", "/home/u")]));
        assert_eq!(
            paths,
            vec![
                PathBuf::from("clouds.yaml"),
                PathBuf::from("/home/u/.config/openstack/clouds.yaml"),
                PathBuf::from("/etc/openstack/clouds.yaml")
            ]
        );
    }
}
