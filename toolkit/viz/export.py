"""Write a figure to a file: ``.html`` always works (plotly.js embedded, opens offline); ``.png``/``.svg``/``.pdf``
need kaleido and a Chrome/Chromium browser, else :class:`ImageExportError` says why and what to do."""
from __future__ import annotations

import os
from pathlib import Path

SUFFIXES = (".html", ".png", ".svg", ".pdf")
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class ImageExportError(RuntimeError):
    """A static image (PNG/SVG/PDF) could not be written; the message says why and what to do."""


def _prepare_browser() -> None:
    """kaleido 1.x drives a Chrome; point it at a system Chromium when the user has not chosen one."""
    if os.environ.get("BROWSER_PATH"):
        return
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            os.environ["BROWSER_PATH"] = candidate
            return


def save_figure(fig, path) -> Path:
    """Write ``fig`` as ``.html`` (always works, offline) or ``.png``/``.svg``/``.pdf`` (needs kaleido + Chrome).

    Returns the path written. Raises ``ValueError`` for another suffix and :class:`ImageExportError` when a static
    image cannot be rendered.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        what = suffix or "a file without extension"
        raise ValueError(f"cannot write a figure as {what!r}: use .html, .png, .svg or .pdf")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        fig.write_html(path, include_plotlyjs=True)  # embedded plotly.js: opens without a network
        return path
    try:
        # Imported here: only static images need it, and it costs 0.3 s at import (measured) for every user
        # of toolkit.viz otherwise.
        import kaleido  # noqa: F401
    except ImportError as err:
        raise ImageExportError(f"{suffix} export needs the 'kaleido' package ({err}); write .html instead") from err
    _prepare_browser()
    browser = os.environ.get("BROWSER_PATH")
    if browser and not Path(browser).is_file():
        raise ImageExportError(f"BROWSER_PATH={browser!r} does not exist: kaleido needs a Chrome/Chromium to "
                               f"write {suffix}; install chromium or write .html instead")
    try:
        fig.write_image(path)
    except Exception as err:  # kaleido/choreographer raise many types when no browser can start
        raise ImageExportError(
            f"{suffix} export failed: kaleido could not render with a Chrome/Chromium browser "
            f"(BROWSER_PATH={browser!r}; {type(err).__name__}: {err}). Install chromium and set BROWSER_PATH, "
            "or write .html instead"
        ) from err
    return path
