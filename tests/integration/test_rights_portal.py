"""Patient rights in the web portal (Playwright + Chromium, a real node process):
erasure with a typed confirmation, the accounting of disclosures and its PDF, account
activation from the QR link, key-recovery setup and a guardian's approval."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from test_portal import (
    CHROMIUM,  # noqa: F401  (module skips without Chromium)
    _page,
    _patient,
    browser,  # noqa: F401  (fixture)
    login,
    open_share,
    shot,
)

from medledger.cli.demo import (
    DEMO_PASSWORD,
    seed,
    start_node_process,
    stop_node_process,
    wait_healthy,
)
from medledger.client import Client
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.home import Home, init_home

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError as exc:  # pragma: no cover
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


@dataclass(frozen=True)
class RightsNode:
    url: str
    home: Path
    plain: str
    psy: str


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RightsNode]:
    import socket
    home = tmp_path_factory.mktemp("rights-portal") / "node"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    init_home(home, "org-stmary", "St Mary's Hospital", DEMO_PASSWORD, chain="medledger-demo",
              port=port)
    proc = start_node_process(home, home / "node.log", DEMO_PASSWORD)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=30)
        seed(url, home, 2)
        yield RightsNode(url, home, _patient(0)["id"], _patient(1)["id"])
    finally:
        stop_node_process(proc)


@pytest.fixture
def page(browser: Browser, node: RightsNode) -> Iterator[Page]:  # noqa: F811
    with _page(browser, node) as p:  # type: ignore[arg-type]
        yield p


def _org(node: RightsNode) -> Client:
    return Client(node.url, Home(node.home).unlock_org(DEMO_PASSWORD))


def test_patient_erases_a_record_after_typing_erase(page: Page, node: RightsNode) -> None:
    login(page, node.plain)
    expect(page.locator("#view-patient")).to_be_visible()
    page.get_by_role("tab", name="Erase").click()
    form = page.locator("#erase-form")
    first = page.locator("#erase-record option").first
    expect(first).to_be_attached()
    ref = first.get_attribute("value")
    assert ref and "/" in ref
    form.get_by_label("Why (legal basis)").select_option("objection")
    form.get_by_role("button", name="Erase…").click()
    dialog = page.locator("#erase-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(ref)
    dialog.get_by_label("Type ERASE to confirm").fill("erase")
    dialog.get_by_role("button", name="Erase", exact=True).click()
    expect(page.locator("#erase-error")).to_contain_text("Type ERASE")
    shot(page, "rights-01-erase-confirm")
    dialog.get_by_label("Type ERASE to confirm").fill("ERASE")
    dialog.get_by_role("button", name="Erase", exact=True).click()
    expect(page.locator("#erase-form-status")).to_contain_text("Erased: 1 versions")
    expect(page.locator("#erasures-table tbody tr")).to_have_count(1)
    expect(page.locator("#erasures-table tbody tr")).to_contain_text("objection")
    shot(page, "rights-02-erased")
    token = httpx.post(node.url + "/auth/login",
                       json={"id": node.plain, "password": DEMO_PASSWORD}).json()
    resp = httpx.get(f"{node.url}/fhir/{ref}",
                     headers={"Authorization": f"Bearer {token['access_token']}"})
    assert resp.status_code == 410


def test_disclosures_page_and_pdf(page: Page, node: RightsNode) -> None:
    token = httpx.post(node.url + "/auth/login",
                       json={"id": node.psy, "password": DEMO_PASSWORD}).json()["access_token"]
    share = httpx.post(node.url + "/api/shares", json={"selection": {}, "expires_in_s": 600},
                       headers={"Authorization": f"Bearer {token}"}).json()
    assert open_share(share["shlink"], "Dr Dentist, Smile Clinic").status_code == 200
    login(page, node.psy)
    page.get_by_role("tab", name="Disclosures").click()
    rows = page.locator("#disclosures-table tbody tr[data-kind='share-link']")
    for _ in range(40):  # anchoring takes ~0.5 s
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#disclosures-status")).not_to_contain_text("Loading")
        if rows.count() and "block" in rows.first.inner_text():
            break
        page.wait_for_timeout(250)
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Dr Dentist")
    expect(rows.first).to_contain_text("block")
    shot(page, "rights-03-disclosures")
    with page.expect_download() as download:
        page.locator("#disclosures-pdf").click()
    assert Path(download.value.path()).read_bytes().startswith(b"%PDF-")


def test_imported_patient_activates_from_the_qr_link(page: Page, node: RightsNode) -> None:
    bundle = synthetic_patient_bundle(11, n_encounters=1)
    pid = bundle["entry"][0]["resource"]["id"]
    with _org(node) as c:
        c.post("/fhir", bundle)
        doc = c.post(f"/api/onboarding/{pid}/code", {})
    page.goto(doc["url"] + "/" + doc["code"])  # what the QR code holds
    box = page.locator("#activate-form")
    expect(box.get_by_label("Patient id")).to_have_value(pid)
    expect(box.get_by_label("Activation code")).to_have_value(doc["code"])
    box.get_by_label("Choose your new passphrase (8+ characters)").fill("my-own-password")
    box.get_by_role("button", name="Activate").click()
    expect(page.locator("#view-patient")).to_be_visible()
    shot(page, "rights-04-activated")
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#view-login")).to_be_visible()
    login(page, pid, "my-own-password")
    expect(page.locator("#view-patient")).to_be_visible()


def test_recovery_setup_and_guardian_approval(page: Page, node: RightsNode) -> None:
    login(page, node.psy)
    page.get_by_role("tab", name="Key recovery").click()
    expect(page.locator("#recovery-setup-view")).to_contain_text("not set up")
    form = page.locator("#recovery-form")
    form.get_by_label("Guardian ids (organisations or people)").fill(
        f"org-stmary, {node.plain}")
    form.get_by_label("Approvals needed").fill("2")
    form.get_by_role("button", name="Set up recovery").click()
    expect(page.locator("#recovery-form-status")).to_contain_text("any 2 of 2 guardians")
    expect(page.locator("#recovery-setup-view")).to_contain_text("Recovery is set up")
    with _org(node) as c:
        req = c.post("/api/recovery/requests", {"patient": node.psy})
    page.get_by_role("tab", name="Key recovery").click()
    row = page.locator(f"#recovery-table tr[data-request-id='{req['id']}']")
    expect(row).to_contain_text(req["fingerprint"])
    shot(page, "rights-05-recovery")
    # the other patient is a guardian: they approve from their own portal session
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#view-login")).to_be_visible()
    login(page, node.plain)
    page.get_by_role("tab", name="Key recovery").click()
    item = page.locator(f"#recovery-to-approve li[data-request-id='{req['id']}']")
    expect(item).to_contain_text(req["fingerprint"])
    item.get_by_role("button", name=f"Approve recovery for {node.psy}").click()
    expect(page.locator("#recovery-status")).to_contain_text("Approved (1/2)")
