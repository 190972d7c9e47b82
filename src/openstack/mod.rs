//! Talking to an OpenStack cloud: credentials, Keystone v3 authentication, the Glance v2 image API.
//! HTTP goes through [`Http`], a thin adapter over `ureq` (TLS with the system's CA store).

pub mod credentials;
pub mod glance;
pub mod keystone;

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result};
pub use ureq::http::Method;

use credentials::Credentials;

/// An HTTP answer of any status: callers decide what a status means.
pub struct Answer {
    pub status: u16,
    pub subject_token: Option<String>,
    pub body: String,
}

/// Bodies larger than this are cut (an error page or a catalog is a few KiB).
const MAX_BODY: u64 = 4 << 20;

#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
}

impl Http {
    pub fn new(creds: &Credentials) -> Result<Self> {
        let roots = match &creds.cacert {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading the CA bundle {}", path.display()))?;
                let certs = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("reading the CA bundle {}", path.display()))?;
                ureq::tls::RootCerts::new_with_certs(&certs)
            }
            None => ureq::tls::RootCerts::PlatformVerifier,
        };
        let tls = ureq::tls::TlsConfig::builder().root_certs(roots).disable_verification(creds.insecure).build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .timeout_recv_body(Some(Duration::from_secs(120)))
            .user_agent(concat!("cloudimg/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Http { agent })
    }

    pub fn get(&self, url: &str, token: &str) -> Result<Answer> {
        answer(self.agent.get(url).header("X-Auth-Token", token).header("Accept", "application/json").call(), url)
    }

    pub fn delete(&self, url: &str, token: &str) -> Result<Answer> {
        answer(self.agent.delete(url).header("X-Auth-Token", token).call(), url)
    }

    /// Sends a JSON document (`content_type` names its kind) with POST, PUT or PATCH; `token` is
    /// `None` for the authentication request itself.
    pub fn send_json(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        content_type: &str,
        body: &serde_json::Value,
    ) -> Result<Answer> {
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("Content-Type", content_type)
            .header("Accept", "application/json");
        if let Some(token) = token {
            request = request.header("X-Auth-Token", token);
        }
        let request = request.body(body.to_string()).with_context(|| format!("a request to {url}"))?;
        answer(self.agent.run(request), url)
    }

    /// PUTs `length` bytes from `body` as application/octet-stream, with `headers` besides. The
    /// connection is not kept: a server that answers before reading the whole body closes it.
    pub fn put_stream(
        &self,
        url: &str,
        token: &str,
        headers: &[(&str, &str)],
        length: u64,
        body: &mut dyn Read,
    ) -> Result<Answer> {
        let mut request = self
            .agent
            .put(url)
            .header("X-Auth-Token", token)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", length.to_string())
            .header("Connection", "close");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        answer(request.send(ureq::SendBody::from_reader(body)), url)
    }
}

fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>, url: &str) -> Result<Answer> {
    let mut response = result.with_context(|| format!("no answer from {url}"))?;
    let status = response.status().as_u16();
    let subject_token = response.headers().get("X-Subject-Token").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.body_mut().with_config().limit(MAX_BODY).read_to_string().unwrap_or_default();
    Ok(Answer { status, subject_token, body })
}

/// The human part of an OpenStack error answer: the JSON `message` (Keystone, some Glance errors) or
/// the text of an HTML error page (Glance's webob errors), without markup and repeats.
pub fn error_text(body: &str) -> String {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(body) {
        let message = ["/error/message", "/message", "/title"].iter().find_map(|p| json.pointer(p)?.as_str());
        if let Some(message) = message {
            return message.trim().to_string();
        }
    }
    let mut text = String::new();
    let mut in_tag = false;
    for c in body.chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // webob pages repeat the title (`415 Unsupported Media Type`) in <title> and <h1>.
    let words: Vec<&str> = joined.split(' ').collect();
    let half = words.len() / 2;
    let deduped =
        (1..=half).rev().find(|&n| words[..n] == words[n..2 * n]).map(|n| words[n..].join(" ")).unwrap_or(joined);
    deduped.chars().take(600).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_takes_the_message_from_json_or_html() {
        let keystone = r#"{"error":{"code":401,"message":"The request you have made requires authentication.","title":"Unauthorized"}}"#;
        assert_eq!(error_text(keystone), "The request you have made requires authentication.");
        let glance = "<html>\n <head>\n  <title>415 Unsupported Media Type</title>\n </head>\n <body>\n  \
                      <h1>415 Unsupported Media Type</h1>\n  Image content does not match disk_format<br /><br />\n\n\n\n </body>\n</html>";
        assert_eq!(error_text(glance), "415 Unsupported Media Type Image content does not match disk_format");
        assert_eq!(error_text("plain words"), "plain words");
    }
}
