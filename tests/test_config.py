"""Configuration: the TOML file, environment overrides, PATH arguments and check-config output."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelwatch.config import (
    DEFAULT_IGNORE,
    DEFAULT_IN_PROGRESS,
    EVENT_TYPES,
    ClusterConfig,
    Config,
    DaemonConfig,
    MetadataConfig,
    RootConfig,
    SinkConfig,
    UnitPolicy,
    default_state_dir,
    find_config_file,
    load_config,
    parse_config,
    render_toml,
    with_cli_roots,
)
from modelwatch.credentials import mask_options
from modelwatch.errors import ConfigError
from tests.conftest import examples

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
ENV = {"STATE_DIRECTORY": "/var/lib/modelwatch-test"}


def write(tmp_path: Path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] = ENV) -> Config:
    return load_config(write(tmp_path, text), environ)


def error_of(tmp_path: Path, text: str, environ: Mapping[str, str] = ENV) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    return str(caught.value)


# --- defaults --------------------------------------------------------------------------------


def test_no_file_gives_gradient_roots_and_one_stdout_sink() -> None:
    """Without a config file: the three Gradient roots, default policy, one stdout sink."""
    config = load_config(None, ENV)
    assert [(r.path, r.unit_depth) for r in config.roots] == [
        ("/artifacts", 0),
        ("/storage/models", 1),
        ("/shared/models", 1),
    ]
    assert all(root.policy == UnitPolicy() for root in config.roots)
    assert config.defaults == UnitPolicy()
    assert config.metadata == MetadataConfig()
    assert config.daemon == DaemonConfig(state_dir="/var/lib/modelwatch-test")
    assert config.sinks == (SinkConfig(type="stdout", name="stdout", event_types=EVENT_TYPES),)
    assert config.source is None


def test_empty_file_means_the_defaults(tmp_path: Path) -> None:
    """An empty file gives the built-in defaults, and records which file was used."""
    path = write(tmp_path, "")
    config = load_config(path, ENV)
    assert dataclasses.replace(config, source=None) == load_config(None, ENV)
    assert config.source == path


def test_default_patterns_cover_the_documented_cases() -> None:
    """The default ignore and in-progress globs match the files SPEC section 2 names."""
    from fnmatch import fnmatchcase

    def matches(patterns: tuple[str, ...], rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return any(
            fnmatchcase(rel if "/" in p.rstrip("/") else name, p.rstrip("/")) for p in patterns
        )

    for name in ("events.out.tfevents.1700000000.host", "train.log", ".x.swp", ".nfs0001", "a~"):
        assert matches(DEFAULT_IGNORE, name), name
    assert matches(DEFAULT_IGNORE, "__pycache__") and matches(DEFAULT_IGNORE, ".ipynb_checkpoints")
    in_progress = [
        "model.ckpt.tempstate123",
        "saved_model.pb.tmp" + "0123456789abcdef" * 2,
        ".weights.bin.Ab12Cd",
        "model.safetensors.part",
        "x.partial",
        "x.incomplete",
        "ckpt.orbax-checkpoint-tmp-1700000000",
        ".metadata.tmp",
        "ckpt-1_temp/part-00000-of-00001.data-00000-of-00001",
        "variables/variables_temp/part-00000-of-00001.index",
        "model.ckpt-5_temp_" + "0123456789abcdef" * 2 + "/part-00000-of-00001.index",
    ]
    for name in in_progress:
        assert matches(DEFAULT_IN_PROGRESS, name), name
    for name in (
        "saved_model.pb",
        "model.tmp" + "0" * 31,
        ".metadata",
        "model.onnx",
        "config.json",
    ):
        assert not matches(DEFAULT_IN_PROGRESS, name), name


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    """The parsed configuration cannot be modified, not even a sink's options."""
    config = load_text(tmp_path, '[[sinks]]\ntype = "jsonl"\npath = "/tmp/e.jsonl"\n')
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.daemon.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.sinks[0].options["path"] = "/elsewhere"  # type: ignore[index]


# --- validation errors --------------------------------------------------------------------

ERRORS = [
    # (TOML document, the error message starts with)
    (
        '[defaults]\nsettle_seconds = "fast"',
        "defaults.settle_seconds: must be a number, got string 'fast'",
    ),
    (
        "[defaults]\nsettle_seconds = true",
        "defaults.settle_seconds: must be a number, got boolean true",
    ),
    ("[defaults]\nsettle_seconds = 0", "defaults.settle_seconds: must be > 0, got 0"),
    (
        "[defaults]\nsettle_seconds = nan",
        "defaults.settle_seconds: must be a finite number, got nan",
    ),
    ("[defaults]\nsettle_seconds = 1e12", "defaults.settle_seconds: must be <= 1000000000"),
    ("[defaults]\nmax_wait_seconds = -1.5", "defaults.max_wait_seconds: must be > 0, got -1.5"),
    (
        "[defaults]\nmax_wait_seconds = 1",
        "defaults.max_wait_seconds: must be >= settle_seconds (5.0), got 1.0",
    ),
    (
        "[defaults]\nsettle_seconds = 7200",
        "defaults.settle_seconds: must be <= max_wait_seconds (3600.0), got 7200.0",
    ),
    (
        "[defaults]\npoll_interval_seconds = [1]",
        "defaults.poll_interval_seconds: must be a number, got array [1]",
    ),
    (
        '[defaults]\nobserver = "fanotify"',
        "defaults.observer: must be one of auto, inotify, polling, got 'fanotify'",
    ),
    (
        '[defaults]\nmodel_type = "PyTorch"',
        "defaults.model_type: must be one of auto, Tensorflow, ONNX, Custom, got 'PyTorch'",
    ),
    (
        '[defaults]\ncontent_digest = "md5"',
        "defaults.content_digest: must be one of none, sha256, got 'md5'",
    ),
    (
        "[defaults]\ncontent_digest = 256",
        "defaults.content_digest: must be a string, got integer 256",
    ),
    (
        '[defaults]\nrequire_marker = "/done"',
        "defaults.require_marker: must be a file name relative to the unit, got '/done'",
    ),
    (
        '[defaults]\nrequire_marker = "../done"',
        "defaults.require_marker: must not contain '..', got '../done'",
    ),
    (
        '[defaults]\nignore = "*.log"',
        "defaults.ignore: must be an array of strings, got string '*.log'",
    ),
    (
        '[defaults]\nignore = ["*.log", ""]',
        "defaults.ignore[1]: must be a non-empty string, got string ''",
    ),
    (
        "[defaults]\nin_progress = [1]",
        "defaults.in_progress[0]: must be a non-empty string, got integer 1",
    ),
    ("[defaults]\nmax_files_per_unit = 0", "defaults.max_files_per_unit: must be >= 1, got 0"),
    (
        "[defaults]\nmax_files_per_unit = 1.5",
        "defaults.max_files_per_unit: must be an integer, got float 1.5",
    ),
    (
        "[defaults]\nunit_depth = 1",
        "defaults.unit_depth: unknown key (unit_depth belongs in a [[roots]] entry)",
    ),
    ('[[roots]]\npath = "/a"\nunit_depth = -1', "roots[0].unit_depth: must be >= 0, got -1"),
    (
        '[[roots]]\npath = "/a"\n[[roots]]\npath = "/b"\nunit_depth = -1',
        "roots[1].unit_depth: must be >= 0, got -1",
    ),
    ('[[roots]]\npath = "/a"\nunit_depth = 9', "roots[0].unit_depth: must be <= 8, got 9"),
    (
        '[[roots]]\npath = "/a"\nunit_depth = "1"',
        "roots[0].unit_depth: must be an integer, got string '1'",
    ),
    ("[[roots]]\nunit_depth = 0", "roots[0].path: required"),
    ('[[roots]]\npath = "models"', "roots[0].path: must be an absolute path, got 'models'"),
    ('[[roots]]\npath = ""', "roots[0].path: must be an absolute path, got ''"),
    ("[[roots]]\npath = 7", "roots[0].path: must be a string, got integer 7"),
    (
        '[[roots]]\npath = "/a/b/"\n[[roots]]\npath = "/a//b"',
        "roots[1].path: '/a/b' is already roots[0].path",
    ),
    (
        '[[roots]]\npath = "/a"\nsetle_seconds = 1',
        "roots[0].setle_seconds: unknown key (did you mean 'settle_seconds'?)",
    ),
    (
        '[[roots]]\npath = "/a"\nsettle_seconds = 4000',
        "roots[0].settle_seconds: must be <= max_wait_seconds (3600.0), got 4000.0",
    ),
    (
        '[[roots]]\npath = "/a"\nmax_wait_seconds = 2',
        "roots[0].max_wait_seconds: must be >= settle_seconds (5.0), got 2.0",
    ),
    ('[roots]\npath = "/a"', "roots: must be an array of tables ([[roots]]), got table"),
    ("roots = [1]", "roots[0]: must be a table, got integer 1"),
    ("daemon = 3", "daemon: must be a table, got integer 3"),
    (
        '[daemon]\nlog_level = "loud"',
        "daemon.log_level: must be one of debug, info, warning, error, got 'loud'",
    ),
    (
        '[daemon]\nlog_format = "xml"',
        "daemon.log_format: must be one of auto, console, json, got 'xml'",
    ),
    ('[daemon]\nhealth_listen = "localhost"', 'daemon.health_listen: must be "" or HOST:PORT'),
    ('[daemon]\nhealth_listen = ":9464"', 'daemon.health_listen: must be "" or HOST:PORT'),
    ('[daemon]\nhealth_listen = "::1:9464"', 'daemon.health_listen: must be "" or HOST:PORT'),
    ('[daemon]\nhealth_listen = "[zz::1]:9464"', 'daemon.health_listen: must be "" or HOST:PORT'),
    ('[daemon]\nhealth_listen = "300.1.1.1:9464"', 'daemon.health_listen: must be "" or HOST:PORT'),
    ('[daemon]\nhealth_listen = "127.0.0.1:70000"', "daemon.health_listen: port must be 0-65535"),
    (
        "[daemon]\nshutdown_timeout_seconds = -1",
        "daemon.shutdown_timeout_seconds: must be >= 0, got -1",
    ),
    (
        "[daemon]\nreconcile_interval_seconds = 0",
        "daemon.reconcile_interval_seconds: must be > 0, got 0",
    ),
    ('[daemon]\nstate_dir = ""', "daemon.state_dir: must not be empty"),
    (
        "[daemon]\nsettle_seconds = 1",
        "daemon.settle_seconds: unknown key (settle_seconds belongs in [defaults]",
    ),
    (
        '[metadata]\nfilename = "meta/data.json"',
        "metadata.filename: must be a plain file name without '/'",
    ),
    (
        '[metadata]\nfilename = ".."',
        "metadata.filename: must be a plain file name without '/', got '..'",
    ),
    ("[metadata]\nmax_bytes = 0", "metadata.max_bytes: must be >= 1, got 0"),
    ("[metadata]\nmax_depth = 0", "metadata.max_depth: must be >= 1, got 0"),
    ('[metadata]\nschema = "missing.json"', "metadata.schema: no such file '"),
    ('[[sinks]]\nname = "x"', "sinks[0].type: required"),
    ('[[sinks]]\ntype = "stdout"\n[[sinks]]\nname = "x"', "sinks[1].type: required"),
    ("[[sinks]]\ntype = 3", "sinks[0].type: must be a string, got integer 3"),
    (
        '[[sinks]]\ntype = ""',
        "sinks[0].type: must be a non-empty string without control characters",
    ),
    (
        '[[sinks]]\ntype = "webhook"\nsecret = "whsec_abc"',
        "sinks[0].secret: secrets are not allowed in the config file; "
        "use secret_env or secret_file",
    ),
    (
        '[[sinks]]\ntype = "nats"\ntoken = "t"',
        "sinks[0].token: secrets are not allowed in the config file; use token_env",
    ),
    (
        '[[sinks]]\ntype = "redis"\nPassword = "p"',
        "sinks[0].Password: secrets are not allowed in the config file",
    ),
    (
        '[[sinks]]\ntype = "jsonl"\nevent_types = ["registered", "created"]',
        "sinks[0].event_types[1]: must be one of registered, rejected, removed",
    ),
    ('[[sinks]]\ntype = "jsonl"\nevent_types = []', "sinks[0].event_types: must not be empty"),
    (
        '[[sinks]]\ntype = "jsonl"\nevent_types = "removed"',
        "sinks[0].event_types: must be an array of strings",
    ),
    ('[[sinks]]\ntype = "jsonl"\nmax_attempts = -1', "sinks[0].max_attempts: must be >= 0, got -1"),
    (
        '[[sinks]]\ntype = "webhook"\n[[sinks]]\ntype = "webhook"',
        "sinks[1].name: duplicate sink name 'webhook' (also sinks[0])",
    ),
    (
        '[[sinks]]\ntype = "a"\nname = "n"\n[[sinks]]\ntype = "b"\nname = "n"',
        "sinks[1].name: duplicate sink name 'n'",
    ),
    ("sinks = []", "sinks: must not be empty"),
    ("[deamon]", "deamon: unknown key (did you mean 'daemon'?)"),
    ("[[sink]]\ntype = 'stdout'", "sink: unknown key (did you mean 'sinks'?)"),
    (
        "[defaults]\nsetle_seconds = 1",
        "defaults.setle_seconds: unknown key (did you mean 'settle_seconds'?)",
    ),
    (
        "[metadata]\nzzz = 1",
        "metadata.zzz: unknown key (known keys: filename, max_bytes, max_depth, schema)",
    ),
    ('[defaults]\n"odd key" = 1', 'defaults."odd key": unknown key'),
]


@pytest.mark.parametrize(("document", "expected"), ERRORS)
def test_invalid_config_names_the_key_and_the_rule(
    tmp_path: Path, document: str, expected: str
) -> None:
    """Every invalid value is reported with its full key (list indices too) and the rule."""
    message = error_of(tmp_path, document)
    assert message.startswith(expected), message


def test_did_you_mean_is_the_whole_message(tmp_path: Path) -> None:
    """A misspelt key gets exactly one line: key, problem, suggestion."""
    message = error_of(tmp_path, "[defaults]\nsetle_seconds = 1\n")
    assert message == "defaults.setle_seconds: unknown key (did you mean 'settle_seconds'?)"


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error says which file, line and column, with tomllib's explanation."""
    path = write(tmp_path, '[daemon]\nlog_level = "info"\nlog_format = json\n')
    with pytest.raises(ConfigError, match=r"line 3, column 14: Invalid value$") as caught:
        load_config(path, ENV)
    assert str(caught.value).startswith(f"{path}: line 3, column 14: ")


def test_toml_error_at_end_of_document_still_has_a_position(tmp_path: Path) -> None:
    """An unterminated value is reported at the last line rather than without a position."""
    path = write(tmp_path, '[daemon]\nlog_level = "info')
    with pytest.raises(ConfigError) as caught:
        load_config(path, ENV)
    assert str(caught.value) == f"{path}: line 2, column 18: Unterminated string"


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported with their position, not as a crash."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'[daemon]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match=r"line 2, column 14: not valid UTF-8"):
        load_config(str(path), ENV)


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    """Pointing --config at a directory is a readable error naming it."""
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(str(tmp_path))}: cannot read"):
        load_config(str(tmp_path), ENV)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """A file saved with a UTF-8 BOM (some editors do that) loads normally."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'\xef\xbb\xbf[daemon]\nlog_level = "debug"\n')
    assert load_config(str(path), ENV).daemon.log_level == "debug"


# --- what valid files mean -------------------------------------------------------------------


def test_roots_inherit_defaults_and_override_single_keys(tmp_path: Path) -> None:
    """[defaults] applies to every root; a root's own keys win; list keys replace, not extend."""
    config = load_text(
        tmp_path,
        """
[defaults]
settle_seconds = 30
observer = "polling"

[[roots]]
path = "/models/a"

[[roots]]
path = "/models/b/"
unit_depth = 2
settle_seconds = 120
model_type = "tensorflow"
ignore = ["*.tmp"]
require_marker = "_SUCCESS"
""",
    )
    first, second = config.roots
    assert first == RootConfig("/models/a", 0, UnitPolicy(settle_seconds=30.0, observer="polling"))
    assert second.path == "/models/b" and second.unit_depth == 2
    assert second.policy == UnitPolicy(
        settle_seconds=120.0,
        observer="polling",
        model_type="Tensorflow",
        ignore=("*.tmp",),
        require_marker="_SUCCESS",
    )
    assert config.defaults == UnitPolicy(settle_seconds=30.0, observer="polling")


def test_choices_are_case_insensitive_and_stored_canonically(tmp_path: Path) -> None:
    """`DEBUG`, `JSON`, `onnx` are accepted and stored as debug, json, ONNX."""
    config = load_text(
        tmp_path,
        '[daemon]\nlog_level = "DEBUG"\nlog_format = "JSON"\n[defaults]\nmodel_type = "onnx"\n',
    )
    assert (config.daemon.log_level, config.daemon.log_format) == ("debug", "json")
    assert config.defaults.model_type == "ONNX"


def test_accepted_health_listen_forms(tmp_path: Path) -> None:
    """health_listen takes IPv4, host names and bracketed IPv6 with a port."""
    for listen in ("127.0.0.1:9464", "localhost:9464", "[::1]:9464", "0.0.0.0:0", "[::]:80"):
        config = load_text(tmp_path, f'[daemon]\nhealth_listen = "{listen}"\n')
        assert config.daemon.health_listen == listen


def test_sinks_keep_their_own_options_untouched(tmp_path: Path) -> None:
    """Common sink keys are parsed; every other key is passed to the sink as it was written."""
    config = load_text(
        tmp_path,
        """
[[sinks]]
type = "stdout"

[[sinks]]
type = "webhook"
name = "registry"
event_types = ["removed", "io.modelwatch.model.registered", "registered"]
max_attempts = 5
url = "https://example.com/hook"
secret_env = "HOOK_SECRET"
headers = { X-Team = "ml" }
""",
    )
    stdout, hook = config.sinks
    assert (stdout.name, stdout.key, stdout.event_types) == ("stdout", "sinks[0]", EVENT_TYPES)
    assert (hook.type, hook.name, hook.key, hook.max_attempts) == (
        "webhook",
        "registry",
        "sinks[1]",
        5,
    )
    assert hook.event_types == ("io.modelwatch.model.registered", "io.modelwatch.model.removed")
    assert dict(hook.options) == {
        "url": "https://example.com/hook",
        "secret_env": "HOOK_SECRET",
        "headers": {"X-Team": "ml"},
    }


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """A relative metadata.schema or daemon.state_dir is resolved next to the config file."""
    (tmp_path / "schema.json").write_text("{}", encoding="utf-8")
    config = load_text(
        tmp_path, '[daemon]\nstate_dir = "state"\n[metadata]\nschema = "schema.json"\n'
    )
    assert config.metadata.schema == str(tmp_path / "schema.json")
    assert config.daemon.state_dir == str(tmp_path / "state")


def test_empty_roots_array_means_no_roots_from_the_file(tmp_path: Path) -> None:
    """`roots = []` watches nothing from the file; PS_MODEL_PATH can still add its root."""
    assert load_text(tmp_path, "roots = []\n").roots == ()
    config = load_text(tmp_path, "roots = []\n", {**ENV, "PS_MODEL_PATH": "/job/model"})
    assert config.roots == (RootConfig("/job/model", 0, UnitPolicy()),)


# --- environment -------------------------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """MODELWATCH_STATE_DIR, _LOG_LEVEL and _LOG_FORMAT win over the file."""
    environ = {
        "MODELWATCH_STATE_DIR": "/srv/state",
        "MODELWATCH_LOG_LEVEL": "Warning",
        "MODELWATCH_LOG_FORMAT": "console",
    }
    config = load_text(
        tmp_path,
        '[daemon]\nstate_dir = "/file/state"\nlog_level = "debug"\nlog_format = "json"\n',
        environ,
    )
    assert (config.daemon.state_dir, config.daemon.log_level, config.daemon.log_format) == (
        "/srv/state",
        "warning",
        "console",
    )


def test_settle_seconds_from_environment_spares_roots_that_set_their_own(tmp_path: Path) -> None:
    """MODELWATCH_SETTLE_SECONDS sets the defaults and every root without its own value."""
    config = load_text(
        tmp_path,
        """
[defaults]
settle_seconds = 10
[[roots]]
path = "/a"
[[roots]]
path = "/b"
settle_seconds = 60
""",
        {**ENV, "MODELWATCH_SETTLE_SECONDS": "2.5"},
    )
    assert config.defaults.settle_seconds == 2.5
    assert [root.policy.settle_seconds for root in config.roots] == [2.5, 60.0]


def test_settle_seconds_from_environment_applies_to_default_roots() -> None:
    """Without a file, MODELWATCH_SETTLE_SECONDS reaches the built-in roots."""
    config = load_config(None, {**ENV, "MODELWATCH_SETTLE_SECONDS": "1"})
    assert {root.policy.settle_seconds for root in config.roots} == {1.0}


ENV_ERRORS = [
    (
        "MODELWATCH_SETTLE_SECONDS",
        "abc",
        "MODELWATCH_SETTLE_SECONDS: must be a number > 0, got 'abc'",
    ),
    ("MODELWATCH_SETTLE_SECONDS", "0", "MODELWATCH_SETTLE_SECONDS: must be a number > 0, got '0'"),
    (
        "MODELWATCH_SETTLE_SECONDS",
        "-3",
        "MODELWATCH_SETTLE_SECONDS: must be a number > 0, got '-3'",
    ),
    (
        "MODELWATCH_SETTLE_SECONDS",
        "nan",
        "MODELWATCH_SETTLE_SECONDS: must be a number > 0, got 'nan'",
    ),
    (
        "MODELWATCH_SETTLE_SECONDS",
        "inf",
        "MODELWATCH_SETTLE_SECONDS: must be a number > 0, got 'inf'",
    ),
    (
        "MODELWATCH_SETTLE_SECONDS",
        "7200",
        "MODELWATCH_SETTLE_SECONDS: must be <= max_wait_seconds (3600.0), got 7200.0",
    ),
    (
        "MODELWATCH_LOG_LEVEL",
        "loud",
        "MODELWATCH_LOG_LEVEL: must be one of debug, info, warning, error, got 'loud'",
    ),
    (
        "MODELWATCH_LOG_FORMAT",
        "xml",
        "MODELWATCH_LOG_FORMAT: must be one of auto, console, json, got 'xml'",
    ),
    ("PS_MODEL_PATH", "models", "PS_MODEL_PATH: must be an absolute path, got 'models'"),
]


@pytest.mark.parametrize(("variable", "value", "expected"), ENV_ERRORS)
def test_bad_environment_values_name_the_variable(variable: str, value: str, expected: str) -> None:
    """A bad override is reported with the variable's name and the value given."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, {**ENV, variable: value})
    assert str(caught.value) == expected


def test_empty_environment_variables_count_as_unset() -> None:
    """`MODELWATCH_LOG_LEVEL=` (set but empty, common in manifests) changes nothing."""
    names = (
        "MODELWATCH_LOG_LEVEL",
        "MODELWATCH_SETTLE_SECONDS",
        "PS_MODEL_PATH",
        "MODELWATCH_STATE_DIR",
    )
    assert load_config(None, {**ENV, **dict.fromkeys(names, "")}) == load_config(None, ENV)


def test_ps_model_path_adds_a_depth_zero_root(tmp_path: Path) -> None:
    """PS_MODEL_PATH adds a unit_depth 0 root with the default policy, after the others."""
    config = load_text(
        tmp_path,
        '[defaults]\nsettle_seconds = 9\n[[roots]]\npath = "/a"\nsettle_seconds = 1\n',
        {**ENV, "PS_MODEL_PATH": "/job/model/"},
    )
    assert config.roots[-1] == RootConfig("/job/model", 0, UnitPolicy(settle_seconds=9.0))
    assert len(config.roots) == 2


def test_ps_model_path_that_is_already_a_root_is_not_added_twice() -> None:
    """PS_MODEL_PATH=/artifacts (the Gradient default) keeps the existing /artifacts root."""
    config = load_config(None, {**ENV, "PS_MODEL_PATH": "/artifacts"})
    assert [root.path for root in config.roots] == [
        "/artifacts",
        "/storage/models",
        "/shared/models",
    ]


# --- state_dir ---------------------------------------------------------------------------------


def test_state_dir_precedence(tmp_path: Path) -> None:
    """MODELWATCH_STATE_DIR beats daemon.state_dir, which beats $STATE_DIRECTORY."""
    with_file = '[daemon]\nstate_dir = "/from/file"\n'
    environ = {"STATE_DIRECTORY": "/from/systemd"}
    assert load_text(tmp_path, "", environ).daemon.state_dir == "/from/systemd"
    assert load_text(tmp_path, with_file, environ).daemon.state_dir == "/from/file"
    environ["MODELWATCH_STATE_DIR"] = "/from/env"
    assert load_text(tmp_path, with_file, environ).daemon.state_dir == "/from/env"


def test_state_directory_with_several_paths_uses_the_first() -> None:
    """systemd's STATE_DIRECTORY may list several directories; the first is ours."""
    environ = {"STATE_DIRECTORY": "/var/lib/modelwatch:/var/lib/other"}
    assert load_config(None, environ).daemon.state_dir == "/var/lib/modelwatch"


def test_default_state_dir_for_root_and_for_users() -> None:
    """Root uses /var/lib/modelwatch; other users the XDG state directory."""
    assert default_state_dir({"HOME": "/home/ann"}, euid=0) == "/var/lib/modelwatch"
    assert (
        default_state_dir({"HOME": "/home/ann"}, euid=1000) == "/home/ann/.local/state/modelwatch"
    )
    xdg = {"HOME": "/home/ann", "XDG_STATE_HOME": "/xdg/state"}
    assert default_state_dir(xdg, euid=1000) == "/xdg/state/modelwatch"
    relative_xdg = {"HOME": "/home/ann", "XDG_STATE_HOME": "state"}
    assert default_state_dir(relative_xdg, euid=1000) == "/home/ann/.local/state/modelwatch"


def test_no_home_and_no_state_dir_is_a_clear_error() -> None:
    """A non-root process without HOME is told to set a state directory."""
    with pytest.raises(
        ConfigError, match=r"^daemon\.state_dir: no default .* MODELWATCH_STATE_DIR"
    ):
        default_state_dir({}, euid=1000)


# --- finding the file -------------------------------------------------------------------------


def test_config_file_lookup_order(tmp_path: Path) -> None:
    """--config, else $MODELWATCH_CONFIG, else the system file if present, else none."""
    cli, env_file, system = (
        write(tmp_path, "", name) for name in ("cli.toml", "env.toml", "sys.toml")
    )
    environ = {"MODELWATCH_CONFIG": env_file}
    assert find_config_file(cli, environ, system_path=system) == cli
    assert find_config_file(None, environ, system_path=system) == env_file
    assert find_config_file(None, {}, system_path=system) == system
    assert find_config_file(None, {}, system_path=str(tmp_path / "absent.toml")) is None


def test_explicit_config_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    """A named file that is missing is an error, never a silent fall-back to defaults."""
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(missing)}: no such file$"):
        find_config_file(missing, {})
    with pytest.raises(ConfigError, match=r"no such file \(from MODELWATCH_CONFIG\)$"):
        find_config_file(None, {"MODELWATCH_CONFIG": missing})
    with pytest.raises(ConfigError, match=r"^config: .*: no such file$"):
        load_config(missing, ENV)


# --- PATH arguments ----------------------------------------------------------------------------


def test_path_arguments_replace_the_roots(tmp_path: Path) -> None:
    """`modelwatch run A B:2` watches exactly A (depth 0) and B (depth 2) with the defaults."""
    config = load_text(tmp_path, '[defaults]\nsettle_seconds = 3\n[[roots]]\npath = "/a"\n')
    replaced = with_cli_roots(config, ["/models/x", "/models/y:2", "/odd:name"])
    policy = UnitPolicy(settle_seconds=3.0)
    assert replaced.roots == (
        RootConfig("/models/x", 0, policy),
        RootConfig("/models/y", 2, policy),
        RootConfig("/odd:name", 0, policy),
    )
    assert replaced.sinks == config.sinks


def test_relative_path_arguments_are_made_absolute(tmp_path: Path) -> None:
    """A relative PATH is taken relative to the current directory, not resolved through links."""
    roots = with_cli_roots(load_config(None, ENV), ["models:1"]).roots
    assert roots == (RootConfig(os.path.join(os.getcwd(), "models"), 1, UnitPolicy()),)


def test_no_path_arguments_keep_the_configured_roots() -> None:
    """Without PATH arguments the configured roots stay."""
    config = load_config(None, ENV)
    assert with_cli_roots(config, []) is config


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("x:-1", "PATH argument 'x:-1': depth must be 0-8, got -1"),
        ("/m:9", "PATH argument '/m:9': depth must be 0-8, got 9"),
        ("", "PATH argument '': must be a directory path"),
        (":1", "PATH argument ':1': must be a directory path"),
    ],
)
def test_bad_path_arguments_name_the_argument(argument: str, expected: str) -> None:
    """A bad PATH argument is reported as written on the command line."""
    with pytest.raises(ConfigError) as caught:
        with_cli_roots(load_config(None, ENV), [argument])
    assert str(caught.value) == expected


def test_the_same_path_twice_is_an_error() -> None:
    """Two PATH arguments naming one directory are refused."""
    with pytest.raises(ConfigError, match=r"^PATH argument '/m/:1': '/m' is given twice$"):
        with_cli_roots(load_config(None, ENV), ["/m", "/m/:1"])


# --- check-config output ----------------------------------------------------------------------

FULL = """
[daemon]
log_level = "debug"
health_listen = "[::1]:9464"
shutdown_timeout_seconds = 0
[defaults]
settle_seconds = 12
ignore = ["*.log", "weird \\"quoted\\" \\\\ name\\n", "ünïcode*"]
[metadata]
schema = "schema.json"
max_depth = 10
[[roots]]
path = "/models"
unit_depth = 1
observer = "polling"
[[roots]]
path = "/other"
[[sinks]]
type = "jsonl"
path = "/var/log/events.jsonl"
fsync = false
[[sinks]]
type = "webhook"
name = "hook"
event_types = ["registered"]
max_attempts = 3
url = "https://example.com/x"
secret_env = "HOOK_SECRET"
labels = { "X-Team" = "ml", "odd name" = "v" }
when = 1979-05-27T07:32:00Z
day = 1979-05-27
weights = [1, 2.5, inf, true, [], {}]
nested = { a = { b = [{ c = "d" }] } }
"""


def test_render_toml_round_trips(tmp_path: Path) -> None:
    """check-config output loads back into exactly the same configuration."""
    (tmp_path / "schema.json").write_text("{}", encoding="utf-8")
    environ = {**ENV, "PS_MODEL_PATH": "/job", "MODELWATCH_LOG_FORMAT": "json"}
    config = load_text(tmp_path, FULL, environ)
    rendered = render_toml(config)
    assert parse_config(tomllib.loads(rendered), environ, source=config.source) == config
    again = load_config(write(tmp_path, rendered, "rendered.toml"), environ)
    assert dataclasses.replace(again, source=config.source) == config


def test_render_toml_round_trips_the_defaults_and_empty_roots(tmp_path: Path) -> None:
    """The built-in defaults and a file with `roots = []` survive check-config output."""
    for config in (load_config(None, ENV), load_text(tmp_path, "roots = []")):
        assert parse_config(tomllib.loads(render_toml(config)), ENV, source=config.source) == config


def test_render_toml_prints_per_root_policies_in_full(tmp_path: Path) -> None:
    """Each [[roots]] entry in check-config output shows every policy key."""
    document = tomllib.loads(render_toml(load_config(None, ENV)))
    for root in document["roots"]:
        assert set(root) == {
            "path",
            "unit_depth",
            "root_marker",
            *(f.name for f in dataclasses.fields(UnitPolicy)),
        }


def test_render_toml_masks_secrets(tmp_path: Path) -> None:
    """A sink that declares no options still has secret-looking ones, URL credentials and
    header values shown as *** in check-config output and in repr."""
    config = load_text(
        tmp_path,
        """
[[sinks]]
type = "custom"
api_key = "k-123"
auth_token = "t-123"
db_password = "p-123"
client_secret_b = "s-123"
secret_env = "HOOK_SECRET"
token_file = "/run/secrets/token"
url = "redis://:p-456@redis:6379/0"
servers = ["nats://user:p-789@nats:4222", "nats://t-000@nats2:4222"]
headers = { Authorization = "Bearer t-999", X-Team = "ml" }
""",
    )
    rendered = render_toml(config)
    sink = tomllib.loads(rendered)["sinks"][0]
    for secret in ("k-123", "t-123", "p-123", "s-123", "p-456", "p-789", "t-000", "t-999"):
        assert secret not in rendered
        assert secret not in repr(config)
    assert sink["api_key"] == sink["auth_token"] == sink["db_password"] == "***"
    # *_env and *_file only say where a secret lives: shown as written
    assert sink["secret_env"] == "HOOK_SECRET"  # noqa: S105
    assert sink["token_file"] == "/run/secrets/token"  # noqa: S105
    assert sink["url"] == "redis://:***@redis:6379/0"
    assert sink["servers"] == ["nats://user:***@nats:4222", "nats://***@nats2:4222"]
    assert sink["headers"] == {"Authorization": "***", "X-Team": "***"}  # every header value
    assert config.sinks[0].options["api_key"] == "k-123"  # the sink itself still sees the value


def test_mask_options_leaves_ordinary_options_alone() -> None:
    """Options without secret-looking names or URL credentials are printed unchanged."""
    options = {"url": "https://example.com/a@b", "fsync": True, "argv": ["x", "y"], "n": 3}
    assert mask_options(options) == options


# --- config.example.toml ----------------------------------------------------------------------


def uncomment_settings(text: str) -> str:
    """Turn `#key = value` lines (and `#    ` array continuations) into settings."""
    return re.sub(r"(?m)^#(?=[^\s#]|    )", "", text)


def test_example_config_loads_as_it_is() -> None:
    """config.example.toml, unchanged, is a valid configuration equal to the defaults."""
    config = load_config(str(EXAMPLE), ENV)
    assert dataclasses.replace(config, source=None) == load_config(None, ENV)


def test_example_config_shows_the_real_defaults() -> None:
    """Uncommenting every setting in config.example.toml changes no default."""
    config = parse_config(tomllib.loads(uncomment_settings(EXAMPLE.read_text("utf-8"))), ENV)
    defaults = load_config(None, ENV)
    assert config.defaults == defaults.defaults
    assert config.metadata == defaults.metadata
    assert dataclasses.replace(config.daemon, state_dir="x") == dataclasses.replace(
        defaults.daemon, state_dir="x"
    )
    assert config.roots[:3] == defaults.roots


def test_example_config_documents_every_key_and_sink_type() -> None:
    """Every configuration key and every built-in sink type appears in config.example.toml."""
    text = EXAMPLE.read_text("utf-8")
    for cls in (DaemonConfig, UnitPolicy, MetadataConfig, ClusterConfig):
        for f in dataclasses.fields(cls):
            assert f"\n#{f.name} = " in text, f.name
    document = tomllib.loads(uncomment_settings(text))
    types = {sink["type"] for sink in document["sinks"]}
    assert types == {"stdout", "jsonl", "webhook", "command", "nats", "redis", "mlflow"}


# --- fuzzing -----------------------------------------------------------------------------------

KNOWN_KEYS = sorted(
    {
        f.name
        for cls in (DaemonConfig, UnitPolicy, MetadataConfig, SinkConfig, ClusterConfig)
        for f in dataclasses.fields(cls)
    }
    | {"path", "unit_depth", "secret", "url", "headers", "shared"}
)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCALARS = st.one_of(
    st.sampled_from(
        [
            *("auto", "polling", "sha256", "info", "json", "/abs/path", "rel", "registered", ""),
            *("redis", "nats", "redis://h:1/0", "nats://u:p@h:1"),
        ]
    ),
    st.text(max_size=8),
    INT64,
    st.integers(min_value=-3, max_value=12),
    st.floats(allow_nan=False),
    st.booleans(),
    st.datetimes(),
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
TABLES = st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), VALUES, max_size=5)
DOCUMENTS = st.dictionaries(
    st.sampled_from(
        ["daemon", "defaults", "metadata", "roots", "sinks", "cluster"] * 4 + ["extra"]
    ),
    TABLES | st.lists(TABLES, max_size=3) | VALUES,
    max_size=5,
)


@settings(max_examples=examples(300), deadline=None)
@given(document=DOCUMENTS)
def test_any_document_loads_or_raises_config_error(document: dict[str, Any]) -> None:
    """Arbitrary TOML-shaped documents either load (and round-trip) or raise ConfigError."""
    try:
        config = parse_config(document, ENV)
    except ConfigError:
        return
    if all(mask_options(sink.options) == dict(sink.options) for sink in config.sinks):
        assert parse_config(tomllib.loads(render_toml(config)), ENV) == config


def _normal(path: str) -> str:
    return "/" + os.path.abspath(path).lstrip("/")


PATTERN = st.text(min_size=1, max_size=10).filter(lambda text: "\x00" not in text)
NAME = st.text(alphabet=string.ascii_letters + "-_. ", min_size=1, max_size=8).filter(str.strip)
ABSOLUTE = st.text(alphabet="abc/._ ", max_size=10).map(lambda tail: "/" + tail)
VALID_POLICY = {
    "settle_seconds": st.floats(min_value=0.001, max_value=3600) | st.integers(1, 3600),
    "max_wait_seconds": st.floats(min_value=3600, max_value=1e9),
    "observer": st.sampled_from(["auto", "inotify", "polling", "Polling"]),
    "poll_interval_seconds": st.floats(min_value=1e-6, max_value=1e9),
    "model_type": st.sampled_from(["auto", "Tensorflow", "ONNX", "Custom", "custom"]),
    "content_digest": st.sampled_from(["none", "sha256"]),
    "require_marker": st.sampled_from(["", "_SUCCESS", "out/_DONE"]),
    "ignore": st.lists(PATTERN, max_size=3),
    "in_progress": st.lists(PATTERN, max_size=3),
    "max_files_per_unit": st.integers(1, 2**63 - 1),
}
VALID_DAEMON = {
    "state_dir": ABSOLUTE,
    "log_level": st.sampled_from(["debug", "INFO", "warning", "error"]),
    "log_format": st.sampled_from(["auto", "console", "json"]),
    "health_listen": st.sampled_from(["", "127.0.0.1:9464", "[::1]:0", "host.example:80"]),
    "shutdown_timeout_seconds": st.floats(min_value=0, max_value=1e9),
    "reconcile_interval_seconds": st.integers(1, 10**9),
}
VALID_METADATA = {
    "filename": NAME.filter(lambda name: name not in (".", "..")),
    "max_bytes": st.integers(1, 2**63 - 1),
    "max_depth": st.integers(1, 1000),
}
EVENT_NAMES = st.sampled_from(["registered", "rejected", "removed", *EVENT_TYPES])
VALID_SINK = st.fixed_dictionaries(
    {"type": st.sampled_from(["stdout", "jsonl", "webhook", "plugin"])},
    optional={
        "name": NAME,
        "event_types": st.lists(EVENT_NAMES, min_size=1, max_size=4),
        "max_attempts": st.integers(0, 100),
        "option": VALUES,
        "url": st.text(max_size=20),
    },
)
VALID_DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "daemon": st.fixed_dictionaries({}, optional=VALID_DAEMON),
        "defaults": st.fixed_dictionaries({}, optional=VALID_POLICY),
        "metadata": st.fixed_dictionaries({}, optional=VALID_METADATA),
        "roots": st.lists(
            st.fixed_dictionaries(
                {"path": ABSOLUTE},
                optional={"unit_depth": st.integers(0, 8), **VALID_POLICY},
            ),
            max_size=4,
            unique_by=lambda root: _normal(root["path"]),
        ),
        "sinks": st.lists(
            VALID_SINK,
            min_size=1,
            max_size=4,
            unique_by=lambda sink: sink.get("name", sink["type"]),
        ),
    },
)


@settings(max_examples=examples(300), deadline=None)
@given(document=VALID_DOCUMENTS)
def test_every_valid_document_loads_and_round_trips(document: dict[str, Any]) -> None:
    """Any document within the documented rules loads, and check-config output reloads equal."""
    config = parse_config(document, ENV)
    if all(mask_options(sink.options) == dict(sink.options) for sink in config.sinks):
        assert parse_config(tomllib.loads(render_toml(config)), ENV) == config


TOML_ALPHABET = string.ascii_letters + string.digits + " \n\t=[]{}\".,#-_:/\\'+"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=TOML_ALPHABET, max_size=120) | st.text(max_size=60),
    raw=st.binary(max_size=40),
)
def test_any_file_content_loads_or_raises_config_error(
    fuzz_dir: Path, text: str, raw: bytes
) -> None:
    """Whatever bytes are in the config file, the result is a Config or a ConfigError."""
    path = fuzz_dir / "config.toml"
    for content in (text.encode("utf-8", "surrogatepass"), raw, b"[defaults]\n" + raw):
        path.write_bytes(content)
        with contextlib.suppress(ConfigError):
            load_config(str(path), ENV)


def test_date_and_time_values_are_described_by_their_toml_type(tmp_path: Path) -> None:
    """A TOML date where a number belongs is named as a date in the message."""
    message = error_of(tmp_path, "[defaults]\nsettle_seconds = 1979-05-27\n")
    assert message == "defaults.settle_seconds: must be a number, got date 1979-05-27"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[roots]]\npath = "/m"\nunit_depth = 1\nname = "x"', "roots[0].name: only a root with"),
        ('[[roots]]\npath = "/m"\nname = "a\\tb"', "roots[0].name: must be a printable name"),
        ('[[roots]]\npath = "/m"\nroot_marker = "a/b"', "roots[0].root_marker: must be a plain"),
        ("[daemon]\ninspect_workers = 0", "daemon.inspect_workers: must be >= 1"),
        ("[daemon]\nstop_settle_seconds = -1", "daemon.stop_settle_seconds: must be >= 0"),
        ("[defaults]\ninspect_timeout_seconds = 0", "defaults.inspect_timeout_seconds: must be"),
        ("[defaults]\nroot_marker = 'x'", "root_marker belongs in a [[roots]] entry"),
    ],
)
def test_lifecycle_keys_are_checked(tmp_path: Path, text: str, message: str) -> None:
    """The keys of lifecycle and isolation name the key and the rule when wrong."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_text(tmp_path, text)


def test_a_depth_zero_root_may_be_named(tmp_path: Path) -> None:
    """`name` of a depth-0 root replaces its base name as the model's name."""
    config = load_text(tmp_path, '[[roots]]\npath = "/artifacts"\nname = "resnet"')
    assert config.roots[0].unit_name == "resnet"
    assert load_text(tmp_path, '[[roots]]\npath = "/artifacts"').roots[0].unit_name == "artifacts"
