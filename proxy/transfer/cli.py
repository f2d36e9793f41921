"""``casproxy export`` and ``casproxy import``: build a TransferSpec from the flags, run it against
the configured tiers in this process (no server needed), draw its progress.

Exit status: 0 all good; 1 something failed or was corrupt (the rest was done: run the same
command again to retry); 2 a mistake in the command; 128+N when stopped by signal N (Ctrl-C:
130), after saving the checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from proxy import exits
from proxy.transfer.spec import TransferError, TransferSpec, UsageError
from proxy.units import parse_duration, parse_size

if TYPE_CHECKING:  # imported when a transfer runs: casproxy --help need not load boto3
    from proxy.store.composite import Composite
    from proxy.transfer.progress import ProgressView

EXPORT_HELP = """\
Read each blob through the configured tiers once (verified, as the proxy would serve it, without
filling the caches) and write it to every TARGET: s3://bucket/prefix/ (key = prefix + hash;
multipart above --multipart-threshold), a folder (FOLDER/hash), a .tar file, or - for a tar stream
on stdout (member name = hash). Give --to several times to write to several targets in one pass:
each keeps its own progress and checkpoint, and one that fails or is slow does not stop the
others. Blobs a target has already are skipped. An interrupted run (Ctrl-C, kill, crash) started
again with the same arguments does only what is left at each target, and continues a large upload
from its last finished part; a tar stream (-) cannot be resumed."""

IMPORT_HELP = """\
Read every object of SOURCE (s3://bucket/prefix/, a folder, a .tar file, or - for a tar stream on
stdin), check its bytes against the digest in its name, and write the good ones into a tier
(default: the first upload target). Names that are not digests are skipped and reported; corrupt
objects are reported and never stored. Resumable like export (not from -)."""


def add_commands(commands: Any) -> None:
    """Add ``export`` and ``import`` to the ``casproxy`` subcommands."""
    export = commands.add_parser(
        "export", help="copy blobs to a bucket, folder or tar, resumably", description=EXPORT_HELP
    )
    export.add_argument("--hashes", required=True, metavar="FILE|-", help="digests, one a line (- : stdin)")
    export.add_argument(
        "--to",
        required=True,
        action="append",
        dest="targets",
        metavar="TARGET",
        help="s3://bucket/prefix/, FOLDER, FILE.tar or -; again for more targets",
    )
    export.add_argument(
        "--part-size", type=_size, default="16 MiB", help="multipart part size, at least 5 MiB (default: 16 MiB)"
    )
    export.add_argument(
        "--multipart-threshold",
        type=_size,
        default="64 MiB",
        help="blobs this large or larger go up in parts (default: 64 MiB)",
    )
    _common_flags(export)

    import_ = commands.add_parser(
        "import", help="verify and store blobs from a bucket, folder or tar, resumably", description=IMPORT_HELP
    )
    import_.add_argument(
        "--from", required=True, dest="source", metavar="SOURCE", help="s3://bucket/prefix/, FOLDER, FILE.tar or -"
    )
    import_.add_argument("--into", metavar="TIER", help="tier to write to (default: the first upload target)")
    _common_flags(import_)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="config file (default: $CASPROXY_CONFIG or ./config.toml)")
    parser.add_argument("-j", "--jobs", type=_positive, default=8, help="transfers at once (default: 8)")
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="where to record progress (default: in the cache folder, per location; "
        "with several targets, one file per target beside PATH)",
    )
    parser.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    parser.add_argument(
        "--memory", type=_size, default="256 MiB", help="blob bytes held in memory at most (default: 256 MiB)"
    )
    parser.add_argument(
        "--progress-interval",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, print a status line this often (default: 5)",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, got {text!r}")
    return int(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """Run ``casproxy export`` or ``casproxy import``; the exit status."""
    from proxy.config import load_config
    from proxy.service import build_store  # the one place tiers are built from config
    from proxy.transfer.progress import ProgressView
    from proxy.transfer.wiring import default_into, state_dir

    kind = args.command
    try:
        spec = TransferSpec(
            kind=kind,
            targets=tuple(getattr(args, "targets", None) or ()),
            source=getattr(args, "source", ""),
            hashes_file=getattr(args, "hashes", None),
            into=getattr(args, "into", None),
            jobs=args.jobs,
            checkpoint=args.checkpoint,
            endpoint_url=args.endpoint_url,
            part_size=getattr(args, "part_size", 16 << 20),
            multipart_threshold=getattr(args, "multipart_threshold", 64 << 20),
            memory=args.memory,
        )
        spec.check()
        if "-" in spec.targets and sys.stdout.isatty():
            raise UsageError("refusing to write a tar stream to a terminal: redirect stdout, or --to FILE.tar")
        if spec.source == "-" and sys.stdin.isatty():
            raise UsageError("--from -: expecting a tar stream on stdin, which is a terminal")
        config = load_config(args.config)
        store = build_store(config)
        view = ProgressView(interval=args.progress_interval)
        with _logging_through(view):
            status = asyncio.run(_main(spec, store, view, state_dir(store), default_into(config, store)))
        if status > 128:
            _exit_now(status)
        return status
    except TransferError as error:
        return exits.report(error, f"casproxy: {kind}")
    finally:
        if "-" in (getattr(args, "targets", None) or ()):
            _quiet_stdout()


async def _main(spec: TransferSpec, store: Composite, view: ProgressView, state: str, into: str | None) -> int:
    from proxy.transfer.engine import Transfer

    loop = asyncio.get_running_loop()
    transfer = Transfer(
        spec,
        store,
        state_dir=state,
        default_into=into,
        report=lambda line: view.message(f"casproxy: {spec.kind}: {line}"),
    )
    running = loop.create_task(transfer.run())
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        if stopped_by:  # asked twice: stop now (the checkpoint only ever records finished work)
            os._exit(128 + signum)
        stopped_by.append(signum)
        view.message(f"casproxy: {spec.kind}: stopping; the checkpoint keeps what is done (again to quit at once)")
        running.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    drawing = loop.create_task(view.follow(transfer.snapshot))
    failure: TransferError | None = None
    try:
        await running
    except asyncio.CancelledError:
        if not stopped_by:
            raise
    except UsageError:
        raise
    except TransferError as error:
        failure = error
    finally:
        drawing.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if not stopped_by:
            await store.wait_idle()  # blobs read from a source finish landing in the caches
        await store.close()
    snap = transfer.snapshot()
    view.close(snap)
    paths = ", ".join(transfer.checkpoint_paths)
    where = f" (checkpoint{'s' if len(transfer.checkpoint_paths) > 1 else ''}: {paths})" if paths else ""
    if stopped_by:
        if transfer.location.resumable:
            view.message(f"casproxy: {spec.kind}: interrupted; run the same command again to resume{where}")
        return 128 + stopped_by[0]
    if failure is not None:
        raise failure
    if snap.failed:
        view.message(f"casproxy: {spec.kind}: {snap.failed} failed; run the same command again to retry them{where}")
    return 0 if snap.ok else 1


@contextlib.contextmanager
def _logging_through(view: ProgressView) -> Iterator[None]:
    """Warnings from the tiers (a tier failing, a corrupt copy skipped) above the progress bar."""
    from proxy.transfer.progress import MessageHandler

    root = logging.getLogger()
    handler, level = MessageHandler(view), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _exit_now(status: int) -> None:
    """Stopped by a signal, with the checkpoint saved and the target closed: exit without
    waiting for worker threads, one of which may be blocked reading a pipe (stdin) for good."""
    _quiet_stdout()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


def _quiet_stdout() -> None:
    """If whoever read the tar stream went away, say nothing more about it at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
