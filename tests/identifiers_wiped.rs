//! The adversary's view of "identifiers are zeroised on every path": whoever later reads
//! the process's freed heap (a core dump, a swap page, the next allocation of the same
//! block) must find no identifier there, whichever way the message holding it went.
//!
//! A global allocator hands out zero-filled blocks (so every byte it later reads is
//! initialised) and, while a test watches, looks through every block freed on its thread
//! for the canary the test put in every identifier. Reading a block inside `dealloc`,
//! before passing it on, is sound: it is still ours.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

use ern_registry::proto;
use prost::Message;
use zeroize::Zeroizing;

/// In every identifier field of these tests, and nowhere else on the heap.
const CANARY: &[u8] = b"xq7canary";

struct Watching;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static FREED: Cell<usize> = const { Cell::new(0) };
    static FREED_WITH_CANARY: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if WATCHING.try_with(Cell::get).unwrap_or(false) {
            // SAFETY: the block is `layout.size()` bytes, still allocated, and initialised
            // (zero-filled by `alloc`, `realloc` copies into such a block).
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            let _ = FREED.try_with(|n| n.set(n.get() + 1));
            if block.windows(CANARY.len()).any(|w| w == CANARY) {
                let _ = FREED_WITH_CANARY.try_with(|n| n.set(n.get() + 1));
            }
        }
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }
    // `realloc` is the trait's default: `alloc` (zeroed), copy, `dealloc` (watched).
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Runs `f` while watching; returns (blocks freed, blocks freed holding the canary).
fn watch(f: impl FnOnce()) -> (usize, usize) {
    FREED.set(0);
    FREED_WITH_CANARY.set(0);
    WATCHING.set(true);
    f();
    WATCHING.set(false);
    (FREED.get(), FREED_WITH_CANARY.get())
}

fn national() -> proto::PatientIdentifiers {
    proto::PatientIdentifiers {
        kind: Some(proto::patient_identifiers::Kind::National(
            proto::NationalIdentifier {
                issuing_country: "NL".into(),
                value: "xq7canary-123456782".into(),
            },
        )),
    }
}

fn demographic() -> proto::PatientIdentifiers {
    proto::PatientIdentifiers {
        kind: Some(proto::patient_identifiers::Kind::Demographic(
            proto::DemographicIdentifiers {
                given_names: "xq7canary Anneke".into(),
                family_name: "xq7canary Visser-de Jong".into(),
                date_of_birth: "xq7canary 2015-06-01".into(),
                sex_at_birth: 1,
                place_of_birth: "xq7canary Zwolle".into(),
                country_of_birth: "NL".into(),
            },
        )),
    }
}

fn submission(patient: proto::PatientIdentifiers) -> proto::SubmitCaseRequest {
    proto::SubmitCaseRequest {
        registry: "ERN-LUNG".into(),
        patient: Some(patient),
        client_reference: "ref-1".into(),
        ..Default::default()
    }
}

fn by_identifiers(patient: proto::PatientIdentifiers) -> Option<proto::PatientRef> {
    Some(proto::PatientRef {
        kind: Some(proto::patient_ref::Kind::Identifiers(patient)),
    })
}

fn assert_wiped(what: &str, (freed, with_canary): (usize, usize)) {
    assert!(
        freed > 0,
        "{what}: nothing was freed, so nothing was checked"
    );
    assert_eq!(
        with_canary, 0,
        "{what}: {with_canary} of {freed} freed blocks still held an identifier"
    );
}

#[test]
fn the_watch_finds_an_identifier_left_in_freed_memory() {
    // The control: a plain String is freed as it is, and the watch sees it.
    let plain = String::from("xq7canary-123456782");
    let (freed, with_canary) = watch(|| drop(plain));
    assert_eq!((freed, with_canary), (1, 1));
}

#[test]
fn dropped_identifier_messages_leave_no_identifier_in_freed_memory() {
    for make in [national, demographic] {
        assert_wiped("PatientIdentifiers", watch(|| drop(make())));
        let request = submission(make());
        assert_wiped("SubmitCaseRequest", watch(|| drop(request)));
        let request = proto::WithdrawConsentRequest {
            registry: "ERN-EYE".into(),
            patient: by_identifiers(make()),
            scopes: vec![1],
            reason: 1,
        };
        assert_wiped("WithdrawConsentRequest", watch(|| drop(request)));
        // A bulk request refused before any entry is looked at (too many entries, an
        // unknown key): the whole request is dropped unread.
        let request = proto::RecordConsentsRequest {
            entries: (0..3)
                .map(|_| proto::RecordConsentRequest {
                    registry: "ERN-EYE".into(),
                    patient: by_identifiers(make()),
                    ..Default::default()
                })
                .collect(),
        };
        assert_wiped("RecordConsentsRequest", watch(|| drop(request)));
        // Taken out of its request, as a handler does, and cloned.
        let mut request = submission(make());
        let taken = request.patient.take();
        let copy = taken.clone();
        assert_wiped(
            "taken and cloned",
            watch(|| {
                drop(taken);
                drop(copy);
            }),
        );
    }
}

#[test]
fn a_decoded_request_leaves_no_identifier_when_dropped() {
    // As the server gets it: decoded from the wire. (The test's own encoded copy is
    // wiped too, so that only the decoded message is judged.)
    let wire = Zeroizing::new(submission(demographic()).encode_to_vec());
    let decoded = proto::SubmitCaseRequest::decode(wire.as_slice()).unwrap();
    assert_wiped("decoded", watch(|| drop(decoded)));
}

#[test]
fn a_request_that_fails_to_decode_leaves_no_identifier() {
    // The identifiers decode, then the body turns out malformed (wire type 7 does not
    // exist): the half-built message is dropped inside `decode`.
    let mut wire = Zeroizing::new(submission(national()).encode_to_vec());
    wire.push(0x0F);
    let outcome = watch(|| {
        assert!(proto::SubmitCaseRequest::decode(wire.as_slice()).is_err());
    });
    assert_wiped("failed decode", outcome);
}

#[test]
fn a_panic_unwinding_past_a_request_leaves_no_identifier() {
    let request = submission(national());
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let outcome = watch(|| {
        let result = panic::catch_unwind(AssertUnwindSafe(move || {
            let _held = request;
            panic!("the handler failed");
        }));
        assert!(result.is_err());
    });
    panic::set_hook(hook);
    assert_wiped("unwound", outcome);
}

/// A phenopacket's interpretations past the first are refused (the record holds one
/// diagnosis), and their ids are wiped as the first one's are: the copy `to_record` works
/// on frees no identifier of theirs.
#[test]
fn a_refused_extra_interpretation_leaves_no_identifier() {
    let json = r#"{
      "id": "p1",
      "subject": { "id": "s1", "sex": "FEMALE" },
      "interpretations": [
        { "id": "i1", "progressStatus": "SOLVED",
          "diagnosis": { "disease": { "id": "ORPHA:586", "label": "Cystic fibrosis" } } },
        { "id": "xq7canary-interpretation", "progressStatus": "SOLVED",
          "diagnosis": { "disease": { "id": "ORPHA:586", "label": "Cystic fibrosis" },
            "genomicInterpretations": [ { "subjectOrBiosampleId": "xq7canary-subject",
              "interpretationStatus": "CAUSATIVE",
              "variantInterpretation": { "variationDescriptor": { "id": "xq7canary-variant" } } } ] } }
      ],
      "metaData": { "created": "2026-01-01T00:00:00Z", "createdBy": "x", "phenopacketSchemaVersion": "2.0" }
    }"#;
    let phenopacket = ern_registry::api::phenopacket::parse_json(json).expect("parses");
    let mut refused = false;
    let freed = watch(|| {
        let mapped = ern_registry::api::phenopacket::to_record(&phenopacket);
        refused = mapped
            .as_ref()
            .err()
            .is_some_and(|v| format!("{v:?}").contains("phenopacket.interpretations[1]"));
        drop(mapped);
    });
    assert!(refused, "the second interpretation is refused");
    assert_wiped("a refused extra interpretation", freed);
}
