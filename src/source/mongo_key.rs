//! The key of a MongoDB document: its `_id` as a string that keeps the BSON type, and back.
//! One mapping for every path that makes or reads keys (the stream, snapshots, repair,
//! verify), kept apart so its rules are unit- and property-tested.

use mongodb::bson::Bson;
use serde_json::Value as Json;

/// The `_id` as the message key and aggregate id, keeping its BSON type, so `_id: "5"` and
/// `_id: 5`, or an ObjectId and its hex string, are different keys:
/// - a string as itself (so the keys of string ids never change), unless it would read as
///   another key's form (a JSON string literal, or exactly the text below of a non-string
///   id, such as `true` or `{"$oid":"…"}`): then as its JSON string literal, `"true"`;
/// - anything else as canonical Extended JSON (`{"$oid":"…"}`, `{"$numberInt":"5"}`, `{"a":
///   {"$numberInt":"1"}}`), an integer in its smallest form: MongoDB treats int32 and int64
///   ids of equal value as the same `_id`, and so does the key.
///
/// One-to-one: [`id_of_key`] gives the id back. Every path that makes or reads a key (the
/// stream, snapshot, repair, verify) goes through these two.
pub fn canonical_key(id: &Bson) -> String {
    match id {
        Bson::String(s) if reads_as_another_form(s) => Json::String(s.clone()).to_string(),
        Bson::String(s) => s.clone(),
        Bson::Int64(i) => match i32::try_from(*i) {
            Ok(small) => Bson::Int32(small),
            Err(_) => Bson::Int64(*i),
        }
        .into_canonical_extjson()
        .to_string(),
        other => other.clone().into_canonical_extjson().to_string(),
    }
}

/// The `_id` a key stands for (the inverse of [`canonical_key`]).
pub fn id_of_key(key: &str) -> Bson {
    match parse_extjson(key) {
        Some(Bson::String(s)) => Bson::String(s),
        Some(id) if canonical_key(&id) == key => id,
        _ => Bson::String(key.to_string()),
    }
}

/// Whether a string id kept as itself would be taken for another key's form.
fn reads_as_another_form(s: &str) -> bool {
    match parse_extjson(s) {
        None => false,
        Some(Bson::String(_)) => true,
        Some(id) => canonical_key(&id) == s,
    }
}

fn parse_extjson(text: &str) -> Option<Bson> {
    serde_json::from_str::<Json>(text)
        .ok()
        .and_then(|j| Bson::try_from(j).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId};
    use proptest::prelude::*;

    #[test]
    fn keys_keep_the_ids_type_and_strings_stay_as_they_are() {
        let oid = ObjectId::parse_str("6b045d0eb6ebfed351ac9d18").unwrap();
        let cases = [
            (Bson::String("c-1".into()), "c-1"),
            (Bson::String("5".into()), "5"),
            (Bson::String(oid.to_hex()), "6b045d0eb6ebfed351ac9d18"),
            (Bson::Int32(5), r#"{"$numberInt":"5"}"#),
            (Bson::Int64(5), r#"{"$numberInt":"5"}"#),
            (
                Bson::Int64(5_000_000_000),
                r#"{"$numberLong":"5000000000"}"#,
            ),
            (Bson::Double(5.5), r#"{"$numberDouble":"5.5"}"#),
            (
                Bson::ObjectId(oid),
                r#"{"$oid":"6b045d0eb6ebfed351ac9d18"}"#,
            ),
            (
                Bson::Document(doc! {"a": 1, "b": "x"}),
                r#"{"a":{"$numberInt":"1"},"b":"x"}"#,
            ),
            (Bson::Boolean(true), "true"),
            (Bson::Null, "null"),
            // Strings that would read as another key's form: their JSON literal.
            (Bson::String("true".into()), r#""true""#),
            (
                Bson::String(r#"{"$oid":"6b045d0eb6ebfed351ac9d18"}"#.into()),
                r#""{\"$oid\":\"6b045d0eb6ebfed351ac9d18\"}""#,
            ),
            (Bson::String(r#""5""#.into()), r#""\"5\"""#),
            // Not another key's form (an int64 that fits is written as int32): as itself.
            (
                Bson::String(r#"{"$numberLong":"5"}"#.into()),
                r#"{"$numberLong":"5"}"#,
            ),
        ];
        for (id, key) in cases {
            assert_eq!(canonical_key(&id), key, "{id:?}");
        }
    }

    fn any_id() -> impl Strategy<Value = Bson> {
        let leaf = prop_oneof![
            any::<String>().prop_map(Bson::String),
            r#"[a-z0-9\\"{}:$]{0,12}"#.prop_map(Bson::String),
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
            any::<bool>().prop_map(Bson::Boolean),
            Just(Bson::Null),
            (-1e6f64..1e6).prop_map(Bson::Double),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop::collection::vec(("[a-z]{1,3}", inner), 1..3)
                .prop_map(|fields| Bson::Document(fields.into_iter().collect()))
        })
    }

    /// The same id as MongoDB sees it (an int64 that fits taken as the int32 it equals).
    fn normalized(id: &Bson) -> Bson {
        match id {
            Bson::Int64(i) => i32::try_from(*i).map_or(id.clone(), Bson::Int32),
            other => other.clone(),
        }
    }

    proptest! {
        /// Different ids (beyond int32/int64 of one value) never share a key, and the key
        /// gives its id back.
        #[test]
        fn keys_are_one_to_one(a in any_id(), b in any_id()) {
            let (ka, kb) = (canonical_key(&a), canonical_key(&b));
            prop_assert_eq!(normalized(&id_of_key(&ka)), normalized(&a));
            if normalized(&a) != normalized(&b) {
                prop_assert_ne!(ka, kb);
            }
        }
    }
}
