"""Content rules every incoming FHIR resource must meet before model validation.

This module owns three checks on a parsed (untrusted) resource, run in one walk:

* **Nesting depth**: at most ``MAX_DEPTH`` nested objects/arrays (a 200-deep
  ``extension`` chain must be a 400, not a ``RecursionError`` deep in a model).
* **Strings**: no C0 control characters other than tab, CR and LF, in values or
  keys (FHIR ``string``: "SHOULD not contain Unicode character points below 32
  except u0009, u000D and u000A"; NUL and friends break XML, logs and viewers).
* **Narrative** (``text.div``, the xhtml type): well-formed XML parsed with
  ``defusedxml`` (no DTD, no entities), root ``<div>`` in the XHTML namespace, only
  the basic HTML formatting elements and attributes the spec allows (invariant
  txt-1: no script, style element, form, object, iframe, no ``on*`` event
  attributes, ``href``/``src`` only to safe URL schemes, no ``url()`` or
  ``expression`` in ``style``), and some non-whitespace content (txt-2).

Pure: no I/O. Every failure is an ``InvalidInput`` naming the element path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import orjson
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from medledger.errors import InvalidInput

__all__ = ["MAX_DEPTH", "check_resource_content", "check_xhtml"]

MAX_DEPTH = 100
XHTML_NS = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")

# HTML 4.0 chapters 7-11 (without 9.4, ins/del) and 15, plus <a> and <img> (FHIR
# Narrative, txt-1); the list the FHIR reference validator accepts
ALLOWED_ELEMENTS = frozenset({
    "p", "br", "div", "h1", "h2", "h3", "h4", "h5", "h6", "a", "span", "b", "em", "i",
    "strong", "small", "big", "tt", "dfn", "q", "var", "abbr", "acronym", "cite",
    "blockquote", "hr", "address", "bdo", "kbd", "sub", "sup", "ul", "ol", "li", "dl",
    "dt", "dd", "pre", "table", "caption", "colgroup", "col", "thead", "tr", "tfoot",
    "tbody", "th", "td", "code", "samp", "img", "map", "area",
})
GLOBAL_ATTRIBUTES = frozenset({"id", "class", "style", "title", "lang", "dir", "accesskey",
                               "tabindex"})
ELEMENT_ATTRIBUTES: dict[str, frozenset[str]] = {
    "a": frozenset({"href", "name", "hreflang", "rel", "rev", "shape", "coords", "type"}),
    "img": frozenset({"src", "alt", "longdesc", "height", "width", "usemap", "ismap",
                      "border", "hspace", "vspace", "align"}),
    "area": frozenset({"href", "alt", "shape", "coords", "nohref"}),
    "map": frozenset({"name"}),
    "blockquote": frozenset({"cite"}), "q": frozenset({"cite"}),
    "ol": frozenset({"type", "start", "compact"}), "ul": frozenset({"type", "compact"}),
    "li": frozenset({"type", "value"}),
    "table": frozenset({"summary", "width", "border", "frame", "rules", "cellspacing",
                        "cellpadding", "align"}),
    "col": frozenset({"span", "width", "align", "char", "charoff", "valign"}),
    "colgroup": frozenset({"span", "width", "align", "char", "charoff", "valign"}),
    "th": frozenset({"abbr", "axis", "headers", "scope", "rowspan", "colspan", "align",
                     "char", "charoff", "valign", "width", "height", "nowrap"}),
    "td": frozenset({"abbr", "axis", "headers", "scope", "rowspan", "colspan", "align",
                     "char", "charoff", "valign", "width", "height", "nowrap"}),
    "tr": frozenset({"align", "char", "charoff", "valign"}),
    "thead": frozenset({"align", "char", "charoff", "valign"}),
    "tbody": frozenset({"align", "char", "charoff", "valign"}),
    "tfoot": frozenset({"align", "char", "charoff", "valign"}),
    "p": frozenset({"align"}), "div": frozenset({"align"}), "hr": frozenset({"align", "size",
                                                                             "width"}),
    "pre": frozenset({"width"}), "br": frozenset({"clear"}),
}
URL_ATTRIBUTES = frozenset({"href", "src", "cite", "longdesc", "usemap"})
_SAFE_SCHEMES = ("http:", "https:", "mailto:", "tel:", "urn:")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:")
_STYLE_ACTIVE = re.compile(r"url\s*\(|expression\s*\(|@import|javascript:|behavior\s*:",
                           re.IGNORECASE)


def check_resource_content(resource: Mapping[str, Any], where: str = "") -> None:
    """Depth, control characters and every ``text.div`` of ``resource`` (contained
    resources and Bundle entries included). Raises ``InvalidInput``.

    Most resources take the quick proof (:func:`_certainly_clean`, ~1/5 of the cost);
    the rest, and every error with its element path, take the full walk."""
    if not _certainly_clean(resource):
        _walk(resource, where)


def _walk(resource: Mapping[str, Any], where: str) -> None:
    """Every check, element by element, naming the path of the first failure."""
    root = where or str(resource.get("resourceType") or "resource")
    stack: list[tuple[Any, str, int, bool]] = [(resource, root, 1, False)]
    while stack:
        value, path, depth, in_text = stack.pop()
        if isinstance(value, Mapping):
            if depth > MAX_DEPTH:
                raise InvalidInput(f"{path}: nested more than {MAX_DEPTH} levels deep")
            for key, item in value.items():
                _check_string(str(key), f"{path} (a key)")
                child = f"{path}.{key}"
                if in_text and key == "div":
                    if not isinstance(item, str):
                        raise InvalidInput(f"{child} must be an XHTML string")
                    check_xhtml(item, child)
                stack.append((item, child, depth + 1, key == "text"))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise InvalidInput(f"{path}: nested more than {MAX_DEPTH} levels deep")
            stack.extend((item, f"{path}[{i}]", depth + 1, False)
                         for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)


# orjson writes C0 controls as \u00XX, or \b and \f (\t, \n, \r are allowed); a
# backslash in the text itself can make these match too often (then the full walk
# decides), never too rarely
_ESCAPED_CONTROLS = (b"\\u00", b"\\b", b"\\f")


def _certainly_clean(resource: Mapping[str, Any]) -> bool:
    """True only if ``resource`` certainly passes: no control character in any key or
    string (searched in its JSON, one C call), nesting within ``MAX_DEPTH``, and no
    narrative to check. False means "not proven", never "invalid"."""
    if not isinstance(resource, dict):
        return False
    try:
        data = orjson.dumps(resource)
    except TypeError:  # a type JSON cannot hold, a lone surrogate: the full walk says
        return False
    if any(marker in data for marker in _ESCAPED_CONTROLS):
        return False
    return _shallow_enough(resource, 1)


def _shallow_enough(value: dict[str, Any], depth: int) -> bool:
    """Depths as the full walk counts them (an object or array one deeper than its
    container); False also where a narrative ``div`` waits to be checked."""
    if depth > MAX_DEPTH:
        return False
    for key, item in value.items():
        if isinstance(item, dict):
            if key == "text" and "div" in item or not _shallow_enough(item, depth + 1):
                return False
        elif isinstance(item, list):
            if depth + 1 > MAX_DEPTH:
                return False
            for element in item:
                if isinstance(element, dict):
                    if not _shallow_enough(element, depth + 2):
                        return False
                elif isinstance(element, list):
                    return False  # arrays of arrays are not FHIR: the full walk decides
    return True


def _check_string(value: str, path: str) -> None:
    found = _CONTROL.search(value)
    if found:
        raise InvalidInput(f"{path}: control character U+{ord(found.group()):04X} is not "
                           "allowed in FHIR strings (only tab, CR and LF)")


def check_xhtml(div: str, path: str = "Narrative.div") -> None:
    """Validate one narrative ``div`` against the FHIR xhtml rules (txt-1, txt-2)."""
    try:
        root = fromstring(div, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ParseError, DefusedXmlException) as exc:
        raise InvalidInput(f"{path} is not well-formed XHTML: {exc}") from None
    if root.tag != f"{{{XHTML_NS}}}div":
        raise InvalidInput(f"{path} must be a <div> in the XHTML namespace ({XHTML_NS}), "
                           f"got <{_local(root.tag)}>")
    for element in root.iter():
        _check_element(element, path)
    has_text = "".join(root.itertext()).strip() != ""
    if not has_text and root.find(f".//{{{XHTML_NS}}}img") is None:
        raise InvalidInput(f"{path} has no content: the narrative must contain some "
                           "non-whitespace text or an image (txt-2)")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _check_element(element: Element, path: str) -> None:
    tag = element.tag
    if not isinstance(tag, str) or not tag.startswith(f"{{{XHTML_NS}}}"):
        raise InvalidInput(f"{path}: element <{_local(str(tag))}> is not in the XHTML namespace")
    name = _local(tag)
    if name not in ALLOWED_ELEMENTS:
        raise InvalidInput(f"{path}: element <{name}> is not allowed in a FHIR narrative "
                           "(only basic HTML formatting, links and images; txt-1)")
    allowed = GLOBAL_ATTRIBUTES | ELEMENT_ATTRIBUTES.get(name, frozenset())
    for attr, value in element.attrib.items():
        if attr == f"{{{XML_NS}}}lang":
            continue
        if attr.startswith("{") or attr not in allowed:
            raise InvalidInput(f"{path}: attribute {_local(attr)!r} is not allowed on "
                               f"<{name}> in a FHIR narrative (txt-1)")
        if attr in URL_ATTRIBUTES:
            _check_url(value, f"{path}: <{name} {attr}>", image=name == "img")
        elif attr == "style" and _STYLE_ACTIVE.search(value):
            raise InvalidInput(f"{path}: <{name} style> may not load or run anything "
                               "(url(), expression(), @import)")


def _check_url(value: str, where: str, *, image: bool) -> None:
    # browsers ignore whitespace and control characters inside a scheme ("java\tscript:")
    squeezed = re.sub(r"[\x00-\x20]", "", value).lower()
    scheme = _SCHEME.match(squeezed)
    if scheme is None:  # relative reference or fragment (#id)
        return
    if squeezed.startswith(_SAFE_SCHEMES):
        return
    if image and squeezed.startswith("data:image/") and not squeezed.startswith(
            "data:image/svg"):
        return
    raise InvalidInput(f"{where}: URL scheme {scheme.group()!r} is not allowed "
                       "(http, https, mailto, tel, urn, relative or #fragment)")
