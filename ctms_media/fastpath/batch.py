"""A batch of datagrams as numpy arrays, shaped for ``FastForwarder.forward_batch``.

Python code, tests and the benchmark build and inspect batches without copies: the inbound
arena is a 2-D uint8 array (one datagram per row) with a lengths array, and the outputs are
rows of (offset, length, receivers start, receivers count, packet) into one output arena,
receivers being the forwarder's interned slots. Receivers of one output variant share its
bytes, which is what lets ``_udpio.send_outputs`` send them without copying.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ctms_media._fastforward import (
    OUT_COLUMNS,
    OUT_LENGTH,
    OUT_OFFSET,
    OUT_RCV_COUNT,
    OUT_RCV_START,
    RES_CODE,
    RES_COLUMNS,
    RES_FIRST_OUT,
    RES_N_OUT,
    RES_RTCP,
    RES_SSRC,
    RES_TAIL,
)
from ctms_media.forward.verdict import DROP_REASONS, Verdict

DEFAULT_SLOT = 2048  # bytes per arena row: above any MTU-sized datagram


class Batch:
    """Preallocated arrays for one forward_batch call: inbound datagrams and their outputs.

    The output arrays are sized for ``fan_out`` variants per datagram; a run that does not
    fit stops early and says so (``done`` < ``count``), so nothing is ever reallocated while
    datagrams flow unless :meth:`forward_all` is asked to grow.
    """

    def __init__(
        self,
        capacity: int = 64,
        slot: int = DEFAULT_SLOT,
        fan_out: int = 4,
        arena: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
    ) -> None:
        self.arena = np.zeros((capacity, slot), np.uint8) if arena is None else arena
        self.lengths = np.zeros(len(self.arena), np.int32) if lengths is None else lengths
        capacity, slot = self.arena.shape
        self.kinds = np.full(capacity, -1, np.int8)
        self.results = np.zeros((capacity, RES_COLUMNS), np.int64)
        self._size_outputs(capacity, slot, fan_out)
        self.count = 0
        self.done = 0
        self.n_out = 0
        self.n_rcv = 0
        self.switched: dict[int, tuple[str, ...]] = {}

    def _size_outputs(self, capacity: int, slot: int, fan_out: int) -> None:
        self.fan_out = fan_out
        rows = capacity * fan_out
        self.out_arena = np.zeros(rows * (slot + 64), np.uint8)
        self.out_meta = np.zeros((rows, OUT_COLUMNS), np.int64)
        self.out_receivers = np.zeros(rows * 8, np.int32)

    @property
    def capacity(self) -> int:
        return int(self.arena.shape[0])

    def clear(self) -> None:
        self.count = 0
        self.done = 0
        self.n_out = 0
        self.n_rcv = 0
        self.switched = {}
        self.kinds[:] = -1

    def add(self, datagram: bytes, rtcp: bool | None = None) -> int:
        """Copy one datagram into the next row; returns its index."""
        i = self.count
        if i >= self.capacity:
            raise IndexError("batch is full")
        n = len(datagram)
        if n > self.arena.shape[1]:
            raise ValueError(f"datagram of {n} bytes exceeds the {self.arena.shape[1]}-byte row")
        self.arena[i, :n] = np.frombuffer(datagram, np.uint8)
        self.lengths[i] = n
        self.kinds[i] = -1 if rtcp is None else int(bool(rtcp))
        self.count += 1
        return i

    def fill(self, datagrams: Iterable[bytes]) -> None:
        self.clear()
        for d in datagrams:
            self.add(d)

    def datagram(self, i: int) -> bytes:
        return self.arena[i, : self.lengths[i]].tobytes()

    def run(self, fwd: Any, start: int = 0) -> int:
        """One forward_batch call from ``start``; returns the packets done (outputs of this
        call only are in the output arrays)."""
        done, n_out, n_rcv, switched = fwd.forward_batch(
            self.arena,
            self.lengths,
            self.count,
            self.results,
            self.out_arena,
            self.out_meta,
            self.out_receivers,
            self.kinds,
            start,
        )
        self.done, self.n_out, self.n_rcv, self.switched = done, n_out, n_rcv, switched
        return done

    def output(self, j: int) -> tuple[memoryview, np.ndarray]:
        """Output row j: its bytes (a view into the output arena) and its receiver slots."""
        off, length, rs, rc = (int(x) for x in self.out_meta[j, :4])
        return (
            memoryview(self.out_arena)[off : off + length],
            self.out_receivers[rs : rs + rc],
        )

    def verdict(self, i: int, receiver_ids: list[str]) -> Verdict:
        """Packet i of the last run as the Verdict forward() would have returned."""
        code, tail, ssrc, rtcp, first, n = (int(x) for x in self.results[i, :RES_COLUMNS])
        if code:
            return Verdict(
                drop=DROP_REASONS[code - 1], ssrc=None if ssrc < 0 else ssrc, rtcp=bool(rtcp)
            )
        outputs = []
        for j in range(first, first + n):
            data, slots = self.output(j)
            outputs.append((bytes(data), tuple(receiver_ids[s] for s in slots)))
        if rtcp:
            return Verdict(ssrc=ssrc, rtcp=True, outputs=outputs)
        return Verdict(tail=tail, ssrc=ssrc, outputs=outputs, switched=self.switched.get(i, ()))

    def forward_all(self, fwd: Any) -> list[Verdict]:
        """Run every datagram of the batch, converting outputs between partial runs and
        growing the output arrays when one datagram alone does not fit."""
        verdicts: list[Verdict] = []
        start = 0
        while start < self.count:
            try:
                done = self.run(fwd, start)
            except ValueError:
                if self.fan_out > 4096:
                    raise
                self._size_outputs(self.capacity, self.arena.shape[1], self.fan_out * 4)
                continue
            ids = fwd.receiver_ids
            verdicts.extend(self.verdict(i, ids) for i in range(start, done))
            start = done
        return verdicts


__all__ = [
    "DEFAULT_SLOT",
    "OUT_LENGTH",
    "OUT_OFFSET",
    "OUT_RCV_COUNT",
    "OUT_RCV_START",
    "RES_CODE",
    "RES_FIRST_OUT",
    "RES_N_OUT",
    "RES_RTCP",
    "RES_SSRC",
    "RES_TAIL",
    "Batch",
]
