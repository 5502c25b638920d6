"""Fixtures shared by unit and integration tests: real Synthea output.

``synthea_population`` generates (once, cached in .tools/synthea-data, see
scripts/synthea_generate.py) the fixed-seed Synthea 3.3.0 population every real-data
test uses, and is shared by the whole session. Without Java the tests that need it
skip, saying so; any other failure (Maven, network, Synthea) fails them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "scripts" / "synthea_generate.py"
GENERATION_TIMEOUT_S = 1800  # ~90 s on a quiet 2-core machine; much more when it is busy


@dataclass(frozen=True)
class SyntheaPopulation:
    """The FHIR files of a generated population."""

    fhir_dir: Path

    @property
    def hospitals(self) -> Path:
        return next(self.fhir_dir.glob("hospitalInformation*.json"))

    @property
    def practitioners(self) -> Path:
        return next(self.fhir_dir.glob("practitionerInformation*.json"))

    @property
    def directory(self) -> list[Path]:
        """The two batch Bundles, to be loaded before any patient."""
        return [self.hospitals, self.practitioners]

    @property
    def patients(self) -> list[Path]:
        """Patient transaction Bundles, smallest first."""
        files = [p for p in self.fhir_dir.glob("*.json") if p not in self.directory]
        return sorted(files, key=lambda p: p.stat().st_size)

    @property
    def largest(self) -> Path:
        return self.patients[-1]


@pytest.fixture(scope="session")
def synthea_population() -> SyntheaPopulation:
    if shutil.which("java") is None:
        pytest.skip("Java is not installed: the real-data tests need Synthea 3.3.0, a Java "
                    "program (apt-get install openjdk-17-jre-headless)")
    proc = subprocess.run([sys.executable, str(GENERATE)], capture_output=True, text=True,
                          timeout=GENERATION_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"generating the Synthea population failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
    fhir_dir = Path(proc.stdout.strip().splitlines()[-1])
    population = SyntheaPopulation(fhir_dir)
    assert population.patients, f"no patient files in {fhir_dir}"
    return population
