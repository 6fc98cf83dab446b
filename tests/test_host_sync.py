"""A training step reads nothing on the host: no `.item()`, `.tolist()`, `int()`/`bool()` of a
tensor (on a GPU: no synchronizing CUDA call at all). A read stalls the host's run-ahead of the
GPU, and under CUDA-graph capture its value would be frozen into the graph.

Whole steps (forward, loss, backward) of a timm ViT after swap_modules with layer scale, drop
path and attention dropout, and of the reference ViT fused, after one warm-up step. The
optimizer's own step is left out: on a CPU, AdamW reads its step count on the host unless it is
capturable, which it can only be on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import vit_kernels
from vit_kernels.testing import kernel_device, no_host_reads

DEVICE = kernel_device()
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def _step(model, images, labels):
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss


def _check_no_host_reads(model):
    model.train()
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    labels = torch.randint(0, 10, (3,), device=DEVICE)
    _step(model, images, labels)  # warm-up: the extension built, every config chosen
    model.zero_grad(set_to_none=True)
    with no_host_reads():
        loss = _step(model, images, labels)
    assert loss.dim() == 0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_swapped_timm_step_reads_nothing_on_the_host(seed):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, init_values=1e-5,
                              drop_path_rate=0.2, attn_drop_rate=0.1, **TINY).to(DEVICE)
    model, summary = vit_kernels.swap_modules(model)
    assert summary.counts()["attention"]["swapped"] == 2, str(summary)
    _check_no_host_reads(model)


def test_reference_vit_fused_step_reads_nothing_on_the_host(seed):
    from vit_kernels.models import create_model

    model = create_model("vit_tiny_patch16_224", fused=True, num_classes=10, init_values=1e-5, drop_path_rate=0.2,
                         attn_drop_rate=0.1, **TINY).to(DEVICE)
    _check_no_host_reads(model)


def test_the_check_fails_on_a_host_read():
    x = torch.randn(3, device=DEVICE)
    with pytest.raises(AssertionError, match="read on the host"):
        with no_host_reads():
            x.sum().item()
    with pytest.raises(AssertionError, match="read on the host"):
        with no_host_reads():
            if x.sum() > 0:
                pass
    assert x.sum().item() == x.sum().item()  # restored on the way out
