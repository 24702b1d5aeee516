"""The committed stubs are what grpcio-tools makes of proto/ now."""

import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("generate_stubs", HERE.parent / "generate_stubs.py")
generate_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate_stubs)


def test_committed_stubs_match_the_proto_files():
    assert generate_stubs.differences() == [], (
        "the stubs drifted from proto/: run python clients/python/generate_stubs.py"
    )


def test_a_changed_proto_would_be_noticed(tmp_path, monkeypatch):
    # The check compares against freshly generated stubs: a proto with one more field
    # gives different stubs, so the comparison would fail.
    proto = tmp_path / "proto"
    (proto / "ern_registry" / "v1").mkdir(parents=True)
    for p in (generate_stubs.PROTO / "ern_registry" / "v1").glob("*.proto"):
        text = p.read_text()
        if p.name == "case.proto":
            text = text.replace("message GetCaseRequest {", "message GetCaseRequest {\n  string extra = 99;")
        (proto / "ern_registry" / "v1" / p.name).write_text(text)
    monkeypatch.setattr(generate_stubs, "PROTO", proto)
    assert generate_stubs.differences() == ["differs from proto/: case_pb2.py", "differs from proto/: case_pb2.pyi"]


def test_the_stubs_are_the_package_the_client_imports():
    from ern_registry.v1 import case_pb2, research_pb2

    assert case_pb2.DESCRIPTOR.package == "ern_registry.v1"
    assert "CountPatients" in research_pb2.DESCRIPTOR.services_by_name["ResearchService"].methods_by_name
