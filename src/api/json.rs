//! JSON text read strictly: an object that names a key twice is refused. serde_json (and
//! so prost-reflect's proto3 JSON reading over it) keeps the last value of a repeated key
//! and drops the others without a word; a phenopacket with `phenotypicFeatures` twice
//! lost its first list that way, and a feature with `"excluded"` twice was read by its
//! second value where another reader takes the first. JSON says keys SHOULD be unique,
//! so such text is malformed, and what it means is not for the server to guess.

use std::collections::{HashMap, HashSet};
use std::fmt;

use prost_reflect::{Kind, MessageDescriptor};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The start of the error a repeated key gives (see [`is_repeated_key`]).
const REPEATED: &str = "an object names a key twice";

/// Checks that no object of the JSON text `text` names a key twice, at any depth. Text
/// that is not JSON fails as serde_json says (line and column in the error). The error
/// never carries the key or any value.
pub fn check_unique_keys(text: &str) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    UniqueKeys.deserialize(&mut deserializer)?;
    deserializer.end()
}

/// Whether `error` (of [`check_unique_keys`]) is a repeated key rather than text that is
/// not JSON.
pub fn is_repeated_key(error: &serde_json::Error) -> bool {
    error.is_data() && error.to_string().starts_with(REPEATED)
}

/// A field an object gives twice, or a second member of one oneof (see
/// [`fields_given_twice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenTwice {
    /// The field's path by JSON field names, `[i]` for list items, `{}` for map values.
    pub path: String,
    /// What is wrong, to follow the path: names only the schema's fields and oneofs.
    pub problem: String,
}

impl fmt::Display for GivenTwice {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} {}", self.path, self.problem)
    }
}

/// Every field that an object of `value`, read as `message` in the proto3 JSON form,
/// gives twice: by its JSON name and by its proto name (`clientReference` and
/// `client_reference`), which the JSON form accepts alike and prost-reflect reads as the
/// last given; and every second member of one oneof given in one object (a phenopacket
/// `onset` with both `age` and `interval`), which the reader refuses only with a message
/// that names nothing (the path is one member's, the message names the other: which is
/// which follows the keys' sorted order, not the order they were written in). Keys that name no field are left to the reader's refusal of
/// unknown fields; a map's keys are the caller's text; a member given as `null` is not
/// given (the JSON form's reading of null).
pub fn fields_given_twice(
    value: &serde_json::Value,
    message: &MessageDescriptor,
) -> Vec<GivenTwice> {
    let mut found = Vec::new();
    given_twice(value, message, "", &mut found);
    found
}

fn given_twice(
    value: &serde_json::Value,
    message: &MessageDescriptor,
    path: &str,
    found: &mut Vec<GivenTwice>,
) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    let mut seen = HashSet::new();
    let mut oneofs: HashMap<String, String> = HashMap::new();
    for (key, item) in map {
        let Some(field) = message
            .get_field_by_json_name(key)
            .or_else(|| message.get_field_by_name(key))
        else {
            continue;
        };
        let path = if path.is_empty() {
            field.json_name().to_owned()
        } else {
            format!("{path}.{}", field.json_name())
        };
        if !seen.insert(field.number()) {
            found.push(GivenTwice {
                path: path.clone(),
                problem: "is given twice, by its JSON name and its proto name: give it once"
                    .to_owned(),
            });
        } else if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic())
            && !item.is_null()
        {
            match oneofs.get(oneof.name()) {
                Some(first) => found.push(GivenTwice {
                    path: path.clone(),
                    problem: format!(
                        "is given with `{first}`, another member of the oneof `{}`: give one \
                         of them",
                        oneof.name()
                    ),
                }),
                None => {
                    oneofs.insert(oneof.name().to_owned(), field.json_name().to_owned());
                }
            }
        }
        let Kind::Message(inner) = field.kind() else {
            continue;
        };
        if field.is_map() {
            let (serde_json::Value::Object(entries), Some(value_field)) =
                (item, inner.get_field(2))
            else {
                continue;
            };
            if let Kind::Message(entry_value) = value_field.kind() {
                for entry in entries.values() {
                    given_twice(entry, &entry_value, &format!("{path}{{}}"), found);
                }
            }
        } else if let (serde_json::Value::Array(items), true) = (item, field.is_list()) {
            for (i, item) in items.iter().enumerate() {
                given_twice(item, &inner, &format!("{path}[{i}]"), found);
            }
        } else {
            given_twice(item, &inner, &path, found);
        }
    }
}

/// Walks a JSON value, refusing a key an object names twice; builds nothing.
#[derive(Clone, Copy)]
struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(de::Error::custom(REPEATED));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_named_twice_in_any_object_is_refused_and_not_named() {
        for text in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":{"b":[{"c":1,"d":2,"c":3}]}}"#,
            r#"[{"x":[]},{"secret-111222333":1,"secret-111222333":1}]"#,
            // The same key written with an escape is the same key.
            r#"{"ab":1,"a\u0062":2}"#,
        ] {
            let e = check_unique_keys(text).unwrap_err();
            assert!(is_repeated_key(&e), "{text}: {e}");
            assert!(!e.to_string().contains("111222333"), "{e}");
        }
    }

    #[test]
    fn json_without_repeated_keys_passes_and_malformed_text_is_not_a_repeated_key() {
        for text in [
            r#"{"a":1,"b":{"a":1},"c":[{"a":1},{"a":2}]}"#,
            "[]",
            "null",
            r#""text""#,
            "-1.5e3",
        ] {
            check_unique_keys(text).unwrap();
        }
        for text in [r#"{"a":1,}"#, r#"{"a":1} x"#, "1e400", ""] {
            let e = check_unique_keys(text).unwrap_err();
            assert!(!is_repeated_key(&e), "{text}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = check_unique_keys(&text).unwrap_err();
        assert!(!is_repeated_key(&e));
    }
}
