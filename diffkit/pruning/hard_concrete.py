"""The hard-concrete relaxation of a binary mask (Louizos, Welling, Kingma 2018), as used by EcoDiff.

For a unit with logit ``lambda`` and noise ``u ~ U(0, 1)``:

    s     = sigmoid((log u - log(1 - u) + lambda) / beta)          (concrete sample, temperature beta)
    s_bar = s * (zeta - gamma) + gamma                             (stretch to [gamma, zeta])
    m     = min(1, max(0, s_bar))                                  (hard clamp: exact 0 and 1 occur)

EcoDiff: beta = 0.83, [gamma, zeta] = [-0.1, 1.1], logits initialised to 3 (so every unit starts almost
surely kept: P(m > 0) = sigmoid(3 - beta log(-gamma / zeta)) ~ 0.999). The expected number of non-zero
gates is ``sum_i sigmoid(lambda_i - beta log(-gamma / zeta))`` (Louizos eq. 12), the "expected L0".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HardConcrete:
    """Hyper-parameters of the relaxation; defaults are EcoDiff's."""

    temperature: float = 0.83
    gamma: float = -0.1
    zeta: float = 1.1
    init: float = 3.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.gamma < 0 and self.zeta > 1):
            raise ValueError(
                f"stretch (gamma, zeta) must satisfy gamma < 0 < 1 < zeta, got ({self.gamma}, {self.zeta})"
            )

    def sample(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A relaxed mask in [0, 1] from uniform noise ``u`` (same shape as ``logits``)."""
        u = u.to(logits.dtype).clamp(1e-6, 1 - 1e-6)  # keeps log(u) and log(1-u) finite
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / self.temperature)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self, logits: torch.Tensor) -> torch.Tensor:
        """The noise-free (test-time) mask: min(1, max(0, sigmoid(lambda) (zeta - gamma) + gamma))."""
        return (torch.sigmoid(logits) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def expected_l0(self, logits: torch.Tensor) -> torch.Tensor:
        """P(m > 0) per unit: sigmoid(lambda - beta log(-gamma / zeta))."""
        return torch.sigmoid(logits - self.temperature * math.log(-self.gamma / self.zeta))
