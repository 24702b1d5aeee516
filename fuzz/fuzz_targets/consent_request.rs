//! Arbitrary bytes as `RecordConsentRequest`, `WithdrawConsentRequest` and
//! `GetConsentRequest`, decoded on their own and merged into valid requests, then
//! converted as the consent handlers do (patient reference, decisions, scopes, reason,
//! timestamps). The handlers' own helpers are private; their public pieces are fuzzed.

#![no_main]

mod properties;

use ern_registry::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = proto::RecordConsentRequest::decode(data) {
        properties::record_consent(&req);
    }
    let mut req = properties::valid_record_consent();
    if req.merge(data).is_ok() {
        properties::record_consent(&req);
    }
    if let Ok(req) = proto::WithdrawConsentRequest::decode(data) {
        properties::withdrawal(&req);
    }
    let mut req = properties::valid_withdrawal();
    if req.merge(data).is_ok() {
        properties::withdrawal(&req);
    }
    if let Ok(req) = proto::GetConsentRequest::decode(data) {
        let _ = ern_registry::pseudonym::Pseudonym::parse(&req.pseudonym);
        if let Some(at) = &req.at {
            properties::timestamp(at);
        }
    }
    if let Ok(t) = prost_types::Timestamp::decode(data) {
        properties::timestamp(&t);
    }
});
