//! Where OpenStack credentials come from, the way the `openstack` CLI finds them: a named cloud in
//! `clouds.yaml` (with `secure.yaml` merged over it), or the `OS_*` environment variables. Pure: the
//! callers pass the environment and the files' text.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cloud_config::yaml11::{self, Mapping, Value};

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

/// Keystone v3 password credentials and how to reach the cloud.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    /// Where they came from, for messages: `clouds.yaml cloud "x" (/path)` or `OS_* variables`.
    pub source: String,
    pub auth_url: String,
    pub user: Named,
    pub password: String,
    pub project: Named,
    pub region: Option<String>,
    /// `public`, `internal` or `admin`.
    pub interface: String,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}

impl std::fmt::Debug for Credentials {
    /// Never shows the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("auth_url", &self.auth_url)
            .field("user", &self.user)
            .field("project", &self.project)
            .field("region", &self.region)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

/// One credential field by its clouds.yaml name (`auth.username`) and `OS_*` name.
struct Fields<'a> {
    get: &'a dyn Fn(&str, &str) -> Option<String>,
}

impl Fields<'_> {
    fn get(&self, yaml: &str, env: &str) -> Option<String> {
        (self.get)(yaml, env).filter(|v| !v.is_empty())
    }

    fn build(&self, source: String) -> Result<Credentials> {
        let missing = |what: &str, yaml: &str, env: &str| {
            anyhow::anyhow!("{source} gives no {what} (`{yaml}` in clouds.yaml, or {env})")
        };
        let auth_type = self.get("auth_type", "OS_AUTH_TYPE").unwrap_or_else(|| "password".to_string());
        if !matches!(auth_type.as_str(), "password" | "v3password") {
            bail!("{source} uses auth_type {auth_type}; cloudimg supports Keystone v3 password authentication");
        }
        let auth_url = self
            .get("auth.auth_url", "OS_AUTH_URL")
            .ok_or_else(|| missing("Keystone URL", "auth.auth_url", "OS_AUTH_URL"))?;
        let domain = |kind: &str, env_kind: &str| {
            self.get(&format!("auth.{kind}_domain_id"), &format!("OS_{env_kind}_DOMAIN_ID"))
                .map(Domain::Id)
                .or_else(|| {
                    self.get(&format!("auth.{kind}_domain_name"), &format!("OS_{env_kind}_DOMAIN_NAME"))
                        .map(Domain::Name)
                })
                .or_else(|| self.get("auth.domain_id", "OS_DOMAIN_ID").map(Domain::Id))
                .or_else(|| self.get("auth.domain_name", "OS_DOMAIN_NAME").map(Domain::Name))
                .unwrap_or_else(|| Domain::Id("default".to_string()))
        };
        let user = match self.get("auth.user_id", "OS_USER_ID") {
            Some(id) => Named::Id(id),
            None => Named::Name {
                name: self
                    .get("auth.username", "OS_USERNAME")
                    .ok_or_else(|| missing("user name", "auth.username", "OS_USERNAME"))?,
                domain: domain("user", "USER"),
            },
        };
        let password = self
            .get("auth.password", "OS_PASSWORD")
            .ok_or_else(|| missing("password", "auth.password (or in secure.yaml)", "OS_PASSWORD"))?;
        let project = match self.get("auth.project_id", "OS_PROJECT_ID") {
            Some(id) => Named::Id(id),
            None => Named::Name {
                name: self
                    .get("auth.project_name", "OS_PROJECT_NAME")
                    .or_else(|| self.get("auth.tenant_name", "OS_TENANT_NAME"))
                    .ok_or_else(|| missing("project", "auth.project_name", "OS_PROJECT_NAME"))?,
                domain: domain("project", "PROJECT"),
            },
        };
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
            user,
            password,
            project,
            region: self.get("region_name", "OS_REGION_NAME"),
            interface,
            cacert: self.get("cacert", "OS_CACERT").map(PathBuf::from),
            insecure,
        })
    }
}

fn is_false(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off" | "")
}

/// Credentials from the `OS_*` variables (`env` looks one up).
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

/// Credentials for cloud `name` from the text of a `clouds.yaml` and, optionally, a `secure.yaml`.
pub fn from_clouds_yaml(name: &str, clouds: (&Path, &str), secure: Option<(&Path, &str)>) -> Result<Credentials> {
    let cloud = |(path, text): (&Path, &str)| -> Result<Option<Mapping>> {
        let doc = yaml11::parse(text).with_context(|| format!("reading {}", path.display()))?;
        let clouds = doc.root.get("clouds").and_then(Value::as_map);
        Ok(clouds.and_then(|c| c.get(name)).and_then(Value::as_map).cloned())
    };
    let (clouds_path, _) = clouds;
    let main = cloud(clouds)?
        .with_context(|| format!("{} has no cloud named `{name}` (under `clouds:`)", clouds_path.display()))?;
    let extra = secure.map(cloud).transpose()?.flatten();
    let get = |yaml: &str, _: &str| {
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
    Fields { get: &get }.build(format!("cloud `{name}` in {}", clouds_path.display()))
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
        assert_eq!(c.user, Named::Name { name: "alice".into(), domain: Domain::Name("Users".into()) });
        assert_eq!(c.project, Named::Name { name: "images".into(), domain: Domain::Id("abc".into()) });
        assert_eq!((c.region.as_deref(), c.interface.as_str(), c.insecure), (Some("RegionTwo"), "internal", true));
        assert!(!format!("{c:?}").contains("s3cret"), "Debug never shows the password");
    }

    #[test]
    fn missing_or_unsupported_settings_are_named() {
        let err = |pairs: &[(&str, &str)]| format!("{:#}", from_env(&env(pairs)).unwrap_err());
        assert!(err(&[]).contains("OS_AUTH_URL"));
        assert!(err(&[("OS_AUTH_URL", "u"), ("OS_USERNAME", "a"), ("OS_PROJECT_NAME", "p")]).contains("OS_PASSWORD"));
        assert!(err(&[("OS_AUTH_URL", "u"), ("OS_AUTH_TYPE", "token")]).contains("auth_type token"));
        let minimal = from_env(&env(&[
            ("OS_AUTH_URL", "u"),
            ("OS_USERNAME", "a"),
            ("OS_PASSWORD", "p"),
            ("OS_PROJECT_ID", "123"),
        ]))
        .unwrap();
        assert_eq!(minimal.user, Named::Name { name: "a".into(), domain: Domain::Id("default".into()) });
        assert_eq!(
            (minimal.project, minimal.interface.as_str(), minimal.insecure),
            (Named::Id("123".into()), "public", false)
        );
    }

    #[test]
    fn a_cloud_from_clouds_yaml_with_its_secret_in_secure_yaml() {
        let clouds = "clouds:\n  lab:\n    auth:\n      auth_url: http://k:5000\n      username: bob\n      \
                      project_name: demo\n      user_domain_name: Default\n      project_domain_name: Default\n    \
                      region_name: RegionOne\n    verify: false\n  other:\n    auth: {}\n";
        let secure = "clouds:\n  lab:\n    auth:\n      password: 'from secure'\n";
        let c = from_clouds_yaml("lab", (Path::new("clouds.yaml"), clouds), Some((Path::new("secure.yaml"), secure)))
            .unwrap();
        assert_eq!(c.password, "from secure");
        assert_eq!(c.auth_url, "http://k:5000");
        assert!(c.insecure, "verify: false");
        assert_eq!(c.region.as_deref(), Some("RegionOne"));
        let err = from_clouds_yaml("nope", (Path::new("clouds.yaml"), clouds), None).unwrap_err();
        assert!(format!("{err:#}").contains("no cloud named `nope`"));
        let err = from_clouds_yaml("lab", (Path::new("clouds.yaml"), clouds), None).unwrap_err();
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
