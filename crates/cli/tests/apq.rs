//! APQ's gates on the real model, kept small for CI: an impossible perplexity budget must end
//! in `OVERALL_STATUS: FAIL` naming the gate, after promotion rounds that widened the layers
//! with the largest error; the report shows the same.

use adaptq_testutil::cli::{self, args, items, named, s, text, verification};

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

#[test]
fn impossible_ppl_budget_fails_the_named_gate_after_promoting_worst_layers() {
    let g = adaptq_testutil::smollm2_gguf();
    let emma = adaptq_testutil::corpus("emma.txt");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("apq");
    let apq = [
        args("--method apq --bits 3-4 --target-bpw 3.6 --sym"),
        cli::calib(&emma, "2", "64"),
        args("--heldout-windows 1 --max-ppl-delta 0.01 --max-rounds 3 --promote-per-round 3"),
    ]
    .concat();
    let o = cli::quantize(BIN, &g, &out, &apq);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let v = verification(&out);
    assert_eq!(v["OVERALL_STATUS"], "FAIL");
    let gate = named(&v, "gates", "heldout_ppl_delta");
    assert_eq!(gate["status"], "FAIL", "{gate}");
    // The gold-prompt spot checks ran against the unquantized model and are recorded.
    let gold = named(&v, "gates", "gold_prompts");
    assert!(gold["status"] == "PASS" || gold["status"] == "FAIL");
    assert_eq!(items(&v, "gold_prompts").len(), 8);
    let apq = &v["apq"];
    let rounds = apq["promotion_rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "no promotion happened");
    let alloc = &apq["allocation"];
    let fin = &apq["final_widths"];
    for r in rounds {
        for p in r["promoted"].as_array().unwrap() {
            let name = p[0].as_str().unwrap();
            assert!(p[2].as_u64() > p[1].as_u64());
            assert!(
                fin[name].as_u64() > alloc[name].as_u64(),
                "{name} not widened"
            );
            // The stored tensor really has the promoted width.
            let t = named(&v, "tensors", name);
            assert!(
                t["encoding"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("int{}", fin[name])),
                "{t}"
            );
        }
    }
    // Promotion picks the worst layers: the first round's picks had the largest output errors
    // among the layers it left alone at that width.
    let first: Vec<&str> = rounds[0]["promoted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(first.len(), 3);
    // Both the allocation and the widths are in the report.
    let report = |format: &str| {
        let o = cli::run(BIN, &["report", s(&out), "--format", format]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let md = report("md");
    assert!(
        md.contains("OVERALL_STATUS: FAIL") && md.contains("| heldout_ppl_delta | FAIL |"),
        "{md}"
    );
    assert!(md.contains("## Promotion rounds"));
    assert!(report("html").contains("<svg"));
}
