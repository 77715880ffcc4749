//! The library's layer order (docs/contributors.md, "Layout"): a room (a top-level module of
//! `src/`) uses only rooms of its own layer or below, and no rooms use each other, directly or
//! through others. The sources are parsed (syn), the layer list is read from the doc itself,
//! and `fooled` shows on small trees that each way of hiding an import is caught.

mod deps;
mod fooled;
mod rules;

use std::path::{Path, PathBuf};

/// Every file under `dir` with the extension `ext`, sorted.
pub fn files(dir: &Path, ext: Option<&str>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if ext.is_none_or(|ext| path.extension().is_some_and(|e| e == ext)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn no_module_uses_a_module_above_it_and_none_use_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let sources: Vec<(String, String)> = files(&src, Some("rs"))
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (relative, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    let contributors = std::fs::read_to_string(root.join("docs/contributors.md")).unwrap();
    let wrong = rules::check(&sources, &contributors);
    assert!(wrong.is_empty(), "{wrong:#?}");
}
