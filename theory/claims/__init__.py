"""The paper's checkable claims C1-C11 (Wang et al. 2025; see ``docs/claims.md``) as functions returning verdicts.

Each claim function has the signature ``claim_cN(*, quick: bool, seed: int, out: Path | None)`` and returns one
:class:`Verdict` or a list of them (C5 returns its check part and its measurement part); it is registered with
:func:`claim`. *Checks* (identities and bounds that must hold mathematically) have ``kind="check"``; a failed check
means a bug or a wrong statement. *Measurements* (what AT does to sampling quality, costs) have
``kind="measurement"`` and report what was found, whichever way it goes: ``holds`` then says whether the paper's
expectation was observed. Every verdict also carries ``subchecks``: cross-checks and Monte Carlo agreements that
its numbers rely on; a failed sub-check fails the command as a failed check does (:attr:`Verdict.ok`).

One module per claim (or small group): :mod:`.c1_c3`, :mod:`.c2`, :mod:`.c4`, :mod:`.c5` (with :mod:`.c5_check`),
:mod:`.c6`, :mod:`.c7`, :mod:`.c8`, :mod:`.c9`, :mod:`.c10`, :mod:`.c11`; the reusable maths lives outside the
package (:mod:`theory.at_linear`, :mod:`theory.free_at`, :mod:`theory.diag_chain`, :mod:`theory.linear`).
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Verdict", "CLAIM_IDS", "CLAIMS", "claim", "load_all", "run_claims", "select_claims"]

#: claim ids in order
CLAIM_IDS = tuple(f"C{i}" for i in range(1, 12))
_MODULES = ("c1_c3", "c2", "c4", "c5", "c6", "c7", "c8", "c9", "c10", "c11")


@dataclass
class Verdict:
    """The outcome of one claim (or one part of a claim).

    ``quantities`` maps a name to the measured number(s) (JSON-ready); ``relation`` is the relation expected between
    them; ``margin`` is how far from failing (positive: holds with that slack; negative: violated by that much), in
    the units stated in ``notes``; ``subchecks`` maps the name of each cross-check the numbers rely on to whether it
    passed; ``as_stated`` is ``False`` when the paper's wording fails and ``holds`` refers to ``restatement``
    (``None``: the statement is checked as worded); ``figures`` are PNG paths written under ``out``.
    """

    id: str
    statement: str
    kind: str  # "check" | "measurement"
    relation: str
    quantities: dict[str, Any]
    holds: bool
    margin: float
    notes: str = ""
    subchecks: dict[str, bool] = field(default_factory=dict)
    as_stated: bool | None = None
    restatement: str = ""
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("check", "measurement"):
            raise ValueError(f"kind: expected 'check' or 'measurement', got {self.kind!r}")
        if self.as_stated is False and not self.restatement:
            raise ValueError("restatement: required when as_stated is False")
        self.holds = bool(self.holds)
        self.subchecks = {k: bool(v) for k, v in self.subchecks.items()}
        self.margin = float(self.margin) if math.isfinite(float(self.margin)) else float("nan")

    @property
    def failed_subchecks(self) -> list[str]:
        return [k for k, v in self.subchecks.items() if not v]

    @property
    def ok(self) -> bool:
        """False when this verdict must fail the command: a check that does not hold, or any failed sub-check."""
        return (self.holds or self.kind == "measurement") and not self.failed_subchecks

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ClaimFn = Callable[..., "Verdict | list[Verdict]"]
CLAIMS: dict[str, ClaimFn] = {}


def claim(claim_id: str) -> Callable[[ClaimFn], ClaimFn]:
    """Decorator registering a claim function under ``claim_id`` (one of :data:`CLAIM_IDS`)."""
    if claim_id not in CLAIM_IDS:
        raise ValueError(f"claim_id: expected one of {CLAIM_IDS}, got {claim_id!r}")

    def register(fn: ClaimFn) -> ClaimFn:
        CLAIMS[claim_id] = fn
        return fn

    return register


def load_all() -> None:
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")


def select_claims(only: str | list[str] | None) -> list[str]:
    """Parse ``--only C4,C5`` (or a list; case-insensitive, blanks ignored, repeats dropped keeping the first
    occurrence); ``None`` selects all. An unknown id or an empty selection raises ``ValueError`` starting
    ``only:``."""
    if only is None:
        return list(CLAIM_IDS)
    ids = [s.strip().upper() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    unknown = [i for i in ids if i not in CLAIM_IDS]
    if unknown or not ids:
        raise ValueError(f"only: unknown claim id(s) {unknown or only!r}; valid ids: {', '.join(CLAIM_IDS)}")
    return list(dict.fromkeys(ids))


def run_claims(ids: list[str], *, quick: bool = False, seed: int = 0, out: Path | None = None) -> list[Verdict]:
    """Run the claims ``ids`` in order and return their verdicts (each timed; a claim may give several)."""
    load_all()
    verdicts: list[Verdict] = []
    for cid in ids:
        if cid not in CLAIMS:
            raise ValueError(f"only: claim {cid} has no implementation registered")
        start = time.perf_counter()
        result = CLAIMS[cid](quick=quick, seed=seed, out=out)
        parts = result if isinstance(result, list) else [result]
        for v in parts:
            v.seconds = (time.perf_counter() - start) / len(parts)
        verdicts += parts
    return verdicts
