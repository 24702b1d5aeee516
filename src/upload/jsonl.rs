//! JSON Lines input of `ern-registry upload`: one `SubmitCaseRequest` (or, with
//! `--format phenopackets`, one `SubmitPhenopacketRequest`) per line in the proto3 JSON
//! form (what `buf curl` and `grpcurl` take: lowerCamelCase or the proto's field names,
//! enum names, RFC 3339 timestamps). Pure: no I/O.
//!
//! prost has no JSON mapping; prost-reflect (already the descriptor reader of the proto
//! compiler) implements the proto3 JSON mapping over the contract's descriptor set, and
//! the dynamic message is then transcoded into the generated type.
//!
//! A line that does not parse is reported with its column only: the parser's own
//! messages may quote the offending value, which may be an identifier.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor};

use crate::api::json::{check_unique_keys, fields_given_twice, is_repeated_key};
use crate::proto;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes")
    })
}

fn descriptor() -> MessageDescriptor {
    pool()
        .get_message_by_name("ern_registry.v1.SubmitCaseRequest")
        .expect("the contract defines SubmitCaseRequest")
}

/// Reads one line of a phenopacket file: a `SubmitPhenopacketRequest` whose
/// `phenopacket` may be the phenopacket itself (a JSON object) rather than its text. The
/// error says where, never what.
pub fn parse_phenopacket_line(line: &str) -> Result<proto::SubmitPhenopacketRequest, String> {
    let unreadable = |at: String| {
        format!(
            "not a SubmitPhenopacketRequest in the proto JSON form ({at}unknown fields, wrong types and malformed values are refused)"
        )
    };
    let mut value: serde_json::Value = check_unique_keys(line)
        .and_then(|()| serde_json::from_str(line))
        .map_err(|e| {
            let repeated = if is_repeated_key(&e) {
                "an object names a key twice: give each key once; "
            } else {
                ""
            };
            unreadable(format!("at column {}; {repeated}", e.column()))
        })?;
    if let Some(inner) = value.get_mut("phenopacket")
        && inner.is_object()
    {
        *inner = serde_json::Value::String(inner.to_string());
    }
    let request = pool()
        .get_message_by_name("ern_registry.v1.SubmitPhenopacketRequest")
        .expect("the contract defines SubmitPhenopacketRequest");
    if let Some(twice) = fields_given_twice(&value, &request).first() {
        return Err(unreadable(format!("{twice}; ")));
    }
    let message = DynamicMessage::deserialize_with_options(
        request,
        &value,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|_| unreadable(String::new()))?;
    message
        .transcode_to::<proto::SubmitPhenopacketRequest>()
        .map_err(|_| "not a SubmitPhenopacketRequest".to_owned())
}

/// Reads one line. The error says where, never what.
pub fn parse_line(line: &str) -> Result<proto::SubmitCaseRequest, String> {
    check_unique_keys(line).map_err(|e| {
        format!(
            "not a SubmitCaseRequest in the proto JSON form (at column {}; {})",
            e.column(),
            if is_repeated_key(&e) {
                "an object names a key twice: give each key once"
            } else {
                "not JSON"
            }
        )
    })?;
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(line)
        && let Some(twice) = fields_given_twice(&value, &descriptor()).first()
    {
        return Err(format!(
            "not a SubmitCaseRequest in the proto JSON form ({twice})"
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(line);
    let message = DynamicMessage::deserialize_with_options(
        descriptor(),
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .and_then(|m| deserializer.end().map(|()| m))
    .map_err(|e| {
        format!(
            "not a SubmitCaseRequest in the proto JSON form (at column {}; unknown fields, wrong types and malformed values are refused)",
            e.column()
        )
    })?;
    message
        .transcode_to::<proto::SubmitCaseRequest>()
        .map_err(|_| "not a SubmitCaseRequest".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_json keeps a repeated key's last value; the line is refused instead, and a
    /// field given by both its names too.
    #[test]
    fn a_field_given_twice_is_refused() {
        let base = r#"{"registry":"ERN-LUNG","patient":{"national":{"issuingCountry":"XT","value":"SYN000000001"}},"clientReference":"c-1"}"#;
        parse_line(base).unwrap();
        for twice in [
            r#"{"registry":"ERN-LUNG","registry":"ERN-EYE"}"#,
            r#"{"clientReference":"c-1","client_reference":"c-2"}"#,
            r#"{"patient":{"national":{"value":"SYN000000001","value":"SYN000000002"}}}"#,
        ] {
            let e = parse_line(twice).unwrap_err();
            assert!(e.contains("twice") && !e.contains("SYN"), "{e}");
        }
        // Both kinds of identifier in one line: named by path, not "not JSON".
        let e = parse_line(r#"{"patient":{"national":{"value":"SYN000000001"},"demographic":{"givenName":"SYNA"}}}"#).unwrap_err();
        assert!(
            e.contains(
                "patient.national is given with `demographic`, another member of the oneof `kind`"
            ) && !e.contains("SYN"),
            "{e}"
        );
        for twice in [
            r#"{"registry":"ERN-LUNG","phenopacket":{"id":"a","id":"b"}}"#,
            r#"{"registry":"ERN-LUNG","clientReference":"a","client_reference":"b","phenopacket":"{}"}"#,
        ] {
            let e = parse_phenopacket_line(twice).unwrap_err();
            assert!(e.contains("twice"), "{e}");
        }
    }

    #[test]
    fn reads_the_proto_json_form_with_either_field_names() {
        let line = r#"{"registry":"ERN-LUNG","patient":{"national":{"issuingCountry":"XT","value":"SYN000000001"}},
            "record":{"birthYearMonth":"2015-06","sex":"SEX_FEMALE","status":"PATIENT_STATUS_ALIVE",
            "onset_kind":"ONSET_KIND_DATE","onsetDate":"2015-09","diagnosis":{"orphacode":"ORPHA:586","icd10":["E84.0"]},
            "diagnosisDate":"2016-03-14","hpoTerms":["HP:0006528"]},
            "consent":[{"scope":"CONSENT_SCOPE_REGISTRY_INCLUSION","state":"CONSENT_STATE_GRANTED",
            "givenAt":"2024-03-01T10:00:00Z","formVersion":"F-1"}],"clientReference":"c-1"}"#
            .replace('\n', "");
        let request = parse_line(&line).unwrap();
        assert_eq!(request.registry, "ERN-LUNG");
        assert_eq!(request.client_reference, "c-1");
        let record = request.record.as_ref().unwrap();
        assert_eq!(record.onset_kind, proto::OnsetKind::Date as i32);
        assert_eq!(record.hpo_terms, ["HP:0006528"]);
        assert_eq!(
            request.consent[0].given_at.as_ref().unwrap().seconds,
            1_709_287_200
        );
        match request.patient.as_ref().unwrap().kind.as_ref().unwrap() {
            proto::patient_identifiers::Kind::National(n) => assert_eq!(n.value, "SYN000000001"),
            proto::patient_identifiers::Kind::Demographic(_) => panic!(),
        }
    }

    #[test]
    fn errors_never_quote_the_line() {
        for line in [
            r#"{"patient":{"national":{"value":123456782}}}"#,
            r#"{"patient":{"national":{"value":"123456782", "bsn":"123456782"}}}"#,
            r#"{"record":{"sex":"SEX_123456782"}}"#,
            r#"{"registry":"123456782"} trailing"#,
            "123456782",
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(!err.contains("123456782"), "{err}");
        }
    }
}
