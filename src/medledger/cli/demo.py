"""``medledger demo``: a node with synthetic patients, staff and consents, ready to explore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import orjson
import typer
from rich.progress import track

from medledger.cli.common import app, console, handle_errors
from medledger.client import Client
from medledger.crypto import keys
from medledger.errors import Unavailable
from medledger.fhir.synthetic import synthetic_patient_bundle

DEMO_PASSWORD = "demo-password"
STAFF = [("dr-house", "physician"), ("nurse-joy", "nurse"), ("dr-freud", "psychiatrist"),
         ("clerk-bob", "admin-clerk")]


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"node exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise Unavailable(f"node at {url} did not become healthy in {timeout:.0f}s")


def start_node_process(home: Path, log_path: Path, password: str,
                       port: int | None = None) -> subprocess.Popen[bytes]:
    """``medledger node start`` in its own process group, logging to ``log_path``."""
    env = {**os.environ, "MEDLEDGER_PASSWORD": password}
    args = [sys.executable, "-m", "medledger", "node", "start", "--home", str(home)]
    if port is not None:
        args += ["--port", str(port)]
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)


def stop_node_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group (it anchors what is left), SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def seed(base_url: str, home: Path, n_patients: int) -> dict[str, str]:
    """Register staff and load synthetic patients; returns patient id -> name."""
    from medledger.node.home import Home
    org = Home(home).unlock_org(DEMO_PASSWORD)
    staff_dir = home / "demo-keys"
    staff_dir.mkdir(exist_ok=True)
    with Client(base_url, org) as c:
        for pid, role in STAFF:
            if (staff_dir / f"{pid}.json").exists():
                continue
            doc = c.post("/admin/practitioners", {"id": pid, "role": role,
                                                  "password": DEMO_PASSWORD})
            (staff_dir / f"{pid}.json").write_bytes(orjson.dumps(doc["keystore"]))
    clerk = keys.load_keystore(staff_dir / "dr-house.json", DEMO_PASSWORD)
    patients: dict[str, str] = {}
    with Client(base_url, clerk) as c:
        for seed_no in track(range(n_patients), description="loading synthetic patients"):
            bundle = synthetic_patient_bundle(seed_no, n_encounters=4)
            patient = bundle["entry"][0]["resource"]
            name = patient["name"][0]
            patients[patient["id"]] = f"{' '.join(name.get('given', []))} {name['family']}"
            if c.request("GET", "/ledger/status", auth=False) and _exists(c, patient["id"]):
                continue
            c.request("PUT", f"/fhir/Patient/{patient['id']}", patient,
                      headers={"X-Medledger-Patient-Password": DEMO_PASSWORD})
            c.post("/fhir", bundle)
    return patients


def _exists(c: Client, pid: str) -> bool:
    try:
        c.get(f"/fhir/Patient/{pid}")
        return True
    except Exception:
        return False


@app.command()
@handle_errors
def demo(home: Annotated[Path, typer.Option(help="Demo node home.")] = Path(".demo/node"),
         port: Annotated[int, typer.Option()] = 8700,
         patients: Annotated[int, typer.Option(help="Synthetic patients to load.")] = 12,
         exit_after_seed: Annotated[bool, typer.Option(help="Stop after seeding.")] = False
         ) -> None:
    """Start a node with synthetic patients and print where to look."""
    from medledger.node.home import init_home
    if not (home / "config.json").exists():
        init_home(home, "org-stmary", "St Mary's Hospital", DEMO_PASSWORD,
                  chain="medledger-demo", port=port)
        console.print(f"[green]created[/] node home {home}")
    log_path = home / "node.log"
    proc = start_node_process(home, log_path, DEMO_PASSWORD)

    def stop_on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the cleanup below: never leave the node orphaned

    signal.signal(signal.SIGTERM, stop_on_term)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, proc)
        names = seed(base_url, home, patients)
        first = next(iter(names))
        console.rule("[bold]medledger demo is running")
        console.print(f"Portal:        {base_url}/   (FHIR API {base_url}/fhir, docs "
                      f"{base_url}/docs)")
        console.print(f"Staff logins:  {', '.join(f'{p} ({r})' for p, r in STAFF)} — "
                      f"password [bold]{DEMO_PASSWORD}[/]")
        console.print(f"Patient login: {first} ({names[first]}) — password "
                      f"[bold]{DEMO_PASSWORD}[/]; {len(names)} patients in all")
        console.print(f"Key files:     {home}/demo-keys/ (staff), {home}/keystores/users/")
        console.print(f"Verify chain:  {Path(sys.executable).parent / 'medledger'} verify "
                      f"--home {home}")
        console.print(f"Node log:      {log_path}")
        if exit_after_seed:
            return
        console.print("Press Ctrl-C to stop.")
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_node_process(proc)
