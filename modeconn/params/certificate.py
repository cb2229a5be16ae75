"""What a constructed path guarantees, as data: a :class:`Certificate` of one or more :class:`Bound` s.

A bound says which quantity it bounds (the mean training loss on the constructor's data), over which
segments of the path, by what formula and value, and whether it is *exact* (it holds on that data as
computed, e.g. Theorem 1's max(L_A, L_B) + epsilon, or Lemma 2's larger end) or only *asymptotic* (an
O~(epsilon) bound with constants and log factors unknown, so no value). ``path.bound`` is the value of the
exact bound covering the whole path, if there is one; the report renders every bound.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

__all__ = ["Bound", "Certificate", "TRAIN_LOSS"]

TRAIN_LOSS = "train loss (mean cross-entropy on the constructor's data)"


@dataclass(frozen=True)
class Bound:
    """Along segments ``first .. last - 1`` of the path, ``quantity`` is at most ``value``.

    ``covers``: those segments in words; ``formula``: how ``value`` is made from ``terms`` (the named
    numbers in it); ``exact``: True when the bound holds on the data as computed, False when it hides
    constants (then ``value`` is None); ``measured``: the constructor's own maximum over those segments
    (at its check points), if it measured one.
    """

    covers: str
    formula: str
    first: int
    last: int
    exact: bool
    value: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    measured: float | None = None
    quantity: str = TRAIN_LOSS

    def covers_all(self, num_segments: int) -> bool:
        return self.first == 0 and self.last == num_segments


@dataclass(frozen=True)
class Certificate:
    """The bounds one construction proves for its path, and the pieces it measured beside them.

    ``items``: how many data points the numbers are computed on; ``measured``: named measurements that
    no bound covers (e.g. the maximum along a dropout segment, which only noise stability keeps low).
    """

    construction: str
    num_segments: int
    items: int
    bounds: tuple[Bound, ...]
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def path_bound(self) -> float | None:
        """The value of the exact bound over the whole path (the smallest, if several), else None."""
        values = [b.value for b in self.bounds if b.exact and b.value is not None and b.covers_all(self.num_segments)]
        return min(values) if values else None

    @property
    def exact_parts(self) -> list[Bound]:
        return [b for b in self.bounds if b.exact]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Certificate":
        d = dict(d)
        d["bounds"] = tuple(Bound(**b) for b in d["bounds"])
        return cls(**d)

    @classmethod
    def given(cls, value: float, num_segments: int) -> "Certificate":
        """A bound the caller states for a whole path (``path.bound = value``)."""
        return cls("given by the caller", num_segments, 0,
                   (Bound("the whole path", "given", 0, num_segments, True, float(value)),))
