"""``medledger org``: governance — describe an organisation, propose it, approve it, list.

A joining organisation runs ``medledger init --genesis <network genesis>`` and
``medledger org describe`` to hand its public keys to the members; one member
proposes it (``org propose``), the others approve (``org approve``); it becomes an
active member — and, with a validator key, a CometBFT validator — once a majority
of the active members has approved. Every step is a tx signed by an organisation key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medledger.cli.common import (
    HomeOpt,
    NodeOpt,
    _password,
    _print_json,
    console,
    err_console,
    handle_errors,
)
from medledger.client import Client
from medledger.crypto.canonical import loads
from medledger.errors import InvalidInput
from medledger.node.home import Home, org_genesis_entry

org_app: typer.Typer = typer.Typer(help="Organisations: join the network by members' approval.",
                                   no_args_is_help=True)


NodeUrlOpt = Annotated[str | None, typer.Option(
    "--node", help="Submit through this node (default: the home's own node).")]


def _org_client(home: Path, node: str | None) -> tuple[Client, str]:
    h = Home(home)
    config = h.load_config()
    org = h.unlock_org(_password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    return Client(node or config.base_url, org), org.id


def _validator_pub(cometbft_home: Path | None) -> bytes | None:
    if cometbft_home is None:
        return None
    path = cometbft_home / "config" / "priv_validator_key.json"
    try:
        doc = json.loads(path.read_text())
        import base64
        return base64.b64decode(doc["pub_key"]["value"])
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidInput(f"cannot read a validator key from {path}: {exc}") from exc


@org_app.command("describe")
@handle_errors
def describe(home: HomeOpt,
             cometbft_home: Annotated[Path | None, typer.Option(
                 help="This org's CometBFT home, to include its validator key and p2p "
                      "node id (members' nodes admit only members' nodes as peers).")]
             = None) -> None:
    """Print this organisation's public descriptor (give it to the network's members)."""
    from medledger.consensus import cometbft
    h = Home(home)
    h.load_config()
    org = h.unlock_org(_password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    validator = _validator_pub(cometbft_home)  # a clear error if the home is not one
    node_id = cometbft.node_id(cometbft_home) if cometbft_home is not None else None
    _print_json(org_genesis_entry(org, str(org.meta.get("name") or org.id), validator,
                                  node_id=node_id))


@org_app.command("propose")
@handle_errors
def propose(home: HomeOpt, descriptor: Annotated[Path, typer.Argument(
        help="The joining org's descriptor (from `medledger org describe`).")],
            node: NodeUrlOpt = None) -> None:
    """Propose a new member organisation (signed by this node's organisation)."""
    entry: Any = loads(descriptor.read_bytes())
    if not isinstance(entry, dict):
        raise InvalidInput(f"{descriptor} must hold an organisation descriptor object")
    client, me = _org_client(home, node)
    with client:
        res = client.submit_tx("org.propose", {"org": entry})
    console.print(f"[green]{me} proposed {entry.get('id')}[/]: now {res['data']} "
                  f"(height {res['height']})")
    if not entry.get("node_ids"):
        err_console.print(f"[yellow]note:[/] {entry.get('id')} names no CometBFT node (its "
                          "descriptor was made without --cometbft-home): where the ledger "
                          "names its members' nodes (as `net` does), peers will not admit "
                          f"its node until {entry.get('id')} runs `medledger org nodes`")


@org_app.command("approve")
@handle_errors
def approve(home: HomeOpt, org_id: Annotated[str, typer.Argument()],
            node: NodeUrlOpt = None) -> None:
    """Approve a proposed organisation (signed by this node's organisation)."""
    client, me = _org_client(home, node)
    with client:
        res = client.submit_tx("org.approve", {"org_id": org_id})
    console.print(f"[green]{me} approved {org_id}[/]: now {res['data']} (height {res['height']})")


@org_app.command("nodes")
@handle_errors
def nodes(home: HomeOpt, node_ids: Annotated[list[str], typer.Argument(
        help="Every CometBFT node id of this organisation (`cometbft show-node-id`): "
             "the list replaces the one on the ledger.")],
          node: NodeUrlOpt = None) -> None:
    """Name this organisation's CometBFT nodes: members' nodes admit only these as peers
    (a replacement machine, or a second node, must be named before it can sync)."""
    client, me = _org_client(home, node)
    ids = sorted({i.strip().lower() for i in node_ids})
    with client:
        res = client.submit_tx("org.nodes", {"node_ids": ids})
    console.print(f"[green]{me} names {res['data']} node(s)[/] (height {res['height']}): "
                  + ", ".join(ids))


@org_app.command("rewrap")
@handle_errors
def rewrap(home: HomeOpt, org_id: Annotated[str, typer.Argument(
        help="The organisation that joined after records were sealed.")]) -> None:
    """Give a newly joined member the keys of records sealed before it joined."""
    client, me = _org_client(home, None)
    with client:
        res = client.post("/admin/rewrap", {"org": org_id})
    console.print(f"[green]{me} re-wrapped {res['rewrapped']} record versions[/] to {org_id}")


@org_app.command("list")
@handle_errors
def list_orgs(node: NodeOpt, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The network's organisations, their status and approvals."""
    with Client(node) as c:
        orgs = c.get("/ledger/orgs", auth=False)
    if as_json:
        _print_json(orgs)
        return
    table = Table("id", "name", "status", "approvals", "validator")
    for o in orgs:
        table.add_row(o["id"], o["name"], o["status"], ",".join(o.get("approvals") or []),
                      "yes" if o.get("validator_pub") or o.get("validator") else "no")
    console.print(table)

