//! APQ's gates on the real model, kept small for CI: an impossible perplexity budget must end
//! in `OVERALL_STATUS: FAIL` naming the gate, after promotion rounds that widened the layers
//! with the largest error; the report shows the same.

use std::process::Command;

#[test]
fn impossible_ppl_budget_fails_the_named_gate_after_promoting_worst_layers() {
    let g = adaptq_testutil::smollm2_gguf();
    let emma = adaptq_testutil::corpus("emma.txt");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("apq");
    let o = Command::new(env!("CARGO_BIN_EXE_adaptq"))
        .args([
            "quantize",
            g.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--method",
            "apq",
            "--bits",
            "3-4",
            "--target-bpw",
            "3.6",
            "--sym",
            "--calib",
            emma.to_str().unwrap(),
            "--calib-samples",
            "2",
            "--seq-len",
            "64",
            "--heldout-windows",
            "1",
            "--max-ppl-delta",
            "0.01",
            "--max-rounds",
            "3",
            "--promote-per-round",
            "3",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{text}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("verification.json")).unwrap()).unwrap();
    assert_eq!(v["OVERALL_STATUS"], "FAIL");
    let gate = v["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "heldout_ppl_delta")
        .expect("perplexity gate recorded");
    assert_eq!(gate["status"], "FAIL", "{gate}");
    // The gold-prompt spot checks ran against the unquantized model and are recorded.
    let gold = v["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "gold_prompts")
        .expect("gold-prompt gate recorded");
    assert!(gold["status"] == "PASS" || gold["status"] == "FAIL");
    assert_eq!(v["gold_prompts"].as_array().unwrap().len(), 8);
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
            let t = v["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap();
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
    let rep = Command::new(env!("CARGO_BIN_EXE_adaptq"))
        .args(["report", out.to_str().unwrap(), "--format", "md"])
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&rep.stdout);
    assert!(
        md.contains("OVERALL_STATUS: FAIL") && md.contains("| heldout_ppl_delta | FAIL |"),
        "{md}"
    );
    assert!(md.contains("## Promotion rounds"));
    let html = Command::new(env!("CARGO_BIN_EXE_adaptq"))
        .args(["report", out.to_str().unwrap(), "--format", "html"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&html.stdout).contains("<svg"));
}
