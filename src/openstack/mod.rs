//! Talking to an OpenStack cloud: credentials, Keystone v3 authentication, the Glance v2 image API.
//! HTTP goes through [`Http`], a thin adapter over `ureq` (TLS with the system's CA store).

pub mod credentials;
pub mod glance;
pub mod keystone;
pub mod manifest;
pub mod upload;

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context, Result};
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
            // The token travels in X-Auth-Token and the password in the body, which ureq would carry
            // along a redirect to any host (https to http included): redirects are errors instead.
            .max_redirects(0)
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

    /// DELETEs within `limit` (connection, answer and body together), even if the server stalls.
    pub fn delete(&self, url: &str, token: &str, limit: Duration) -> Result<Answer> {
        let request = self.agent.delete(url).config().timeout_global(Some(limit)).build();
        answer(request.header("X-Auth-Token", token).call(), url)
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
    if response.status().is_redirection() {
        let location = response.headers().get("Location").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        bail!(
            "{url} answered HTTP {status}, a redirect to {}; cloudimg follows no redirect with credentials, which \
             would go wherever it points: put the final address in the auth URL (or the cloud's service catalog)",
            location.as_deref().unwrap_or("nowhere (no Location header)")
        );
    }
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
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// One HTTP request as received: head and body.
    fn read_request(stream: &mut TcpStream) -> String {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            seen.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&seen).into_owned();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        let _ = stream.read_exact(&mut body);
        head + &String::from_utf8_lossy(&body)
    }

    /// A server that records every request it gets (answering 200) until one asks for /stop.
    fn recorder() -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let request = read_request(&mut stream);
                if request.starts_with("GET /stop ") {
                    break;
                }
                got.push(request);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            }
            got
        });
        (port, thread)
    }

    /// A server that answers each of `count` requests with a redirect to `location`.
    fn redirector(location: String, count: usize) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(count) {
                let mut stream = stream.unwrap();
                read_request(&mut stream);
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        port
    }

    #[test]
    fn credentials_never_follow_a_redirect_to_another_server() {
        let (elsewhere, recorded) = recorder();
        let location = format!("http://127.0.0.1:{elsewhere}/v3/auth/tokens");
        let here = redirector(location.clone(), 3);
        let creds = credentials::from_env(&|k| {
            Some(match k {
                "OS_AUTH_URL" => format!("http://127.0.0.1:{here}"),
                "OS_USERNAME" => "u".into(),
                "OS_PASSWORD" => "the-password".into(),
                "OS_PROJECT_NAME" => "p".into(),
                _ => return None,
            })
        })
        .unwrap();
        let http = Http::new(&creds).unwrap();
        let url = format!("http://127.0.0.1:{here}/v2/images/x");
        let errors = [
            http.get(&url, "the-token").err(),
            http.delete(&url, "the-token", Duration::from_secs(30)).err(),
            keystone::authenticate(&http, &creds).err(),
        ];
        TcpStream::connect(("127.0.0.1", elsewhere)).unwrap().write_all(b"GET /stop HTTP/1.1\r\n\r\n").unwrap();
        let recorded = recorded.join().unwrap();
        assert!(
            recorded.iter().all(|r| !r.contains("the-token") && !r.contains("the-password")),
            "credentials reached the other server: {recorded:?}"
        );
        for error in errors {
            let error = format!("{:#}", error.expect("a redirect is an error"));
            assert!(error.contains("HTTP 307") && error.contains(&location), "{error}");
        }
    }

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
