//! ern-registry: a pseudonymised patient registry service for the European Reference
//! Networks on rare diseases. See `docs/architecture.md` for the map.

pub mod aggregate;
pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod codes;
pub mod config;
pub mod connections;
pub mod consent;
pub mod console;
pub mod data_dir;
pub mod domain;
pub mod exporter;
/// Test data shared by unit tests, integration tests, benches and fuzz targets; never in a
/// normal build (see the module documentation).
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod health;
pub mod keys;
pub mod logging;
pub mod outcome;
pub mod pseudonym;
pub mod ratelimit;
pub mod refusals;
pub mod service;
pub mod startup;
pub mod store;
pub mod synthetic;
pub mod upload;

/// Generated code of the public contract (`proto/ern_registry/v1`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ern_registry.v1");

    /// Encoded descriptor set of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ern_registry_descriptor");

    // Identifiers never print: these replace prost's derived Debug (skipped in build.rs),
    // so a request printed with `{:?}` (a log line, a panic, an error) shows only that an
    // identifier was there. The issuing and birth countries and the sex are not
    // identifying on their own and help to read a log.
    impl std::fmt::Debug for NationalIdentifier {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NationalIdentifier")
                .field("issuing_country", &self.issuing_country)
                .field("value", &"<redacted>")
                .finish()
        }
    }

    /// The phenopacket's text by its length: a client may have put an identifier in the
    /// elements the service ignores (`id`, `subject.id`).
    impl std::fmt::Debug for SubmitPhenopacketRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SubmitPhenopacketRequest")
                .field("registry", &self.registry)
                .field("patient", &self.patient)
                .field(
                    "phenopacket",
                    &format_args!("<{} bytes, redacted>", self.phenopacket.len()),
                )
                .field("consent", &self.consent)
                .field("client_reference", &self.client_reference)
                .finish()
        }
    }

    impl std::fmt::Debug for DemographicIdentifiers {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DemographicIdentifiers")
                .field("given_names", &"<redacted>")
                .field("family_name", &"<redacted>")
                .field("date_of_birth", &"<redacted>")
                .field("sex_at_birth", &self.sex_at_birth)
                .field("place_of_birth", &"<redacted>")
                .field("country_of_birth", &self.country_of_birth)
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::proto;
    use crate::fixtures;
    use zeroize::{Zeroize, ZeroizeOnDrop};

    /// Compiles only for types that wipe themselves when dropped.
    fn assert_zeroize_on_drop<T: ZeroizeOnDrop>() {}

    fn national(value: &str) -> proto::NationalIdentifier {
        proto::NationalIdentifier {
            issuing_country: "NL".into(),
            value: value.into(),
        }
    }

    fn demographic() -> proto::DemographicIdentifiers {
        proto::DemographicIdentifiers {
            given_names: "Anneke".into(),
            family_name: "Visser-de Jong".into(),
            date_of_birth: "2015-06-01".into(),
            sex_at_birth: 1,
            place_of_birth: "Zwolle".into(),
            country_of_birth: "NL".into(),
        }
    }

    /// The bytes of `s`'s whole buffer, from its start to its capacity. Sound after
    /// `zeroize`, which keeps the buffer and writes every byte of it.
    fn buffer(s: &str, capacity: usize) -> &[u8] {
        // SAFETY: the allocation of the String behind `s` is `capacity` bytes long, alive
        // while `s` is borrowed, and every byte of it was written (by the String, then by
        // `zeroize`), so all of them are initialised.
        unsafe { std::slice::from_raw_parts(s.as_ptr(), capacity) }
    }

    #[test]
    fn identifier_messages_wipe_themselves_when_dropped() {
        // What guarantees that every exit path wipes: the drop glue of these types. (A
        // dropped message cannot be inspected soundly; what the drop calls is checked
        // below, on the types themselves.)
        assert_zeroize_on_drop::<proto::NationalIdentifier>();
        assert_zeroize_on_drop::<proto::DemographicIdentifiers>();
        assert_zeroize_on_drop::<proto::PatientIdentifiers>();
        assert_zeroize_on_drop::<proto::patient_identifiers::Kind>();
        assert_zeroize_on_drop::<proto::PatientRef>();
        assert_zeroize_on_drop::<proto::patient_ref::Kind>();
        assert_zeroize_on_drop::<Option<proto::PatientIdentifiers>>();
        assert_zeroize_on_drop::<crate::pseudonym::PatientIdentity>();
    }

    #[test]
    fn zeroize_overwrites_every_identifier_byte() {
        let mut n = national("123456782");
        let (value_ptr, value_cap) = (n.value.as_ptr(), n.value.capacity());
        n.zeroize();
        assert_eq!(
            n.value.as_ptr(),
            value_ptr,
            "the buffer is wiped, not replaced"
        );
        assert!(n.value.is_empty() && n.issuing_country.is_empty());
        assert!(buffer(&n.value, value_cap).iter().all(|&b| b == 0));

        let mut d = demographic();
        let caps = [
            d.given_names.capacity(),
            d.family_name.capacity(),
            d.date_of_birth.capacity(),
            d.place_of_birth.capacity(),
            d.country_of_birth.capacity(),
        ];
        d.zeroize();
        let fields = [
            &d.given_names,
            &d.family_name,
            &d.date_of_birth,
            &d.place_of_birth,
            &d.country_of_birth,
        ];
        for (field, cap) in fields.into_iter().zip(caps) {
            assert!(field.is_empty());
            assert!(cap > 0 && buffer(field, cap).iter().all(|&b| b == 0));
        }
        assert_eq!(d.sex_at_birth, 0);
    }

    #[test]
    fn zeroize_empties_the_wrappers() {
        let mut wrapped = proto::PatientIdentifiers {
            kind: Some(proto::patient_identifiers::Kind::Demographic(demographic())),
        };
        wrapped.zeroize();
        assert_eq!(wrapped, proto::PatientIdentifiers::default());

        let mut reference = proto::PatientRef {
            kind: Some(proto::patient_ref::Kind::Identifiers(
                proto::PatientIdentifiers {
                    kind: Some(proto::patient_identifiers::Kind::National(national(
                        "123456782",
                    ))),
                },
            )),
        };
        reference.zeroize();
        assert_eq!(reference, proto::PatientRef::default());
    }

    #[test]
    fn a_phenopackets_text_never_prints() {
        let mut request =
            fixtures::phenopacket_submission("ERN-LUNG", fixtures::national("NL", fixtures::BSN));
        request.phenopacket = request
            .phenopacket
            .replace("local-patient-17", fixtures::BSN);
        let printed = format!("{request:?} {request:#?}");
        assert!(!printed.contains(fixtures::BSN), "{printed}");
        assert!(!printed.contains("local-case-17"), "{printed}");
        assert!(printed.contains("bytes, redacted>"));
    }

    #[test]
    fn identifiers_never_print() {
        let request = fixtures::submission("ERN-LUNG", fixtures::national("NL", fixtures::BSN));
        let printed = format!("{request:?} {request:#?}");
        assert!(!printed.contains(fixtures::BSN), "{printed}");
        assert!(printed.contains("<redacted>"));
        let person = fixtures::person();
        let printed = format!("{person:?} {:?}", fixtures::demographic(person.clone()));
        for secret in [
            &person.given_names,
            &person.family_name,
            &person.date_of_birth,
            &person.place_of_birth,
        ] {
            assert!(!printed.contains(secret.as_str()), "{printed}");
        }
    }
}
