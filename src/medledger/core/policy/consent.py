"""Patient consent rules (FHIR Consent semantics): which rules apply to an actor, a record
and a moment. Rules are ``consent/{patient}/{id}`` state entries (``core.machine``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def applies_to_actor(rule: dict[str, Any], actor: dict[str, Any]) -> bool:
    actors, orgs = rule.get("actors") or [], rule.get("orgs") or []
    if not actors and not orgs:
        return True
    return actor["id"] in actors or actor.get("org") in orgs


def applies_to_record(rule: dict[str, Any], category: str, labels: Iterable[str]) -> bool:
    cats, labs = rule.get("categories") or [], rule.get("labels") or []
    if not cats and not labs:
        return True
    return category in cats or bool(set(labs) & set(labels))


def in_force(rule: dict[str, Any], now_s: int) -> bool:
    if rule.get("status") != "active":
        return False
    start, end = rule.get("start"), rule.get("end")
    return (start is None or start <= now_s) and (end is None or now_s < end)


def matching_consents(rules: list[dict[str, Any]], actor: dict[str, Any], category: str,
                      labels: Iterable[str], now_s: int, decision: str) -> list[dict[str, Any]]:
    labels = list(labels)
    return [r for r in rules
            if r["decision"] == decision and in_force(r, now_s)
            and applies_to_actor(r, actor) and applies_to_record(r, category, labels)]


def label_permitted(rules: list[dict[str, Any]], actor: dict[str, Any], category: str,
                    label: str, now_s: int) -> dict[str, Any] | None:
    """A permit naming ``label`` (or the record's category) for this actor, if any."""
    for r in rules:
        if (r["decision"] == "permit" and in_force(r, now_s) and applies_to_actor(r, actor)
                and (label in (r.get("labels") or []) or category in (r.get("categories") or []))):
            return r
    return None
