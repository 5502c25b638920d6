"""``medledger key rotate``: new keys for a practitioner, a patient or an organisation.

An actor rotates client-side with its own key file: the new keystore is written
beside the old one first (``<file>.next``), ``key.rotate`` is signed with the old
key and submitted, and only then does the new keystore replace the old file — so a
failure at any step leaves a key that works. The new keystore keeps the old
encryption keys (records sealed to them still open); the copy a node holds for
password logins is replaced too. An organisation's node rotates its own keys
(``--home``: the node must be running).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from medledger.cli.common import _password, console, handle_errors
from medledger.client import Client, NodeError
from medledger.crypto import keys
from medledger.crypto.canonical import b64e
from medledger.errors import InvalidInput, MedledgerError, Unavailable
from medledger.node.home import Home

key_app = typer.Typer(help="Your keys: rotate them (a lost or stolen key).",
                      no_args_is_help=True)


@key_app.command("rotate")
@handle_errors
def rotate(node: Annotated[str | None, typer.Option(
               "--node", envvar="MEDLEDGER_NODE", help="Node URL (with --key).")] = None,
           key: Annotated[Path | None, typer.Option(
               "--key", help="Your keystore file (a practitioner or patient).")] = None,
           home: Annotated[Path | None, typer.Option(
               "--home", help="A node home: rotate the organisation's keys.")] = None
           ) -> None:
    """Replace your keys: the old signing key stops working once the rotation commits;
    tokens issued under it stop working at once."""
    if (key is None) == (home is None):
        raise InvalidInput("give either --key (and --node) for your own keys, or --home for "
                           "the organisation's")
    if home is not None:
        _rotate_org(home)
        return
    assert key is not None
    if node is None:
        raise InvalidInput("--node is required with --key")
    _rotate_actor(node, key)


def _rotate_org(home: Path) -> None:
    h = Home(home)
    config = h.load_config()
    org = h.unlock_org(_password("MEDLEDGER_PASSWORD", "organisation keystore password"))
    with Client(config.base_url, org) as c:
        doc = c.post("/admin/keys/rotate", {})
    console.print(f"[green]rotated[/] the keys of {doc['id']} (key version {doc['keys_v']}); "
                  f"the node signs with the new keys and keeps the old encryption keys in "
                  f"{h.org_keystore}")


def _uncertain(pending: Path, err: MedledgerError) -> MedledgerError:
    return Unavailable(f"{err}; the rotation may or may not have been committed. Your new "
                       f"keys are kept in {pending}: if `medledger` refuses your old key, "
                       "use that file")


def _rotate_actor(node: str, key: Path) -> None:
    password = _password("MEDLEDGER_KEY_PASSWORD", "keystore password")
    old = keys.load_keystore(key, password)
    new = keys.rotated(old)
    pending = key.with_name(key.name + ".next")
    keys.save_keystore(pending, new, password)
    try:
        with Client(node, old) as c:
            res = c.submit_tx("key.rotate", {"id": old.id, "sign_pub": b64e(new.sign_public),
                                             "enc_pub": b64e(new.enc_public)})
    except NodeError as err:
        if err.status < 500:  # refused: nothing changed on the ledger
            pending.unlink(missing_ok=True)
            raise
        raise _uncertain(pending, err) from err
    except MedledgerError as err:  # the node may or may not have committed it
        raise _uncertain(pending, err) from err
    os.replace(pending, key)
    console.print(f"[green]rotated[/] the keys of {old.id} at height {res['height']}; "
                  f"{key} now holds the new keys (and the old encryption keys)")
    with Client(node, new) as c:
        try:
            c.request("PUT", "/api/keystore", key.read_bytes(),
                      headers={"Content-Type": "application/json"})
            console.print("the copy of your key file held by the node was replaced too")
        except NodeError as err:
            if err.status != 404:
                raise
