//! ern-registry: a pseudonymised patient registry service for the European Reference
//! Networks on rare diseases. See `docs/architecture.md` for the map.

pub mod aggregate;
pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod connections;
pub mod consent;
pub mod data_dir;
pub mod domain;
pub mod health;
pub mod keys;
pub mod outcome;
pub mod pseudonym;
pub mod ratelimit;
pub mod refusals;
pub mod service;
pub mod startup;
pub mod store;
pub mod synthetic;

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

    #[test]
    fn identifiers_never_print() {
        let request = proto::SubmitCaseRequest {
            registry: "ERN-LUNG".into(),
            patient: Some(proto::PatientIdentifiers {
                kind: Some(proto::patient_identifiers::Kind::National(
                    proto::NationalIdentifier {
                        issuing_country: "NL".into(),
                        value: "123456782".into(),
                    },
                )),
            }),
            ..Default::default()
        };
        let printed = format!("{request:?} {request:#?}");
        assert!(!printed.contains("123456782"), "{printed}");
        assert!(printed.contains("<redacted>"));
        let demographic = proto::DemographicIdentifiers {
            given_names: "Anneke".into(),
            family_name: "Visser-de Jong".into(),
            date_of_birth: "2015-06-01".into(),
            sex_at_birth: 1,
            place_of_birth: "Zwolle".into(),
            country_of_birth: "NL".into(),
        };
        let printed = format!("{demographic:?}");
        for secret in ["Anneke", "Visser", "2015-06-01", "Zwolle"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }
}
