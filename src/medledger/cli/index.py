"""``medledger index``: the node-local search index (rebuild from the ledger)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from medledger.cli.common import HomeOpt, _password, console, err_console, handle_errors

index_app = typer.Typer(help="The node's encrypted search index.", no_args_is_help=True)


@index_app.command("rebuild")
@handle_errors
def rebuild(home: HomeOpt,
            quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False) -> None:
    """Recreate <home>/index.db from the ledger (stop the node first)."""
    from medledger.node.runtime import open_node
    from medledger.search import matching
    from medledger.search.index import SearchIndex, index_key
    from medledger.search.sync import IndexSync
    node = open_node(str(home), _password("MEDLEDGER_PASSWORD",
                                          "organisation keystore password"))
    path = node.home.index_path
    for suffix in ("", "-wal", "-shm"):  # a fresh file: nothing of the old one survives
        (path.parent / (path.name + suffix)).unlink(missing_ok=True)
    index = SearchIndex(path, index_key(node.org.enc_private), matching.blocking_keys)
    sync = IndexSync(index, node.store, node.decrypt)
    start = time.perf_counter()
    with Progress(TextColumn("indexing"), BarColumn(), TextColumn("{task.completed:,}/"
                  "{task.total:,} records"), TimeRemainingColumn(), console=err_console,
                  disable=quiet) as bar:
        task = bar.add_task("index", total=None)
        n = sync.rebuild(lambda done, total: bar.update(task, completed=done, total=total))
    took = time.perf_counter() - start
    failed, height = len(sync.failed), index.height
    index.close()
    node.store.close()
    console.print(f"[green]OK[/] indexed {n - failed:,} records at height {height:,} "
                  f"in {took:.1f}s ({(n - failed) / max(took, 1e-9):,.0f}/s)"
                  + (f"; [yellow]{failed} could not be opened here[/]" if failed else ""))
