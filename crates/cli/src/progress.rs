//! Progress bars on standard error for long work: one bar per stage of a run (calibration
//! blocks, tensors written, shards verified), plus a download counter for remote models.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::time::Instant;

/// A bar over `len` `unit`s labelled `what`, with throughput and time left.
pub fn bar(len: u64, what: &str, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {unit}  {{msg}}  [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .expect("valid template"),
    );
    pb
}

/// The bars of a quantize or export run: `adaptq_pipeline::Progress` drawn with indicatif.
pub struct Bars {
    multi: MultiProgress,
    current: Option<ProgressBar>,
    download: Option<ProgressBar>,
    since: Instant,
}

impl Bars {
    /// `remote`: also count the bytes downloaded.
    pub fn new(remote: bool) -> Bars {
        let multi = MultiProgress::new();
        let download = remote.then(|| {
            let d = multi.add(ProgressBar::no_length());
            d.set_style(
                ProgressStyle::with_template("download {bytes} {binary_bytes_per_sec}")
                    .expect("valid template"),
            );
            d
        });
        Bars {
            multi,
            current: None,
            download,
            since: Instant::now(),
        }
    }
}

impl adaptq_pipeline::Progress for Bars {
    fn stage(&mut self, what: &str, unit: &'static str, total: usize) {
        if let Some(b) = self.current.take() {
            b.finish_and_clear();
        }
        self.current = Some(self.multi.add(bar(total as u64, what, unit)));
        self.since = Instant::now();
    }

    fn advance(&mut self, done: usize, total: usize, bytes: u64) {
        if let Some(b) = &self.current {
            b.set_length(total as u64);
            b.set_position(done as u64);
            if bytes > 0 {
                let s = self.since.elapsed().as_secs_f64().max(1e-9);
                b.set_message(format!("{:.1} MB/s", bytes as f64 / 1e6 / s));
            }
        }
        if let Some(d) = &self.download {
            d.set_position(adaptq_remote::bytes_downloaded());
        }
    }

    fn note(&mut self, line: &str) {
        // Printed above the bars; standard error when they are hidden (not a terminal).
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        for b in self.current.iter().chain(&self.download) {
            b.finish_and_clear();
        }
    }
}
