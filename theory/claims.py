"""The paper's checkable claims (method.md section 7, C1-C11) as functions returning a verdict record.

Each claim function has the signature ``claim_cN(*, quick: bool, seed: int, out: Path | None) -> Verdict`` and is
registered in :data:`CLAIMS`. *Checks* (identities and bounds that must hold mathematically) have
``kind="check"``; a failed check means a bug or a wrong statement, and makes ``python -m toy.verify_bounds`` exit
non-zero. *Measurements* (what AT does to sampling quality, costs) have ``kind="measurement"`` and report what
was found, whichever way it goes: ``holds`` then says whether the paper's expectation was observed.

The claim functions live in :mod:`theory.claims_chain` (C1, C2, C3, C9, C10) and :mod:`theory.claims_at`
(C4-C8, C11); this module only holds the record, the registry and the runner.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Verdict", "CLAIM_IDS", "CLAIMS", "claim", "run_claims", "select_claims"]

#: claim ids in order; each is provided by one of the modules below
CLAIM_IDS = tuple(f"C{i}" for i in range(1, 12))
_MODULES = ("theory.claims_chain", "theory.claims_at")


@dataclass
class Verdict:
    """The outcome of one claim.

    ``quantities`` maps a name to the measured number(s) (floats or lists of floats, JSON-ready);
    ``relation`` is the relation expected between them (``"<="``, ``"="``, ``"decreasing"``, ...);
    ``margin`` is how far from failing (positive: holds with that slack; negative: violated by that much), in
    the units stated in ``notes``; ``figures`` are PNG paths written under ``out``.
    """

    id: str
    statement: str
    kind: str  # "check" | "measurement"
    relation: str
    quantities: dict[str, Any]
    holds: bool
    margin: float
    notes: str = ""
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("check", "measurement"):
            raise ValueError(f"kind: expected 'check' or 'measurement', got {self.kind!r}")
        self.holds = bool(self.holds)
        self.margin = float(self.margin) if math.isfinite(float(self.margin)) else float("nan")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ClaimFn = Callable[..., Verdict]
CLAIMS: dict[str, ClaimFn] = {}


def claim(claim_id: str) -> Callable[[ClaimFn], ClaimFn]:
    """Decorator registering a claim function under ``claim_id`` (one of :data:`CLAIM_IDS`)."""
    if claim_id not in CLAIM_IDS:
        raise ValueError(f"claim_id: expected one of {CLAIM_IDS}, got {claim_id!r}")

    def register(fn: ClaimFn) -> ClaimFn:
        CLAIMS[claim_id] = fn
        return fn

    return register


def _load() -> None:
    for name in _MODULES:
        importlib.import_module(name)


def select_claims(only: str | list[str] | None) -> list[str]:
    """Parse ``--only C4,C5`` (or a list); ``None`` selects all. An unknown id raises ``ValueError`` listing the
    valid ones."""
    if only is None:
        return list(CLAIM_IDS)
    ids = [s.strip().upper() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    unknown = [i for i in ids if i not in CLAIM_IDS]
    if unknown or not ids:
        raise ValueError(f"only: unknown claim id(s) {unknown or only!r}; valid ids: {', '.join(CLAIM_IDS)}")
    return ids


def run_claims(ids: list[str], *, quick: bool = False, seed: int = 0, out: Path | None = None) -> list[Verdict]:
    """Run the claims ``ids`` in order and return their verdicts (each timed)."""
    import time

    _load()
    verdicts = []
    for cid in ids:
        if cid not in CLAIMS:
            raise ValueError(f"only: claim {cid} has no implementation registered")
        start = time.perf_counter()
        v = CLAIMS[cid](quick=quick, seed=seed, out=out)
        v.seconds = time.perf_counter() - start
        verdicts.append(v)
    return verdicts
