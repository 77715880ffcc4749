//! The checker against small trees held in memory: every way of hiding an upward import or a
//! cycle that a text search misses is reported, and a tree that keeps the rules passes.

use super::rules;

/// Two layers of the library (`low`, `low2`, `low3` below `high`) and the binary above.
const DOC: &str = "# Contributing\n\n## Layout\n\nThe layers:\n\n\
    1. `low`, `low2`, `low3`: the bottom\n   (a continuation line)\n\
    2. `high`: above them\n\
    3. `main`, `cli`: the binary\n\n## Tests\n\n1. not a layer: this section is not read\n";

/// `rules::check` on the default tree with `files` (path relative to src/, text) replacing or
/// adding to it.
fn check_with(doc: &str, files: &[(&str, &str)]) -> Vec<String> {
    let mut tree: Vec<(String, String)> = [
        (
            "lib.rs",
            "pub mod high;\npub mod low;\npub mod low2;\npub mod low3;\n",
        ),
        ("main.rs", "mod cli;\nfn main() { cli::run() }\n"),
        ("cli/mod.rs", "pub fn run() { dualsync::high::go() }\n"),
        ("high.rs", "pub fn go() {}\n"),
        ("low.rs", "pub struct A;\n"),
        ("low2.rs", "use crate::low::A;\n"),
        ("low3.rs", "fn f() -> crate::low::A { crate::low::A }\n"),
    ]
    .iter()
    .map(|(p, t)| (p.to_string(), t.to_string()))
    .collect();
    for (path, text) in files {
        tree.retain(|(p, _)| p != path);
        tree.push((path.to_string(), text.to_string()));
    }
    rules::check(&tree, doc)
}

fn check(files: &[(&str, &str)]) -> Vec<String> {
    check_with(DOC, files)
}

/// Exactly one report, and it contains `expected`.
#[track_caller]
fn reported(wrong: Vec<String>, expected: &str) {
    assert!(
        wrong.len() == 1 && wrong[0].contains(expected),
        "expected one report containing {expected:?}, got {wrong:#?}"
    );
}

/// `high` using each `low` in a different way, all of them downward.
const HIGH_USES_LOW: &str = "use crate::{low::{self, A}, low2};\nuse super::low3 as l3;\n\
    mod tests { use super::super::low::A; }\n\
    fn f() -> crate::low::A { let _ = format!(\"{}\", crate::low2::N); crate::low::A }\n";

#[test]
fn a_tree_that_keeps_the_rules_passes() {
    let wrong = check(&[("high.rs", HIGH_USES_LOW)]);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_same_tree_with_its_layers_swapped_is_reported() {
    let swapped = "# Contributing\n\n## Layout\n\n1. `high`: now below\n\
        2. `low`, `low2`, `low3`: now above\n3. `main`, `cli`: the binary\n";
    let wrong = check_with(swapped, &[("high.rs", HIGH_USES_LOW)]);
    assert_eq!(
        wrong,
        [
            "high.rs:1: high (layer 1) uses low (layer 2), above it",
            "high.rs:1: high (layer 1) uses low2 (layer 2), above it",
            "high.rs:2: high (layer 1) uses low3 (layer 2), above it",
        ]
    );
}

#[test]
fn a_grouped_import_going_up_is_reported() {
    reported(
        check(&[("low.rs", "use crate::{low::A as B, high::{go, X}};\n")]),
        "low.rs:1: low (layer 1) uses high (layer 2), above it",
    );
}

#[test]
fn super_super_going_up_is_reported_from_a_file_and_from_an_inline_module() {
    reported(
        check(&[
            ("low/mod.rs", "mod inner;\n"),
            ("low/inner.rs", "\n\nuse super::super::high::go;\n"),
        ]),
        "low/inner.rs:3: low (layer 1) uses high (layer 2)",
    );
    reported(
        check(&[("low2.rs", "mod tests {\n    use super::super::high;\n}\n")]),
        "low2.rs:2: low2 (layer 1) uses high (layer 2)",
    );
}

#[test]
fn a_url_string_does_not_hide_an_import_on_its_line() {
    reported(
        check(&[(
            "low.rs",
            "const URL: &str = \"postgres://localhost\"; use crate::high::go;\n",
        )]),
        "low.rs:1: low (layer 1) uses high (layer 2)",
    );
}

#[test]
fn a_three_room_cycle_is_reported_with_its_path() {
    reported(
        check(&[
            ("low.rs", "pub struct A;\nuse crate::low2::B;\n"),
            ("low2.rs", "pub struct B;\nfn f() { crate::low3::g() }\n"),
            ("low3.rs", "pub fn g() { let _: crate::low::A; }\n"),
        ]),
        "cycle: low -> low2 -> low3 -> low (low -> low2 at low.rs:2, low2 -> low3 at \
         low2.rs:2, low3 -> low at low3.rs:1",
    );
}

#[test]
fn paths_in_code_macros_and_attribute_strings_are_seen() {
    for (file, text) in [
        (
            "low.rs",
            "pub struct A;\nfn f() -> crate::high::T { todo!() }\n",
        ),
        (
            "low.rs",
            "pub struct A;\nfn f() { println!(\"{}\", crate::high::NAME) }\n",
        ),
        (
            "low.rs",
            "pub struct A;\nfn f() { vec![self::super::high::go()]; }\n",
        ),
        (
            "low.rs",
            "pub struct A;\n#[derive(serde::Deserialize)] struct S { \
             #[serde(default = \"crate::high::d\")] x: u8 }\n",
        ),
        ("low.rs", "pub struct A;\nimpl crate::high::Tr for A {}\n"),
        (
            "low.rs",
            "pub struct A;\nfn f(x: u8) { match x { crate::high::N => {} _ => {} } }\n",
        ),
    ] {
        let wrong = check(&[(file, text)]);
        assert!(
            wrong.len() == 1 && wrong[0].contains("low.rs:2: low (layer 1) uses high"),
            "{text}: {wrong:#?}"
        );
    }
}

#[test]
fn comments_and_strings_are_no_imports() {
    let wrong = check(&[(
        "low.rs",
        "pub struct A;\n// use crate::high;\n/// [`crate::high`]\nconst S: &str = \"crate::high::go\";\n\
         fn f() { println!(\"crate::high::go\"); }\n",
    )]);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn naming_the_crate_root_cannot_hide_a_room() {
    for text in [
        "use crate as c;\n",
        "use crate::{self as c};\n",
        "use super as up;\n",
        "use super::*;\n",
    ] {
        let wrong = check(&[("low.rs", text)]);
        assert!(
            wrong.len() == 1 && wrong[0].starts_with("low.rs:1: "),
            "{text}: {wrong:#?}"
        );
    }
}

#[test]
fn code_the_checker_cannot_follow_is_refused() {
    for (file, text, expected) in [
        (
            "low.rs",
            "extern crate self as me;\n",
            "low.rs:1: `extern crate`",
        ),
        (
            "low.rs",
            "include!(\"../high.rs\");\n",
            "low.rs:1: include!",
        ),
        (
            "low.rs",
            "#[path = \"../high.rs\"]\nmod h;\n",
            "low.rs:2: `mod h` with #[path]",
        ),
        (
            "lib.rs",
            "#[macro_use]\npub mod high;\npub mod low;\npub mod low2;\npub mod low3;\n",
            "lib.rs:2: `mod high`",
        ),
        (
            "lib.rs",
            "pub mod high;\npub mod low;\npub mod low2;\npub mod low3;\npub use high::go;\n",
            "lib.rs: holds more than `mod` lines",
        ),
    ] {
        reported(check(&[(file, text)]), expected);
    }
}

#[test]
fn the_binary_is_above_the_library_and_its_rooms_are_checked_too() {
    reported(
        check(&[
            (
                "main.rs",
                "mod cli;\npub fn helper() {}\nfn main() { cli::run() }\n",
            ),
            ("cli/mod.rs", "pub fn run() { crate::helper() }\n"),
        ]),
        "cycle: cli -> main -> cli",
    );
    reported(
        check(&[("low.rs", "pub struct A;\nfn f() { crate::cli::run() }\n")]),
        "low.rs:2: `crate::cli::run` names `cli`, which is no room of the library",
    );
}

#[test]
fn the_layer_list_is_the_docs_and_names_every_room_once() {
    let stale = DOC.replace("`low3`", "`partition`");
    let wrong = check_with(&stale, &[]);
    assert_eq!(wrong.len(), 2, "{wrong:#?}");
    assert!(
        wrong[0].contains("`partition` is no room under src/"),
        "{wrong:#?}"
    );
    assert!(
        wrong[1].contains("`low3` is a room under src/ in no layer"),
        "{wrong:#?}"
    );
    let twice = DOC.replace("`high`: above", "`high`, `low`: above");
    reported(check_with(&twice, &[]), "`low` is in more than one layer");
    let prose = DOC.replace("2. `high`: above them", "2. `high` (above them)");
    reported(check_with(&prose, &[]), "Layout item 2: write it as");
}
