//! Hostile inputs (security issue 18): each test is one crafted file that used to abort, wrap,
//! hang or be accepted, and must now give an error that names the file, or read correctly.

use adaptq_source::blob::{Blob, MemBlob};
use adaptq_source::gguf::{dequantize, parse_header, Array, GgmlType, GgufSource, Value};
use adaptq_source::safetensors::{index_shard_names, SafetensorsSource};
use adaptq_source::{open, sanitize, SourceError, TensorSource};
use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

// ---------- allocation accounting, per thread so parallel tests do not disturb it ----------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        account(l.size() as isize);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        account(-(l.size() as isize));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        account(new as isize - l.size() as isize);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it held allocated at once.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

// ---------- crafted inputs ----------

use adaptq_testutil::gguf::{Builder as Gguf, Writer};
use adaptq_testutil::safetensors::{file as st, one_byte};

fn mem(bytes: Vec<u8>) -> Box<dyn Blob> {
    Box::new(MemBlob {
        label: PathBuf::from("crafted.gguf"),
        bytes,
    })
}

fn gguf_err(g: &Gguf) -> String {
    match GgufSource::from_blob(mem(g.build()), None) {
        Ok(_) => panic!("crafted GGUF was accepted"),
        Err(e) => e.to_string(),
    }
}

fn assert_names_file(e: &str, file: &str) {
    assert!(e.contains(file), "error does not name {file}: {e}");
    assert!(
        !e.chars().any(char::is_control),
        "raw control character in: {e:?}"
    );
}

/// A blob that claims a length it does not back, as a hostile server would: reads past the
/// real bytes give zeros, and the largest read asked for is recorded.
struct Claimed {
    bytes: Vec<u8>,
    len: u64,
    largest_read: AtomicU64,
}

impl Blob for Claimed {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, start: u64, end: u64) -> adaptq_source::Result<Cow<'_, [u8]>> {
        self.largest_read.fetch_max(end - start, Ordering::Relaxed);
        assert!(end - start <= 1 << 30, "asked for {} bytes", end - start);
        let have = &self.bytes[(start as usize).min(self.bytes.len())..];
        let mut v = have[..have.len().min((end - start) as usize)].to_vec();
        v.resize((end - start) as usize, 0);
        Ok(Cow::Owned(v))
    }
    fn label(&self) -> &Path {
        Path::new("https://hostile.invalid/m.gguf")
    }
}

fn claimed(bytes: Vec<u8>, len: u64) -> Claimed {
    Claimed {
        bytes,
        len,
        largest_read: AtomicU64::new(0),
    }
}

// ---------- item 4: counts from a header bounded by the bytes that can back them ----------

#[test]
fn huge_metadata_count_on_a_huge_claimed_file_is_refused_without_allocating() {
    let blob = claimed(Writer::header(3, 0, 1 << 57).b, 1 << 62);
    let (r, peak) = peak_of(|| adaptq_source::gguf::read_header(&blob));
    let e = r.expect_err("2^57 metadata entries accepted").to_string();
    assert!(e.contains("metadata count"), "{e}");
    assert_names_file(&e, "hostile.invalid/m.gguf");
    assert!(peak < 16 << 20, "{peak} bytes allocated");
    assert!(blob.largest_read.load(Ordering::Relaxed) <= 4 << 20);
}

#[test]
fn header_counts_and_lengths_past_the_header_limit_are_refused() {
    // A tensor count over the absolute cap, a key length of 2^40, an array of 2^40 strings:
    // each fits a 2^62-byte claim but no header, and must fail before any fetch of that size.
    let tensors = Writer::header(3, 1 << 40, 0).b;
    let key = Writer::header(3, 0, 1).u64(1 << 40).b.clone();
    let arr = Writer::default().u32(8).u64(1 << 40).b.clone();
    let array = Gguf::empty().kv_raw("a", 9, &arr).build();
    for (bytes, want) in [
        (tensors, "tensor count"),
        (key, "metadata key count"),
        (array, "array count"),
    ] {
        let blob = claimed(bytes, 1 << 62);
        let (r, peak) = peak_of(|| adaptq_source::gguf::read_header(&blob));
        let e = r
            .err()
            .unwrap_or_else(|| panic!("accepted: {want}"))
            .to_string();
        assert!(e.contains(want), "want {want}: {e}");
        assert!(peak < 16 << 20, "{want}: {peak} bytes allocated");
        assert!(
            blob.largest_read.load(Ordering::Relaxed) <= 4 << 20,
            "{want}"
        );
    }
}

#[test]
fn a_string_longer_than_any_header_is_refused_before_fetching_it() {
    let h = Writer::header(3, 0, 1)
        .str("k")
        .u32(8)
        .u64(300 << 20)
        .b
        .clone();
    let blob = claimed(h, 1 << 62);
    let e = adaptq_source::gguf::read_header(&blob)
        .expect_err("300 MiB string accepted")
        .to_string();
    assert!(e.contains("metadata string count"), "{e}");
    assert!(blob.largest_read.load(Ordering::Relaxed) <= 4 << 20);
}

// ---------- item 5: tensor byte sizes use checked arithmetic ----------

#[test]
fn tensor_whose_byte_size_wraps_is_refused() {
    // 2^31 x 2^31 F32 is 2^64 bytes, which wrapped to 0 and was accepted.
    let g = Gguf::llama().tensor("blk.0.attn_q.weight", &[1 << 31, 1 << 31], 0, 0);
    let e = gguf_err(&g);
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("overflows"),
        "{e}"
    );
    assert_names_file(&e, "crafted.gguf");
    // The element count itself overflowing, and a Q8_0 block count times block size.
    let g = Gguf::llama().tensor("a", &[1 << 32, 1 << 32, 1 << 32], 0, 0);
    assert!(gguf_err(&g).contains("overflows"));
    let g = Gguf::llama().tensor("a", &[1 << 62, 8], 8, 0);
    assert!(gguf_err(&g).contains("overflows"));
}

#[test]
fn empty_tensor_with_a_huge_dimension_is_refused() {
    let g = Gguf::llama().tensor("a", &[0, 1 << 40], 0, 0);
    let e = gguf_err(&g);
    assert!(e.contains("no elements"), "{e}");
    // A modest empty tensor is fine.
    let g = Gguf::llama().tensor("a", &[0, 4], 0, 0);
    let src = GgufSource::from_blob(mem(g.build()), None).unwrap();
    assert_eq!(src.tensors()[0].byte_len, 0);
}

// ---------- item 7: metadata arrays take memory in proportion to their bytes ----------

fn big_array(ety: u32, n: u64, item: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(12 + item.len() * n as usize);
    a.extend(ety.to_le_bytes());
    a.extend(n.to_le_bytes());
    for _ in 0..n {
        a.extend(item);
    }
    a
}

#[test]
fn a_32_mib_u8_array_takes_about_32_mib() {
    let n = 32u64 << 20;
    let file = Gguf::llama()
        .kv_raw("x.bytes", 9, &big_array(0, n, &[7]))
        .tensor("blk.0.attn_norm.weight", &[8], 0, 0)
        .data(&[0; 32])
        .build();
    let len = file.len();
    let blob = mem(file);
    let (src, peak) = peak_of(|| GgufSource::from_blob(blob, None));
    let src = src.unwrap();
    // It took 1.06 GB (33x) as one 32-byte Value per item.
    assert!(peak < len * 3 / 2, "{peak} bytes for a {len}-byte file");
    let v = src.gguf_metadata().unwrap().get("x.bytes").unwrap();
    match v {
        Value::Array(Array::U8(b)) => assert!(b.len() == n as usize && b.iter().all(|&x| x == 7)),
        other => panic!("{:?}", other.as_array().map(Array::element_type)),
    }
}

#[test]
fn worst_case_metadata_shapes_stay_within_a_small_multiple() {
    let n = 1u64 << 20;
    let mut cases = vec![
        ("empty strings", big_array(8, 4 * n, &0u64.to_le_bytes()), 2),
        ("u16", big_array(2, 8 * n, &[1, 2]), 2),
        (
            "nested empty arrays",
            big_array(9, n, &big_array(0, 0, &[])),
            3,
        ),
    ];
    // One short unique key per entry, each with a one-byte value.
    let mut kv = Gguf::empty();
    for i in 0..(n / 2) {
        kv = kv.kv_raw(&format!("{i:x}"), 0, &[1]);
    }
    let many = kv.build();
    cases.push(("many entries", Vec::new(), 5));
    for (what, arr, bound) in cases {
        let file = if arr.is_empty() {
            many.clone()
        } else {
            Gguf::empty().kv_raw("x", 9, &arr).build()
        };
        let (h, peak) = peak_of(|| parse_header(&file, Path::new("m.gguf")));
        h.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            peak <= bound * file.len(),
            "{what}: {peak} bytes for a {}-byte header",
            file.len()
        );
    }
}

#[test]
fn compact_arrays_keep_the_metadata_api() {
    let mut arr = Writer::default();
    arr.u32(8).u64(3).str("a").str("").str("bc");
    let arr = arr.b;
    let mut types = Writer::default();
    types.u32(5).u64(2).u32(-1i32 as u32).u32(3);
    let types = types.b;
    let file = Gguf::empty()
        .kv_raw("t", 9, &arr)
        .kv_raw("y", 9, &types)
        .build();
    let h = parse_header(&file, Path::new("m.gguf")).unwrap();
    let md = &h.metadata;
    assert_eq!(md.get_str_array("t").unwrap(), ["a", "", "bc"]);
    assert_eq!(md.get_i64_array("y").unwrap(), [-1, 3]);
    assert_eq!(md.get_f32_array("y").unwrap(), [-1.0, 3.0]);
    let a = md.get("t").unwrap().as_array().unwrap();
    assert_eq!((a.element_type(), a.len()), (8, 3));
    let back = Array::from_values(8, a.iter()).unwrap();
    assert_eq!(&back, a);
    assert!(Array::from_values(8, [Value::U8(1)]).is_none());
    assert!(std::mem::size_of::<Value>() <= 32);
}

// ---------- item 12: GGUF tensor tables ----------

#[test]
fn duplicate_gguf_tensor_names_are_refused() {
    let g = Gguf::llama()
        .tensor("blk.0.attn_norm.weight", &[8], 0, 0)
        .tensor("blk.0.attn_norm.weight", &[8], 0, 32)
        .data(&[0; 64]);
    let e = gguf_err(&g);
    assert!(e.contains("'blk.0.attn_norm.weight' appears twice"), "{e}");
    // Duplicate metadata keys too: which one would `info` show, and which would be used?
    let g = Gguf::llama().kv_str("general.architecture", "qwen2");
    assert!(gguf_err(&g).contains("'general.architecture' appears twice"));
}

/// A tensor-table entry: name, element count, data offset.
type Placed = (&'static str, u64, u64);

#[test]
fn misaligned_or_overlapping_gguf_offsets_are_refused() {
    // (tensors as (name, elements, offset), data bytes, what the error must say)
    let cases: [(&[Placed], usize, &[&str]); 4] = [
        (
            &[("a", 8, 4)],
            64,
            &["'a'", "not a multiple of the file's alignment 32"],
        ),
        (&[("a", 16, 0), ("b", 8, 32)], 96, &["'a' and 'b' overlap"]),
        // Same start, and one range inside another, in either table order.
        (&[("b", 8, 0), ("a", 8, 0)], 32, &["overlap"]),
        (&[("in", 8, 32), ("out", 32, 0)], 128, &["overlap"]),
    ];
    for (tensors, n, want) in cases {
        let mut g = Gguf::llama();
        for &(name, elements, offset) in tensors {
            g = g.tensor(name, &[elements], 0, offset);
        }
        let e = gguf_err(&g.data(&vec![0; n]));
        for w in want {
            assert!(e.contains(w), "want '{w}': {e}");
        }
    }
}

#[test]
fn bad_gguf_alignments_are_refused() {
    for a in [0u32, 3, 48, 1 << 31] {
        let e = gguf_err(&Gguf::llama().kv_u32("general.alignment", a));
        assert!(e.contains("general.alignment"), "{a}: {e}");
    }
    let g = Gguf::llama().kv_str("general.alignment", "32");
    assert!(gguf_err(&g).contains("general.alignment"));
}

/// Q8_0 blocks of 2 rows x 32: scale then 32 int8, and the values they decode to.
fn q8_rows() -> (Vec<u8>, Vec<f32>) {
    let (mut b, mut want) = (Vec::new(), Vec::new());
    for row in 0..2 {
        let d = 0.25 * (row + 1) as f32;
        b.extend(half::f16::from_f32(d).to_le_bytes());
        for j in 0..32i32 {
            b.push((j - 16) as i8 as u8);
            want.push(d * (j - 16) as f32);
        }
    }
    (b, want)
}

#[test]
fn misaligned_block_data_decodes_through_an_aligned_copy() {
    // general.alignment = 1 is a power of two, so a Q8_0 tensor may start at an odd byte of
    // the map; its blocks then sat behind an unchecked pointer cast to an f16-holding struct.
    let (blocks, want) = q8_rows();
    let at = |off: u64| {
        Gguf::llama()
            .alignment(1)
            .tensor("pad", &[1], 0, 0)
            .tensor("blk.0.attn_q.weight", &[32, 2], 8, off)
            .data(&vec![0; off as usize])
            .data(&blocks)
    };
    let start = parse_header(&at(5).build(), Path::new("m"))
        .unwrap()
        .data_start;
    let g = at(if (start + 5) % 2 == 1 { 5 } else { 6 });
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("odd.gguf");
    std::fs::write(&p, g.build()).unwrap();
    let src = open(&p).unwrap();
    let raw = src.raw_bytes("blk.0.attn_q.weight").unwrap();
    assert_ne!(
        raw.as_ptr() as usize % 2,
        0,
        "test wants a misaligned tensor"
    );
    assert_eq!(src.read_f32("blk.0.attn_q.weight").unwrap(), want);
    // The public decoder, on a slice at every offset, and on a slice too short for its count.
    let mut buf = vec![0u8; blocks.len() + 8];
    for off in 0..8 {
        buf[off..off + blocks.len()].copy_from_slice(&blocks);
        let got = dequantize(GgmlType::Q8_0, &buf[off..off + blocks.len()], 64).unwrap();
        assert_eq!(got, want, "offset {off}");
    }
    assert!(dequantize(GgmlType::Q8_0, &blocks[..34], 64).is_err());
    assert!(dequantize(GgmlType::Q4K, &[0; 8], 256).is_err());
    assert!(dequantize(GgmlType::F32, &[0; 8], 3).is_err());
}

// ---------- item 12: safetensors headers ----------

fn st_err(header: &str, data: &[u8]) -> String {
    let blob = Box::new(MemBlob {
        label: PathBuf::from("crafted.safetensors"),
        bytes: st(header, data),
    });
    match SafetensorsSource::from_blobs(PathBuf::from("/nonexistent"), vec![blob]) {
        Ok(_) => panic!("accepted: {header}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn safetensors_offsets_must_tile_the_data_section() {
    let f32x2 = r#""dtype":"F32","shape":[2]"#;
    let cases = [
        (
            format!(
                r#"{{"a":{{{f32x2},"data_offsets":[0,8]}},"b":{{{f32x2},"data_offsets":[4,12]}}}}"#
            ),
            12,
            "tensor 'b' overlaps tensor 'a'",
        ),
        (
            format!(
                r#"{{"a":{{{f32x2},"data_offsets":[0,8]}},"b":{{{f32x2},"data_offsets":[0,8]}}}}"#
            ),
            8,
            "overlaps",
        ),
        (
            format!(
                r#"{{"a":{{{f32x2},"data_offsets":[0,8]}},"b":{{{f32x2},"data_offsets":[12,20]}}}}"#
            ),
            20,
            "bytes 8..12 of the data section, before tensor 'b', belong to no tensor",
        ),
        (
            format!(r#"{{"a":{{{f32x2},"data_offsets":[4,12]}}}}"#),
            12,
            "bytes 0..4",
        ),
        (
            format!(r#"{{"a":{{{f32x2},"data_offsets":[0,8]}}}}"#),
            12,
            "4 bytes after the last tensor",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#.to_string(),
            8,
            "run backwards",
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[1099511627776,0],"data_offsets":[0,0]}}"#.to_string(),
            0,
            "no elements",
        ),
        (
            r#"{"a":{"dtype":"I64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#
                .to_string(),
            0,
            "overflows",
        ),
        (
            r#"{"a":{"dtype":"I64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#
                .to_string(),
            8,
            "needs too many bytes",
        ),
        (
            r#"{"a":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}"#.to_string(),
            1,
            "at most 8 dimensions",
        ),
    ];
    for (h, n, want) in cases {
        let e = st_err(&h, &vec![0; n]);
        assert!(e.contains(want), "want '{want}' for {h}, got: {e}");
        assert_names_file(&e, "crafted.safetensors");
    }
}

#[test]
fn duplicate_safetensors_keys_are_refused() {
    // serde_json keeps the last of two equal keys, so 'a' silently meant the second entry.
    let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let e = st_err(h, &[0; 8]);
    assert!(e.contains("key 'a' appears twice"), "{e}");
    let h = r#"{"__metadata__":{},"__metadata__":{},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    assert!(st_err(h, &[0]).contains("appears twice"));
    // A field given twice inside one entry.
    let h = r#"{"a":{"dtype":"F32","dtype":"U8","shape":[1],"data_offsets":[0,4]}}"#;
    let e = st_err(h, &[0; 4]);
    assert!(e.contains("duplicate field"), "{e}");
    // And one tensor in two shards of a sharded model.
    let shard = |name: &str| -> Box<dyn Blob> {
        Box::new(MemBlob {
            label: PathBuf::from(name),
            bytes: one_byte("x"),
        })
    };
    let shards = vec![shard("one.safetensors"), shard("two.safetensors")];
    let e = adaptq_testutil::err_text(SafetensorsSource::from_blobs(
        PathBuf::from("/nonexistent"),
        shards,
    ));
    assert!(
        e.contains("two.safetensors") && e.contains("'x' appears twice"),
        "{e}"
    );
}

// ---------- item 13: strings from files are escaped, and errors name the file ----------

#[test]
fn sanitize_escapes_control_and_bidi_characters() {
    assert!(matches!(sanitize("blk.0.ffn_up.weight"), Cow::Borrowed(_)));
    assert_eq!(sanitize("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
    assert_eq!(sanitize("x\ny\r\0"), "x\\u{a}y\\u{d}\\u{0}");
    assert_eq!(sanitize("\u{9b}31m"), "\\u{9b}31m");
    assert_eq!(sanitize("abc\u{202e}fed"), "abc\\u{202e}fed");
    assert_eq!(sanitize("naïve 模型"), "naïve 模型");
}

#[test]
fn escape_codes_in_an_architecture_string_are_not_printed_raw() {
    let evil = "\u{1b}]0;owned\u{7}\u{1b}[2J";
    let g = Gguf::empty().kv_str("general.architecture", evil);
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("evil.gguf");
    std::fs::write(&p, g.build()).unwrap();
    let e = open(&p).err().unwrap();
    assert!(matches!(e, SourceError::UnsupportedArch { .. }));
    let e = e.to_string();
    assert_names_file(&e, "evil.gguf");
    assert!(e.contains("\\u{1b}]0;owned"), "{e}");
    // A hugging-face config names its file too.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("model.safetensors"), one_byte("a")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        r#"{"model_type":"\u001b[31mgpt"}"#,
    )
    .unwrap();
    let e = open(d.path()).err().unwrap().to_string();
    assert!(e.contains("unsupported architecture"), "{e}");
    assert_names_file(&e, "config.json");
}

#[test]
fn tensor_names_and_dtypes_in_errors_are_escaped() {
    let g = Gguf::llama()
        .tensor("\u{1b}[8mhidden", &[8], 0, 4)
        .data(&[0; 64]);
    let e = gguf_err(&g);
    assert!(e.contains("\\u{1b}[8mhidden"), "{e}");
    assert_names_file(&e, "crafted.gguf");
    let e = st_err(
        r#"{"a\u0007":{"dtype":"\u001bX","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    );
    assert!(e.contains("unsupported dtype \\u{1b}X"), "{e}");
    assert_names_file(&e, "crafted.safetensors");
}

// ---------- shard names in a safetensors index ----------

#[test]
fn index_shard_names_must_be_plain_names_in_the_folder() {
    let idx = Path::new("model.safetensors.index.json");
    let ok = br#"{"metadata":{"total_size":8},"weight_map":{"b":"model-00002-of-00002.safetensors","a":"model-00001-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#;
    assert_eq!(
        index_shard_names(ok, idx).unwrap(),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    for bad in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/x.safetensors",
        "..",
        "",
        "C:x.safetensors",
        "a\\\\b.safetensors",
        "a\\u001bb.safetensors",
    ] {
        let text = format!(r#"{{"weight_map":{{"a":"{bad}"}}}}"#);
        let e = index_shard_names(text.as_bytes(), idx)
            .err()
            .unwrap_or_else(|| panic!("accepted shard name {bad}"))
            .to_string();
        assert!(e.contains("not a plain file name"), "{bad}: {e}");
        assert_names_file(&e, "model.safetensors.index.json");
    }
    let twice = br#"{"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}"#;
    assert!(index_shard_names(twice, idx).is_err());
    assert!(index_shard_names(br#"{"weight_map":[]}"#, idx).is_err());
    assert!(index_shard_names(br#"{}"#, idx).is_err());
}

#[test]
fn a_local_index_pointing_outside_its_folder_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let inner = t.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(t.path().join("outside.safetensors"), one_byte("x")).unwrap();
    std::fs::write(
        inner.join("model.safetensors.index.json"),
        br#"{"weight_map":{"x":"../outside.safetensors"}}"#,
    )
    .unwrap();
    let e = open(&inner).err().unwrap().to_string();
    assert!(e.contains("not a plain file name"), "{e}");
    assert_names_file(&e, "model.safetensors.index.json");
}

// ---------- regular files only ----------

/// Runs `f` on a thread and fails the test if it has not returned within 20 s (a FIFO used
/// to block the open forever).
fn within_time<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    adaptq_testutil::files::within("reading a non-regular file", 20, f)
}

#[cfg(unix)]
use adaptq_testutil::files::mkfifo;

/// A file to write: its name and bytes.
#[cfg(unix)]
type NamedBytes = (&'static str, Vec<u8>);

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_not_waited_on() {
    let t = tempfile::tempdir().unwrap();
    let fifo = t.path().join("model.gguf");
    mkfifo(&fifo);
    let p = fifo.clone();
    let e = within_time(move || open(&p).err().map(|e| e.to_string())).expect("FIFO opened");
    assert!(e.contains("not a regular file"), "{e}");
    assert_names_file(&e, "model.gguf");
    let p = fifo.clone();
    let e = within_time(move || GgufSource::open(&p).err().map(|e| e.to_string()));
    assert!(e.expect("FIFO opened").contains("not a regular file"));
    for dev in ["/dev/zero", "/dev/null"] {
        let e = within_time(move || open(Path::new(dev)).err().map(|e| e.to_string()))
            .unwrap_or_else(|| panic!("{dev} opened"));
        assert!(e.contains("not a regular file"), "{dev}: {e}");
    }

    // Companion files: a FIFO as the index, as config.json, as a shard: (regular files
    // written first, the FIFO, what the error must name besides "not a regular file").
    let index = br#"{"weight_map":{"x":"model-1.safetensors"}}"#.to_vec();
    let companions: [(Vec<NamedBytes>, &str, &str); 3] = [
        (vec![], "model.safetensors.index.json", ""),
        (
            vec![("model.safetensors", one_byte("a"))],
            "config.json",
            "config.json",
        ),
        (
            vec![("model.safetensors.index.json", index)],
            "model-1.safetensors",
            "model-1.safetensors",
        ),
    ];
    for (files, fifo, named) in companions {
        let d = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(d.path().join(name), bytes).unwrap();
        }
        mkfifo(&d.path().join(fifo));
        let p = d.path().to_path_buf();
        let e = within_time(move || open(&p).err().map(|e| e.to_string())).expect("opened");
        assert!(e.contains(named) && e.contains("not a regular file"), "{e}");
    }
}

// ---------- hyper-parameters from a header ----------

#[test]
fn absurd_hyper_parameters_are_refused() {
    let g = Gguf::empty()
        .kv_str("general.architecture", "llama")
        .kv_raw("llama.block_count", 10, &(1u64 << 60).to_le_bytes())
        .kv_u32("llama.embedding_length", 8)
        .kv_u32("llama.attention.head_count", 2)
        .kv_u32("llama.feed_forward_length", 16)
        .kv_u32("llama.context_length", 64);
    let e = gguf_err(&g);
    assert!(e.contains("layers claimed"), "{e}");
    let g = Gguf::llama()
        .kv_raw("llama.attention.head_count_kv", 4, &9u32.to_le_bytes())
        .tensor("blk.0.attn_norm.weight", &[8], 0, 0)
        .data(&[0; 32]);
    assert!(gguf_err(&g).contains("9 key/value heads"));
    let mut g = Gguf::empty().kv_str("general.architecture", "llama");
    for (k, v) in [
        ("llama.block_count", 0u64),
        ("llama.embedding_length", 1 << 40),
        ("llama.attention.head_count", 2),
        ("llama.feed_forward_length", 16),
        ("llama.context_length", 64),
    ] {
        g = g.kv_raw(k, 10, &v.to_le_bytes());
    }
    assert!(gguf_err(&g).contains("hidden size"));
}

/// Expert counts come from the header: a mixture claiming more experts than any model has,
/// or more experts per token than experts, is refused naming the file.
#[test]
fn mixture_headers_past_the_limits_are_refused() {
    let norm = |g: Gguf| {
        g.tensor("blk.0.attn_norm.weight", &[8], 0, 0)
            .data(&[0; 32])
    };
    for (experts, used, why) in [
        (u32::MAX, 2, "not a valid mixture"),
        (4, 5, "5 of 4 experts"),
        (4, 0, "0 of 4 experts"),
    ] {
        let g = norm(
            Gguf::llama()
                .kv_u32("llama.expert_count", experts)
                .kv_u32("llama.expert_used_count", used),
        );
        let e = gguf_err(&g);
        assert!(e.contains(why), "{experts}/{used}: {e}");
        assert_names_file(&e, "crafted.gguf");
    }
    let g = norm(Gguf::llama().kv_u32("llama.expert_count", 4));
    assert!(gguf_err(&g).contains("lacks llama.expert_used_count"));
}

/// A stacked expert tensor reads as one matrix per expert, each a slice of the stack's bytes;
/// a stack whose rows are not whole blocks (so experts would share a block) is refused.
#[test]
fn stacked_experts_read_as_one_matrix_each() {
    // Q8_0 (type 8): 3 experts of [2 rows, 32 columns], row r of expert j all (10 j + r).
    let mut data = Vec::new();
    for j in 0..3i8 {
        for r in 0..2i8 {
            data.extend(half::f16::from_f32(1.0).to_le_bytes());
            data.extend(std::iter::repeat_n((10 * j + r) as u8, 32));
        }
    }
    let moe = |n: u32| {
        Gguf::llama()
            .kv_u32("llama.expert_count", n)
            .kv_u32("llama.expert_used_count", 2)
    };
    let g = moe(3)
        .tensor("blk.0.ffn_up_exps.weight", &[32, 2, 3], 8, 0)
        .data(&data);
    let src = GgufSource::from_blob(mem(g.build()), None).unwrap();
    let names: Vec<(&str, &[usize])> = src
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        names,
        [0, 1, 2].map(|j| (
            [
                "blk.0.ffn_up_exps.0.weight",
                "blk.0.ffn_up_exps.1.weight",
                "blk.0.ffn_up_exps.2.weight"
            ][j],
            &[2usize, 32][..]
        ))
    );
    let one = src.read_f32("blk.0.ffn_up_exps.1.weight").unwrap();
    assert_eq!(one[..32], [10.0; 32]);
    assert_eq!(one[32..], [11.0; 32]);
    assert_eq!(
        src.raw_bytes("blk.0.ffn_up_exps.2.weight").unwrap()[..],
        data[136..]
    );

    // Q8_0 rows of 16 values: two experts would share one block.
    let g = moe(2)
        .tensor("blk.0.ffn_up_exps.weight", &[16, 1, 2], 8, 0)
        .data(&data[..34]);
    let e = gguf_err(&g);
    assert!(e.contains("row of 16 is not a multiple"), "{e}");
    // A stack of more (or other) experts than declared, or none declared: each header entry
    // could otherwise become thousands of tensors.
    for (g, why) in [
        (moe(4), "stacks 3 experts, the metadata declares 4"),
        (Gguf::llama(), "the metadata declares none"),
    ] {
        let g = g
            .tensor("blk.0.ffn_up_exps.weight", &[32, 2, 3], 8, 0)
            .data(&data);
        let e = gguf_err(&g);
        assert!(e.contains(why), "{e}");
    }
    // Empty experts.
    let g = moe(3).tensor("blk.0.ffn_up_exps.weight", &[32, 0, 3], 8, 0);
    assert!(gguf_err(&g).contains("do not split into 3 experts"));
}
