"""The reference ViT: timm state_dict compatibility, fused vs eager, resampling, hybrid, analysis."""

import copy

import pytest
import torch
from torch import nn

from vit_kernels.models import (
    MODEL_CONFIGS,
    VisionTransformer,
    attention_rollout,
    create_model,
    mean_attention_distance,
    resample_pos_embed,
)
from vit_kernels.testing import assert_rules, kernel_device, output_and_grads

timm = pytest.importorskip("timm")
DEVICE = kernel_device()
SMALL = dict(num_classes=10, img_size=64, depth=2)  # vit_tiny at 64 px: 16 patches, 2 blocks


def _timm(**config):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**SMALL, **config}).to(DEVICE)


def _ours(fused, **config):
    return create_model("vit_tiny_patch16_224", fused=fused, **{**SMALL, **config}).to(DEVICE)


@pytest.mark.parametrize(
    "config",
    [dict(), dict(qkv_bias=False), dict(init_values=0.1), dict(global_pool="avg", class_token=False),
     dict(qk_norm=True)],
    ids=["default", "no-qkv-bias", "layer-scale", "avg-pool", "qk-norm"],
)
def test_timm_checkpoint_loads_strict_and_matches_by_rule(seed, config):
    theirs = _timm(**config)
    with torch.no_grad():  # trained-looking weights, not the init's zeros and ones
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    eager = output_and_grads(theirs.eval(), lambda m: m(images))
    oracle = output_and_grads(copy.deepcopy(theirs).double(), lambda m: m(images.double()))
    for fused in (False, True):
        ours = _ours(fused, **config).eval()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert_rules(output_and_grads(ours, lambda m: m(images)), oracle, eager)


def test_fused_and_eager_agree_in_training_mode(seed):
    """Same parameters and RNG: drop path draws the same per-sample masks in both paths."""
    eager = _ours(False, drop_path_rate=0.5, init_values=0.5).train()
    fused = _ours(True, drop_path_rate=0.5, init_values=0.5).train()
    fused.load_state_dict(eager.state_dict())
    images = torch.randn(8, 3, 64, 64, device=DEVICE)
    torch.manual_seed(1)
    want = eager(images)
    torch.manual_seed(1)
    got = fused(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.manual_seed(2)
    assert not torch.allclose(fused(images), got)  # the masks are drawn afresh


def test_named_variants():
    assert MODEL_CONFIGS["vit_huge_patch14_224"] == dict(img_size=224, patch_size=14, embed_dim=1280, depth=32,
                                                         num_heads=16)
    assert len(MODEL_CONFIGS) == 30
    from vit_kernels import models

    model = models.vit_small_patch32_384(depth=1, num_classes=3)
    assert isinstance(model, VisionTransformer) and model.patch_embed.grid_size == (12, 12)
    assert model.pos_embed.shape == (1, 145, 384)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic_patch16_224")


def test_pos_embed_resampling_matches_timm(seed):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 14 * 14, 192)
    ours = resample_pos_embed(pos, (24, 24), (14, 14), num_prefix_tokens=1)
    theirs = resample_abs_pos_embed(pos, (24, 24), (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[:, :1], pos[:, :1])  # the class token's entry is kept


def test_loading_at_another_resolution_and_forward_at_another_size(seed):
    small = _ours(False)  # grid 4x4
    big = _ours(False, img_size=96)  # grid 6x6
    big.load_state_dict(small.state_dict())  # pos_embed resampled while loading
    assert big.pos_embed.shape == (1, 37, 192)
    want = resample_pos_embed(small.pos_embed.detach(), (6, 6), (4, 4))
    torch.testing.assert_close(big.pos_embed.detach(), want)
    # At forward, an input of another size resamples on the fly.
    small.eval()
    out = small(torch.randn(2, 3, 96, 96, device=DEVICE))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        small(torch.randn(1, 3, 70, 64, device=DEVICE))


def test_hybrid_backbone(seed):
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1))
    for fused in (False, True):
        model = VisionTransformer(img_size=32, in_chans=3, num_classes=5, embed_dim=64, depth=1, num_heads=2,
                                  backbone=backbone, fused=fused).to(DEVICE)
        assert model.patch_embed.patch_size == (1, 1) and model.patch_embed.num_patches == 64
        out = model(torch.randn(2, 3, 32, 32, device=DEVICE))
        out.sum().backward()
        assert out.shape == (2, 5) and backbone[0].weight.grad is not None
        backbone.zero_grad()


def test_pre_logits_layer():
    model = _ours(False, pre_logits=True).eval()
    assert "pre_logits.fc.weight" in model.state_dict()
    features = model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64, device=DEVICE)), pre_logits=True)
    assert features.abs().max() <= 1.0  # tanh


def test_attention_maps_and_analysis(seed):
    eager, fused = _ours(False).eval(), _ours(True).eval()
    fused.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    maps = eager.get_attention_maps(images)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, 17, device=DEVICE))
    for a, b in zip(maps, fused.get_attention_maps(images)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rollout = attention_rollout(maps)
    assert rollout.shape == (2, 17, 17)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17, device=DEVICE))
    distance = mean_attention_distance(maps, grid_size=(4, 4), patch_size=16)
    assert distance.shape == (2, 2, 3)
    assert (distance >= 0).all() and (distance <= 16 * (2 * 3**2) ** 0.5).all()
    uniform = [torch.full((1, 1, 17, 17), 1 / 17)]
    # Uniform attention over a 4x4 grid: the mean pairwise centre distance.
    centres = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2) * 16
    expected = torch.cdist(centres, centres).mean()
    torch.testing.assert_close(mean_attention_distance(uniform, (4, 4), 16)[0, 0, 0], expected)


def test_bad_configs():
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(global_pool="max")
    with pytest.raises(ValueError, match="needs class_token"):
        VisionTransformer(class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(img_size=100, patch_size=16, depth=1)


@pytest.mark.inductor
def test_compile_fullgraph_fused_model(seed):
    model = _ours(True).eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # Not bitwise: LayerNorm and attention without gradients run Inductor's ops under compile.
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


def test_fused_block_standalone_matches_eager_block(seed):
    from vit_kernels.models.vision_transformer import Block
    from vit_kernels.nn import FusedBlock

    eager = Block(64, 2, init_values=0.3, drop_path=0.4).to(DEVICE).train()
    fused = FusedBlock(64, 2, init_values=0.3, drop_path=0.4).to(DEVICE).train()
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(4, 17, 64, device=DEVICE)
    torch.manual_seed(5)
    want = eager(x)
    torch.manual_seed(5)
    torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_grad_checkpointing_recomputes_the_same_step(seed, fused, monkeypatch):
    """Drop path and layer scale on: checkpointed blocks redraw the same masks in backward."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the conv's weight grad, bit for bit
    model = _ours(fused, drop_path_rate=0.5, init_values=0.5).train()
    images = torch.randn(3, 3, 64, 64, device=DEVICE)
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        results.append(output_and_grads(model, lambda m: m(images)))
    plain, checkpointed = results
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_uint8_images_normalized_inside_the_model(seed):
    """uint8 images with set_input_normalization: the fused model normalizes inside the patch
    embedding op, the eager one in PyTorch; both by the rule against float64."""
    mean, std = (0.49, 0.45, 0.41), (0.23, 0.22, 0.26)
    eager = _ours(False).eval()
    oracle = copy.deepcopy(eager).double()
    fused = _ours(True).eval()
    fused.load_state_dict(eager.state_dict())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=DEVICE)
    got, want, oracle_out = [], [], []
    for model, out in ((fused, got), (eager, want), (oracle, oracle_out)):
        model.set_input_normalization(mean, std)
        out.append(output_and_grads(model, lambda m: m(images)))
    assert_rules(got[0], oracle_out[0], want[0])
    with pytest.raises(TypeError, match="set_input_normalization"):
        _ours(True)(images)
    with pytest.raises(ValueError, match="one entry per input channel"):
        eager.set_input_normalization((0.5, 0.5), (0.2, 0.2))


# ---- packed batches of images of different sizes (NaViT) ----------------------------------------


def _packed_images(dtype=torch.float32):
    # Two 64 x 64 (embedded together), a 48 x 32, a 16 x 16 (one patch): 17, 7 and 2 tokens.
    sizes = [(64, 64), (48, 32), (64, 64), (16, 16)]
    return [torch.randn(3, h, w, device=DEVICE, dtype=dtype) for h, w in sizes]


@pytest.mark.parametrize("config", [dict(), dict(global_pool="avg", class_token=False, init_values=0.1),
                                    dict(embed_dim=144, num_heads=2)], ids=["token", "avg-layer-scale", "d72"])
def test_packed_batch_matches_each_image_by_rule(seed, config):
    """forward_packed with fused=True (one pass over all tokens, attention within each image)
    against each image's own eager forward, and float64, outputs and every parameter gradient."""
    eager = _ours(False, **config).eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = _ours(True, **config).eval()
    fused.load_state_dict(eager.state_dict())
    images = _packed_images()
    want = output_and_grads(eager, lambda m: m.forward_packed(images))
    oracle = output_and_grads(copy.deepcopy(eager).double(), lambda m: m.forward_packed([i.double() for i in images]))
    got = output_and_grads(fused, lambda m: m.forward_packed(images))
    assert got["output"].shape == (4, 10)
    assert_rules(got, oracle, want)
    alone = torch.stack([eager(image[None])[0] for image in images])
    torch.testing.assert_close(want["output"], alone.detach(), rtol=1e-5, atol=1e-6)  # the head batched or not
    fused.set_grad_checkpointing(True)
    again = output_and_grads(fused, lambda m: m.forward_packed(images))
    for name, value in got.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_features_and_drop_path_per_image(seed, monkeypatch):
    from vit_kernels.nn import block as block_module

    model = _ours(True, drop_path_rate=0.5, init_values=0.5).train()
    drawn = []
    draw = block_module.drop_path_row_scale
    monkeypatch.setattr(block_module, "drop_path_row_scale",
                        lambda module, batch, *args: drawn.append(batch) or draw(module, batch, *args))
    images = _packed_images()
    tokens, packed = model.forward_features_packed(images)
    assert packed.offsets == (0, 17, 24, 41, 43) and tokens.shape == (43, 192)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.max_seqlen == 17
    assert drawn and all(batch == 4 for batch in drawn)  # one draw per image, not per token
    scale = torch.tensor([2.0, 0.0, 2.0, 0.0], device=DEVICE)
    assert torch.equal(packed.per_token(scale), scale.repeat_interleave(torch.tensor([17, 7, 17, 2], device=DEVICE)))
    model.forward_packed(images).square().sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


def test_packed_batch_bad_input():
    model = _ours(True)
    with pytest.raises(ValueError, match="at least one image"):
        model.forward_packed([])
    with pytest.raises(ValueError, match=r"images\[1\] must be a \[C, H, W\] tensor"):
        model.forward_packed([torch.randn(3, 32, 32), torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="divisible"):
        model.forward_packed([torch.randn(3, 30, 32)])
