//! Remote sources end to end: `adaptq quantize hf://…`, `http(s)://…` and `ollama://…` against a
//! local test server (127.0.0.1 only) must give the same bundle as the local file, survive
//! faults, explain auth failures, and never leak the token; and hostile hubs (listings naming
//! paths outside the repository, unsafe revisions, dripping or endless bodies) must not make it
//! write outside its cache, hold unbounded memory or wait forever.

use adaptq_testutil::cli::{manifest, ok, s, text};
use adaptq_testutil::files;
use adaptq_testutil::hub_server::{repo_from_dir, Hostile, HubServer, Repo, ServerConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SHA: &str = "1111111111111111111111111111111111111111";
const TOKEN: &str = "hf_TESTtokenDoNotLeak42";

fn adaptq(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("runs adaptq")
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adaptq"));
    c.args(args);
    for k in [
        "HF_TOKEN",
        "HUGGINGFACE_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_ENDPOINT",
        "ADAPTQ_CACHE_DIR",
        "ADAPTQ_OFFLINE",
        "HF_HUB_OFFLINE",
        "OLLAMA_MODELS",
        "ADAPTQ_HTTP_TIMEOUT",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn quantize(src: &str, out: &Path, env: &[(&str, &str)]) -> Output {
    let a = [
        "quantize",
        src,
        "--out",
        s(out),
        "--bits",
        "3",
        "--group-size",
        "64",
    ];
    adaptq(&a, env)
}

/// The hub repository `test/smollm2` at [`SHA`], holding the SmolLM2 fixture's folder.
fn smollm2_repo() -> Repo {
    repo_from_dir(
        "test/smollm2",
        SHA,
        adaptq_testutil::smollm2_gguf().parent().unwrap(),
    )
}

/// Same shards (byte for byte) and the same global digest; only the locator may differ.
fn assert_same_bundle(a: &Path, b: &Path) {
    let (ma, mb) = (manifest(a), manifest(b));
    assert_eq!(ma["global_digest"], mb["global_digest"]);
    assert_eq!(ma["tensors"], mb["tensors"]);
    assert_eq!(ma["files"], mb["files"]);
    let shards = ma["shards"].as_array().unwrap();
    assert!(shards.len() > 10);
    for s in shards {
        let f = s["file"].as_str().unwrap();
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "shard {f} differs"
        );
    }
}

fn local_bundle(t: &Path, src: &Path) -> PathBuf {
    let out = t.join("local");
    ok(quantize(s(src), &out, &[]));
    out
}

#[test]
fn hub_stream_with_faults_matches_local_file_and_keeps_the_token_secret() {
    let gguf = adaptq_testutil::smollm2_gguf();
    let server = HubServer::start(ServerConfig {
        repos: vec![smollm2_repo()],
        token: Some(TOKEN.into()),
        fail_first: 2,
        drop_after: Some(3 << 20),
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let local = local_bundle(t.path(), &gguf);
    let remote = t.path().join("remote");
    let url = server.url();
    let env = [("HF_ENDPOINT", url.as_str()), ("HF_TOKEN", TOKEN)];
    let o = quantize("hf://test/smollm2", &remote, &env);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // The faults really happened and were recovered from.
    assert_eq!(server.stats.failed_503.load(Ordering::Relaxed), 2);
    assert_eq!(server.stats.dropped.load(Ordering::Relaxed), 1);
    assert_same_bundle(&local, &remote);
    let loc = manifest(&remote)["source"]["locator"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        loc,
        format!("hf://test/smollm2@{SHA}/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    // Ranged reads, not one whole-file download.
    let log = server.stats.log.lock().unwrap().clone();
    assert!(log.len() > 50, "only {} requests", log.len());
    assert!(
        log.iter().all(|(_, auth)| *auth),
        "a hub request went without the token"
    );
    // The token is in no output and no file.
    assert!(!out.contains(TOKEN));
    assert!(files::containing(&remote, TOKEN).is_empty());
    let v = adaptq(&["verify", remote.to_str().unwrap()], &[]);
    ok(v);
}

#[test]
fn wrong_or_missing_token_is_explained_in_one_line() {
    let server = HubServer::start(ServerConfig {
        repos: vec![smollm2_repo()],
        token: Some(TOKEN.into()),
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let url = server.url();
    let wrong = "hf_wrongTOKENvalue";
    for (env, expect) in [
        (
            vec![("HF_ENDPOINT", url.as_str()), ("HF_TOKEN", wrong)],
            "token in HF_TOKEN was refused",
        ),
        (vec![("HF_ENDPOINT", url.as_str())], "set HF_TOKEN"),
    ] {
        let out = t.path().join("x");
        let o = quantize("hf://test/smollm2", &out, &env);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains("401") && lines[0].contains(expect),
            "{err}"
        );
        assert!(!text(&o).contains(wrong) && !text(&o).contains(TOKEN));
        assert!(!out.exists(), "a failed run left an output folder");
    }
    let o = quantize(
        "hf://test/nosuchrepo",
        &t.path().join("y"),
        &[("HF_ENDPOINT", url.as_str()), ("HF_TOKEN", TOKEN)],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("not found (HTTP 404)"), "{}", text(&o));
}

#[test]
fn safetensors_over_hub_plain_url_without_ranges_and_token_scope() {
    let minilm = adaptq_testutil::minilm();
    let hub = HubServer::start(ServerConfig {
        repos: vec![repo_from_dir("test/minilm", SHA, &minilm)],
        ..Default::default()
    });
    let plain = HubServer::start(ServerConfig {
        static_dir: Some(minilm.clone()),
        no_ranges: true,
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let local = local_bundle(t.path(), &minilm);
    let url = hub.url();
    let via_hub = t.path().join("hub");
    let o = quantize("hf://test/minilm", &via_hub, &[("HF_ENDPOINT", &url)]);
    ok(o);
    assert_same_bundle(&local, &via_hub);
    // A plain server that ignores ranges: whole-file fallback, said out loud. The hub token
    // is set but must not be sent to this other host.
    let via_url = t.path().join("url");
    let link = format!("{}/files/model.safetensors", plain.url());
    let o = quantize(
        &link,
        &via_url,
        &[("HF_ENDPOINT", &url), ("HF_TOKEN", TOKEN)],
    );
    let o = ok(o);
    assert!(
        text(&o).contains("does not support range requests"),
        "{}",
        text(&o)
    );
    assert_same_bundle(&local, &via_url);
    assert!(plain
        .stats
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|(_, auth)| !auth));
}

#[test]
fn ollama_store_resolves_to_the_same_bundle() {
    use sha2::Digest;
    let gguf = adaptq_testutil::smollm2_gguf();
    let t = tempfile::tempdir().unwrap();
    let local = local_bundle(t.path(), &gguf);
    // Build a store the way Ollama lays it out.
    let store = t.path().join("models");
    let blobs = store.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    let hex = hex::encode(sha2::Sha256::digest(&bytes));
    std::os::unix::fs::symlink(&gguf, blobs.join(format!("sha256-{hex}"))).unwrap();
    let lic = b"Apache License 2.0 (test)";
    let lic_hex = hex::encode(sha2::Sha256::digest(lic));
    std::fs::write(blobs.join(format!("sha256-{lic_hex}")), lic).unwrap();
    let mdir = store.join("manifests/registry.ollama.ai/library/smollm2");
    std::fs::create_dir_all(&mdir).unwrap();
    let ollama = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{lic_hex}"), "size": lic.len()},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"), "size": bytes.len()},
            {"mediaType": "application/vnd.ollama.image.license", "digest": format!("sha256:{lic_hex}"), "size": lic.len()}
        ]
    });
    std::fs::write(mdir.join("135m"), ollama.to_string()).unwrap();
    let out = t.path().join("ollama");
    let o = quantize(
        "ollama://smollm2:135m",
        &out,
        &[("OLLAMA_MODELS", store.to_str().unwrap())],
    );
    ok(o);
    let (ma, mb) = (manifest(&local), manifest(&out));
    assert_eq!(ma["global_digest"], mb["global_digest"]);
    assert_eq!(mb["source"]["locator"], "ollama://smollm2:135m");
    assert_eq!(std::fs::read(out.join("LICENSE")).unwrap(), lic);
    let o = quantize(
        "ollama://smollm2:7b",
        &t.path().join("none"),
        &[("OLLAMA_MODELS", store.to_str().unwrap())],
    );
    assert!(
        !o.status.success() && text(&o).contains("manifests/registry.ollama.ai/library/smollm2/7b")
    );
}

#[test]
fn cache_then_offline() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let c = cache.to_str().unwrap();
    let first = t.path().join("first");
    {
        let server = HubServer::start(ServerConfig {
            repos: vec![smollm2_repo()],
            ..Default::default()
        });
        let url = server.url();
        let o = quantize(
            "hf://test/smollm2",
            &first,
            &[("HF_ENDPOINT", &url), ("ADAPTQ_CACHE_DIR", c)],
        );
        ok(o);
    }
    let snap = cache.join(format!("models--test--smollm2/snapshots/{SHA}"));
    assert!(snap.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file());
    assert_eq!(
        std::fs::read_to_string(cache.join("models--test--smollm2/refs/main")).unwrap(),
        SHA
    );
    // The server is gone: offline mode must answer from the cache alone.
    let second = t.path().join("second");
    let o = quantize(
        "hf://test/smollm2",
        &second,
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("ADAPTQ_CACHE_DIR", c),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    ok(o);
    assert_same_bundle(&first, &second);
    let o = quantize(
        "hf://test/other",
        &t.path().join("third"),
        &[("ADAPTQ_CACHE_DIR", c), ("ADAPTQ_OFFLINE", "1")],
    );
    assert!(
        !o.status.success() && text(&o).contains("not in the cache"),
        "{}",
        text(&o)
    );
}

/// Splits a safetensors file into two shards with a `model.safetensors.index.json`.
fn shard_safetensors(src: &Path, dir: &Path) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let mut weight_map = serde_json::Map::new();
    for (part, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", part + 1);
        let mut h = serde_json::Map::new();
        let mut body = Vec::new();
        for name in chunk {
            let t = &header[*name];
            let o = t["data_offsets"].as_array().unwrap();
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let mut t = t.clone();
            t["data_offsets"] = serde_json::json!([body.len(), body.len() + e - s]);
            body.extend_from_slice(&data[s..e]);
            h.insert((*name).clone(), t);
            weight_map.insert((*name).clone(), file.clone().into());
        }
        let hj = serde_json::to_vec(&h).unwrap();
        let mut out = (hj.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&hj);
        out.extend_from_slice(&body);
        std::fs::write(dir.join(&file), out).unwrap();
    }
    let idx = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
}

#[test]
fn sharded_safetensors_over_hub_match_the_local_folder() {
    let minilm = adaptq_testutil::minilm();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        std::fs::copy(minilm.join(f), dir.join(f)).unwrap();
    }
    shard_safetensors(&minilm.join("model.safetensors"), &dir);
    let local = local_bundle(t.path(), &dir);
    let hub = HubServer::start(ServerConfig {
        repos: vec![repo_from_dir("test/sharded", SHA, &dir)],
        ..Default::default()
    });
    let url = hub.url();
    let remote = t.path().join("remote");
    let o = quantize("hf://test/sharded", &remote, &[("HF_ENDPOINT", &url)]);
    ok(o);
    assert_same_bundle(&local, &remote);
    let log = hub.stats.log.lock().unwrap();
    assert!(log.iter().any(|(p, _)| p.contains("model-00001-of-00002")));
    assert!(log.iter().any(|(p, _)| p.contains("model-00002-of-00002")));
}

/// A listing naming a path that climbs out of the snapshot, or an absolute one, is refused
/// with the name shown, and nothing is written there; beside a real model it is ignored.
#[test]
fn hub_listing_cannot_write_outside_the_cache() {
    let gguf = adaptq_testutil::smollm2_gguf();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    // cache/models--test--rel/snapshots/{SHA}/ + four '..' = the temp folder itself.
    let rel = "../../../../tmp/x/evil.gguf";
    let rel_target = t.path().join("tmp/x");
    let abs_target = t.path().join("abs");
    let abs = abs_target.join("evil.gguf").to_str().unwrap().to_string();
    for d in [&rel_target, &abs_target] {
        std::fs::create_dir_all(d).unwrap();
    }
    let repo = |id: &str, names: &[&str]| Repo {
        id: id.into(),
        sha: SHA.into(),
        files: names
            .iter()
            .map(|n| (n.to_string(), gguf.clone()))
            .collect(),
    };
    let server = HubServer::start(ServerConfig {
        repos: vec![
            repo("test/rel", &[rel]),
            repo("test/abs", &[&abs]),
            repo("test/mixed", &["model.gguf", rel, &abs]),
        ],
        ..Default::default()
    });
    let url = server.url();
    let env = [
        ("HF_ENDPOINT", url.as_str()),
        ("ADAPTQ_CACHE_DIR", cache.to_str().unwrap()),
    ];
    for (loc, name) in [("hf://test/rel", rel), ("hf://test/abs", abs.as_str())] {
        let o = adaptq(&["info", loc], &env);
        assert!(!o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(name) && err.contains("not a plain relative file name"),
            "{err}"
        );
    }
    let o = adaptq(&["info", "hf://test/mixed"], &env);
    ok(o);
    assert!(cache
        .join(format!("models--test--mixed/snapshots/{SHA}/model.gguf"))
        .is_file());
    for d in [&rel_target, &abs_target] {
        let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
        assert!(left.is_empty(), "{} holds {left:?}", d.display());
    }
    let log = server.stats.log.lock().unwrap();
    assert!(log.iter().all(|(p, _)| !p.contains("evil")), "{log:?}");
}

/// A revision names a file under refs/ in the cache: `..` and `.` are refused before any
/// request is made or any file written.
#[test]
fn unsafe_revision_is_refused_before_touching_the_cache() {
    let server = HubServer::start(ServerConfig {
        repos: vec![smollm2_repo()],
        any_revision: true,
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let url = server.url();
    for loc in ["hf://test/smollm2@..", "hf://test/smollm2@."] {
        let o = adaptq(
            &["info", loc],
            &[
                ("HF_ENDPOINT", &url),
                ("ADAPTQ_CACHE_DIR", cache.to_str().unwrap()),
            ],
        );
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("revision"), "{}", text(&o));
    }
    assert!(!cache.exists(), "the cache was written to");
    assert_eq!(server.stats.requests.load(Ordering::Relaxed), 0);
}

/// config.json dripping a byte every 5 s fails within the body budget; one streamed without
/// a length and without end is cut at the 64 MiB cap.
#[test]
fn hub_bodies_held_in_memory_are_capped_and_timed() {
    let minilm = adaptq_testutil::minilm();
    let serve = |h: Hostile| {
        HubServer::start(ServerConfig {
            repos: vec![repo_from_dir("test/minilm", SHA, &minilm)],
            hostile: vec![("/config.json".into(), h)],
            ..Default::default()
        })
    };
    let drip = serve(Hostile::Drip {
        every: Duration::from_secs(5),
        len: 1000,
    });
    let url = drip.url();
    let t0 = Instant::now();
    let o = adaptq(
        &["info", "hf://test/minilm"],
        &[("HF_ENDPOINT", &url), ("ADAPTQ_HTTP_TIMEOUT", "2")],
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("config.json") && err.contains("did not arrive within 2 s"),
        "{err}"
    );
    let huge = serve(Hostile::Chunked { len: 600 << 20 });
    let url = huge.url();
    let o = adaptq(&["info", "hf://test/minilm"], &[("HF_ENDPOINT", &url)]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("config.json") && err.contains("past the 64 MiB limit"),
        "{err}"
    );
    let sent = huge.stats.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 100 << 20, "the server sent {sent} bytes");
}

/// A file in a subfolder of the repository is cached at the same place in the snapshot and
/// read from there offline.
#[test]
fn hub_file_in_a_subfolder_with_the_cache_then_offline() {
    let gguf = adaptq_testutil::smollm2_gguf();
    let server = HubServer::start(ServerConfig {
        repos: vec![Repo {
            id: "test/sub".into(),
            sha: SHA.into(),
            files: vec![("q4/model.gguf".into(), gguf.clone())],
        }],
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let c = cache.to_str().unwrap();
    let url = server.url();
    let online = adaptq(
        &["info", "hf://test/sub/q4/model.gguf"],
        &[("HF_ENDPOINT", &url), ("ADAPTQ_CACHE_DIR", c)],
    );
    let online = ok(online);
    let cached = cache.join(format!("models--test--sub/snapshots/{SHA}/q4/model.gguf"));
    assert_eq!(
        std::fs::metadata(&cached).unwrap().len(),
        std::fs::metadata(&gguf).unwrap().len()
    );
    let offline = adaptq(
        &["info", "hf://test/sub/q4/model.gguf"],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("ADAPTQ_CACHE_DIR", c),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let offline = ok(offline);
    assert_eq!(online.stdout, offline.stdout);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hub_temp_folders(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("adaptq-hub-")
        })
        .collect()
}

/// A run killed mid-download leaves a partial, never a complete-looking file, and a run
/// killed without a cache leaves its temp folder; the next run removes both.
#[test]
fn killed_runs_leave_nothing_the_next_run_keeps() {
    let gguf = adaptq_testutil::smollm2_gguf();
    let name = gguf.file_name().unwrap().to_str().unwrap();
    let repos = vec![smollm2_repo()];
    let slow = HubServer::start(ServerConfig {
        repos: repos.clone(),
        rate: Some(1 << 20),
        ..Default::default()
    });
    let fast = HubServer::start(ServerConfig {
        repos,
        ..Default::default()
    });
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let c = cache.to_str().unwrap();
    let tmp = t.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let tmp_s = tmp.to_str().unwrap();
    let root = cache.join("models--test--smollm2");
    let partials = root.join(".adaptq-partial");
    let cached = root.join(format!("snapshots/{SHA}/{name}"));
    let (slow_url, fast_url) = (slow.url(), fast.url());

    let mut child = command(
        &["info", "hf://test/smollm2"],
        &[
            ("HF_ENDPOINT", &slow_url),
            ("ADAPTQ_CACHE_DIR", c),
            ("TMPDIR", tmp_s),
        ],
    )
    .spawn()
    .unwrap();
    wait_for("the partial download", || {
        !files::under(&partials).is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!cached.exists(), "a killed download looks complete");
    assert_eq!(files::under(&partials).len(), 1);

    let mut child = command(
        &["info", "hf://test/smollm2"],
        &[("HF_ENDPOINT", &slow_url), ("TMPDIR", tmp_s)],
    )
    .spawn()
    .unwrap();
    wait_for("the temp folder", || {
        hub_temp_folders(&tmp)
            .iter()
            .any(|d| d.join(".adaptq-lock").is_file())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(hub_temp_folders(&tmp).len(), 1);

    let o = adaptq(
        &["info", "hf://test/smollm2"],
        &[
            ("HF_ENDPOINT", &fast_url),
            ("ADAPTQ_CACHE_DIR", c),
            ("TMPDIR", tmp_s),
        ],
    );
    ok(o);
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(&gguf).unwrap()
    );
    assert!(
        files::under(&partials).is_empty(),
        "{:?}",
        files::under(&partials)
    );
    let o = adaptq(
        &["info", "hf://test/smollm2"],
        &[("HF_ENDPOINT", &fast_url), ("TMPDIR", tmp_s)],
    );
    ok(o);
    assert!(
        hub_temp_folders(&tmp).is_empty(),
        "{:?}",
        hub_temp_folders(&tmp)
    );
}
