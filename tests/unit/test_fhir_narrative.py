"""FHIR narrative (txt-1, txt-2) and string rules: active content, malformed XHTML, control
characters and deep nesting are refused with a 400-class ``InvalidInput`` naming the path."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.errors import InvalidInput
from medledger.fhir.narrative import MAX_DEPTH, check_xhtml
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
