"""The ``push-relay`` command: serve, send, check-config, demo.

Only this module installs signal handlers and configures logging; everything it runs can be
driven from code (``relay.server.serve(config, stop=event)``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from pushrelay.v1 import relay_pb2 as pb
from relay import __version__
from relay.config import Config, ConfigError, load_config
from relay.logs import setup_logging

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``push-relay`` console script."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except ConfigError as error:
        _print_problems(args.config_path(args), error)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="push-relay", description="Stateless gRPC relay to APNs, FCM and Web Push."
    )
    parser.add_argument("--version", action="version", version=f"push-relay {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    _add_config_option(serve)
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", help="the YAML config file")
    check.set_defaults(run=_check_config, config_path=lambda a: a.file)

    send = commands.add_parser("send", help="send one notification and print the result")
    _add_config_option(send)
    _add_send_options(send)
    send.set_defaults(run=_send)

    demo = commands.add_parser(
        "demo", help="run the relay against bundled fake providers and show what they received"
    )
    demo.set_defaults(run=_demo, config_path=lambda a: "(demo)")
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("PUSH_RELAY_CONFIG"),
        help="the YAML config file (default: $PUSH_RELAY_CONFIG)",
    )
    parser.set_defaults(config_path=lambda a: a.config or "(none)")


def _add_send_options(parser: argparse.ArgumentParser) -> None:
    # Protobuf enum wrappers are not dicts: .keys() is their API.
    kinds = [k.lower() for k in pb.Kind.keys() if k != "KIND_UNSPECIFIED"]  # noqa: SIM118
    modes = [m.lower() for m in pb.Privacy.keys() if m != "PRIVACY_UNSPECIFIED"]  # noqa: SIM118
    parser.add_argument("--app", required=True, help="a configured app id")
    parser.add_argument("--token", required=True, help="the device token or endpoint")
    parser.add_argument("--kind", choices=kinds, default="instant_message")
    parser.add_argument("--sender", default="push-relay", help="sender display name")
    parser.add_argument("--preview", default="Test notification from push-relay send")
    parser.add_argument("--conversation", default="push-relay-send", help="conversation id")
    parser.add_argument("--privacy", choices=modes, help="privacy mode (default: the app's)")
    parser.add_argument("--badge", type=int, default=0)
    # Written --p256dh=KEY: a base64url key may start with "-", which argparse takes for an option.
    parser.add_argument("--p256dh", help="Web Push: the subscription's p256dh key (base64url)")
    parser.add_argument("--auth", help="Web Push: the subscription's auth secret (base64url)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")


def _require_config(args: argparse.Namespace) -> Config:
    if not args.config:
        raise SystemExit("push-relay: no config: pass --config FILE or set PUSH_RELAY_CONFIG")
    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    config = _require_config(args)
    setup_logging(config.server.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_until_signalled(config, args.config))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop unless ``PUSH_RELAY_EVENT_LOOP=asyncio``: it measured cheaper per push under
    the gRPC server and the transport (bench/RESULTS.md); the variable is there to compare the
    two."""
    choice = os.environ.get("PUSH_RELAY_EVENT_LOOP", "uvloop")
    if choice not in ("uvloop", "asyncio"):
        raise SystemExit(
            f"push-relay: PUSH_RELAY_EVENT_LOOP must be uvloop or asyncio, not {choice!r}"
        )
    if choice == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


async def _serve_until_signalled(config: Config, path: str) -> int:
    """SIGTERM/SIGINT drain and stop; SIGHUP re-reads the config and the secrets it names."""
    from relay.server import serve

    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    await serve(
        config,
        stop=stop,
        reload=reload,
        load=lambda: load_config(path),
        on_ready=lambda _: _tune_the_process(),
    )
    return 0


def _tune_the_process() -> None:
    _threads_yield_to_the_loop()
    _freeze_what_start_up_made()
    if keep_the_heap_lean():
        logging.getLogger("relay.cli").info(
            "blocks of 16 KiB and more mapped on their own",
            extra={"mmap_threshold_bytes": MMAP_THRESHOLD_BYTES},
        )
    if release_free_memory():
        _return_free_memory_every(TRIM_SECONDS)


TRIM_SECONDS = 10.0


def _freeze_what_start_up_made() -> None:
    """Take every object start-up made (modules, protobuf descriptors, the config, the apps)
    out of the cyclic garbage collector's walks (``gc.freeze``, after a last collection).

    Under load, objects of calls in flight reach the oldest generation and set off full
    collections, each a pause for every call in flight; walking start-up's objects too, they
    took 16-21 ms here, 17 times in 30 s of load (bench/RESULTS.md); without them ~2.4 ms.
    Start-up's objects are never cyclic garbage in a serving process. Reference counting still
    frees what a reload drops; only a cycle among the first config's objects would stay.
    """
    gc.collect()
    gc.freeze()
    logging.getLogger("relay.cli").info(
        "start-up objects frozen out of the garbage collector",
        extra={"objects": gc.get_freeze_count()},
    )


# glibc's mallopt() parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 16 * 1024
TRIM_THRESHOLD_BYTES = 64 * 1024


def keep_the_heap_lean() -> bool:
    """Map blocks of 16 KiB and more on their own, and keep no spare room atop the heap.

    Every transfer in flight holds a 16 KiB request buffer inside libcurl (its smallest upload
    buffer) that carries ~0.5 KiB: headers and a small body. Carved from the heap, ``calloc``
    zeroes all of it, so all of it is resident; glibc's default keeps 128 KiB of spare room atop
    the heap to carve from, and raises its mmap threshold past 16 KiB the first time such a
    block is freed. Mapped on its own, a fresh block is already zero: only the page written is
    resident. The top of the heap goes back to the system once 64 KiB of it are free (glibc's
    default: 128 KiB). At the peak of 1,000 pushes in flight, after the benchmark's other
    phases: RSS 108.6-109.0 -> 96.2-96.6 MiB, CPU a push unchanged (``bench/RESULTS.md``).

    Returns:
        False where the C library has no ``mallopt`` (musl): nothing was changed.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TOP_PAD, 0),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        )
    )


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``).

    Returns:
        False where the C library has no ``malloc_trim`` (musl): nothing was done.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None
    return function


def _return_free_memory_every(seconds: float) -> None:
    """From now on, every ``seconds``, hand the heap's free pages back to the system.

    A burst of pushes in flight (a provider slowing down, a caller's spike) grows the heap, and
    glibc keeps what is freed inside it for reuse, returning only what sits at its very top: RSS
    stayed at each burst's high-water mark, +14–23 % in steps over the soak's 150–200 s
    (``bench/RESULTS.md``). ``malloc_trim(0)`` returns free pages from anywhere in the heap; it
    took 0.2–0.5 ms here, once every 10 s.
    """
    loop = asyncio.get_running_loop()

    def tick() -> None:
        release_free_memory()
        loop.call_later(seconds, tick)

    loop.call_later(seconds, tick)
    logging.getLogger("relay.cli").info(
        "free memory returned to the system periodically", extra={"every_seconds": seconds}
    )


def _threads_yield_to_the_loop() -> None:
    """Put every thread of the process but this one (the event loop's) on ``SCHED_BATCH``, at
    the lowest priority (nice 19).

    The gRPC server and the provider transport both run on the event loop's thread; the
    others are uvloop's workers (name resolution). When the server was grpcio's, its C core
    ran threads of its own whose every wake-up preempted the loop on one core (13 context
    switches a push through ``SendStream``); on ``SCHED_BATCH`` at nice 19 a waking thread
    does not preempt the running one: it runs when the loop waits or its time slice ends
    (``bench/RESULTS.md``, 2026-12-04). Kept for the threads that remain: a burst of lookups
    never takes the core from the loop. Unlike ``SCHED_IDLE`` they keep a share of the CPU,
    so a busy machine never starves them. Threads they start later inherit both. Where the
    system refuses (a sandbox) nothing else changes.
    """
    loop_thread = threading.get_native_id()
    changed = 0
    for name in os.listdir("/proc/self/task"):
        if int(name) == loop_thread:
            continue
        try:
            os.sched_setscheduler(int(name), os.SCHED_BATCH, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, int(name), THREADS_NICE)
        except OSError:
            continue
        changed += 1
    logging.getLogger("relay.cli").info(
        "threads yield to the event loop", extra={"threads": changed, "nice": THREADS_NICE}
    )


THREADS_NICE = 19


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    platforms = sorted({app.platform for app in config.apps.values()})
    print(f"{args.file}: ok ({len(config.apps)} apps: {', '.join(platforms) or 'none'})")
    return 0


def _send(args: argparse.Namespace) -> int:
    from relay.tools import send_one

    config = _require_config(args)
    setup_logging("error")  # the throwaway relay's warnings (open API…) are not the user's
    return asyncio.run(send_one(config, args))


def _demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    setup_logging("error")
    return asyncio.run(run_demo())


def _print_problems(path: str, error: ConfigError) -> None:
    print(f"push-relay: {path}: {len(error.problems)} problem(s):", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
