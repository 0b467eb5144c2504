"""The `mistral-export` executable: signals and telemetry are settled before anything heavy loads,
so Ctrl-C, SIGTERM or SIGHUP during start-up (torch takes seconds to import) ends with one line."""

from __future__ import annotations

import os
import sys


def _exit_interrupted(code: int) -> None:
    """Leave with the signal's exit code. CPython re-raises SIGINT at exit when a KeyboardInterrupt once
    passed through code run by PyRun_* (some extension start-ups do), even though it was handled, which
    would turn 130 into a death by signal: everything is already cleaned up, so exit directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    from exporter import offline, signals

    signals.install()
    try:
        # Held back until the imports are done: torch's extension start-up aborts the process
        # (SIGABRT) when interrupted half-way, so a signal now is delivered, and reported, just after.
        with signals.deferred():
            offline.disable_telemetry()
            from mistral_export.cli import run
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"interrupted ({signals.signal_name(exc)}) while starting; nothing was written\n")
        _exit_interrupted(signals.exit_code(exc))
    code = run()
    if code in signals.EXIT_CODES:
        _exit_interrupted(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
