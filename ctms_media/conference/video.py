"""Who is seen where (wire.md §4, §10): the CSRC position mapping and the display assignment.

Pure functions over small values, so the mapping table and the "no source twice" rule are
testable without a conference around them.

Displays of a receiver: a 3-segment room has displays 1, 2, 3, a 1-segment room display 2;
both have an aux display 4, which shows aux (presentation) video only and is chosen apart
from the main displays, so a presentation never pushes a person off a screen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ctms_media.wire.rtp import Position

__all__ = [
    "AUX_DISPLAYS",
    "Candidate",
    "assign_displays",
    "audio_destination",
    "main_displays",
    "video_destinations",
]

AUX_DISPLAYS: Final = (int(Position.AUX),)
_MAIN: Final = {1: (int(Position.CENTER),), 3: (1, 2, 3)}
# Order among a room's own segments when nothing else tells them apart: center first.
POSITION_ORDER: Final = {2: 0, 1: 1, 3: 2, 4: 3}


def main_displays(segments: int) -> tuple[int, ...]:
    """The receiver's person displays: (1, 2, 3) for 3 segments, (2,) for 1."""
    return _MAIN[segments]


def audio_destination(source_position: int, receiver_segments: int) -> int:
    """CSRC destination of an audio stream at a receiver.

    A 3-segment receiver plays each stream from the speaker at the source's position (aux on
    its aux speaker 4), so voices come from where their faces are; a 1-segment receiver has
    one speaker, 2, and plays everything there, aux included.
    """
    return int(Position.CENTER) if receiver_segments == 1 else source_position


def video_destinations(
    source_segments: int, source_position: int, receiver_segments: int, switching: str
) -> tuple[int, ...]:
    """The receiver displays a video source may be shown on (segment mode), or the one it is
    shown on (room mode).

    - aux video (4) goes to the aux display 4 of every receiver;
    - on a 1-segment receiver everything goes to its only display, 2 (the CTMS example: the
      3-screen room's right camera lands on a CTS 1000's center display);
    - a 3-segment source keeps its position on a 3-segment receiver;
    - a 1-segment source's center camera may go to any of 1, 2, 3 in segment mode (§10: "a
      1-screen room's center segment is a candidate for every position") and to 2 in room mode.
    """
    if source_position == Position.AUX:
        return AUX_DISPLAYS
    if receiver_segments == 1:
        return (int(Position.CENTER),)
    if source_segments == 1:
        return (1, 2, 3) if switching == "segment" else (int(Position.CENTER),)
    return (source_position,)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A video source that may fill one of ``eligible`` displays; ``preferred`` is where it
    goes when it has the choice (2 for a 1-segment room, else its own position)."""

    ssrc: int
    eligible: tuple[int, ...]
    preferred: int


def _placements(chosen: Sequence[Candidate], displays: Sequence[int]) -> Iterable[tuple[int, ...]]:
    for perm in itertools.permutations(displays, len(chosen)):
        if all(d in c.eligible for c, d in zip(chosen, perm, strict=True)):
            yield perm


def assign_displays(
    displays: Sequence[int],
    candidates: Sequence[Candidate],
    keep: Mapping[int, Iterable[int]] | None = None,
) -> dict[int, int | None]:
    """Fill ``displays`` from ``candidates`` (most wanted first); never a source twice.

    The set shown is built greedily in candidate order: a candidate is taken if a placement
    of everything taken so far plus it still exists. For sources that each fit one display
    that is exactly "each display shows its most wanted candidate"; a 1-segment source that
    fits several displays is placed where it costs the least wanted source its place.
    Among the placements of that set the engine prefers, in order: sources staying on the
    display in ``keep`` (display -> sources it shows or is switching to, so a display never
    changes without a reason), then each source on its preferred display, more wanted
    sources first, then displays in ascending order. A display no candidate can fill is None.
    """
    keep = keep or {}
    chosen: list[Candidate] = []
    for cand in candidates:
        if len(chosen) == len(displays):
            break
        if any(c.ssrc == cand.ssrc for c in chosen):
            continue
        if next(iter(_placements([*chosen, cand], displays)), None) is not None:
            chosen.append(cand)
    best: tuple[int, ...] | None = None
    best_score: tuple = ()
    for perm in _placements(chosen, displays):
        stay = sum(1 for c, d in zip(chosen, perm, strict=True) if c.ssrc in keep.get(d, ()))
        prefer = tuple(int(d == c.preferred) for c, d in zip(chosen, perm, strict=True))
        score = (stay, prefer)
        if best is None or score > best_score:
            best, best_score = perm, score
    out: dict[int, int | None] = dict.fromkeys(displays)
    if best is not None:
        for c, d in zip(chosen, best, strict=True):
            out[d] = c.ssrc
    return out
