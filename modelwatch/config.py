"""Configuration: one TOML file (SPEC section 4) plus environment overrides, parsed once.

Contract:

* `find_config_file` picks the file: `--config`, else `$MODELWATCH_CONFIG`, else
  `/etc/modelwatch/config.toml` if it exists, else None (built-in defaults).
* `load_config` reads and validates the file and returns a frozen `Config`. Every problem is a
  `ConfigError` whose message starts with the offending key, list indices included
  (`roots[1].unit_depth: must be >= 0, got -1`), or with the environment variable, or with
  `FILE: line L, column C:` for TOML syntax errors. Unknown keys are errors with a hint.
* Missing `[[roots]]` means the Gradient roots (`/artifacts` depth 0, `/storage/models` and
  `/shared/models` depth 1); missing `[[sinks]]` means one `stdout` sink. `roots = []` means
  "no roots from the file" (PS_MODEL_PATH or PATH arguments may add some); `sinks = []` is an error.
* Environment, applied after the file: MODELWATCH_STATE_DIR, MODELWATCH_LOG_LEVEL,
  MODELWATCH_LOG_FORMAT, MODELWATCH_SETTLE_SECONDS (the defaults and every root that does not
  set `settle_seconds` itself) and PS_MODEL_PATH (adds a depth-0 root unless already a root).
  An empty variable counts as unset.
* Relative `daemon.state_dir` and `metadata.schema` are relative to the config file's directory.
* `[cluster]` (SPEC §12): `backend` "none" (default), "redis" or "nats"; with a backend, exactly
  one of `url`, `url_env`, `url_file` (a `url` in the file must carry no credentials; the
  other two are read when the backend is built, `cluster.connect`), and the TLS keys of SPEC
  §5b (`ca_file`, `client_cert_file`, `client_key_file`, `server_name`,
  `insecure_skip_verify`; their files are read when the backend is built). TLS keys next to
  a Redis URL without TLS, and redis-py's `ssl_*` URL parameters, are refused where the URL
  is checked (`check_cluster_url`: here for `url`, when the backend is built for the other
  two). `[[roots]] shared`: true, false, or absent (None: shared when the root is on a
  network filesystem and a backend is configured, decided by the daemon from the mount
  table).
* Sink tables: only `type`, `name`, `event_types`, `max_attempts` are checked here; every other
  key lands untouched in `SinkConfig.options` for the sink to validate against its declaration
  (`modelwatch.sinks.options`). Keys named `secret`, `token` or `password` are refused:
  secrets come from the environment or a file.
* `render_toml` prints the effective config as TOML that loads back to an equal `Config`, with
  secret-looking sink options masked (`credentials.mask_options`, as in `repr(SinkConfig)`);
  `check-config` passes the sinks' declarations to show their defaults and mask what they say,
  and notes for `[cluster]` and each sink (where it connects, what it trusts).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import math
import os
import re
import reprlib
import socket
import sys
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

from modelwatch.credentials import mask_options, mask_url, url_credentials
from modelwatch.errors import ConfigError
from modelwatch.tls import TlsOptions, check_server_name, refuse_unused, refuse_url_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

EVENT_TYPES = (
    "io.modelwatch.model.registered",
    "io.modelwatch.model.rejected",
    "io.modelwatch.model.removed",
)

# Glob patterns relative to the unit (matched by `manifest.PatternSet`): without "/" a pattern
# matches a name at any depth; with "/" the whole relative path ("*" crosses "/"); a trailing
# "/" means a directory and everything in it.
DEFAULT_IGNORE: tuple[str, ...] = (
    "events.out.tfevents.*",  # TensorBoard summaries, appended to for the whole run
    "*.log",
    "*.swp",  # vim
    "*.swo",  # vim
    "*~",  # emacs, gedit backups
    ".#*",  # emacs lock files
    ".nfs*",  # NFS silly-rename of open-but-deleted files
    ".DS_Store",
    "Thumbs.db",
    "__pycache__/",
    ".ipynb_checkpoints/",
)

DEFAULT_IN_PROGRESS: tuple[str, ...] = (
    "*.tempstate*",  # TensorFlow checkpoint state being written
    "*.tmp" + "[0-9a-f]" * 32,  # TensorFlow atomic writes: <name>.tmp<uuid4 hex>
    "*_temp/part-*",  # TensorFlow 2 sharded save staging: <prefix>_temp/part-00000-of-00001...
    "*_temp_" + "[0-9a-f]" * 32 + "/part-*",  # TensorFlow 1 Saver staging: <prefix>_temp_<hex>/
    ".*.??????",  # rsync: .<name>.XXXXXX
    "*.part",  # wget, Firefox, many downloaders
    "*.partial",  # rclone
    "*.incomplete",  # Hugging Face hub downloads
    "*.orbax-checkpoint-tmp*",  # Orbax / JAX
    ".metadata.tmp",  # PyTorch distributed checkpoint (DCP)
    "*.crdownload",  # Chrome
    "*.download",  # Safari
    "*_.gstmp",  # gsutil
    "*.filepart",  # WinSCP
)

SYSTEM_CONFIG_PATH = "/etc/modelwatch/config.toml"
MAX_UNIT_DEPTH = 8
DEFAULT_ROOTS: tuple[tuple[str, int], ...] = (
    ("/artifacts", 0),
    ("/storage/models", 1),
    ("/shared/models", 1),
)
_MAX_SECONDS = 1_000_000_000  # ~31 years; keeps deadline arithmetic finite
_MAX_INT = 2**63 - 1  # fits the state store's INTEGER columns
_SETTLE_ENV = "MODELWATCH_SETTLE_SECONDS"


@dataclass(frozen=True, slots=True)
class UnitPolicy:
    """How units are judged settled: the `[defaults]` table, overridable per `[[roots]]`."""

    settle_seconds: float = 5.0
    max_wait_seconds: float = 3600.0
    observer: str = "auto"
    poll_interval_seconds: float = 10.0
    model_type: str = "auto"
    content_digest: str = "none"
    require_marker: str = ""
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    in_progress: tuple[str, ...] = DEFAULT_IN_PROGRESS
    max_files_per_unit: int = 1_000_000
    inspect_timeout_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class RootConfig:
    """A watched directory: absolute, normalised, not resolved through symlinks.

    `name`: `data.name` of a depth-0 root's unit ("" = the root's base name). `root_marker`:
    a file that must exist in the root for it to count as available ("" = none), so an empty
    mount point is never taken for "every model removed".
    """

    path: str
    unit_depth: int
    policy: UnitPolicy
    name: str = ""
    root_marker: str = ""
    shared: bool | None = None  # None: decided by the filesystem (see the module docstring)

    @property
    def unit_name(self) -> str:
        """`data.name` of the unit of a depth-0 root (SPEC §2 "Name")."""
        return self.name or os.path.basename(self.path) or self.path


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The `[daemon]` table, with environment overrides applied."""

    state_dir: str
    log_level: str = "info"
    log_format: str = "auto"
    health_listen: str = ""
    shutdown_timeout_seconds: float = 10.0
    reconcile_interval_seconds: float = 3600.0
    stop_settle_seconds: float = 1.0
    inspect_workers: int = 4


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    """The `[metadata]` table; `schema` is "" or an absolute path to a JSON Schema file."""

    filename: str = "gradient-model-metadata.json"
    max_bytes: int = 1_048_576
    max_depth: int = 64
    schema: str = ""


@dataclass(frozen=True, slots=True, repr=False)
class SinkConfig:
    """One `[[sinks]]` table. `options` holds every non-common key, for the sink to validate;
    `key` ("sinks[2]") prefixes the sink's own error messages."""

    type: str
    name: str
    event_types: tuple[str, ...]
    max_attempts: int = 0
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    key: str = "sinks[0]"

    def __repr__(self) -> str:
        return (
            f"SinkConfig(type={self.type!r}, name={self.name!r}, "
            f"event_types={self.event_types!r}, max_attempts={self.max_attempts!r}, "
            f"options={mask_options(self.options)!r}, key={self.key!r})"
        )


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The `[cluster]` table (SPEC §12). `node_id` is filled in (the host name by default)."""

    backend: str = "none"
    url: str = ""
    url_env: str = ""
    url_file: str = ""
    node_id: str = ""
    lease_seconds: float = 15.0
    prefix: str = "modelwatch"
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    server_name: str = ""
    insecure_skip_verify: bool = False

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    @property
    def tls(self) -> TlsOptions:
        """The TLS keys of SPEC §5b as `modelwatch.tls` takes them."""
        return TlsOptions(
            self.ca_file or None,
            self.client_cert_file or None,
            self.client_key_file or None,
            self.server_name or None,
            self.insecure_skip_verify,
        )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration; `source` is the file used, None for built-ins."""

    daemon: DaemonConfig
    defaults: UnitPolicy
    roots: tuple[RootConfig, ...]
    metadata: MetadataConfig
    sinks: tuple[SinkConfig, ...]
    source: str | None
    cluster: ClusterConfig = ClusterConfig(node_id=socket.gethostname())


# --- locating and reading the file -------------------------------------------------------


def find_config_file(
    cli_path: str | None,
    environ: Mapping[str, str],
    *,
    system_path: str = SYSTEM_CONFIG_PATH,
) -> str | None:
    """`--config`, else $MODELWATCH_CONFIG, else `system_path` if it exists, else None."""
    if cli_path is not None:
        return _must_exist(cli_path, "")
    from_env = environ.get("MODELWATCH_CONFIG", "")
    if from_env:
        return _must_exist(from_env, " (from MODELWATCH_CONFIG)")
    return system_path if os.path.exists(system_path) else None


def _must_exist(path: str, origin: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(f"config: {path}: no such file{origin}")
    return path


def load_config(path: str | None, environ: Mapping[str, str]) -> Config:
    """Read, validate and freeze the configuration in `path` (None: built-in defaults)."""
    if path is None:
        return parse_config({}, environ)
    return parse_config(_read_toml(path), environ, source=os.path.abspath(path))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ConfigError(f"config: {path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"config: {path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line, column = _position(data, error.start)
        raise ConfigError(f"{path}: line {line}, column {column}: not valid UTF-8") from None
    try:
        document: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(_syntax_message(path, text, str(error))) from None
    except RecursionError:
        raise ConfigError(f"{path}: values are nested too deeply") from None
    return document


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)


def _syntax_message(path: str, text: str, message: str) -> str:
    """`FILE: line L, column C: what` from tomllib's "what (at line L, column C)"."""
    match = _TOML_POSITION.match(message)
    if match:
        return f"{path}: line {match['line']}, column {match['col']}: {match['msg']}"
    what = message.removesuffix(" (at end of document)")
    lines = text.split("\n")
    return f"{path}: line {len(lines)}, column {len(lines[-1]) + 1}: {what}"


# --- describing values and keys in messages ----------------------------------------------

_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    list: "array",
    dict: "table",
    datetime.datetime: "datetime",
    datetime.date: "date",
    datetime.time: "time",
}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200  # long enough for real paths, bounded for junk
_REPR.maxlist = 10


def _show(value: Any) -> str:
    """`repr` for messages: non-printables escaped, very long values shortened."""
    return _REPR.repr(value)


def _describe(value: Any) -> str:
    """`string 'fast'`, `integer 3`, `boolean true`, `table`: the TOML type and the value."""
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, bool):
        return f"{kind} {'true' if value else 'false'}"
    if isinstance(value, dict):
        return kind
    if isinstance(value, (datetime.date, datetime.time)):
        return f"{kind} {value.isoformat()}"
    return f"{kind} {_show(value)}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _toml_string(name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{_toml_key(name)}" if prefix else _toml_key(name)


# --- value checks: each takes (key, value) and returns the value to store ---------------

Check: TypeAlias = Callable[[str, Any], Any]


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {_describe(value)}")
    if "\x00" in value:
        raise ConfigError(f"{key}: must not contain NUL characters, got {_show(value)}")
    return value


def _seconds(minimum: int, *, inclusive: bool) -> Check:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {_show(value)}")
        if value < minimum or (value == minimum and not inclusive):
            raise ConfigError(
                f"{key}: must be {'>=' if inclusive else '>'} {minimum}, got {_show(value)}"
            )
        if value > _MAX_SECONDS:
            raise ConfigError(f"{key}: must be <= {_MAX_SECONDS}, got {_show(value)}")
        return float(value)

    return check


def _integer(minimum: int, maximum: int = _MAX_INT) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {_describe(value)}")
        if value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value}")
        if value > maximum:
            raise ConfigError(f"{key}: must be <= {maximum}, got {value}")
        return value

    return check


def _choice(*options: str) -> Check:
    """Case-insensitive choice; stores the canonical spelling (`tensorflow` -> `Tensorflow`)."""
    canonical = {option.lower(): option for option in options}

    def check(key: str, value: Any) -> str:
        text = _string(key, value)
        if text.lower() not in canonical:
            raise ConfigError(f"{key}: must be one of {', '.join(options)}, got {_show(text)}")
        return canonical[text.lower()]

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {_describe(value)}")
    return value


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of strings, got {_describe(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item or "\x00" in item:
            raise ConfigError(f"{key}[{index}]: must be a non-empty string, got {_describe(item)}")
    return tuple(value)


def _marker(key: str, value: Any) -> str:
    text = _string(key, value)
    if os.path.isabs(text):
        raise ConfigError(f"{key}: must be a file name relative to the unit, got {_show(text)}")
    if ".." in text.split("/"):
        raise ConfigError(f"{key}: must not contain '..', got {_show(text)}")
    return text


def _normalise_path(path: str) -> str:
    # abspath keeps a leading "//" (POSIX leaves it implementation-defined; Linux does not care).
    return "/" + os.path.abspath(path).lstrip("/")


def _absolute_path(key: str, value: Any) -> str:
    text = _string(key, value)
    if not os.path.isabs(text):
        raise ConfigError(f"{key}: must be an absolute path, got {_show(text)}")
    return _normalise_path(text)


def _path_under(base_dir: str | None) -> Check:
    """A non-empty path; a relative one is relative to `base_dir` (None: the working directory)."""

    def check(key: str, value: Any) -> str:
        text = _string(key, value)
        if not text:
            raise ConfigError(f"{key}: must not be empty")
        return _normalise_path(text if base_dir is None else os.path.join(base_dir, text))

    return check


def _optional(check: Check) -> Check:
    """ "" (not set) or what `check` accepts."""

    def optional(key: str, value: Any) -> Any:
        return "" if value == "" else check(key, value)

    return optional


def _schema_file(base_dir: str | None) -> Check:
    """ "" (no schema) or an existing file, relative to `base_dir`."""
    resolve = _path_under(base_dir)

    def check(key: str, value: Any) -> str:
        if value == "":
            return ""
        path: str = resolve(key, value)
        if not os.path.isfile(path):
            raise ConfigError(f"{key}: no such file {path!r}")
        return path

    return check


def _file_name(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text or "/" in text or text in (".", ".."):
        raise ConfigError(f"{key}: must be a plain file name without '/', got {_show(text)}")
    return text


def _unit_name(key: str, value: Any) -> str:
    """ "" (the directory's base name) or a printable name that is not only spaces."""
    text = _string(key, value)
    if text and (not text.strip() or any(not char.isprintable() for char in text)):
        raise ConfigError(f"{key}: must be a printable name, got {_show(text)}")
    return text


_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def _health_listen(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text:
        return text
    match = _HOST_PORT.fullmatch(text)
    if not match or not _valid_host(match["ipv6"], match["host"]):
        raise ConfigError(
            f'{key}: must be "" or HOST:PORT (e.g. "127.0.0.1:9464" or "[::1]:9464"), '
            f"got {_show(text)}"
        )
    if int(match["port"]) > 65535:
        raise ConfigError(f"{key}: port must be 0-65535, got {_show(text)}")
    return text


def _valid_host(ipv6: str | None, host: str | None) -> bool:
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return False
        return True
    if host is None or not _HOST_NAME.fullmatch(host):
        return False
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


# --- tables --------------------------------------------------------------------------------

_POLICY_CHECKS: dict[str, Check] = {
    "settle_seconds": _seconds(0, inclusive=False),
    "max_wait_seconds": _seconds(0, inclusive=False),
    "observer": _choice("auto", "inotify", "polling"),
    "poll_interval_seconds": _seconds(0, inclusive=False),
    "model_type": _choice("auto", "Tensorflow", "ONNX", "Custom"),
    "content_digest": _choice("none", "sha256"),
    "require_marker": _marker,
    "ignore": _patterns,
    "in_progress": _patterns,
    "max_files_per_unit": _integer(1),
    "inspect_timeout_seconds": _seconds(0, inclusive=False),
}
_ROOT_CHECKS: dict[str, Check] = {
    "path": _absolute_path,
    "unit_depth": _integer(0, MAX_UNIT_DEPTH),
    "name": _unit_name,
    "root_marker": lambda key, value: value if value == "" else _file_name(key, value),
    "shared": _boolean,
    **_POLICY_CHECKS,
}
_LOG_LEVEL = _choice("debug", "info", "warning", "error")
_LOG_FORMAT = _choice("auto", "console", "json")
_TOP_LEVEL_KEYS = ("daemon", "defaults", "roots", "metadata", "sinks", "cluster")
_DAEMON_KEYS = tuple(f.name for f in dataclasses.fields(DaemonConfig))
_METADATA_KEYS = tuple(f.name for f in dataclasses.fields(MetadataConfig))

# Where a key misplaced into the wrong table really belongs, for the unknown-key hint.
_BELONGS_IN: dict[str, str] = {
    **dict.fromkeys(_POLICY_CHECKS, "[defaults] or a [[roots]] entry"),
    "path": "a [[roots]] entry",
    "unit_depth": "a [[roots]] entry",
    "root_marker": "a [[roots]] entry",
    "shared": "a [[roots]] entry",
    **dict.fromkeys(_DAEMON_KEYS, "[daemon]"),
    **dict.fromkeys(_METADATA_KEYS, "[metadata]"),
    "event_types": "a [[sinks]] entry",
    "max_attempts": "a [[sinks]] entry",
}


def _unknown_key(prefix: str, name: str, known: Collection[str]) -> ConfigError:
    if name in _BELONGS_IN:
        hint = f"{name} belongs in {_BELONGS_IN[name]}"
    else:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"{_join(prefix, name)}: unknown key ({hint})")


def _table(key: str, raw: Any) -> dict[str, Any]:
    """`raw` as a table; None (absent) is an empty one."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a table, got {_describe(raw)}")
    return raw


def _read_table(key: str, raw: Any, checks: Mapping[str, Check]) -> dict[str, Any]:
    """Validate every key of the table at `key`; returns only the keys that were set."""
    table = _table(key, raw)
    for name in table:
        if name not in checks:
            raise _unknown_key(key, name, tuple(checks))
    return {name: checks[name](_join(key, name), value) for name, value in table.items()}


def _array_of_tables(key: str, raw: Any) -> list[Any]:
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]]), got {_describe(raw)}")
    return raw


# --- environment -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Environment:
    state_dir: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    settle_seconds: float | None = None
    model_path: str | None = None


def _read_environment(environ: Mapping[str, str]) -> _Environment:
    def get(name: str, check: Check) -> Any:
        value = environ.get(name, "")
        return check(name, value) if value else None

    return _Environment(
        state_dir=get("MODELWATCH_STATE_DIR", _path_under(None)),
        log_level=get("MODELWATCH_LOG_LEVEL", _LOG_LEVEL),
        log_format=get("MODELWATCH_LOG_FORMAT", _LOG_FORMAT),
        settle_seconds=get(_SETTLE_ENV, _env_seconds),
        model_path=get("PS_MODEL_PATH", _absolute_path),
    )


def _env_seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{name}: must be a number > 0, got {_show(value)}")
    if seconds > _MAX_SECONDS:
        raise ConfigError(f"{name}: must be <= {_MAX_SECONDS}, got {_show(value)}")
    return seconds


def default_state_dir(environ: Mapping[str, str], euid: int | None = None) -> str:
    """$STATE_DIRECTORY (first of several), else /var/lib/modelwatch for root, else the XDG
    state directory ($XDG_STATE_HOME/modelwatch or ~/.local/state/modelwatch)."""
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return _normalise_path(systemd)
    if (os.geteuid() if euid is None else euid) == 0:
        return "/var/lib/modelwatch"
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return _normalise_path(os.path.join(xdg, "modelwatch"))
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        raise ConfigError(
            "daemon.state_dir: no default without HOME, XDG_STATE_HOME or STATE_DIRECTORY; "
            "set daemon.state_dir or MODELWATCH_STATE_DIR"
        )
    return _normalise_path(os.path.join(home, ".local", "state", "modelwatch"))


# --- sections ------------------------------------------------------------------------------


def parse_config(
    document: Mapping[str, Any], environ: Mapping[str, str], *, source: str | None = None
) -> Config:
    """Validate an already parsed TOML document (what `load_config` does after reading)."""
    for name in document:
        if name not in _TOP_LEVEL_KEYS:
            raise _unknown_key("", name, _TOP_LEVEL_KEYS)
    env = _read_environment(environ)
    base_dir = os.path.dirname(source) if source else None
    daemon = _parse_daemon(document.get("daemon"), env, environ, base_dir)
    defaults_set, settle_origin = _defaults_values(document.get("defaults"), env)
    defaults = UnitPolicy(**defaults_set)
    _check_wait(defaults, "defaults", defaults_set, settle_origin)
    roots = _parse_roots(document.get("roots"), defaults_set, settle_origin)
    if env.model_path is not None and all(root.path != env.model_path for root in roots):
        roots = (*roots, RootConfig(env.model_path, 0, defaults))
    cluster = _parse_cluster(document.get("cluster"), base_dir)
    _check_shared(roots, cluster)
    return Config(
        daemon=daemon,
        defaults=defaults,
        roots=roots,
        metadata=_parse_metadata(document.get("metadata"), base_dir),
        sinks=_parse_sinks(document.get("sinks")),
        source=source,
        cluster=cluster,
    )


def _parse_daemon(
    raw: Any, env: _Environment, environ: Mapping[str, str], base_dir: str | None
) -> DaemonConfig:
    checks: dict[str, Check] = {
        "state_dir": _path_under(base_dir),
        "log_level": _LOG_LEVEL,
        "log_format": _LOG_FORMAT,
        "health_listen": _health_listen,
        "shutdown_timeout_seconds": _seconds(0, inclusive=True),
        "reconcile_interval_seconds": _seconds(0, inclusive=False),
        "stop_settle_seconds": _seconds(0, inclusive=True),
        "inspect_workers": _integer(1, 64),
    }
    values = _read_table("daemon", raw, checks)
    for name in ("state_dir", "log_level", "log_format"):
        override = getattr(env, name)
        if override is not None:
            values[name] = override
    if "state_dir" not in values:
        values["state_dir"] = default_state_dir(environ)
    return DaemonConfig(**values)


def _defaults_values(raw: Any, env: _Environment) -> tuple[dict[str, Any], str | None]:
    """The keys `[defaults]` sets (plus the settle override) and who set `settle_seconds`."""
    values = _read_table("defaults", raw, _POLICY_CHECKS)
    if env.settle_seconds is not None:
        values["settle_seconds"] = env.settle_seconds
        return values, _SETTLE_ENV
    return values, "defaults.settle_seconds" if "settle_seconds" in values else None


def _check_wait(
    policy: UnitPolicy, key: str, set_here: Collection[str], settle_origin: str | None
) -> None:
    """max_wait_seconds >= settle_seconds, blaming the key that was set at this level."""
    settle, max_wait = policy.settle_seconds, policy.max_wait_seconds
    if max_wait >= settle:
        return
    if "max_wait_seconds" in set_here or settle_origin is None:
        raise ConfigError(
            f"{key}.max_wait_seconds: must be >= settle_seconds ({settle}), got {max_wait}"
        )
    raise ConfigError(f"{settle_origin}: must be <= max_wait_seconds ({max_wait}), got {settle}")


def _parse_roots(
    raw: Any, inherited: Mapping[str, Any], settle_origin: str | None
) -> tuple[RootConfig, ...]:
    if raw is None:
        policy = UnitPolicy(**inherited)
        return tuple(RootConfig(path, depth, policy) for path, depth in DEFAULT_ROOTS)
    roots: list[RootConfig] = []
    first_key: dict[str, str] = {}
    for index, entry in enumerate(_array_of_tables("roots", raw)):
        key = f"roots[{index}]"
        root = _parse_root(key, entry, inherited, settle_origin)
        if root.path in first_key:
            raise ConfigError(f"{key}.path: {root.path!r} is already {first_key[root.path]}.path")
        first_key[root.path] = key
        roots.append(root)
    return tuple(roots)


def _parse_root(
    key: str, raw: Any, inherited: Mapping[str, Any], settle_origin: str | None
) -> RootConfig:
    values = _read_table(key, raw, _ROOT_CHECKS)
    if "path" not in values:
        raise ConfigError(f"{key}.path: required")
    path, depth = values.pop("path"), values.pop("unit_depth", 0)
    name, marker = values.pop("name", ""), values.pop("root_marker", "")
    shared = values.pop("shared", None)
    if name and depth != 0:  # "" is the default, allowed anywhere
        raise ConfigError(
            f"{key}.name: only a root with unit_depth = 0 can be named "
            f"(units below a root are named by their path), got unit_depth = {depth}"
        )
    policy = UnitPolicy(**{**inherited, **values})
    if "settle_seconds" in values:
        settle_origin = f"{key}.settle_seconds"
    _check_wait(policy, key, values, settle_origin)
    return RootConfig(path, depth, policy, name, marker, shared)


# --- cluster ---------------------------------------------------------------------------------

_BACKEND = _choice("none", "redis", "nats")
_URL_SCHEMES = {"redis": ("redis", "rediss", "unix"), "nats": ("nats", "tls")}
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIN_LEASE = 3  # a lease must outlive the fencing margin (1 s) and a renewal round trip
_TLS_FILES = ("ca_file", "client_cert_file", "client_key_file")  # read when the backend is built


def _node_id(key: str, value: Any) -> str:
    """ "" (the host name) or a printable name."""
    text = _string(key, value)
    if text and (not text.strip() or not text.isprintable() or len(text) > 253):
        raise ConfigError(f"{key}: must be a printable name of 1-253 characters, got {_show(text)}")
    return text or socket.gethostname()


def _server_name(key: str, value: Any) -> str:
    return check_server_name(key, _string(key, value))


def _prefix(key: str, value: Any) -> str:
    text = _string(key, value)
    if not _PREFIX.fullmatch(text):
        raise ConfigError(
            f"{key}: must be 1-64 letters, digits, '-' or '_' (it names NATS buckets), "
            f"got {_show(text)}"
        )
    return text


def _parse_cluster(raw: Any, base_dir: str | None) -> ClusterConfig:
    checks: dict[str, Check] = {
        "backend": _BACKEND,
        "url": _string,
        "url_env": _string,
        "url_file": _optional(_path_under(base_dir)),
        "node_id": _node_id,
        "lease_seconds": _seconds(_MIN_LEASE, inclusive=True),
        "prefix": _prefix,
        **dict.fromkeys(_TLS_FILES, _optional(_path_under(base_dir))),
        "server_name": _optional(_server_name),
        "insecure_skip_verify": _boolean,
    }
    values = {"node_id": socket.gethostname(), **_read_table("cluster", raw, checks)}
    cluster = ClusterConfig(**values)
    sources = [name for name in ("url", "url_env", "url_file") if values.get(name)]
    if not cluster.enabled:
        unused = sources + cluster.tls.given()
        if unused:
            raise ConfigError(f"cluster.{unused[0]}: needs cluster.backend (redis or nats)")
        return cluster
    if len(sources) != 1:
        raise ConfigError(
            f"cluster.{sources[1] if sources else 'url'}: give exactly one of url, url_env, "
            f"url_file for the {cluster.backend} backend"
        )
    if cluster.url:
        check_cluster_url("cluster.url", cluster, cluster.url)
    return cluster


def check_cluster_url(key: str, cluster: ClusterConfig, url: str) -> None:
    """A backend URL of the right scheme naming a host; credentials only where it is not
    written in the config file (`key` is `cluster.url`); for Redis, TLS only through the
    TLS keys, and those only with `rediss://`."""
    schemes = _URL_SCHEMES[cluster.backend]
    for one in url.split(","):
        try:
            parts = urllib.parse.urlsplit(one.strip())
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc} in {_show(mask_url(one))}") from None
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise ConfigError(f"{key}: invalid port in {_show(mask_url(one))}") from None
        if parts.scheme not in schemes or not (parts.hostname or parts.scheme == "unix"):
            raise ConfigError(
                f"{key}: must be a {' or '.join(s + '://' for s in schemes)} URL naming a host, "
                f"got {_show(mask_url(one))}"
            )
        found = url_credentials(one)
        if key == "cluster.url" and found is not None:
            raise ConfigError(
                f"{key}: {found} is not allowed in the config file; use url_env or url_file"
            )
    if cluster.backend == "redis":
        refuse_url_settings(key, url)
        if not url.lower().startswith("rediss:"):  # TLS keys would do nothing: refused
            refuse_unused("cluster", cluster.tls, url, "rediss://")


def _check_shared(roots: Sequence[RootConfig], cluster: ClusterConfig) -> None:
    if cluster.enabled:
        return
    for index, root in enumerate(roots):
        if root.shared:
            raise ConfigError(f"roots[{index}].shared: needs a [cluster] backend (redis or nats)")


def _parse_metadata(raw: Any, base_dir: str | None) -> MetadataConfig:
    checks: dict[str, Check] = {
        "filename": _file_name,
        "max_bytes": _integer(1),
        "max_depth": _integer(1),
        "schema": _schema_file(base_dir),
    }
    return MetadataConfig(**_read_table("metadata", raw, checks))


# --- sinks -----------------------------------------------------------------------------------

_EVENT_NAMES = {
    **{name.lower(): name for name in EVENT_TYPES},
    **{name.rsplit(".", 1)[1]: name for name in EVENT_TYPES},
}
_REFUSED_SINK_KEYS = ("secret", "token", "password")


def _event_types(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be an array of strings, got {_describe(value)}")
    if not value:
        raise ConfigError(f"{key}: must not be empty (leave it out for all event types)")
    chosen = {_event_type(f"{key}[{index}]", item) for index, item in enumerate(value)}
    return tuple(name for name in EVENT_TYPES if name in chosen)


def _event_type(key: str, value: Any) -> str:
    text = _string(key, value)
    if text.lower() not in _EVENT_NAMES:
        raise ConfigError(
            f"{key}: must be one of registered, rejected, removed "
            f"(or the full io.modelwatch.model.* name), got {_show(text)}"
        )
    return _EVENT_NAMES[text.lower()]


def describe_value(value: Any) -> str:
    """A TOML value for an error message: `string 'fast'`, `integer 3`, `table`."""
    return _describe(value)


def toml_value(value: Any) -> str:
    """`value` written as TOML (sink declarations show their defaults this way)."""
    return _toml_value(value)


def _sink_word(key: str, value: Any) -> str:
    text = _string(key, value)
    if not text.strip() or any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ConfigError(
            f"{key}: must be a non-empty string without control characters, got {_show(text)}"
        )
    return text


_SINK_CHECKS: dict[str, Check] = {
    "type": _sink_word,
    "name": _sink_word,
    "event_types": _event_types,
    "max_attempts": _integer(0),
}


def _parse_sinks(raw: Any) -> tuple[SinkConfig, ...]:
    if raw is None:
        return (SinkConfig(type="stdout", name="stdout", event_types=EVENT_TYPES),)
    entries = _array_of_tables("sinks", raw)
    if not entries:
        raise ConfigError("sinks: must not be empty (leave [[sinks]] out for one stdout sink)")
    sinks: list[SinkConfig] = []
    for index, entry in enumerate(entries):
        sink = _parse_sink(f"sinks[{index}]", entry)
        twin = next((other for other in sinks if other.name == sink.name), None)
        if twin is not None:
            raise ConfigError(
                f"{sink.key}.name: duplicate sink name {sink.name!r} (also {twin.key}); "
                "give each sink a unique name"
            )
        sinks.append(sink)
    return tuple(sinks)


def _parse_sink(key: str, raw: Any) -> SinkConfig:
    table = _table(key, raw)
    for name in table:
        if name.lower() in _REFUSED_SINK_KEYS:
            raise ConfigError(
                f"{_join(key, name)}: secrets are not allowed in the config file; "
                f"use {name.lower()}_env or {name.lower()}_file"
            )
    if "type" not in table:
        raise ConfigError(f"{key}.type: required")
    common = {
        name: check(_join(key, name), table[name])
        for name, check in _SINK_CHECKS.items()
        if name in table
    }
    return SinkConfig(
        type=common["type"],
        name=common.get("name", common["type"]),
        event_types=common.get("event_types", EVENT_TYPES),
        max_attempts=common.get("max_attempts", 0),
        options=MappingProxyType({k: v for k, v in table.items() if k not in _SINK_CHECKS}),
        key=key,
    )


# --- command-line roots --------------------------------------------------------------------

_PATH_DEPTH = re.compile(r"(?P<path>.*):(?P<depth>-?[0-9]+)", re.S)


def with_cli_roots(config: Config, paths: Sequence[str]) -> Config:
    """`modelwatch run PATH[:DEPTH] ...`: the PATHs replace the roots (no PATHs: unchanged)."""
    if not paths:
        return config
    roots: list[RootConfig] = []
    for argument in paths:
        root = _cli_root(argument, config.defaults)
        if any(root.path == other.path for other in roots):
            raise ConfigError(f"PATH argument {argument!r}: {root.path!r} is given twice")
        roots.append(root)
    return dataclasses.replace(config, roots=tuple(roots))


def _cli_root(argument: str, policy: UnitPolicy) -> RootConfig:
    where = f"PATH argument {argument!r}"
    path, depth = argument, 0
    match = _PATH_DEPTH.fullmatch(argument)
    if match:
        path, depth = match["path"], int(match["depth"])
        if not 0 <= depth <= MAX_UNIT_DEPTH:
            raise ConfigError(f"{where}: depth must be 0-{MAX_UNIT_DEPTH}, got {depth}")
    if not path or "\x00" in path:
        raise ConfigError(f"{where}: must be a directory path")
    return RootConfig(_normalise_path(path), depth, policy)


# --- rendering -----------------------------------------------------------------------------


def render_toml(
    config: Config,
    sink_items: Callable[[SinkConfig], Mapping[str, Any]] | None = None,
    sink_notes: Callable[[SinkConfig], Sequence[str]] | None = None,
    cluster_notes: Sequence[str] = (),
) -> str:
    """The effective configuration as TOML. `sink_items(sink)` gives a sink's own keys as they
    are to be shown (`check-config` passes the sinks' declarations: defaults filled in,
    secrets masked); by default they are shown as written, masked by `mask_options`, and the
    text loads back to an equal `Config` unless something had to be masked. `sink_notes(sink)`
    gives lines printed as comments under the sink (`check-config`: what it trusts, which
    proxy it uses); `cluster_notes` the same under `[cluster]`."""
    source = "built-in defaults" if config.source is None else _toml_string(config.source)
    lines = [f"# modelwatch effective configuration (source: {source})", ""]
    if not config.roots:
        lines += ["roots = []", ""]
    lines += _section("[daemon]", _fields(config.daemon))
    lines += _section("[defaults]", _fields(config.defaults))
    lines += _section("[metadata]", _fields(config.metadata))
    cluster = _fields(config.cluster)
    if isinstance(cluster.get("url"), str):
        cluster["url"] = ",".join(mask_url(one) for one in cluster["url"].split(","))
    lines += _commented(_section("[cluster]", cluster), cluster_notes)
    for root in config.roots:
        items: dict[str, Any] = {"path": root.path, "unit_depth": root.unit_depth}
        if root.name:
            items["name"] = root.name
        items["root_marker"] = root.root_marker
        if root.shared is not None:
            items["shared"] = root.shared
        lines += _section("[[roots]]", {**items, **_fields(root.policy)})
    for sink in config.sinks:
        section = _section("[[sinks]]", _sink_items(sink, sink_items or _masked_options))
        lines += _commented(section, sink_notes(sink) if sink_notes else ())
    return "\n".join(lines)


def _commented(section: list[str], notes: Sequence[str]) -> list[str]:
    """`section` with `notes` as comment lines at its end."""
    return [*section[:-1], *(f"# {_one_line(note)}" for note in notes), ""]


def _one_line(text: str) -> str:
    """`text` as one printable comment line (a path may hold a newline)."""
    return "".join(char if char.isprintable() else "?" for char in text)


def _masked_options(sink: SinkConfig) -> Mapping[str, Any]:
    shown: Mapping[str, Any] = mask_options(sink.options)
    return shown


def _sink_items(sink: SinkConfig, own: Callable[[SinkConfig], Mapping[str, Any]]) -> dict[str, Any]:
    items: dict[str, Any] = {"type": sink.type, "name": sink.name}
    items.update(event_types=sink.event_types, max_attempts=sink.max_attempts)
    items.update(own(sink))
    return items


def _fields(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _section(header: str, items: Mapping[str, Any]) -> list[str]:
    return [header, *(_key_value(name, value) for name, value in items.items()), ""]


def _key_value(name: str, value: Any) -> str:
    line = f"{_toml_key(name)} = {_toml_value(value)}"
    if len(line) <= 100 or not isinstance(value, (list, tuple)):
        return line
    items = "".join(f"    {_toml_value(item)},\n" for item in value)
    return f"{_toml_key(name)} = [\n{items}]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _toml_float(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }" if pairs else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


_STRING_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    """A TOML basic string; every non-printable character is escaped, so the result is one
    safe line (it also quotes odd keys in error messages)."""
    out = []
    for char in text:
        if char in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'
