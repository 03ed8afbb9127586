"""The DINO projection head (Caron et al. 2021; DINOv2, Oquab et al. 2023): MLP -> L2-normalised bottleneck ->
weight-normalised prototypes.

The last layer's rows are the K prototypes; normalising them (weight norm with g fixed to 1) makes every logit a
cosine similarity in [-1, 1] between the bottleneck and a prototype, which bounds ``exp(logit / temp)`` and keeps
training stable. DINO and DINOv2 also freeze the last layer for the first epoch (see
:func:`cancel_last_layer_gradients`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

INIT_STD = 0.02


class WeightNormLinear(nn.Module):
    """Linear map without bias whose weight rows are normalised to unit L2 norm at every call.

    Equivalent to ``torch.nn.utils.parametrizations.weight_norm`` with the magnitude g frozen at 1, but with a
    single plain parameter ``weight`` (out_features, in_features): nothing frozen to track in optimiser groups,
    EMA or FSDP, and state dicts keyed ``last_layer.weight``. Weight decay on ``weight`` only shrinks its norm, which
    the normalisation ignores, as it does in DINOv2 where decay applies to weight_v.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        trunc_normal_(self.weight, std=INIT_STD)

    def normalized_weight(self) -> Tensor:
        """(out_features, in_features) with unit-norm rows."""
        return F.normalize(self.weight, p=2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return F.linear(x, self.normalized_weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=1"


class DINOHead(nn.Module):
    """DINO / iBOT head: ``n_layers``-layer MLP with GELU to ``bottleneck_dim``, L2 normalisation, prototypes.

    (N, in_dim) -> (N, out_dim) logits, each a cosine similarity in [-1, 1]. DINOv2 defaults: 3 layers,
    in -> 2048 -> 2048 -> 256, 65,536 prototypes (bottleneck 384 and 131,072 prototypes for ViT-L/g). With
    ``n_layers=1`` the MLP is a single Linear to the bottleneck. Linear weights are trunc-normal (std 0.02), biases 0.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_dim) (or any (..., in_dim)) -> (..., out_dim) logits."""
        x = self.mlp(x)
        # 1e-12 is below float16's smallest normal number: the clamp would be a no-op there.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)


def cancel_last_layer_gradients(head: nn.Module) -> None:
    """Drop the gradients of every parameter whose name contains ``last_layer`` (set to None).

    Call between ``backward()`` and ``optimizer.step()`` during the first epoch: DINO keeps the prototypes fixed
    while the rest of the network warms up, which stabilises early training. Works on a head or any module holding
    heads (names are matched anywhere in the dotted path). Torch optimisers skip a parameter whose gradient is None:
    no update and no weight decay. (DINOv2 also zeroes the last layer's lr schedule over that epoch.)
    """
    for name, param in head.named_parameters():
        if "last_layer" in name:
            param.grad = None
