"""``medledger share``: create (client-side, with the patient's key), list, revoke, open."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import httpx
import orjson
import typer
from rich.table import Table

from medledger.cli.common import (
    KeyOpt,
    NodeOpt,
    _client,
    console,
    handle_errors,
    share_app,
)
from medledger.crypto.canonical import b64e
from medledger.errors import Gone, InvalidInput, NotFound, Unauthenticated, Unavailable
from medledger.fhir import shl
from medledger.node import shares
from medledger.node.audit import iso_now
from medledger.storage.files import write_private

_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_duration(text: str) -> int:
    m = _DURATION.match(text.strip())
    if not m:
        raise InvalidInput(f"duration {text!r} must look like 30m, 12h or 7d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@share_app.command("create")
@handle_errors
def share_create(node: NodeOpt, key: KeyOpt,
                 category: Annotated[list[str], typer.Option("--category")] = [],
                 type: Annotated[list[str], typer.Option("--type")] = [],
                 id: Annotated[list[str], typer.Option("--id", help="Type/id")] = [],
                 expires: Annotated[str, typer.Option(help="e.g. 30m, 12h, 7d")] = "7d",
                 passcode: Annotated[str | None, typer.Option()] = None,
                 label: Annotated[str, typer.Option()] = "",
                 qr: Annotated[Path | None, typer.Option(help="Write a QR code (.png/.svg).")]
                 = None) -> None:
    """Share chosen records for a limited time; everything else stays private."""
    with _client(node, key) as c:
        assert c.identity is not None
        chosen = shares.select(c.export_heads(),
                               {"categories": category, "types": type, "ids": id})
        exp = int(time.time()) + parse_duration(expires)
        body, jwe, link = shares.build_share(c.identity.id, chosen, node.rstrip("/"),
                                             iso_now(), exp, passcode, label,
                                             c.get("/ledger/status", auth=False)["org"])
        tx = c.sign_tx("share.create", body)
        c.post("/api/shares/publish", {"tx": b64e(tx.raw), "jwe": jwe, "passcode": passcode,
                                       "label": label, "recipient": ""})
    console.print(f"[green]share created[/], {len(chosen)} records, "
                  f"expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(exp))}")
    if qr:
        # the link carries the key to the shared records: readable by this user only
        write_private(qr, shl.qr_svg(link).encode() if qr.suffix == ".svg"
                      else shl.qr_png(link))
        console.print(f"QR code -> {qr}")
    typer.echo(link)


@share_app.command("list")
@handle_errors
def share_list(node: NodeOpt, key: KeyOpt) -> None:
    """Your share links."""
    with _client(node, key) as c:
        grants = c.get("/api/shares")
    table = Table("id", "label", "records", "expires", "passcode", "state")
    now = time.time()
    for g in grants:
        state = "revoked" if g["revoked"] else ("expired" if g["exp"] and g["exp"] <= now
                                                else "active")
        table.add_row(g["id"], g["label"], str(len(g["records"])),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(g["exp"]))
                      if g["exp"] else "never", "yes" if g["has_passcode"] else "no", state)
    console.print(table)


@share_app.command("revoke")
@handle_errors
def share_revoke(node: NodeOpt, key: KeyOpt, share_id: Annotated[str, typer.Argument()]) -> None:
    """Revoke a share link: refused on every node from the next block."""
    with _client(node, key) as c:
        res = c.submit_tx("share.revoke", {"id": share_id})
    console.print(f"[green]revoked[/] {share_id} at height {res['height']}")


def open_link(link: str, recipient: str, passcode: str | None) -> dict:  # type: ignore[type-arg]
    """Follow a shlink: manifest request, then decrypt the embedded JWE."""
    payload = shl.decode_shlink(link)
    if payload.is_expired(int(time.time())):
        raise Gone("this share link has expired (exp in the link)")
    try:
        resp = httpx.post(payload.url, json={"recipient": recipient, "passcode": passcode},
                          timeout=30)
    except httpx.HTTPError as exc:
        raise Unavailable(f"cannot reach {payload.url}: {exc}") from exc
    if resp.status_code == 401:
        raise Unauthenticated(resp.json().get("error", "passcode required"))
    if resp.status_code == 404:
        raise NotFound("no such share link")
    if resp.status_code >= 400:
        issues = resp.json().get("issue", [{}])
        raise (Gone if resp.status_code == 410 else InvalidInput)(
            issues[0].get("diagnostics", resp.text))
    files = resp.json()["files"]
    bundle = orjson.loads(shl.decrypt_jwe(files[0]["embedded"], payload.key_bytes))
    return bundle  # type: ignore[no-any-return]


@share_app.command("open")
@handle_errors
def share_open(link: Annotated[str, typer.Argument(help="shlink:/... or viewer URL")],
               recipient: Annotated[str, typer.Option(help="Who you are (audited).")],
               passcode: Annotated[str | None, typer.Option()] = None,
               out: Annotated[Path, typer.Option()] = Path("shared-records.json")) -> None:
    """Open a share link as a recipient and save the decrypted FHIR Bundle."""
    bundle = open_link(link, recipient, passcode)
    write_private(out, orjson.dumps(bundle, option=orjson.OPT_INDENT_2))  # PHI: 0600
    console.print(f"[green]opened[/] {len(bundle.get('entry', []))} records -> {out}")
