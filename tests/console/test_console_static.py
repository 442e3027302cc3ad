"""The console's files: served under /console with a strict CSP, nothing else reachable."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_console_page_and_assets_carry_a_strict_csp(client: TestClient) -> None:
    page = client.get("/console/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert 'src="/console/app.js"' in page.text and "<script>" not in page.text
    script = client.get("/console/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "content-security-policy" in script.headers
    assert client.get("/console", follow_redirects=False).headers["location"] == "/console/"


def test_only_the_console_files_are_served(client: TestClient) -> None:
    for path in ("/console/missing.js", "/console/..%2Fcli.py", "/console/%2e%2e%2fmain.py"):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["message"]
    assert not any(p.startswith("/console") for p in client.get("/openapi.json").json()["paths"])
