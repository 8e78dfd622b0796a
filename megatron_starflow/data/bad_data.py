"""Bad-data accounting: skip, count and log unreadable samples; abort only past a configured limit.

A training run over millions of files will meet broken ones. Every sample the loader gives up on is
recorded with its path, its kind and the error message (in memory and, when a log path is given, one
JSON line per skip, appended and flushed). The run aborts with :class:`BadDataError` only when the
fraction of bad samples among those seen exceeds ``max_bad_fraction`` (checked once at least
``min_samples`` samples were seen, so one bad file among the first three does not end a run).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter

log = logging.getLogger(__name__)

# The kinds a skip is counted under.
ZERO_BYTE = "zero_byte"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"  # wrong codec, not a video, or a codec the chosen back end cannot read
TOO_SHORT = "too_short"
NO_CAPTION = "no_caption"
MISSING = "missing"
KINDS = (ZERO_BYTE, TRUNCATED, UNDECODABLE, TOO_SHORT, NO_CAPTION, MISSING)


class BadSample(Exception):
    """Raised by a decoder for one sample; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # picklable: decode workers send it back to the loop
        return (BadSample, (self.kind, str(self)))


class BadDataError(RuntimeError):
    """Too many bad samples: the fraction passed ``data.max_bad_fraction``."""


class BadDataLog:
    def __init__(self, path: str = "", max_bad_fraction: float = 0.05, min_samples: int = 16):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.path = path
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.seen = 0
        self.counts: Counter = Counter()
        self.records: list[dict] = []
        self._lock = threading.Lock()

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def ok(self) -> None:
        with self._lock:
            self.seen += 1

    def skip(self, path: str, kind: str, message: str, **extra) -> None:
        """Record one skipped sample (and count it as seen)."""
        if kind not in KINDS:
            raise ValueError(f"unknown bad-data kind {kind!r}; valid: {', '.join(KINDS)}")
        record = {"path": path, "kind": kind, "error": str(message)[:500], **extra}
        with self._lock:
            self.seen += 1
            self.counts[kind] += 1
            self.records.append(record)
            if self.path:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        log.warning("skipped bad sample %s (%s): %s", path, kind, record["error"])

    def check(self) -> None:
        """Raise :class:`BadDataError` when the bad fraction passed the limit."""
        if self.seen >= self.min_samples and self.fraction > self.max_bad_fraction:
            where = f"; every skip is listed in {self.path}" if self.path else ""
            raise BadDataError(
                f"{self.bad} of {self.seen} samples were bad ({self.fraction:.1%}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction:g}; by kind: {dict(self.counts)}{where}. "
                f"Fix or remove the files (tools/prepare_data.py skips them when packing shards) "
                f"or raise data.max_bad_fraction.")

    def summary(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "fraction": self.fraction,
                "by_kind": dict(self.counts)}

    def state_dict(self) -> dict:
        return {"seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state.get("seen", 0))
        self.counts = Counter(state.get("counts", {}))
