//! The local Ollama model store: `ollama://name[:tag]` resolved through
//! `manifests/{host}/{namespace}/{model}/{tag}` to the GGUF blob `blobs/sha256-{hex}`, as
//! Ollama lays it out under `$OLLAMA_MODELS` (default `~/.ollama/models`). No server needed.

use crate::Opened;
use adaptq_source::blob::MmapBlob;
use adaptq_source::{Result, SourceError};
use std::path::{Path, PathBuf};

const MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const LICENSE_LAYER: &str = "application/vnd.ollama.image.license";

/// Most bytes of a manifest read: real ones are a few hundred bytes of JSON listing layers.
const MANIFEST_MAX: u64 = 4 << 20;

/// `$OLLAMA_MODELS`, else `$HOME/.ollama/models`.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OLLAMA_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".ollama/models")
}

/// `name[:tag]` → (host, namespace, model, tag), with Ollama's defaults.
pub fn parse(loc: &str) -> Result<(String, String, String, String)> {
    let rest = loc.strip_prefix("ollama://").unwrap_or(loc);
    let bad = |why: &str| SourceError::Unrecognized {
        path: loc.into(),
        why: format!("{why} (expected ollama://name[:tag], e.g. ollama://smollm2:135m)"),
    };
    let (path, tag) = match rest.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (rest, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let ok = crate::plain_name_part;
    if !ok(tag) || parts.iter().any(|p| !ok(p)) {
        return Err(bad("names and tags hold letters, digits, '-', '_' and '.'"));
    }
    let (host, ns, model) = match parts.as_slice() {
        [m] => ("registry.ollama.ai", "library", *m),
        [n, m] => ("registry.ollama.ai", *n, *m),
        [h, n, m] => (*h, *n, *m),
        _ => return Err(bad("too many '/' parts")),
    };
    Ok((host.into(), ns.into(), model.into(), tag.into()))
}

fn blob_path(models: &Path, digest: &str, loc: &str) -> Result<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    match hex {
        Some(h) => Ok(models.join("blobs").join(format!("sha256-{h}"))),
        None => Err(SourceError::Unrecognized {
            path: loc.into(),
            why: format!("manifest layer digest '{digest}' is not sha256:<64 hex>"),
        }),
    }
}

/// Opens `ollama://…` from the store at `models`.
pub fn open(loc: &str, models: &Path) -> Result<Opened> {
    let (host, ns, model, tag) = parse(loc)?;
    let manifest = models
        .join("manifests")
        .join(&host)
        .join(&ns)
        .join(&model)
        .join(&tag);
    // Bounded and regular-file-only, so a FIFO or a link to `/dev/zero` in the store is an
    // error rather than a hang or an out-of-memory abort.
    let text = adaptq_source::blob::read_small(&manifest, MANIFEST_MAX)?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| SourceError::corrupt(&manifest, format!("invalid JSON: {e}")))?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or_else(|| SourceError::corrupt(&manifest, "no \"layers\" array"))?;
    let find = |kind: &str| {
        layers
            .iter()
            .find(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(kind))
    };
    let layer = find(MODEL_LAYER).ok_or_else(|| {
        SourceError::corrupt(&manifest, format!("no layer of type {MODEL_LAYER}"))
    })?;
    let digest = layer.get("digest").and_then(|d| d.as_str()).unwrap_or("");
    let path = blob_path(models, digest, loc)?;
    let meta =
        std::fs::metadata(&path).map_err(|_| SourceError::NotFound { path: path.clone() })?;
    if let Some(size) = layer.get("size").and_then(|s| s.as_u64()) {
        if size != meta.len() {
            return Err(SourceError::corrupt(
                &path,
                format!("blob has {} bytes but the manifest says {size}", meta.len()),
            ));
        }
    }
    let tmp = crate::TempFolder::new("adaptq-ollama-")?;
    if let Some(l) = find(LICENSE_LAYER) {
        let lp = blob_path(
            models,
            l.get("digest").and_then(|d| d.as_str()).unwrap_or(""),
            loc,
        )?;
        if let Ok(bytes) = adaptq_source::blob::read_small(&lp, crate::COMPANION_MAX) {
            std::fs::write(tmp.path().join("LICENSE"), bytes)
                .map_err(|e| SourceError::io(tmp.path(), e))?;
        }
    }
    let blob = MmapBlob::open(&path)?;
    let source =
        adaptq_source::gguf::GgufSource::from_blob(Box::new(blob), Some(tmp.path().to_path_buf()))?;
    let short = if ns == "library" && host == "registry.ollama.ai" {
        model.clone()
    } else {
        format!("{ns}/{model}")
    };
    Ok(Opened {
        source: Box::new(source),
        locator: format!("ollama://{short}:{tag}"),
        _keep: Some(tmp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_names() {
        let p = |s: &str| parse(s).unwrap();
        assert_eq!(p("ollama://smollm2").3, "latest");
        assert_eq!(p("ollama://smollm2:135m").2, "smollm2");
        assert_eq!(p("ollama://me/m:q4").1, "me");
        assert_eq!(p("ollama://host.io/ns/m:t").0, "host.io");
        assert!(parse("ollama://../x").is_err());
        assert!(parse("ollama://a/b/c/d").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn manifest_that_is_not_a_regular_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("manifests/registry.ollama.ai/library");
        adaptq_testutil::files::zero_and_fifo(&lib.join("zero/latest"), &lib.join("fifo/latest"));
        for loc in ["ollama://zero", "ollama://fifo"] {
            let models = t.path().to_path_buf();
            let r = adaptq_testutil::files::within("opening the model", 20, move || {
                open(loc, &models).map(|_| ())
            });
            let e = r.err().unwrap().to_string();
            assert!(e.contains("not a regular file"), "{loc}: {e}");
        }
    }
}
