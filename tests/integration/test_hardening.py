"""Issue 9 items 2-7 against real node processes: login flood and aborted requests (2),
CSRF (3), security headers, TLS cookies and local API docs (4), FHIR narrative and
control characters (5), every bad input a 4xx OperationOutcome (6), the token audience
following ``node start --port`` (7)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from helpers import (
    ORG_ID,
    PASSWORD,
    NodeHandle,
    assert_outcome,
    free_port,
    load_patient,
    make_home,
    register_staff,
    run_cli,
    running_node,
    tcp_listeners,
)

from medledger.client import Client
from medledger.consensus.abci import FrameDecoder, frame, pb
from medledger.fhir.synthetic import synthetic_patient_bundle
from medledger.node.auth import ASSERTION_TYPE, make_assertion
from medledger.node.home import Home

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeHandle]:
    with running_node(tmp_path_factory.mktemp("harden") / "home") as n:
        load_patient(n, 1, n_encounters=1)
        yield n


def _patient_cookie(node: NodeHandle) -> httpx.Client:
    """A browser-like session: the cookie from /auth/login, no bearer header."""
    resp = httpx.post(node.url + "/auth/login",
                      json={"id": node.patients[0], "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    return httpx.Client(base_url=node.url, timeout=60,
                        cookies={"medledger_token": resp.cookies["medledger_token"]})


# ---------------------------------------------------------------- item 3: CSRF

CONSENT = {"decision": "permit", "orgs": ["org-evil"], "labels": ["PSY"]}


def test_cross_origin_cookie_write_refused(node: NodeHandle) -> None:
    evil = f"http://127.0.0.1:{free_port()}"  # same host, another port: same *site*
    with _patient_cookie(node) as browser:
        for origin in (evil, None, "null"):
            headers = {"Content-Type": "application/json"}
            if origin:
                headers["Origin"] = origin
            resp = browser.post("/api/consents", json=CONSENT, headers=headers)
            assert_outcome(resp, 403, "cross-origin request refused")
            resp = browser.post("/api/shares", json={"expires_in_s": 3600}, headers=headers)
            assert_outcome(resp, 403, "cross-origin")
        # a same-origin page posting a form-encodable body type: refused too
        resp = browser.post("/api/consents", content=b'{"decision":"permit"}',
                            headers={"Origin": node.url, "Content-Type": "text/plain"})
        assert_outcome(resp, 415, "application/json")
        assert browser.get("/api/consents").json() == []  # nothing was created
        resp = browser.post("/api/consents", json=CONSENT, headers={"Origin": node.url})
        assert resp.status_code == 201, resp.text  # the portal's own request works


def test_cross_origin_login_refused(node: NodeHandle) -> None:
    resp = httpx.post(node.url + "/auth/login", json={"id": "nurse-joy", "password": PASSWORD},
                      headers={"Origin": f"http://127.0.0.1:{free_port()}"})
    assert_outcome(resp, 403, "cross-origin")
    resp = httpx.post(node.url + "/auth/login", content=b'{"id":"nurse-joy"}',
                      headers={"Content-Type": "text/plain"})
    assert_outcome(resp, 415, "application/json")


def test_bearer_clients_need_no_origin(node: NodeHandle) -> None:
    with node.login(node.patients[0]) as h:  # Authorization header, no cookie, no Origin
        resp = h.post("/api/consents", json={"decision": "deny", "orgs": ["org-x"]})
        assert resp.status_code == 201, resp.text


# ---------------------------------------------------------------- item 4: headers, docs

def _assert_security_headers(resp: httpx.Response) -> None:
    csp = resp.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, resp.headers
    assert "unsafe-inline" not in csp.split("style-src")[0], csp  # never for scripts
    assert resp.headers.get("x-content-type-options") == "nosniff"
    assert resp.headers.get("referrer-policy") == "no-referrer"


def test_security_headers_on_every_response(node: NodeHandle) -> None:
    for method, path in [("GET", "/"), ("GET", "/static/js/app.js"), ("GET", "/fhir/metadata"),
                         ("GET", "/fhir/Observation"), ("GET", "/no/such/page"),
                         ("POST", "/auth/login"), ("GET", "/healthz"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/docs/assets/swagger-ui.css")]:
        resp = httpx.request(method, node.url + path)
        _assert_security_headers(resp)
        if not path.startswith(("/static/", "/docs/assets/")):
            assert resp.headers.get("cache-control") == "no-store", path


def test_docs_served_locally_without_inline_script(node: NodeHandle) -> None:
    page = httpx.get(node.url + "/docs")
    assert page.status_code == 200
    assert "http" not in page.text.split("<body>")[1], page.text  # no CDN, no remote asset
    assert "<script>" not in page.text  # every script is a file ('self')
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
                  "/static/js/docs.js"):
        resp = httpx.get(node.url + asset)
        assert resp.status_code == 200 and len(resp.content) > 100, asset
    assert "openapi.json" in httpx.get(node.url + "/static/js/docs.js").text


def test_portal_has_no_inline_script_or_handler(node: NodeHandle) -> None:
    html = httpx.get(node.url + "/").text
    assert "<script>" not in html and "<script type=\"module\">" not in html
    assert " onclick=" not in html and " onload=" not in html and "javascript:" not in html


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_secure_cookie_and_https_audience(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(cafile=str(cert))
    node = NodeHandle(tmp_path / "home", free_port(),
                      args=("--tls-cert", str(cert), "--tls-key", str(key)), verify=ctx)
    make_home(node.home, node.port)
    node.org = Home(node.home).unlock_org(PASSWORD)
    try:
        node.start()
        assert node.url.startswith("https://")
        assertion = make_assertion(node.org, node.url + "/auth/token")
        resp = httpx.post(node.url + "/auth/token", verify=ctx, data={
            "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion})
        assert resp.status_code == 200, resp.text  # the audience is the https URL served
        tok = resp.json()["access_token"]
        resp = httpx.post(node.url + "/admin/practitioners", verify=ctx,
                          headers={"Authorization": f"Bearer {tok}"},
                          json={"id": "nurse-tls", "role": "nurse", "password": PASSWORD})
        assert resp.status_code == 201, resp.text
        resp = httpx.post(node.url + "/auth/login", verify=ctx,
                          json={"id": "nurse-tls", "password": PASSWORD})
        assert resp.status_code == 200, resp.text
        cookie = resp.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        # an imported patient's activation signs them in too: the same Secure cookie
        bundle = synthetic_patient_bundle(3, n_encounters=1)
        pid = bundle["entry"][0]["resource"]["id"]
        org = {"Authorization": f"Bearer {tok}", "Content-Type": "application/fhir+json"}
        assert httpx.post(node.url + "/fhir", verify=ctx, headers=org,
                          json=bundle).status_code == 200
        code = httpx.post(f"{node.url}/api/onboarding/{pid}/code", verify=ctx, headers=org,
                          json={}).json()["code"]
        resp = httpx.post(node.url + "/auth/activate", verify=ctx, json={
            "id": pid, "code": code, "password": "long-enough-1"})
        assert resp.status_code == 200, resp.text
        assert "secure" in resp.headers["set-cookie"].lower()
    finally:
        node.kill9()


def test_plain_http_cookie_not_secure(node: NodeHandle) -> None:
    resp = httpx.post(node.url + "/auth/login", json={"id": "nurse-joy", "password": PASSWORD})
    assert resp.status_code == 200
    assert "secure" not in resp.headers["set-cookie"].lower()


# ---------------------------------------------------------------- item 5: narrative, strings

def _obs(pid: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "note"},
            "subject": {"reference": f"Patient/{pid}"}, **extra}


def test_active_narrative_and_nul_refused(node: NodeHandle) -> None:
    pid = node.patients[0]
    xss = ('<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script>'
           '<img src="x" onerror="alert(1)"/></div>')
    with node.login("dr-house") as h:
        for doc, needle in [
            (_obs(pid, text={"status": "generated", "div": xss}), "<script>"),
            (_obs(pid, text={"status": "generated", "div": "<div>plain</div>"}), "namespace"),
            (_obs(pid, text={"status": "generated", "div": '<div xmlns="http://www.w3.org/'
                             '1999/xhtml"><a href="javascript:x()">x</a></div>'}),
             "javascript:"),
            (_obs(pid, code={"text": "a\u0000b"}), "control character"),
        ]:
            assert_outcome(h.post("/fhir/Observation", json=doc), 400, needle)
        ok = _obs(pid, text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/'
                             'xhtml"><p>Pulse <b>72</b></p></div>'})
        assert h.post("/fhir/Observation", json=ok).status_code == 201


# ---------------------------------------------------------------- item 6: bad input -> 4xx

def _nested(levels: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "http://x.example/e", "valueString": "v"}
    for _ in range(levels):
        ext = {"url": "http://x.example/e", "extension": [ext]}
    return ext


def test_bad_inputs_are_4xx_outcomes(node: NodeHandle) -> None:
    pid = node.patients[0]
    nurse = node.staff["nurse-joy"]
    now = int(time.time())
    claims = {"iss": nurse.id, "sub": nurse.id, "aud": node.url + "/auth/token", "iat": now,
              "exp": str(now + 100), "jti": uuid.uuid4().hex}
    assertion = jwt.encode(claims, Ed25519PrivateKey.from_private_bytes(nurse.sign_seed),
                           algorithm="EdDSA")
    resp = httpx.post(node.url + "/auth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion})
    assert_outcome(resp, 400, "exp")
    with node.login("dr-house") as h:
        assert_outcome(h.post("/fhir/Observation", json=_obs(pid, extension=[_nested(200)])),
                       400, "levels deep")
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": _obs(pid, extension=[_nested(200)]),
             "request": {"method": "POST", "url": "Observation"}}]}
        assert h.post("/fhir", json=bundle).status_code == 400
        assert_outcome(h.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient",
                                                           "id": pid},
                             headers={"If-Match": 'W/"' + "9" * 5000 + '"'}), 400, "If-Match")
        for path in (f"/fhir/Observation?patient={pid}&_count=²",
                     f"/fhir/Observation?patient={pid}&_count=-1"):
            assert_outcome(h.get(path), 400, "_count")
        assert_outcome(h.get("/ledger/blocks/" + "9" * 30), 404, "no block")
        assert_outcome(h.get("/ledger/blocks/-5"), 404, "no block")
    with node.login(node.patients[0]) as p:
        assert_outcome(p.get(f"/fhir/AuditEvent?patient={pid}&_count=²"), 400, "_count")
        assert_outcome(p.get(f"/fhir/AuditEvent?patient={pid}&date=garbage"), 400, "date")
        assert_outcome(p.get("/api/access-log?count=²"), 400, "count")
        for body, needle in [
            ({"selection": "abc", "expires_in_s": 100}, "selection"),
            ({"selection": ["a"], "expires_in_s": 100}, "selection"),
            ({"selection": {"categories": [{}]}, "expires_in_s": 100}, "categories"),
            ({"selection": {"categories": ["nonsense"]}, "expires_in_s": 100}, "categories"),
            ({"selection": {}, "passcode": 1234, "expires_in_s": 100}, "passcode"),
            ({"selection": {}, "expires_in_s": True}, "expires_in_s"),
            ({"selection": {}, "expires_in_s": 100, "label": "x" * 1000}, "label"),
            ({"selection": {}, "exp": "tomorrow"}, "exp"),
        ]:
            assert_outcome(p.post("/api/shares", json=body), 400, needle)
        assert p.get("/api/shares").json() == []  # none of them created a link


# ---------------------------------------------------------------- item 7: --port and audience

def test_port_override_keeps_token_login_working(tmp_path: Path) -> None:
    configured = free_port()
    node = NodeHandle(tmp_path / "home", free_port())
    make_home(node.home, configured)  # config says one port, `--port` serves another
    node.args = ("--port", str(node.port))
    node.org = Home(node.home).unlock_org(PASSWORD)
    try:
        node.start()
        with Client(node.url, node.org) as c:
            assert c.get("/auth/me")["actor"] == ORG_ID
    finally:
        node.kill9()


def test_abci_stays_on_loopback_when_the_api_is_public(tmp_path: Path) -> None:
    """``node start --host 0.0.0.0`` publishes the API, never the ABCI port: ABCI has no
    authentication, and whoever reaches it can feed the ledger application blocks."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    node = NodeHandle(tmp_path / "home", free_port())
    abci = free_port()
    make_home(node.home, node.port, mode="cometbft", abci_port=abci,
              cometbft_rpc=f"http://127.0.0.1:{free_port()}")  # no CometBFT: no quorum
    node.args = ("--host", "0.0.0.0")
    try:
        node.start()
        assert tcp_listeners(node.port) == {"0.0.0.0"}  # the API, as asked
        assert tcp_listeners(abci) == {"127.0.0.1"}
        assert "serving plain HTTP on 0.0.0.0" in node.log()  # and no TLS: warned
        # and it is ABCI: an Echo is answered
        with socket.create_connection(("127.0.0.1", abci), timeout=5) as conn:
            assert _abci_echo(conn) == "hi"
    finally:
        node.kill9()


def _abci_echo(sock: socket.socket) -> str:
    sock.sendall(frame(pb.Request(echo=pb.RequestEcho(message="hi")).SerializeToString())
                 + frame(pb.Request(flush=pb.RequestFlush()).SerializeToString()))
    decoder, got = FrameDecoder(), []
    while len(got) < 2:
        chunk = sock.recv(4096)
        assert chunk, "ABCI server closed the connection"
        got += [pb.Response.FromString(m) for m in decoder.feed(chunk)]
    return str(got[0].echo.message)


def test_a_bad_network_config_or_a_second_start_is_one_line(tmp_path: Path) -> None:
    """What a network-mode start would fail on is said before the web server starts
    (whose start-up failure prints a traceback): an ABCI socket path too long for a
    Unix socket, and the same node started twice, which must also leave the running
    node's socket alone."""
    node = NodeHandle(tmp_path / "home", free_port())
    rpc = f"http://127.0.0.1:{free_port()}"  # no CometBFT: no quorum, still serving
    make_home(node.home, node.port, mode="cometbft", cometbft_rpc=rpc, abci_socket="s" * 120)
    res = run_cli("node", "start", "--home", str(node.home))
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
    assert "longer than a Unix socket path may be" in " ".join(res.stderr.split())
    config = orjson.loads((node.home / "config.json").read_bytes())
    (node.home / "config.json").write_bytes(orjson.dumps({**config,
                                                          "abci_socket": "abci.sock"}))
    try:
        node.start()
        res = run_cli("node", "start", "--home", str(node.home), "--port", str(free_port()))
        assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr
        assert "already serves ABCI" in " ".join(res.stderr.split())
        with socket.socket(socket.AF_UNIX) as s:  # the first node still answers there
            s.settimeout(5)
            s.connect(str(node.home / "abci.sock"))
            assert _abci_echo(s) == "hi"
    finally:
        node.kill9()


# ---------------------------------------------------------------- item 2: floods, aborts

@pytest.fixture()
def fresh_node(tmp_path: Path) -> Iterator[NodeHandle]:
    """Its own node: the throttle test locks out 127.0.0.1 for a while (the first lock-out
    lasts a minute here, so a slow machine cannot outlast it between two requests)."""
    with running_node(tmp_path / "home", staff=False,
                      extra={"login_first_backoff_s": 60, "login_tarpit_s": 0.3}) as n:
        register_staff(n)
        yield n


def test_login_flood_throttled_with_back_off(fresh_node: NodeHandle) -> None:
    url = fresh_node.url + "/auth/login"
    unknown = httpx.post(url, json={"id": "nobody-here", "password": "guess-1234"})
    wrong = httpx.post(url, json={"id": "nurse-joy", "password": "guess-1234"})
    # no enrolment oracle: an unknown id and a wrong password get the same answer
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    statuses = [httpx.post(url, json={"id": "nurse-joy", "password": f"guess-{i}"}).status_code
                for i in range(8)]
    assert 429 in statuses and statuses[0] == 401, statuses
    throttled = httpx.post(url, json={"id": "nurse-joy", "password": PASSWORD})
    assert_outcome(throttled, 429, "too many failed logins")  # even the right password
    assert int(throttled.headers["retry-after"]) >= 1
    # per address: guesses spread over many ids lock out this client too, whatever
    # address it claims in X-Forwarded-For (no proxy header is believed)
    spread = [httpx.post(url, json={"id": f"user-{i}", "password": "x" * 10},
                         headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
              for i in range(30)]
    assert spread[-1] == 429, spread
    assert_outcome(httpx.post(url, json={"id": "dr-house", "password": PASSWORD},
                              headers={"X-Forwarded-For": "198.51.100.7"}), 429,
                   "this address")
    # a locked-out address is refused before its request is parsed (a flood costs the
    # node a lookup per guess), after a pause: even a body that is not JSON gets the 429
    t = time.monotonic()
    gate = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert time.monotonic() - t >= 0.3  # held for the tarpit (0.3 s here, 1 s by default)
    assert_outcome(gate, 429, "this address")
    assert int(gate.headers["retry-after"]) >= 1
    assert gate.headers["x-content-type-options"] == "nosniff"
    # bearer-token clients are not affected by the password throttle
    with fresh_node.client("dr-house") as c:
        assert c.get("/auth/me")["actor"] == "dr-house"


def test_a_trusted_proxy_names_each_client(tmp_path: Path) -> None:
    """Behind a proxy listed in trusted_proxies, the throttle counts the address the
    proxy forwards: guesses spread over many clients lock out none of them, guesses
    from one client lock it out (the proxy itself, 127.0.0.1 here, is not counted)."""
    with running_node(tmp_path / "home", staff=False,
                      extra={"login_first_backoff_s": 60, "login_tarpit_s": 0.1},
                      trusted_proxies=["127.0.0.1"]) as node:
        url = node.url + "/auth/login"

        def guess(i: int, client: str) -> int:
            return httpx.post(url, json={"id": f"user-{i}", "password": "x" * 10},
                              headers={"X-Forwarded-For": client}).status_code

        assert {guess(i, f"203.0.113.{i}") for i in range(30)} == {401}
        one = [guess(100 + i, "198.51.100.7") for i in range(30)]
        assert one[-1] == 429, one
        assert guess(999, "198.51.100.8") == 401  # another client is not locked out


def test_aborted_requests_one_line_each_no_traceback(fresh_node: NodeHandle) -> None:
    before = fresh_node.log_path.read_text(errors="replace")
    n = 25
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", fresh_node.port))
        path = "/auth/login" if i % 2 else "/fhir/Observation"
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n{\"id\":".encode())
        s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        added = fresh_node.log_path.read_text(errors="replace")[len(before):]
        if added.count("went away") >= n // 2:
            break
        time.sleep(0.1)
    added = fresh_node.log_path.read_text(errors="replace")[len(before):]
    # the logins were cut while their body was read: one line each; the FHIR posts were
    # answered (401) before their body was needed: nothing to log
    assert added.count("went away during POST /auth/login") == n // 2, added[-2000:]
    assert "Traceback" not in added and "Exception in ASGI" not in added, added[-3000:]
    assert len(added.splitlines()) == n // 2, added[-2000:]
    assert httpx.get(fresh_node.url + "/healthz").status_code == 200
