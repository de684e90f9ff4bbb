"""The status page in a real headless browser (Debian's chromium), against a real daemon:
roots, pending units with their reasons, recent events and sinks are found in the page the
browser builds with JavaScript off; a screenshot is kept as a test artifact. The JSON behind
it is fetched over the same health port (SPEC §9)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest

from tests.conftest import wait_until
from tests.daemons import daemon_env, daemon_process, jsonl_records
from tests.writers import write_hf_sharded, write_onnx, write_safetensors

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Where the screenshot is kept (CI collects this directory).
ARTIFACTS = Path(os.environ.get("MODELWATCH_TEST_ARTIFACTS", REPO / "test-artifacts"))
WINDOW = (1280, 1000)
# The flags that work on this kind of machine: no sandbox (root), no GPU, and none of the
# background connections a closed network refuses.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class Page(HTMLParser):
    """The parts of the page the test looks for: each table row's data attributes, text,
    reason codes and links, by section."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.foreign: list[str] = []  # elements that would run or load something
        self._section = ""
        self._row: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in ("script", "link", "img", "iframe"):
            self.foreign.append(tag)
        if tag == "section":
            self._section = attributes.get("id") or ""
        elif tag == "tr" and self._section:
            self._row = {"attrs": attributes, "text": "", "codes": [], "links": []}
        elif self._row is not None and tag == "li":
            self._row["codes"].append(attributes.get("data-code"))
        elif self._row is not None and tag == "a":
            self._row["links"].append(attributes.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self._row["text"] += data


def health_port(log: IO[str]) -> int:
    """The port the daemon's health server bound (health_listen asks for port 0)."""
    for line in log:
        if '"health_listening"' in line:
            return int(json.loads(line)["port"])
    raise AssertionError("the daemon exited before its health server listened")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (a 127.0.0.1 URL)
        assert response.headers["Content-Type"] == "application/json"
        return json.loads(response.read())


@pytest.fixture
def daemon_with_units(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A daemon with a health port over a root holding pending, registered and rejected
    models; yields its base URL once every one of them is where the test expects it."""
    root = tmp_path / "models"
    (root / "writing").mkdir(parents=True)
    write_safetensors(root / "writing" / "model.safetensors", {"w": 64})
    (root / "writing" / "optimizer.pt.part").write_bytes(b"\0")
    write_hf_sharded(root / "sharded", skip_shard=2)
    for name in ("done", "bad-meta"):
        (root / name).mkdir()
        write_onnx(root / name / "model.onnx")
    (root / "bad-meta" / "gradient-model-metadata.json").write_text("{,}")
    events = tmp_path / "events.jsonl"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nhealth_listen = "127.0.0.1:0"\n'
        f'[[roots]]\npath = "{root}"\nunit_depth = 1\nsettle_seconds = 0.5\n'
        f'[[sinks]]\ntype = "jsonl"\npath = "{events}"\n'
    )
    env = daemon_env(MODELWATCH_LOG_FORMAT="json")
    with daemon_process(config, env=env, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        base = f"http://127.0.0.1:{health_port(proc.stderr)}"
        wait_until(lambda: len(jsonl_records(events)) >= 2, timeout=30)

        def both_explained() -> bool:
            pending = get_json(base + "/api/status")["pending"]
            return sorted((p["path"], p["reasons"][0]["code"]) for p in pending) == [
                (str(root / "sharded"), "incomplete"),
                (str(root / "writing"), "in_progress"),
            ]

        wait_until(both_explained, timeout=30)
        yield base, root


def test_the_status_page_shows_roots_pending_units_with_reasons_events_and_sinks(
    daemon_with_units: tuple[str, Path], tmp_path: Path
) -> None:
    """In chromium, the page lists the root as available, both pending units with the file
    each waits for, the registered and the rejected event, and the sink, with no script and
    nothing loaded from elsewhere; each unit links to its JSON, which explains it; a
    screenshot is kept."""
    base, root = daemon_with_units
    dom = chromium(tmp_path / "profile", "--dump-dom", base + "/").stdout
    page = Page()
    page.feed(dom)
    assert page.foreign == []

    (root_row,) = page.rows["roots"][1:]  # after the header row
    assert root_row["attrs"]["data-root"] == str(root) and "available" in root_row["text"]
    pending = {r["attrs"]["data-unit"]: r for r in page.rows["pending"][1:]}
    assert set(pending) == {str(root / "writing"), str(root / "sharded")}
    writing, sharded = pending[str(root / "writing")], pending[str(root / "sharded")]
    # (a unit being re-checked as the page is built also shows `checking`, last)
    assert writing["codes"][0] == "in_progress" and "optimizer.pt.part" in writing["text"]
    assert sharded["codes"][0] == "incomplete"
    assert "model-00002-of-00003.safetensors missing" in sharded["text"]
    assert "model.safetensors.index.json" in sharded["text"]
    events = " | ".join(r["text"] for r in page.rows["events"][1:])
    assert "registered" in events and str(root / "done") in events
    assert "rejected" in events and "metadata_syntax" in events
    (sink,) = page.rows["sinks"][1:]
    assert sink["attrs"]["data-sink"] == "jsonl"

    link = sharded["links"][0]
    assert link == "/api/units/" + quote(str(root / "sharded"), safe="")
    report = get_json(base + link)
    assert report["state"] == "pending" and report["answered_by"] == "daemon"
    assert report["reasons"][0]["files"][0] == "model-00002-of-00003.safetensors"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    chromium(tmp_path / "profile-shot", f"--screenshot={shot}", size, base + "/")
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == WINDOW


def test_a_unit_under_no_root_is_a_404_with_a_reason(
    daemon_with_units: tuple[str, Path],
) -> None:
    """`/api/units/` of a path outside every root answers 404 with JSON saying so."""
    base, _root = daemon_with_units
    with pytest.raises(urllib.error.HTTPError) as raised:
        get_json(base + "/api/units/" + quote("/elsewhere/exp-1", safe=""))
    assert raised.value.code == 404
    assert "under no watched root" in json.loads(raised.value.read())["error"]
