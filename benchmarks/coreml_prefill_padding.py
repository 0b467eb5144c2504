"""Padded-token overhead of Core ML prefill: tokens the functions compute against real tokens, for one
prefill function at the cache capacity (the layout before enumerated lengths) and for the enumerated
lengths (default 64, 256, 1024), on the validation prompts and on single prompts of typical lengths.

    python benchmarks/coreml_prefill_padding.py                       # Mistral 7B v0.1: capacity 4096
    python benchmarks/coreml_prefill_padding.py --capacity 16 --window 16 --prefill 4,8

The counts come from the Core ML runner's own chunking (targets/coreml/runner.py) with the model calls
replaced by zeros, so they are exactly what a run of an artifact with those functions computes. The
validation prompts are those `validate` uses (validation/parity.py): a ragged batch of two, prefilled
in steps of at most 512 tokens, then 20 teacher-forced decode steps, then the same again generating freely.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from targets.coreml.pipeline import DEFAULT_PREFILL, Part, Pipeline, prefill_lengths
from targets.coreml.runner import _RowRunner
from targets.generate import PREFILL_STEP, pad_batch
from validation.parity import prompt_lengths


class CountingRunner(_RowRunner):
    """The runner's chunking and padding with every model call answering zeros."""

    def _new_state(self) -> Any:
        return None

    def _call(self, part: Part, function: str, x: np.ndarray, pos: np.ndarray, state: Any) -> np.ndarray:
        return np.zeros((1, x.shape[1], 1), np.float32)


def runner(lengths: tuple[int, ...], capacity: int) -> CountingRunner:
    part = Part(path=None, start=0, end=1, input="input_ids", output="logits", states=())  # type: ignore[arg-type]
    return CountingRunner(Pipeline((part,), lengths), capacity, None, (1,))


def validation_run(r: CountingRunner, capacity: int, window: int | None, new_tokens: int = 20) -> None:
    prompts = [list(range(n)) for n in prompt_lengths(capacity, window, new_tokens)]
    step = min(capacity, PREFILL_STEP)
    for _ in range(2):  # teacher-forced, then free-running: the same shape of work
        ids, pos = pad_batch(prompts, [0] * len(prompts))
        r.reset(len(prompts))
        for start in range(0, ids.shape[1], step):
            r.step(ids[:, start:start + step], pos[:, start:start + step])
        last = pos.max(axis=1, keepdims=True)
        for i in range(new_tokens):
            r.step(np.zeros((len(prompts), 1), np.int64), last + 1 + i)


def single_prompt(r: CountingRunner, length: int, capacity: int) -> None:
    r.reset(1)
    for start in range(0, length, capacity):
        n = min(capacity, length - start)
        r.step(np.zeros((1, n), np.int64), np.arange(start, start + n)[None])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--prefill", default=DEFAULT_PREFILL, help="enumerated prefill lengths")
    parser.add_argument("--prompts", default="10,63,100,500,2000", help="single prompt lengths")
    args = parser.parse_args()
    layouts = {f"one prefill at {args.capacity}": (args.capacity,),
               f"prefill {args.prefill}": prefill_lengths(args.prefill, args.capacity)}
    print(f"capacity {args.capacity}, window {args.window}\n")
    print("| workload | " + " | ".join(layouts) + " |")
    print("|---|" + "---|" * len(layouts))
    workloads = [("validation prompts " + "+".join(map(str, prompt_lengths(args.capacity, args.window, 20))),
                  lambda r: validation_run(r, args.capacity, args.window))]
    workloads += [(f"one prompt of {n} tokens", lambda r, n=n: single_prompt(r, n, args.capacity))
                  for n in map(int, args.prompts.split(","))]
    for name, work in workloads:
        cells = []
        for lengths in layouts.values():
            r = runner(lengths, args.capacity)
            work(r)
            p = r.padding()
            cells.append(f"{p['computed_tokens']} / {p['real_tokens']} = {p['overhead']:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
