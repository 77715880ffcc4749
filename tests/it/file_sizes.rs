//! No file in `src/` or `tests/` is over 600 lines without a reason: a long file is usually
//! several things that want their own names. The exceptions are listed here, and only here.

use std::path::Path;

use crate::layers::files;

const MAX_LINES: usize = 600;

/// Files allowed over `MAX_LINES` (path from the repository root), each with its reason.
const LONG_FILES: &[(&str, &str)] = &[
    (
        "src/source/mongo.rs",
        "MongoSource's stream, lease and snapshot phases share its private state",
    ),
    (
        "tests/it/mongo_source.rs",
        "the MongoDB source's end-to-end behaviours, one test each; shared set-up is in mongo_common.rs",
    ),
];

#[test]
fn no_file_is_over_600_lines_without_a_reason() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut wrong = Vec::new();
    let mut long = Vec::new();
    for dir in ["src", "tests"] {
        for path in files(&root.join(dir), None) {
            if path.components().any(|c| c.as_os_str() == "__pycache__") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let lines = String::from_utf8_lossy(&bytes).lines().count();
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if lines > MAX_LINES {
                long.push(name.clone());
                if !LONG_FILES.iter().any(|(listed, _)| *listed == name) {
                    wrong.push(format!(
                        "{name}: {lines} lines (over {MAX_LINES}): split it, or add it to \
                         LONG_FILES in tests/it/file_sizes.rs with the reason"
                    ));
                }
            }
        }
    }
    for (listed, reason) in LONG_FILES {
        if !long.iter().any(|name| name == listed) {
            wrong.push(format!(
                "{listed} is in LONG_FILES but is no longer over {MAX_LINES} lines (or gone): \
                 remove it from the list"
            ));
        }
        if reason.trim().is_empty() {
            wrong.push(format!("{listed} is in LONG_FILES without a reason"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
