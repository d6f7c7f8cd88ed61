//! HTTP with the properties a multi-GB download needs: range requests, retries with backoff on
//! transient failures, resume of a body that broke mid-way, and a bearer token that is sent only
//! to the host it belongs to and never appears in a message.

use adaptq_source::SourceError;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most time a whole body held in memory (a listing, config, tokenizer, index, licence) may
/// take to arrive once its headers are in. Such files are tens of MiB at most, so this allows
/// a slow link; it exists so that a server dripping bytes cannot hold a run forever.
/// `ADAPTQ_HTTP_TIMEOUT` (seconds) overrides it.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest a large (ranged or whole-file) body may go without a byte before the connection
/// is taken as dead and the body resumed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Slowest average rate, in bytes per second, accepted for a large body: its budget is
/// [`BODY_TIMEOUT`] plus its length at this rate, so a server that sends a byte now and then
/// is given up on within a bound that grows only with the size asked for.
pub const MIN_RATE: u64 = 64 << 10;

/// Least progress, in bytes, that counts as moving forward when a ranged body breaks; less
/// counts as a failed attempt, so a dripping server uses up the retries.
const MIN_PROGRESS: u64 = 64 << 10;

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
    /// Budget for a whole in-memory body, and the base of a large body's budget
    /// ([`BODY_TIMEOUT`]).
    pub body_timeout: Duration,
    /// See [`STALL_TIMEOUT`].
    pub stall_timeout: Duration,
}

enum Failure {
    /// Worth another try (connection reset, timeout, 5xx, 429).
    Transient(String),
    Fatal(String),
    /// A body ran past its time budget: worth resuming for a large body, not worth waiting
    /// for again for a small one.
    Slow(String),
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
    /// A client with the default limits; `ADAPTQ_HTTP_TIMEOUT` (seconds) replaces
    /// [`BODY_TIMEOUT`] and caps [`STALL_TIMEOUT`], for slow links (or impatient tests).
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
        let body_timeout = std::env::var("ADAPTQ_HTTP_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(BODY_TIMEOUT);
        Client {
            agent,
            token,
            retries: 6,
            backoff: Duration::from_millis(200),
            flavor,
            body_timeout,
            stall_timeout: STALL_TIMEOUT.min(body_timeout),
        }
    }

    /// Time budget for a large body of `len` bytes (see [`MIN_RATE`]).
    fn large_budget(&self, len: u64) -> Duration {
        self.body_timeout
            .saturating_add(Duration::from_secs(len / MIN_RATE))
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// One GET; `body` bounds the whole body once the headers are in, `stall` each read.
    fn send(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
        body: Duration,
        stall: Option<Duration>,
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
        let req = req
            .config()
            .timeout_recv_body(Some(body))
            .timeout_per_read(stall)
            .build();
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
        let want = end
            .checked_sub(start)
            .ok_or_else(|| fail(format!("empty byte range {start}..{end}")))?;
        let cap = usize::try_from(want)
            .map_err(|_| fail(format!("a {want}-byte range does not fit in memory")))?;
        // The length comes from the server: reserve a bounded amount and grow as bytes arrive.
        let mut buf = Vec::with_capacity(cap.min(16 << 20));
        let mut attempt = 0u32;
        while buf.len() < cap {
            let from = start + buf.len() as u64;
            let before = buf.len();
            let budget = self.large_budget(end - from);
            let outcome = self
                .send(url, Some((from, end)), budget, Some(self.stall_timeout))
                .and_then(|resp| {
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
                            let left = (cap - buf.len()) as u64;
                            read_body(resp, left, &mut |b| {
                                buf.extend_from_slice(b);
                                Ok(())
                            })
                            .and_then(|got| {
                                if got < left {
                                    Err(Failure::Transient(format!(
                                        "body ended early after {got} of {left} bytes"
                                    )))
                                } else {
                                    Ok(())
                                }
                            })
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
                Err(Failure::Transient(why) | Failure::Slow(why)) => {
                    // Real progress resets the count: a body that keeps breaking but keeps
                    // moving forward is resumed to the end, one that only trickles is not.
                    let moved = (buf.len() - before) as u64;
                    if moved >= MIN_PROGRESS.min((cap - before) as u64) {
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
                    self.wait(attempt);
                }
            }
        }
        Ok(buf)
    }

    /// A whole file held in memory, at most `cap` bytes (a longer one is refused, whether
    /// or not its length was announced); `Ok(None)` when the server says 404. The body must
    /// arrive within [`Client::body_timeout`]; one that does not is not tried again, since a
    /// server that answers this slowly would only make the run wait as long once more.
    pub fn get_optional(
        &self,
        url: &str,
        label: &Path,
        cap: u64,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        self.retrying(label, || {
            let mut buf = Vec::new();
            let outcome = self
                .send(url, None, self.body_timeout, None)
                .and_then(|resp| match resp.status().as_u16() {
                    200 => {
                        let announced = resp
                            .headers()
                            .get("content-length")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok());
                        if let Some(n) = announced.filter(|&n| n > cap) {
                            return Err(Failure::Fatal(too_big(cap, &format!("is {n} bytes"))));
                        }
                        let got = read_body(resp, cap.saturating_add(1), &mut |b| {
                            buf.extend_from_slice(b);
                            Ok(())
                        })?;
                        if got > cap {
                            return Err(Failure::Fatal(too_big(cap, "goes on")));
                        }
                        Ok(true)
                    }
                    404 => Ok(false),
                    s => Err(self.status_failure(s)),
                });
            // A small file that is too slow is not worth waiting for again.
            Ok(match outcome {
                Ok(found) => Ok(found.then_some(buf)),
                Err(Failure::Slow(_)) => Err(Failure::Fatal(format!(
                    "the file did not arrive within {} s ({} bytes received): the server is stalled or too slow (ADAPTQ_HTTP_TIMEOUT sets this limit in seconds)",
                    self.body_timeout.as_secs_f64(),
                    buf.len()
                ))),
                Err(e) => Err(e),
            })
        })
    }

    /// A whole file that must exist, held in memory (see [`Client::get_optional`]).
    pub fn get(&self, url: &str, label: &Path, cap: u64) -> Result<Vec<u8>, SourceError> {
        self.get_optional(url, label, cap)?
            .ok_or_else(|| SourceError::Fetch {
                path: label.to_path_buf(),
                why: self.not_found(),
            })
    }

    fn not_found(&self) -> String {
        match self.status_failure(404) {
            Failure::Fatal(w) | Failure::Transient(w) | Failure::Slow(w) => w,
        }
    }

    /// Length of the file at `url` and whether the server honours range requests.
    pub fn probe(&self, url: &str, label: &Path) -> Result<(u64, bool), SourceError> {
        self.retrying(label, || {
            // The body (one byte, or a whole file from a server without ranges) is not read.
            Ok(self
                .send(url, Some((0, 1)), self.body_timeout, None)
                .and_then(|resp| {
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
                }))
        })
    }

    /// Streams a whole file of `len` bytes into `out` (for servers without range support and
    /// for the cache), never holding more than one chunk in memory. With ranges a broken body
    /// is resumed; without, the file is started again (and must be exactly `len` bytes).
    pub fn download_to(
        &self,
        url: &str,
        len: u64,
        ranges_ok: bool,
        out: &mut std::fs::File,
        label: &Path,
    ) -> Result<(), SourceError> {
        const CHUNK: u64 = 16 << 20;
        if ranges_ok {
            let mut at = 0;
            while at < len {
                let end = at.saturating_add(CHUNK).min(len);
                let bytes = self.get_range(url, at, end, label)?;
                out.write_all(&bytes)
                    .map_err(|e| SourceError::io(label, e))?;
                at = end;
            }
            return Ok(());
        }
        self.retrying(label, || {
            out.set_len(0)
                .and_then(|()| out.rewind())
                .map_err(|e| SourceError::io(label, e))?;
            let mut w = std::io::BufWriter::new(&mut *out);
            let outcome = self
                .send(url, None, self.large_budget(len), Some(self.stall_timeout))
                .and_then(|resp| match resp.status().as_u16() {
                    200 => read_body(resp, len.saturating_add(1), &mut |b| {
                        w.write_all(b)
                            .map_err(|e| Failure::Fatal(format!("could not write it: {e}")))
                    }),
                    s => Err(self.status_failure(s)),
                })
                .and_then(|got| match got.cmp(&len) {
                    std::cmp::Ordering::Equal => w
                        .flush()
                        .map_err(|e| Failure::Fatal(format!("could not write it: {e}"))),
                    std::cmp::Ordering::Greater => Err(Failure::Fatal(format!(
                        "the server sends more than the {len} bytes it announced"
                    ))),
                    std::cmp::Ordering::Less => Err(Failure::Transient(format!(
                        "body ended early after {got} of {len} bytes"
                    ))),
                });
            drop(w);
            Ok(outcome)
        })
    }

    /// Runs `once` until it succeeds: a fatal failure (or an error of `once` itself) ends it,
    /// a transient or slow one is tried again after a backoff, at most `retries` times. The
    /// whole-file fetches share this; [`Client::get_range`] resumes from its last byte instead.
    fn retrying<T>(
        &self,
        label: &Path,
        mut once: impl FnMut() -> Result<Result<T, Failure>, SourceError>,
    ) -> Result<T, SourceError> {
        let fail = |why: String| SourceError::Fetch {
            path: label.to_path_buf(),
            why,
        };
        let mut attempt = 0;
        loop {
            match once()? {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(why)) => return Err(fail(why)),
                Err(Failure::Transient(why) | Failure::Slow(why)) => {
                    attempt += 1;
                    if attempt > self.retries {
                        return Err(fail(format!(
                            "gave up after {} attempts: {why}",
                            self.retries
                        )));
                    }
                    self.wait(attempt);
                }
            }
        }
    }
}

fn too_big(cap: u64, what: &str) -> String {
    format!(
        "the file {what}, past the {} MiB limit for a file of this kind; refusing to hold it in memory",
        cap >> 20
    )
}

/// Feeds the body to `sink`, reading at most `max` bytes, and returns how many came before
/// the body ended. A read error is transient (resumable), a timeout [`Failure::Slow`].
fn read_body(
    resp: ureq::http::Response<ureq::Body>,
    max: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let mut r = resp.into_body().into_reader();
    let mut chunk = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let want = (chunk.len() as u64).min(max - got) as usize;
        if want == 0 {
            return Ok(got);
        }
        match r.read(&mut chunk[..want]) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                DOWNLOADED.fetch_add(n as u64, Ordering::Relaxed);
                sink(&chunk[..n])?;
                got += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let timed_out = e.kind() == std::io::ErrorKind::TimedOut
                    || e.get_ref()
                        .and_then(|i| i.downcast_ref::<ureq::Error>())
                        .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
                return Err(if timed_out {
                    Failure::Slow(format!("body too slow after {got} bytes: {e}"))
                } else {
                    Failure::Transient(format!("connection broke: {e}"))
                });
            }
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
