"""Retries with backoff on UNAVAILABLE and RESOURCE_EXHAUSTED, and RetryInfo."""

import datetime as dt
import socket

import grpc
import pytest

import ern_registry
from ern_registry import NO_RETRY, Client, RetryPolicy, call_with_retries
from google.rpc import error_details_pb2, status_pb2
from google.protobuf import duration_pb2

from conftest import Server


class FakeError(grpc.RpcError, grpc.Call):
    """A grpc error as the channel raises it, with google.rpc details."""

    def __init__(self, code, message="", details=()):
        self._code, self._message = code, message
        status = status_pb2.Status(code=code.value[0], message=message)
        for d in details:
            status.details.add().Pack(d)
        self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return None

    def add_callback(self, callback):
        return None


def retry_info(seconds):
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))


def run(outcomes, policy=RetryPolicy(), timeout=None, retry_on=None):
    """call_with_retries over a scripted sequence of errors/values; records the pauses."""
    pauses, calls = [], []
    now = [0.0]

    def attempt(remaining):
        calls.append(remaining)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(seconds):
        pauses.append(seconds)
        now[0] += seconds

    result = call_with_retries(
        attempt, policy, timeout, retry_on=retry_on, sleep=sleep, clock=lambda: now[0]
    )
    return result, pauses, calls


def test_unavailable_is_retried_with_growing_backoff():
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE, "down")
    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, multiplier=2.0, max_backoff=10)
    result, pauses, _ = run([unavailable, unavailable, unavailable, "ok"], policy)
    assert result == "ok"
    assert len(pauses) == 3
    for pause, cap in zip(pauses, [1.0, 2.0, 4.0]):
        assert cap / 2 <= pause <= cap


def test_the_retry_info_delay_is_waited_out():
    limited = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [retry_info(7)])
    result, pauses, _ = run([limited, "ok"])
    assert result == "ok" and pauses == [7.0]


def test_retries_stop_at_the_deadline_and_share_it():
    limited = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [retry_info(30)])
    with pytest.raises(ern_registry.RateLimited) as raised:
        run([limited, "ok"], timeout=10)
    assert raised.value.retry_delay == dt.timedelta(seconds=30)
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    _, pauses, calls = run([unavailable, "ok"], RetryPolicy(initial_backoff=2.0), timeout=10)
    assert calls[0] == 10 and calls[1] == pytest.approx(10 - pauses[0])


def test_other_codes_and_the_last_attempt_are_not_retried():
    invalid = FakeError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        [error_details_pb2.BadRequest(field_violations=[{"field": "registry", "description": "x"}])],
    )
    with pytest.raises(ern_registry.InvalidArgument) as raised:
        run([invalid, "ok"])
    assert raised.value.field_violations == [ern_registry.FieldViolation("registry", "x")]
    unavailable = FakeError(grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(ern_registry.Unavailable):
        run([unavailable] * 2, RetryPolicy(max_attempts=2, initial_backoff=0))
    # Writes are retried only on RESOURCE_EXHAUSTED.
    with pytest.raises(ern_registry.Unavailable):
        run([unavailable, "ok"], retry_on=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))


def test_a_server_that_is_not_there_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with Client(f"127.0.0.1:{port}", api_key="ern_x.y", retry=policy, timeout=20) as client:
        with pytest.raises(ern_registry.Unavailable):
            client.count_patients("ERN-LUNG")


@pytest.fixture(scope="module")
def limited_server(ern_binary, tmp_path_factory):
    """Research limited to 60 queries a minute: a burst of 60, then one a second."""
    server = Server(tmp_path_factory.mktemp("limited"))
    server.cli("keygen")
    server.principal("dr-limit", "researcher", "--ern", "ERN-LUNG")
    server.start("--research-queries-per-minute", "60")
    yield server
    server.stop()


def test_rate_limited_calls_carry_the_delay_and_are_retried(limited_server):
    key = limited_server.keys["dr-limit"]
    with Client(limited_server.address, api_key=key, retry=NO_RETRY) as client:
        with pytest.raises(ern_registry.RateLimited) as raised:
            for _ in range(1000):
                client.count_patients("ERN-LUNG")
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dt.timedelta(0) < raised.value.retry_delay <= dt.timedelta(seconds=60)
    # The default policy waits the delay out and gets the answer.
    with Client(limited_server.address, api_key=key) as client:
        assert list(client.count_patients("ERN-LUNG").index) == ["total"]


def test_a_page_over_the_message_limit_is_too_large_and_not_retried():
    info = error_details_pb2.ErrorInfo(
        reason="PHENOPACKET_OVER_MESSAGE_LIMIT",
        domain="ern-registry",
        metadata={"page_token": "R013-V001-ABC"},
    )
    resource = error_details_pb2.ResourceInfo(resource_type="case", resource_name="R013-V001-ABC")
    too_large = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large", [info, resource])
    with pytest.raises(ern_registry.TooLarge) as raised:
        run([too_large, "ok"])
    assert raised.value.page_token == "R013-V001-ABC"
    assert raised.value.resource_name == "R013-V001-ABC"
    assert not isinstance(raised.value, ern_registry.RateLimited)
    # A rate limit is still retried.
    limited = FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", [retry_info(1)])
    assert run([limited, "ok"])[0] == "ok"


def test_the_channel_receives_answers_of_any_size_unless_told(monkeypatch):
    """The server bounds its answers; grpcio's 4 MiB default would refuse a larger one as
    RESOURCE_EXHAUSTED, which reads as a rate limit. A limit the caller gives is kept."""
    seen = []

    def channel(target, options=None):
        seen.append(dict(options or []))
        return grpc.insecure_channel.__wrapped__(target, options=options)

    channel.__wrapped__ = grpc.insecure_channel
    monkeypatch.setattr(grpc, "insecure_channel", channel)
    Client("127.0.0.1:9", api_key="k").close()
    Client("127.0.0.1:9", api_key="k", options=[("grpc.max_receive_message_length", 1024)]).close()
    assert seen[0]["grpc.max_receive_message_length"] == -1
    assert seen[1]["grpc.max_receive_message_length"] == 1024
