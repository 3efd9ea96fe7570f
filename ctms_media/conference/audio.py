"""Who is heard (wire.md §10, audio): smoothed loudness per audio stream, the N loudest
streams with hysteresis, and the dominant speaker that drives video switching.

Loudness comes only from the uplink tail byte (§3): a packet with the voice bit set scores
``127 - level`` (so 0 dBov scores 127, silence 0); a packet without it scores 0. The score is
smoothed with an exponential of time constant :data:`TAU`, where each packet weighs as
:data:`PACKET_SECONDS` of audio (the CTS packetization) — counting packets rather than
arrival times keeps the result independent of how the server batches its reports. A stream
that stops sending decays as if it sent silence, after a grace of :data:`SILENCE_GRACE` for
batching jitter.

Hysteresis: an empty slot of the set is taken at once by the loudest voiced stream (so the
first words of a meeting are not lost), but a stream displaces a member only after leading
the set's weakest member continuously for :data:`LEAD_TIME`. The dominant speaker follows the
same rule against the current dominant. Two near-equal speakers whose smoothed levels keep
crossing therefore never swap, and a switch costs at least 300 ms of clear lead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

__all__ = [
    "FLOOR",
    "LEAD_TIME",
    "PACKET_SECONDS",
    "SILENCE_GRACE",
    "TAU",
    "SpeakerTracker",
    "tail_loudness",
]

TAU: Final = 0.3  # seconds: the smoothing time constant
PACKET_SECONDS: Final = 0.02  # what one audio packet weighs in the smoothing
PACKET_WEIGHT: Final = 1.0 - math.exp(-PACKET_SECONDS / TAU)
SILENCE_GRACE: Final = 0.06  # seconds without packets before a stream decays as silence
LEAD_TIME: Final = 0.3  # seconds a challenger must lead before it displaces
FLOOR: Final = 1.0  # smoothed score at or below which a stream counts as not speaking
EPS: Final = 1e-9  # float slack for time comparisons on a simulated clock

_Key = Callable[[int], tuple[float, int]]


def tail_loudness(tail: int) -> float:
    """Score of one audio tail byte: ``127 - level`` with the voice bit, else 0 (silence)."""
    return float(127 - (tail & 0x7F)) if tail & 0x80 else 0.0


class _Level:
    __slots__ = ("heard", "level")

    def __init__(self) -> None:
        self.level = 0.0
        self.heard: float | None = None

    def value(self, now: float) -> float:
        if self.heard is None:
            return 0.0
        gap = now - self.heard - SILENCE_GRACE
        return self.level * math.exp(-gap / TAU) if gap > 0 else self.level

    def add(self, score: float, now: float) -> None:
        level = self.value(now)
        self.level = level + (score - level) * PACKET_WEIGHT
        self.heard = now


class SpeakerTracker:
    """The audio set (the ``size`` loudest streams) and the dominant stream, with hysteresis.

    Streams are identified by SSRC; ties in loudness go to the stream added first, so every
    decision is deterministic.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._levels: dict[int, _Level] = {}
        self._order: dict[int, int] = {}
        self._next = 0
        self.members: list[int] = []  # in order of admission
        self.dominant: int | None = None
        self._set_lead: dict[int, float] = {}  # challenger -> since when it leads the weakest
        self._dom_lead: dict[int, float] = {}  # challenger -> since when it leads the dominant
        self._last: dict[int, float] = {}  # loudness at the last evaluation

    # -- streams ----------------------------------------------------------------------------

    def add_stream(self, ssrc: int) -> None:
        if ssrc not in self._levels:
            self._levels[ssrc] = _Level()
            self._order[ssrc] = self._next
            self._next += 1

    def remove_stream(self, ssrc: int) -> None:
        """Forget a stream (its room left): its slot frees at once, and if it was dominant
        the next evaluation picks a new dominant without waiting for a lead."""
        self._levels.pop(ssrc, None)
        self._order.pop(ssrc, None)
        self._set_lead.pop(ssrc, None)
        self._dom_lead.pop(ssrc, None)
        self._last.pop(ssrc, None)
        if ssrc in self.members:
            self.members.remove(ssrc)
        if self.dominant == ssrc:
            self.dominant = None
            self._dom_lead.clear()

    def sample(self, ssrc: int, tail: int, now: float) -> None:
        level = self._levels.get(ssrc)
        if level is not None:
            level.add(tail_loudness(tail), now)

    def loudness(self, ssrc: int, now: float) -> float:
        level = self._levels.get(ssrc)
        return level.value(now) if level is not None else 0.0

    def ranked_members(self) -> list[int]:
        """Set members, loudest first (as of the last evaluation)."""
        return sorted(self.members, key=lambda s: (-self._last.get(s, 0.0), self._order[s]))

    # -- decisions --------------------------------------------------------------------------

    def evaluate(self, now: float) -> tuple[bool, bool]:
        """Apply the hysteresis rules at ``now``; returns (set changed, dominant changed)."""
        loud = {s: lv.value(now) for s, lv in self._levels.items()}
        self._last = loud

        def key(s: int) -> tuple[float, int]:  # loudest first, then first added
            return (-loud[s], self._order[s])

        set_changed = self._evaluate_set(loud, key, now)
        dom_changed = self._evaluate_dominant(loud, key, now)
        return set_changed, dom_changed

    def _evaluate_set(self, loud: dict[int, float], key: _Key, now: float) -> bool:
        changed = False
        outside = sorted((s for s in loud if s not in self.members and loud[s] > FLOOR), key=key)
        while len(self.members) < self.size and outside:
            self.members.append(outside.pop(0))
            changed = True
        if len(self.members) < self.size or not outside:
            self._set_lead.clear()
            return changed
        while True:
            weakest = max(self.members, key=key)
            qualified = []
            for s in outside:
                if loud[s] > loud[weakest]:
                    since = self._set_lead.setdefault(s, now)
                    if now - since >= LEAD_TIME - EPS:
                        qualified.append(s)
                else:
                    self._set_lead.pop(s, None)
            if not qualified:
                break
            winner = min(qualified, key=key)
            self.members[self.members.index(weakest)] = winner
            outside.remove(winner)
            self._set_lead.pop(winner, None)
            changed = True
        for s in list(self._set_lead):
            if s not in outside:
                self._set_lead.pop(s)
        return changed

    def _evaluate_dominant(self, loud: dict[int, float], key: _Key, now: float) -> bool:
        dom = self.dominant
        if dom is None:
            voiced = sorted((s for s in loud if loud[s] > FLOOR), key=key)
            if not voiced:
                return False
            self.dominant = voiced[0]
            self._dom_lead.clear()
            return True
        qualified = []
        for s in loud:
            if s == dom:
                continue
            if loud[s] > loud[dom]:
                since = self._dom_lead.setdefault(s, now)
                if now - since >= LEAD_TIME - EPS:
                    qualified.append(s)
            else:
                self._dom_lead.pop(s, None)
        if not qualified:
            return False
        self.dominant = min(qualified, key=key)
        self._dom_lead.clear()
        return True
