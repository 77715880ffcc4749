//! Single-object fingerprints as implementations dualsync did not write compute them: Java's
//! `SchemaNormalization` (Apache Avro 1.12) and fastavro, run at test time through
//! `scripts/interop.sh`. Every expected canonical form and fingerprint below comes from them.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value as Json};

use dualsync::codec::canonical;
use dualsync::codec::SchemaStore;

use crate::common::schemas_dir;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The python or the Java classpath `scripts/interop.sh` installs (once) and prints.
pub fn interop_tool(what: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/interop.sh"))
        .arg(what)
        .output()
        .expect("run scripts/interop.sh");
    assert!(
        out.status.success(),
        "scripts/interop.sh {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `program` with `request` as JSON on stdin; its stdout as JSON.
pub fn run_json(mut program: Command, request: &Json) -> Json {
    let mut child = program
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the oracle");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Java's and fastavro's answers for `schemas` (JSON texts): `(who, answer)`.
fn oracles(schemas: &[String]) -> Vec<(&'static str, Json)> {
    let request = json!({"schemas_dir": schemas_dir(), "schemas": schemas});
    let mut java = Command::new("java");
    java.args([
        "-cp",
        &interop_tool("java"),
        "tests/interop/java/Fingerprints.java",
    ]);
    let mut python = Command::new(interop_tool("python"));
    python.arg("tests/interop/fingerprints.py");
    vec![
        ("Java Avro", run_json(java, &request)),
        ("fastavro", run_json(python, &request)),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares dualsync's canonical form and fingerprint of each schema with `who`'s; returns
/// how many `who` could parse (the others are skipped).
fn compare(who: &str, schemas: &[String], answer: &Json) -> usize {
    let forms = answer["forms"].as_array().expect("forms");
    assert_eq!(forms.len(), schemas.len());
    let mut compared = 0;
    for (text, form) in schemas.iter().zip(forms) {
        if form.get("error").is_some() {
            continue;
        }
        let ours = canonical::parsing_canonical_form(&serde_json::from_str(text).unwrap()).unwrap();
        assert_eq!(ours, form["pcf"], "{who}'s canonical form of {text}");
        assert_eq!(
            hex(&canonical::fingerprint_of_form(&ours)),
            form["fingerprint"],
            "{who}'s fingerprint of {text}"
        );
        compared += 1;
    }
    compared
}

#[test]
fn fingerprints_on_the_wire_are_those_of_java_avro_and_fastavro() {
    let store = SchemaStore::load_dir(Path::new(&schemas_dir())).unwrap();
    let mut types: Vec<&str> = store.aggregate_types().collect();
    types.sort_unstable();
    assert!(types.len() >= 2, "schemas/ holds customers and orders");
    // The payload files, then the envelopes exactly as dualsync writes them.
    let mut schemas: Vec<String> = types
        .iter()
        .map(|t| std::fs::read_to_string(Path::new(&schemas_dir()).join(format!("{t}.avsc"))))
        .collect::<Result<_, _>>()
        .unwrap();
    let envelopes: Vec<_> = types
        .iter()
        .map(|t| store.for_type(t).unwrap().clone())
        .chain([store.generic().clone()])
        .collect();
    schemas.extend(envelopes.iter().map(|e| e.registry_json.clone()));

    for (who, answer) in oracles(&schemas) {
        assert_eq!(
            compare(who, &schemas, &answer),
            schemas.len(),
            "{who} refused a schema: {answer}"
        );
        let forms = &answer["forms"].as_array().unwrap()[types.len()..];
        for (envelope, form) in envelopes.iter().zip(forms) {
            assert_eq!(
                hex(&envelope.fingerprint),
                form["fingerprint"],
                "{who}: the fingerprint written for {}",
                envelope.aggregate_type
            );
        }
        // fastavro also builds each envelope from the shipped template, as a consumer does.
        if let Some(writers) = answer.get("writers") {
            for envelope in &envelopes {
                let label = if envelope.aggregate_type.starts_with('(') {
                    "(mongodb change)"
                } else {
                    &envelope.aggregate_type
                };
                assert_eq!(
                    writers[label],
                    hex(&envelope.fingerprint),
                    "the envelope a consumer builds for {label} from schemas/envelope/"
                );
            }
        }
    }
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

fn leaf() -> impl Strategy<Value = Json> {
    const LOGICAL: [(&str, &str); 7] = [
        ("int", "date"),
        ("int", "time-millis"),
        ("long", "time-micros"),
        ("long", "timestamp-millis"),
        ("long", "timestamp-micros"),
        ("long", "local-timestamp-micros"),
        ("string", "uuid"),
    ];
    prop_oneof![
        prop::sample::select(&PRIMITIVES[..]).prop_map(|p| json!(p)),
        prop::sample::select(&PRIMITIVES[..]).prop_map(|p| json!({"type": p})),
        prop::sample::select(&LOGICAL[..]).prop_map(|(t, l)| json!({"type": t, "logicalType": l})),
        (1u32..20, 0u32..5).prop_map(|(p, s)| json!(
            {"type": "bytes", "logicalType": "decimal", "precision": p, "scale": s.min(p)}
        )),
        (1u32..40).prop_map(|size| json!({"type": "fixed", "name": "F", "size": size})),
        Just(
            json!({"type": "fixed", "name": "D", "size": 12, "logicalType": "duration", "aliases": ["Dur"]})
        ),
        prop::collection::btree_set("[A-Z][A-Z0-9_]{0,4}", 1..4).prop_map(|symbols| json!(
            {"type": "enum", "name": "E", "symbols": symbols, "doc": "an enum"}
        )),
        // A reference to a type defined before it (filled in by `name_types`).
        Just(json!("__ref__")),
    ]
}

fn namespace() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![None, None, Some(""), Some("a"), Some("a.b_c")])
}

fn record(types: Vec<Json>, ns: Option<&str>, descending: bool) -> Json {
    let fields: Vec<Json> = types
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let mut f = json!({"name": format!("f{i}"), "type": t, "doc": "a field"});
            if descending && i == 0 {
                f["order"] = json!("descending");
            }
            f
        })
        .collect();
    let mut r = json!({"type": "record", "name": "R", "doc": "a record", "fields": fields});
    if let Some(ns) = ns {
        r["namespace"] = json!(ns);
    }
    r
}

/// Random valid-looking schemas: every named type, logical type and attribute the canonical
/// form has a rule for, nested. Some are invalid (a bad union); the crate's parser drops them.
fn schema() -> impl Strategy<Value = Json> {
    let nested = leaf().prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            inner
                .clone()
                .prop_map(|t| json!({"type": "array", "items": t})),
            inner
                .clone()
                .prop_map(|t| json!({"type": "map", "values": t, "doc": "a map"})),
            inner.clone().prop_map(|t| json!(["null", t])),
            (
                prop::collection::vec(inner, 1..4),
                namespace(),
                any::<bool>()
            )
                .prop_map(|(types, ns, d)| record(types, ns, d)),
        ]
    });
    (prop::collection::vec(nested, 1..5), namespace())
        .prop_map(|(types, ns)| record(types, ns, false))
}

/// Gives every named type a unique name (every fifth a dotted full name) and points each
/// `__ref__` at the short name of the type defined last before it, in document order.
fn name_types(schema: &mut Json, defined: &mut Vec<String>) {
    match schema {
        Json::String(s) if s == "__ref__" => {
            *s = defined.last().cloned().unwrap_or_else(|| "int".into());
        }
        Json::Array(items) => items.iter_mut().for_each(|i| name_types(i, defined)),
        Json::Object(map) => {
            if map.contains_key("name") {
                let n = defined.len();
                let short = format!("N{n}");
                let name = if n % 5 == 4 {
                    format!("x{n}.{short}")
                } else {
                    short.clone()
                };
                map.insert("name".into(), json!(name));
                defined.push(short);
            }
            for key in ["fields", "items", "values", "type"] {
                if let Some(inner) = map.get_mut(key) {
                    if key == "fields" {
                        for f in inner.as_array_mut().into_iter().flatten() {
                            name_types(&mut f["type"], defined);
                        }
                    } else if !inner.is_string() || *inner == "__ref__" {
                        name_types(inner, defined);
                    }
                }
            }
        }
        _ => {}
    }
}

#[test]
fn canonical_forms_of_generated_schemas_are_those_of_java_avro_and_fastavro() {
    let mut runner = TestRunner::deterministic();
    let strategy = schema();
    let mut schemas = Vec::new();
    while schemas.len() < 300 {
        let mut s = strategy.new_tree(&mut runner).unwrap().current();
        name_types(&mut s, &mut Vec::new());
        if apache_avro::Schema::parse(&s).is_ok() {
            schemas.push(s.to_string());
        }
    }
    for (who, answer) in oracles(&schemas) {
        let compared = compare(who, &schemas, &answer);
        assert!(
            compared * 10 >= schemas.len() * 9,
            "{who} parsed only {compared} of {} generated schemas",
            schemas.len()
        );
    }
}
