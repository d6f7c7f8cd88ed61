//! Hostile servers against the HTTP client and the hub: a body held in memory is capped
//! whether or not its length is announced, and bounded in time; a dripping ranged body is
//! given up on; a whole-file download takes no more than the length announced; and shard names
//! from a hub's index never leave the cache folder.

use adaptq_remote::http::{Client, Flavor};
use adaptq_remote::hub::{self, HubConfig};
use adaptq_testutil::hub_server::{Hostile, HubServer, Repo, ServerConfig};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SHA: &str = "2222222222222222222222222222222222222222";

fn hostile(path: &str, h: Hostile) -> HubServer {
    HubServer::start(ServerConfig {
        hostile: vec![(path.into(), h)],
        ..Default::default()
    })
}

/// A server whose `path` announces `len` bytes and sends one every 5 s.
fn dripping(path: &str, len: u64) -> HubServer {
    let every = Duration::from_secs(5);
    hostile(path, Hostile::Drip { every, len })
}

/// The error of an [`impatient`] GET of `name` from `server` (capped at 1 MiB), and how long
/// it took to come.
fn impatient_get(server: &HubServer, name: &str) -> (String, Duration) {
    let t = Instant::now();
    let url = format!("{}/{name}", server.url());
    let e = impatient().get(&url, name.as_ref(), 1 << 20).unwrap_err();
    (e.to_string(), t.elapsed())
}

fn impatient() -> Client {
    let mut c = Client::new(None, Flavor::Plain);
    c.body_timeout = Duration::from_secs(1);
    c.stall_timeout = Duration::from_millis(300);
    c.retries = 2;
    c.backoff = Duration::from_millis(1);
    c
}

#[test]
fn chunked_body_without_length_is_cut_at_the_cap() {
    let server = hostile("/big.json", Hostile::Chunked { len: 600 << 20 });
    let e = Client::new(None, Flavor::Plain)
        .get(
            &format!("{}/big.json", server.url()),
            "big.json".as_ref(),
            1 << 20,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("big.json") && e.contains("past the 1 MiB limit"),
        "{e}"
    );
    // The client stopped reading: the server got no further than its socket buffers.
    std::thread::sleep(Duration::from_millis(300));
    let sent = server.stats.bytes_sent.load(Ordering::Relaxed);
    assert!(sent < 32 << 20, "the server sent {sent} bytes");
}

#[test]
fn announced_length_over_the_cap_is_refused_before_reading() {
    let server = dripping("/huge.json", 1 << 30);
    let (e, took) = impatient_get(&server, "huge.json");
    assert!(took < Duration::from_millis(900), "{took:?}");
    assert!(e.contains("is 1073741824 bytes"), "{e}");
}

#[test]
fn dripping_small_body_fails_within_its_budget() {
    let server = dripping("/config.json", 100);
    let (e, took) = impatient_get(&server, "config.json");
    // One budget, no retry of a server that already proved this slow.
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        e.contains("config.json") && e.contains("did not arrive within 1 s"),
        "{e}"
    );
}

#[test]
fn dripping_ranged_body_uses_up_the_retries() {
    let server = dripping("/w.bin", 1000);
    let client = impatient();
    let url = format!("{}/w.bin", server.url());
    assert_eq!(client.probe(&url, "w".as_ref()).unwrap(), (1000, true));
    let t = Instant::now();
    let e = client
        .get_range(&url, 0, 1000, "w".as_ref())
        .unwrap_err()
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.contains("gave up after 2 attempts at byte 0"), "{e}");
}

#[test]
fn whole_file_download_takes_no_more_than_announced() {
    let server = hostile("/w.gguf", Hostile::Chunked { len: 64 << 20 });
    let t = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(t.path().join("w.gguf")).unwrap();
    let e = impatient()
        .download_to(
            &format!("{}/w.gguf", server.url()),
            1000,
            false,
            &mut f,
            "w.gguf".as_ref(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the 1000 bytes it announced"), "{e}");
    assert!(f.metadata().unwrap().len() <= 1001);
}

/// An index whose shard name climbs out of the snapshot: refused before anything is joined.
#[test]
fn index_shard_names_cannot_leave_the_cache() {
    let minilm = adaptq_testutil::minilm();
    let t = tempfile::tempdir().unwrap();
    // cache/models--test--idx/snapshots/{SHA}/ + four '..' = the temp folder itself.
    let evil = "../../../../out/evil.safetensors";
    let outside = t.path().join("out");
    std::fs::create_dir_all(&outside).unwrap();
    let idx = t.path().join("index.json");
    std::fs::write(
        &idx,
        format!(
            r#"{{"metadata":{{}},"weight_map":{{"embeddings.word_embeddings.weight":"{evil}"}}}}"#
        ),
    )
    .unwrap();
    let server = HubServer::start(ServerConfig {
        repos: vec![Repo {
            id: "test/idx".into(),
            sha: SHA.into(),
            files: vec![
                ("config.json".into(), minilm.join("config.json")),
                ("model.safetensors.index.json".into(), idx),
                (evil.into(), minilm.join("model.safetensors")),
            ],
        }],
        ..Default::default()
    });
    let cfg = HubConfig {
        endpoint: server.url(),
        token: None,
        cache_dir: Some(t.path().join("cache")),
        offline: false,
    };
    let e = hub::open("hf://test/idx", &cfg)
        .err()
        .expect("escaping shard name accepted")
        .to_string();
    assert!(e.contains(evil), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let log = server.stats.log.lock().unwrap();
    assert!(log.iter().all(|(p, _)| !p.contains("evil")), "{log:?}");
}
