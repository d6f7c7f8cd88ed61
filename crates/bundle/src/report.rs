//! `adaptq report`: where a bundle lost quality, at a glance. Built from the bundle's own
//! `manifest.json` and `verification.json`, as JSON, Markdown or a self-contained HTML page
//! with SVG charts (per-layer error bars coloured by width, and a histogram of layer errors).

use crate::verification::{TensorReport, Verification};
use crate::Result;
use serde_json::{json, Value};
use std::fmt::Write;
use std::path::Path;

/// One quantized tensor's line in the report.
struct Row {
    name: String,
    encoding: String,
    bits: u8,
    bpw: f64,
    /// Output error on calibration inputs when measured, else weight relative MSE.
    error: f64,
    error_kind: &'static str,
}

fn rows(tensors: &[TensorReport]) -> Vec<Row> {
    tensors
        .iter()
        .filter(|t| t.is_quantized())
        .map(|t| {
            let enc = t.encoding.clone();
            let bits = match enc.strip_prefix("ggml-") {
                Some(ty) => adaptq_quant::ggml::BlockType::parse(ty).map_or(0, |t| t.bits()),
                // Codebooks have no code width per weight: their bits per weight say it.
                None if enc.starts_with("novaq") => t.bits_per_weight.round() as u8,
                None => enc
                    .trim_start_matches("int")
                    .split('-')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(0),
            };
            let (error, kind) = match t.output_rel_error {
                Some(e) => (e, "output"),
                None => (t.error.map_or(f64::NAN, |e| e.rel_mse), "weight"),
            };
            Row {
                name: t.name.clone(),
                encoding: enc,
                bits,
                bpw: t.bits_per_weight,
                error,
                error_kind: kind,
            }
        })
        .collect()
}

/// Histogram of log10 errors: (lower edge, upper edge, count), 12 bins over the data's range.
fn histogram(rows: &[Row]) -> Vec<(f64, f64, usize)> {
    let logs: Vec<f64> = rows
        .iter()
        .filter(|r| r.error > 0.0 && r.error.is_finite())
        .map(|r| r.error.log10())
        .collect();
    if logs.is_empty() {
        return Vec::new();
    }
    let (lo, hi) = log_range(&logs);
    let bins = 12;
    let w = (hi - lo) / bins as f64;
    let mut h = vec![0usize; bins];
    for l in logs {
        h[(((l - lo) / w) as usize).min(bins - 1)] += 1;
    }
    h.iter()
        .enumerate()
        .map(|(i, &c)| (lo + i as f64 * w, lo + (i + 1) as f64 * w, c))
        .collect()
}

/// Whole decades spanning `logs` (at least one).
fn log_range(logs: &[f64]) -> (f64, f64) {
    let lo = logs.iter().cloned().fold(f64::MAX, f64::min).floor();
    let hi = logs.iter().cloned().fold(f64::MIN, f64::max).ceil();
    (lo, hi.max(lo + 1.0))
}

/// The elements of a JSON array; none for anything else.
fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], |a| a.as_slice())
}

/// The report as JSON (the other formats render this).
pub fn build(dir: &Path) -> Result<Value> {
    // Through the bundle reader, so the report reads only what verify would accept.
    let b = crate::Bundle::open(dir)?;
    let m = serde_json::to_value(&b.manifest).expect("a manifest serializes");
    let ver = Verification::read(&b)?;
    let rs = rows(&ver.tensors);
    let mut by_bits = std::collections::BTreeMap::<u8, usize>::new();
    for r in &rs {
        *by_bits.entry(r.bits).or_default() += 1;
    }
    let mut worst: Vec<&Row> = rs.iter().filter(|r| r.error.is_finite()).collect();
    worst.sort_by(|a, b| b.error.total_cmp(&a.error));
    let q = &m["quantization"];
    let mut notes: Vec<String> = Vec::new();
    if q["method"] == "ternary" {
        notes.push(
            "Ternary codes were applied after training. A model not trained ternary loses most \
             of its quality this way: on SmolLM2-135M adaptq measured a mean KL divergence of \
             13.32 and 0.11 % top-1 agreement at group 64 (README, scripts/bench-quant.sh). \
             Measure this bundle with `adaptq eval DIR --base SOURCE`."
                .into(),
        );
    }
    if let Some(seed) = q["rotate"]["seed"].as_u64() {
        notes.push(format!(
            "Weights carry Hadamard rotations of their inputs (seed {seed}); adaptq rotates the \
             inputs online when it runs the bundle, and GGUF / GPTQ export is refused."
        ));
    }
    if let Some(r) = ver.totals.lossless_ratio {
        notes.push(format!(
            "Lossless stage (rANS on the packed codes): the quantized payload is {r:.3}x smaller \
             than the packed codes alone would be."
        ));
    }
    let novaq = ver
        .extra
        .get("novaq")
        .and_then(Value::as_array)
        .map(|layers| {
            let mut red: Vec<f64> = layers
                .iter()
                .filter_map(|l| {
                    let (b, a) = (
                        l["error_before_refine"].as_f64()?,
                        l["error_after_refine"].as_f64()?,
                    );
                    (b > 0.0).then(|| 1.0 - a / b)
                })
                .collect();
            red.sort_by(f64::total_cmp);
            let mut layouts = std::collections::BTreeMap::<String, usize>::new();
            for l in layers {
                let p = &l["plan"];
                let bits: Vec<String> = items(&p["stage_bits"])
                    .iter()
                    .filter(|b| b.as_u64() != Some(0))
                    .map(|b| b.to_string())
                    .collect();
                *layouts
                    .entry(format!("dim {} · stages {}", p["dim"], bits.join("+")))
                    .or_default() += 1;
            }
            json!({
                "layers": layers.len(),
                "layouts": layouts,
                "refine_error_reduction_median": red.get(red.len() / 2),
                "refine_error_reduction_min": red.first(),
                "refine_error_reduction_max": red.last(),
            })
        });
    let mut out = json!({
        "model_id": m["model_id"],
        "source": m["source"],
        "quantization": m["quantization"],
        "totals": ver.totals,
        "gates": ver.gates,
        "OVERALL_STATUS": ver.overall_status,
        "layers_by_width": by_bits.iter().map(|(b, n)| (b.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "worst_layers": worst.iter().take(10).map(|r| json!({"name": r.name, "encoding": r.encoding, "error": r.error, "error_kind": r.error_kind})).collect::<Vec<_>>(),
        "error_histogram_log10": histogram(&rs).iter().map(|(a, b, c)| json!({"from": a, "to": b, "count": c})).collect::<Vec<_>>(),
        "layers": rs.iter().map(|r| json!({"name": r.name, "encoding": r.encoding, "bits": r.bits, "bits_per_weight": r.bpw, "error": r.error, "error_kind": r.error_kind})).collect::<Vec<_>>(),
        "promotion_rounds": ver.extra.get("apq").map(|a| a["promotion_rounds"].clone()),
        "heldout": ver.extra.get("apq").map(|a| a["heldout"].clone()),
        "novaq": novaq,
        "notes": notes,
    });
    if let Some(r) = ver.extra.get("refine") {
        out["refine"] = refine_summary(r);
    }
    Ok(out)
}

/// Refinement's curves as reports draw them: the end-to-end losses per epoch, and each block's
/// held-out loss before and after (its kept epoch).
fn refine_summary(r: &Value) -> Value {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let blocks: Vec<Value> = items(&r["blockwise"])
        .iter()
        .map(|b| {
            let held = items(&b["heldout_loss"]);
            let kept = b["kept_epoch"].as_u64().unwrap_or(0) as usize;
            json!({
                "block": b["block"],
                "heldout_before": held.first().map(f),
                "heldout_after": held.get(kept).map(f),
                "kept_epoch": kept,
                "epochs_run": items(&b["train_loss"]).len(),
            })
        })
        .collect();
    json!({
        "mode": r["mode"],
        "epochs": r["epochs"],
        "lr": r["lr"],
        "kd_cosine_weight": r["kd_cosine_weight"],
        "train_windows": r["train_windows"],
        "heldout_windows": r["heldout_windows"],
        "ggml_reencode": r.get("ggml_reencode").map(|g| json!({"layers": g["layers"], "mean_rel_error": g["mean_rel_error"], "max_rel_error": g["max_rel_error"]})),
        "e2e": r.get("e2e"),
        "blockwise": blocks,
    })
}

/// Markdown rendering of [`refine_summary`].
fn fmt_refine(r: &Value, s: &mut String) {
    let _ = writeln!(
        s,
        "\n## Teacher-guided refinement\n\nmode {} · up to {} epochs · step {} · cosine weight {} · {} training windows, {} held out\n",
        r["mode"].as_str().unwrap_or("?"),
        r["epochs"],
        r["lr"],
        r["kd_cosine_weight"],
        r["train_windows"],
        r["heldout_windows"]
    );
    if let Some(g) = r["ggml_reencode"].as_object() {
        let _ = writeln!(
            s,
            "Trained scales written onto the GGML types' fields cost a relative squared weight error of {:.2e} on average over {} layers (worst {:.2e}).\n",
            g["mean_rel_error"].as_f64().unwrap_or(f64::NAN),
            g["layers"],
            g["max_rel_error"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(e) = r["e2e"].as_object() {
        s.push_str("End to end (KL(teacher || student) on the teacher's top-k tokens plus the tail; epoch 0 = before):\n\n| epoch | training KL | held-out KL |\n|---|---|---|\n");
        let held = items(&e["heldout_kl"]);
        let train = items(&e["train_kl"]);
        for (i, h) in held.iter().enumerate() {
            let t = match i {
                0 => "-".to_string(),
                _ => train
                    .get(i - 1)
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |v| format!("{v:.5}")),
            };
            let _ = writeln!(s, "| {i} | {t} | {:.5} |", h.as_f64().unwrap_or(f64::NAN));
        }
        let _ = writeln!(s, "\nKept: epoch {}.\n", e["kept_epoch"]);
    }
    let blocks = items(&r["blockwise"]);
    if !blocks.is_empty() {
        s.push_str("Block-wise (held-out relative output error plus cosine term):\n\n| block | before | after | kept epoch |\n|---|---|---|---|\n");
        for b in blocks {
            let _ = writeln!(
                s,
                "| {} | {:.5} | {:.5} | {} |",
                b["block"],
                b["heldout_before"].as_f64().unwrap_or(f64::NAN),
                b["heldout_after"].as_f64().unwrap_or(f64::NAN),
                b["kept_epoch"]
            );
        }
    }
}

/// SVG of refinement: held-out loss per epoch end to end (line) and each block's held-out
/// loss after / before (bars; below the line at 1 is a gain).
fn svg_refine(r: &Value) -> String {
    let mut out = String::new();
    let held: Vec<f64> = items(&r["e2e"]["heldout_kl"])
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    if held.len() > 1 {
        let (w, h) = (420.0, 160.0);
        let hi = held.iter().cloned().fold(0.0, f64::max).max(1e-12);
        let pts: Vec<String> = held
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    i as f64 / (held.len() - 1) as f64 * (w - 20.0) + 10.0,
                    h - v / hi * (h - 20.0) - 10.0
                )
            })
            .collect();
        let _ = write!(
            out,
            "<h2>Refinement: held-out KL per epoch (0 = before; top {hi:.4})</h2><svg width=\"{w}\" height=\"{h}\" style=\"border:1px solid #ccc\"><polyline fill=\"none\" stroke=\"#4575b4\" stroke-width=\"2\" points=\"{}\"/></svg>",
            pts.join(" ")
        );
    }
    let blocks = items(&r["blockwise"]);
    if !blocks.is_empty() {
        let (w, h) = (900.0, 160.0);
        let bw = w / blocks.len() as f64;
        let mut bars = String::new();
        for (i, b) in blocks.iter().enumerate() {
            let (x, y) = (
                b["heldout_after"].as_f64().unwrap_or(f64::NAN),
                b["heldout_before"].as_f64().unwrap_or(f64::NAN),
            );
            let ratio = if y > 0.0 {
                (x / y).clamp(0.0, 1.5)
            } else {
                1.0
            };
            let bh = ratio / 1.5 * h;
            let _ = write!(
                bars,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#91cf60\"><title>block {}: {:.5} -> {:.5}</title></rect>",
                i as f64 * bw,
                h - bh,
                (bw - 1.0).max(0.5),
                bh,
                b["block"],
                y,
                x
            );
        }
        let one = h - h / 1.5;
        let _ = write!(
            out,
            "<h2>Refinement: each block's held-out loss after / before (line at 1)</h2><svg width=\"{w}\" height=\"{h}\" style=\"border:1px solid #ccc\">{bars}<line x1=\"0\" x2=\"{w}\" y1=\"{one:.1}\" y2=\"{one:.1}\" stroke=\"#d73027\"/></svg>"
        );
    }
    out
}

fn fmt_gates(r: &Value, out: &mut String) {
    for g in items(&r["gates"]) {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            g["name"].as_str().unwrap_or(""),
            g["status"].as_str().unwrap_or(""),
            g["detail"].as_str().unwrap_or("").replace('|', "/")
        );
    }
}

/// Markdown rendering.
pub fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let t = &r["totals"];
    let _ = writeln!(
        s,
        "# adaptq report: {}\n",
        r["model_id"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "**OVERALL_STATUS: {}** · {:.3} bits per weight overall · {} bytes of tensors · {:.2}x smaller than f16\n",
        r["OVERALL_STATUS"].as_str().unwrap_or("?"),
        t["bits_per_weight"].as_f64().unwrap_or(0.0),
        t["payload_bytes"],
        t["compression_vs_f16"].as_f64().unwrap_or(0.0)
    );
    s.push_str("## Gates\n\n| gate | status | detail |\n|---|---|---|\n");
    fmt_gates(r, &mut s);
    if let Some(notes) = r["notes"].as_array().filter(|n| !n.is_empty()) {
        s.push_str("\n## Notes\n\n");
        for n in notes {
            let _ = writeln!(s, "- {}", n.as_str().unwrap_or(""));
        }
    }
    if let Some(n) = r["novaq"].as_object() {
        s.push_str("\n## NOVAQ\n\n| layout | layers |\n|---|---|\n");
        if let Some(l) = n["layouts"].as_object() {
            for (k, c) in l {
                let _ = writeln!(s, "| {k} | {c} |");
            }
        }
        let pct = |k: &str| {
            n[k].as_f64()
                .map_or("-".to_string(), |v| format!("{:.1} %", 100.0 * v))
        };
        let _ = writeln!(
            s,
            "\nTeacher-guided refinement removed a median {} of each layer's output error \
             (min {}, max {}).",
            pct("refine_error_reduction_median"),
            pct("refine_error_reduction_min"),
            pct("refine_error_reduction_max")
        );
    }
    if r["refine"].is_object() {
        fmt_refine(&r["refine"], &mut s);
    }
    s.push_str("\n## Widths\n\n| bits | layers |\n|---|---|\n");
    if let Some(m) = r["layers_by_width"].as_object() {
        for (b, n) in m {
            let _ = writeln!(s, "| {b} | {n} |");
        }
    }
    s.push_str(
        "\n## Worst layers\n\n| layer | encoding | error | measured on |\n|---|---|---|---|\n",
    );
    for w in items(&r["worst_layers"]) {
        let _ = writeln!(
            s,
            "| {} | {} | {:.5} | {} |",
            w["name"].as_str().unwrap_or(""),
            w["encoding"].as_str().unwrap_or(""),
            w["error"].as_f64().unwrap_or(f64::NAN),
            w["error_kind"].as_str().unwrap_or("")
        );
    }
    s.push_str("\n## Layer-error histogram (log10)\n\n| from | to | layers |\n|---|---|---|\n");
    for h in items(&r["error_histogram_log10"]) {
        let _ = writeln!(
            s,
            "| {:.2} | {:.2} | {} |",
            h["from"].as_f64().unwrap_or(0.0),
            h["to"].as_f64().unwrap_or(0.0),
            h["count"]
        );
    }
    if let Some(rounds) = r["promotion_rounds"].as_array() {
        s.push_str("\n## Promotion rounds\n\n| round | promoted | held-out ΔPPL % | bpw |\n|---|---|---|---|\n");
        for p in rounds {
            let names: Vec<String> = items(&p["promoted"])
                .iter()
                .map(|x| format!("{} {}→{}", x[0].as_str().unwrap_or(""), x[1], x[2]))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.3} |",
                p["round"],
                names.join(", "),
                p["heldout_ppl_delta_pct"].as_f64().unwrap_or(f64::NAN),
                p["bits_per_weight"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    s
}

fn esc(x: &str) -> String {
    x.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [(u8, &str); 7] = [
    (2, "#d73027"),
    (3, "#fc8d59"),
    (4, "#fee08b"),
    (5, "#d9ef8b"),
    (6, "#91cf60"),
    (8, "#1a9850"),
    (0, "#999999"),
];

fn color(bits: u8) -> &'static str {
    COLORS
        .iter()
        .find(|(b, _)| *b == bits)
        .map(|(_, c)| *c)
        .unwrap_or("#4575b4")
}

/// Self-contained HTML with inline SVG: per-layer error bars (log scale) and the histogram.
pub fn html(r: &Value) -> String {
    let layers = r["layers"].as_array().cloned().unwrap_or_default();
    let errs: Vec<f64> = layers
        .iter()
        .map(|l| l["error"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let logs: Vec<f64> = errs
        .iter()
        .filter(|e| **e > 0.0 && e.is_finite())
        .map(|e| e.log10())
        .collect();
    let (lo, hi) = log_range(&logs);
    let (w, h) = (900.0, 260.0);
    let bw = w / layers.len().max(1) as f64;
    let mut bars = String::new();
    for (i, l) in layers.iter().enumerate() {
        let e = errs[i];
        if !(e > 0.0 && e.is_finite()) {
            continue;
        }
        let bh = (e.log10() - lo) / (hi - lo) * h;
        let _ = write!(
            bars,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"{}\"><title>{} {} error {:.5}</title></rect>",
            i as f64 * bw,
            h - bh,
            bw.max(0.5),
            bh,
            color(l["bits"].as_u64().unwrap_or(0) as u8),
            esc(l["name"].as_str().unwrap_or("")),
            esc(l["encoding"].as_str().unwrap_or("")),
            e
        );
    }
    let hist: &[serde_json::Value] = r["error_histogram_log10"]
        .as_array()
        .map_or(&[], Vec::as_slice);
    let maxc = hist
        .iter()
        .filter_map(|x| x["count"].as_u64())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let hbw = 400.0 / hist.len().max(1) as f64;
    let mut hbars = String::new();
    for (i, b) in hist.iter().enumerate() {
        let c = b["count"].as_u64().unwrap_or(0) as f64;
        let bh = c / maxc * 160.0;
        let _ = write!(
            hbars,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4575b4\"><title>10^{:.2}..10^{:.2}: {} layers</title></rect><text x=\"{:.1}\" y=\"178\" font-size=\"9\">{:.1}</text>",
            i as f64 * hbw,
            160.0 - bh,
            hbw - 2.0,
            bh,
            b["from"].as_f64().unwrap_or(0.0),
            b["to"].as_f64().unwrap_or(0.0),
            c,
            i as f64 * hbw,
            b["from"].as_f64().unwrap_or(0.0)
        );
    }
    let legend: String = COLORS
        .iter()
        .filter(|(b, _)| *b > 0)
        .map(|(b, c)| {
            format!("<span style=\"background:{c};padding:0 8px;margin-right:6px\">{b}-bit</span>")
        })
        .collect();
    let md = markdown(r);
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>adaptq report</title>\
<style>body{{font-family:sans-serif;max-width:960px;margin:auto}}pre{{white-space:pre-wrap}}</style></head><body>\
<h1>adaptq report: {}</h1><p><b>OVERALL_STATUS: {}</b></p>\
<h2>Per-layer error (log10 scale {lo:.0} to {hi:.0}; hover for names)</h2><p>{legend}</p>\
<svg width=\"{w}\" height=\"{h}\" style=\"border:1px solid #ccc\">{bars}</svg>\
<h2>Layer-error histogram (log10)</h2><svg width=\"420\" height=\"185\">{hbars}</svg>{}\
<h2>Details</h2><pre>{}</pre></body></html>\n",
        esc(r["model_id"].as_str().unwrap_or("?")),
        esc(r["OVERALL_STATUS"].as_str().unwrap_or("?")),
        svg_refine(&r["refine"]),
        esc(&md)
    )
}
