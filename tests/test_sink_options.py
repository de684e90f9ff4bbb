"""Sink options declared once: validation, masking, check-config output and the docs agree.

Also the pieces every sink shares: the one secret reader and the one scrubber.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import structlog

from modelwatch.credentials import Scrubber, mask_url, read_secret, url_credentials
from modelwatch.errors import ConfigError
from modelwatch.sinks import shown_options
from modelwatch.sinks.options import (
    BOOLEAN,
    REQUIRED,
    STRING,
    Option,
    SinkOptions,
    secret_sources,
)
from modelwatch.testing import sink_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = ("stdout", "jsonl", "webhook", "command", "nats", "redis", "mlflow")
BEGIN = (
    "<!-- sink-keys: generated from each sink's OPTIONS; tests/test_sink_options.py checks it -->"
)
END = "<!-- end of sink-keys -->"


def declaration(sink_type: str) -> SinkOptions:
    """The OPTIONS of a built-in sink, found as the daemon finds it: by entry point."""
    (ep,) = (ep for ep in entry_points(group="modelwatch.sinks") if ep.name == sink_type)
    options: SinkOptions = ep.load().OPTIONS
    return options


def sink_key_tables() -> str:
    """The README's sink-keys block, from the declarations."""
    return "\n".join(f"#### `{name}`\n\n{declaration(name).markdown()}\n" for name in BUILT_IN)


def test_readme_sink_tables_are_the_declarations() -> None:
    """The README's tables of sink keys say what each sink's OPTIONS declare."""
    readme = (ROOT / "README.md").read_text("utf-8")
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    expected = sink_key_tables().strip("\n")
    assert block == expected, f"replace the README block between the markers with:\n{expected}"


def test_example_config_shows_every_declared_sink_key() -> None:
    """config.example.toml's sink sections name every key each built-in sink declares."""
    text = (ROOT / "config.example.toml").read_text("utf-8")
    uncommented = re.sub(r"(?m)^#(?=[^\s#]|    )", "", text)
    sections = {
        sink["type"]: sink for sink in tomllib.loads(uncommented)["sinks"] if "type" in sink
    }
    missing = {
        name: [key for key in declaration(name).options if key not in sections[name]]
        for name in BUILT_IN
    }
    assert {name: keys for name, keys in missing.items() if keys} == {}


def test_check_config_shows_defaults_and_masks_what_the_declaration_says() -> None:
    """A declared sink is shown with its defaults filled in; URL queries, passwords and header
    values are masked, the names of variables and files are shown as written."""
    config = sink_config(
        "webhook",
        options={
            "url": "https://hooks.example/in?team=ml&region=eu",
            "headers": {"X-Team": "ml"},
            "headers_env": {"Authorization": "HOOK_AUTH"},
            "secret_file": "/run/secrets/hook",
        },
    )
    assert shown_options(config) == {
        "url": "https://hooks.example/in?team=***&region=***",
        "secret_file": "/run/secrets/hook",
        "timeout_seconds": 15.0,
        "insecure_skip_verify": False,
        "mode": "structured",
        "headers": {"X-Team": "***"},
        "headers_env": {"Authorization": "HOOK_AUTH"},
        "headers_file": {},
    }


def test_a_key_replaced_by_its_alternative_gets_no_default() -> None:
    """With url_env given, nats shows no default `servers` next to it."""
    shown = shown_options(sink_config("nats", options={"url_env": "NATS_URL"}))
    assert "servers" not in shown
    assert shown["url_env"] == "NATS_URL"


def test_undeclared_plugin_options_are_masked_by_their_names() -> None:
    """A plugin sink without OPTIONS is shown as written, secret-looking values masked."""
    config = sink_config("no-such-plugin", options={"api_key": "k-1", "region": "eu"})
    assert shown_options(config) == {"api_key": "***", "region": "eu"}


PLUGIN = SinkOptions(
    Option("path", STRING, "where", REQUIRED),
    Option("verbose", BOOLEAN, "more", False),
    *secret_sources("token", "the token"),
    exclusive=[("token_env", "token_file")],
)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "sinks[0].path: required for a plugin sink"),
        ({"path": 3}, "sinks[0].path: must be a string, got integer 3"),
        ({"path": "p", "verbos": True}, "sinks[0].verbos: unknown key for a plugin sink (did you"),
        ({"path": "p", "colour": 1}, "sinks[0].colour: unknown key for a plugin sink (valid: "),
        ({"path": "p", "verbose": "yes"}, "sinks[0].verbose: must be true or false"),
        (
            {"path": "p", "token_env": "A", "token_file": "b"},
            "sinks[0].token_file: give one of token_env or token_file, not both",
        ),
    ],
)
def test_declared_options_are_validated_naming_the_key(
    options: dict[str, Any], message: str
) -> None:
    """Wrong, missing, unknown and clashing keys are ConfigErrors that start with the key."""
    with pytest.raises(ConfigError) as caught:
        PLUGIN.parse(sink_config("plugin", options=options))
    assert str(caught.value).startswith(message)


def test_parse_fills_defaults_and_reads_secrets_into_the_scrubber(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Values carry the defaults; a secret read through them is scrubbed from messages."""
    monkeypatch.setenv("PLUGIN_TOKEN", "tok-4711")
    values = PLUGIN.parse(sink_config("plugin", options={"path": "p", "token_env": "PLUGIN_TOKEN"}))
    assert (values["path"], values["verbose"]) == ("p", False)
    assert values.secret("token") == "tok-4711"
    assert values.scrub("refused tok-4711") == "refused ***"


# --- the one secret reader ----------------------------------------------------------------


def test_a_secret_file_others_may_read_is_warned_about(tmp_path: Path) -> None:
    """A group- or world-readable secret file is read, with a warning naming the key; a
    private one (0600) draws none. The secret is in neither."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    for path in (shared, private):
        path.write_text("s3cret-value\n")
    shared.chmod(0o644)
    private.chmod(0o600)
    with structlog.testing.capture_logs() as logs:
        assert read_secret("sinks[0].token_file", path=str(shared)) == "s3cret-value"
        assert read_secret("sinks[1].token_file", path=str(private)) == "s3cret-value"
    assert [(e["event"], e["key"], e["mode"]) for e in logs] == [
        ("secret_file_readable", "sinks[0].token_file", "0644")
    ]
    assert "s3cret-value" not in repr(logs)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"variable": "MODELWATCH_UNSET_VARIABLE"}, "k: environment variable "),
        ({"path": "/nonexistent/secret"}, "k: cannot read /nonexistent/secret"),
    ],
)
def test_a_missing_secret_names_the_key_and_where_it_was_looked_for(
    source: dict[str, str], message: str
) -> None:
    """An unset variable or an unreadable file is a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        read_secret("k", **source)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    """A file with only whitespace is no secret."""
    (tmp_path / "s").write_text(" \n")
    (tmp_path / "s").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_secret("k", path=str(tmp_path / "s"))


# --- recognising and masking ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "found"),
    [
        ("https://hooks.example/in", None),
        ("https://hooks.example/in?team=ml&design=x&author=a", None),
        ("redis://:pw@redis:6379/0", "a user or password"),
        ("nats://s3cr3t@nats:4222", "a user or password"),
        ("https://h.example/x?token=t", "a credential in the URL query (token=)"),
        ("https://h.example/x?api_key=k", "a credential in the URL query (api_key=)"),
        ("https://h.example/x?accessToken=k", "a credential in the URL query (accessToken=)"),
        ("https://h.example/x?sv=1&sig=abc", "a credential in the URL query (sig=)"),
        ("https://f.azurewebsites.net/api/x?code=abc", "a credential in the URL query (code=)"),
    ],
)
def test_credentials_in_urls_are_recognised(url: str, found: str | None) -> None:
    """Userinfo and credential-looking query parameters are found; ordinary ones are not."""
    result = url_credentials(url)
    assert (result is None) if found is None else (result or "").startswith(found)


def test_mask_url_hides_password_query_values_and_fragment() -> None:
    """Only scheme, host, port and path stay readable."""
    assert mask_url("redis://user:pw@h:1/0?ssl=true#frag") == "redis://user:***@h:1/0?ssl=***#***"
    assert mask_url("nats://TOKEN@h:4222") == "nats://***@h:4222"


def test_the_scrubber_removes_secrets_in_every_form_a_server_echoes_them() -> None:
    """Plain, percent-encoded and JSON-escaped copies of a secret, and URL credentials in the
    text, all become ***; the result is one line."""
    scrub = Scrubber(["a/b+c=d"])
    text = 'got a/b+c=d, a%2Fb%2Bc%3Dd and "a\\/b+c=d"\nfrom redis://u:pw@h/0?token=zz'
    assert scrub(text) == 'got ***, *** and "***" from redis://u:***@h/0?token=***'


def test_the_scrubber_shortens_long_text() -> None:
    """A long message is cut, and says so."""
    assert Scrubber()("x" * 600, limit=10) == "x" * 10 + "..."
