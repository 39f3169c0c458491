"""Who may reach the dashboard and whose files a browser may fetch.

* :func:`auth_from` reads the accounts for Gradio's own ``auth``: ``--auth-file`` (``user:password`` lines, a file
  only its owner can read) or the ``DUALPRIV_APP_AUTH`` environment variable, so no password has to be typed on a
  command line (and land in the shell's history). :func:`require_auth` refuses to serve beyond this machine
  (a host other than loopback, or ``--share``) without one.
* :class:`FileOwners` (an ASGI middleware): every browser gets a random owner cookie; a file the app keeps under
  its temporary folder (uploads, exports, run settings, CSVs, images) belongs to the browser whose own event
  stream or upload first named it, and ``/file=`` requests for it from any other browser (another session, or
  someone holding the URL) are refused with 404 and no hint that it exists.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote

OWNER_COOKIE = "dualpriv_owner"
AUTH_ENV = "DUALPRIV_APP_AUTH"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# responses that name the files a browser was given: its event stream and its uploads
_NAMING_PATHS = ("/queue/data", "/upload", "/queue/join", "/run/", "/call/")


class AccessError(ValueError):
    """The server may not start as asked (no authentication where it is required, an unusable auth file)."""


def _accounts(text: str, where: str) -> list[tuple[str, str]]:
    accounts = []
    for line in re.split(r"[\n,]", text):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise AccessError(f"{where}: each account is 'user:password' with neither part empty")
        accounts.append((user, password))
    if not accounts:
        raise AccessError(f"{where} holds no account ('user:password')")
    return accounts


def auth_from(auth_file: str | None = None, environ=None) -> list[tuple[str, str]] | None:
    """The accounts of ``auth_file`` (refused when others may read it) or of ``$DUALPRIV_APP_AUTH``; None if
    neither is given."""
    environ = os.environ if environ is None else environ
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise AccessError(f"--auth-file {auth_file!r} is not a file")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AccessError(f"--auth-file {auth_file!r} can be read by other users: chmod 600 it first")
        return _accounts(path.read_text(), f"--auth-file {auth_file!r}")
    if environ.get(AUTH_ENV):
        return _accounts(environ[AUTH_ENV], f"${AUTH_ENV}")
    return None


def require_auth(host: str, share: bool, auth) -> None:
    """Refuse (:class:`AccessError`) to serve people's images beyond this machine without authentication."""
    if auth:
        return
    if share or host not in LOOPBACK:
        where = "a public --share link" if share else f"--host {host}"
        raise AccessError(f"{where} serves the dashboard (and the images people upload) beyond this machine, so "
                          f"it needs authentication: put 'user:password' in a file only you can read and pass "
                          f"--auth-file FILE, or set ${AUTH_ENV}")


def _owner(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            cookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header: no owner
                return None
            if OWNER_COOKIE in cookie:
                return cookie[OWNER_COOKIE].value
    return None


class FileOwners:
    """ASGI middleware: owner cookies, and ``/file=`` requests under ``root`` allowed to their owner only."""

    def __init__(self, app, root: str | os.PathLike | None = None):
        self.app = app
        given = os.path.abspath(root or os.environ.get("GRADIO_TEMP_DIR") or "/nonexistent")
        self.root = os.path.realpath(given)
        roots = "|".join(re.escape(r) for r in {given, self.root})
        self._named = re.compile(rf"(?:{roots})/([^/\"\\]+)/")
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def _entry(self, path: str) -> str | None:
        """The top folder under ``root`` that ``path`` lies in (the cache's per-file folder), or None."""
        real = os.path.realpath(path)
        if not real.startswith(self.root + os.sep):
            return None
        return real[len(self.root) + 1:].split(os.sep, 1)[0]

    def claim(self, owner: str, text: str) -> None:
        """Every file under ``root`` that ``text`` (a response to ``owner``) names now belongs to ``owner``,
        unless another owner was named first."""
        with self._lock:
            for entry in self._named.findall(text):
                self._owners.setdefault(entry, owner)

    def allowed(self, owner: str | None, path: str) -> bool:
        entry = self._entry(path)
        if entry is None:
            return True   # not one of the app's files: Gradio's own checks decide
        with self._lock:
            return owner is not None and self._owners.get(entry) == owner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        owner = _owner(scope)
        new_owner = None
        if owner is None:
            owner = new_owner = secrets.token_urlsafe(24)
        path = scope.get("path", "")
        if "/file=" in path and not self.allowed(None if new_owner else owner, unquote(path.split("/file=", 1)[1])):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            return await send({"type": "http.response.body", "body": b"Not found"})
        names_files = any(part in path for part in _NAMING_PATHS)

        async def watched(message):
            if message["type"] == "http.response.start" and new_owner:
                cookie = f"{OWNER_COOKIE}={new_owner}; Path=/; HttpOnly; SameSite=Strict"
                message = dict(message, headers=list(message.get("headers", [])) + [(b"set-cookie", cookie.encode())])
            elif message["type"] == "http.response.body" and names_files and message.get("body"):
                self.claim(owner, message["body"].decode("utf-8", "replace"))
            await send(message)

        return await self.app(scope, receive, watched)
