"""The real executable under signals, concurrent writers and SIGKILL, and with no network.

Each test runs `python -m mistral_export.entry` (what the `mistral-export` script runs) in its own
process, because signal handling, start-up imports and telemetry are process-wide."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import hf_model, save_checkpoint

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer checkpoint: its ONNX Runtime build takes long enough to be interrupted at any stage."""
    return save_checkpoint(hf_model(num_hidden_layers=8, hidden_size=64, head_dim=16, sliding_window=16),
                           tmp_path_factory.mktemp("sig") / "eight")


def start(args: list[str], cache: Path, wrap: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "MISTRAL_EXPORT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MISTRAL_EXPORT_DEBUG", None)
    return subprocess.Popen([*(wrap or []), sys.executable, "-m", "mistral_export.entry", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """Ctrl-C's default disposition, as a terminal's foreground job has it. A test run started in the
    background of a non-interactive shell inherits SIGINT ignored (POSIX), and so would the command,
    which then rightly keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def build_args(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--target", "onnxruntime", "--checkpoint", str(checkpoint), "--out", str(out),
            "--no-validate", *extra]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def staging_of(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def staging_seen(out: Path) -> bool:
    """A build's staging folder exists: it is made after tracing, so lowering has seconds left."""
    return any(".partial-" in p.name for p in staging_of(out))


def holds_lock(out: Path, pid: int) -> bool:
    """pid has written itself into out's lock file, which it does once it holds the lock."""
    try:
        return (out.parent / f".{out.name}.lock").read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=180)
    print(stderr)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGINT: the next test
def test_termination_signals_during_lowering_leave_nothing(eight_layers: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "art"
    proc = start(build_args(eight_layers, out), tmp_path / "cache")
    assert wait_for(lambda: staging_seen(out), proc), "no staging folder seen"
    proc.send_signal(sig)
    code, stderr = finish(proc)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 128 + sig
    assert lines == [f"interrupted ({signal.Signals(sig).name}); nothing was left half-written"], lines
    assert not out.exists() and not staging_of(out)


@pytest.mark.parametrize("moment", ["imports", "lowering"])
def test_ctrl_c_at_any_moment_prints_one_line(eight_layers: Path, tmp_path: Path, moment: str) -> None:
    """Start-up imports (torch takes seconds) and lowering: one line, never a traceback."""
    out = tmp_path / "art"
    proc = start(build_args(eight_layers, out, "--no-cache"), tmp_path / "cache")
    if moment == "imports":
        time.sleep(0.3)
    else:
        assert wait_for(lambda: staging_seen(out), proc), "no staging folder seen"
    proc.send_signal(signal.SIGINT)
    code, stderr = finish(proc)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted (SIGINT)"), lines
    assert "Traceback" not in stderr and not out.exists() and not staging_of(out)


def test_concurrent_build_to_the_same_out_fails_clearly(eight_layers: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    first = start(build_args(eight_layers, out), tmp_path / "cache")
    assert wait_for(lambda: holds_lock(out, first.pid), first)
    # Stopped while it holds the lock, so the second meets it however fast the first would finish.
    first.send_signal(signal.SIGSTOP)
    try:
        second = start(["build", "--target", "reference", "--out", str(out), "--no-validate"], tmp_path / "cache")
        code, stderr = finish(second)
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and f"being written by another mistral-export process (pid {first.pid})" in stderr
    first.send_signal(signal.SIGTERM)  # the first writer is untouched by the refusal, and cleans up after itself
    assert finish(first)[0] == 143 and not out.exists() and not staging_of(out)


def test_sigkill_leftovers_are_swept_by_the_next_build(eight_layers: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = start(build_args(eight_layers, out), tmp_path / "cache")
    assert wait_for(lambda: staging_seen(out), proc)
    proc.kill()
    proc.wait()
    stale = [p for p in staging_of(out) if ".partial-" in p.name]
    assert stale, "SIGKILL cannot be caught: its staging folder stays until the next build"
    # Any build to the same path sweeps them (the tiny preset's, here, to be quick).
    code, _ = finish(start(["build", "--target", "reference", "--out", str(out), "--no-validate"], tmp_path / "cache"))
    assert code == 0 and out.is_dir() and not any(p.exists() for p in stale) and not staging_of(out)


def _strace() -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed: the network check needs it (apt install strace)")
    if subprocess.run([strace, "-f", "-o", os.devnull, "true"], capture_output=True).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    # --seccomp-bpf: the traced process stops only at these calls, not at every one (several times faster).
    return [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect,sendto,openat,access"]


def test_no_network_and_no_telemetry(tmp_path: Path) -> None:
    """Traced system calls of whole builds with validation: no socket is connected anywhere (OpenVINO's
    converter looked up an analytics host; ONNX Runtime started a telemetry client under ~/.cache)."""
    pytest.importorskip("openvino", reason="openvino is not installed")
    # OpenVINO's look-ups came from its converter (the build); ONNX Runtime's client starts with a session.
    # One build of both targets (with validation: each runtime's sessions), generate on each, and inspect
    # are traced; bench runs the same runners through the same entry point (exporter.offline runs first).
    calls = []
    out = tmp_path / "arts"
    arts = [str(out / f"tiny-{t}-fp32") for t in ("onnxruntime", "openvino")]
    commands = [["build", "--target", "onnxruntime,openvino", "--out", str(out)],
                *(["generate", a, "--prompt-ids", "1,2,3"] for a in arts), ["inspect", arts[0]]]
    for i, command in enumerate(commands):
        log = tmp_path / f"syscalls-{i}.txt"
        code, _ = finish(start(command, tmp_path / "cache", wrap=[*_strace(), "-o", str(log)]))
        assert code == 0
        calls += log.read_text().splitlines()
    # A name look-up reads resolv.conf or hosts (nscd's socket also serves passwd look-ups: not network).
    network = [c for c in calls if "AF_INET" in c or "/etc/resolv.conf" in c or "/etc/hosts" in c]
    telemetry = [c for c in calls if "DeveloperTools" in c or "/intel/openvino_telemetry" in c]
    print(f"{len(calls)} traced calls; network {network[:3]}; telemetry {telemetry[:3]}")
    assert not network and not telemetry
    # The tracer saw both runtimes load in the traced processes (a trace of nothing would pass vacuously).
    assert any("libonnxruntime" in c for c in calls) and any("libopenvino" in c for c in calls)
