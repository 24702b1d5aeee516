"""Physicians' submissions against a real server."""

import datetime as dt
import itertools

import pytest

import ern_registry
from ern_registry import Client, consent, national, submission


def record(**changes):
    base = {
        "birthYearMonth": "2015-06",
        "sex": "SEX_FEMALE",
        "status": "PATIENT_STATUS_ALIVE",
        "onsetKind": "ONSET_KIND_DATE",
        "onsetDate": "2015-09",
        "diagnosis": {"orphacode": "ORPHA:586", "icd10": ["E84.0"]},
        "diagnosisDate": "2016-03-14",
        "hpoTerms": ["HP:0006528"],
    }
    base.update(changes)
    return base


INCLUSION = consent("registry_inclusion", given_at=dt.date(2024, 3, 1), form_version="ERN-LUNG-2024-01")


def patient(n):
    # The synthetic issuer XT; numbers far above those of the demo's patients.
    return national("XT", f"SYN{900_000_000 + n:09d}")


@pytest.fixture(scope="module")
def physician(demo_server):
    with Client(demo_server.address, api_key=demo_server.keys["dr-jansen"]) as client:
        yield client


def test_a_case_is_stored_read_back_and_not_stored_twice(physician):
    stored = physician.submit_case(
        registry="ERN-LUNG", patient=patient(1), record=record(), consent=[INCLUSION]
    )
    assert stored.pseudonym.startswith("R")
    assert stored.version == 1
    assert stored.recorded_at.tzinfo is not None
    case = physician.get_case("ERN-LUNG", stored.pseudonym)
    assert case.current.record.diagnosis.orphacode == "ORPHA:586"
    assert case.centre == "NL-UMCU"
    with pytest.raises(ern_registry.AlreadyExists) as raised:
        physician.submit_case(registry="ERN-LUNG", patient=patient(1), record=record(), consent=[INCLUSION])
    assert raised.value.resource_name == stored.pseudonym


def test_an_update_makes_a_new_version_and_a_stale_one_is_aborted(physician):
    stored = physician.submit_case(
        registry="ERN-LUNG", patient=patient(4), record=record(), consent=[INCLUSION]
    )
    updated = physician.update_case("ERN-LUNG", stored.pseudonym, 1, record(hpoTerms=["HP:0002205"]))
    assert (updated.pseudonym, updated.version) == (stored.pseudonym, 2)
    case = physician.get_case("ERN-LUNG", stored.pseudonym, include_history=True)
    assert list(case.current.record.hpo_terms) == ["HP:0002205"]
    assert [v.version for v in case.history] == [1]
    with pytest.raises(ern_registry.Aborted):
        physician.update_case("ERN-LUNG", stored.pseudonym, 1, record())


def test_every_invalid_field_is_reported(physician):
    bad = record(birthYearMonth="2015-13", diagnosis={"orphacode": "558"}, hpoTerms=["HP:1"])
    with pytest.raises(ern_registry.InvalidArgument) as raised:
        physician.submit_case(registry="ERN-LUNG", patient=patient(2), record=bad, consent=[INCLUSION])
    fields = {v.field for v in raised.value.field_violations}
    assert {"record.birth_year_month", "record.diagnosis.orphacode", "record.hpo_terms[0]"} <= fields
    assert "record.birth_year_month" in str(raised.value)


def test_a_case_without_consent_is_consent_required(physician):
    with pytest.raises(ern_registry.ConsentRequired) as raised:
        physician.submit_case(registry="ERN-LUNG", patient=patient(3), record=record())
    assert raised.value.scope == "REGISTRY_INCLUSION"
    assert isinstance(raised.value, ern_registry.FailedPrecondition)


def test_an_unknown_pseudonym_is_not_found(physician):
    with pytest.raises(ern_registry.InvalidArgument):
        physician.get_case("ERN-LUNG", "nonsense")


def test_a_bulk_stream_answers_each_submission_in_order(physician):
    def submissions():
        for n in range(10, 40):
            yield {
                "registry": "ERN-LUNG",
                "patient": patient(n),
                "record": record() if n % 10 else record(sex="SEX_UNSPECIFIED"),
                "consent": [INCLUSION],
                "clientReference": f"bulk-{n}",
            }

    results = list(physician.submit_cases(submissions()))
    assert [r.sequence for r in results] == list(range(30))
    assert [r.client_reference for r in results] == [f"bulk-{n}" for n in range(10, 40)]
    rejected = [r for r in results if not r.ok]
    assert [r.client_reference for r in rejected] == ["bulk-10", "bulk-20", "bulk-30"]
    for r in rejected:
        assert isinstance(r.error, ern_registry.InvalidArgument)
        assert [v.field for v in r.error.field_violations] == ["record.sex"]
    assert all(r.submitted.pseudonym for r in results if r.ok)
    # Sent again: every stored one is ALREADY_EXISTS, nothing stored twice.
    again = list(physician.submit_cases(submissions()))
    assert {type(r.error) for r in again if r.client_reference not in {"bulk-10", "bulk-20", "bulk-30"}} == {
        ern_registry.AlreadyExists
    }
    # Each naming the case on file, as a unary call's answer does.
    stored = {r.client_reference: r.submitted.pseudonym for r in results if r.ok}
    assert {r.client_reference: r.error.resource_name for r in again if r.client_reference in stored} == stored


def test_a_stream_without_consent_reports_consent_required(physician):
    results = list(
        physician.submit_cases(
            [submission(registry="ERN-LUNG", patient=patient(50), record=record(), clientReference="nc")]
        )
    )
    assert isinstance(results[0].error, ern_registry.ConsentRequired)


def test_submission_helpers_build_the_proto_json_form():
    message = submission(
        {"registry": "ERN-LUNG", "patient": national("NL", "111222333")},
        record=record(),
        consent=[consent("research_use", "refused", given_at=dt.datetime(2024, 3, 1, 10, 0), form_version="F")],
    )
    assert message.patient.national.issuing_country == "NL"
    assert message.record.onset_date == "2015-09"
    assert message.consent[0].state == ern_registry.v1.common_pb2.CONSENT_STATE_REFUSED
    assert message.consent[0].given_at.ToDatetime() == dt.datetime(2024, 3, 1, 10, 0)


PHENOPACKET = {
    "id": "local-7",
    "subject": {"id": "local-7", "dateOfBirth": "2015-06-17T00:00:00Z", "sex": "FEMALE",
                "vitalStatus": {"status": "ALIVE"}},
    "phenotypicFeatures": [{"type": {"id": "HP:0006528", "label": "Chronic lung disease"}}],
    "diseases": [{"term": {"id": "ORPHA:586", "label": "Cystic fibrosis"},
                  "onset": {"timestamp": "2015-09-02T00:00:00Z"}}],
    "interpretations": [{"id": "i", "progressStatus": "SOLVED",
                         "diagnosis": {"disease": {"id": "ORPHA:586"}}}],
    "metaData": {"externalReferences": [{"id": "ern-registry:diagnosis-date", "description": "2016-03"}]},
}


def test_a_phenopacket_is_stored_as_a_record_and_exported_with_the_pseudonym(physician):
    stored = physician.submit_phenopacket("ERN-LUNG", patient(5), PHENOPACKET, consent=[INCLUSION])
    case = physician.get_case("ERN-LUNG", stored.pseudonym)
    assert case.current.record.diagnosis.orphacode == "ORPHA:586"
    assert case.current.record.onset_date == "2015-09-02"
    assert case.current.record.diagnosis_date == "2016-03"
    exported = list(itertools.islice(physician.export_phenopackets("ERN-LUNG", page_size=2), 3))
    assert len(exported) == 3
    for phenopacket in exported:
        assert phenopacket["subject"]["id"] == phenopacket["id"]
        assert phenopacket["id"].startswith("R013-")


def test_an_unmappable_element_is_reported_by_its_json_path(physician):
    bad = dict(PHENOPACKET, phenotypicFeatures=[{"type": {"id": "HP:0006528"}, "excluded": True}])
    with pytest.raises(ern_registry.InvalidArgument) as raised:
        physician.submit_phenopacket("ERN-LUNG", patient(6), bad, consent=[INCLUSION])
    fields = [v.field for v in raised.value.field_violations]
    assert fields == ["phenopacket.phenotypicFeatures[0].excluded"]


def own_server(tmp_path_factory, physician: str, *serve_args: str):
    """A server of its own, started with ``serve_args``: a physician of NL-UMCU in
    ERN-LUNG named ``physician``. Stop it with ``.stop()``."""
    from conftest import Server

    server = Server(tmp_path_factory.mktemp(physician))
    server.cli("keygen")
    server.cli(
        "admin", "create-centre", "--code", "NL-UMCU", "--name", "UMC Utrecht",
        "--country", "NL", "--ern", "ERN-LUNG",
    )
    server.principal(physician, "physician", "--centre", "NL-UMCU")
    server.start(*serve_args)
    return server


@pytest.fixture(scope="module")
def bulk_server(ern_binary, tmp_path_factory):
    """A server of its own, without the derivation limit: a physician of NL-UMCU."""
    server = own_server(tmp_path_factory, "dr-bulk", "--derivations-per-minute", "1000000")
    yield server
    server.stop()


def test_a_stream_of_small_items_the_server_falls_behind_on_keeps_its_connection(bulk_server):
    """grpcio sends each message of a stream in a DATA frame of its own, and h2 closes a
    connection whose unread small frames pass its budget (GOAWAY "too_many_data_frames").
    With another process holding SQLite's write lock for 3 s, the server falls behind a
    stream of about 8,000 small items: every item is still answered (before the stream
    window was bounded, a defences audit of 2026-12-07 saw the connection closed 0.4 s
    after such a lock was taken)."""
    import sqlite3
    import threading

    def submissions():
        for n in range(8000):
            yield {
                "registry": "ERN-LUNG",
                "patient": national("XT", f"SYN{700_000_000 + n:09d}"),
                "record": {
                    "birthYearMonth": "2015-06",
                    "sex": "SEX_FEMALE",
                    "status": "PATIENT_STATUS_ALIVE",
                    "onsetKind": "ONSET_KIND_UNKNOWN",
                    "diagnosis": {"orphacode": "ORPHA:586"},
                    "diagnosisDate": "2016-03",
                },
                "consent": [consent("registry_inclusion", given_at=dt.date(2024, 3, 1), form_version="F1")],
            }

    sample = submission(next(submissions())).ByteSize()
    assert sample < 170, f"{sample} bytes: too large to fill h2's small-frame budget"
    physician = Client(bulk_server.address, api_key=bulk_server.keys["dr-bulk"])
    physician.submit_case(next(submissions()))  # a valid item (the stream's first: ALREADY_EXISTS)
    held = threading.Event()

    def hold_the_write_lock():
        db = sqlite3.connect(bulk_server.data_dir / "registry.db", timeout=30, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        held.set()
        threading.Event().wait(3)
        db.execute("ROLLBACK")
        db.close()

    locker = threading.Thread(target=hold_the_write_lock)
    locker.start()
    held.wait(30)
    try:
        results = list(physician.submit_cases(submissions(), timeout=300))
    finally:
        locker.join()
        physician.close()
    assert len(results) == 8000
    assert all(r.ok or not isinstance(r.error, ern_registry.Unavailable) for r in results)


@pytest.fixture(scope="module")
def small_messages_server(ern_binary, tmp_path_factory):
    """A server of its own whose messages are at most 8 KiB: a physician of NL-UMCU."""
    server = own_server(tmp_path_factory, "dr-small", "--max-message-bytes", "8192")
    yield server
    server.stop()


def test_an_export_goes_on_past_a_case_too_large_for_one_answer(small_messages_server):
    """A case whose phenopacket alone is over the message limit raises TooLarge at once
    (not RateLimited after retries), naming it; the export goes on from its page_token."""
    server = small_messages_server
    with Client(server.address, api_key=server.keys["dr-small"]) as physician:
        small = {
            physician.submit_case(
                registry="ERN-LUNG", patient=patient(500 + n), record=record(), consent=[INCLUSION]
            ).pseudonym
            for n in range(6)
        }
        findings = [
            {"gene": gene, "variants": [f"NM_000492.4:c.{1000 + i}_{2000 + i}del" for i in range(16)]}
            for gene in ("CFTR", "FBN1", "TP53", "BRCA1")
        ]
        large = physician.submit_case(
            registry="ERN-LUNG",
            patient=patient(600),
            record=record(geneticFindings=findings),
            consent=[INCLUSION],
        ).pseudonym
        seen, token, refused = [], "", []
        while True:
            try:
                for phenopacket in physician.export_phenopackets(
                    "ERN-LUNG", page_size=200, page_token=token
                ):
                    seen.append(phenopacket["subject"]["id"])
                break
            except ern_registry.TooLarge as too_large:
                refused.append(too_large.resource_name)
                token = too_large.page_token
        assert refused == [large]
        assert seen == sorted(small)
