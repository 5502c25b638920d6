"""Patient-rights commands: ``record erase``, ``audit disclosures`` / ``audit prove``,
``patient activation-code`` / ``patient activate``, ``recovery ...``.

Thin: parse options, sign what the patient must sign with their own key, call the
node, print. ``main`` imports this module so its commands register.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medledger.cli.common import (
    KeyOpt,
    NodeOpt,
    _client,
    audit_app,
    console,
    handle_errors,
    record_app,
)
from medledger.errors import InvalidInput

# ---------------------------------------------------------------- erasure


def erase_parameters(basis: str, records: list[str], category: str | None, all_: bool,
                     signed_tx: str | None = None) -> dict[str, Any]:
    """The ``$erase`` Parameters resource for these options."""
    params: list[dict[str, Any]] = [{"name": "basis", "valueCode": basis}]
    params += [{"name": "record", "valueString": r} for r in records]
    if category:
        params.append({"name": "category", "valueCode": category})
    if all_:
        params.append({"name": "all", "valueBoolean": True})
    if signed_tx:
        params.append({"name": "signedTx", "valueBase64Binary": signed_tx})
    return {"resourceType": "Parameters", "parameter": params}


def _scope(records: list[str], category: str | None, all_: bool) -> dict[str, Any]:
    if sum(bool(x) for x in (records, category, all_)) != 1:
        raise InvalidInput("give exactly one of --record (repeatable), --category or --all")
    if records:
        return {"records": sorted(set(records))}
    return {"category": category} if category else {"all": True}


@record_app.command("erase")
@handle_errors
def record_erase(node: NodeOpt, key: KeyOpt,
                 basis: Annotated[str, typer.Option(
                     help="Legal basis: consent-withdrawn, no-longer-necessary, objection, "
                          "unlawful-processing, legal-obligation, retention-expired.")],
                 record: Annotated[list[str], typer.Option(
                     "--record", help="Record to erase, Type/id (repeatable).")] = [],
                 category: Annotated[str | None, typer.Option(
                     help="Erase every record of this category.")] = None,
                 all_: Annotated[bool, typer.Option("--all", help="Erase every record.")]
                 = False,
                 patient: Annotated[str | None, typer.Option(
                     help="Patient id (an organisation key acting on a documented "
                          "request); default: the key's owner.")] = None,
                 yes: Annotated[bool, typer.Option("--yes", help="Do not ask to confirm.")]
                 = False) -> None:
    """Erase records by crypto-shredding: every node deletes their content for good."""
    from medledger.crypto.canonical import b64e
    scope = _scope(record, category, all_)
    with _client(node, key) as c:
        assert c.identity is not None
        who = patient or c.identity.id
        if c.identity.kind == "patient" and who != c.identity.id:
            raise InvalidInput(f"the key belongs to {c.identity.id}, not {who}")
        what = (", ".join(scope["records"]) if "records" in scope else
                f"every {scope['category']} record" if "category" in scope else
                "EVERY record")
        if not yes:
            if not sys.stdin.isatty():
                raise InvalidInput("erasure cannot be undone: confirm with --yes")
            typer.confirm(f"Erase {what} of {who} on every node? This cannot be undone",
                          abort=True)
        signed = None
        if c.identity.kind == "patient":  # the patient's own signature, made here
            tx = c.sign_tx("record.erase", {"patient": who, "basis": basis, **scope})
            signed = b64e(tx.raw)
        doc = c.post(f"/fhir/Patient/{who}/$erase",
                     erase_parameters(basis, scope.get("records", []), scope.get("category"),
                                      bool(scope.get("all")), signed))
    out = {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
           for p in doc["parameter"] if p["name"] != "record"}
    console.print(f"[green]erased[/] {out['versionsErased']} versions of {who} "
                  f"({out['basis']}) in tx {out['transaction'][:16]}… at height "
                  f"{out.get('height', '?')}; every node deletes their content")


def retention_table(rules: dict[str, int]) -> Table | str:
    if not rules:
        return ("retention: none (every erasure request is honoured at once; set rules "
                "with --retention CATEGORY=DURATION)")
    table = Table("category", "kept at least", title="retention rules (fixed at genesis)")
    for cat, secs in sorted(rules.items()):
        table.add_row(cat, f"{secs // 86400} days" if secs >= 86400 else f"{secs} s")
    return table


def print_retention(rules: dict[str, int]) -> None:
    console.print(retention_table(rules))





# ---------------------------------------------------------------- accounting of disclosures

DISCLOSURES_FILE = Path("disclosures.json")

@audit_app.command("disclosures")
@handle_errors
def audit_disclosures(node: NodeOpt, key: KeyOpt,
                      start: Annotated[str | None, typer.Option(
                          help="From this date (YYYY-MM-DD); default six years ago.")] = None,
                      end: Annotated[str | None, typer.Option(
                          help="Up to this date, inclusive; default now.")] = None,
                      out: Annotated[Path, typer.Option(
                          help="Save the FHIR Bundle (with proofs) here.")]
                      = DISCLOSURES_FILE,
                      pdf: Annotated[Path | None, typer.Option(
                          help="Also save the printable PDF here.")] = None) -> None:
    """Your accounting of disclosures: who outside your care saw what, when and why."""
    from urllib.parse import urlencode

    import orjson
    query = urlencode({k: v for k, v in (("start", start), ("end", end)) if v})
    with _client(node, key) as c:
        assert c.identity is not None
        bundle = c.get(f"/fhir/Patient/{c.identity.id}/$disclosures?{query}")
        if pdf is not None:
            pdf.write_bytes(c.request("GET", f"/api/disclosures.pdf?{query}").content)
    out.write_bytes(orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
    table = Table("when", "kind", "recipient", "what", "purpose", "block")
    for e in bundle.get("entry", []):
        r = e["resource"]
        ext = {x["url"].rsplit("/", 1)[-1]: x for x in r.get("extension", [])}
        table.add_row(r["recorded"][:19], ext["disclosure-kind"]["valueCode"],
                      r["agent"][0]["who"]["display"],
                      ", ".join(x["what"]["reference"] for x in r.get("entity", [])[1:3]),
                      (r.get("purposeOfEvent") or [{}])[0].get("coding", [{}])[0].get(
                          "code", ""),
                      str(ext.get("anchored-height", {}).get("valueInteger", "pending")))
    console.print(table)
    console.print(f"{bundle.get('total', 0)} disclosures -> {out}"
                  + (f" and {pdf}" if pdf else "")
                  + f"; check them with: medledger audit prove --file {out}")


@audit_app.command("prove")
@handle_errors
def audit_prove(file: Annotated[Path, typer.Option(
                    help="A Bundle from `audit disclosures` (or one proof JSON).")],
                against: Annotated[list[str], typer.Option(
                    "--against", help="Also check each block header at this node "
                    "(repeatable; another organisation's node).")] = []) -> None:
    """Check inclusion proofs offline: each event is in its block's audit root, its sealed
    text opens with the key given, and (--against) other nodes hold the same header."""
    from medledger.audit_proof import check_file
    results = check_file(file, against)
    table = Table("event", "recorded", "block", "proof", "sealed text", "other nodes")
    for r in results:
        table.add_row(r.event_id[:8], r.recorded[:19], str(r.height),
                      "[green]ok[/]" if r.proof_ok else "[red]FAILED[/]",
                      r.text, r.against)
    console.print(table)
    bad = [r for r in results if not r.ok]
    console.print(f"{len(results) - len(bad)} of {len(results)} proofs verified")
    if bad:
        raise typer.Exit(1)
