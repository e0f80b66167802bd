"""The broker's load shedding: past its in-flight limit a request gets 503 with Retry-After
at once (node reports from half the limit), and the client hears BackendUnavailable."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from colocate.broker.replies import raise_for_reply
from colocate.broker.service import LoadShedder
from colocate.errors import BackendUnavailable


def test_past_the_limit_requests_get_503_with_retry_after_and_reports_go_first() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()

        async def app(scope: Any, receive: Any, send: Any) -> None:  # a handler that takes a while
            await gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        shedder = LoadShedder(app, max_in_flight=4, shed_first="/v1/nodes/")

        async def call(method: str, path: str) -> list[dict[str, Any]]:
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await shedder(
                {"type": "http", "method": method, "path": path, "headers": []}, receive, send
            )
            return sent

        held = [asyncio.create_task(call("POST", "/v1/leases")) for _ in range(2)]
        await asyncio.sleep(0)
        # two in flight: a node report (shed from 2) gets 503 at once, a lease request does not
        report = await asyncio.wait_for(call("PUT", "/v1/nodes/n1"), 1)
        assert report[0]["status"] == 503
        assert (b"retry-after", b"1") in report[0]["headers"]
        body = json.loads(report[1]["body"])
        assert body["error"] == "BackendUnavailable" and "retry after 1 s" in body["message"]
        with pytest.raises(BackendUnavailable, match="at capacity"):
            raise_for_reply(503, body, "broker http://b")
        held += [asyncio.create_task(call("POST", "/v1/leases")) for _ in range(2)]
        await asyncio.sleep(0)
        over = await asyncio.wait_for(call("POST", "/v1/leases"), 1)  # the fifth lease request
        assert over[0]["status"] == 503
        health = asyncio.create_task(call("GET", "/healthz"))  # never shed
        await asyncio.sleep(0)
        gate.set()
        for sent in await asyncio.gather(*held, health):
            assert sent[0]["status"] == 200
        assert shedder.in_flight == 0 and shedder.shed == 2
        served = await asyncio.wait_for(call("PUT", "/v1/nodes/n1"), 1)  # below the limit again
        assert served[0]["status"] == 200

    asyncio.run(scenario())
