//! HTTP with the properties a multi-GB download needs: range requests, retries with backoff on
//! transient failures, resume of a body that broke mid-way, and a bearer token that is sent only
//! to the host it belongs to and never appears in a message.

use adaptq_source::SourceError;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bytes received over HTTP by this process (for the download progress bar).
static DOWNLOADED: AtomicU64 = AtomicU64::new(0);

/// Total bytes downloaded so far by every client in this process.
pub fn bytes_downloaded() -> u64 {
    DOWNLOADED.load(Ordering::Relaxed)
}

/// A bearer token bound to one `host:port`. `Debug` never shows the token.
#[derive(Clone)]
pub struct Token {
    pub authority: String,
    secret: String,
}

impl Token {
    pub fn new(authority: impl Into<String>, secret: impl Into<String>) -> Self {
        Token {
            authority: authority.into(),
            secret: secret.into(),
        }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, <redacted>)", self.authority)
    }
}

/// How a failed request should be reported: `Hub` explains 401/403/404 in hub terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Hub,
    Plain,
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    token: Option<Token>,
    pub retries: u32,
    pub backoff: Duration,
    pub flavor: Flavor,
}

enum Failure {
    /// Worth another try (connection reset, timeout, 5xx, 429).
    Transient(String),
    Fatal(String),
}

/// `scheme://host:port/...` → `host:port` (port made explicit), for matching the token's host.
pub fn authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let auth = rest.split(['/', '?', '#']).next()?;
    let auth = auth.rsplit('@').next()?;
    if auth.is_empty() {
        return None;
    }
    let has_port = auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    Some(if has_port {
        auth.to_ascii_lowercase()
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") {
            443
        } else {
            80
        };
        format!("{}:{port}", auth.to_ascii_lowercase())
    })
}

impl Client {
    pub fn new(token: Option<Token>, flavor: Flavor) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            // Authorization is dropped when the hub redirects to its CDN (ureq's default,
            // stated here because the token must never leave the hub's host).
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
            .user_agent(concat!("adaptq/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            agent,
            token,
            retries: 6,
            backoff: Duration::from_millis(200),
            flavor,
        }
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn send(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let mut req = self.agent.get(url);
        if let Some((s, e)) = range {
            req = req.header("Range", format!("bytes={s}-{}", e - 1));
        }
        if let Some(t) = &self.token {
            if authority(url).as_deref() == Some(t.authority.as_str()) {
                req = req.header("Authorization", format!("Bearer {}", t.secret));
            }
        }
        req.call().map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_) => Failure::Transient(e.to_string()),
            other => Failure::Fatal(other.to_string()),
        })
    }

    /// Explains a non-success status in words a user can act on.
    fn status_failure(&self, status: u16) -> Failure {
        let why = match (status, self.flavor, self.has_token()) {
            (401, Flavor::Hub, false) => "access denied (HTTP 401): the repository is private or gated, or does not exist; set HF_TOKEN to a token with read access".to_string(),
            (401, Flavor::Hub, true) => "the token in HF_TOKEN was refused (HTTP 401): check that it is valid and has read access to this repository".to_string(),
            (403, Flavor::Hub, _) => "access forbidden (HTTP 403): the repository is gated; accept its terms on the hub with the account whose token is in HF_TOKEN".to_string(),
            (404, Flavor::Hub, _) => "not found (HTTP 404): check the repository name, revision and file name".to_string(),
            (401 | 403, Flavor::Plain, _) => format!("access denied (HTTP {status})"),
            (404, Flavor::Plain, _) => "not found (HTTP 404)".to_string(),
            (429, _, _) => return Failure::Transient("rate limited (HTTP 429)".into()),
            (s, _, _) if s >= 500 => return Failure::Transient(format!("server error (HTTP {s})")),
            (s, _, _) => format!("unexpected HTTP status {s}"),
        };
        Failure::Fatal(why)
    }

    fn wait(&self, attempt: u32) {
        std::thread::sleep(self.backoff * 2u32.saturating_pow(attempt.min(6)));
    }

    /// Bytes `start..end` of `url`, resuming from where a broken body stopped.
    pub fn get_range(
        &self,
        url: &str,
        start: u64,
        end: u64,
        label: &Path,
    ) -> Result<Vec<u8>, SourceError> {
        let fail = |why: String| SourceError::Fetch {
            path: label.to_path_buf(),
            why,
        };
        let mut buf = Vec::with_capacity((end - start) as usize);
        let mut attempt = 0u32;
        let mut last = String::new();
        while (buf.len() as u64) < end - start {
            let from = start + buf.len() as u64;
            let before = buf.len();
            let outcome = self.send(url, Some((from, end))).and_then(|resp| {
                let status = resp.status().as_u16();
                match status {
                    206 => {
                        let cr = resp
                            .headers()
                            .get("content-range")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if !cr.starts_with(&format!("bytes {from}-")) {
                            return Err(Failure::Fatal(format!(
                                "server answered range {from}.. with Content-Range '{cr}'"
                            )));
                        }
                        read_body(resp, &mut buf, (end - start) as usize)
                    }
                    200 => Err(Failure::Fatal(
                        "the server ignores HTTP range requests (answered 200 to a ranged GET)"
                            .into(),
                    )),
                    s => Err(self.status_failure(s)),
                }
            });
            match outcome {
                Ok(()) => {}
                Err(Failure::Fatal(why)) => return Err(fail(why)),
                Err(Failure::Transient(why)) => {
                    // Progress resets the count: a body that keeps breaking but keeps moving
                    // forward is resumed to the end.
                    if buf.len() > before {
                        attempt = 0;
                    }
                    attempt += 1;
                    if attempt > self.retries {
                        return Err(fail(format!(
                            "gave up after {} attempts at byte {}: {why}",
                            self.retries,
                            start + buf.len() as u64
                        )));
                    }
                    last = why;
                    self.wait(attempt);
                }
            }
        }
        let _ = last;
        Ok(buf)
    }

    /// A whole (small) file; `Ok(None)` when the server says 404.
    pub fn get_optional(&self, url: &str, label: &Path) -> Result<Option<Vec<u8>>, SourceError> {
        let mut attempt = 0;
        loop {
            let mut buf = Vec::new();
            let outcome = self
                .send(url, None)
                .and_then(|resp| match resp.status().as_u16() {
                    200 => read_body(resp, &mut buf, usize::MAX).map(|_| true),
                    404 => Ok(false),
                    s => Err(self.status_failure(s)),
                });
            match outcome {
                Ok(true) => return Ok(Some(buf)),
                Ok(false) => return Ok(None),
                Err(Failure::Fatal(why)) => {
                    return Err(SourceError::Fetch {
                        path: label.to_path_buf(),
                        why,
                    })
                }
                Err(Failure::Transient(why)) => {
                    attempt += 1;
                    if attempt > self.retries {
                        return Err(SourceError::Fetch {
                            path: label.to_path_buf(),
                            why: format!("gave up after {} attempts: {why}", self.retries),
                        });
                    }
                    self.wait(attempt);
                }
            }
        }
    }

    /// A whole file that must exist.
    pub fn get(&self, url: &str, label: &Path) -> Result<Vec<u8>, SourceError> {
        self.get_optional(url, label)?
            .ok_or_else(|| SourceError::Fetch {
                path: label.to_path_buf(),
                why: self.not_found(),
            })
    }

    fn not_found(&self) -> String {
        match self.status_failure(404) {
            Failure::Fatal(w) | Failure::Transient(w) => w,
        }
    }

    /// Length of the file at `url` and whether the server honours range requests.
    pub fn probe(&self, url: &str, label: &Path) -> Result<(u64, bool), SourceError> {
        let mut attempt = 0;
        loop {
            let outcome = self.send(url, Some((0, 1))).and_then(|resp| {
                let h = |k: &str| {
                    resp.headers()
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                match resp.status().as_u16() {
                    206 => h("content-range")
                        .and_then(|cr| cr.rsplit('/').next().and_then(|n| n.parse().ok()))
                        .map(|n| (n, true))
                        .ok_or_else(|| Failure::Fatal("206 without a total length".into())),
                    200 => h("content-length")
                        .and_then(|n| n.parse().ok())
                        .map(|n| (n, false))
                        .ok_or_else(|| {
                            Failure::Fatal(
                                "server neither honours ranges nor sends Content-Length".into(),
                            )
                        }),
                    s => Err(self.status_failure(s)),
                }
            });
            match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(why)) => {
                    return Err(SourceError::Fetch {
                        path: label.to_path_buf(),
                        why,
                    })
                }
                Err(Failure::Transient(why)) => {
                    attempt += 1;
                    if attempt > self.retries {
                        return Err(SourceError::Fetch {
                            path: label.to_path_buf(),
                            why: format!("gave up after {} attempts: {why}", self.retries),
                        });
                    }
                    self.wait(attempt);
                }
            }
        }
    }

    /// Streams a whole file into `out` (for servers without range support and for the cache),
    /// resuming with a range request when the body breaks and the server allows it.
    pub fn download_to(
        &self,
        url: &str,
        len: u64,
        ranges_ok: bool,
        out: &mut dyn std::io::Write,
        label: &Path,
    ) -> Result<(), SourceError> {
        const CHUNK: u64 = 16 << 20;
        if ranges_ok {
            let mut at = 0;
            while at < len {
                let end = (at + CHUNK).min(len);
                let bytes = self.get_range(url, at, end, label)?;
                out.write_all(&bytes)
                    .map_err(|e| SourceError::io(label, e))?;
                at = end;
            }
            return Ok(());
        }
        let bytes = self.get(url, label)?;
        if bytes.len() as u64 != len {
            return Err(SourceError::Fetch {
                path: label.to_path_buf(),
                why: format!("expected {len} bytes, received {}", bytes.len()),
            });
        }
        out.write_all(&bytes).map_err(|e| SourceError::io(label, e))
    }
}

/// Appends the body to `buf`, up to `cap` bytes in all; a read error is transient (resumable).
fn read_body(
    resp: ureq::http::Response<ureq::Body>,
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<(), Failure> {
    let mut r = resp.into_body().into_reader();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let want = chunk.len().min(cap - buf.len());
        if want == 0 {
            return Ok(());
        }
        match r.read(&mut chunk[..want]) {
            Ok(0) => {
                return if cap == usize::MAX || buf.len() == cap {
                    Ok(())
                } else {
                    Err(Failure::Transient(format!(
                        "body ended early after {} bytes",
                        buf.len()
                    )))
                }
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                DOWNLOADED.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::Transient(format!("connection broke: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_normalises_ports() {
        assert_eq!(
            authority("https://huggingface.co/a/b").unwrap(),
            "huggingface.co:443"
        );
        assert_eq!(
            authority("http://127.0.0.1:8080/x?y").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(authority("http://Host").unwrap(), "host:80");
        assert!(authority("nourl").is_none());
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("h:1", "hf_secret_value");
        assert!(!format!("{t:?}").contains("hf_secret_value"));
    }
}
