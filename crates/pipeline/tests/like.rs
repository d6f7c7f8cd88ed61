//! `--like NAME` aims at the size of llama-quantize's file of that name: the estimate must be
//! the size llama-quantize (the reference build, with an importance matrix, as the benchmarks
//! run it) writes for the same model, on random-weight models whose shapes exercise the rules:
//! grouped-query attention 4:1, layers that get more bits, rows that need fallbacks, a head of
//! its own or tied to the embedding, a fused qkv projection (counted as attn_v).

use adaptq_testutil::llamacpp;

#[test]
fn like_estimates_the_size_of_llama_quantize_files() {
    let bin = llamacpp::bin_dir();
    let dir = tempfile::tempdir().unwrap();
    let text = adaptq_testutil::corpus("emma.txt");
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for (arch, sets) in [
        ("mistral", &["n_layer=8"][..]),
        ("qwen2", &["n_layer=8"][..]),
        ("phi3", &["n_layer=8"][..]),
    ] {
        let model = dir.path().join(format!("{arch}.gguf"));
        llamacpp::random_gguf(&bin, arch, &model, sets, None);
        let imatrix = dir.path().join(format!("{arch}.imatrix"));
        let m = model.to_str().unwrap();
        llamacpp::run(
            &bin,
            "llama-imatrix",
            &[
                "-m",
                m,
                "-f",
                text.to_str().unwrap(),
                "-o",
                imatrix.to_str().unwrap(),
                "-c",
                "128",
                "--chunks",
                "4",
                "-t",
                "2",
            ],
        );
        let src = adaptq_source::open(&model).unwrap();
        let mut outs = Vec::new();
        for preset in adaptq_pipeline::like::PRESETS {
            let out = dir.path().join(format!("{arch}-{preset}.gguf"));
            llamacpp::run(
                &bin,
                "llama-quantize",
                &[
                    "--imatrix",
                    imatrix.to_str().unwrap(),
                    m,
                    out.to_str().unwrap(),
                    preset,
                    "2",
                ],
            );
            outs.push(out);
        }
        let files: Vec<&std::path::Path> = outs.iter().map(|p| p.as_path()).collect();
        let sizes = llamacpp::gguf_sizes(&bin, &files);
        for (preset, (bytes, params)) in adaptq_pipeline::like::PRESETS.iter().zip(sizes) {
            let theirs = bytes as f64 * 8.0 / params as f64;
            let ours = adaptq_pipeline::like::preset_bpw(src.as_ref(), preset).unwrap();
            report.push(format!(
                "{arch} {preset}: llama-quantize {theirs:.4}, estimate {ours:.4}"
            ));
            if (ours - theirs).abs() > 1e-9 {
                wrong.push(format!("{arch} {preset}"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        wrong.is_empty(),
        "estimates off for {wrong:?}:\n{}",
        report.join("\n")
    );
}
