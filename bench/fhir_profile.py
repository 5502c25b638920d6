"""Where a solo node's time goes under figure 1's HTTP ``POST /fhir/Observation`` load.

``python -m bench.fhir_profile --out DIR`` builds the figure's node home (200 patients,
one physician: ``bench.lab``), starts ``medledger node start`` in its own process,
warms it up, then sends ``--writes`` Observations from ``--clients`` keep-alive
connections (``bench.http.fhir_writes``) while py-spy (a pinned dev dependency)
samples the node and its validation workers (``--subprocesses``). It writes the
collapsed stacks of the busy threads (idle ones are left out; ``--threads``: each
stack starts with its thread) to ``DIR/fhir_writes.txt`` and prints the load's figures and the
node's CPU seconds per write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import http
from bench.lab import Lab
from bench.run import free_port


def _cpu_s(pid: int) -> float:
    """user+system CPU seconds of ``pid`` and its children that were waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="py-spy output directory "
                    "(none: no profile, figures only)")
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding "
                    "the GIL (the node's main process is GIL-bound: its CPU per write)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medledger-fhir-profile-"))
    try:
        port = free_port()
        lab = Lab(work / "node", port=port)
        lab.register_patients(200)
        prac = lab.register_practitioner("dr-bench", "physician")
        patients = [p.id for p in lab.patients]
        lab.close()
        try:
            node = http.NodeProcess(lab.home.path, port, work / "node.log")
        except Exception:
            print((work / "node.log").read_text()[-3000:], file=sys.stderr)
            raise
        spy = None
        try:
            tok = http.token(node.url, prac)
            http.fhir_writes(node.url, tok, patients, 300, args.clients)  # warm-up
            pids = [node.proc.pid, *_children(node.proc.pid)]
            cpu0 = {p: _cpu_s(p) for p in pids}
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                exe = Path(sys.executable).with_name("py-spy")
                spy = subprocess.Popen(
                    [str(exe), "record", "--pid", str(node.proc.pid), "--subprocesses",
                     "--threads", "--rate", "200", "--nonblocking", "--format", "raw",
                     "--output", str(args.out / "fhir_writes.txt"),
                     *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
            load0 = os.getloadavg()
            res = http.fhir_writes(node.url, tok, patients, args.writes, args.clients)
            cpu = {p: _cpu_s(p) - cpu0[p] for p in pids}
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            node_cpu = sum(cpu.values())
            print(json.dumps({**res, "load_avg": [load0, os.getloadavg()],
                              "node_cpu_s": cpu, "node_cpu_us_per_write":
                              node_cpu / args.writes * 1e6}, indent=2))
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
            node.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
