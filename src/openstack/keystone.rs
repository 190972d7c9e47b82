//! Keystone v3 authentication (password, application credential, token): a project-scoped token and
//! the image service's endpoint from the catalog. The request body and the catalog lookup are pure.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::credentials::{AppCredential, Auth, Credentials, Domain, Named};
use super::{error_text, Http, Method};

/// A token and the Glance endpoint it was issued with. The token is never printed.
#[derive(Clone)]
pub struct Session {
    pub token: String,
    pub image_url: String,
    /// The project the token is scoped to: the owner of the images it creates.
    pub project_id: String,
}

/// `auth_url` as given (`http://k:5000`, `.../v3`, `.../v3/`) → the tokens URL.
pub fn tokens_url(auth_url: &str) -> String {
    let base = auth_url.trim_end_matches('/');
    if base.ends_with("/v3") {
        format!("{base}/auth/tokens")
    } else {
        format!("{base}/v3/auth/tokens")
    }
}

fn domain(d: &Domain) -> Value {
    match d {
        Domain::Name(name) => json!({ "name": name }),
        Domain::Id(id) => json!({ "id": id }),
    }
}

fn named(n: &Named) -> Value {
    match n {
        Named::Name { name, domain: d } => json!({ "name": name, "domain": domain(d) }),
        Named::Id(id) => json!({ "id": id }),
    }
}

pub fn auth_request(c: &Credentials) -> Value {
    let (identity, scope) = match &c.auth {
        Auth::Password { user, password, project } => {
            let mut user = named(user);
            user["password"] = json!(password.expose());
            (json!({ "methods": ["password"], "password": { "user": user } }), Some(project))
        }
        // An application credential carries its own scope; Keystone refuses another.
        Auth::ApplicationCredential { credential, secret } => {
            let mut credential = match credential {
                AppCredential::Id(id) => json!({ "id": id }),
                AppCredential::Name { name, user } => json!({ "name": name, "user": named(user) }),
            };
            credential["secret"] = json!(secret.expose());
            (json!({ "methods": ["application_credential"], "application_credential": credential }), None)
        }
        Auth::Token { token, project } => {
            (json!({ "methods": ["token"], "token": { "id": token.expose() } }), project.as_ref())
        }
    };
    let mut auth = json!({ "identity": identity });
    if let Some(project) = scope {
        auth["scope"] = json!({ "project": named(project) });
    }
    json!({ "auth": auth })
}

/// The image service's URL for `interface` (and `region` when given) in a token's catalog.
pub fn image_endpoint(token_body: &Value, interface: &str, region: Option<&str>) -> Result<String> {
    let catalog = token_body.pointer("/token/catalog").and_then(Value::as_array);
    let Some(catalog) = catalog else {
        bail!("Keystone's token carries no service catalog (is the project scoped?)");
    };
    let images: Vec<&Value> = catalog.iter().filter(|s| s["type"] == "image").collect();
    if images.is_empty() {
        bail!("the cloud's service catalog has no image service (Glance)");
    }
    let endpoints = images.iter().flat_map(|s| s["endpoints"].as_array().into_iter().flatten());
    let mut regions = Vec::new();
    for e in endpoints.filter(|e| e["interface"] == interface) {
        let in_region = |r: &str| e["region_id"] == r || e["region"] == r;
        match region {
            Some(r) if !in_region(r) => {
                regions.extend(e["region_id"].as_str().map(str::to_string));
            }
            _ => {
                return e["url"]
                    .as_str()
                    .map(|u| u.trim_end_matches('/').to_string())
                    .context("an endpoint without a URL")
            }
        }
    }
    match region {
        Some(r) => bail!(
            "the image service has no {interface} endpoint in region {r} (regions with one: {})",
            if regions.is_empty() { "none".to_string() } else { regions.join(", ") }
        ),
        None => bail!("the image service has no {interface} endpoint; set OS_INTERFACE or `interface:`"),
    }
}

/// Authenticates and finds Glance.
pub fn authenticate(http: &Http, c: &Credentials) -> Result<Session> {
    let url = tokens_url(&c.auth_url);
    let answer = http
        .send_json(Method::POST, &url, None, "application/json", &auth_request(c))
        .with_context(|| format!("authenticating with Keystone at {} ({})", c.auth_url, c.source))?;
    if answer.status != 201 {
        let hint = match (answer.status, &c.auth) {
            (401, Auth::Password { .. }) => "; check the user name, password, domains and project",
            (401, Auth::ApplicationCredential { .. }) => {
                "; check the application credential's id (or name and user), its secret and that it has not expired"
            }
            (401, Auth::Token { .. }) => "; the token may have expired",
            (404, _) => "; is the auth URL right?",
            _ => "",
        };
        bail!(
            "Keystone at {} refused the {} from {} (HTTP {}: {}){hint}",
            c.auth_url,
            c.auth.kind(),
            c.source,
            answer.status,
            error_text(&answer.body)
        );
    }
    let token = answer.subject_token.context("Keystone's answer has no X-Subject-Token header")?;
    let body: Value = serde_json::from_str(&answer.body).context("Keystone's token answer is not JSON")?;
    let project_id = body.pointer("/token/project/id").and_then(Value::as_str).map(str::to_string);
    let Some(project_id) = project_id else {
        bail!(
            "Keystone's token from {} is not scoped to a project; name one (`auth.project_name` in clouds.yaml, or \
             OS_PROJECT_NAME / OS_PROJECT_ID)",
            c.source
        );
    };
    let image_url = image_endpoint(&body, &c.interface, c.region.as_deref())
        .with_context(|| format!("finding Glance in the catalog of {}", c.auth_url))?;
    Ok(Session { token, image_url, project_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Value {
        json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region_id": "R1", "url": "http://k/v3"}]},
            {"type": "image", "endpoints": [
                {"interface": "public", "region_id": "R1", "region": "R1", "url": "http://g1:9292/"},
                {"interface": "internal", "region_id": "R1", "url": "http://g1-int:9292"},
                {"interface": "public", "region_id": "R2", "url": "http://g2:9292"}
            ]}
        ]}})
    }

    #[test]
    fn the_endpoint_honours_interface_and_region() {
        assert_eq!(image_endpoint(&catalog(), "public", None).unwrap(), "http://g1:9292");
        assert_eq!(image_endpoint(&catalog(), "public", Some("R2")).unwrap(), "http://g2:9292");
        assert_eq!(image_endpoint(&catalog(), "internal", Some("R1")).unwrap(), "http://g1-int:9292");
        let err = format!("{:#}", image_endpoint(&catalog(), "internal", Some("R2")).unwrap_err());
        assert!(err.contains("no internal endpoint in region R2"), "{err}");
        assert!(format!("{:#}", image_endpoint(&json!({"token": {}}), "public", None).unwrap_err())
            .contains("no service catalog"));
    }

    fn from(pairs: &'static [(&'static str, &'static str)]) -> Credentials {
        crate::openstack::credentials::from_env(&|k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
            .unwrap()
    }

    #[test]
    fn application_credentials_and_tokens_make_keystone_requests() {
        let by_id = auth_request(&from(&[
            ("OS_AUTH_URL", "u"),
            ("OS_AUTH_TYPE", "v3applicationcredential"),
            ("OS_APPLICATION_CREDENTIAL_ID", "ac1"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "sec"),
            ("OS_PROJECT_NAME", "p"),
        ]));
        assert_eq!(
            by_id,
            json!({"auth": {"identity": {"methods": ["application_credential"],
                "application_credential": {"id": "ac1", "secret": "sec"}}}}),
            "no scope: Keystone refuses one with an application credential"
        );
        let by_name = auth_request(&from(&[
            ("OS_AUTH_URL", "u"),
            ("OS_AUTH_TYPE", "v3applicationcredential"),
            ("OS_APPLICATION_CREDENTIAL_NAME", "ci"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "sec"),
            ("OS_USER_ID", "u1"),
        ]));
        assert_eq!(by_name.pointer("/auth/identity/application_credential/user"), Some(&json!({"id": "u1"})));
        assert_eq!(by_name.pointer("/auth/identity/application_credential/name"), Some(&json!("ci")));
        let token = auth_request(&from(&[("OS_AUTH_URL", "u"), ("OS_TOKEN", "tok"), ("OS_PROJECT_ID", "p1")]));
        assert_eq!(
            token,
            json!({"auth": {"identity": {"methods": ["token"], "token": {"id": "tok"}},
                "scope": {"project": {"id": "p1"}}}})
        );
    }

    #[test]
    fn the_auth_request_is_keystone_v3_password_with_a_project_scope() {
        let c = crate::openstack::credentials::from_env(&|k| {
            Some(
                match k {
                    "OS_AUTH_URL" => "http://k:5000",
                    "OS_USERNAME" => "u",
                    "OS_PASSWORD" => "p",
                    "OS_PROJECT_NAME" => "proj",
                    "OS_USER_DOMAIN_NAME" => "Default",
                    _ => return None,
                }
                .to_string(),
            )
        })
        .unwrap();
        let body = auth_request(&c);
        assert_eq!(body.pointer("/auth/identity/methods"), Some(&json!(["password"])));
        assert_eq!(body.pointer("/auth/identity/password/user/name"), Some(&json!("u")));
        assert_eq!(body.pointer("/auth/identity/password/user/domain/name"), Some(&json!("Default")));
        assert_eq!(body.pointer("/auth/scope/project/domain/id"), Some(&json!("default")));
        assert_eq!(tokens_url("http://k:5000"), "http://k:5000/v3/auth/tokens");
        assert_eq!(tokens_url("http://k:5000/v3/"), "http://k:5000/v3/auth/tokens");
    }
}
