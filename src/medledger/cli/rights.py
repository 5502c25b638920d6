"""Patient-rights commands: ``record erase``, ``audit disclosures`` / ``audit prove``,
``patient activation-code`` / ``patient activate``, ``recovery ...``.

Thin: parse options, sign what the patient must sign with their own key, call the
node, print. ``main`` imports this module so its commands register.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from medledger.cli.common import (
    KeyOpt,
    NodeOpt,
    _client,
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



