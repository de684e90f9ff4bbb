"""The command line (SPEC §3). The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from modelwatch import __version__, log
from modelwatch.config import (
    Config,
    MetadataConfig,
    find_config_file,
    load_config,
    render_toml,
    with_cli_roots,
)
from modelwatch.daemon import Daemon, build_sinks
from modelwatch.errors import ConfigError, ModelwatchError, Problem
from modelwatch.inspection import readiness
from modelwatch.manifest import PatternSet, scan_unit
from modelwatch.metadata import (
    MetadataResult,
    SchemaValidator,
    validate_unit_metadata,
)
from modelwatch.scan import scan_once
from modelwatch.state import StateDir, Store

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelwatch",
        description="Watch model directories and emit one registration event per settled "
        "model version.",
    )
    parser.add_argument("--version", action="version", version=f"modelwatch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("--config", metavar="FILE", help="config file (TOML)")
        return sub

    run = command("run", "run the daemon in the foreground")
    run.add_argument("paths", nargs="*", metavar="PATH", help="roots to watch (PATH or PATH:DEPTH)")
    scan = command("scan", "reconcile every root once, deliver, exit")
    scan.add_argument("--dry-run", action="store_true", help="print events, record nothing")
    scan.add_argument("paths", nargs="*", metavar="PATH")
    validate = command("validate", "validate metadata files or model directories")
    validate.add_argument("paths", nargs="+", metavar="PATH")
    validate.add_argument("--format", choices=("text", "json"), default="text")
    command("check-config", "print the effective configuration")
    status = command("status", "units, versions and undelivered events from the state store")
    status.add_argument("--format", choices=("text", "json"), default="text")
    redeliver = command("redeliver", "put dead-lettered events back in the delivery queue")
    redeliver.add_argument("--sink", metavar="NAME")
    redeliver.add_argument("--event", metavar="ID")
    return parser


def _load(args: argparse.Namespace) -> Config:
    path = find_config_file(args.config, os.environ)
    config = load_config(path, os.environ)
    paths = getattr(args, "paths", None)
    if paths and args.command in ("run", "scan"):
        config = with_cli_roots(config, paths)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "scan": cmd_scan,
        "validate": cmd_validate,
        "check-config": cmd_check_config,
        "status": cmd_status,
        "redeliver": cmd_redeliver,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"modelwatch: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModelwatchError as exc:
        print(f"modelwatch: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _configure_logging(config: Config) -> None:
    log.configure(config.daemon.log_level, config.daemon.log_format)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    _configure_logging(config)
    stop, reload_requested = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (reload_requested if signum == signal.SIGHUP else stop).set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    def reload() -> Config:
        new = _load(args)
        _configure_logging(new)
        return new

    daemon = Daemon(config)
    try:
        daemon.start()
        daemon.serve(stop, reload=reload, reload_requested=reload_requested)
    finally:
        daemon.stop()
    return EXIT_OK


def cmd_scan(args: argparse.Namespace) -> int:
    config = _load(args)
    _configure_logging(config)
    ok = scan_once(config, dry_run=args.dry_run)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    for sink in build_sinks(config):  # sinks validate their own keys
        sink.close()
    if config.metadata.schema:
        SchemaValidator.from_file(config.metadata.schema)
    sys.stdout.write(render_toml(config))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    meta = config.metadata
    schema = SchemaValidator.from_file(meta.schema) if meta.schema else None
    reports = [_validate_path(path, config, meta, schema) for path in args.paths]
    valid = all(not problems for _, problems in reports)
    if args.format == "json":
        body = {
            "valid": valid,
            "results": [
                {"path": path, "valid": not problems, "problems": [p.to_dict() for p in problems]}
                for path, problems in reports
            ],
        }
        print(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        for path, problems in reports:
            for p in problems:
                print(_problem_line(path, p))
            if not problems:
                print(f"{path}: ok")
    return EXIT_OK if valid else EXIT_FAILED


def _problem_line(path: str, p: Problem) -> str:
    where = os.path.join(path, p.file) if p.file and os.path.isdir(path) else path
    if p.line is not None:
        where += f":{p.line}:{p.column or 1}"
    suffix = f" (at {p.pointer})" if p.pointer else ""
    return f"{where}: {p.code}: {p.message}{suffix}".replace("\n", "\\n")


def _validate_path(
    path: str, config: Config, meta: MetadataConfig, schema: SchemaValidator | None
) -> tuple[str, list[Problem]]:
    if os.path.isdir(path):
        policy = config.defaults
        manifest = scan_unit(
            path,
            ignore=PatternSet(policy.ignore),
            in_progress=PatternSet(policy.in_progress),
            max_files=policy.max_files_per_unit,
        )
        problems: list[Problem] = []
        reason = readiness(path, manifest, policy)
        if reason is not None:
            problems.append(Problem("incomplete", reason))
        result = validate_unit_metadata(
            path, meta.filename, max_bytes=meta.max_bytes, max_depth=meta.max_depth, schema=schema
        )
        return path, problems + list(result.problems)
    return path, list(_validate_file(path, meta, schema).problems)


def _validate_file(
    path: str, meta: MetadataConfig, schema: SchemaValidator | None
) -> MetadataResult:
    """A metadata file named on the command line: the same safe reader as the daemon's
    (no symlink followed, FIFOs never opened, at most max_bytes read)."""
    directory, name = os.path.split(os.path.abspath(path))
    result = validate_unit_metadata(
        directory, name, max_bytes=meta.max_bytes, max_depth=meta.max_depth, schema=schema
    )
    if not result.present:
        missing = Problem("metadata_unreadable", "no such file", file=name)
        return MetadataResult(present=False, document=None, problems=(missing,))
    return result


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_existing_store(config)
    try:
        units, sinks = store.units(), store.sink_stats()
    finally:
        store.close()
    now = time.time()
    if args.format == "json":
        print(
            json.dumps(
                {
                    "units": [
                        {
                            "path": u.path,
                            "root": u.root,
                            "version": u.registered_version,
                            "fingerprint": u.registered_fp,
                            "state": "present" if u.present else "removed",
                        }
                        for u in units
                    ],
                    "sinks": [
                        {
                            "sink": s.sink,
                            "pending": s.pending,
                            "dead": s.dead,
                            "oldest_pending_seconds": _age(s.oldest_pending, now),
                        }
                        for s in sinks
                    ],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(
        _table(
            ["UNIT", "VERSION", "STATE"],
            [
                [u.path, str(u.registered_version or "-"), "present" if u.present else "removed"]
                for u in units
            ],
        )
    )
    print()
    print(
        _table(
            ["SINK", "PENDING", "DEAD", "OLDEST PENDING"],
            [
                [s.sink, str(s.pending), str(s.dead), _fmt_age(_age(s.oldest_pending, now))]
                for s in sinks
            ],
        )
    )
    return EXIT_OK


def cmd_redeliver(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_existing_store(config)
    try:
        count = store.redeliver(args.sink, args.event)
    finally:
        store.close()
    print(f"{count} event(s) queued for redelivery")
    return EXIT_OK


def _open_existing_store(config: Config) -> Store:
    # no migration: a daemon of the previous version may be running on this store
    return Store(StateDir(config.daemon.state_dir).db_path, migrate=False)


def _age(created: float | None, now: float) -> float | None:
    return None if created is None else round(max(0.0, now - created), 1)


def _fmt_age(age: float | None) -> str:
    return "-" if age is None else f"{age:.0f}s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
