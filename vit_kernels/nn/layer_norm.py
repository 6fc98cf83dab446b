from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.layer_norm import add_layer_norm
from ._scripting import NotScriptable

torch.fx.wrap("add_layer_norm")  # a leaf of torch.fx's symbolic trace, as in nn/attention.py

_NOT_GIVEN = object()


class FusedLayerNorm(NotScriptable, nn.LayerNorm):
    """`nn.LayerNorm` over the last dim that can also take the residual add before it.

    Same parameters, buffers and state_dict as `nn.LayerNorm`, so it drops into any
    model (and `load_state_dict(strict=True)` works both ways).

    - ``norm(x)`` returns ``y = LayerNorm(x)``, like `nn.LayerNorm`.
    - ``norm(x, residual, gamma=None, row_scale=None)`` returns ``(y, residual_out)`` with
      ``residual_out = residual + row_scale[b] * gamma * x`` and ``y = LayerNorm(residual_out)``:
      a pre-LN block's ``h = h + drop_path(ls(branch)); y = norm(h)`` in one kernel.
      ``residual=None`` starts the residual stream (``residual_out`` is x, scaled).

    ``residual_in_fp32=True`` keeps ``residual_out`` in float32 under bf16/fp16
    activations. See `vit_kernels.ops.add_layer_norm` for dtypes, limits and errors.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        residual_in_fp32: bool = False,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(
                f"FusedLayerNorm normalizes over the last dim only; got normalized_shape={self.normalized_shape}"
            )
        self.residual_in_fp32 = residual_in_fp32

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, *, residual_in_fp32: bool = False) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing `norm`'s Parameters (no copy), on the same device and dtype."""
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"norm must be an nn.LayerNorm, got {type(norm).__name__}")
        fused = cls(
            norm.normalized_shape,
            norm.eps,
            elementwise_affine=False,
            residual_in_fp32=residual_in_fp32,
        )
        fused.elementwise_affine = norm.elementwise_affine
        fused.weight = norm.weight
        fused.bias = norm.bias
        return fused

    def forward(
        self,
        x: Tensor,
        residual: Optional[Tensor] = _NOT_GIVEN,
        gamma: Optional[Tensor] = None,
        row_scale: Optional[Tensor] = None,
    ):
        if residual is _NOT_GIVEN and gamma is None and row_scale is None:
            return add_layer_norm(x, None, self.weight, self.bias, self.eps)[0]
        return add_layer_norm(
            x,
            None if residual is _NOT_GIVEN else residual,
            self.weight,
            self.bias,
            self.eps,
            gamma=gamma,
            row_scale=row_scale,
            residual_in_fp32=self.residual_in_fp32,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (", residual_in_fp32=True" if self.residual_in_fp32 else "")
