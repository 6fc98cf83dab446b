from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.bias_gelu_linear import bias_gelu_linear
from ._hooks import global_hooks_installed, runs_plainly
from ._scripting import NotScriptable

# Leaves of torch.fx's symbolic trace, as in nn/attention.py.
torch.fx.wrap("bias_gelu_linear")


# Classes whose forward is exactly that form (timm.layers.activations, transformers.activations).
TIMM_GELUS = {"GELU": "none", "GELUTanh": "tanh", "QuickGELU": "quick"}
TRANSFORMERS_GELUS = {"GELUTanh": "tanh", "PytorchGELUTanh": "tanh", "QuickGELUActivation": "quick"}


def gelu_approximation(act: nn.Module) -> str:
    """The `approximate` of a GELU module: torch's, timm's GELU/GELUTanh/QuickGELU, or
    transformers' GELUActivation (on F.gelu), GELUTanh, PytorchGELUTanh and
    QuickGELUActivation ("quick": z sigmoid(1.702 z)); a ValueError for anything else."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name, module = type(act).__name__, type(act).__module__
    if module.startswith("timm.") and name in TIMM_GELUS:
        return TIMM_GELUS[name]
    if module.startswith("transformers."):
        if name == "GELUActivation" and getattr(act, "act", None) is F.gelu:
            return "none"
        if name in TRANSFORMERS_GELUS:
            return TRANSFORMERS_GELUS[name]
    raise ValueError(f"FusedMlp fuses GELU only (exact, tanh or quick_gelu); act_layer made a {name}")


class FusedMlp(NotScriptable, nn.Module):
    """timm's `Mlp` (fc1 -> GELU -> fc2) with fc1's bias fused into the GELU, keeping one
    [tokens, hidden] activation for backward instead of two.

    Submodule names match timm's `Mlp` (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``,
    ``drop2``), so its state_dict loads with ``strict=True``. The forward is fc1 without
    its bias (cuBLAS), then `vit_kernels.ops.bias_gelu_linear`: fc1's bias + GELU in one
    pass and fc2, saving only the pre-activation; the backward recomputes the GELU output
    in the pass that computes its gradient. With a dropout after the GELU (training,
    drop1.p > 0), a norm there, or hooks on fc1 or fc2 (or on every module), it runs timm's forward (fc1, act, drop1,
    norm, fc2, drop2 as modules): a fused fc1 + bias + GELU was measured slower than eager's
    there (docs/design.md, "Ops that did not earn their place"). The activation
    must be a GELU (exact, tanh or quick_gelu); anything else is refused at construction.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.approximate = gelu_approximation(self.act)
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    @classmethod
    def from_timm(cls, mlp: nn.Module) -> "FusedMlp":
        """A FusedMlp over a timm `Mlp`'s own submodules (shared, not copied); ValueError when
        the activation is not GELU or the layers are not Linear (timm's use_conv)."""
        if not isinstance(getattr(mlp, "fc1", None), nn.Linear) or not isinstance(getattr(mlp, "fc2", None), nn.Linear):
            raise ValueError("fc1 and fc2 must be nn.Linear")
        approximate = gelu_approximation(mlp.act)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
            setattr(fused, name, getattr(mlp, name))
        fused.approximate = approximate
        return fused

    def forward(self, x: Tensor) -> Tensor:
        if self._fc2_follows_gelu_directly():
            hidden = F.linear(x, self.fc1.weight)
            return self.drop2(bias_gelu_linear(hidden, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.approximate))
        x = self.norm(self.drop1(self.act(self.fc1(x))))
        return self.drop2(self.fc2(x))

    def _fc2_follows_gelu_directly(self) -> bool:
        """Whether the fused forward computes what the module forward would: it calls neither fc1
        nor fc2 as a module, so both must be plain Linears without hooks."""
        dropout = self.training and float(getattr(self.drop1, "p", 0.0)) > 0.0
        linears_plain = not global_hooks_installed() and all(type(fc) is nn.Linear and runs_plainly(fc)
                                                             for fc in (self.fc1, self.fc2))
        return isinstance(self.norm, nn.Identity) and not dropout and linears_plain
