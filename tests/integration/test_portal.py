"""The web portal in a real browser (Playwright + Debian Chromium) against a real node.

One node process (solo mode, fresh home, free port) is seeded with the demo staff and
two synthetic patients: seed 0 (no mental-health data) and seed 1 (depression: a
Condition and two PHQ-9 Observations labelled PSY). The tests walk the main flows:
consent, role-limited views with explicit withheld rows, a psychiatrist's view,
share links (open, revoke, expire) and break-the-glass showing up in the patient's
access log. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Chromium is not installed at /usr/bin/chromium; run `make chromium` "
                "(scripts/install_chromium.sh)", allow_module_level=True)
try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError as exc:  # pragma: no cover - dev extra missing
    pytest.skip(f"playwright is not installed in this venv: {exc}", allow_module_level=True)

from medledger.cli.demo import (  # noqa: E402
    DEMO_PASSWORD,
    seed,
    start_node_process,
    stop_node_process,
    wait_healthy,
)
from medledger.fhir import shl  # noqa: E402
from medledger.fhir.synthetic import synthetic_patient_bundle  # noqa: E402
from medledger.node.home import init_home  # noqa: E402

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
BREAK_GLASS_REASON = "Unconscious in the ER; need psychiatric medication history"


@dataclass(frozen=True)
class DemoNode:
    url: str
    plain: str  # patient without mental-health records (seed 0)
    psy: str  # patient with depression, PHQ-9 (PSY-labelled) records (seed 1)
    psy_family: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _patient(seed_no: int) -> dict[str, Any]:
    return synthetic_patient_bundle(seed_no, n_encounters=4)["entry"][0]["resource"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoNode]:
    home = tmp_path_factory.mktemp("portal") / "node"
    port = _free_port()
    init_home(home, "org-stmary", "St Mary's Hospital", DEMO_PASSWORD, chain="medledger-demo",
              port=port)
    proc = start_node_process(home, home / "node.log", DEMO_PASSWORD)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=30)
        seed(url, home, 2)
        psy = _patient(1)
        yield DemoNode(url, _patient(0)["id"], psy["id"], psy["name"][0]["family"])
    finally:
        stop_node_process(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def _page(browser: Browser, node: DemoNode) -> Iterator[Page]:
    context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": 900},
                                                  base_url=node.url)
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # the portal runs under a strict CSP: any blocked script, style or handler is a failure
    page.on("console", lambda msg: errors.append(msg.text)
            if "Content Security Policy" in msg.text else None)
    page.on("dialog", lambda dialog: dialog.accept())  # revoke confirmations
    try:
        yield page
        assert not errors, f"JavaScript errors in the portal: {errors}"
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser, node: DemoNode) -> Iterator[Page]:
    with _page(browser, node) as p:
        yield p


def shot(page: Page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def login(page: Page, actor: str, password: str = DEMO_PASSWORD) -> None:
    page.goto("/")
    page.get_by_label("Patient or staff id").fill(actor)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def open_patient(page: Page, query: str) -> None:
    page.get_by_label("Patient name or id").fill(query)
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#search-results li")).to_have_count(1)
    page.locator("#search-results li").get_by_role("button", name="Open record").click()
    expect(page.locator("#chart-status")).to_contain_text("records shown")


def open_share(link: str, recipient: str = "Dr Dentist") -> httpx.Response:
    payload = shl.decode_shlink(link)
    return httpx.post(payload.url, json={"recipient": recipient}, timeout=10)


# ---------------------------------------------------------------------------- tests


def test_patient_signs_in_and_restricts_a_category(page: Page, node: DemoNode) -> None:
    login(page, node.plain, "not-the-password")
    expect(page.locator("#login-status")).to_contain_text("Sign-in failed: wrong password")
    shot(page, "01-login-error")

    login(page, node.plain)
    expect(page.locator("#view-patient")).to_be_visible()
    expect(page.locator("#records-timeline li.record[data-category='vital-signs']").first
           ).to_be_visible()
    expect(page.locator("#records-timeline .rec-summary").filter(has_text="Blood pressure")
           .first).to_contain_text("mmHg")
    shot(page, "02-patient-records")

    # tabs follow the WAI-ARIA pattern: arrow keys move between them
    page.locator("#tab-records").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-access")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-access")).to_be_visible()

    page.get_by_role("tab", name="Consents").click()
    form = page.locator("#consent-form")
    form.get_by_label("Restrict (deny access)").check()
    form.get_by_label("laboratory").check()
    form.get_by_label("Practitioner id").fill("nurse-joy")
    form.get_by_label("From").fill("2030-01-10")
    form.get_by_label("Until, inclusive").fill("2030-01-01")
    form.get_by_role("button", name="Save consent").click()
    expect(page.locator("#consent-form-status")).to_contain_text("end date")
    form.get_by_label("From").fill("")
    form.get_by_label("Until, inclusive").fill("")
    form.get_by_role("button", name="Save consent").click()
    expect(page.locator("#consent-form-status")).to_contain_text("Consent saved: restricted "
                                                                 "laboratory")
    row = page.locator("#consents-table tbody tr").filter(has_text="laboratory")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("Restrict")
    expect(row).to_contain_text("nurse-joy")
    expect(row).to_contain_text("active")
    shot(page, "03-patient-consent-saved")

    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button")).to_have_count(0)


def test_nurse_sees_vital_signs_and_psy_as_withheld(page: Page, node: DemoNode) -> None:
    login(page, "nurse-joy")
    expect(page.locator(".notice-audit")).to_contain_text("Access is audited")
    open_patient(page, node.psy_family.lower())
    chart = page.locator("#chart-timeline")
    expect(chart.locator("li.record:not(.withheld)[data-category='vital-signs']").first
           ).to_be_visible()
    withheld_psy = chart.locator("li.withheld[data-category='mental-health']")
    expect(withheld_psy).to_have_count(3)  # depression Condition + two PHQ-9 Observations
    expect(withheld_psy.first).to_contain_text("role nurse may not read mental-health data")
    expect(chart.locator("li.record:not(.withheld)[data-category='mental-health']")
           ).to_have_count(0)
    expect(page.locator("#chart-status")).to_contain_text("withheld")
    expect(page.locator("#bg-open")).to_be_hidden()  # nurses may not break the glass
    shot(page, "04-nurse-psy-withheld")


def test_psychiatrist_sees_psy_records(page: Page, node: DemoNode) -> None:
    login(page, "dr-freud")
    open_patient(page, node.psy)  # by id
    chart = page.locator("#chart-timeline")
    psy = chart.locator("li.record:not(.withheld)[data-category='mental-health']")
    expect(psy).to_have_count(3)
    expect(psy.filter(has_text="PHQ-9")).to_have_count(2)
    expect(psy.filter(has_text="Depressive disorder")).to_have_count(1)
    expect(chart.locator("li.withheld[data-category='mental-health']")).to_have_count(0)
    shot(page, "05-psychiatrist-psy-visible")


def test_share_link_opens_then_is_refused_after_revocation_and_expiry(
        page: Page, node: DemoNode) -> None:
    login(page, node.plain)
    page.get_by_role("tab", name="Share links").click()
    form = page.locator("#share-form")
    form.get_by_label("vital-signs").check()
    form.get_by_label("Expires after").fill("2")
    form.get_by_label("Unit").select_option(label="hours")
    form.get_by_label("Label").fill("for the dentist")
    form.get_by_role("button", name="Create link").click()
    expect(page.locator("#share-form-status")).to_contain_text("Share link created")
    result = page.locator(".share-result")
    expect(result.locator(".qr svg")).to_be_visible()
    link = result.get_by_label("SMART Health Link").input_value()
    assert link.startswith("shlink:/")
    payload = shl.decode_shlink(link)
    assert payload.label == "for the dentist"
    assert payload.exp is not None and 7000 < payload.exp - time.time() <= 7200
    result.get_by_role("button", name="Copy link").click()
    expect(result.locator(".copy-status")).to_have_text("Copied.")
    shot(page, "06-share-created")

    opened = open_share(link)
    assert opened.status_code == 200, opened.text
    jwe = opened.json()["files"][0]["embedded"]
    bundle = orjson.loads(shl.decrypt_jwe(jwe, payload.key_bytes))
    shared = [e["resource"] for e in bundle["entry"]]
    assert shared and all(r["resourceType"] == "Observation" for r in shared)

    row = page.locator("#shares-table tbody tr").filter(has_text="for the dentist")
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    refused = open_share(link)
    assert refused.status_code == 410 and "revoked" in refused.text

    # a 2-second link (the API's expires_in_s), created in this same portal session
    # (the session cookie authenticates it: it must come from the portal's own origin)
    created = page.request.post("/api/shares", headers={"Origin": node.url}, data={
        "selection": {"types": ["Immunization"]}, "expires_in_s": 2, "label": "two seconds"})
    assert created.status == 201, created.text()
    short = created.json()
    assert open_share(short["shlink"]).status_code == 200
    time.sleep(max(0.0, short["exp"] - time.time()) + 0.3)
    expired = open_share(short["shlink"])
    assert expired.status_code == 410 and "expired" in expired.text
    page.get_by_role("tab", name="Records").click()
    page.get_by_role("tab", name="Share links").click()
    expect(page.locator("#shares-table tbody tr").filter(has_text="two seconds")
           ).to_contain_text("expired")
    shot(page, "07-share-states")


def test_break_glass_is_highlighted_in_patients_access_log(
        browser: Browser, node: DemoNode) -> None:
    with _page(browser, node) as page:
        login(page, "dr-house")
        open_patient(page, node.psy_family)
        chart = page.locator("#chart-timeline")
        expect(chart.locator("li.withheld[data-category='mental-health']")).to_have_count(3)
        page.get_by_role("button", name="Break the glass").click()
        dialog = page.locator("#bg-dialog")
        expect(dialog).to_be_visible()
        dialog.get_by_label("Reason").fill("urgent")
        dialog.get_by_role("button", name="Break the glass").click()
        expect(dialog.locator("#bg-error")).to_contain_text("at least 10 characters")
        shot(page, "08-break-glass-dialog", full_page=False)
        dialog.get_by_label("Reason").fill(BREAK_GLASS_REASON)
        dialog.get_by_role("button", name="Break the glass").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#bg-banner .notice-danger")).to_contain_text(BREAK_GLASS_REASON)
        expect(chart.locator("li.record:not(.withheld)[data-category='mental-health']")
               ).to_have_count(3)
        expect(chart.locator("li.withheld")).to_have_count(0)
        shot(page, "09-break-glass-record")

    with _page(browser, node) as page:
        login(page, node.psy)
        page.get_by_role("tab", name="Access log").click()
        bg_rows = page.locator("#access-table tbody tr.row-bg")
        expect(bg_rows.first).to_be_visible()
        expect(bg_rows.first).to_contain_text("dr-house")
        expect(bg_rows.first).to_contain_text(BREAK_GLASS_REASON)
        color = bg_rows.first.locator("td").first.evaluate(
            "td => getComputedStyle(td).backgroundColor")
        assert color == "rgb(253, 232, 232)", color  # the red highlight
        expect(page.locator("#access-alert .notice-danger")).to_contain_text("break-the-glass")
        expect(page.locator("#access-chart svg rect.seg-bg").first).to_be_visible()
        shot(page, "10-patient-access-log-break-glass")


def test_api_docs_render_from_local_assets_under_csp(page: Page, node: DemoNode) -> None:
    remote: list[str] = []
    page.on("request", lambda req: remote.append(req.url)
            if not req.url.startswith(node.url) else None)
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("medledger node")
    expect(page.locator(".opblock").first).to_be_visible()
    shot(page, "20-api-docs")
    assert remote == [], f"/docs loaded from elsewhere: {remote}"


def test_page_on_another_port_cannot_act_for_a_logged_in_patient(
        browser: Browser, node: DemoNode) -> None:
    """Issue 9 item 3: a same-site page (another port of this host) makes the patient's
    browser POST a consent and a share link with the session cookie; both are refused."""
    import http.server
    import threading

    evil = f"""<!doctype html><script>
    const opts = (body) => ({{method: "POST", credentials: "include", mode: "no-cors",
      headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify(body)}});
    Promise.all([
      fetch("{node.url}/api/consents", opts({{decision: "permit", orgs: ["org-evil"],
                                               labels: ["PSY"]}})),
      fetch("{node.url}/api/shares", opts({{expires_in_s: 31536000, label: "evil"}})),
      fetch("{node.url}/api/consents", {{method: "POST", credentials: "include",
        headers: {{"Content-Type": "application/json"}},
        body: JSON.stringify({{decision: "permit", orgs: ["org-evil"]}})}}).catch(() => null),
    ]).finally(() => {{ document.title = "done"; }});
    </script>""".encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with _page(browser, node) as page:
            login(page, node.psy)
            expect(page.locator("#view-patient")).to_be_visible()
            before = page.evaluate("fetch('/api/consents').then(r => r.json())")
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.wait_for_function("document.title === 'done'")
            page.goto(node.url + "/")
            after = page.evaluate("fetch('/api/consents').then(r => r.json())")
            shares = page.evaluate("fetch('/api/shares').then(r => r.json())")
        assert after == before, after
        assert not any(s.get("label") == "evil" for s in shares), shares
    finally:
        server.shutdown()
