//! A remote file read by HTTP range requests, with read-ahead.
//!
//! The format reader announces the order in which it will read tensors ([`Blob::plan`]); the
//! first tensor read starts a fetch thread that downloads the following tensors into a bounded
//! queue while the current one is being quantized. The queue holds one tensor, so memory stays
//! near three tensors' bytes (one in use, one queued, one arriving) whatever the model size.

use crate::http::Client;
use adaptq_source::{Blob, Result, SourceError};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;

/// Reads smaller than this bypass the queue (headers, tiny norms are cheap to fetch directly).
const MIN_PREFETCH: u64 = 64 << 10;

type Item = ((u64, u64), Result<Vec<u8>>);

struct ReadAhead {
    rx: Receiver<Item>,
    /// An item taken from the queue that the reader did not ask for yet.
    held: Option<Item>,
}

pub struct HttpBlob {
    client: Client,
    url: String,
    label: PathBuf,
    len: u64,
    plan: Mutex<Vec<(u64, u64)>>,
    ahead: Mutex<Option<ReadAhead>>,
    depth: usize,
}

impl HttpBlob {
    pub fn new(client: Client, url: String, label: PathBuf, len: u64) -> Self {
        HttpBlob {
            client,
            url,
            label,
            len,
            plan: Mutex::new(Vec::new()),
            ahead: Mutex::new(None),
            depth: 1,
        }
    }

    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        self.client.get_range(&self.url, start, end, &self.label)
    }

    /// Starts the fetch thread at plan position `from`.
    fn start(&self, from: usize) -> ReadAhead {
        let ranges: Vec<(u64, u64)> = self.plan.lock().unwrap()[from..]
            .iter()
            .copied()
            .filter(|(s, e)| e - s >= MIN_PREFETCH)
            .collect();
        let (tx, rx) = sync_channel::<Item>(self.depth);
        let client = self.client.clone();
        let url = self.url.clone();
        let label = self.label.clone();
        std::thread::spawn(move || {
            for (s, e) in ranges {
                let r = client.get_range(&url, s, e, &label);
                let failed = r.is_err();
                // A closed channel means the reader is gone: stop fetching.
                if tx.send(((s, e), r)).is_err() || failed {
                    return;
                }
            }
        });
        ReadAhead { rx, held: None }
    }

    fn read_planned(&self, start: u64, end: u64) -> Option<Result<Vec<u8>>> {
        let pos = self
            .plan
            .lock()
            .unwrap()
            .iter()
            .position(|&r| r == (start, end))?;
        let mut guard = self.ahead.lock().unwrap();
        let ahead = guard.get_or_insert_with(|| self.start(pos));
        loop {
            let item = match ahead.held.take() {
                Some(i) => i,
                None => match ahead.rx.recv() {
                    Ok(i) => i,
                    // The thread stopped (an error was delivered, or the plan ran out).
                    Err(_) => return None,
                },
            };
            let ((s, e), r) = item;
            if (s, e) == (start, end) {
                return Some(r);
            }
            if s > start {
                // The reader went back to a range already passed: fetch it directly.
                ahead.held = Some(((s, e), r));
                return None;
            }
            // Skipped by the reader: drop it and look at the next one.
        }
    }
}

impl Blob for HttpBlob {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, start: u64, end: u64) -> Result<Cow<'_, [u8]>> {
        if start > end || end > self.len {
            return Err(SourceError::corrupt(
                &self.label,
                format!(
                    "bytes {start}..{end} lie outside the {}-byte file",
                    self.len
                ),
            ));
        }
        if end - start >= MIN_PREFETCH {
            if let Some(r) = self.read_planned(start, end) {
                return r.map(Cow::Owned);
            }
        }
        self.fetch(start, end).map(Cow::Owned)
    }
    fn label(&self) -> &Path {
        &self.label
    }
    fn plan(&self, ranges: &[(u64, u64)]) {
        *self.plan.lock().unwrap() = ranges.to_vec();
        *self.ahead.lock().unwrap() = None;
    }
}
