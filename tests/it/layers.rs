//! The library's layer order (docs/contributors.md, "Layout"): a module uses only modules of
//! its own layer or below, and no two modules use each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level modules of `src/` by layer, as docs/contributors.md lists them.
const LAYERS: &[&[&str]] = &[
    &["config", "metrics", "telemetry"],
    &["codec"],
    &["error", "retry", "pg", "http"],
    &["wire", "publish"],
    &["source", "sink", "dlq"],
    &["relay", "apply"],
    &[
        "reconcile",
        "reconcile_mongo",
        "repair_mongo",
        "ops",
        "demo",
    ],
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which top-level modules each top-level module names as `crate::<module>` (comments aside).
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if ["lib", "main", "cli"].contains(&module.as_str()) {
            continue; // the binary's side and the crate root sit above every layer
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or_default();
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.entry(module.clone()).or_default().insert(name);
                }
            }
        }
    }
    uses
}

#[test]
fn no_module_uses_a_module_above_it_and_none_use_each_other() {
    let layer_of = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let uses = uses();
    let mut wrong = Vec::new();
    for (module, used) in &uses {
        let Some(own) = layer_of(module) else {
            wrong.push(format!(
                "{module} is in no layer: add it to LAYERS and the docs"
            ));
            continue;
        };
        for other in used {
            if layer_of(other).is_some_and(|l| l > own) {
                wrong.push(format!(
                    "{module} (layer {}) uses {other} above it",
                    own + 1
                ));
            }
            if uses.get(other).is_some_and(|back| back.contains(module)) && module < other {
                wrong.push(format!("{module} and {other} use each other"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
