"""A real headless browser for the HTML pages cogvx writes (Debian's chromium), and parsers of what it saw."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Lets the page's timers run until every video has its metadata, without waiting in real time.
    "--virtual-time-budget=15000",
]


def chromium() -> str:
    found = os.environ.get("COGVX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("CI is set but chromium is missing: .ci/run installs it with `apt-get install chromium`.")
    pytest.skip("chromium is not installed (`apt-get install chromium`); CI installs it and runs this test.")


def dump_dom(page: Path) -> str:
    """The DOM after the page's scripts ran, as a headless browser sees it."""
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Elements(HTMLParser):
    """Start tags with their attributes, and the text, of a dumped DOM."""

    def __init__(self, dom: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(re.search(v, a.get(k.rstrip("_").replace("_", "-"), "")) for k, v in attrs.items())
        ]


class KeyValueTables(HTMLParser):
    """Every ``<table class="kv">`` of a page as {row header: cell text}, in page order."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[dict[str, str]] = []
        self._cell: str | None = None  # "th" or "td" while inside one of a kv table
        self._row: dict[str, str] = {}
        self._in_kv = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._in_kv = "kv" in (dict(attrs).get("class") or "").split()
            if self._in_kv:
                self.tables.append({})
        elif self._in_kv and tag in ("th", "td"):
            self._cell, self._row[tag] = tag, ""

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._cell = None
        elif tag == "tr" and self._in_kv and "th" in self._row:
            self.tables[-1][self._row["th"]] = self._row.get("td", "")
            self._row = {}
        elif tag == "table":
            self._in_kv = False

    def handle_data(self, data):
        if self._cell:
            self._row[self._cell] += data


class Tables(HTMLParser):
    """The rows of every table of a page as lists of cell texts (th and td alike), by the table's id."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows: list[list[str]] | None = None
        self._in_cell = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id") or f"table-{len(self.tables)}", [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("th", "td") and self._rows is not None:
            self._rows[-1].append("")
            self._in_cell = True

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._in_cell = False
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._in_cell and self._rows:
            self._rows[-1][-1] += data
