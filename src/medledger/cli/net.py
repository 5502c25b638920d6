"""``medledger net``: run a local n-validator CometBFT network of medledger nodes.

Thin commands over ``medledger.node.network``: ``up`` creates (first time) and starts
every member detached, ``status`` shows what each member reports, ``stop``/``start``
take one member down or back (a crash with ``--kill``), ``down`` stops them all.
The layout and process ids live in ``<dir>/network.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medledger.cli.common import console, err_console, handle_errors
from medledger.errors import Unavailable
from medledger.node import network

net_app: typer.Typer = typer.Typer(help="A local multi-node network on CometBFT.",
                                   no_args_is_help=True)

DEFAULT_PASSWORD = "network-password"
DirOpt = Annotated[Path, typer.Option("--dir", help="Network directory.")]
MemberArg = Annotated[str, typer.Argument(help="Member: index (0-based) or org id.")]


def _password() -> str:
    value = os.environ.get("MEDLEDGER_PASSWORD")
    if value:
        return value
    console.print(f"organisation keystore password: [bold]{DEFAULT_PASSWORD}[/] "
                  "(set MEDLEDGER_PASSWORD to choose another)")
    return DEFAULT_PASSWORD


def _status_table(net: network.Network) -> bool:
    """Print the status table; True if every member is serving."""
    rows = network.network_status(net)
    table = Table("node", "org", "API URL", "height", "app hash", "serving?", "CometBFT",
                  "consensus", title=f"medledger network {net.chain} ({net.dir})")
    hashes: dict[int, set[str]] = {}
    for r in rows:
        if r.height is not None:
            hashes.setdefault(r.height, set()).add(r.app_hash)
    all_ok = True
    for r in rows:
        m = r.member
        if not r.node_running:
            serving = "[red]stopped[/]"
        elif r.serving is None:
            serving = "[yellow]starting / unreachable[/]"
        elif not r.serving:
            serving = f"[bold red]REFUSING[/] {r.problem}"
        else:
            serving = "[green]yes[/]" + (f" [yellow]({r.problem})[/]" if r.problem else "")
        all_ok = all_ok and bool(r.serving) and r.comet_running
        if r.height is not None and len(hashes.get(r.height, ())) > 1:
            serving += " [bold red]app hash differs from a peer at this height[/]"
            all_ok = False
        comet = (f"up h={r.consensus_height}" if r.comet_running and r.consensus_height
                 is not None else "up" if r.comet_running else "[red]down[/]")
        consensus = "-" if not r.serving else "[green]committing[/]" if not r.consensus \
            else "[bold red]NO QUORUM[/]" if r.consensus.startswith("no quorum") \
            else "[bold red]NOT COMMITTING[/]"
        all_ok = all_ok and not r.consensus
        table.add_row(str(m.index), m.org_id, m.api_url,
                      "-" if r.height is None else str(r.height),
                      (r.app_hash[:16] + "…") if r.app_hash else "-", serving, comet, consensus)
    console.print(table)
    for r in rows:  # the reasons in full, one line each (they name the missing validators)
        if r.serving and r.consensus:
            console.print(f"[bold]{r.member.org_id}[/]: {r.consensus}", soft_wrap=True)
    return all_ok


@net_app.command("up")
@handle_errors
def up(dir: DirOpt = Path(".net"),
       nodes: Annotated[int, typer.Option(help="Validators (one organisation each).")] = 4,
       base_port: Annotated[int, typer.Option(help="API ports base..base+n-1; CometBFT "
                                                   "ports from base+10.")] = 8800,
       chain: Annotated[str, typer.Option(help="Chain id.")] = "medledger-net",
       commit_timeout: Annotated[float, typer.Option(help="Seconds a write waits for "
                                                          "commit.")] = 30.0,
       retention: Annotated[list[str], typer.Option(
           "--retention", help="Keep a category at least this long before it may be erased, "
           "e.g. conditions=10y (repeatable; units y, d, h, s). Default: none. Fixed at "
           "genesis.")] = []) -> None:
    """Create (first time) and start the network; returns once every node serves."""
    from medledger.cli.rights import print_retention
    from medledger.node.erasure import parse_retention
    rules = parse_retention(retention)
    password = _password()
    if (dir / network.STATE_FILE).exists():
        net = network.load_network(dir)
        console.print(f"network at {net.dir} exists: starting stopped members")
    else:
        with console.status("creating the network") as st:
            net = network.create_network(dir, nodes, password, chain=chain,
                                         base_port=base_port, commit_timeout_s=commit_timeout,
                                         progress=lambda msg: st.update(msg), retention=rules)
        console.print(f"[green]created[/] {len(net.members)} organisations on chain "
                      f"[bold]{net.chain}[/] in {net.dir}")
        print_retention(rules)
    with console.status(f"starting {len(net.members)} nodes, then their CometBFT"):
        network.start_members(net, [m.index for m in net.members], password)
    with console.status("waiting for the first block"):
        _wait_for_blocks(net)
    _status_table(net)
    console.print(f"Logs: <home>/node.log and {net.dir}/cometbft/node<i>/cometbft.log. "
                  f"Stop with: medledger net down --dir {dir}")


def _wait_for_blocks(net: network.Network, timeout: float = 60.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = network.network_status(net)
        if all((r.height or 0) >= 1 or r.serving is False for r in rows):
            return
        time.sleep(0.3)
    raise Unavailable(f"the network made no block within {timeout:.0f} s; see the CometBFT "
                      "logs")


@net_app.command("status")
@handle_errors
def status(dir: DirOpt = Path(".net")) -> None:
    """Per node: organisation, API URL, height, app hash, serving?, CometBFT."""
    if not _status_table(network.load_network(dir)):
        raise typer.Exit(3)


@net_app.command("stop")
@handle_errors
def stop(member: MemberArg, dir: DirOpt = Path(".net"),
         kill: Annotated[bool, typer.Option(help="SIGKILL both processes (a crash).")]
         = False) -> None:
    """Stop one member (its CometBFT and its node)."""
    net = network.load_network(dir)
    network.stop_member(net, member, kill=kill)
    console.print(f"{'killed' if kill else 'stopped'} {net.member(member).org_id}")


@net_app.command("start")
@handle_errors
def start(member: MemberArg, dir: DirOpt = Path(".net")) -> None:
    """Start one stopped member again (it catches up from its peers)."""
    net = network.load_network(dir)
    network.start_member(net, member, _password())
    console.print(f"started {net.member(member).org_id}")


@net_app.command("down")
@handle_errors
def down(dir: DirOpt = Path(".net"),
         purge: Annotated[bool, typer.Option(help="Also delete the network directory.")]
         = False) -> None:
    """Stop every process of the network (SIGTERM, then SIGKILL after 10 s)."""
    net = network.load_network(dir)
    network.stop_network(net)
    console.print(f"[green]stopped[/] {len(net.members)} members")
    if purge:
        shutil.rmtree(net.dir)
        err_console.print(f"deleted {net.dir}")
