"""``medledger demo``: a node with patients and staff, ready to explore.

With ``--synthea DIR`` (what ``make demo`` passes) it loads real Synthea output the way
FHIR servers are loaded: the hospital and practitioner batches, then each patient's
transaction Bundle (the patient registered first, so they can log in with the demo
password). Without it, the project's own small synthetic patients.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, track

from medledger.cli.common import app, console, handle_errors
from medledger.client import Client, NodeError
from medledger.crypto import keys
from medledger.errors import Unavailable
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.storage.files import write_private

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


def _register_staff(base_url: str, home: Path) -> keys.Identity:
    """Register the demo staff (once); returns the physician who loads the data."""
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
            write_private(staff_dir / f"{pid}.json", orjson.dumps(doc["keystore"]))
    return keys.load_keystore(staff_dir / "dr-house.json", DEMO_PASSWORD)


def seed(base_url: str, home: Path, n_patients: int) -> dict[str, str]:
    """Register staff and load synthetic patients; returns patient id -> name."""
    clerk = _register_staff(base_url, home)
    patients: dict[str, str] = {}
    with Client(base_url, clerk) as c:
        for seed_no in track(range(n_patients), description="loading synthetic patients"):
            bundle = synthetic_patient_bundle(seed_no, n_encounters=4)
            patient = bundle["entry"][0]["resource"]
            patients[patient["id"]] = _name(patient)
            if _stored(c, f"Patient/{patient['id']}"):
                continue
            c.request("PUT", f"/fhir/Patient/{patient['id']}", patient,
                      headers={"X-Medledger-Patient-Password": DEMO_PASSWORD})
            c.post("/fhir", bundle)
    return patients


def seed_synthea(base_url: str, home: Path, fhir_dir: Path, max_entries: int,
                 n_patients: int) -> dict[str, str]:
    """Load Synthea output: directory batches, then up to ``n_patients`` patient Bundles
    of at most ``max_entries`` resources each, smallest first; returns id -> name."""
    files = sorted(fhir_dir.glob("*.json"), key=lambda p: p.stat().st_size)
    # (body, entries, patient, its Bundle's last record: there once all of it is, since
    # a transaction commits whole)
    loads: list[tuple[bytes, int, dict[str, Any] | None, str]] = []
    for path in files:
        if path.name.startswith(("hospitalInformation", "practitionerInformation")):
            data = path.read_bytes()
            loads.insert(0, (data, len(orjson.loads(data)["entry"]), None, ""))
    n_directory = len(loads)
    for path in files:
        if len(loads) - n_directory >= n_patients or path.name.startswith(
                ("hospitalInformation", "practitionerInformation")):
            continue
        data = path.read_bytes()
        entries = orjson.loads(data)["entry"]
        if len(entries) <= max_entries:
            patient = next(e["resource"] for e in entries
                           if e["resource"]["resourceType"] == "Patient")
            url = str(entries[-1].get("fullUrl", ""))
            last = f"{entries[-1]['resource']['resourceType']}/{url[9:]}" \
                if url.startswith("urn:uuid:") else ""  # else: cannot tell, post it
            loads.append((data, len(entries), patient, last))
    if len(loads) == n_directory:
        raise Unavailable(f"no Synthea patient files of at most {max_entries} resources "
                          f"in {fhir_dir} (run `make synthea`)")
    loader = _register_staff(base_url, home)
    patients: dict[str, str] = {}
    columns = (TextColumn("{task.description:<40}"), BarColumn(),
               TextColumn("{task.completed:,}/{task.total:,} resources"), TimeElapsedColumn())
    with Client(base_url, loader, timeout=1800) as c, Progress(*columns,
                                                                console=console) as bar:
        task = bar.add_task("loading Synthea output", total=sum(n for _, n, _, _ in loads))
        for data, n, patient, last in loads:
            if patient is None:
                bar.update(task, description="directory: organisations, practitioners")
            else:
                patients[patient["id"]] = _name(patient)
                bar.update(task, description=patients[patient["id"]][:40])
                # loaded by an earlier `medledger demo` on this home: not re-posted (the
                # loader may not read every label it would overwrite: break-the-glass)
                if last and _stored(c, last):
                    bar.advance(task, n)
                    continue
                if not _stored(c, f"Patient/{patient['id']}"):  # the demo password first
                    c.request("PUT", f"/fhir/Patient/{patient['id']}", patient,
                              headers={"X-Medledger-Patient-Password": DEMO_PASSWORD})
            c.request("POST", "/fhir", data)
            bar.advance(task, n)
    return patients


def _name(patient: dict[str, Any]) -> str:
    name = (patient.get("name") or [{}])[0]
    return f"{' '.join(name.get('given', []))} {name.get('family', '')}".strip() or \
        str(patient.get("id"))


def _stored(c: Client, ref: str) -> bool:
    """Whether the node holds ``ref`` (``Type/id``): readable, or refused to this reader."""
    try:
        c.get(f"/fhir/{ref}")
        return True
    except NodeError as err:
        if err.status == 404:
            return False
        if err.status == 403:
            return True
        raise


@app.command()
@handle_errors
def demo(home: Annotated[Path, typer.Option(help="Demo node home.")] = Path(".demo/node"),
         port: Annotated[int, typer.Option()] = 8700,
         patients: Annotated[int, typer.Option(help="Patients to load.")] = 12,
         synthea: Annotated[Path | None, typer.Option(
             help="Load this Synthea output folder (its fhir/ directory) instead of the "
                  "built-in synthetic patients.")] = None,
         synthea_max_entries: Annotated[int, typer.Option(
             help="Skip Synthea patients with more resources than this.")] = 10_000,
         exit_after_seed: Annotated[bool, typer.Option(help="Stop after seeding.")] = False
         ) -> None:
    """Start a node with patients and print where to look."""
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
        names = (seed_synthea(base_url, home, synthea, synthea_max_entries, patients)
                 if synthea is not None else seed(base_url, home, patients))
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
