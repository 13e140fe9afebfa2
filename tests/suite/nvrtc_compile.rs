//! Every kernel entry point compiles through NVRTC for sm_75 (the oldest architecture CUDA 13
//! compiles for), sm_80 and sm_90 — no GPU needed.
//! Skips with a printed reason when libnvrtc cannot be found; `CUNORM_REQUIRE_NVRTC=1` turns
//! the skip into a failure (CI sets it after installing the NVRTC wheels).

use cunorm::cuda::nvrtc;
use cunorm::kernels::entry_points;

fn nvrtc_or_skip() -> bool {
    match nvrtc::ensure_nvrtc() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("CUNORM_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("CUNORM_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}");
            }
            crate::common::report_skip("nvrtc_compile", &e.to_string());
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm75_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    let entries = entry_points();
    for arch in ["sm_75", "sm_80", "sm_90"] {
        for module in nvrtc::module_names() {
            let src = nvrtc::module_source(module).unwrap();
            let out = nvrtc::compile(module, &src, arch)
                .unwrap_or_else(|e| panic!("{module} for {arch}: {e}"));
            assert!(!out.cubin.is_empty(), "{module} {arch}: empty CUBIN");
            // The listed entry points of this module are exactly those in its PTX.
            let mut listed: Vec<&str> = entries
                .iter()
                .filter(|(m, _)| *m == module)
                .map(|(_, n)| n.as_str())
                .collect();
            let mut compiled: Vec<&str> = out
                .ptx
                .lines()
                .filter_map(|l| l.split(".entry ").nth(1))
                .filter_map(|l| l.split('(').next())
                .collect();
            listed.sort_unstable();
            compiled.sort_unstable();
            assert_eq!(
                listed, compiled,
                "{module} for {arch}: entry_points() vs the PTX"
            );
        }
    }
    // Every listed entry point belongs to a module that exists.
    for (m, name) in &entries {
        assert!(
            nvrtc::module_names().any(|n| n == *m),
            "{name}: unknown module {m}"
        );
    }
}

#[test]
fn nvrtc_errors_carry_the_log() {
    if !nvrtc_or_skip() {
        return;
    }
    match nvrtc::compile(
        "broken",
        "extern \"C\" __global__ void k() { undeclared_name = 1; }",
        "sm_90",
    ) {
        Ok(_) => panic!("a broken kernel compiled"),
        Err(e) => assert!(
            e.to_string().contains("undeclared_name"),
            "log missing from: {e}"
        ),
    }
}
