//! A local stand-in for the Hugging Face Hub and for plain file servers, on 127.0.0.1, so the
//! remote-source tests and benches never touch the internet.
//!
//! It implements the subset of the hub that adaptq uses (`/api/models/{repo}/revision/{rev}`
//! and `/{repo}/resolve/{rev}/{file}`), byte ranges, bearer-token auth, a bandwidth limit and
//! injected faults: 5xx answers, one connection dropped mid-body, a slow first byte, and hostile
//! answers (listings naming paths outside the repository, bodies that drip or never end).
//! Hand-written on std's TcpListener because the test needs exact control of each byte sent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A repository the server pretends to host.
#[derive(Clone, Debug)]
pub struct Repo {
    pub id: String,
    pub sha: String,
    /// (name in the repository, file on disk)
    pub files: Vec<(String, PathBuf)>,
}

#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    pub repos: Vec<Repo>,
    /// Served as `/files/{name}` (for plain-URL sources).
    pub static_dir: Option<PathBuf>,
    /// When set, hub routes answer 401 unless `Authorization: Bearer {token}` is sent.
    pub token: Option<String>,
    /// Answer this many file requests with 503 before serving.
    pub fail_first: u32,
    /// Close the connection once, after this many body bytes of the first body that is longer.
    pub drop_after: Option<u64>,
    /// Delay before each answer.
    pub delay: Duration,
    /// Bandwidth limit in bytes per second, over all connections.
    pub rate: Option<u64>,
    /// Ignore Range headers (answer 200 with the whole file).
    pub no_ranges: bool,
    /// Serve a repository at any revision name, as a hub resolves branch names.
    pub any_revision: bool,
    /// Requests whose path (without the query) ends with the string get this answer instead.
    pub hostile: Vec<(String, Hostile)>,
}

/// A body no honest server sends.
#[derive(Clone, Debug)]
pub enum Hostile {
    /// `Content-Length: len` (206 with a Content-Range when a range is asked for), then one
    /// byte every `every`.
    Drip { every: Duration, len: u64 },
    /// A chunked body (no Content-Length) of `len` bytes of spaces, made as it is sent.
    Chunked { len: u64 },
}

/// What the server saw and did.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub failed_503: AtomicU32,
    pub dropped: AtomicU32,
    pub bytes_sent: AtomicU64,
    /// Every request line with whether an Authorization header came with it.
    pub log: Mutex<Vec<(String, bool)>>,
}

pub struct HubServer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

impl HubServer {
    pub fn start(cfg: ServerConfig) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        Self::serve(listener, cfg)
    }

    pub fn serve(listener: TcpListener, cfg: ServerConfig) -> HubServer {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            cfg,
            stats: stats.clone(),
            dropped_once: AtomicBool::new(false),
            throttle: Mutex::new((Instant::now(), 0)),
        });
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    let s = shared.clone();
                    std::thread::spawn(move || {
                        let _ = s.handle(c);
                    });
                }
            }
        });
        HubServer { addr, stats, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

struct Shared {
    cfg: ServerConfig,
    stats: Arc<Stats>,
    dropped_once: AtomicBool,
    /// (window start, bytes sent in window) for the bandwidth limit.
    throttle: Mutex<(Instant, u64)>,
}

struct Request {
    path: String,
    headers: BTreeMap<String, String>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let _method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    Ok(Some(Request { path, headers }))
}

impl Shared {
    fn handle(&self, stream: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let Some(req) = read_request(&mut reader)? else {
            return Ok(());
        };
        let mut out = stream;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let auth = req.headers.get("authorization").cloned();
        self.stats
            .log
            .lock()
            .unwrap()
            .push((req.path.clone(), auth.is_some()));
        if !self.cfg.delay.is_zero() {
            std::thread::sleep(self.cfg.delay);
        }
        let path = req.path.split('?').next().unwrap_or("").to_string();
        if let Some((_, h)) = self.cfg.hostile.iter().find(|(k, _)| path.ends_with(k)) {
            return self.send_hostile(&mut out, h, &req);
        }
        if let Some(rest) = path.strip_prefix("/files/") {
            let Some(dir) = &self.cfg.static_dir else {
                return respond(&mut out, 404, &[], b"no static files");
            };
            if rest.contains("..") {
                return respond(&mut out, 404, &[], b"");
            }
            return self.send_file(&mut out, &dir.join(rest), &req);
        }
        if let Some(t) = &self.cfg.token {
            if auth.as_deref() != Some(&format!("Bearer {t}")) {
                return respond(&mut out, 401, &[], b"{\"error\":\"Invalid credentials\"}");
            }
        }
        if let Some(rest) = path.strip_prefix("/api/models/") {
            // {org}/{name}/revision/{rev}
            let parts: Vec<&str> = rest.split('/').collect();
            if let [org, name, "revision", rev] = parts.as_slice() {
                let id = format!("{org}/{name}");
                if let Some(repo) = self.repo(&id, rev) {
                    let siblings: Vec<String> = repo
                        .files
                        .iter()
                        .map(|(n, _)| format!("{{\"rfilename\":{}}}", json_str(n)))
                        .collect();
                    let body = format!(
                        "{{\"id\":\"{id}\",\"sha\":\"{}\",\"siblings\":[{}]}}",
                        repo.sha,
                        siblings.join(",")
                    );
                    return respond(&mut out, 200, &[], body.as_bytes());
                }
            }
            return respond(&mut out, 404, &[], b"{\"error\":\"Repository not found\"}");
        }
        // /{org}/{name}/resolve/{rev}/{file...}
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if let [org, name, "resolve", rev, file] = parts.as_slice() {
            let id = format!("{org}/{name}");
            if let Some(repo) = self.repo(&id, rev) {
                if let Some((_, p)) = repo.files.iter().find(|(n, _)| n == file) {
                    return self.send_file(&mut out, p, &req);
                }
            }
        }
        respond(&mut out, 404, &[], b"{\"error\":\"Entry not found\"}")
    }

    fn repo(&self, id: &str, rev: &str) -> Option<&Repo> {
        self.cfg
            .repos
            .iter()
            .find(|r| r.id == id && (rev == "main" || rev == r.sha || self.cfg.any_revision))
    }

    fn send_hostile(&self, out: &mut TcpStream, h: &Hostile, req: &Request) -> std::io::Result<()> {
        match *h {
            Hostile::Drip { every, len } => {
                let range = req
                    .headers
                    .get("range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                    .filter(|&(a, b)| a <= b && b < len);
                let n = match range {
                    Some((a, b)) => {
                        write_head(
                            out,
                            206,
                            &[
                                ("Content-Length", (b - a + 1).to_string()),
                                ("Content-Range", format!("bytes {a}-{b}/{len}")),
                            ],
                        )?;
                        b - a + 1
                    }
                    None => {
                        write_head(out, 200, &[("Content-Length", len.to_string())])?;
                        len
                    }
                };
                out.flush()?;
                for _ in 0..n {
                    std::thread::sleep(every);
                    out.write_all(b" ")?;
                    out.flush()?;
                    self.stats.bytes_sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Hostile::Chunked { len } => {
                write_head(out, 200, &[("Transfer-Encoding", "chunked".into())])?;
                let block = vec![b' '; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = (block.len() as u64).min(left) as usize;
                    out.write_all(format!("{n:x}\r\n").as_bytes())?;
                    out.write_all(&block[..n])?;
                    out.write_all(b"\r\n")?;
                    self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n as u64;
                }
                out.write_all(b"0\r\n\r\n")?;
                out.flush()
            }
        }
    }

    fn send_file(&self, out: &mut TcpStream, p: &PathBuf, req: &Request) -> std::io::Result<()> {
        let Ok(mut f) = std::fs::File::open(p) else {
            return respond(out, 404, &[], b"");
        };
        if self.stats.failed_503.load(Ordering::Relaxed) < self.cfg.fail_first {
            self.stats.failed_503.fetch_add(1, Ordering::Relaxed);
            return respond(out, 503, &[], b"try later");
        }
        let len = f.metadata()?.len();
        let range = req
            .headers
            .get("range")
            .filter(|_| !self.cfg.no_ranges)
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                let a: u64 = a.parse().ok()?;
                let b: u64 = if b.is_empty() {
                    len - 1
                } else {
                    b.parse().ok()?
                };
                Some((a, b.min(len.saturating_sub(1))))
            });
        let (status, start, end) = match range {
            Some((a, b)) if a <= b && a < len => (206, a, b + 1),
            Some(_) => {
                return respond(
                    out,
                    416,
                    &[("Content-Range", format!("bytes */{len}"))],
                    b"",
                )
            }
            None => (200, 0, len),
        };
        let mut headers = vec![("Content-Length", (end - start).to_string())];
        if status == 206 {
            headers.push(("Content-Range", format!("bytes {start}-{}/{len}", end - 1)));
        } else if !self.cfg.no_ranges {
            headers.push(("Accept-Ranges", "bytes".into()));
        }
        write_head(out, status, &headers)?;
        f.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        let drop_at = self
            .cfg
            .drop_after
            .filter(|&d| left > d && !self.dropped_once.load(Ordering::Relaxed));
        while left > 0 {
            let n = (buf.len() as u64).min(left) as usize;
            f.read_exact(&mut buf[..n])?;
            if let Some(d) = drop_at {
                if sent + n as u64 > d && !self.dropped_once.swap(true, Ordering::Relaxed) {
                    let k = (d - sent) as usize;
                    out.write_all(&buf[..k])?;
                    out.flush()?;
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
            }
            self.throttle(n as u64);
            out.write_all(&buf[..n])?;
            self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            sent += n as u64;
            left -= n as u64;
        }
        out.flush()
    }

    /// Sleeps so that bytes sent by all connections stay under the rate.
    fn throttle(&self, n: u64) {
        let Some(rate) = self.cfg.rate else { return };
        let wait = {
            let mut t = self.throttle.lock().unwrap();
            t.1 += n;
            let due = Duration::from_secs_f64(t.1 as f64 / rate as f64);
            due.saturating_sub(t.0.elapsed())
        };
        std::thread::sleep(wait);
    }
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn write_head(out: &mut TcpStream, status: u16, headers: &[(&str, String)]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut h = headers.to_vec();
    h.push(("Content-Length", body.len().to_string()));
    write_head(out, status, &h)?;
    out.write_all(body)?;
    out.flush()
}

/// A fake repository holding every file of a local folder (sub-folders skipped).
pub fn repo_from_dir(id: &str, sha: &str, dir: &std::path::Path) -> Repo {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .expect("fixture folder")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), p))
        .collect();
    files.sort();
    Repo {
        id: id.into(),
        sha: sha.into(),
        files,
    }
}
