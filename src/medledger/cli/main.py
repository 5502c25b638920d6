"""The ``medledger`` command line (Typer + rich). Commands are thin: parse, call, print."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medledger.cli.common import (
    HomeOpt,
    KeyOpt,
    NodeOpt,
    _client,
    _password,
    _print_json,
    app,
    audit_app,
    consent_app,
    console,
    err_console,
    handle_errors,
    node_app,
    prac_app,
    record_app,
)
from medledger.client import Client
from medledger.crypto.canonical import loads
from medledger.errors import InvalidInput
from medledger.storage.files import write_private

# ---------------------------------------------------------------- init / node

@app.command()
@handle_errors
def init(home: HomeOpt, org_id: Annotated[str, typer.Option(help="Organisation id.")],
         org_name: Annotated[str, typer.Option(help="Organisation name.")],
         chain: Annotated[str, typer.Option(help="Chain id.")] = "medledger-local",
         port: Annotated[int, typer.Option(help="API port.")] = 8700,
         genesis: Annotated[Path | None, typer.Option(help="Join an existing genesis file.")]
         = None,
         retention: Annotated[list[str], typer.Option(
             "--retention", help="Keep a category at least this long before it may be "
             "erased, e.g. conditions=10y (repeatable; units y, d, h, s). Default: none. "
             "Fixed at genesis.")] = []) -> None:
    """Create a node home: org keys (password-protected) and genesis."""
    from medledger.cli.rights import print_retention
    from medledger.node.erasure import parse_retention
    from medledger.node.home import init_home
    rules = parse_retention(retention)
    if rules and genesis:
        raise InvalidInput("--retention applies to a new chain; a joined genesis has its own")
    password = _password("MEDLEDGER_PASSWORD", "new organisation keystore password")
    gen = orjson.loads(genesis.read_bytes()) if genesis else None
    h = init_home(home, org_id, org_name, password, chain=chain, port=port, genesis=gen,
                  retention=rules)
    console.print(f"[green]created[/] {h.path} for [bold]{org_id}[/] on chain "
                  f"[bold]{h.load_config().chain}[/]")
    print_retention(h.load_genesis().get("retention") or {})


@node_app.command("start")
@handle_errors
def node_start(home: HomeOpt, host: Annotated[str | None, typer.Option()] = None,
               port: Annotated[int | None, typer.Option()] = None,
               tls_cert: Annotated[Path | None, typer.Option(
                   help="PEM certificate (chain): serve HTTPS; session cookies are Secure.")]
               = None,
               tls_key: Annotated[Path | None, typer.Option(
                   help="PEM private key of --tls-cert.")] = None) -> None:
    """Run the node (API + block production) in the foreground."""
    import logging

    import uvicorn

    from medledger.api.app import create_app
    from medledger.node.home import is_loopback
    from medledger.node.network import check_network_config
    from medledger.node.runtime import open_node
    from medledger.node.startcheck import start_check
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("give both --tls-cert and --tls-key (or neither)")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise InvalidInput(f"{path} is not a readable file")
    node = open_node(str(home), _password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    if host:
        node.config.host = host
    if port:
        node.config.port = port
    if node.config.mode == "cometbft":  # a config error is one line here, not a traceback
        check_network_config(node)
    if tls_cert is None and not is_loopback(node.config.host):
        err_console.print(f"[bold yellow]warning:[/] serving plain HTTP on "
                          f"{node.config.host}: passwords, tokens and keystores would cross "
                          "the network in clear; give --tls-cert/--tls-key, or keep the node "
                          "on 127.0.0.1 behind a TLS-terminating proxy (listed in config "
                          "trusted_proxies, so the login throttle sees each client)")
    if tls_cert is not None and not node.config.public_url:
        # the URL actually served: token audience, share links, FHIR base
        node.config.public_url = f"https://{node.config.host}:{node.config.port}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                        "%(message)s")
    started = time.perf_counter()
    report = start_check(node)
    if report is None:
        err_console.print(f"[bold red]REFUSING TO SERVE:[/] {node.integrity_failure}")
    else:
        console.print(f"start check: {report.summary()} in {time.perf_counter() - started:.2f}s")
    console.print(f"medledger node [bold]{node.org.id}[/] at {node.config.base_url} "
                  f"(mode {node.config.mode}, height {node.store.height})")
    uvicorn.run(create_app(node), host=node.config.host, port=node.config.port,
                log_level="warning", loop="uvloop", http="httptools", server_header=False,
                # the login throttle counts the client's address: X-Forwarded-For names
                # it only when a configured proxy sent it (uvicorn's default believes
                # any local client, which could then claim a new address per guess)
                proxy_headers=bool(node.config.trusted_proxies),
                forwarded_allow_ips=node.config.trusted_proxies or None,
                ssl_certfile=str(tls_cert) if tls_cert else None,
                ssl_keyfile=str(tls_key) if tls_key else None)


@app.command()
@handle_errors
def verify(home: HomeOpt) -> None:
    """Re-check the whole ledger: signatures, hash links, Merkle roots, replayed state."""
    from medledger.node.home import Home
    from medledger.node.verify import verify_blobs, verify_store
    from medledger.storage.blobs import BlobStore
    from medledger.storage.sqlite import SqliteStore
    h = Home(home)
    h.load_config()
    store = SqliteStore(h.db_path)
    start = time.perf_counter()
    with Progress(TextColumn("verifying"), BarColumn(), TextColumn("block {task.completed:,}"
                  "/{task.total:,}"), TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task("verify", total=max(store.height, 1))
        report = verify_store(store, lambda h_, top: bar.update(task, completed=h_))
    took = time.perf_counter() - start
    console.print(f"[green]OK[/] {report.blocks:,} blocks, {report.txs:,} txs "
                  f"({report.bytes / 1e6:.1f} MB), {report.audit_events:,} audit events, "
                  f"{report.state_keys:,} state keys verified in {took:.2f}s "
                  f"({report.txs / max(took, 1e-9):,.0f} tx/s)")
    blobs = verify_blobs(store, BlobStore(h.blobs_path))
    console.print(f"[green]OK[/] {blobs.held:,} sealed blobs re-hashed; "
                  f"{blobs.erased:,} erased versions hold no content here")
    if blobs.missing:
        shown = ", ".join(blobs.missing[:5]) + (" …" if len(blobs.missing) > 5 else "")
        console.print(f"[yellow]{len(blobs.missing):,} record versions have not been "
                      f"replicated to this node yet[/]: {shown}")


# ---------------------------------------------------------------- practitioners

@prac_app.command("add")
@handle_errors
def practitioner_add(home: HomeOpt, id: Annotated[str, typer.Option(help="Practitioner id.")],
                     role: Annotated[str, typer.Option(help="physician, nurse, psychiatrist, "
                                                             "admin-clerk")],
                     out: Annotated[Path | None, typer.Option(help="Write keystore here.")]
                     = None) -> None:
    """Register a practitioner of this node's organisation (node must be running)."""
    from medledger.node.home import Home
    h = Home(home)
    config = h.load_config()
    org = h.unlock_org(_password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    password = _password("MEDLEDGER_KEY_PASSWORD", "new practitioner keystore password")
    with Client(config.base_url, org) as c:
        doc = c.post("/admin/practitioners", {"id": id, "role": role, "password": password})
    target = out or Path(f"{id}.key.json")
    write_private(target, orjson.dumps(doc["keystore"]))
    console.print(f"[green]registered[/] {id} ({role}) at {config.org_id}; keystore -> {target}")


@prac_app.command("remove")
@handle_errors
def practitioner_remove(home: HomeOpt, id: Annotated[str, typer.Option(
                            help="Practitioner id.")],
                        reason: Annotated[str, typer.Option(
                            help="left, key-compromised, deceased, duplicate or other")]
                        = "left") -> None:
    """Deactivate a practitioner of this organisation: their key signs nothing more and
    their tokens stop working at once, on every node (node must be running)."""
    from medledger.node.home import Home
    h = Home(home)
    config = h.load_config()
    org = h.unlock_org(_password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    with Client(config.base_url, org) as c:
        doc = c.post(f"/admin/practitioners/{id}/remove", {"reason": reason})
    console.print(f"[green]removed[/] {doc['id']} ({doc['reason']}): now {doc['status']}")


# ---------------------------------------------------------------- records

@record_app.command("put")
@handle_errors
def record_put(node: NodeOpt, key: KeyOpt, file: Annotated[Path, typer.Argument()]) -> None:
    """POST a FHIR resource or transaction Bundle from a JSON file."""
    doc = loads(file.read_bytes())
    if not isinstance(doc, dict):
        raise InvalidInput(f"{file} must hold one FHIR resource or Bundle (a JSON object)")
    with _client(node, key) as c:
        if doc.get("resourceType") == "Bundle":
            _print_json(c.post("/fhir", doc))
        else:
            resp = c.request("POST", f"/fhir/{doc.get('resourceType')}", doc)
            _print_json(resp.json())
            secret = resp.headers.get("x-medledger-enrollment-secret")
            if secret:
                err_console.print(f"patient enrolment secret (give it to the patient): {secret}")


@record_app.command("get")
@handle_errors
def record_get(node: NodeOpt, key: KeyOpt, path: Annotated[str, typer.Argument(
               help="FHIR path, e.g. Observation/123 or Observation?patient=p1")],
               break_glass: Annotated[str | None, typer.Option(
                   help="Emergency access: the reason (audited, patient notified).")] = None
               ) -> None:
    """GET a FHIR path (read, vread, history, search, $everything)."""
    headers = {"X-Break-Glass-Reason": break_glass} if break_glass else None
    with _client(node, key) as c:
        _print_json(c.get("/fhir/" + path.lstrip("/"), headers=headers))


@record_app.command("export")
@handle_errors
def record_export(node: NodeOpt, key: KeyOpt,
                  out: Annotated[Path, typer.Option(help="Bundle file to write.")]
                  = Path("my-records.json"),
                  patient: Annotated[str | None, typer.Option(
                      help="Patient id (must be the key's owner).")] = None) -> None:
    """Fetch and decrypt your complete record with your own key, from any node."""
    with _client(node, key) as c:
        assert c.identity is not None
        if patient is not None and patient != c.identity.id:
            raise InvalidInput(f"the key belongs to {c.identity.id}, not {patient}: only a "
                               "patient's own key decrypts their records")
        resources = c.export_records()
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:medledger:{r['resourceType']}/{r['id']}",
                         "resource": r} for r in sorted(resources, key=lambda r: (
                             r["resourceType"], r["id"]))]}
    write_private(out, orjson.dumps(bundle, option=orjson.OPT_INDENT_2))  # PHI: 0600
    console.print(f"[green]exported[/] {len(resources)} records (decrypted locally) -> {out}")


# ---------------------------------------------------------------- consent

def _consent(node: str, key: Path, decision: str, categories: list[str], labels: list[str],
             orgs: list[str], actors: list[str], days: int | None) -> None:
    import uuid
    with _client(node, key) as c:
        assert c.identity is not None
        now = int(time.time())
        body = {"id": str(uuid.uuid4()), "patient": c.identity.id, "decision": decision,
                "categories": categories, "labels": labels, "orgs": orgs, "actors": actors,
                "start": now - 60, "end": now + days * 86400 if days else None}
        res = c.submit_tx("consent.put", body)
    console.print(f"[green]{decision}[/] consent {body['id']} committed at height "
                  f"{res['height']}")


CatOpt = Annotated[list[str], typer.Option("--category", help="Data category (repeatable).")]
LabelOpt = Annotated[list[str], typer.Option("--label", help="Sensitivity label, e.g. PSY.")]
OrgOpt = Annotated[list[str], typer.Option("--org", help="Organisation id (repeatable).")]
ActorOpt = Annotated[list[str], typer.Option("--practitioner", help="Practitioner id.")]
DaysOpt = Annotated[int | None, typer.Option(help="Valid for this many days.")]


@consent_app.command("grant")
@handle_errors
def consent_grant(node: NodeOpt, key: KeyOpt, category: CatOpt = [], label: LabelOpt = [],
                  org: OrgOpt = [], practitioner: ActorOpt = [], days: DaysOpt = None) -> None:
    """Permit access (signed with your own key)."""
    _consent(node, key, "permit", category, label, org, practitioner, days)


@consent_app.command("restrict")
@handle_errors
def consent_restrict(node: NodeOpt, key: KeyOpt, category: CatOpt = [], label: LabelOpt = [],
                     org: OrgOpt = [], practitioner: ActorOpt = [], days: DaysOpt = None) -> None:
    """Deny access (signed with your own key)."""
    _consent(node, key, "deny", category, label, org, practitioner, days)


@consent_app.command("revoke")
@handle_errors
def consent_revoke(node: NodeOpt, key: KeyOpt, consent_id: Annotated[str, typer.Argument()]
                   ) -> None:
    """Withdraw one of your consents."""
    with _client(node, key) as c:
        assert c.identity is not None
        res = c.submit_tx("consent.revoke", {"patient": c.identity.id, "id": consent_id})
    console.print(f"[green]revoked[/] {consent_id} at height {res['height']}")


@consent_app.command("list")
@handle_errors
def consent_list(node: NodeOpt, key: KeyOpt) -> None:
    """Your consents."""
    with _client(node, key) as c:
        rules = c.get("/api/consents")
    table = Table("id", "decision", "status", "categories", "labels", "orgs", "practitioners",
                  "end")
    for r in rules:
        table.add_row(r["id"][:8], r["decision"], r["status"], ",".join(r["categories"]),
                      ",".join(r["labels"]), ",".join(r["orgs"]), ",".join(r["actors"]),
                      str(r["end"] or ""))
    console.print(table)


# ---------------------------------------------------------------- audit

@audit_app.command("log")
@handle_errors
def audit_log(node: NodeOpt, key: KeyOpt, count: int = 50) -> None:
    """Who accessed your records, when and why."""
    with _client(node, key) as c:
        events = c.get(f"/api/access-log?count={count}")
    table = Table("when", "who", "role", "org", "what", "outcome", "why")
    for ev in events:
        style = "bold red" if ev.get("break_glass") else None
        who = ev.get("detail") if ev.get("subtype") == "share-access" else None  # sealed
        table.add_row(ev["recorded"][:19], who or ev["agent"], ev.get("agent_role", ""),
                      ev.get("agent_org", ""), ev.get("subtype", ""),
                      "ok" if ev.get("outcome") == "0" else "denied",
                      ev.get("reason") or ev.get("basis", ""), style=style)
    console.print(table)


from medledger.cli import demo as _demo  # noqa: E402,F401  (registers `demo`)
from medledger.cli import index as _index  # noqa: E402
from medledger.cli import keys as _keys  # noqa: E402
from medledger.cli import net as _net  # noqa: E402
from medledger.cli import org as _org  # noqa: E402
from medledger.cli import rights as _rights  # noqa: E402,F401  (registers rights commands)
from medledger.cli import share as _share  # noqa: E402,F401  (registers `share ...`)

app.add_typer(_net.net_app, name="net")
app.add_typer(_org.org_app, name="org")
app.add_typer(_keys.key_app, name="key")
app.add_typer(_index.index_app, name="index")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
