//! Seeded mutation test of the readers of untrusted model files: the GGUF header and tensor
//! table, the safetensors header and the sharded index. Thousands of damaged variants of valid
//! inputs must each give `Ok` or `Err`: never a panic, never an allocation above 2 GiB.
//!
//! Deterministic (SplitMix64 from fixed seeds), so every failure names a seed that reproduces
//! it; `ADAPTQ_MUTATION_CASE=<reader>:<seed>` reruns one case uncaught, with its backtrace. The
//! libFuzzer targets in `fuzz/` search the same entry points open-endedly; this keeps the
//! guarantee in the normal suite.

use adaptq_source::blob::MemBlob;
use adaptq_source::gguf::{parse_header, GgufSource};
use adaptq_source::safetensors::{header_of, index_shard_names, SafetensorsSource};
use adaptq_source::TensorSource;
use harness::{json_mutate, mutate_bytes, run, Report, Rng};
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: harness::Capped = harness::Capped;

/// The mutation engine. The loader's `tests/mutation.rs` carries the same module: the two
/// crates share no test-only dependency, and this is test code.
mod harness {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::{Cell, RefCell};
    use std::fmt::Write as _;
    use std::io::Write as _;
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::Once;
    use std::time::Instant;

    /// The issue's memory bound: no input may make a reader ask for more than 2 GiB at once.
    pub const ALLOC_LIMIT: usize = 2 << 30;

    /// SplitMix64: small, seedable and identical on every platform.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in `0..n` (0 when `n == 0`).
        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
        pub fn pick<'a, T>(&mut self, s: &'a [T]) -> &'a T {
            &s[self.below(s.len())]
        }
    }

    thread_local! {
        /// The case running on this thread, named when an allocation is refused.
        static CASE: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
        /// Set while a case runs: its panic is recorded instead of printed.
        static QUIET: Cell<bool> = const { Cell::new(false) };
        static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// The system allocator, refusing single requests above [`ALLOC_LIMIT`]. A refusal aborts
    /// the process (that is what an out-of-memory does to a reader too), so it first names the
    /// case, formatted without allocating.
    pub struct Capped;

    fn refused(size: usize) {
        let mut msg = Fixed([0; 256], 0);
        let (reader, seed) = CASE.try_with(Cell::get).unwrap_or(("?", 0));
        let _ = write!(
            msg,
            "\nmutation test: refused an allocation of {size} bytes (limit {ALLOC_LIMIT}) in \
             reader '{reader}', seed {seed:#018x}; rerun with ADAPTQ_MUTATION_CASE={reader}:{seed:#x}\n"
        );
        let _ = std::io::stderr().write_all(&msg.0[..msg.1]);
    }

    struct Fixed([u8; 256], usize);
    impl std::fmt::Write for Fixed {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let n = s.len().min(self.0.len() - self.1);
            self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
            self.1 += n;
            Ok(())
        }
    }

    unsafe impl GlobalAlloc for Capped {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            if l.size() > ALLOC_LIMIT {
                refused(l.size());
                return std::ptr::null_mut();
            }
            unsafe { System.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            if l.size() > ALLOC_LIMIT {
                refused(l.size());
                return std::ptr::null_mut();
            }
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            if new > ALLOC_LIMIT {
                refused(new);
                return std::ptr::null_mut();
            }
            unsafe { System.realloc(p, l, new) }
        }
    }

    fn install_hook() {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let prev = panic::take_hook();
            panic::set_hook(Box::new(move |info| {
                if QUIET.with(Cell::get) {
                    let msg = info.payload_as_str().unwrap_or("(non-string panic)");
                    let at = info
                        .location()
                        .map(|l| format!("{}:{}", l.file(), l.line()))
                        .unwrap_or_default();
                    // The innermost adaptq frame: the site in std says little.
                    let bt = std::backtrace::Backtrace::force_capture().to_string();
                    let inner = bt
                        .lines()
                        .filter_map(|l| l.trim().split_once(": ").map(|x| x.1))
                        .find(|f| f.starts_with("adaptq_"))
                        .map(|f| format!(" in {f}"))
                        .unwrap_or_default();
                    LAST.with(|s| *s.borrow_mut() = Some(format!("{msg} at {at}{inner}")));
                } else {
                    prev(info)
                }
            }));
        });
    }

    pub struct Report {
        pub reader: &'static str,
        pub ran: usize,
        /// Inputs the reader accepted (so the checks after parsing ran on them too).
        pub accepted: usize,
        /// (seed, mutations applied, panic site and message).
        pub panics: Vec<(u64, String, String)>,
    }

    impl Report {
        /// The first failing seeds, grouped by panic site, for the assertion message.
        pub fn describe(&self) -> String {
            let mut s = format!(
                "{}: {} of {} inputs panicked\n",
                self.reader,
                self.panics.len(),
                self.ran
            );
            for (seed, muts, msg) in self.panics.iter().take(8) {
                let msg: String = msg.chars().take(400).collect();
                let _ = writeln!(
                    s,
                    "  ADAPTQ_MUTATION_CASE={}:{seed:#x}  [{muts}]\n      {msg}",
                    self.reader
                );
            }
            s
        }
    }

    /// Runs `n` cases of `reader`: case `i` builds its input from a generator seeded by
    /// (`base`, `i`) and hands it to `check`, which must not panic and says whether the reader
    /// accepted the input.
    ///
    /// The cases run in a child process (this test binary again, filtered to `test`): an
    /// input that aborts the process (a refused allocation, a stack overflow) is then reported
    /// like a panic, and the cases after it still run.
    pub fn run<T>(
        reader: &'static str,
        test: &str,
        n: usize,
        base: u64,
        make: impl Fn(&mut Rng, &mut String) -> T,
        check: impl Fn(&T) -> bool,
    ) -> Report {
        install_hook();
        let seeds: Vec<u64> = (0..n as u64)
            .map(|i| Rng(base ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)).next())
            .collect();
        let mut report = Report {
            reader,
            ran: 0,
            accepted: 0,
            panics: Vec::new(),
        };
        if let Ok(case) = std::env::var("ADAPTQ_MUTATION_CASE") {
            // One case, uncaught, so its panic prints with a backtrace.
            let (r, s) = case
                .split_once(':')
                .expect("ADAPTQ_MUTATION_CASE=<reader>:<seed>");
            if r == reader {
                let seed = parse_seed(s);
                let mut log = String::new();
                let input = make(&mut Rng(seed), &mut log);
                eprintln!("{reader} {seed:#x}: {log}");
                CASE.with(|c| c.set((reader, seed)));
                eprintln!("accepted: {}", check(&input));
                report.ran = 1;
            }
            return report;
        }
        if std::env::var("ADAPTQ_MUTATION_CHILD").as_deref() == Ok(reader) {
            let from: usize = std::env::var("ADAPTQ_MUTATION_FROM")
                .ok()
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            let mut err = std::io::stderr();
            let mut accepted = 0;
            for (i, &seed) in seeds.iter().enumerate().skip(from) {
                let _ = writeln!(err, "MUTATION-START {i}");
                let mut log = String::new();
                let input = make(&mut Rng(seed), &mut log);
                CASE.with(|c| c.set((reader, seed)));
                QUIET.with(|q| q.set(true));
                let r = panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
                QUIET.with(|q| q.set(false));
                if let Ok(ok) = r {
                    accepted += ok as usize;
                } else {
                    let msg = LAST.with(|s| s.borrow_mut().take()).unwrap_or_default();
                    let _ = writeln!(
                        err,
                        "MUTATION-PANIC\t{i}\t{}\t{}",
                        log.escape_debug(),
                        msg.escape_debug()
                    );
                }
            }
            let _ = writeln!(err, "MUTATION-DONE {accepted}");
            // The parent reports; this process only ran the cases.
            return report;
        }
        let t = Instant::now();
        let mut from = 0;
        let mut deaths = 0;
        loop {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("ADAPTQ_MUTATION_CHILD", reader)
                .env("ADAPTQ_MUTATION_FROM", from.to_string())
                .output()
                .expect("re-run the test binary");
            let err = String::from_utf8_lossy(&out.stderr);
            let (mut last, mut done) = (None, false);
            let mut other = Vec::new();
            for line in err.lines() {
                if let Some(i) = line.strip_prefix("MUTATION-START ") {
                    last = i.parse::<usize>().ok();
                } else if let Some(p) = line.strip_prefix("MUTATION-PANIC\t") {
                    let f: Vec<&str> = p.splitn(3, '\t').collect();
                    let i: usize = f[0].parse().unwrap();
                    report.panics.push((
                        seeds[i],
                        f[1].to_string(),
                        f.get(2).unwrap_or(&"").to_string(),
                    ));
                } else if let Some(a) = line.strip_prefix("MUTATION-DONE ") {
                    report.accepted += a.parse::<usize>().unwrap_or(0);
                    done = true;
                } else if !line.trim().is_empty() {
                    other.push(line);
                }
            }
            report.ran = last.map_or(from, |i| i + 1);
            if done {
                break;
            }
            let Some(i) = last else {
                panic!(
                    "the mutation child for {reader} did not start: {}\n{err}",
                    out.status
                );
            };
            // What it said before dying, less the backtrace.
            let said: Vec<&str> = other
                .iter()
                .map(|l| l.trim())
                .filter(|l| {
                    !(l.starts_with("note:")
                        || l.starts_with("stack backtrace")
                        || l.split_once(':')
                            .is_some_and(|(n, _)| n.parse::<u32>().is_ok()))
                })
                .collect();
            let tail = said[said.len().saturating_sub(3)..].join(" | ");
            report.panics.push((
                seeds[i],
                "(see ADAPTQ_MUTATION_CASE)".into(),
                format!("process died ({}): {tail}", out.status),
            ));
            deaths += 1;
            from = i + 1;
            if from >= n || deaths >= 8 {
                break;
            }
        }
        eprintln!(
            "mutation {reader}: {} inputs, {} accepted, {} failing, {:.2?}",
            report.ran,
            report.accepted,
            report.panics.len(),
            t.elapsed()
        );
        report
    }

    fn parse_seed(s: &str) -> u64 {
        let s = s.trim();
        s.strip_prefix("0x")
            .map(|h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|| s.parse())
            .expect("ADAPTQ_MUTATION_CASE=<reader>:<seed>")
    }

    /// Values that sit on the edges of the integer widths and of the size checks.
    pub const BOUNDARY: [u64; 16] = [
        0,
        1,
        2,
        0x7f,
        0x80,
        0xff,
        0xffff,
        1 << 31,
        (1 << 31) - 1,
        u32::MAX as u64,
        1 << 32,
        1 << 61,
        1 << 62,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];

    /// Applies 1 to 4 random byte-level mutations; `fields` lists (offset, width) of the
    /// format's integer fields, which get boundary values.
    pub fn mutate_bytes(
        b: &mut Vec<u8>,
        fields: &[(usize, usize)],
        rng: &mut Rng,
        log: &mut String,
    ) {
        for _ in 0..1 + rng.below(4) {
            let len = b.len();
            let at = rng.below(len.max(1));
            let op = rng.below(if fields.is_empty() { 9 } else { 12 });
            let _ = write!(log, "{op}@{at} ");
            match op {
                0 if len > 0 => b[at] ^= 1 << rng.below(8),
                1 if len > 0 => b[at] = *rng.pick(&[0x00, 0xff, 0x7f, 0x80]),
                2 if len > 0 => b[at] = rng.next() as u8,
                3 if len >= 4 => {
                    let at = rng.below(len - 3);
                    let v = *rng.pick(&BOUNDARY) as u32;
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                4 if len >= 8 => {
                    let at = rng.below(len - 7);
                    let v = *rng.pick(&BOUNDARY);
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                5 => {
                    let n = 1 + rng.below(64);
                    let ins: Vec<u8> = if len > 0 && rng.below(2) == 0 {
                        let s = rng.below(len);
                        b[s..(s + n).min(len)].to_vec()
                    } else {
                        (0..n).map(|_| rng.next() as u8).collect()
                    };
                    b.splice(at.min(len)..at.min(len), ins);
                }
                6 if len > 0 => {
                    let e = (at + 1 + rng.below(64)).min(len);
                    b.drain(at..e);
                }
                7 => b.truncate(at),
                8 if len > 0 => {
                    let e = (at + 1 + rng.below(256)).min(len);
                    let chunk = b[at..e].to_vec();
                    let p = rng.below(len + 1);
                    b.splice(p..p, chunk);
                }
                9..=11 => {
                    let (off, w) = *rng.pick(fields);
                    let v = *rng.pick(&BOUNDARY);
                    if off + w <= len {
                        b[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
                    }
                }
                _ => {}
            }
        }
    }

    /// (start, end, is_string) of every string and number token of a JSON text.
    fn json_tokens(t: &[u8]) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < t.len() {
            match t[i] {
                b'"' => {
                    let mut j = i + 1;
                    while j < t.len() && t[j] != b'"' {
                        j += if t[j] == b'\\' { 2 } else { 1 };
                    }
                    let end = (j + 1).min(t.len());
                    out.push((i, end, true));
                    i = end;
                }
                b'-' | b'0'..=b'9' => {
                    let mut j = i + 1;
                    while j < t.len()
                        && matches!(t[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                    {
                        j += 1;
                    }
                    out.push((i, j, false));
                    i = j;
                }
                _ => i += 1,
            }
        }
        out
    }

    const NUMBERS: [&str; 22] = [
        "0",
        "1",
        "-1",
        "2",
        "3",
        "17",
        "255",
        "256",
        "65536",
        "2147483648",
        "4294967295",
        "4294967296",
        "2305843009213693952",
        "4611686018427387904",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "1e400",
        "1.5",
        "-0",
        "123456789012345678901234567890",
    ];

    const STRINGS: [&str; 18] = [
        r#""""#,
        r#""../x""#,
        r#""../../../../tmp/evil""#,
        r#""/etc/passwd""#,
        r#""a\\b""#,
        r#""C:x""#,
        r#"".hidden""#,
        r#""a\u0000b""#,
        r#""a\nb""#,
        r#""\ud800""#,
        r#""é""#,
        r#""shard-00000.bin""#,
        r#""shard-99999.bin""#,
        r#""rans""#,
        r#""F32""#,
        r#""I64""#,
        r#""codes""#,
        r#""codebook""#,
    ];

    const VALUES: [&str; 10] = [
        "null",
        "true",
        "{}",
        "[]",
        "[0]",
        "[1,2]",
        "[0,0,0]",
        r#"{"a":1}"#,
        r#"[[1]]"#,
        r#""x""#,
    ];

    /// Applies 1 to 3 JSON-aware mutations: numbers and strings set to boundary values and
    /// hostile names, tokens dropped, duplicated or swapped, structure broken or nested deeply.
    pub fn json_mutate(text: &mut Vec<u8>, rng: &mut Rng, log: &mut String) {
        for _ in 0..1 + rng.below(3) {
            let toks = json_tokens(text);
            let op = rng.below(12);
            let _ = write!(log, "j{op} ");
            let num: Vec<_> = toks.iter().filter(|t| !t.2).collect();
            let strs: Vec<_> = toks.iter().filter(|t| t.2).collect();
            let splice = |text: &mut Vec<u8>, (s, e): (usize, usize), with: &[u8]| {
                text.splice(s..e, with.iter().copied());
            };
            match op {
                0..=2 if !num.is_empty() => {
                    let &&(s, e, _) = rng.pick(&num);
                    splice(text, (s, e), rng.pick(&NUMBERS).as_bytes());
                }
                3 | 4 if !strs.is_empty() => {
                    let &&(s, e, _) = rng.pick(&strs);
                    if rng.below(8) == 0 {
                        let long = format!("\"{}\"", "x".repeat(1 + rng.below(5000)));
                        splice(text, (s, e), long.as_bytes());
                    } else {
                        splice(text, (s, e), rng.pick(&STRINGS).as_bytes());
                    }
                }
                5 if !toks.is_empty() => {
                    let &(s, e, _) = rng.pick(&toks);
                    splice(text, (s, e), rng.pick(&VALUES).as_bytes());
                }
                6 if !toks.is_empty() => {
                    let &(s, e, _) = rng.pick(&toks);
                    splice(text, (s, e), b"");
                }
                7 if toks.len() >= 2 => {
                    // Duplicate a run of tokens (a key with its value, a whole entry).
                    let a = rng.below(toks.len());
                    let b = (a + 1 + rng.below(8)).min(toks.len() - 1);
                    let chunk = text[toks[a].0..toks[b].1].to_vec();
                    let at = toks[b].1;
                    let mut ins = b", ".to_vec();
                    ins.extend(chunk);
                    text.splice(at..at, ins);
                }
                8 if toks.len() >= 2 => {
                    let a = *rng.pick(&toks);
                    let b = *rng.pick(&toks);
                    let (x, y) = if a.0 < b.0 { (a, b) } else { (b, a) };
                    if x.1 <= y.0 {
                        let (xs, ys) = (text[x.0..x.1].to_vec(), text[y.0..y.1].to_vec());
                        text.splice(y.0..y.1, xs);
                        text.splice(x.0..x.1, ys);
                    }
                }
                9 => {
                    let at = rng.below(text.len() + 1);
                    let s = *rng.pick(&["{", "}", "[", "]", ",", ":", "\"", "\\", "null", "\u{0}"]);
                    text.splice(at..at, s.bytes());
                }
                10 if !toks.is_empty() => {
                    let &(s, e, _) = rng.pick(&toks);
                    let d = *rng.pick(&[64usize, 127, 128, 129, 4000]);
                    let deep = format!("{}{}", "[".repeat(d), "]".repeat(d));
                    splice(text, (s, e), deep.as_bytes());
                }
                _ => mutate_bytes(text, &[], rng, log),
            }
        }
    }
}

/// A little-endian writer that records where its integer fields are, so mutations can aim
/// boundary values at counts, lengths, types and offsets.
#[derive(Default, Clone)]
struct Gguf {
    b: Vec<u8>,
    fields: Vec<(usize, usize)>,
}

impl Gguf {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.fields.push((self.b.len(), 4));
        self.b.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.fields.push((self.b.len(), 8));
        self.b.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.b.extend(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    /// An array of `n` items of type `ty`, each written by `item`.
    fn kv_arr(&mut self, k: &str, ty: u32, n: u64, item: impl Fn(&mut Self, u64)) -> &mut Self {
        self.str(k).u32(9).u32(ty).u64(n);
        for i in 0..n {
            item(self, i);
        }
        self
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, off: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(off)
    }
    fn align(&mut self, a: usize) -> &mut Self {
        while !self.b.len().is_multiple_of(a) {
            self.b.push(0);
        }
        self
    }
    fn data(&mut self, n: usize, seed: u64) -> &mut Self {
        let mut r = Rng(seed);
        // Plausible f16 scales (so dequantized values are finite) over random quants.
        self.b
            .extend((0..n).map(|i| if i % 2 == 1 { 0x3c } else { r.next() as u8 }));
        self
    }
}

/// The hand-made llama of `readers.rs`: one F32 norm [8] and one Q8_0 matrix [2 x 32].
fn gguf_tiny() -> Gguf {
    let mut g = Gguf::default();
    g.b.extend(b"GGUF");
    g.u32(3).u64(2).u64(7);
    g.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.embedding_length", 8)
        .kv_u32("llama.attention.head_count", 2)
        .kv_u32("llama.feed_forward_length", 16)
        .kv_u32("llama.context_length", 64)
        .kv_str("general.name", "tiny");
    g.tensor("blk.0.attn_norm.weight", &[8], 0, 0)
        .tensor("blk.0.attn_q.weight", &[32, 2], 8, 32)
        .align(32)
        .data(32 + 2 * 34, 1);
    g
}

/// Every metadata value type (nested arrays, a tokenizer), 64-byte alignment, GGUF v2, and
/// tensors of F16, BF16, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K.
fn gguf_rich() -> Gguf {
    let mut g = Gguf::default();
    g.b.extend(b"GGUF");
    g.u32(2).u64(7).u64(20);
    g.kv_str("general.architecture", "qwen2")
        .kv_u32("qwen2.block_count", 1)
        .kv_u32("qwen2.embedding_length", 32)
        .kv_u32("qwen2.attention.head_count", 4)
        .kv_u32("qwen2.attention.head_count_kv", 2)
        .kv_u32("qwen2.feed_forward_length", 64)
        .kv_u32("qwen2.context_length", 128)
        .kv_u32("general.alignment", 64);
    g.str("qwen2.rope.freq_base").u32(6).u32(1e6f32.to_bits());
    g.str("qwen2.attention.layer_norm_rms_epsilon")
        .u32(12)
        .u64(1e-6f64.to_bits());
    g.str("general.file_type").u32(10).u64(2);
    g.str("general.quantized_by").u32(11).u64(-7i64 as u64);
    g.str("general.flag").u32(7);
    g.b.push(1);
    g.str("general.small").u32(0);
    g.b.push(200);
    g.str("general.u16").u32(2);
    g.b.extend(7u16.to_le_bytes());
    g.kv_str("tokenizer.ggml.model", "gpt2")
        .kv_arr("tokenizer.ggml.tokens", 8, 6, |g, i| {
            g.str(["<s>", "</s>", "a", "b", "ab", "é"][i as usize]);
        });
    g.kv_arr("tokenizer.ggml.scores", 6, 6, |g, i| {
        g.u32((i as f32 * -0.5).to_bits());
    });
    g.kv_arr("tokenizer.ggml.token_type", 5, 6, |g, i| {
        g.u32(i as u32 % 3);
    });
    // An array of arrays of u8.
    g.kv_arr("general.nested", 9, 2, |g, i| {
        g.u32(0).u64(i + 1);
        g.b.extend((0..=i).map(|x| x as u8));
    });
    let mut off = 0u64;
    let mut data = Vec::new();
    for (name, ne, ty, bytes) in [
        ("token_embd.weight", vec![32u64, 6], 1u32, 32 * 6 * 2),
        ("blk.0.attn_norm.weight", vec![32], 30, 64),
        ("blk.0.attn_q.weight", vec![32, 4], 2, 4 * 18),
        ("blk.0.attn_k.weight", vec![32, 2, 1], 3, 2 * 20),
        ("blk.0.attn_v.weight", vec![32, 1, 1, 2], 6, 2 * 22),
        ("blk.0.ffn_up.weight", vec![256, 1], 12, 144),
        ("output.weight", vec![256], 14, 210),
    ] {
        g.tensor(name, &ne, ty, off);
        data.push(bytes);
        off += (bytes as u64).div_ceil(64) * 64;
    }
    g.align(64);
    for (i, n) in data.into_iter().enumerate() {
        g.data(n, i as u64);
        g.align(64);
    }
    g
}

/// A bert GGUF with a single f32 tensor.
fn gguf_bert() -> Gguf {
    let mut g = Gguf::default();
    g.b.extend(b"GGUF");
    g.u32(3).u64(1).u64(6);
    g.kv_str("general.architecture", "bert")
        .kv_u32("bert.context_length", 512)
        .kv_u32("bert.block_count", 1)
        .kv_u32("bert.embedding_length", 8)
        .kv_u32("bert.attention.head_count", 1)
        .kv_u32("bert.feed_forward_length", 8);
    g.tensor("blk.0.attn_output_norm.weight", &[8], 0, 0)
        .align(32)
        .data(32, 7);
    g
}

/// Every public way in: the header parser, the full source (tensor table checked against the
/// file, model description), and the decode of each tensor it admits.
fn check_gguf(bytes: &[u8]) -> bool {
    let _ = parse_header(bytes, Path::new("m.gguf"));
    let blob = MemBlob {
        label: PathBuf::from("m.gguf"),
        bytes: bytes.to_vec(),
    };
    let Ok(src) = GgufSource::from_blob(Box::new(blob), None) else {
        return false;
    };
    for t in src.tensors() {
        if let Ok(v) = src.read_f32(&t.name) {
            assert_eq!(
                v.len(),
                t.numel(),
                "invariant: '{}' decodes to its shape",
                t.name
            );
        }
        let _ = src.raw_bytes(&t.name);
    }
    true
}

#[test]
fn gguf_reader_survives_mutated_files() {
    let seeds = [gguf_tiny(), gguf_rich(), gguf_bert()];
    for (i, g) in seeds.iter().enumerate() {
        let blob = MemBlob {
            label: "seed.gguf".into(),
            bytes: g.b.clone(),
        };
        if let Err(e) = GgufSource::from_blob(Box::new(blob), None) {
            panic!("seed {i} must be valid: {e}");
        }
        check_gguf(&g.b);
    }
    let r = run(
        "gguf",
        "gguf_reader_survives_mutated_files",
        20000,
        0x6767_7566,
        |rng, log| {
            let g = rng.pick(&seeds);
            let mut b = g.b.clone();
            mutate_bytes(&mut b, &g.fields, rng, log);
            b
        },
        |b| check_gguf(b),
    );
    finish(&[r]);
}

fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

/// (header, data) pairs: the float trio of `readers.rs`, and integer, empty and 3-d tensors.
fn st_seeds() -> Vec<(String, Vec<u8>)> {
    let mut data = Vec::new();
    for v in [1.0f32, -2.0] {
        data.extend(v.to_le_bytes());
    }
    for v in [0.5f32, 3.0] {
        data.extend(half::f16::from_f32(v).to_le_bytes());
    }
    for v in [-1.5f32, 8.0] {
        data.extend(half::bf16::from_f32(v).to_le_bytes());
    }
    let a = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"c":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]}}"#;
    let b = r#"{"ids":{"dtype":"I64","shape":[1,3],"data_offsets":[0,24]},"mask":{"dtype":"I32","shape":[2],"data_offsets":[24,32]},"u":{"dtype":"U8","shape":[4],"data_offsets":[32,36]},"none":{"dtype":"F32","shape":[0,5],"data_offsets":[36,36]},"w":{"dtype":"F32","shape":[1,2,2],"data_offsets":[36,52]},"__metadata__":{}}"#;
    let bdata: Vec<u8> = (0..52u8).map(|i| i.wrapping_mul(37)).collect();
    vec![(a.into(), data), (b.into(), bdata)]
}

/// The in-memory header parser, then the full source (which also reads `config.json` and
/// admits the tensors), then each tensor's decode.
fn check_st(dir: &Path, files: &[Vec<u8>]) -> bool {
    let _ = header_of(&files[0], Path::new("m.safetensors"));
    let blobs = files
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Box::new(MemBlob {
                label: PathBuf::from(format!("m{i}.safetensors")),
                bytes: b.clone(),
            }) as Box<dyn adaptq_source::Blob>
        })
        .collect();
    let Ok(src) = SafetensorsSource::from_blobs(dir.to_path_buf(), blobs) else {
        return false;
    };
    for t in src.tensors() {
        if let Ok(v) = src.read_f32(&t.name) {
            assert_eq!(
                v.len(),
                t.numel(),
                "invariant: '{}' decodes to its shape",
                t.name
            );
        }
        let _ = src.raw_bytes(&t.name);
    }
    true
}

#[test]
fn safetensors_header_survives_mutated_files() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("config.json"),
        br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"num_attention_heads":2,"num_hidden_layers":1,"hidden_size":4,"intermediate_size":8,"vocab_size":3,"num_key_value_heads":1}"#,
    )
    .unwrap();
    let seeds = st_seeds();
    for (h, d) in &seeds {
        let blob = MemBlob {
            label: "seed.safetensors".into(),
            bytes: st_file(h, d),
        };
        if let Err(e) = SafetensorsSource::from_blobs(t.path().to_path_buf(), vec![Box::new(blob)])
        {
            panic!("seed must be valid: {e}");
        }
    }
    let second = st_file(&seeds[1].0, &seeds[1].1);
    let r = run(
        "safetensors",
        "safetensors_header_survives_mutated_files",
        10000,
        0x5afe_7e45,
        |rng, log| {
            let (h, d) = rng.pick(&seeds);
            let mut files = vec![match rng.below(4) {
                // The JSON header, with the length prefix kept consistent.
                0 | 1 => {
                    let mut h = h.clone().into_bytes();
                    json_mutate(&mut h, rng, log);
                    let mut b = (h.len() as u64).to_le_bytes().to_vec();
                    b.extend(h);
                    b.extend(d);
                    b
                }
                // The whole file, the length prefix included.
                2 => {
                    let mut b = st_file(h, d);
                    mutate_bytes(&mut b, &[(0, 8)], rng, log);
                    b
                }
                _ => {
                    let mut h = h.clone().into_bytes();
                    json_mutate(&mut h, rng, log);
                    let mut b = st_file(std::str::from_utf8(&h).unwrap_or("{}"), d);
                    mutate_bytes(&mut b, &[(0, 8)], rng, log);
                    b
                }
            }];
            if rng.below(4) == 0 {
                log.push_str("+shard ");
                files.push(second.clone());
            }
            files
        },
        |files| check_st(t.path(), files),
    );
    finish(&[r]);
}

fn index_seeds() -> Vec<String> {
    let many: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#""model.layers.{i}.weight": "model-0000{}-of-00003.safetensors""#,
                i % 3 + 1
            )
        })
        .collect();
    vec![
        r#"{"metadata":{"total_size":8},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#.into(),
        format!(r#"{{"metadata": {{"total_size": 1234}}, "weight_map": {{{}}}}}"#, many.join(", ")),
    ]
}

/// The index reader, and its contract: every name it returns is a plain file name that stays
/// inside the model's folder.
fn check_index(text: &[u8]) -> bool {
    let Ok(names) = index_shard_names(text, Path::new("model.safetensors.index.json")) else {
        return false;
    };
    for n in &names {
        assert!(
            adaptq_loader::names::is_plain_relative(n, false),
            "invariant: index shard name {n:?} is not a plain file name"
        );
    }
    true
}

#[test]
fn safetensors_index_survives_mutated_files() {
    let seeds = index_seeds();
    for s in &seeds {
        assert!(index_shard_names(s.as_bytes(), Path::new("i")).is_ok());
    }
    let r = run(
        "index",
        "safetensors_index_survives_mutated_files",
        8000,
        0x1de4_0000,
        |rng, log| {
            let mut t = rng.pick(&seeds).clone().into_bytes();
            json_mutate(&mut t, rng, log);
            t
        },
        |t| check_index(t),
    );
    finish(&[r]);
}

/// Writes the valid inputs above as seed corpora of the fuzz targets, into the folder named by
/// `ADAPTQ_FUZZ_SEEDS` (`scripts/fuzz.sh` runs this), so seeds and tests start from the same
/// files and none need committing.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let root = PathBuf::from(std::env::var_os("ADAPTQ_FUZZ_SEEDS").expect("ADAPTQ_FUZZ_SEEDS"));
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for (name, g) in [
        ("tiny", gguf_tiny()),
        ("rich", gguf_rich()),
        ("bert", gguf_bert()),
    ] {
        put("gguf_header", &format!("{name}.gguf"), &g.b);
    }
    for (i, (h, d)) in st_seeds().iter().enumerate() {
        put(
            "safetensors_header",
            &format!("seed{i}.safetensors"),
            &st_file(h, d),
        );
    }
    for (i, t) in index_seeds().iter().enumerate() {
        put("safetensors_index", &format!("seed{i}.json"), t.as_bytes());
    }
}

/// Fails with the first panicking seeds of every reader.
fn finish(reports: &[Report]) {
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| !r.panics.is_empty())
        .map(Report::describe)
        .collect();
    assert!(
        bad.is_empty(),
        "readers panicked on hostile input:\n{}",
        bad.join("\n")
    );
}
