"""Shared fixture code for the end-to-end tests: real node processes over HTTP.

``running_node`` creates a node home, starts ``python -m medledger.cli.main node
start --home H`` in its own process group (``MEDLEDGER_PASSWORD`` in the
environment), waits for ``/healthz``, registers the demo staff through
``Client`` and yields a ``NodeHandle``; at teardown the process group is killed.
Test modules import what they need explicitly (there is no conftest here).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from medledger.client import Client
from medledger.crypto import keys
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.home import Home, init_home

PASSWORD = "demo-password"
ORG_ID = "org-stmary"
STAFF = {"dr-house": "physician", "nurse-joy": "nurse", "dr-freud": "psychiatrist",
         "clerk-bob": "admin-clerk"}
FAST_SCRYPT_N = 2**12  # the org keystore: tests unlock it often


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_listeners(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (Linux ``/proc/net``)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                          if len(addr) == 8 else addr)
    return found


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``medledger`` subprocesses (passwords for org and user keystores)."""
    return {**os.environ, "MEDLEDGER_PASSWORD": PASSWORD, "MEDLEDGER_KEY_PASSWORD": PASSWORD,
            "COLUMNS": "120", **extra}


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medledger", *args],
                          env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def make_home(path: Path, port: int, **config: Any) -> Home:
    """``medledger init`` equivalent, plus config.json overrides (e.g. token_ttl_s)."""
    home = init_home(path, ORG_ID, "St Mary's Hospital", PASSWORD, chain="medledger-test",
                     port=port, scrypt_n=FAST_SCRYPT_N)
    if config:
        data = orjson.loads(home.config_path.read_bytes())
        data.update(config)
        home.config_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return home


@dataclass
class NodeHandle:
    home: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    org: keys.Identity | None = None
    staff: dict[str, keys.Identity] = field(default_factory=dict)
    patients: list[str] = field(default_factory=list)
    args: tuple[str, ...] = ()  # extra `node start` options (e.g. --tls-cert)
    verify: Any = True  # TLS verification for the health probe (a CA file for --tls-cert)

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        # outside the home: the PHI scan reads every file in the home, and so does the
        # tamper copy; the log is the operator's, not the ledger's
        return self.home.parent / f"{self.home.name}.node.log"

    # ------------------------------------------------------------ process
    def start(self, timeout: float = 30) -> None:
        assert self.proc is None or self.proc.poll() is not None, "node already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medledger", "node", "start", "--home",
             str(self.home), *self.args], env=cli_env(), stdout=log, stderr=log,
            start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1,
                             verify=self.verify).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node did not become healthy in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop the node's process group (SIGTERM: graceful; SIGKILL: crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ identities
    def client(self, who: str | keys.Identity | None = None) -> Client:
        if who is None:
            return Client(self.url)
        if isinstance(who, keys.Identity):
            return Client(self.url, who)
        if who == ORG_ID:
            assert self.org is not None
            return Client(self.url, self.org)
        return Client(self.url, self.staff[who])

    def user_identity(self, actor_id: str, password: str = PASSWORD) -> keys.Identity:
        """A patient's or practitioner's identity from the node's enrolment keystore."""
        return keys.load_keystore(Home(self.home).user_keystore(actor_id), password)

    def login(self, actor_id: str, password: str = PASSWORD) -> httpx.Client:
        """An httpx client holding a bearer token from POST /auth/login (portal style)."""
        resp = httpx.post(self.url + "/auth/login", json={"id": actor_id, "password": password})
        assert resp.status_code == 200, resp.text
        return httpx.Client(base_url=self.url, timeout=60, headers={
            "Authorization": f"Bearer {resp.json()['access_token']}",
            "Content-Type": "application/fhir+json"})


def register_staff(node: NodeHandle) -> None:
    keydir = node.home / "demo-keys"
    keydir.mkdir(exist_ok=True)
    with node.client(ORG_ID) as c:
        for pid, role in STAFF.items():
            doc = c.post("/admin/practitioners", {"id": pid, "role": role, "password": PASSWORD})
            (keydir / f"{pid}.json").write_bytes(orjson.dumps(doc["keystore"]))
            node.staff[pid] = keys.unlock(orjson.dumps(doc["keystore"]), PASSWORD)


def load_patient(node: NodeHandle, seed: int, n_encounters: int = 4) -> dict[str, Any]:
    """Register a synthetic patient (password = PASSWORD) and load their bundle."""
    bundle = synthetic_patient_bundle(seed, n_encounters=n_encounters)
    patient = bundle["entry"][0]["resource"]
    with node.client("dr-house") as c:
        c.request("PUT", f"/fhir/Patient/{patient['id']}", patient,
                  headers={"X-Medledger-Patient-Password": PASSWORD})
        c.post("/fhir", bundle)
    node.patients.append(patient["id"])
    return bundle


@contextmanager
def running_node(path: Path, *, patients: int = 0, n_encounters: int = 4,
                 staff: bool = True, **config: Any) -> Iterator[NodeHandle]:
    node = NodeHandle(path, free_port())
    make_home(path, node.port, **config)
    node.org = Home(path).unlock_org(PASSWORD)
    try:
        node.start()
        if staff:
            register_staff(node)
        for seed in range(patients):
            load_patient(node, seed, n_encounters)
        yield node
    finally:
        node.kill9()


def outcome_text(resp: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome response (or the raw body)."""
    try:
        doc = resp.json()
    except ValueError:
        return resp.text
    if isinstance(doc, dict) and doc.get("resourceType") == "OperationOutcome":
        return " | ".join(i.get("diagnostics", "") for i in doc["issue"])
    return resp.text


def assert_outcome(resp: httpx.Response, status: int, *needles: str) -> str:
    """``resp`` is an OperationOutcome with ``status`` whose text names every needle."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text}"
    doc = resp.json()
    assert doc["resourceType"] == "OperationOutcome", doc
    text = outcome_text(resp)
    for n in needles:
        assert n.lower() in text.lower(), f"{n!r} not in {text!r}"
    return text
