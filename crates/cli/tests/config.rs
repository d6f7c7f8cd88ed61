//! `quantize --config FILE.yaml` and `--print-config`: a YAML file of long flag names gives
//! the same bundle as the flags, byte for byte; flags override the file; the printed
//! configuration repeats the run; an unknown key is refused by name.

use adaptq_testutil::cli::{ok, refused, run};
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_adaptq");

/// Every file of a bundle folder, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn same_bundle(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    assert_eq!(
        fa.iter().map(|f| &f.0).collect::<Vec<_>>(),
        fb.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(
            x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn a_yaml_config_reproduces_the_flag_run_byte_for_byte() {
    let g = adaptq_testutil::smollm2_gguf();
    let g = g.to_str().unwrap();
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n).to_string_lossy().into_owned();
    let flags = ["--bits", "3", "--group-size", "64", "--sym", "--seed", "5"];
    let mut a = vec!["quantize", g, "--out"];
    let out_a = p("flags");
    a.push(&out_a);
    a.extend(flags);
    ok(run(BIN, &a));

    let yaml = p("q.yaml");
    std::fs::write(&yaml, "bits: 3\ngroup_size: 64\nsym: true\nseed: 5\n").unwrap();
    ok(run(
        BIN,
        &["quantize", g, "--config", &yaml, "--out", &p("yaml")],
    ));
    same_bundle(Path::new(&out_a), Path::new(&p("yaml")));

    // The printed configuration is a config file that repeats the run, source and output
    // included; printing does no work.
    let mut a = vec!["quantize", g, "--out"];
    let out_c = p("printed");
    a.push(&out_c);
    a.extend(flags);
    a.push("--print-config");
    let printed = ok(run(BIN, &a)).stdout;
    assert!(!Path::new(&out_c).exists());
    let text = String::from_utf8(printed).unwrap();
    assert!(text.contains("group_size: 64"), "{text}");
    let again = p("again.yaml");
    std::fs::write(&again, &text).unwrap();
    ok(run(BIN, &["quantize", "--config", &again]));
    same_bundle(Path::new(&out_a), Path::new(&out_c));

    // A flag given on the command line wins over the file.
    let o = ok(run(
        BIN,
        &[
            "quantize",
            g,
            "--config",
            &yaml,
            "--bits",
            "4",
            "--out",
            &p("over"),
            "--print-config",
        ],
    ));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("bits: 4") && text.contains("seed: 5"),
        "{text}"
    );
    // The manifest records the options it ran with.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&out_a).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["quantization"]["options"]["group_size"], 64);
    assert!(m["quantization"]["options"].get("out").is_none());
}

#[test]
fn an_unknown_config_key_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let yaml = t.path().join("bad.yaml");
    std::fs::write(&yaml, "bits: 4\ngroup-size: 64\n").unwrap();
    let o = run(
        BIN,
        &[
            "quantize",
            "m.gguf",
            "--config",
            yaml.to_str().unwrap(),
            "--out",
            "x",
        ],
    );
    refused(&o, "group-size");
    refused(&o, "bad.yaml");
    std::fs::write(&yaml, "methd: gptq\n").unwrap();
    let o = run(
        BIN,
        &["quantize", "m.gguf", "--config", yaml.to_str().unwrap()],
    );
    refused(&o, "unknown field `methd`");
}

/// A GPTQ-only flag given for a method that does not run GPTQ is refused, not ignored.
#[test]
fn gptq_flags_are_refused_for_methods_without_gptq() {
    let o = run(
        BIN,
        &[
            "quantize",
            "m.gguf",
            "--hessian-shrink",
            "0.5",
            "--out",
            "x",
        ],
    );
    refused(&o, "method rtn does not run GPTQ");
    let o = run(
        BIN,
        &[
            "quantize",
            "m.gguf",
            "--method",
            "awq",
            "--hessian-shrink",
            "0",
            "--out",
            "x",
        ],
    );
    refused(&o, "method awq does not run GPTQ");
    let o = run(BIN, &["quantize", "m.gguf", "--act-order", "--out", "x"]);
    refused(&o, "act_order is a GPTQ setting, and method rtn");
    let o = run(
        BIN,
        &[
            "quantize", "m.gguf", "--method", "ternary", "--damp", "0.1", "--out", "x",
        ],
    );
    refused(&o, "damp is a GPTQ setting, and method ternary");
}

#[test]
fn threads_come_from_the_flag_before_the_environment() {
    let m = adaptq_testutil::smollm2_gguf();
    let m = m.to_str().unwrap();
    let small = ["--pp", "4", "--tg", "1", "--reps", "1"];
    let threads = |env: Option<&str>, flag: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.args(flag).arg("bench").arg(m).args(small);
        match env {
            Some(v) => c.env("ADAPTQ_NUM_THREADS", v),
            None => c.env_remove("ADAPTQ_NUM_THREADS"),
        };
        let o = ok(c.output().unwrap());
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines().next().unwrap_or_default().to_string()
    };
    assert_eq!(threads(Some("2"), &["--threads", "1"]), "threads: 1");
    assert_eq!(threads(Some("1"), &[]), "threads: 1");
    let o = run(BIN, &["--threads", "0", "info", m]);
    refused(&o, "--threads");
    let o = std::process::Command::new(BIN)
        .args(["info", m])
        .env("ADAPTQ_NUM_THREADS", "many")
        .output()
        .unwrap();
    refused(&o, "ADAPTQ_NUM_THREADS");
}
