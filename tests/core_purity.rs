//! The core must stay pure: no I/O crate, no clock reads. This test reads the source tree
//! so the rule cannot erode one convenient import at a time.

use std::path::Path;

const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "reqwest",
    "rusqlite",
    "quick_xml",
    "axum",
    "hyper",
    "std::fs",
    "std::net",
];
const FORBIDDEN_CALLS: &[&str] = &[
    "Utc::now()",
    "Local::now()",
    "SystemTime::now()",
    "Instant::now()",
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/core is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn core_imports_no_io_crate_and_reads_no_clock() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core"),
        &mut files,
    );
    assert!(
        files.len() >= 5,
        "src/core should hold the domain modules, found {files:?}"
    );
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("source is readable");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for c in FORBIDDEN_CRATES {
                if code.contains(&format!("{c}::")) || code.contains(&format!("use {c}")) {
                    problems.push(format!("{}:{}: uses {c}", f.display(), n + 1));
                }
            }
            for c in FORBIDDEN_CALLS {
                if code.contains(c) {
                    problems.push(format!("{}:{}: reads the clock with {c}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "src/core must stay pure:\n{}",
        problems.join("\n")
    );
}
