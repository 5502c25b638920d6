"""medledger.client: which answers are retried, with what waits (the node is replaced by
an httpx mock transport that answers from a script and records what it was sent)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from medledger.client import Client, NodeError


def _client(answers: list[httpx.Response], sent: list[httpx.Request],
            waits: list[float], monkeypatch: pytest.MonkeyPatch) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answers.pop(0)

    c = Client("http://node.test", retries=3, retry_backoff_s=0.5)
    c.http = httpx.Client(base_url=c.base_url, transport=httpx.MockTransport(handler))
    monkeypatch.setattr("medledger.client.time.sleep", waits.append)
    return c


def _busy(retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(503, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "transient", "diagnostics": "busy"}]}, headers=headers)


def test_a_read_waits_the_retry_after_the_node_names(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []
    waits: list[float] = []
    ok = httpx.Response(200, json={"resourceType": "Bundle", "total": 1})
    c = _client([_busy("2"), _busy("120"), ok], sent, waits, monkeypatch)
    assert c.request("GET", "/fhir/Observation?code=x", auth=False).json()["total"] == 1
    assert len(sent) == 3 and waits == [2.0, 30.0]  # 120 s is capped
    assert all("idempotency-key" not in r.headers for r in sent)


def test_a_read_503_without_retry_after_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []
    waits: list[float] = []
    c = _client([_busy(None)], sent, waits, monkeypatch)
    with pytest.raises(NodeError) as err:
        c.request("GET", "/fhir/Patient/p1", auth=False)
    assert err.value.status == 503 and len(sent) == 1 and waits == []


def test_a_write_retries_with_the_same_key_and_backs_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []
    waits: list[float] = []
    created: dict[str, Any] = {"resourceType": "Observation", "id": "o1"}
    c = _client([_busy(None), _busy("3"), httpx.Response(201, json=created)], sent, waits,
                monkeypatch)
    assert c.request("POST", "/fhir/Observation", {"resourceType": "Observation"},
                     auth=False).json()["id"] == "o1"
    keys = {r.headers["idempotency-key"] for r in sent}
    assert len(sent) == 3 and len(keys) == 1  # one key: a retry cannot create a second
    assert waits == [0.5, 3.0]  # no Retry-After: the back-off; then the node's 3 s


def test_retries_run_out_with_the_last_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []
    waits: list[float] = []
    c = _client([_busy("1")] * 4, sent, waits, monkeypatch)
    with pytest.raises(NodeError) as err:
        c.request("GET", "/fhir/Observation", auth=False)
    assert err.value.status == 503 and "busy" in str(err.value)
    assert len(sent) == 4 and waits == [1.0, 1.0, 1.0]


def test_a_retry_after_that_is_not_seconds_falls_back_to_the_back_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []
    waits: list[float] = []
    ok = httpx.Response(200, json={"resourceType": "Bundle", "total": 0})
    # an HTTP-date (RFC 9110 allows it) and garbage: neither is waited for as named
    c = _client([_busy("Wed, 21 Oct 2026 07:28:00 GMT"), _busy("-3"), ok], sent, waits,
                monkeypatch)
    assert c.request("GET", "/fhir/Observation", auth=False).json()["total"] == 0
    assert waits == [0.5, 1.0]
