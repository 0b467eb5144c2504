"""Where matrix jobs run: here, one process per job within a memory budget (`local`), or as Ray tasks
on a cluster (`ray`), which routes each job to a node that has its device resource.

A unit is a build followed by the checks on its artifact; a check runs only after its build
succeeded. Every job ends as a row: built, checked, failed, not-run, or unschedulable (a resource or
an amount of memory that no machine offers, reported after the schedule timeout, never waited on
for ever)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from exporter.errors import UserError
from pipeline.job_run import base_row, run_job
from pipeline.jobs import Job
from targets.resources import GIB

Events = Callable[[dict[str, Any]], None]
Unit = list[Job]
GPU = "GPU"  # Ray's own GPU resource (num_gpus); the others are custom resources


def not_run(job: Job, status: str, why: str) -> dict[str, Any]:
    return {**base_row(job), "status": status, "error": why}


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ---- local ---------------------------------------------------------------------------------------

def local_resources(wanted: set[str]) -> set[str]:
    """Which of the wanted device resources this machine has."""
    have = set()
    if "macos" in wanted and sys.platform == "darwin":
        have.add("macos")
    if GPU in wanted:
        import torch

        if torch.cuda.is_available():
            have.add(GPU)
    if wanted & {"intel_gpu", "intel_npu"}:
        try:
            import openvino

            devices = {d.split(".")[0] for d in openvino.Core().available_devices}
            have |= {name for name, dev in (("intel_gpu", "GPU"), ("intel_npu", "NPU")) if dev in devices}
        except ImportError:
            pass
    return have


class _Budget:
    """Admits a job when its declared memory fits beside the running ones (one always runs)."""

    def __init__(self, total: int) -> None:
        self.total, self.used, self.cond = total, 0, threading.Condition()

    @contextmanager
    def hold(self, need: int) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + need <= self.total)
            self.used += need
        try:
            yield
        finally:
            with self.cond:
                self.used -= need
                self.cond.notify_all()


def run_in_process(job: Job, on_event: Events) -> dict[str, Any]:
    """`python -m pipeline.job_run` for one job; its progress and row come back on a pipe."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.job_run", json.dumps(job.to_dict()), str(write_fd)],
                                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(write_fd)
        row = None
        with os.fdopen(read_fd) as events:
            for line in events:
                event = json.loads(line)
                if "row" in event:
                    row = event["row"]
                else:
                    on_event(event)
        code = proc.wait()
        if row is None:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 2000))
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            row = not_run(job, "failed", f"the job's process ended with {how}: {' | '.join(tail)}")
    return row


def run_local(units: list[Unit], on_event: Events, memory_budget: int, workers: int) -> list[dict[str, Any]]:
    """Each unit in a thread that starts one process per job, at most `workers` at once and within
    the memory budget; a job this machine cannot run is unschedulable at once."""
    have = local_resources({j.resource for u in units for j in u if j.resource})
    budget = _Budget(memory_budget)
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run_unit(unit: Unit) -> None:
        built = True
        for job in unit:
            if job.resource and job.resource not in have:
                row = not_run(job, "unschedulable", f"needs resource {job.resource}: this machine has none; "
                                                    "run it on a cluster node that has it (--executor ray)")
            elif job.memory_bytes > memory_budget:
                row = not_run(job, "unschedulable", f"needs {_gib(job.memory_bytes)} of memory; the budget is "
                                                    f"{_gib(memory_budget)} (--memory-budget)")
            elif not built:
                row = not_run(job, "not-run", "its build did not succeed")
            else:
                on_event({"job": job.id, "message": "running", "fraction": 0.0})
                with budget.hold(job.memory_bytes):
                    row = run_in_process(job, on_event)
            built = built and row["status"] in ("built", "checked")
            on_event({"job": job.id, "done": row})
            with lock:
                rows.append(row)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(run_unit, unit) for unit in units]:
            future.result()
    return rows


# ---- Ray -----------------------------------------------------------------------------------------

def _ray_task(job_dict: dict[str, Any], build_row: dict[str, Any] | None, queue: Any) -> dict[str, Any]:
    """Runs in a Ray worker that serves this one task (max_calls=1), so its peak RSS is the job's."""
    job = Job.from_dict(job_dict)
    if build_row is not None and build_row["status"] != "built":
        return not_run(job, "not-run", "its build did not succeed")
    return run_job(job, lambda event: queue.put_nowait(event))


def _needs(job: Job) -> dict[str, float]:
    need = {"CPU": 1.0, "memory": float(job.memory_bytes)}
    if job.resource:
        need[job.resource] = 1.0
    return need


def _unmet(job: Job, nodes: list[dict[str, Any]]) -> str | None:
    """None if some live node could run the job, else what no node offers."""
    need = _needs(job)
    if any(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return None
    if job.resource and not any(n["Resources"].get(job.resource, 0.0) >= 1 for n in nodes):
        return f"needs resource {job.resource}: no node of the cluster has it"
    largest = max((n["Resources"].get("memory", 0.0) for n in nodes), default=0.0)
    return f"needs {_gib(job.memory_bytes)} of memory on one node; the largest offers {_gib(largest)}"


def run_ray(units: list[Unit], on_event: Events, address: str | None, retries: int,
            schedule_timeout: float) -> list[dict[str, Any]]:
    """Each job a Ray task asking for 1 CPU, its declared memory and its device resource; a check
    takes its build's result as an argument, so Ray starts it after the build."""
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'mistral-export[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address}: {exc}; start it with `ray start --head`"
                            " or leave out --address for a local one") from None
    try:
        return _drive(ray, Queue, units, on_event, retries, schedule_timeout)
    finally:
        if started_here:
            ray.shutdown()


def _drive(ray: Any, queue_type: Any, units: list[Unit], on_event: Events, retries: int,
           schedule_timeout: float) -> list[dict[str, Any]]:
    task = ray.remote(max_calls=1)(_ray_task)
    queue = queue_type(actor_options={"num_cpus": 0})
    pending: dict[Any, Job] = {}
    follows: dict[str, list[Any]] = {}  # build id -> its checks' refs
    for unit in units:
        build_ref = None
        for job in unit:
            gpu = {"num_gpus": 1} if job.resource == GPU else {}
            custom = {"resources": {job.resource: 1}} if job.resource and job.resource != GPU else {}
            ref = task.options(num_cpus=1, memory=job.memory_bytes, max_retries=retries, retry_exceptions=False,
                               name=job.id, **gpu, **custom).remote(job.to_dict(), build_ref, queue)
            pending[ref] = job
            if job.kind == "build":
                build_ref = ref
            elif job.after:
                follows.setdefault(job.after, []).append(ref)
    submitted = time.monotonic()
    rows: list[dict[str, Any]] = []

    def finish(ref: Any, row: dict[str, Any]) -> None:
        job = pending.pop(ref)
        rows.append(row)
        on_event({"job": job.id, "done": row})

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for ref in ready:
            job = pending[ref]
            try:
                finish(ref, ray.get(ref))
            except ray.exceptions.TaskCancelledError:
                finish(ref, not_run(job, "not-run", "cancelled: its build is unschedulable"))
            except ray.exceptions.RayError as exc:  # retries spent: the worker kept dying
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                finish(ref, not_run(job, "failed", f"{type(exc).__name__} after {retries} retries: {first}"))
        while queue.qsize():
            for event in queue.get_nowait_batch(queue.qsize()):
                on_event(event)
        if time.monotonic() - submitted >= schedule_timeout and pending:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            for ref, job in list(pending.items()):
                why = _unmet(job, nodes) if ref in pending else None
                if why is None:
                    continue
                ray.cancel(ref, force=False)
                finish(ref, not_run(job, "unschedulable", why))
                for check in follows.get(job.id, []):
                    if check in pending:
                        ray.cancel(check, force=False)
                        finish(check, not_run(pending[check], "not-run", "its build is unschedulable"))
    return rows
