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

import structlog

from modelwatch import __version__, control, explain, log
from modelwatch.clock import SystemClock
from modelwatch.cluster.connect import network_summary as cluster_summary
from modelwatch.cluster.report import lease_report
from modelwatch.config import (
    Config,
    MetadataConfig,
    find_config_file,
    load_config,
    render_toml,
    with_cli_roots,
)
from modelwatch.credentials import not_dumpable
from modelwatch.daemon import Daemon
from modelwatch.errors import ConfigError, ModelwatchError, NoAnswer, Problem
from modelwatch.explain_text import render as render_explain
from modelwatch.inspect_command import inspect_report
from modelwatch.inspect_command import render as render_inspection
from modelwatch.inspection import readiness
from modelwatch.manifest import PatternSet, scan_unit
from modelwatch.metadata import (
    MetadataResult,
    SchemaValidator,
    validate_unit_metadata,
)
from modelwatch.scan_command import scan_once
from modelwatch.sinks import network_summary, shown_options
from modelwatch.stages import build_sinks
from modelwatch.state import StateDir, Store
from modelwatch.status import render as render_status
from modelwatch.status import status_report
from modelwatch.units import describe

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
    why = command("explain", "why a model is or is not registered (asks the running daemon)")
    why.add_argument("path", metavar="PATH", help="a model directory, or a file in one")
    why.add_argument("--format", choices=("text", "json"), default="text")
    redeliver = command("redeliver", "put dead-lettered events back in the delivery queue")
    redeliver.add_argument("--sink", metavar="NAME")
    redeliver.add_argument("--event", metavar="ID")
    inspect = command("inspect", "what modelwatch sees in a model directory (no daemon)")
    inspect.add_argument("path", metavar="PATH")
    inspect.add_argument("--format", choices=("text", "json"), default="text")
    discard = command("discard", "give up on dead-lettered or failing events for good")
    discard.add_argument("--sink", metavar="NAME", required=True)
    which = discard.add_mutually_exclusive_group(required=True)
    which.add_argument("--event", metavar="ID", help="that event")
    which.add_argument("--unit", metavar="PATH", help="the unit's dead or failing events")
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
        "explain": cmd_explain,
        "redeliver": cmd_redeliver,
        "discard": cmd_discard,
        "inspect": cmd_inspect,
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
    not_dumpable()  # secrets read from the environment stay out of a command's reach
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
        daemon.start(stop=stop)
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
    _configure_logging(config)  # warnings (a secret file others may read) go to stderr
    notes: dict[str, list[str]] = {}
    for sink in build_sinks(config):  # sinks validate their own keys and read their secrets
        notes[sink.name] = network_summary(sink)
        sink.close()
    # the backend is checked as the daemon builds it (URL, TLS files), connecting nowhere
    cluster = cluster_summary(config.cluster) if config.cluster.enabled else []
    if config.metadata.schema:
        SchemaValidator.from_file(config.metadata.schema)
    text = render_toml(config, shown_options, lambda sink: notes.get(sink.name, []), cluster)
    sys.stdout.write(text)
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
    # FILE:LINE:COLUMN always, 1:1 for a problem of the whole file (its size, encoding)
    where += f":{p.line or 1}:{p.column or 1}"
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
        problems = [Problem("incomplete", r.message) for r in readiness(path, manifest, policy)]
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


def cmd_inspect(args: argparse.Namespace) -> int:
    config = _load(args)
    schema = SchemaValidator.from_file(config.metadata.schema) if config.metadata.schema else None
    report = inspect_report(args.path, config, schema)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(render_inspection(report))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_existing_store(config)
    try:
        report = status_report(config, store, time.time(), lease_report(config))
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(render_status(report))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    """Ask the running daemon; without one, answer from the store and a fresh check."""
    config = _load(args)
    path = os.path.abspath(args.path)
    try:
        report = control.ask(StateDir(config.daemon.state_dir).path, {"explain": path})
    except NoAnswer as exc:
        store = _open_existing_store(config)
        try:
            report = explain.answer_fresh(config, store, path, SystemClock())
        finally:
            store.close()
        if report is not None:
            report["no_answer"] = str(exc)
    if report is None:
        roots = ", ".join(describe(r.path) for r in config.roots) or "none"
        print(
            f"modelwatch: {describe(path)} is under no watched root (roots: {roots})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.format == "json":
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(render_explain(report))
    return EXIT_OK


def cmd_redeliver(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _open_existing_store(config)
    try:
        _check_sink(config, store, args.sink)
        if args.event is not None and not any(
            d.event_id == args.event for d in store.outbox.dead_letters(args.sink)
        ):
            where = f" for sink {args.sink!r}" if args.sink else ""
            raise ModelwatchError(f"no dead letter with event id {args.event!r}{where}")
        count = store.outbox.redeliver(args.sink, args.event)
    finally:
        store.close()
    print(f"{count} event(s) queued for redelivery")
    return EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    config = _load(args)
    _configure_logging(config)
    unit = describe(os.path.abspath(args.unit)) if args.unit is not None else None
    store = _open_existing_store(config)
    try:
        _check_sink(config, store, args.sink)
        discarded = store.outbox.discard(args.sink, event_id=args.event, unit=unit)
    finally:
        store.close()
    if not discarded:
        what = f"event id {args.event!r}" if args.event else f"unit {unit!r}"
        raise ModelwatchError(
            f"nothing to discard for {what} on sink {args.sink!r} "
            "(only dead-lettered or failing events are discarded)"
        )
    logger = structlog.get_logger("modelwatch.cli")
    for d in discarded:
        logger.warning("event_discarded", sink=d.sink, event_id=d.event_id, unit=d.unit)
        print(f"discarded {d.event_id} ({d.type.rsplit('.', 1)[-1]} of {d.unit}) on {d.sink}")
    return EXIT_OK


def _check_sink(config: Config, store: Store, sink: str | None) -> None:
    """An unknown sink name is an error (a typo must not look like "nothing to do")."""
    if sink is None:
        return
    known = sorted({s.name for s in config.sinks} | set(store.outbox.sinks()))
    if sink not in known:
        raise ModelwatchError(f"unknown sink {sink!r} (known: {', '.join(known) or 'none'})")


def _open_existing_store(config: Config) -> Store:
    """The store, read as it is: no migration (a daemon of the previous version may be
    running on it), and none created where there is none yet (an empty one in memory)."""
    db_path = os.path.join(config.daemon.state_dir, "state.db")
    if not os.path.exists(db_path):
        return Store(":memory:")
    return Store(db_path, migrate=False)
