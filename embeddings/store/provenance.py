"""Where an embedding column came from, and the one rule for "is this the same model?".

Every check that must refuse vectors of another model (embed resume, index, search,
predict) compares two :class:`Provenance` values with :func:`check_same_model`.  Identity
is the weights' SHA-256 plus what changes the vectors for the same weights (dimension,
normalisation, preprocessing, text length limits).  The model string, the weights'
location and the transform's ``repr`` are recorded but are not identity: the same
weights copied elsewhere, or a torchvision upgrade that rewrites a repr, are the same model.
Without a weights digest (an encoder that cannot hash its file), the model name and
pretrained tag stand in for it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import FormatError, RunMismatch

IDENTITY = ("type", "weights_sha256", "dim", "normalized", "preprocess",
            "text_context_length", "max_seq_length")
FALLBACK_IDENTITY = ("model", "pretrained")  # only when weights_sha256 is unknown


@dataclass(frozen=True)
class Provenance:
    type: str
    model: str
    dim: int
    pretrained: str | None = None
    weights_sha256: str | None = None
    weights_source: str | None = None  # where they were loaded from (informational)
    normalized: bool = True
    preprocess: dict[str, Any] | None = None  # image preprocessing config (open_clip)
    text_context_length: int | None = None
    max_seq_length: int | None = None
    transform: str | None = None  # repr of the image transform (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. decode path (informational)

    def identity(self) -> dict[str, Any]:
        keys = IDENTITY if self.weights_sha256 else IDENTITY + FALLBACK_IDENTITY
        return {k: _canonical(getattr(self, k)) for k in keys}

    def difference(self, other: Provenance) -> str | None:
        """The first identity key that differs, as ``key: A vs B`` (None: same model)."""
        a, b = self.identity(), other.identity()
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "provenance") -> Provenance:
        if not isinstance(data, dict):
            raise FormatError(f"{where} is not an object")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise FormatError(f"{where} is incomplete: {e}") from None


def check_same_model(recorded: Provenance, current: Provenance, subject: str,
                     remedy: str) -> None:
    """RunMismatch (one message shape everywhere) unless both come from the same model."""
    diff = recorded.difference(current)
    if diff is not None:
        raise RunMismatch(f"{subject} comes from a different model ({diff}); refusing to mix "
                          f"them: {remedy}")


def _canonical(value: Any) -> Any:
    # Tuples and lists, key order: compare as JSON does.
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None
