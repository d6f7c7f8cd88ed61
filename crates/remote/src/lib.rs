//! Where models live besides local files: the Hugging Face Hub (`hf://org/name[@rev][/file]`),
//! a direct `http(s)://` link to a safetensors or GGUF file, and the local Ollama model store
//! (`ollama://name[:tag]`). [`open`] turns any locator, local paths included, into a
//! [`TensorSource`] that reads one tensor at a time, fetching ahead over HTTP while the previous
//! tensor is quantized.

pub mod blob;
pub mod http;
pub mod hub;
pub mod ollama;

pub use http::bytes_downloaded;
pub use hub::HubConfig;

use adaptq_source::blob::MmapBlob;
use adaptq_source::{Blob, Result, SourceError, TensorSource};
use http::{Client, Flavor};
use std::path::{Path, PathBuf};

/// An opened model and what must live as long as it.
pub struct Opened {
    pub source: Box<dyn TensorSource>,
    /// What to record in the manifest: the hub commit, the URL without its query, or the
    /// local file name. Never a token, never an absolute local path.
    pub locator: String,
    /// Temp folder of downloaded companion files (removed when dropped, after `source`).
    pub _keep: Option<tempfile::TempDir>,
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
        let p = Path::new(loc);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| loc.to_string());
        Ok(Opened {
            source: adaptq_source::open(p)?,
            locator: format!("file:{name}"),
            _keep: None,
        })
    }
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
    let tmp = tempfile::Builder::new()
        .prefix("adaptq-url-")
        .tempdir()
        .map_err(|e| SourceError::io(Path::new("temp folder"), e))?;
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
            if let Some(bytes) = client.get_optional(&format!("{base}/{f}"), &l)? {
                std::fs::write(tmp.path().join(f), bytes)
                    .map_err(|e| SourceError::io(tmp.path(), e))?;
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
        let dest = tmp.path().join(path_part);
        download_atomic(&client, url, len, false, &dest, &label)?;
        Box::new(MmapBlob::open(&dest)?)
    };
    let dir = tmp.path().to_path_buf();
    assemble(vec![blob], is_gguf, dir, Some(tmp), shown)
}

/// Downloads a whole file to `dest` through a temp name, so a broken run never leaves a file
/// that looks complete.
pub(crate) fn download_atomic(
    client: &Client,
    url: &str,
    len: u64,
    ranges_ok: bool,
    dest: &Path,
    label: &Path,
) -> Result<()> {
    let tmp = dest.with_extension("incomplete");
    let f = std::fs::File::create(&tmp).map_err(|e| SourceError::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(f);
    client.download_to(url, len, ranges_ok, &mut w, label)?;
    use std::io::Write;
    w.flush().map_err(|e| SourceError::io(&tmp, e))?;
    drop(w);
    std::fs::rename(&tmp, dest).map_err(|e| SourceError::io(dest, e))
}

pub(crate) fn assemble(
    mut blobs: Vec<Box<dyn Blob>>,
    is_gguf: bool,
    dir: PathBuf,
    keep: Option<tempfile::TempDir>,
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
}
