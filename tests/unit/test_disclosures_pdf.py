"""node.disclosures.render_pdf: names and reasons in any script DejaVu Sans covers print
as written (the PDF maps their glyphs back to the same characters), not as "?"."""

from __future__ import annotations

import re
import zlib

from medledger.node.disclosures import render_pdf


def _streams(pdf: bytes) -> bytes:
    """Every stream of the PDF, inflated where it is compressed."""
    out = []
    for raw in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            out.append(zlib.decompress(raw))
        except zlib.error:
            out.append(raw)
    return b"\n".join(out)


def test_non_latin_names_keep_their_characters() -> None:
    entry = {"date": "2026-12-01T10:00:00Z", "recipient": "Ζωή Παπαδοπούλου",
             "role": "physician", "recipient_org": "org-b", "what": ["Observation/o1"],
             "purpose": "TREAT", "reason": "Überweisung", "kind": "outside",
             "anchored_height": 3}
    pdf = render_pdf([entry], "Жанна Петрова", ("2026-01-01T00:00:00Z",
                                                 "2026-12-02T00:00:00Z"),
                     "org-a", "2026-12-02T00:00:00Z")
    assert pdf.startswith(b"%PDF-") and b"DejaVuSans" in pdf
    cmap = _streams(pdf).upper()
    # the ToUnicode map of the embedded font names Ж (U+0416), Ζ (U+0396) and Ü (U+00DC)
    for codepoint in (b"0416", b"0396", b"00DC"):
        assert b"<" + codepoint + b">" in cmap, codepoint
    assert b"?" * 4 not in _streams(pdf)  # the Latin-1 fallback printed "????"
