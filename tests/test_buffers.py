"""Runners' output arrays are reused only once nobody holds them (targets/buffers.py)."""

from __future__ import annotations

import numpy as np

from targets.buffers import KEEP_SHAPES, Recycler


def test_an_array_is_reused_only_when_released() -> None:
    pool = Recycler()
    first = pool.take((2, 3), np.float32)
    first[:] = 1
    second = pool.take((2, 3), np.float32)
    assert second is not first  # still held by the caller
    second[:] = 2
    assert (first == 1).all()
    address = first.ctypes.data
    del first
    assert pool.take((2, 3), np.float32).ctypes.data == address  # released: handed out again


def test_a_held_view_keeps_its_array_out_of_reuse() -> None:
    pool = Recycler()
    logits = pool.take((1, 4, 5), np.float32)
    last = logits[:, -1]  # what a decode loop keeps
    address = logits.ctypes.data
    del logits
    again = pool.take((1, 4, 5), np.float32)
    assert again.ctypes.data != address and last.base is not None


def test_shapes_and_dtypes_do_not_mix_and_old_shapes_are_dropped() -> None:
    pool = Recycler()
    released = pool.take((2, 3), np.float32).ctypes.data
    assert pool.take((3, 2), np.float32).ctypes.data != released  # a released array of another shape
    assert pool.take((2, 3), np.float16).ctypes.data != released  # or dtype is not handed out
    assert pool.take((2, 3), np.float32).ctypes.data == released
    for n in range(KEEP_SHAPES + 1):
        pool.take((n + 10,), np.float32)
    assert len(pool._pools) == KEEP_SHAPES
