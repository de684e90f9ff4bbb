"""Third-party sinks: discovered through the `modelwatch.sinks` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from modelwatch.sinks import load_factories
from tests.daemons import daemon_env
from tests.writers import write_safetensors

PLUGIN = '''
"""A third-party sink that appends "<prefix> <id> <type>" lines to a file."""

from modelwatch.config import SinkConfig
from modelwatch.events import Event
from modelwatch.sinks import check_options


class LineSink:
    def __init__(self, config: SinkConfig) -> None:
        check_options(config, {"path": str, "prefix": str}, required=("path",))
        self.name = config.name
        self.path = config.options["path"]
        self.prefix = config.options.get("prefix", "")

    def send(self, event: Event) -> None:
        with open(self.path, "a") as f:
            f.write(f"{self.prefix} {event.id} {event.short_type}\\n")

    def close(self) -> None:
        pass
'''


def install_plugin(site: Path) -> None:
    """Lay out an installed distribution (module + .dist-info with entry points) in `site`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "linesink_plugin.py").write_text(PLUGIN)
    info = site / "linesink_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: linesink-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[modelwatch.sinks]\nlines = linesink_plugin:LineSink\n")
    (info / "RECORD").write_text("")


def test_builtin_sinks_come_from_entry_points() -> None:
    """stdout, jsonl, webhook and command are registered like any plugin."""
    assert {"stdout", "jsonl", "webhook", "command"} <= set(load_factories())


def test_third_party_sink_is_configured_by_type(tmp_path: Path) -> None:
    """An installed distribution's sink is found by its entry-point name and receives events,
    filtered by event_types."""
    site = tmp_path / "site"
    install_plugin(site)
    models, out = tmp_path / "models", tmp_path / "lines.txt"
    (models / "exp").mkdir(parents=True)
    write_safetensors(models / "exp" / "model.safetensors", {"w": 10})
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""\
        [daemon]
        state_dir = "{tmp_path / "state"}"
        [defaults]
        settle_seconds = 0.2
        [[roots]]
        path = "{models}"
        unit_depth = 1
        [[sinks]]
        type = "lines"
        path = "{out}"
        prefix = "plugin"
        event_types = ["registered"]
        [[sinks]]
        type = "lines"
        name = "removals"
        path = "{tmp_path / "removed.txt"}"
        event_types = ["removed"]
        """)
    )
    env = daemon_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "modelwatch", "scan", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (line,) = out.read_text().splitlines()
    prefix, event_id, kind = line.split()
    assert (prefix, kind) == ("plugin", "registered")
    assert len(event_id) == 64
    assert not (tmp_path / "removed.txt").exists()
    status = subprocess.run(
        [sys.executable, "-m", "modelwatch", "status", "--config", str(config), "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(status.stdout)["sinks"] == []  # nothing left undelivered
