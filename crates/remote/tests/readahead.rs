//! The HTTP blob against the local test server: read-ahead in plan order, reads out of order,
//! slow answers, 5xx answers and a body dropped mid-way all give exactly the file's bytes.

use adaptq_remote::blob::HttpBlob;
use adaptq_remote::http::{Client, Flavor};
use adaptq_source::Blob;
use adaptq_testutil::hub_server::{HubServer, ServerConfig};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn data(n: usize) -> Vec<u8> {
    adaptq_testutil::rand::bytes(n, 0x9E37_79B9_7F4A_7C15)
}

#[test]
fn read_ahead_survives_faults_and_out_of_order_reads() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(3 << 20);
    std::fs::write(dir.path().join("w.bin"), &bytes).unwrap();
    let server = HubServer::start(ServerConfig {
        static_dir: Some(dir.path().to_path_buf()),
        fail_first: 2,
        drop_after: Some(100_000),
        delay: Duration::from_millis(20),
        ..Default::default()
    });
    let mut client = Client::new(None, Flavor::Plain);
    client.backoff = Duration::from_millis(10);
    let url = format!("{}/files/w.bin", server.url());
    let (len, ranges) = client.probe(&url, "w".as_ref()).unwrap();
    assert_eq!((len, ranges), (bytes.len() as u64, true));
    let blob = HttpBlob::new(client, url, "w".into(), len);
    let plan: Vec<(u64, u64)> = (0..12).map(|i| (i * 250_000, (i + 1) * 250_000)).collect();
    blob.plan(&plan);
    let order = [0usize, 1, 2, 5, 6, 3, 7, 11, 8];
    for &i in &order {
        let (s, e) = plan[i];
        let got = blob.read(s, e).unwrap();
        assert!(got.as_ref() == &bytes[s as usize..e as usize], "range {i}");
    }
    let tiny = blob.read(10, 20).unwrap();
    assert_eq!(tiny.as_ref(), &bytes[10..20]);
    assert!(blob.read(len - 1, len + 1).is_err());
    assert_eq!(server.stats.failed_503.load(Ordering::Relaxed), 2);
    assert_eq!(server.stats.dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn persistent_server_errors_give_up_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), data(1000)).unwrap();
    let server = HubServer::start(ServerConfig {
        static_dir: Some(dir.path().to_path_buf()),
        fail_first: 1000,
        ..Default::default()
    });
    let mut client = Client::new(None, Flavor::Plain);
    client.backoff = Duration::from_millis(1);
    client.retries = 3;
    let e = client
        .probe(&format!("{}/files/w.bin", server.url()), "w".as_ref())
        .unwrap_err();
    assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
    assert!(e.to_string().contains("503"), "{e}");
}
