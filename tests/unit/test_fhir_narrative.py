"""FHIR narrative (txt-1, txt-2) and string rules: active content, malformed XHTML, control
characters and deep nesting are refused with a 400-class ``InvalidInput`` naming the path."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.errors import InvalidInput
from medledger.fhir.narrative import (
    MAX_DEPTH,
    _certainly_clean,
    _walk,
    check_resource_content,
    check_xhtml,
)
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.fhir.validate import parse_resource

NS = 'xmlns="http://www.w3.org/1999/xhtml"'


def _obs(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
            "subject": {"reference": "Patient/p1"}, **extra}


def _div(inner: str, attrs: str = NS) -> dict[str, str]:
    return {"status": "generated", "div": f"<div {attrs}>{inner}</div>"}


GOOD = [
    "<p>Pulse <b>72</b>/min</p>",
    '<table class="grid"><tr><th scope="col">a</th></tr><tr><td colspan="2">b</td></tr></table>',
    '<a href="https://example.org/x">link</a> <a name="top">anchor</a>',
    '<img src="#pic1" alt="x"/>',
    '<span style="color: red" xml:lang="en" lang="en">red</span>',
    '<ul><li>one</li></ul><pre>  x</pre><a href="#top">up</a>',
]

BAD = [
    ("<script>alert(1)</script>x", "<script>"),
    ('<img src="x" onerror="alert(1)"/>', "onerror"),
    ('<a href="javascript:alert(1)">x</a>', "javascript:"),
    ('<a href=" JaVa&#9;Script:alert(1)">x</a>', "scheme"),
    ('<a href="data:text/html,x">x</a>', "data:"),
    ('<p style="background: url(https://evil.example/t.png)">x</p>', "style"),
    ("<iframe>x</iframe>", "<iframe>"),
    ("<form>x</form>", "<form>"),
    ("<object>x</object>", "<object>"),
    ('<svg xmlns="http://www.w3.org/2000/svg"><text>x</text></svg>', "namespace"),
    ("<style>p {}</style>x", "<style>"),
    ('<p xmlns:x="urn:x" x:foo="1">x</p>', "foo"),
]


@pytest.mark.parametrize("inner", GOOD)
def test_allowed_narrative(inner: str) -> None:
    parsed = parse_resource(_obs(text=_div(inner)))
    assert parsed["text"]["div"].startswith("<div")


@pytest.mark.parametrize(("inner", "needle"), BAD)
def test_active_content_refused(inner: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_resource(_obs(text=_div(inner)))
    assert "Observation.text.div" in str(err.value)
    assert needle.lower() in str(err.value).lower()


@pytest.mark.parametrize(("div", "needle"), [
    ("<div>no namespace</div>", "namespace"),
    (f"<p {NS}>not a div</p>", "<p>"),
    (f"<div {NS}>unclosed", "well-formed"),
    ("plain text", "well-formed"),
    (f'<!DOCTYPE x [<!ENTITY e "boom">]><div {NS}>&e;</div>', "well-formed"),
    (f"<div {NS}>   </div>", "txt-2"),
    (f"<div {NS}><p> </p></div>", "txt-2"),
])
def test_malformed_or_empty_narrative(div: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_xhtml(div, "Observation.text.div")
    assert needle.lower() in str(err.value).lower()


def test_image_only_narrative_has_content() -> None:
    check_xhtml(f'<div {NS}><img src="#a" alt=""/></div>')


def test_narrative_in_contained_resource() -> None:
    contained = {"resourceType": "Patient", "id": "c1", "text": _div("<script>x</script>y")}
    with pytest.raises(InvalidInput) as err:
        parse_resource(_obs(contained=[contained]))
    assert "contained[0].text.div" in str(err.value)


@pytest.mark.parametrize("text", ["a\x00b", "bell\x07", "esc\x1b[31m"])
def test_control_characters_refused(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_resource(_obs(code={"text": text}))
    assert "control character" in str(err.value) and "Observation.code.text" in str(err.value)


def test_tab_newline_allowed() -> None:
    assert parse_resource(_obs(code={"text": "a\tb\r\nc"}))["code"]["text"] == "a\tb\r\nc"


def test_control_character_in_key_refused() -> None:
    with pytest.raises(InvalidInput, match="control character"):
        parse_resource(_obs(**{"x\x00": 1}))


def _nested_extension(levels: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "http://x.example/e", "valueString": "v"}
    for _ in range(levels):
        ext = {"url": "http://x.example/e", "extension": [ext]}
    return ext


def test_deep_nesting_refused() -> None:
    with pytest.raises(InvalidInput, match=f"more than {MAX_DEPTH} levels"):
        parse_resource(_obs(extension=[_nested_extension(200)]))


def test_reasonable_nesting_accepted() -> None:
    parse_resource(_obs(extension=[_nested_extension(MAX_DEPTH // 2 - 3)]))


def _full_walk_passes(resource: dict[str, Any]) -> bool:
    try:
        _walk(resource, "")
    except InvalidInput:
        return False
    return True


def _chain(depth: int, leaf: Any, via_list: bool) -> dict[str, Any]:
    """A resource whose innermost container sits ``depth`` levels deep (the resource
    itself is level 1), reached through objects or through arrays of objects."""
    node: Any = leaf
    level = depth
    while level > 1:
        if via_list and level > 2 and isinstance(node, dict):
            node, level = {"a": [node]}, level - 2
        else:
            node, level = {"a": node}, level - 1
    return {"resourceType": "Basic", **node} if isinstance(node, dict) else node


@pytest.mark.parametrize("depth", range(MAX_DEPTH - 3, MAX_DEPTH + 4))
@pytest.mark.parametrize("leaf", [{"v": "x"}, ["x", "y"], {"v": ["x"]}])
@pytest.mark.parametrize("via_list", [False, True])
def test_quick_proof_agrees_with_the_full_walk_at_the_depth_limit(
        depth: int, leaf: Any, via_list: bool) -> None:
    resource = _chain(depth, leaf, via_list)
    assert _certainly_clean(resource) == _full_walk_passes(resource)
    if not _full_walk_passes(resource):
        with pytest.raises(InvalidInput, match=f"more than {MAX_DEPTH} levels"):
            check_resource_content(resource)


@pytest.mark.parametrize("text", ["C:\\build\\u0041", "\\bword\\f", "a\x7fb", "tab\there",
                                  "é ✓ 🙂"])
def test_quick_proof_never_clears_what_the_full_walk_refuses(text: str) -> None:
    for resource in ({"resourceType": "Basic", "note": [{"text": text}]},
                     {"resourceType": "Basic", f"k{text}": 1},
                     {"resourceType": "Basic", "text": {"status": "generated",
                                                        "div": f"<div>{text}</div>"}}):
        assert not _certainly_clean(resource) or _full_walk_passes(resource)
    for char in [chr(i) for i in range(32) if i not in (9, 10, 13)]:
        bad = {"resourceType": "Basic", "a": [{"b": {f"k{char}": text}}]}
        assert not _certainly_clean(bad) and not _full_walk_passes(bad)
        bad = {"resourceType": "Basic", "a": [{"b": [f"{text}{char}"]}]}
        assert not _certainly_clean(bad) and not _full_walk_passes(bad)


def test_quick_proof_takes_ordinary_resources_and_leaves_narratives_to_the_walk() -> None:
    bundle = synthetic_patient_bundle(3, n_encounters=3)
    resources = [e["resource"] for e in bundle["entry"]]
    assert not any(_certainly_clean(r) for r in resources if "div" in r.get("text", {}))
    plain = [{k: v for k, v in r.items() if k != "text"} for r in resources]
    assert all(_certainly_clean(r) for r in plain)
    with_div = {**plain[0], "text": {"status": "generated",
                                     "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                                            "<script>x</script></div>"}}
    assert not _certainly_clean(with_div)
    with pytest.raises(InvalidInput, match="script"):
        check_resource_content(with_div)
