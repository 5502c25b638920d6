"""A node's home directory: config, genesis, keystores and the ledger database.

    <home>/config.json          node settings (org id, chain id, API address, consensus mode)
    <home>/genesis.json         chain id + founding organisations (public keys only)
    <home>/keystores/org.json   this organisation's keys (password-protected)
    <home>/keystores/users/     keystores of practitioners and patients enrolled here
    <home>/ledger.db            SQLite: blocks, txs, state, audit
    <home>/blobs.db             SQLite: sealed record blobs, share payloads (ADR 4)
    <home>/index.db             SQLCipher: the search index (ADR 6; derived, rebuildable)
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from medledger.core.tx import ID_RE
from medledger.crypto import keys
from medledger.crypto.canonical import b64e, loads
from medledger.errors import Conflict, InvalidInput, NotFound


@dataclass
class Config:
    org_id: str
    chain: str
    host: str = "127.0.0.1"
    port: int = 8700
    mode: str = "solo"  # "solo" | "cometbft"
    cometbft_rpc: str = ""
    abci_port: int = 0
    # where the ABCI server listens for this node's CometBFT: loopback whatever `host`
    # the API is served on (ABCI has no authentication: whoever reaches it can feed the
    # ledger application blocks)
    abci_host: str = "127.0.0.1"
    # or a Unix socket (relative to the home, or absolute): what `net up` writes, in a
    # directory only this user can enter, so no other local user reaches ABCI either;
    # set, it replaces abci_host/abci_port
    abci_socket: str = ""
    public_url: str = ""
    # addresses of reverse proxies whose X-Forwarded-For names the client (the login
    # throttle counts that address); none: the peer address counts, headers ignored
    trusted_proxies: list[str] = field(default_factory=list)
    token_ttl_s: int = 900
    max_body_bytes: int = 8 * 1024 * 1024
    # transaction/batch Bundles (POST /fhir): a Synthea patient with decades of history is
    # 20-90 MB; larger imports are staged over several ledger txs (ADR 4 section 5)
    max_bundle_bytes: int = 256 * 1024 * 1024
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """``host`` (an address or ``localhost``) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Home:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def genesis_path(self) -> Path:
        return self.path / "genesis.json"

    @property
    def org_keystore(self) -> Path:
        return self.path / "keystores" / "org.json"

    @property
    def db_path(self) -> Path:
        return self.path / "ledger.db"

    @property
    def blobs_path(self) -> Path:
        """Node-local sealed blobs (ciphertext + wrapped keys, ADR 4): not consensus data."""
        return self.path / "blobs.db"

    @property
    def index_path(self) -> Path:
        """The encrypted search index (ADR 6): derived from the ledger, rebuildable."""
        return self.path / "index.db"

    def user_keystore(self, actor_id: str) -> Path:
        if not ID_RE.match(actor_id):  # ids name files here: never a path
            raise InvalidInput("an id is 1-64 characters of [A-Za-z0-9-.]")
        return self.path / "keystores" / "users" / f"{actor_id}.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def load_config(self) -> Config:
        if not self.exists():
            raise NotFound(f"{self.path} is not a medledger home (run `medledger init` first)")
        data = loads(self.config_path.read_bytes())
        extra = data.pop("extra", {})
        try:
            return Config(**data, extra=extra)
        except TypeError as exc:
            raise InvalidInput(f"{self.config_path}: {exc}") from exc

    def save_config(self, config: Config) -> None:
        data = dict(config.__dict__)
        self.config_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def load_genesis(self) -> dict[str, Any]:
        return loads(self.genesis_path.read_bytes())  # type: ignore[no-any-return]

    def unlock_org(self, password: str) -> keys.Identity:
        return keys.load_keystore(self.org_keystore, password)


def org_genesis_entry(identity: keys.Identity, name: str,
                      validator_pub: bytes | None = None,
                      api_url: str | None = None,
                      node_id: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": identity.id, "name": name, "sign_pub": b64e(identity.sign_public),
        "enc_pub": b64e(identity.enc_public),
        "validator_pub": b64e(validator_pub) if validator_pub else None}
    if api_url:  # where member nodes fetch sealed blobs from this organisation (ADR 4)
        entry["api_url"] = api_url
    if node_id:  # its CometBFT's p2p id: members' nodes admit only members' nodes
        entry["node_ids"] = [node_id]
    return entry


def init_home(path: Path | str, org_id: str, org_name: str, password: str, *,
              chain: str = "medledger-local", port: int = 8700,
              genesis: dict[str, Any] | None = None, identity: keys.Identity | None = None,
              scrypt_n: int = keys.DEFAULT_SCRYPT_N,
              retention: dict[str, int] | None = None) -> Home:
    """Create a node home for ``org_id``. Without ``genesis`` the org founds a new chain
    (with ``retention`` rules, category -> seconds, when given)."""
    home = Home(path)
    if home.exists():
        raise Conflict(f"{home.path} already holds a medledger node")
    home.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home.path, 0o700)  # private before the first key lands in it
    identity = identity or keys.new_identity(org_id, "org", {"name": org_name})
    keys.save_keystore(home.org_keystore, identity, password, scrypt_n)
    if genesis is None:
        genesis = {"chain_id": chain, "orgs": [org_genesis_entry(identity, org_name)]}
        if retention:
            genesis["retention"] = dict(retention)
    home.genesis_path.write_bytes(orjson.dumps(genesis, option=orjson.OPT_INDENT_2))
    home.save_config(Config(org_id=org_id, chain=genesis["chain_id"], port=port))
    return home
