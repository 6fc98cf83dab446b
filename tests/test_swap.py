"""vit_kernels.swap_modules on timm ViTs: same state_dict, same numbers (rule), fused residual stream."""

import copy

import pytest
import torch
from torch import nn

import vit_kernels
from vit_kernels.nn import FlashAttention, FusedLayerNorm, FusedMlp
from vit_kernels.swap import set_input_normalization
from vit_kernels.swap.timm_vit import TimmVisionTransformer
from vit_kernels.testing import assert_rules, kernel_device, output_and_grads

timm = pytest.importorskip("timm")
DEVICE = kernel_device()
SMALL = dict(num_classes=10, img_size=64, depth=2)


def _timm(name="vit_tiny_patch16_224", **config):
    model = timm.create_model(name, pretrained=False, **{**SMALL, **config}).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CONFIGS = {
    "default": dict(),
    "no-qkv-bias": dict(qkv_bias=False),
    "qk-norm": dict(qk_norm=True),
    "layer-scale": dict(init_values=0.1),
    "registers": dict(reg_tokens=4),
    "no-embed-class": dict(no_embed_class=True, init_values=0.1),
    "avg-pool": dict(class_token=False, global_pool="avg"),
    "fc-norm": dict(global_pool="avg", fc_norm=True),
    "dynamic-size": dict(dynamic_img_size=True),
    "pre-norm": dict(pre_norm=True),  # CLIP-style: a LayerNorm (norm_pre) after the embedding
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_swapped_timm_vit_matches_by_rule(seed, config, train):
    original = _timm(**config).train(train)  # train mode with dropout 0: same function
    oracle_model = copy.deepcopy(original).double()
    keys_before = {k: v.clone() for k, v in original.state_dict().items()}
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    eager = output_and_grads(original, lambda m: m(images))
    oracle = output_and_grads(oracle_model, lambda m: m(images.double()))
    model, summary = vit_kernels.swap_modules(original)
    assert model is original
    assert any(path == "forward_features" for path, _ in summary.swapped), str(summary)
    model.load_state_dict(keys_before, strict=True)  # a checkpoint saved before the swap loads after it
    assert list(model.state_dict()) == list(keys_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys_before.items())
    assert_rules(output_and_grads(model, lambda m: m(images)), oracle, eager)
    if config.get("dynamic_img_size"):
        out = model(torch.randn(1, 3, 96, 80, device=DEVICE))
        assert out.shape == (1, 10)


def test_swap_shares_parameters_and_touches_no_library_namespace(seed):
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import VisionTransformer

    forward_features, layer_norm_forward = VisionTransformer.forward_features, nn.LayerNorm.forward
    model = _timm()
    params_before = {n: id(p) for n, p in model.named_parameters()}
    vit_kernels.swap_modules(model)
    assert {n: id(p) for n, p in model.named_parameters()} == params_before
    assert isinstance(model.blocks[0].attn, FlashAttention) and isinstance(model.blocks[0].mlp, FusedMlp)
    assert isinstance(model.blocks[1].norm2, FusedLayerNorm) and isinstance(model.norm, FusedLayerNorm)
    assert VisionTransformer.forward_features is forward_features and nn.LayerNorm.forward is layer_norm_forward
    # Per instance: the model's class became a subclass of timm's, with timm's name.
    assert type(model) is not VisionTransformer and isinstance(model, VisionTransformer)
    assert type(model).__name__ == "VisionTransformer" and isinstance(model.blocks[0].attn, Attention)
    other = _timm()  # a fresh timm model is untouched
    assert type(other.blocks[0].attn) is Attention and type(other.blocks[0].mlp) is Mlp
    assert type(other) is VisionTransformer


def test_drop_path_training_matches_timm(seed):
    """In training mode the fused stream draws the same drop-path masks as timm, in the same order."""
    original = _timm(drop_path_rate=0.5, init_values=0.3).train()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(8, 3, 64, 64, device=DEVICE)
    torch.manual_seed(3)
    want = original(images)
    torch.manual_seed(3)
    got = swapped(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_flags_and_what_is_left_alone(seed):
    model, summary = vit_kernels.swap_modules(_timm(), attention=False, layer_norm=False)
    assert not isinstance(model.blocks[0].attn, FlashAttention)
    assert isinstance(model.blocks[0].mlp, FusedMlp)
    assert not isinstance(model, TimmVisionTransformer)
    text = str(summary)
    assert "residual adds not fused" in text and "patch_embed" in text
    # An activation the MLP kernel cannot fuse stays, with the reason.
    model, summary = vit_kernels.swap_modules(_timm(act_layer=nn.ReLU))
    assert not isinstance(model.blocks[0].mlp, FusedMlp)
    assert "GELU only" in str(summary)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_deit3_matches_by_rule(seed, train):
    """DeiT-3 (layer scale in every block, no position embedding on the class token): outputs and
    every parameter gradient by the rule, not only its summary."""
    deit3 = _timm("deit3_small_patch16_224").train(train)
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    oracle = output_and_grads(copy.deepcopy(deit3).double(), lambda m: m(images.double()))
    eager = output_and_grads(deit3, lambda m: m(images))
    _, summary = vit_kernels.swap_modules(deit3)
    assert any(path == "forward_features" for path, _ in summary.swapped)
    assert_rules(output_and_grads(deit3, lambda m: m(images)), oracle, eager)


def test_deit_families(seed):
    # The distilled DeiT overrides _pos_embed (its dist token), which the fused path calls.
    distilled = _timm("deit_tiny_distilled_patch16_224").eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = distilled(images)
    _, summary = vit_kernels.swap_modules(distilled)
    assert any(path == "forward_features" for path, _ in summary.swapped)
    torch.testing.assert_close(distilled(images), want, rtol=1e-4, atol=1e-4)


def test_overridden_forward_features_is_kept(seed):
    from timm.models.vision_transformer import VisionTransformer

    class Custom(VisionTransformer):
        def forward_features(self, x, **kwargs):
            return super().forward_features(x, **kwargs) * 2

    model = Custom(**SMALL, embed_dim=192, num_heads=3).to(DEVICE).eval()
    images = torch.randn(1, 3, 64, 64, device=DEVICE)
    want = model(images)
    _, summary = vit_kernels.swap_modules(model)
    assert "Custom overrides forward_features" in str(summary) and not isinstance(model, TimmVisionTransformer)
    torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)


def test_unsupported_model_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    same, summary = vit_kernels.swap_modules(model)
    assert same is model and isinstance(model[1], nn.LayerNorm) and type(model[1]) is nn.LayerNorm
    assert "not a supported model" in str(summary)


@pytest.mark.inductor
def test_compile_fullgraph_swapped(seed):
    model, _ = vit_kernels.swap_modules(_timm(init_values=0.1).eval())
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # Not bitwise: under compile LayerNorm and (without gradients) attention run the ops Inductor
    # generates faster (_dispatch.inductor_generates); tests/test_compile.py holds them to the rule.
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


# ---- torchvision -----------------------------------------------------------------------------


def _torchvision(**config):
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    model = tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192,
                                 mlp_dim=768, num_classes=10, **config).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_swapped_torchvision_vit_matches_by_rule(seed, train):
    original = _torchvision().train(train)
    oracle_model = copy.deepcopy(original).double()
    keys_before = {k: v.clone() for k, v in original.state_dict().items()}
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    eager = output_and_grads(original, lambda m: m(images))
    oracle = output_and_grads(oracle_model, lambda m: m(images.double()))
    model, summary = vit_kernels.swap_modules(original)
    text = str(summary)
    assert "residual adds fused into the LayerNorms across blocks" in text and "self_attention" in text
    assert "FusedLayerNorm" in text
    assert list(model.state_dict()) == list(keys_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys_before.items())
    assert isinstance(model.encoder.layers[0].self_attention, nn.MultiheadAttention)  # kept, keys and all
    assert_rules(output_and_grads(model, lambda m: m(images)), oracle, eager)


def test_torchvision_flags_and_namespace(seed):
    from torchvision.models.vision_transformer import Encoder

    encoder_forward = Encoder.forward
    model = _torchvision().eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    model, summary = vit_kernels.swap_modules(model, attention=False, layer_norm=False)
    from vit_kernels.swap.torchvision_vit import TorchvisionMlp

    # Unfused norms: nothing to carry across blocks, so the encoder keeps torchvision's class;
    # the MLPs are swapped, the attention is not.
    assert Encoder.forward is encoder_forward and type(model.encoder) is Encoder
    assert isinstance(model.encoder.layers[0].mlp, TorchvisionMlp)
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert "its final ln is not fused" in str(summary)
    assert not isinstance(model.encoder.ln, FusedLayerNorm)
    torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)


@pytest.mark.inductor
def test_compile_fullgraph_swapped_torchvision(seed):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    compiled = torch.compile(vit_kernels.swap_modules(_torchvision().eval())[0], fullgraph=True, backend="aot_eager")
    assert compiled(images).shape == (2, 10)


# ---- transformers ------------------------------------------------------------------------------


def _hf(kind, **config):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, image_size=64, patch_size=16, **config)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(intermediate_size=768, num_labels=10, **common))
    elif kind == "deit":
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(intermediate_size=768, num_labels=10, **common))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(layerscale_value=0.5, **common))
    model = model.to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_output(model, images):
    out = model(pixel_values=images)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_swapped_transformers_matches_by_rule(seed, kind, train, monkeypatch):
    from vit_kernels.swap import transformers_vit

    calls = []
    real = transformers_vit.flash_attention
    monkeypatch.setattr(transformers_vit, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    original = _hf(kind).train(train)
    oracle_model = copy.deepcopy(original).double()
    keys_before = {k: v.clone() for k, v in original.state_dict().items()}
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    eager = output_and_grads(original, lambda m: _hf_output(m, images))
    oracle = output_and_grads(oracle_model, lambda m: _hf_output(m, images.double()))
    implementation = original.config._attn_implementation
    model, summary = vit_kernels.swap_modules(original)
    assert model.config._attn_implementation == implementation  # the config is not touched
    layers = [m for m in model.modules() if type(m).__name__ in ("ViTLayer", "DeiTLayer", "Dinov2Layer")]
    assert len(layers) == 2
    assert all(isinstance(layer, (transformers_vit.TransformersViTLayer, transformers_vit.TransformersDinov2Layer))
               for layer in layers), str(summary)
    assert list(model.state_dict()) == list(keys_before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys_before.items())
    eps = [m.eps for m in model.modules() if isinstance(m, FusedLayerNorm)]
    assert eps and all(e == (1e-6 if kind == "dinov2" else 1e-12) for e in eps)
    got = output_and_grads(model, lambda m: _hf_output(m, images))
    assert len(calls) == 2  # one forward, two layers: the kernel ran, not SDPA
    assert_rules(got, oracle, eager)


@pytest.mark.parametrize("family", ["timm", "torchvision", "transformers"])
def test_second_call_changes_nothing(seed, family):
    model = {"timm": lambda: _timm(), "torchvision": _torchvision, "transformers": lambda: _hf("vit")}[family]()
    model.eval()
    vit_kernels.swap_modules(model)
    modules = {name: id(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    instance_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    _, summary = vit_kernels.swap_modules(model)
    assert summary.swapped == [], str(summary)
    assert {name: id(m) for name, m in model.named_modules()} == modules
    assert {name: set(vars(m)) for name, m in model.named_modules()} == instance_attrs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_timm_patch_embed_swap(seed):
    model = _timm().eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    _, summary = vit_kernels.swap_modules(model, attention=False, mlp=False, layer_norm=False)
    assert any(path == "patch_embed" for path, _ in summary.swapped)
    torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)
    # dynamic_img_size keeps NHWC output for timm's _pos_embed: left alone, with the reason.
    _, summary = vit_kernels.swap_modules(_timm(dynamic_img_size=True))
    assert "NHWC" in str(summary)


@pytest.mark.parametrize("config", [dict(), dict(no_embed_class=True), dict(class_token=False, global_pool="avg"),
                                    dict(reg_tokens=2)], ids=["cls", "no-embed-class", "no-cls", "registers"])
def test_timm_embedding_in_one_op(seed, config):
    """Class token and position embeddings go into the patch-embedding op where timm's _pos_embed
    allows it (not with register tokens), with the same numbers."""
    model = _timm(**config).eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    _, summary = vit_kernels.swap_modules(model)
    in_one_op = "inside the patch-embedding op" in str(summary)
    assert in_one_op == ("reg_tokens" not in config)
    torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["<=5.8", ">=5.9"])
def test_transformers_layout_of_the_installed_version(seed, layout):
    """Both layouts are handled; only the installed transformers' can run here (the other skips)."""
    model = _hf("vit")
    layer = model.vit.layers[0] if hasattr(model.vit, "layers") else model.vit.encoder.layer[0]
    installed = ">=5.9" if hasattr(layer.attention, "q_proj") else "<=5.8"
    if layout != installed:
        pytest.skip(f"transformers {__import__('transformers').__version__} has the {installed} layout")
    model.eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(pixel_values=images).logits
    _, summary = vit_kernels.swap_modules(model)
    assert "attention residual add fused into layernorm_after" in str(summary)
    torch.testing.assert_close(model(pixel_values=images).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.inductor
def test_compile_fullgraph_swapped_vit_base(seed):
    """The contract's case: a swapped timm ViT-B compiles with fullgraph=True (64 px keeps it quick on CPU)."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, num_classes=10).to(DEVICE).eval()
    images = torch.randn(1, 3, 64, 64, device=DEVICE)
    want = model(images)
    vit_kernels.swap_modules(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(images)
    torch.testing.assert_close(got, model(images), rtol=1e-5, atol=1e-5)  # not bitwise: as above
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformers_hidden_states_and_attention_outputs_still_work(seed):
    """Layers are still called as modules, so transformers' output capture keeps working."""
    model = _hf("vit").eval()
    images = torch.randn(1, 3, 64, 64, device=DEVICE)
    want = model(pixel_values=images, output_hidden_states=True).hidden_states
    vit_kernels.swap_modules(model)
    got = model(pixel_values=images, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["torchvision", "transformers-vit", "transformers-dinov2"])
def test_patch_embeddings_swapped(seed, family):
    make = {"torchvision": _torchvision, "transformers-vit": lambda: _hf("vit"),
            "transformers-dinov2": lambda: _hf("dinov2")}[family]
    model = make().eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    run = (lambda m: m(images)) if family == "torchvision" else (lambda m: _hf_output(m, images))
    want = run(model)
    _, summary = vit_kernels.swap_modules(model, attention=False, mlp=False, layer_norm=False)
    assert any(path in ("conv_proj", "vit.embeddings.patch_embeddings", "embeddings.patch_embeddings")
               for path, _ in summary.swapped), str(summary)
    torch.testing.assert_close(run(model), want, rtol=1e-4, atol=1e-4)


def test_swapped_timm_vit_checkpoints_its_fused_blocks(seed, monkeypatch):
    """timm's set_grad_checkpointing keeps the fused residual stream (checkpointed per block),
    and every swapped block is called through its own module (hooks such as FSDP2's run)."""
    from vit_kernels.swap import timm_vit

    model, _ = vit_kernels.swap_modules(_timm(drop_path_rate=0.5, init_values=0.5).train())
    images = torch.randn(3, 3, 64, 64, device=DEVICE)
    calls = []
    real_call = type(model.blocks[0]).__call__
    monkeypatch.setattr(type(model.blocks[0]), "__call__", lambda self, *a, **k: calls.append(k) or real_call(self, *a, **k))
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)
        results.append(output_and_grads(model, lambda m: m(images)))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=0, atol=0, msg=name)
    # forward without, forward with checkpointing, its recomputation in backward; each on the carried stream
    assert len(calls) == 3 * len(model.blocks) and all(k.get("carry") for k in calls)
    assert timm_vit.run_blocks_fused is vit_kernels.nn.run_blocks_fused


@pytest.mark.parametrize("config", [dict(), dict(reg_tokens=4)], ids=["one-op-embedding", "timm-pos-embed"])
def test_swapped_timm_vit_normalizes_uint8_images_inside_the_op(seed, config):
    """uint8 in, normalized inside patch_embed: the same logits and gradients (rule) as timm fed
    the images normalized in float; with and without the class/pos tokens inside the op."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    original = _timm(**config).eval()
    oracle_model = copy.deepcopy(original).double()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device=DEVICE)
    mean_t, std_t = torch.tensor(mean, device=DEVICE).view(1, 3, 1, 1), torch.tensor(std, device=DEVICE).view(1, 3, 1, 1)
    normalized = (images.float() / 255 - mean_t) / std_t
    eager = output_and_grads(original, lambda m: m(normalized))
    oracle = output_and_grads(oracle_model, lambda m: m((images.double() / 255 - mean_t.double()) / std_t.double()))
    with pytest.raises(ValueError, match="swapped"):
        set_input_normalization(original, mean, std)
    model, _ = vit_kernels.swap_modules(original)
    with pytest.raises(TypeError, match="set_input_normalization"):
        model(images)
    set_input_normalization(model, mean, std)
    assert set(model.state_dict()) == set(oracle_model.state_dict())  # buffers are not persistent
    assert_rules(output_and_grads(model, lambda m: m(images)), oracle, eager)
