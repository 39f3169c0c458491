"""Who may reach the dashboard and whose files a browser may fetch (toolkit.dashboard.access, app.py's flags)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import FileResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from toolkit.dashboard import access

ROOT = Path(__file__).resolve().parents[1]


def _app_module():
    spec = importlib.util.spec_from_file_location("dashboard_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5", "--share"]])
def test_serving_beyond_this_machine_without_authentication_is_refused(argv, monkeypatch, capsys):
    monkeypatch.delenv(access.AUTH_ENV, raising=False)
    with pytest.raises(SystemExit):
        _app_module().parse_args(argv)
    assert "needs authentication" in capsys.readouterr().err
    with pytest.raises(access.AccessError, match="needs authentication"):
        access.require_auth(argv[-1] if "--host" in argv else "127.0.0.1", "--share" in argv, None)


def test_authentication_comes_from_a_private_file_or_the_environment(tmp_path, monkeypatch):
    app = _app_module()
    monkeypatch.delenv(access.AUTH_ENV, raising=False)
    accounts = tmp_path / "accounts"
    accounts.write_text("ada:s3cret\n# a comment\nbob:pa:ss\n")
    accounts.chmod(0o644)
    with pytest.raises(SystemExit):   # others may read it: refused
        app.parse_args(["--share", "--auth-file", str(accounts)])
    accounts.chmod(0o600)
    args = app.parse_args(["--host", "0.0.0.0", "--auth-file", str(accounts)])
    assert args.auth == [("ada", "s3cret"), ("bob", "pa:ss")]
    monkeypatch.setenv(access.AUTH_ENV, "carol:pw")
    assert app.parse_args(["--share"]).auth == [("carol", "pw")]
    assert app.parse_args([]).auth == [("carol", "pw")]
    monkeypatch.setenv(access.AUTH_ENV, "nopassword")
    with pytest.raises(access.AccessError, match="user:password"):
        access.auth_from(None)


def test_a_browser_cannot_fetch_another_browsers_files_even_with_the_url(tmp_path):
    root = tmp_path / "gradio"
    (root / "a1b2").mkdir(parents=True)
    secret = root / "a1b2" / "model.zip"
    secret.write_bytes(b"the model of A")
    outside = tmp_path / "public.txt"
    outside.write_text("not one of the app's files")

    async def page(request):
        return PlainTextResponse("the page")

    async def events(request):   # the event stream that hands A its download
        return PlainTextResponse(f'data: {{"path": "{secret}", "url": "/gradio_api/file={secret}"}}\n\n')

    async def file(request):
        return FileResponse(request.path_params["path"])

    app = Starlette(routes=[Route("/", page), Route("/gradio_api/queue/data", events),
                            Route("/gradio_api/file={path:path}", file)],
                    middleware=[Middleware(access.FileOwners, root=str(root))])
    alice, bob, stranger = TestClient(app), TestClient(app), TestClient(app)
    alice.get("/")
    bob.get("/")
    assert alice.cookies.get(access.OWNER_COOKIE) != bob.cookies.get(access.OWNER_COOKIE)
    url = f"/gradio_api/file={secret}"
    assert bob.get(url).status_code == 404             # not named to anyone yet: refused
    alice.get("/gradio_api/queue/data")               # A's own stream names it: it is A's
    assert alice.get(url).status_code == 200 and alice.get(url).content == b"the model of A"
    assert bob.get(url).status_code == 404              # B has the URL: refused, no hint it exists
    bob.get("/gradio_api/queue/data")                 # B cannot take it over by having it named to him later
    assert bob.get(url).status_code == 404
    assert stranger.get(url).status_code == 404         # no cookie at all
    assert bob.get(f"/gradio_api/file={root}/a1b2/../a1b2/model.zip").status_code == 404
    assert bob.get(f"/gradio_api/file={outside}").status_code == 200   # not the app's: Gradio's checks decide


def test_the_app_refuses_to_start_a_share_link_without_authentication(monkeypatch):
    """The real command line: ``python app.py --share`` stops before serving anything."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != access.AUTH_ENV}
    done = subprocess.run([sys.executable, "app.py", "--share", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs authentication" in done.stderr, done.stderr[-500:]
    assert "Running on" not in done.stdout
