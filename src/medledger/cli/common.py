"""Shared pieces of the ``medledger`` CLI: the Typer apps, consoles, options, error handling.

Command modules (``main``, ``share``, ``demo``, ``net``) import from here; ``main``
imports them all and is the entry point, so there are no import cycles.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from medledger.client import Client
from medledger.crypto import keys
from medledger.errors import InvalidInput, MedledgerError

app = typer.Typer(help="medledger: a permissioned blockchain for encrypted health records.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
node_app = typer.Typer(help="Run a node.", no_args_is_help=True)
prac_app = typer.Typer(help="Practitioners of this organisation.", no_args_is_help=True)
record_app = typer.Typer(help="Records (FHIR resources).", no_args_is_help=True)
consent_app = typer.Typer(help="A patient's consents.", no_args_is_help=True)
share_app = typer.Typer(help="Time-limited share links (SMART Health Links).",
                        no_args_is_help=True)
audit_app = typer.Typer(help="The access log.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(prac_app, name="practitioner")
app.add_typer(record_app, name="record")
app.add_typer(consent_app, name="consent")
app.add_typer(share_app, name="share")
app.add_typer(audit_app, name="audit")

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

HomeOpt = Annotated[Path, typer.Option("--home", help="Node home directory.")]
NodeOpt = Annotated[str, typer.Option("--node", envvar="MEDLEDGER_NODE",
                                      help="Node URL, e.g. http://127.0.0.1:8700")]
KeyOpt = Annotated[Path, typer.Option("--key", help="Your keystore file.")]


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedledgerError as err:
            err_console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(1) from None
        except OSError as err:
            err_console.print(f"[bold red]error:[/] {err.strerror or err}: "
                              f"{getattr(err, 'filename', '') or ''}")
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:
            if os.environ.get("MEDLEDGER_DEBUG"):
                raise
            err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {err} "
                              "(set MEDLEDGER_DEBUG=1 for the traceback)")
            raise typer.Exit(2) from None
    return wrapper  # type: ignore[return-value]


def _password(env: str, prompt: str) -> str:
    value = os.environ.get(env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise InvalidInput(f"set {env} (no terminal to prompt for the {prompt})")
    return str(typer.prompt(prompt, hide_input=True))


def _identity(path: Path) -> keys.Identity:
    return keys.load_keystore(path, _password("MEDLEDGER_KEY_PASSWORD", "keystore password"))


def _client(node: str, key: Path | None) -> Client:
    return Client(node, _identity(key) if key else None)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


