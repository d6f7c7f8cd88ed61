//! Hugging Face Hub: `hf://org/name[@revision][/file]`.
//!
//! The revision is resolved to a commit once (`/api/models/{repo}/revision/{rev}`), and every
//! file is then read at that commit, so a push to the repository mid-run cannot mix versions.
//! Weights are streamed by range requests; small companion files (config, tokenizer, licence)
//! are downloaded into a folder. With a cache folder, files follow the hub's cache layout
//! (`models--org--name/refs/{rev}`, `snapshots/{commit}/{file}`) and offline mode reads only
//! from there.

use crate::http::{authority, Client, Flavor, Token};
use crate::scratch::{sweep_partials, write_via_partial, TempFolder};
use crate::{Opened, COMPANION_MAX};
use adaptq_loader::names::is_plain_relative;
use adaptq_source::{Result, SourceError};
use std::path::{Path, PathBuf};

/// Most bytes of the revision listing held in memory: a repository with tens of thousands of
/// files lists them in a few MiB.
pub const LISTING_MAX: u64 = 16 << 20;

/// Most bytes of a cache `refs/{revision}` file read: it holds one 40-hex commit id.
const REF_MAX: u64 = 1024;

/// Where the hub is and how to talk to it; [`HubConfig::from_env`] reads the usual variables.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<Token>,
    pub cache_dir: Option<PathBuf>,
    pub offline: bool,
}

impl HubConfig {
    /// `HF_ENDPOINT` (default <https://huggingface.co>); the token from `HF_TOKEN`,
    /// `HUGGINGFACE_TOKEN` or `HUGGING_FACE_HUB_TOKEN`; `ADAPTQ_CACHE_DIR`; offline when
    /// `ADAPTQ_OFFLINE` or `HF_HUB_OFFLINE` is 1.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let secret = var("HF_TOKEN")
            .or_else(|| var("HUGGINGFACE_TOKEN"))
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"));
        let on = |k: &str| var(k).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        HubConfig {
            token: secret.and_then(|s| authority(&endpoint).map(|a| Token::new(a, s))),
            endpoint,
            cache_dir: var("ADAPTQ_CACHE_DIR").map(PathBuf::from),
            offline: on("ADAPTQ_OFFLINE") || on("HF_HUB_OFFLINE"),
        }
    }
}

/// A parsed `hf://` locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubRef {
    pub fn parse(loc: &str) -> Result<Self> {
        let bad = |why: &str| SourceError::Unrecognized {
            path: loc.into(),
            why: format!("{why} (expected hf://org/name[@revision][/file])"),
        };
        let rest = loc
            .strip_prefix("hf://")
            .ok_or_else(|| bad("not an hf:// locator"))?;
        let mut parts = rest.splitn(3, '/');
        let org = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no organisation"))?;
        let name = parts
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no repository name"))?;
        let file = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, r.to_string()),
            Some(_) => return Err(bad("empty revision after '@'")),
            None => (name, "main".to_string()),
        };
        let ok = crate::plain_name_part;
        if !ok(org) || !ok(name) {
            return Err(bad(
                "organisation and name may hold letters, digits, '-', '_' and '.'",
            ));
        }
        // The revision names a file under refs/ in the cache and a path part of the API URL.
        if !ok(&revision) {
            return Err(bad(
                "a revision may hold letters, digits, '-', '_' and '.', and must not be '.' or '..'",
            ));
        }
        if let Some(f) = &file {
            if !is_plain_relative(f, true) {
                return Err(bad(
                    "file path must be relative, with no empty, '.' or '..' parts",
                ));
            }
        }
        Ok(HubRef {
            repo: format!("{org}/{name}"),
            revision,
            file,
        })
    }
}

/// The URL of `file` at `commit`. The repository and commit were checked to hold only safe
/// characters; the file name comes from the hub's listing and is percent-encoded.
fn resolve_url(endpoint: &str, repo: &str, commit: &str, file: &str) -> String {
    format!("{endpoint}/{repo}/resolve/{commit}/{}", encode_path(file))
}

/// Percent-encodes each `/`-separated part of a file name for a URL path: every byte outside
/// RFC 3986's unreserved set (`A-Za-z0-9-._~`) becomes `%XX`. A listed name such as `%2e%2e`
/// passes the plain-name check, but sent as is the server would decode it to `..`; encoded it
/// is `%252e%252e`, the literal name. Hand-written because no URL crate is a dependency here
/// (ureq uses one internally but does not export it).
fn encode_path(name: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(name.len());
    for (i, part) in name.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        for b in part.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
    out
}

/// Files a model folder may carry besides weights; copied so the bundle is self-contained.
const COMPANIONS: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
];

struct Hub<'a> {
    cfg: &'a HubConfig,
    client: Client,
    r: HubRef,
    label: String,
}

impl Hub<'_> {
    fn url(&self, commit: &str, file: &str) -> String {
        resolve_url(&self.cfg.endpoint, &self.r.repo, commit, file)
    }
    fn err(&self, why: impl Into<String>) -> SourceError {
        SourceError::Fetch {
            path: self.label.clone().into(),
            why: why.into(),
        }
    }

    /// Commit hash and file list of the revision. Listed names that are not plain relative
    /// names inside the repository (`../x`, `/abs`, `a//b`, control characters) are set
    /// apart in [`Listing::refused`]: they are never fetched or joined to a folder.
    fn resolve(&self) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.cfg.endpoint, self.r.repo, self.r.revision
        );
        let body = self.client.get(&url, Path::new(&self.label), LISTING_MAX)?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| self.err(format!("hub answered with invalid JSON: {e}")))?;
        let sha = v
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_commit(s))
            .ok_or_else(|| self.err("hub answer has no commit sha"))?
            .to_string();
        let names = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let (files, refused): (Vec<String>, Vec<String>) = names
            .into_iter()
            .map(str::to_string)
            .partition(|n| is_plain_relative(n, true));
        Ok(Listing {
            sha,
            files,
            refused,
        })
    }
}

struct Listing {
    sha: String,
    files: Vec<String>,
    refused: Vec<String>,
}

/// A commit id as it may name a folder: 1 to 64 ASCII letters and digits.
fn is_commit(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// [`choose`] on the plain names, saying which refused names there were when it finds
/// nothing to read, so a listing that only offers an escaping name is reported as such.
fn choose_listed(listing: &Listing, wanted: Option<&str>, label: &str) -> Result<Choice> {
    choose(&listing.files, wanted, label).map_err(|e| {
        if listing.refused.is_empty() {
            return e;
        }
        let shown: Vec<String> = listing
            .refused
            .iter()
            .take(3)
            .map(|n| format!("{n:?}"))
            .collect();
        SourceError::Unrecognized {
            path: label.into(),
            why: format!(
                "{}; the hub listing also names {}{}, which {} not a plain relative file name inside the repository and {} ignored",
                match &e {
                    SourceError::Unrecognized { why, .. } => why.clone(),
                    other => other.to_string(),
                },
                shown.join(", "),
                if listing.refused.len() > 3 { " and more" } else { "" },
                if listing.refused.len() == 1 { "is" } else { "are" },
                if listing.refused.len() == 1 { "was" } else { "were" },
            ),
        }
    })
}

/// The repository paths of the shards an index names. Shard names are file names relative
/// to the index's own folder, checked here before they are joined to any path.
fn shard_paths(idx: &str, shards: Vec<String>, label: &str) -> Result<Vec<String>> {
    let folder = idx.rsplit_once('/').map(|(d, _)| d);
    shards
        .into_iter()
        .map(|s| {
            if !is_plain_relative(&s, false) {
                return Err(SourceError::corrupt(
                    Path::new(&format!("{label}/{idx}")),
                    format!("the index names shard {s:?}, which is not a plain file name"),
                ));
            }
            Ok(match folder {
                Some(d) => format!("{d}/{s}"),
                None => s,
            })
        })
        .collect()
}

/// Which weight files to read: a named file, a sharded index, one safetensors, or one GGUF.
fn choose(files: &[String], wanted: Option<&str>, label: &str) -> Result<Choice> {
    let err = |why: String| SourceError::Unrecognized {
        path: label.into(),
        why,
    };
    if let Some(w) = wanted {
        if !files.iter().any(|f| f == w) {
            return Err(err(format!("the repository has no file '{w}'")));
        }
        return Ok(if w.ends_with(".gguf") {
            Choice::Gguf(w.to_string())
        } else if w.ends_with(".safetensors.index.json") {
            Choice::Index(w.to_string())
        } else if w.ends_with(".safetensors") {
            Choice::Safetensors(vec![w.to_string()])
        } else {
            return Err(err(format!("'{w}' is neither .gguf nor .safetensors")));
        });
    }
    let top: Vec<&String> = files.iter().filter(|f| !f.contains('/')).collect();
    if top.iter().any(|f| *f == "model.safetensors.index.json") {
        return Ok(Choice::Index("model.safetensors.index.json".into()));
    }
    if top.iter().any(|f| *f == "model.safetensors") {
        return Ok(Choice::Safetensors(vec!["model.safetensors".into()]));
    }
    let st: Vec<&&String> = top.iter().filter(|f| f.ends_with(".safetensors")).collect();
    if st.len() == 1 {
        return Ok(Choice::Safetensors(vec![st[0].to_string()]));
    }
    let gg: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    match gg.as_slice() {
        [one] => Ok(Choice::Gguf(one.to_string())),
        [] => Err(err(
            "the repository holds no model.safetensors, safetensors index or .gguf file".into(),
        )),
        many => Err(err(format!(
            "the repository holds {} .gguf files; name one, e.g. {label}/{}",
            many.len(),
            many[0]
        ))),
    }
}

enum Choice {
    Gguf(String),
    Index(String),
    Safetensors(Vec<String>),
}

fn cache_root(cfg: &HubConfig, repo: &str) -> Option<PathBuf> {
    cfg.cache_dir
        .as_ref()
        .map(|d| d.join(format!("models--{}", repo.replace('/', "--"))))
}

/// Opens `hf://…` with the given configuration.
pub fn open(loc: &str, cfg: &HubConfig) -> Result<Opened> {
    let r = HubRef::parse(loc)?;
    let label = format!("hf://{}", r.repo);
    let client = Client::new(cfg.token.clone(), Flavor::Hub);
    let hub = Hub {
        cfg,
        client,
        r,
        label: label.clone(),
    };
    let cache = cache_root(cfg, &hub.r.repo);
    if cfg.offline {
        return open_offline(&hub, cache.as_deref());
    }
    let listing = hub.resolve()?;
    let commit = listing.sha.clone();
    let choice = choose_listed(&listing, hub.r.file.as_deref(), &label)?;
    // Files go under `root` at `{prefix}{name}`: the cache's snapshot when there is one, else
    // a private temp folder. Every name joined here is a checked plain relative name.
    let (root, prefix, keep) = match &cache {
        Some(root) => {
            std::fs::create_dir_all(root).map_err(|e| SourceError::io(root, e))?;
            sweep_partials(root);
            let rev = format!("refs/{}", hub.r.revision);
            write_via_partial(root, &rev, false, |f| {
                crate::write_all(f, commit.as_bytes(), &root.join(&rev))
            })?;
            (root.clone(), format!("snapshots/{commit}/"), None)
        }
        None => {
            let t = TempFolder::new("adaptq-hub-")?;
            (t.path().to_path_buf(), String::new(), Some(t))
        }
    };
    let dir = root.join(&prefix);
    std::fs::create_dir_all(&dir).map_err(|e| SourceError::io(&dir, e))?;
    let fetch_small = |f: &str| -> Result<Vec<u8>> {
        let l = PathBuf::from(format!("{label}/{f}"));
        let bytes = hub.client.get(&hub.url(&commit, f), &l, COMPANION_MAX)?;
        write_via_partial(&root, &format!("{prefix}{f}"), false, |w| {
            crate::write_all(w, &bytes, &l)
        })?;
        Ok(bytes)
    };
    for f in COMPANIONS {
        if listing.files.iter().any(|x| x == f) && !dir.join(f).exists() {
            fetch_small(f)?;
        }
    }
    let weight_files = match &choice {
        Choice::Gguf(f) => vec![f.clone()],
        Choice::Safetensors(v) => v.clone(),
        Choice::Index(idx) => {
            let bytes = fetch_small(idx)?;
            let ilabel = format!("{label}/{idx}");
            let shards = adaptq_source::safetensors::index_shard_names(&bytes, Path::new(&ilabel))?;
            shard_paths(idx, shards, &label)?
        }
    };
    let locator = format!(
        "hf://{}@{commit}/{}",
        hub.r.repo,
        match &choice {
            Choice::Gguf(f) | Choice::Index(f) => f.clone(),
            Choice::Safetensors(v) => v[0].clone(),
        }
    );
    let blobs = if cache.is_some() {
        // The cache keeps whole files: download each once, then read it locally.
        weight_files
            .iter()
            .map(|f| {
                let dest = dir.join(f);
                if !dest.exists() {
                    let l = PathBuf::from(format!("{label}/{f}"));
                    let url = hub.url(&commit, f);
                    let (len, ranges_ok) = hub.client.probe(&url, &l)?;
                    crate::download_atomic(
                        &hub.client,
                        &url,
                        len,
                        ranges_ok,
                        &root,
                        &format!("{prefix}{f}"),
                        &l,
                    )?;
                }
                Ok(Box::new(adaptq_source::blob::MmapBlob::open(&dest)?)
                    as Box<dyn adaptq_source::Blob>)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        weight_files
            .iter()
            .map(|f| {
                let l = PathBuf::from(format!("{label}/{f}"));
                let url = hub.url(&commit, f);
                let (len, ranges_ok) = hub.client.probe(&url, &l)?;
                if !ranges_ok {
                    return Err(hub.err("the hub endpoint ignores range requests; set ADAPTQ_CACHE_DIR to download whole files instead"));
                }
                Ok(Box::new(crate::blob::HttpBlob::new(hub.client.clone(), url, l, len))
                    as Box<dyn adaptq_source::Blob>)
            })
            .collect::<Result<Vec<_>>>()?
    };
    crate::assemble(blobs, matches!(choice, Choice::Gguf(_)), dir, keep, locator)
}

fn open_offline(hub: &Hub, cache: Option<&Path>) -> Result<Opened> {
    let Some(root) = cache else {
        return Err(hub.err("offline mode needs a cache: set ADAPTQ_CACHE_DIR"));
    };
    let refp = root.join("refs").join(&hub.r.revision);
    // Bounded and regular-file-only: a FIFO or `/dev/zero` planted as the ref must not hang
    // or exhaust memory.
    let commit = adaptq_source::blob::read_small(&refp, REF_MAX).map_err(|e| match e {
        SourceError::NotFound { .. } => hub.err(format!(
            "offline, and revision '{}' is not in the cache at {}",
            hub.r.revision,
            root.display()
        )),
        e => e,
    })?;
    let commit = String::from_utf8_lossy(&commit);
    let commit = commit.trim();
    if !is_commit(commit) {
        return Err(hub.err(format!(
            "the cache's {} does not hold a commit id",
            refp.display()
        )));
    }
    let snap = root.join("snapshots").join(commit);
    let files: Vec<String> = match hub.r.file.as_deref() {
        // A named file may sit in a subfolder; the name was checked by `HubRef::parse`.
        Some(w) => [w.to_string()]
            .into_iter()
            .filter(|w| snap.join(w).is_file())
            .collect(),
        None => {
            let mut files = Vec::new();
            for e in std::fs::read_dir(&snap).map_err(|e| SourceError::io(&snap, e))? {
                let e = e.map_err(|e| SourceError::io(&snap, e))?;
                files.push(e.file_name().to_string_lossy().to_string());
            }
            files.sort();
            files.retain(|f| !f.starts_with('.') && is_plain_relative(f, false));
            files
        }
    };
    let choice = choose(&files, hub.r.file.as_deref(), &hub.label)?;
    let name = match &choice {
        Choice::Gguf(f) | Choice::Index(f) => f.clone(),
        Choice::Safetensors(v) => v[0].clone(),
    };
    let path = snap.join(&name);
    let source = if matches!(choice, Choice::Index(_)) {
        adaptq_source::open(path.parent().unwrap_or(&snap))?
    } else {
        adaptq_source::open(&path)?
    };
    Ok(Opened {
        source,
        locator: format!("hf://{}@{commit}/{name}", hub.r.repo),
        _keep: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn offline_ref_that_is_not_a_regular_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let refs = t.path().join("models--o--n/refs");
        adaptq_testutil::files::zero_and_fifo(&refs.join("zero"), &refs.join("fifo"));
        for rev in ["zero", "fifo"] {
            let cfg = HubConfig {
                endpoint: "http://127.0.0.1:9".into(),
                token: None,
                cache_dir: Some(t.path().to_path_buf()),
                offline: true,
            };
            let r = adaptq_testutil::files::within("reading the ref", 20, move || {
                open(&format!("hf://o/n@{rev}"), &cfg).map(|_| ())
            });
            let e = r.err().unwrap().to_string();
            assert!(e.contains("not a regular file"), "{rev}: {e}");
        }
    }

    #[test]
    fn file_names_are_percent_encoded_in_urls() {
        assert_eq!(
            resolve_url("https://h.co", "o/n", "abc", "a b/%2e%2e/ü.gguf"),
            "https://h.co/o/n/resolve/abc/a%20b/%252e%252e/%C3%BC.gguf"
        );
        assert_eq!(
            resolve_url("https://h.co", "o/n", "abc", "sub/Model-1_v.2~x.gguf"),
            "https://h.co/o/n/resolve/abc/sub/Model-1_v.2~x.gguf"
        );
        assert_eq!(encode_path("a?b#c&d+e"), "a%3Fb%23c%26d%2Be");
    }

    #[test]
    fn parses_locators() {
        let r = HubRef::parse("hf://HuggingFaceTB/SmolLM2-135M@v1.0/model.gguf").unwrap();
        assert_eq!(r.repo, "HuggingFaceTB/SmolLM2-135M");
        assert_eq!(r.revision, "v1.0");
        assert_eq!(r.file.as_deref(), Some("model.gguf"));
        let r = HubRef::parse("hf://a/b").unwrap();
        assert_eq!((r.revision.as_str(), r.file), ("main", None));
        for bad in [
            "hf://a",
            "hf:///b",
            "hf://a/b@",
            "hf://a/../x",
            "hf://a/b/../../etc",
            "s3://a/b",
            "hf://a/b@..",
            "hf://a/b@.",
            "hf://a/b@../../x",
            "hf://a/b@x?y",
            "hf://a/b@x%2F..",
            "hf://a/b/sub//x.gguf",
            "hf://a/b/sub/./x.gguf",
            "hf://a/b/x.gguf/",
            "hf://a/b/c:x.gguf",
            "hf://a/b/x\\y.gguf",
            "hf://./b",
        ] {
            assert!(HubRef::parse(bad).is_err(), "{bad} accepted");
        }
        let r = HubRef::parse("hf://a/b@v1.0-rc_2/sub/dir/model.gguf").unwrap();
        assert_eq!(r.file.as_deref(), Some("sub/dir/model.gguf"));
    }

    #[test]
    fn listing_names_outside_the_repository_are_refused_and_named() {
        let listing = Listing {
            sha: "c".into(),
            files: vec!["README.md".into()],
            refused: vec!["../../../../tmp/x/evil.gguf".into()],
        };
        let e = adaptq_testutil::err_text(choose_listed(&listing, None, "hf://o/n"));
        assert!(
            e.contains("../../../../tmp/x/evil.gguf") && e.contains("not a plain relative"),
            "{e}"
        );
    }

    #[test]
    fn shard_names_stay_in_the_index_folder() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shard_paths("sub/m.safetensors.index.json", v(&["a.safetensors"]), "x").unwrap(),
            v(&["sub/a.safetensors"])
        );
        assert_eq!(
            shard_paths("m.safetensors.index.json", v(&["a.safetensors"]), "x").unwrap(),
            v(&["a.safetensors"])
        );
        for bad in [
            "../a.safetensors",
            "/tmp/a.safetensors",
            "d/a.safetensors",
            "..",
            "",
        ] {
            let e = shard_paths("m.json", v(&[bad]), "x")
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn chooses_weight_files() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(
            choose(&f(&["config.json", "model.safetensors"]), None, "x").unwrap(),
            Choice::Safetensors(_)
        ));
        assert!(matches!(
            choose(
                &f(&[
                    "model.safetensors.index.json",
                    "model-00001-of-00002.safetensors"
                ]),
                None,
                "x"
            )
            .unwrap(),
            Choice::Index(_)
        ));
        assert!(matches!(
            choose(&f(&["a.gguf"]), None, "x").unwrap(),
            Choice::Gguf(_)
        ));
        let e = choose(&f(&["a.gguf", "b.gguf"]), None, "hf://o/n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("hf://o/n/a.gguf"), "{e}");
        assert!(choose(&f(&["README.md"]), None, "x").is_err());
        assert!(choose(&f(&["a.gguf"]), Some("b.gguf"), "x").is_err());
    }
}
