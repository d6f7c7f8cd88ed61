//! Seeded mutation test of the no_std bundle loader: the manifest and its layout check
//! ([`Loader::new`]), shards fed in hostile pieces ([`Loader::feed`]) and the tensors they
//! decode to, the rANS decoder and the codebook decoder. Thousands of damaged variants of
//! valid inputs must each give `Ok`/`Err` (`Some`/`None`): never a panic, never an allocation
//! above 2 GiB.
//!
//! Manifests are re-hashed after each mutation (the global digest over the shard list, then
//! `manifest_digest`), and mutated shards get their hashes recomputed, so the checks behind
//! the digests run on hostile values instead of stopping at the first hash. Deterministic
//! (SplitMix64 from fixed seeds); `ADAPTQ_MUTATION_CASE=<reader>:<seed>` reruns one case
//! uncaught. The libFuzzer targets in `fuzz/` search the same entry points open-endedly.

use adaptq_bundle::{blake3_hex, sha256_hex, Encoding};
use adaptq_loader::{codebook, rans, Loader};
use adaptq_quant::Grid;
use adaptq_testutil::bundle::{self as fixture, add_linear, add_plain};
use adaptq_testutil::loading::{exercise, rehash, stage_refs, Stage};
use adaptq_testutil::mutate::{
    finish, fuzz_seed_writer, json_mutate, mutate_bytes, run, Capped, Rng, BOUNDARY,
};
use adaptq_testutil::rand::{f16_bytes as f16s, grid_values, skewed};
use serde_json::Value;
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: Capped = Capped;

/// A bundle as the loader receives it: manifest text and (file, bytes) shards.
#[derive(Clone)]
struct Bundle {
    manifest: String,
    shards: Vec<(String, Vec<u8>)>,
}

/// Every encoding the loader knows (int grids symmetric and asymmetric, per group and per
/// channel, a two-stage codebook, f16, f32, raw, GGML blocks) over 512-byte shards, with the
/// lossless stage on; and a small plain one.
fn bundles() -> &'static [Bundle] {
    static B: OnceLock<Vec<Bundle>> = OnceLock::new();
    B.get_or_init(|| vec![build(512, true, true), build(1024, false, false)])
}

fn build(shard: u64, lossless: bool, all: bool) -> Bundle {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = fixture::writer(&d, shard, lossless);
    let mut int = |name: &str, bits: u8, gs: usize, grid: Grid, rows: usize, cols: usize| {
        let codes: Vec<u8> = skewed(rows * cols, bits, bits as u64)
            .into_iter()
            .map(|c| c as u8)
            .collect();
        let codes = adaptq_loader::pack::pack(&codes, bits);
        let groups = rows
            * if gs == 0 || gs >= cols {
                1
            } else {
                cols.div_ceil(gs)
            };
        let scales = f16s(groups, 1);
        let mins = f16s(groups, 2);
        let enc = fixture::int(bits, gs, grid);
        fixture::add_int(&mut w, name, &[rows, cols], enc, [&codes, &scales, &mins]);
    };
    int("blk.0.attn_k.weight", 2, 32, Grid::Symmetric, 16, 64);
    if all {
        int("blk.0.attn_q.weight", 4, 32, Grid::Symmetric, 12, 96);
        int("blk.0.ffn_down.weight", 3, 0, Grid::Asymmetric, 10, 100);
        // A two-stage codebook, 64 x 40 in vectors of 4.
        let (rows, cols, dim, bits) = (64usize, 40usize, 4usize, [4u8, 2]);
        let nv = codebook::vectors_per_row(cols, dim);
        let mut parts: Vec<(&str, Vec<u8>)> = vec![
            ("row_scale", f16s(rows, 3)),
            ("row_mean", f16s(rows, 4)),
            ("col_scale", f16s(cols, 5)),
        ];
        for (s, &b) in bits.iter().enumerate() {
            parts.push((
                ["codebook0", "codebook1"][s],
                f16s((1 << b) * dim, 6 + s as u64),
            ));
            let codes = codebook::pack(&skewed(rows * nv, b, 8 + s as u64), b);
            parts.push((["codes0", "codes1"][s], codes));
        }
        let refs: Vec<(&str, &[u8])> = parts.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let enc = Encoding::Codebook {
            dim,
            stage_bits: bits.to_vec(),
        };
        add_linear(&mut w, "blk.0.attn_v.weight", &[rows, cols], enc, &refs);
        let blocks: Vec<u8> = (0..2 * 34u32).map(|i| (i * 13 % 251) as u8).collect();
        let q8 = adaptq_quant::ggml::BlockType::Q8_0;
        w.add_tensor(
            "blk.1.attn_q.weight",
            &[2, 32],
            "linear",
            "rtn",
            Encoding::Ggml { ggml_type: q8 },
            &[("blocks", &blocks)],
        )
        .unwrap();
        let raw: Vec<u8> = (0..32u8).collect();
        let enc = Encoding::Raw {
            dtype: "I64".into(),
            byte_len: 32,
        };
        w.add_tensor(
            "position_ids",
            &[4],
            "other",
            "none",
            enc,
            &[("data", &raw)],
        )
        .unwrap();
    }
    add_plain(
        &mut w,
        "token_embd.weight",
        &[8, 16],
        Encoding::F16,
        &f16s(128, 9),
    );
    let norm: Vec<u8> = (0..16)
        .flat_map(|i| (i as f32 / 16.0).to_le_bytes())
        .collect();
    add_plain(&mut w, "output_norm.weight", &[16], Encoding::F32, &norm);
    fixture::finish(w, "t", "file:t.gguf", 8, serde_json::json!({"seed": 0}));
    Bundle {
        manifest: std::fs::read_to_string(d.join("manifest.json")).unwrap(),
        shards: fixture::shards(&d),
    }
}

/// JSON pointers of every value in `v`, the root excluded.
fn pointers(v: &Value, at: &mut String, out: &mut Vec<String>) {
    let len = at.len();
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                out.push(at.clone());
                pointers(x, at, out);
                at.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push_str(&format!("/{i}"));
                out.push(at.clone());
                pointers(x, at, out);
                at.truncate(len);
            }
        }
        _ => {}
    }
}

/// Sets one to three values of the manifest (a shape, a bit width, a part length, a segment,
/// a shard size, a name) to boundary or hostile values, or drops or repeats an array item.
fn value_mutate(v: &mut Value, rng: &mut Rng, log: &mut String) {
    for _ in 0..1 + rng.below(3) {
        let mut ptrs = Vec::new();
        pointers(v, &mut String::new(), &mut ptrs);
        // Mostly the tensor table and shard list: that is what the layout check reads.
        let focus: Vec<&String> = ptrs
            .iter()
            .filter(|p| p.starts_with("/tensors") || p.starts_with("/shards"))
            .collect();
        let pool: Vec<&String> = if focus.is_empty() || rng.below(8) == 0 {
            ptrs.iter().collect()
        } else {
            focus
        };
        if pool.is_empty() {
            return;
        }
        let p = rng.pick(&pool).to_string();
        let p = p.as_str();
        let op = rng.below(8);
        log.push_str(&format!("v{op}{p} "));
        let (parent, idx) = p.rsplit_once('/').unwrap();
        match op {
            0..=3 => {
                let new = match rng.below(6) {
                    0..=2 => Value::from(*rng.pick(&BOUNDARY)),
                    3 => Value::from(*rng.pick(&[-1i64, i64::MIN, 3, 9, 16, 17, 64, 65])),
                    4 => Value::from(*rng.pick(&[1.5f64, -0.0, 1e300])),
                    _ => Value::from(*rng.pick(&[
                        "../x",
                        "",
                        "shard-00000.bin",
                        "rans",
                        "zstd",
                        "codes",
                        "a\u{0}b",
                    ])),
                };
                *v.pointer_mut(p).unwrap() = new;
            }
            4 => {
                let new = rng
                    .pick(&[
                        Value::Null,
                        Value::Bool(true),
                        Value::Array(vec![]),
                        serde_json::json!({}),
                        serde_json::json!([0]),
                    ])
                    .clone();
                *v.pointer_mut(p).unwrap() = new;
            }
            5 | 6 => {
                // Drop or repeat an item of an array (a dimension, a part, a segment, a shard).
                if let Some(Value::Array(a)) = v.pointer_mut(parent) {
                    if let Ok(i) = idx.parse::<usize>() {
                        if op == 5 {
                            a.remove(i);
                        } else {
                            let x = a[i].clone();
                            a.insert(i, x);
                        }
                    }
                } else if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                    if op == 5 {
                        m.remove(&idx.replace("~1", "/").replace("~0", "~"));
                    }
                }
            }
            _ => {
                // Off by one from the value it had.
                let x = v.pointer_mut(p).unwrap();
                if let Some(n) = x.as_u64() {
                    *x = Value::from(if rng.below(2) == 0 {
                        n.wrapping_add(1)
                    } else {
                        n.wrapping_sub(1)
                    });
                }
            }
        }
    }
}

/// The layout check, and when it passes, the bundle's own shards fed and every tensor read.
fn check_manifest(text: &[u8], b: &Bundle) -> bool {
    let Ok(mut l) = Loader::new(text) else {
        return false;
    };
    let missing: Vec<String> = l.missing().iter().map(|s| s.to_string()).collect();
    for m in &missing {
        if let Some((_, bytes)) = b.shards.iter().find(|(f, _)| f == m) {
            let _ = l.feed(m, bytes);
        }
    }
    exercise(&l);
    true
}

#[test]
fn manifest_layout_check_survives_mutated_manifests() {
    for b in bundles() {
        let mut l = Loader::new(b.manifest.as_bytes()).unwrap();
        assert_eq!(
            rehash(&b.manifest),
            b.manifest,
            "re-hashing is the writer's hashing"
        );
        for (f, s) in &b.shards {
            l.feed(f, s).unwrap();
        }
        exercise(&l);
    }
    assert!(
        bundles()[0].manifest.contains("\"lossless\""),
        "the seed bundle exercises the rANS stage"
    );
    let r = run(
        "manifest",
        "manifest_layout_check_survives_mutated_manifests",
        16000,
        0x3a41_f357,
        |rng, log| {
            let bi = rng.below(bundles().len());
            let b = &bundles()[bi];
            let text = if rng.below(2) == 0 {
                let mut t = b.manifest.clone().into_bytes();
                json_mutate(&mut t, rng, log);
                match String::from_utf8(t) {
                    Ok(s) => rehash(&s),
                    Err(e) => return (bi, e.into_bytes()),
                }
            } else {
                let mut v: Value = serde_json::from_str(&b.manifest).unwrap();
                value_mutate(&mut v, rng, log);
                rehash(&(serde_json::to_string_pretty(&v).unwrap() + "\n"))
            };
            (bi, text.into_bytes())
        },
        |(bi, text)| check_manifest(text, &bundles()[*bi]),
    );
    finish(&[r]);
}

/// A bundle whose shards were damaged after writing and re-hashed: the hashes hold, so what
/// is checked is what the loader does with hostile shard contents.
struct FeedCase {
    manifest: String,
    shards: Vec<(String, Vec<u8>)>,
    plan: u64,
}

fn feed_case(rng: &mut Rng, log: &mut String) -> FeedCase {
    let b = &bundles()[rng.below(bundles().len())];
    let mut shards = b.shards.clone();
    let mut v: Value = serde_json::from_str(&b.manifest).unwrap();
    for _ in 0..1 + rng.below(2) {
        let i = rng.below(shards.len());
        let _ = std::fmt::Write::write_fmt(log, format_args!("s{i}:"));
        let s = &mut shards[i].1;
        if s.is_empty() {
            continue;
        }
        if rng.below(5) == 0 {
            mutate_bytes(s, &[], rng, log);
        } else {
            // Same length, so segments still fit: bit flips and boundary values only.
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(s.len());
                match rng.below(3) {
                    0 => s[at] ^= 1 << rng.below(8),
                    1 => s[at] = *rng.pick(&[0, 0xff, 0x7f, 0x80]),
                    _ if s.len() >= at + 8 => {
                        s[at..at + 8].copy_from_slice(&rng.pick(&BOUNDARY).to_le_bytes())
                    }
                    _ => s[at] = rng.next() as u8,
                }
            }
        }
        let e = &mut v["shards"][i];
        e["bytes"] = Value::from(s.len() as u64);
        e["sha256"] = Value::from(sha256_hex(s));
        e["blake3"] = Value::from(blake3_hex(s));
    }
    FeedCase {
        manifest: rehash(&(serde_json::to_string_pretty(&v).unwrap() + "\n")),
        shards,
        plan: rng.next(),
    }
}

/// Feeds every shard, in a random order and in random pieces, between hostile calls (unknown
/// names, a corrupt copy, bytes past the end, a repeat after verification), then reads every
/// tensor. Contract: a shard sent whole and intact after any of that is verified.
fn check_feed(c: &FeedCase) -> bool {
    let Ok(mut l) = Loader::new(c.manifest.as_bytes()) else {
        return false;
    };
    let mut rng = Rng(c.plan);
    let mut order: Vec<usize> = (0..c.shards.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in &order {
        let (name, bytes) = &c.shards[i];
        match rng.below(6) {
            0 => {
                let bad =
                    *rng.pick(&["shard-99999.bin", "../shard-00000.bin", "", "manifest.json"]);
                let _ = l.feed(bad, bytes);
            }
            1 if !bytes.is_empty() => {
                let mut bad = bytes.clone();
                let at = rng.below(bad.len());
                bad[at] ^= 0x20;
                let _ = l.feed(name, &bad);
            }
            2 => {
                let _ = l.feed(name, &[bytes.as_slice(), b"x"].concat());
            }
            _ => {}
        }
        let mut rest: &[u8] = bytes;
        loop {
            let n = (1 + rng.below(400)).min(rest.len());
            let r = l.feed(name, &rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                assert!(r.is_ok(), "invariant: intact {name} refused: {r:?}");
                break;
            }
        }
        if rng.below(4) == 0 {
            let _ = l.feed(name, &bytes[..bytes.len().min(3)]);
        }
    }
    assert!(
        l.is_complete(),
        "invariant: all shards sent intact, yet {:?} missing",
        l.missing()
    );
    exercise(&l);
    true
}

#[test]
fn feed_and_tensor_decode_survive_hostile_shards() {
    let r = run(
        "feed",
        "feed_and_tensor_decode_survive_hostile_shards",
        6000,
        0xfeed_0000,
        feed_case,
        check_feed,
    );
    finish(&[r]);
}

/// A rANS stream, its raw length, and (offset, width) of its header fields.
type RansSeed = (Vec<u8>, usize, Vec<(usize, usize)>);

/// Streams of widths 1 to 12 and 0 to 1000 symbols.
fn rans_seeds() -> Vec<RansSeed> {
    let mut out = Vec::new();
    for (k, bits) in [1u8, 2, 3, 4, 5, 8, 11, 12].into_iter().enumerate() {
        for n in [0usize, 1, 7, 100, 1000] {
            let packed = codebook::pack(&skewed(n, bits, k as u64 * 31 + n as u64), bits);
            let s = rans::encode(&packed, bits, n).unwrap();
            let mut fields = vec![(0, 1), (1, 8)];
            // The frequency table: one LEB128 per symbol, then the 32-bit state.
            let mut pos = 9;
            for _ in 0..(1usize << bits).min(64) {
                if n == 0 || pos >= s.len() {
                    break;
                }
                let w = s[pos..].iter().position(|b| b & 0x80 == 0).unwrap_or(0) + 1;
                fields.push((pos, w.min(4)));
                pos += w;
            }
            if n > 0 && bits <= 6 {
                fields.push((pos, 4));
            }
            out.push((s, packed.len(), fields));
        }
    }
    out
}

/// The raw length the loader would accept for this stream's header: what `packed_len` gives
/// in release builds (wrapping), so a hostile count is not stopped by a mismatched length.
fn consistent_len(s: &[u8]) -> usize {
    match s.get(1..9) {
        Some(n) => {
            let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
            n.wrapping_mul(s[0] as usize).div_ceil(8)
        }
        None => 0,
    }
}

#[test]
fn rans_decoder_survives_mutated_streams() {
    let seeds = rans_seeds();
    for (s, raw, _) in &seeds {
        assert_eq!(rans::decode(s, *raw).map(|v| v.len()), Some(*raw));
    }
    let r = run(
        "rans",
        "rans_decoder_survives_mutated_streams",
        20000,
        0x4a45_0000,
        |rng, log| {
            let (s, raw, fields) = rng.pick(&seeds);
            let mut s = s.clone();
            mutate_bytes(&mut s, fields, rng, log);
            let raw = match rng.below(8) {
                0..=3 => *raw,
                4..=6 => consistent_len(&s),
                _ => *rng.pick(&BOUNDARY) as usize,
            };
            (s, raw)
        },
        |(s, raw)| {
            let out = rans::decode(s, *raw);
            if let Some(v) = &out {
                assert_eq!(v.len(), *raw, "invariant: decodes to the recorded length");
            }
            out.is_some()
        },
    );
    finish(&[r]);
}

/// Arguments of `codebook::decode`, owned.
#[derive(Clone)]
struct Cb {
    rows: usize,
    cols: usize,
    dim: usize,
    stages: Vec<Stage>,
    row_scale: Vec<f32>,
    row_mean: Vec<f32>,
    col_scale: Vec<f32>,
}

/// `n` values in [-2, 2) on a grid of 1/500.
fn floats(n: usize, r: &mut Rng) -> Vec<f32> {
    grid_values(n, r).into_iter().map(|v| v * 2.0).collect()
}

/// A valid codebook tensor of random size, 1 to 4 stages of 1 to 8 bits (rarely 12 to 16).
fn cb_valid(r: &mut Rng) -> Cb {
    let (rows, cols, dim) = (1 + r.below(6), 1 + r.below(24), 1 + r.below(6));
    let nv = codebook::vectors_per_row(cols, dim);
    let stages = (0..1 + r.below(4))
        .map(|_| {
            let bits = if r.below(16) == 0 {
                12 + r.below(5)
            } else {
                1 + r.below(8)
            } as u8;
            let codes: Vec<u16> = (0..rows * nv).map(|_| r.below(1 << bits) as u16).collect();
            (
                bits,
                floats((1 << bits) * dim, r),
                codebook::pack(&codes, bits),
            )
        })
        .collect();
    Cb {
        rows,
        cols,
        dim,
        stages,
        row_scale: floats(rows, r),
        row_mean: floats(rows, r),
        col_scale: floats(cols, r),
    }
}

fn cb_mutate(c: &mut Cb, r: &mut Rng, log: &mut String) {
    const SIZES: [usize; 8] = [0, 1, 2, 3, usize::MAX, 1 << 32, 1 << 61, usize::MAX / 2 + 1];
    for _ in 0..1 + r.below(3) {
        let op = r.below(10);
        log.push_str(&format!("c{op} "));
        let s = r.below(c.stages.len().max(1));
        match op {
            0 => c.rows = *r.pick(&SIZES),
            1 => c.cols = *r.pick(&SIZES),
            2 => c.dim = *r.pick(&SIZES),
            3 => {
                let d = *r.pick(&[1isize, -1]);
                match r.below(3) {
                    0 => c.rows = c.rows.wrapping_add_signed(d),
                    1 => c.cols = c.cols.wrapping_add_signed(d),
                    _ => c.dim = c.dim.wrapping_add_signed(d),
                }
            }
            4 if !c.stages.is_empty() => {
                c.stages[s].0 = *r.pick(&[0u8, 1, 2, 8, 15, 16, 17, 31, 32, 63, 64, 65, 128, 255]);
            }
            5 => {
                // A slice one short, one long, empty or doubled.
                let v: &mut Vec<f32> = match r.below(4) {
                    0 => &mut c.row_scale,
                    1 => &mut c.row_mean,
                    2 => &mut c.col_scale,
                    _ if !c.stages.is_empty() => &mut c.stages[s].1,
                    _ => &mut c.col_scale,
                };
                match r.below(4) {
                    0 => {
                        v.pop();
                    }
                    1 => v.push(1.0),
                    2 => v.clear(),
                    _ => v.extend(v.clone()),
                }
            }
            6 if !c.stages.is_empty() => {
                let codes = &mut c.stages[s].2;
                match r.below(3) {
                    0 => {
                        codes.pop();
                    }
                    1 => codes.push(0xff),
                    _ => codes.iter_mut().for_each(|b| *b = 0xff),
                }
            }
            7 if !c.stages.is_empty() => {
                let v = &mut c.stages[s].1;
                if !v.is_empty() {
                    let at = r.below(v.len());
                    v[at] = *r.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX]);
                }
            }
            8 => {
                if r.below(2) == 0 {
                    c.stages.pop();
                } else if let Some(x) = c.stages.first().cloned() {
                    c.stages.push(x);
                }
            }
            _ => {}
        }
    }
}

#[test]
fn codebook_decoder_survives_mutated_tensors() {
    let r = run(
        "codebook",
        "codebook_decoder_survives_mutated_tensors",
        10000,
        0xc0de_b00c,
        |rng, log| {
            let mut c = cb_valid(rng);
            cb_mutate(&mut c, rng, log);
            c
        },
        |c| {
            let stages = stage_refs(&c.stages);
            let out = codebook::decode(
                c.rows,
                c.cols,
                c.dim,
                &stages,
                &c.row_scale,
                &c.row_mean,
                &c.col_scale,
            );
            if let (Some(v), Some(n)) = (&out, c.rows.checked_mul(c.cols)) {
                assert_eq!(v.len(), n, "invariant: decodes to rows x cols");
            }
            out.is_some()
        },
    );
    finish(&[r]);
}

/// Writes valid inputs as seed corpora of the fuzz targets, into the folder named by
/// `ADAPTQ_FUZZ_SEEDS` (`scripts/fuzz.sh` runs this): real manifests, whole bundles in the
/// feed target's layout (manifest, NUL, shards), rANS streams and codebook tensors in the
/// codebook target's layout.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let put = fuzz_seed_writer();
    for (i, b) in bundles().iter().enumerate() {
        put(
            "manifest",
            &format!("bundle{i}.json"),
            b.manifest.as_bytes(),
        );
        let mut whole = b.manifest.clone().into_bytes();
        whole.push(0);
        for (_, s) in &b.shards {
            whole.extend(s);
        }
        // Piece sizes for the feed target: 1 + 37 x byte.
        whole.extend([3, 0, 200, 7]);
        put("feed", &format!("bundle{i}.bin"), &whole);
    }
    for (i, (s, _, _)) in rans_seeds().iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        put("rans_decode", &format!("stream{i}.bin"), s);
    }
    // rows, cols, dim, stage count, widths, flags (u16), then the pool values come from.
    for (i, head) in [
        &[3u8, 10, 4, 2, 4, 2, 0, 0][..],
        &[8, 33, 3, 1, 8, 0, 0],
        &[1, 1, 1, 4, 1, 1, 1, 1, 0, 0],
    ]
    .iter()
    .enumerate()
    {
        let mut b = head.to_vec();
        b.extend((0..96u32).map(|j| (j * 89 % 251) as u8));
        put("codebook_decode", &format!("tensor{i}.bin"), &b);
    }
}
