//! Where models live besides local files: the Hugging Face Hub (`hf://org/name[@rev][/file]`),
//! a direct `http(s)://` link to a safetensors or GGUF file, and the local Ollama model store
//! (`ollama://name[:tag]`). [`open`] turns any locator, local paths included, into a
//! [`TensorSource`] that reads one tensor at a time, fetching ahead over HTTP while the previous
//! tensor is quantized.

pub mod blob;
pub mod http;
pub mod hub;
pub mod ollama;
pub mod scratch;

pub use http::bytes_downloaded;
pub use hub::HubConfig;
pub use scratch::TempFolder;

use adaptq_source::blob::MmapBlob;
use adaptq_source::{Blob, Result, SourceError, TensorSource};
use http::{Client, Flavor};
use std::path::{Path, PathBuf};

/// Most bytes of a companion file (config, tokenizer, index, licence) held in memory. The
/// largest real tokenizer.json files are some 35 MB; anything past this is not a companion
/// file but a way to exhaust memory.
pub const COMPANION_MAX: u64 = 64 << 20;

/// An opened model and what must live as long as it.
pub struct Opened {
    pub source: Box<dyn TensorSource>,
    /// What to record in the manifest: the hub commit, the URL without its query, or the
    /// local file name. Never a token, never an absolute local path.
    pub locator: String,
    /// Temp folder of downloaded companion files (removed when dropped, after `source`).
    pub _keep: Option<TempFolder>,
}

/// True for locators that name a remote or store model rather than a local path.
pub fn is_remote(loc: &str) -> bool {
    ["hf://", "http://", "https://", "ollama://"]
        .iter()
        .any(|p| loc.starts_with(p))
}

/// Opens a model from any locator, reading hub settings from the environment.
pub fn open(loc: &str) -> Result<Opened> {
    open_with(loc, &HubConfig::from_env())
}

/// Opens a model from any locator with explicit hub settings.
pub fn open_with(loc: &str, hub_cfg: &HubConfig) -> Result<Opened> {
    if loc.starts_with("hf://") {
        hub::open(loc, hub_cfg)
    } else if loc.starts_with("http://") || loc.starts_with("https://") {
        open_url(loc)
    } else if loc.starts_with("ollama://") {
        ollama::open(loc, &ollama::models_dir())
    } else {
        Ok(Opened {
            source: adaptq_source::open(Path::new(loc))?,
            locator: locator_for(loc),
            _keep: None,
        })
    }
}

/// The locator recorded in a manifest: never an absolute path (it would break determinism
/// across machines and leak the user's folder layout), so a local file is named by file name;
/// remote locators (and ones already `file:`) are kept as given.
pub fn locator_for(given: &str) -> String {
    if given.contains("://") || given.starts_with("file:") {
        return given.to_string();
    }
    let name = Path::new(given)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| given.to_string());
    format!("file:{name}")
}

/// A plain name part of a hub or Ollama locator: letters, digits, `-`, `_` and `.`, never `.`
/// or `..` alone, so it can name a cache folder and a URL path part without escaping either.
pub(crate) fn plain_name_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The URL as it may be recorded: no user info, no query (signed links carry secrets there).
pub fn public_url(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or(url);
    match base.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit('@').next().unwrap_or(auth);
            format!("{scheme}://{host}{path}")
        }
        None => base.to_string(),
    }
}

fn open_url(url: &str) -> Result<Opened> {
    let shown = public_url(url);
    let label = PathBuf::from(&shown);
    let path_part = shown.rsplit('/').next().unwrap_or("");
    let is_gguf = path_part.ends_with(".gguf");
    if !is_gguf && !path_part.ends_with(".safetensors") {
        return Err(SourceError::Unrecognized {
            path: label,
            why: "a URL must name a .gguf or .safetensors file".into(),
        });
    }
    let client = Client::new(None, Flavor::Plain);
    let (len, ranges_ok) = client.probe(url, &label)?;
    let tmp = TempFolder::new("adaptq-url-")?;
    if !is_gguf {
        // A safetensors link needs its config.json (and tokenizer) from the same folder.
        let base = &url[..url
            .split(['?', '#'])
            .next()
            .unwrap_or(url)
            .rfind('/')
            .unwrap_or(0)];
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "README.md",
            "LICENSE",
        ] {
            let l = PathBuf::from(format!("{}/{f}", public_url(base)));
            if let Some(bytes) = client.get_optional(&format!("{base}/{f}"), &l, COMPANION_MAX)? {
                scratch::write_via_partial(tmp.path(), f, false, |w| write_all(w, &bytes, &l))?;
            }
        }
    }
    let blob: Box<dyn Blob> = if ranges_ok {
        Box::new(blob::HttpBlob::new(
            client,
            url.to_string(),
            label.clone(),
            len,
        ))
    } else {
        eprintln!(
            "note: {shown} does not support range requests; downloading the whole file ({:.1} MB) before reading it",
            len as f64 / 1e6
        );
        if !adaptq_loader::names::is_plain_relative(path_part, false) {
            return Err(SourceError::Unrecognized {
                path: label,
                why: "the URL's file name is not a plain file name".into(),
            });
        }
        download_atomic(&client, url, len, false, tmp.path(), path_part, &label)?;
        Box::new(MmapBlob::open(&tmp.path().join(path_part))?)
    };
    let dir = tmp.path().to_path_buf();
    assemble(vec![blob], is_gguf, dir, Some(tmp), shown)
}

/// Downloads a whole file to `root/rel` through its partial (see
/// [`scratch::write_via_partial`]), so a broken run never leaves a file that looks complete.
pub(crate) fn download_atomic(
    client: &Client,
    url: &str,
    len: u64,
    ranges_ok: bool,
    root: &Path,
    rel: &str,
    label: &Path,
) -> Result<()> {
    scratch::write_via_partial(root, rel, true, |f| {
        client.download_to(url, len, ranges_ok, f, label)
    })
}

/// `write_all` with the error told against `label`.
pub(crate) fn write_all(f: &mut std::fs::File, bytes: &[u8], label: &Path) -> Result<()> {
    use std::io::Write;
    f.write_all(bytes).map_err(|e| SourceError::io(label, e))
}

pub(crate) fn assemble(
    mut blobs: Vec<Box<dyn Blob>>,
    is_gguf: bool,
    dir: PathBuf,
    keep: Option<TempFolder>,
    locator: String,
) -> Result<Opened> {
    let source: Box<dyn TensorSource> = if is_gguf {
        let blob = blobs.pop().expect("one GGUF blob");
        Box::new(adaptq_source::gguf::GgufSource::from_blob(blob, Some(dir))?)
    } else {
        Box::new(adaptq_source::safetensors::SafetensorsSource::from_blobs(
            dir, blobs,
        )?)
    };
    Ok(Opened {
        source,
        locator,
        _keep: keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn public_url_drops_secrets() {
        assert_eq!(
            public_url("https://user:pw@host:8/a/b.gguf?X-Sig=abc#f"),
            "https://host:8/a/b.gguf"
        );
        assert_eq!(
            public_url("http://h/x.safetensors"),
            "http://h/x.safetensors"
        );
    }

    /// A download that breaks leaves neither the file nor its partial behind.
    #[test]
    fn failed_download_leaves_nothing() {
        use adaptq_testutil::hub_server::{Hostile, HubServer, ServerConfig};
        let server = HubServer::start(ServerConfig {
            hostile: vec![(
                "/w.gguf".into(),
                Hostile::Drip {
                    every: std::time::Duration::from_secs(5),
                    len: 1 << 20,
                },
            )],
            ..Default::default()
        });
        let mut client = Client::new(None, Flavor::Plain);
        client.stall_timeout = std::time::Duration::from_millis(200);
        client.retries = 1;
        client.backoff = std::time::Duration::from_millis(1);
        let t = tempfile::tempdir().unwrap();
        let url = format!("{}/w.gguf", server.url());
        let (len, ranges) = client.probe(&url, Path::new("w")).unwrap();
        let e = download_atomic(
            &client,
            &url,
            len,
            ranges,
            t.path(),
            "sub/w.gguf",
            Path::new("w"),
        );
        assert!(e.is_err());
        assert!(!t.path().join("sub/w.gguf").exists());
        assert!(!t
            .path()
            .join(scratch::PARTIAL_DIR)
            .join("sub/w.gguf")
            .exists());
    }
}
