//! The quickstart's data scripts (`examples/*.py`) decide what is trained on and what is held
//! out, and `benches/piece_gap.py` says where an extended model loses to its base; their unit
//! tests run with the crate's. They need only Python 3's standard library, which
//! the quickstart needs anyway; a machine without `python3` skips them, saying so.

use std::process::Command;

#[test]
fn data_scripts_keep_validation_and_held_out_text_out_of_training() {
    python_tests("examples");
}

#[test]
fn piece_gap_gives_each_piece_the_base_cost_of_its_bytes() {
    python_tests("benches");
}

/// `python3 -m unittest` over `dir/test_*.py`.
fn python_tests(dir: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = match Command::new("python3")
        .args(["-B", "-m", "unittest", "discover", "-s", dir, "-p", "test_*.py"])
        .current_dir(root)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: python3 not found ({e}); the quickstart needs it too");
            return;
        }
    };
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python3 -m unittest discover -s {dir} failed:\n{log}");
    assert!(log.contains("Ran ") && !log.contains("Ran 0 tests"), "no Python test ran:\n{log}");
}
