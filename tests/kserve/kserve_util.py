"""Helpers of the KServe v2 tests: /v1/rank's answer to compare with, catalogue ids."""

from __future__ import annotations


def v1_rank(live, user: str, items: list[int], events: list[dict] = ()) -> dict[int, dict]:
    """/v1/rank's items by catalogue id, best first: {"score": ..., "probabilities": {...}}."""
    r = live.http.post("/v1/rank", json={"user": user, "candidates": [{"item": i} for i in items],
                                         "events": list(events)})
    assert r.status_code == 200, r.text
    return {i["item"]: i for i in r.json()["items"]}


def items_of(live, *dense: int) -> list[int]:
    """Catalogue ids of dense item ids."""
    return [live.raw_item(d) for d in dense]
