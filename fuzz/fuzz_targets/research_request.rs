//! Arbitrary bytes as `CountPatientsRequest`, `DiagnosticDelayRequest` and
//! `FindExpertiseRequest`, through the public pieces of their conversion: dimensions,
//! filter values (which must re-parse from their published label), registry, country
//! and Orphacodes.

#![no_main]

mod properties;

use ern_registry::domain::{CountryCode, Orphacode, RegistryCode};
use ern_registry::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::CountPatientsRequest::decode(data) {
        let _ = RegistryCode::parse(&req.registry);
        properties::research(&req.group_by, &req.filters);
    }
    if let Ok(req) = proto::DiagnosticDelayRequest::decode(data) {
        properties::research(&req.group_by, &req.filters);
    }
    if let Ok(req) = proto::FindExpertiseRequest::decode(data) {
        for code in &req.orphacodes {
            let _ = Orphacode::parse(code);
        }
        for country in &req.countries {
            let _ = CountryCode::parse(country);
        }
        for registry in &req.registries {
            let _ = RegistryCode::parse(registry);
        }
    }
});
