"""Model configurations: frozen, typed, serialisable to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import CheckpointError

# The matrices that multiply activations (official key suffixes): what int8 quantizes.
PROJECTIONS = ("att.key.weight", "att.value.weight", "att.receptance.weight", "att.output.weight",
               "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight", "head.weight")
SCALE_SUFFIX = "_scale"  # an int8 projection "P" stores its per-row scales under "P_scale"


def is_quantized(sd) -> bool:
    """Whether a state dict holds int8 projections (written by ``rwkvpy quantize``)."""
    return any(k.endswith(SCALE_SUFFIX) for k in sd)


@dataclass(frozen=True)
class RWKV4Config:
    """Shapes of an RWKV-4 model. ``dim_att`` and ``dim_ffn`` follow the official names."""

    vocab_size: int
    n_embd: int
    n_layer: int
    dim_att: int | None = None  # width of k, v, r and the WKV state; default n_embd
    dim_ffn: int | None = None  # width of the channel-mixing hidden layer; default 4 * n_embd
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim_att is None:
            object.__setattr__(self, "dim_att", self.n_embd)
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", 4 * self.n_embd)
        for name in ("vocab_size", "n_embd", "n_layer", "dim_att", "dim_ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")

    arch = "rwkv4"

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKV4Config":
        d = dict(d)
        arch = d.pop("arch", cls.arch)
        if arch != cls.arch:
            raise CheckpointError(f"config: arch is {arch!r}, expected {cls.arch!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"config: unknown keys {unknown}")
        return cls(**d)
