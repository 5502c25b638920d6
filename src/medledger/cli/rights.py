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
    HomeOpt,
    KeyOpt,
    NodeOpt,
    _client,
    _identity,
    _password,
    app,
    audit_app,
    console,
    handle_errors,
    record_app,
)
from medledger.client import Client
from medledger.errors import InvalidInput
from medledger.storage.files import write_private

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
            write_private(pdf, c.request("GET", f"/api/disclosures.pdf?{query}").content)
    write_private(out, orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
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
                    "(repeatable; another organisation's node).")] = [],
                key: Annotated[Path | None, typer.Option(
                    help="Your key file: signs you in at the --against nodes (their "
                    "ledger serves block headers to signed-in users).")] = None) -> None:
    """Check inclusion proofs offline: each event is in its block's audit root, its sealed
    text opens with the key given, and (--against) other nodes hold the same header."""
    from medledger.audit_proof import check_file
    results = check_file(file, against, _identity(key) if key else None)
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


# ---------------------------------------------------------------- onboarding

patient_app = typer.Typer(help="Patients enrolled at this node: activation of imported ones.",
                          no_args_is_help=True)
recovery_app = typer.Typer(help="Key recovery through guardians (k of n).",
                           no_args_is_help=True)
app.add_typer(patient_app, name="patient")
app.add_typer(recovery_app, name="recovery")


def _org_client(home: Path) -> Client:
    from medledger.node.home import Home
    h = Home(home)
    config = h.load_config()
    return Client(config.base_url, h.unlock_org(_password("MEDLEDGER_PASSWORD",
                                                          "organisation keystore password")))


def _save_keystore(c: Client, token: str, out: Path) -> None:
    resp = c.request("GET", "/api/keystore", auth=False,
                     headers={"Authorization": f"Bearer {token}"})
    write_private(out, resp.content)


@patient_app.command("activation-code")
@handle_errors
def activation_code(home: HomeOpt, patient: Annotated[str, typer.Option(help="Patient id.")],
                    valid_days: Annotated[int, typer.Option(help="Days the code is valid.")]
                    = 14,
                    qr: Annotated[Path | None, typer.Option(help="Write the QR code (PNG).")]
                    = None) -> None:
    """Issue a one-time activation code for an imported patient (hand it over in person)."""
    import base64
    with _org_client(home) as c:
        doc = c.post(f"/api/onboarding/{patient}/code", {"valid_days": valid_days})
    console.print(doc["text"])
    console.print(f"valid until {doc['exp']} (epoch s); one use; {doc['url']}")
    if qr is not None:
        # the code opens the patient's account: readable by this user only
        write_private(qr, base64.b64decode(doc["qr_png"] + "=" * (-len(doc["qr_png"]) % 4),
                                           altchars=b"-_"))
        console.print(f"QR code -> {qr}")


@patient_app.command("activate")
@handle_errors
def patient_activate(node: NodeOpt, patient: Annotated[str, typer.Option(help="Your id.")],
                     code: Annotated[str, typer.Option(help="Your activation code.")],
                     out: Annotated[Path | None, typer.Option(
                         help="Save your key file here.")] = None) -> None:
    """Activate your account with the code you were given; choose your password."""
    password = _password("MEDLEDGER_KEY_PASSWORD", "your new password")
    with Client(node) as c:
        doc = c.post("/auth/activate", {"id": patient, "code": code, "password": password},
                     auth=False)
        if out is not None:
            _save_keystore(c, doc["access_token"], out)
    console.print(f"[green]activated[/] {patient}: sign in with your new password"
                  + (f"; key file -> {out}" if out else ""))


# ---------------------------------------------------------------- key recovery

@recovery_app.command("setup")
@handle_errors
def recovery_setup(node: NodeOpt, key: KeyOpt,
                   guardian: Annotated[list[str], typer.Option(
                       "--guardian", help="Organisation or person id (repeatable).")],
                   threshold: Annotated[int, typer.Option(
                       help="Approvals needed to recover (at least 2).")] = 2) -> None:
    """Split your key among guardians, here on your machine; each share is sealed to its
    guardian before it leaves."""
    from medledger.crypto.canonical import b64d, b64e
    from medledger.node.recovery import build_setup
    with _client(node, key) as c:
        assert c.identity is not None
        pubs = {g: b64d(v, field="enc_pub") for g, v in c.get(
            f"/api/recovery/keys?ids={','.join(sorted(set(guardian)))}").items()}
        body, blobs = build_setup(c.identity, pubs, threshold)
        tx = c.sign_tx("recovery.setup", body)
        c.post("/api/recovery/setup", {"tx": b64e(tx.raw),
                                       "shares": {h: b64e(b) for h, b in blobs}})
    console.print(f"[green]recovery set up[/]: any {threshold} of {', '.join(body['guardians'])}")


@recovery_app.command("status")
@handle_errors
def recovery_status(node: NodeOpt, key: KeyOpt) -> None:
    """Your recovery setup and requests; as a guardian, the requests awaiting you."""
    with _client(node, key) as c:
        doc = c.get("/api/recovery")
    setup = doc.get("setup")
    if setup:
        console.print(f"setup: {setup['status']}, {setup['threshold']} of "
                      f"{', '.join(setup['guardians'])}")
    table = Table("request", "patient", "opened by", "status", "approvals", "key fingerprint")
    for r in doc["requests"] + doc["to_approve"]:
        table.add_row(r["id"], r["patient"], r["by"], r["status"],
                      f"{len(r['approved_by'])}/{r['threshold']} {','.join(r['approved_by'])}",
                      r["fingerprint"])
    console.print(table)


@recovery_app.command("request")
@handle_errors
def recovery_request(home: HomeOpt, patient: Annotated[str, typer.Option(help="Patient id.")],
                     enc_pub: Annotated[str | None, typer.Option(
                         help="A base64url X25519 public key made by the patient's own client; "
                              "without it this node holds one under a printed code.")]
                     = None) -> None:
    """Open a recovery request for a patient whose identity you checked in person."""
    with _org_client(home) as c:
        doc = c.post("/api/recovery/requests", {"patient": patient, "enc_pub": enc_pub})
    console.print(f"request {doc['id']} for {patient}, key fingerprint "
                  f"[bold]{doc['fingerprint']}[/] (guardians confirm it with the patient)")
    if doc.get("code"):
        console.print(f"recovery code for the patient (shown once): [bold]{doc['code']}[/]")


@recovery_app.command("approve")
@handle_errors
def recovery_approve(node: NodeOpt, key: KeyOpt,
                     request: Annotated[str, typer.Option(help="Request id.")],
                     fingerprint: Annotated[str, typer.Option(
                         help="The key fingerprint the patient read to you.")]) -> None:
    """As a guardian (your key file, or your organisation's), approve a request: your
    share is opened and re-sealed to the request's key on this machine."""
    from medledger.crypto.canonical import b64d, b64e
    from medledger.node import recovery
    from medledger.storage.blobs import blob_hash
    with _client(node, key) as c:
        assert c.identity is not None
        req = c.get(f"/recovery/requests/{request}/shares", auth=False)["request"]
        if recovery.fingerprint(req["enc_pub"]) != fingerprint.strip().upper():
            raise InvalidInput("the fingerprint does not match this request's key: do not "
                               "approve (someone else may have opened it)")
        sealed = b64d(c.get(f"/api/recovery/share?patient={req['patient']}")["share"],
                      field="share")
        resealed = recovery.reseal(sealed, c.identity, req["patient"], req["enc_pub"])
        tx = c.sign_tx("recovery.approve", {"id": request, "share": blob_hash(resealed)})
        doc = c.post(f"/api/recovery/requests/{request}/approve",
                     {"tx": b64e(tx.raw), "share": b64e(resealed)})
    console.print(f"[green]approved[/] request {request} ({doc['approvals']} approvals)")


@recovery_app.command("keygen")
@handle_errors
def recovery_keygen(patient: Annotated[str, typer.Option(help="Your id.")],
                    out: Annotated[Path, typer.Option(help="Where to keep the request key "
                                                           "(password-protected).")]) -> None:
    """Make a fresh request key on your own machine: give its public half to the
    organisation opening your recovery request; no node ever holds the private half."""
    from medledger.crypto import keys
    from medledger.crypto.canonical import b64e
    from medledger.node.recovery import fingerprint
    eph = keys.new_identity(patient, "recovery")
    keys.save_keystore(out, eph, _password("MEDLEDGER_KEY_PASSWORD", "a password for it"),
                       exclusive=True)
    pub = b64e(eph.enc_public)
    console.print(f"request key -> {out}\npublic key (for `recovery request --enc-pub`): "
                  f"{pub}\nfingerprint (read it to your guardians): [bold]{fingerprint(pub)}[/]")


@recovery_app.command("finish")
@handle_errors
def recovery_finish(node: NodeOpt, patient: Annotated[str, typer.Option(help="Your id.")],
                    request: Annotated[str, typer.Option(help="Request id.")],
                    code: Annotated[str | None, typer.Option(
                        help="The recovery code you were given (a node-held request).")]
                    = None,
                    request_key: Annotated[Path | None, typer.Option(
                        help="Your request key from `recovery keygen` (recovers here, on "
                             "your machine).")] = None,
                    out: Annotated[Path | None, typer.Option(
                        help="Save your key file here.")] = None) -> None:
    """Recover your key once enough guardians approved; choose a new password."""
    if (code is None) == (request_key is None):
        raise InvalidInput("give either --code (the node holds the request key) or "
                           "--request-key (you do)")
    if request_key is not None:
        _finish_locally(node, patient, request, request_key, out)
        return
    password = _password("MEDLEDGER_KEY_PASSWORD", "your new password")
    with Client(node) as c:
        doc = c.post("/auth/recover", {"id": patient, "request": request, "code": code,
                                       "password": password}, auth=False)
        if out is not None:
            _save_keystore(c, doc["access_token"], out)
    console.print(f"[green]recovered[/] the key of {patient}"
                  + (f"; key file -> {out}" if out else ""))


def _finish_locally(node: str, patient: str, request: str, request_key: Path,
                    out: Path | None) -> None:
    from medledger.crypto import keys
    from medledger.crypto.canonical import b64d
    from medledger.node.recovery import recover_identity
    eph = keys.load_keystore(request_key, _password("MEDLEDGER_REQUEST_KEY_PASSWORD",
                                                    "request key password"))
    target = out or Path(f"{patient}.key.json")
    with Client(node) as c:
        doc = c.get(f"/recovery/requests/{request}/shares", auth=False)
        req = doc["request"]
        if req["patient"] != patient:
            raise InvalidInput(f"request {request} is for {req['patient']}, not {patient}")
        if len(req["approvals"]) < req["threshold"]:
            raise InvalidInput(f"{len(req['approvals'])} of {req['threshold']} guardian "
                               "approvals so far")
        identity = recover_identity(req, {g: b64d(v, field="share")
                                          for g, v in doc["shares"].items()},
                                    eph.enc_private, doc["keys"])
        keys.save_keystore(target, identity, _password("MEDLEDGER_KEY_PASSWORD",
                                                       "your new password"))
        c.identity = identity
        c.submit_tx("recovery.complete", {"id": request})
    console.print(f"[green]recovered[/] the key of {patient} on this machine; key file -> "
                  f"{target}")
