//! Arbitrary bytes as a `SubmitCaseRequest`: decoded on their own, and merged into a
//! valid request (protobuf merge overwrites scalars and appends to lists, so this gives
//! "near-valid" requests that reach the deeper rules). The request then goes through the
//! conversions of a submission: `api::convert::patient_identity`, `api::convert::case_record`
//! (fixed today), `parse_attestation` and `ClientReference::parse`.

#![no_main]

mod properties;

use ern_registry::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::SubmitCaseRequest::decode(data) {
        properties::submission(&req);
    }
    let mut req = properties::valid_submission();
    if req.merge(data).is_ok() {
        properties::submission(&req);
    }
    // A bare record merged into the valid one, so that record fields are hit directly.
    let mut record = ern_registry::fixtures::record();
    if record.merge(data).is_ok() {
        let mut req = properties::valid_submission();
        req.record = Some(record);
        properties::submission(&req);
    }
});
