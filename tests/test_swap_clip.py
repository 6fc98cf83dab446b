"""swap_modules on transformers' CLIP, SigLIP and SigLIP2 vision towers, alone, inside their
two-tower models and inside a vision-language-model-shaped wrapper (tiny configs, no downloads).

Every family and activation: state_dict keys and values unchanged, the output and every
parameter gradient by the numerics rule against the unswapped model and a float64 copy, the
kernels actually run (counted), a second swap changes nothing, the summary names what was
swapped and what was left alone.
"""

import copy

import pytest
import torch
from torch import nn

import vit_kernels
from vit_kernels.nn import FusedLayerNorm
from swap_checks import check_swap_by_rule, perturbed
from vit_kernels.testing import kernel_device

transformers = pytest.importorskip("transformers")
from vit_kernels.swap import transformers_clip  # noqa: E402

DEVICE = kernel_device()
# head dim 72 (SigLIP so400m's), a width the MLP kernels mask, two layers.
VISION = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=16)


def _vision(family, act=None, attn_implementation="sdpa", head=True):
    t = transformers
    extra = {} if act is None else {"hidden_act": act}
    if family == "clip":
        model = t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(projection_dim=32, **VISION, **extra))
    elif family == "clip-plain":
        model = t.CLIPVisionModel(t.CLIPVisionConfig(**VISION, **extra))
    elif family == "siglip":
        model = t.SiglipVisionModel(t.SiglipVisionConfig(vision_use_head=head, **VISION, **extra))
    else:
        config = {k: v for k, v in VISION.items() if k != "image_size"}
        model = t.Siglip2VisionModel(t.Siglip2VisionConfig(num_patches=16, vision_use_head=head, **config, **extra))
    model.set_attn_implementation(attn_implementation)
    return perturbed(model)


def _siglip2_inputs(batch=2, dtype=torch.float32, padded=False):
    patches = torch.randn(batch, 16, 3 * 8 * 8, device=DEVICE, dtype=dtype)
    mask = torch.ones(batch, 16, dtype=torch.long, device=DEVICE)
    shapes = torch.tensor([[4, 4]] * batch, device=DEVICE)
    if padded:
        mask[1, 12:] = 0
        shapes[1] = torch.tensor([3, 4])
    return dict(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


def _run(family, batch=2):
    """Every tensor of the output, flattened into one vector, so that every field is compared."""
    images = torch.randn(batch, 3, 32, 32, device=DEVICE)
    siglip2 = _siglip2_inputs(batch)

    def run(model, dtype):
        if family == "siglip2":
            inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in siglip2.items()}
            out = model(**inputs)
        else:
            out = model(pixel_values=images.to(dtype))
        return torch.cat([v.reshape(-1) for v in out.values() if isinstance(v, torch.Tensor)])

    return run


def _count_kernel_calls(monkeypatch):
    calls = {"attention": 0, "key_padded": 0, "patch_embed": 0}
    for key, name in (("attention", "flash_attention"), ("key_padded", "flash_attention_key_padded"),
                      ("patch_embed", "patch_embed")):
        real = getattr(transformers_clip, name)

        def counted(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(transformers_clip, name, counted)
    return calls


def _check_by_rule(original, run):
    return check_swap_by_rule(original, run, train=True)


CASES = {  # (family, hidden_act): CLIP's OpenAI checkpoints use quick_gelu, SigLIP the tanh GELU
    "clip-quick_gelu": ("clip", "quick_gelu"),
    "clip-gelu": ("clip-plain", "gelu"),
    "siglip-tanh": ("siglip", "gelu_pytorch_tanh"),
    "siglip2-tanh": ("siglip2", "gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vision_towers_match_by_rule(seed, case, monkeypatch):
    family, act = CASES[case]
    calls = _count_kernel_calls(monkeypatch)
    model, summary = _check_by_rule(_vision(family, act), _run(family))
    text = str(summary)
    counts = summary.counts()
    assert counts["attention"]["swapped"] == 2 and counts["block"] == {"swapped": 2}, text
    heads = 2 if family in ("siglip", "siglip2") else 0  # the pooling head's MLP and LayerNorm
    assert counts["mlp"] == {"swapped": 2 + heads // 2}, text
    assert calls["attention"] == 2  # one forward through two layers: the kernel ran, not SDPA
    if family == "siglip2":
        assert "embeds patchified pixels with an nn.Linear" in text and calls["patch_embed"] == 0
    else:
        assert counts["patch_embed"] == {"swapped": 1} and calls["patch_embed"] == 1
    if family in ("siglip", "siglip2"):
        assert "one latent query per image" in text
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(isinstance(m, FusedLayerNorm) for m in norms)
    _, second = vit_kernels.swap_modules(model)
    assert second.swapped == [] and "already swapped" in str(second)


def _two_tower(family):
    t = transformers
    vision = {k: v for k, v in VISION.items()}
    if family == "clip":
        config = t.CLIPConfig(text_config=TEXT, vision_config=dict(vision, hidden_act="quick_gelu"), projection_dim=32)
        return perturbed(t.CLIPModel(config))
    if family == "siglip":
        text = dict(TEXT, projection_size=VISION["hidden_size"])  # SigLIP compares the two without a projection
        return perturbed(t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=vision)))
    vision = {k: v for k, v in vision.items() if k != "image_size"}
    text = dict(TEXT, projection_size=VISION["hidden_size"])
    return perturbed(t.Siglip2Model(t.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=16))))


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_two_tower_models_swap_the_vision_half_only(seed, family):
    model = _two_tower(family).eval()
    text_classes = {path: type(m) for path, m in model.text_model.named_modules()}
    if family == "siglip2":
        _, summary = vit_kernels.swap_modules(model)
        assert {path: type(m) for path, m in model.text_model.named_modules()} == text_classes
        assert isinstance(model.vision_model.encoder.layers[1], transformers_clip.ClipEncoderLayer), str(summary)
        return
    inputs = dict(input_ids=torch.randint(0, 50, (2, 7), device=DEVICE), pixel_values=torch.randn(2, 3, 32, 32,
                                                                                                  device=DEVICE))
    want = model(**inputs)
    swapped, summary = vit_kernels.swap_modules(model)
    text = str(summary)
    assert {path: type(m) for path, m in model.text_model.named_modules()} == text_classes
    assert "text_model: " in text and "is a text tower: left as it is" in text
    assert isinstance(model.vision_model.encoder.layers[0].self_attn, transformers_clip.ClipAttention), text
    assert isinstance(model.vision_model.encoder.layers[1], transformers_clip.ClipEncoderLayer), text
    got = swapped(**inputs)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert torch.equal(got["text_embeds"], want["text_embeds"])  # the text tower ran as before


class VisionLanguageModel(nn.Module):
    """A LLaVA-shaped model: a vision tower, a projector and a language model with its own LayerNorms."""

    def __init__(self):
        super().__init__()
        self.vision_tower = _vision("clip-plain", "quick_gelu")
        self.projector = nn.Sequential(nn.Linear(144, 64), nn.GELU(), nn.Linear(64, 64))
        layer = nn.TransformerEncoderLayer(64, 2, 128, batch_first=True, norm_first=True)
        self.language_model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(64), enable_nested_tensor=False)

    def forward(self, pixel_values):
        features = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        return self.language_model(self.projector(features))


def test_a_tower_inside_a_larger_model_is_swapped_alone(seed):
    model = VisionLanguageModel().to(DEVICE)
    classes = {path: type(m) for path, m in model.named_modules() if not path.startswith("vision_tower")}
    _, summary = _check_by_rule(model, lambda m, dtype: m(torch.randn(2, 3, 32, 32, generator=torch.Generator()
                                                                      .manual_seed(0)).to(DEVICE, dtype)))
    text = str(summary)
    assert {path: type(m) for path, m in model.named_modules() if not path.startswith("vision_tower")} == classes
    assert "only the vision model(s) in it (vision_tower) are swapped" in text
    assert summary.counts()["block"] == {"swapped": 2}, text
    assert all(path.startswith("vision_tower.") or path == "" for path, _ in summary.swapped + summary.skipped), text


def test_a_transformers_vision_language_model_swaps_its_vision_tower(seed):
    t = transformers
    config = t.LlavaConfig(vision_config=t.CLIPVisionConfig(**VISION, hidden_act="quick_gelu"),
                           text_config=t.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=80),
                           image_token_index=79, vision_feature_layer=-1)
    model = perturbed(t.LlavaForConditionalGeneration(config)).eval()
    tower = model.model.vision_tower
    language = {path: type(m) for path, m in model.model.language_model.named_modules()}
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    want = tower(pixel_values=images).last_hidden_state
    _, summary = vit_kernels.swap_modules(model)
    assert {path: type(m) for path, m in model.model.language_model.named_modules()} == language
    assert "only the vision model(s) in it (model.vision_tower) are swapped" in str(summary)
    assert isinstance(tower.encoder.layers[0], transformers_clip.ClipEncoderLayer), str(summary)
    torch.testing.assert_close(tower(pixel_values=images).last_hidden_state, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_maps_hidden_states_and_resized_images(seed, implementation):
    """output_attentions and interpolate_pos_encoding take the model's own attention and embeddings
    (the summary says so), output_hidden_states is captured from the fused layers."""
    original = _vision("clip", "quick_gelu", attn_implementation=implementation).eval()
    swapped, summary = vit_kernels.swap_modules(copy.deepcopy(original))
    assert "masks, recorded attention maps: the model's own attention" in str(summary)
    assert "interpolate_pos_encoding: the model's own embeddings" in str(summary)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    for kwargs in (dict(output_attentions=True, output_hidden_states=True), dict(output_hidden_states=True)):
        want, got = original(pixel_values=images, **kwargs), swapped(pixel_values=images, **kwargs)
        assert len(got.hidden_states) == len(want.hidden_states) == 3
        for a, b in zip(got.hidden_states + (got.image_embeds,), want.hidden_states + (want.image_embeds,)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if "output_attentions" in kwargs:
            assert len(got.attentions) == len(want.attentions) == (2 if implementation == "eager" else 0)
            for a, b in zip(got.attentions, want.attentions):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    larger = torch.randn(1, 3, 48, 48, device=DEVICE)
    torch.testing.assert_close(swapped(pixel_values=larger, interpolate_pos_encoding=True).image_embeds,
                               original(pixel_values=larger, interpolate_pos_encoding=True).image_embeds,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_siglip2_padded_batches_match_by_rule(seed, implementation, monkeypatch):
    """NaFlex batches (images of different patch counts, padded, with pixel_attention_mask): the
    padded rows of the output too, and every gradient, by the rule against the model's own masked
    attention (eager: a float mask, SDPA: a bool one), through flash_attention_key_padded."""
    calls = _count_kernel_calls(monkeypatch)
    padded = _siglip2_inputs(padded=True)

    def run(model, dtype):
        out = model(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in padded.items()})
        return torch.cat([out.last_hidden_state.reshape(-1), out.pooler_output.reshape(-1)])

    _check_by_rule(_vision("siglip2", "gelu_pytorch_tanh", attn_implementation=implementation), run)
    assert calls["key_padded"] == 2 and calls["attention"] == 0


def test_siglip2_mask_of_another_form_fails_loudly(seed):
    """A mask that is not a key padding mask (rows differ) is refused on the device, never
    silently computed as one."""
    model = vit_kernels.swap_modules(_vision("siglip2", "gelu_pytorch_tanh").eval())[0]
    attention = model.encoder.layers[0].self_attn
    hidden = torch.randn(2, 16, VISION["hidden_size"], device=DEVICE)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool, device=DEVICE)
    mask[0, 0, 3, 5] = False
    with pytest.raises(RuntimeError, match="not a key padding mask"):
        attention(hidden, mask)


def test_gradient_checkpointing_is_honoured(seed):
    model = _vision("siglip", "gelu_pytorch_tanh").train()
    swapped, _ = vit_kernels.swap_modules(model)
    swapped.gradient_checkpointing_enable()
    layer = swapped.encoder.layers[0]
    assert isinstance(layer, transformers_clip.ClipEncoderLayer) and layer.gradient_checkpointing
    images = torch.randn(2, 3, 32, 32, device=DEVICE, requires_grad=True)
    reference = copy.deepcopy(swapped)
    reference.gradient_checkpointing_disable()
    for m in (swapped, reference):
        m.zero_grad()
        m(pixel_values=images).pooler_output.square().sum().backward()
    for (name, p), q in zip(swapped.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_half_precision_tower(seed):
    """A 16-bit tower (as VLMs load it) taking float32 pixels, cast by the embeddings as before:
    bfloat16 on a GPU, float16 under the interpreter (whose bfloat16 dots are wrong)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    original = _vision("clip", "quick_gelu").to(dtype).eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    want, got = original(pixel_values=images).image_embeds, swapped(pixel_values=images).image_embeds
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_transformers_4_call_forms_pick_their_mixins_and_an_unknown_one_none():
    """4.x's call forms are told by the forward's parameters (tests/test_swap_transformers4.py runs
    them under 4.46 and 4.57); a form the swap does not know gets no mixin, so the planner leaves
    the module alone with its reason."""
    class OldCLIPAttention(nn.Module):
        def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
            return hidden_states, None

    class OldSiglipAttention(nn.Module):
        def forward(self, hidden_states, attention_mask=None, output_attentions=False):
            return hidden_states, None

    class UnknownAttention(nn.Module):
        def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
            return hidden_states, None

    assert transformers_clip.old_layout(OldCLIPAttention)
    assert not transformers_clip.old_layout(transformers.models.clip.modeling_clip.CLIPAttention)
    pick = transformers_clip.old_layout_class
    assert pick(OldCLIPAttention, "attention") is transformers_clip.ClipAttention4x
    assert pick(OldCLIPAttention, "block") is transformers_clip.ClipEncoderLayer4x
    assert pick(OldSiglipAttention, "attention") is transformers_clip.SiglipAttention4x
    assert pick(OldSiglipAttention, "block") is transformers_clip.SiglipEncoderLayer4x
    assert transformers_clip.old_layout(UnknownAttention) and pick(UnknownAttention, "attention") is None


def test_timm_quick_gelu_vit_fuses_its_mlp(seed):
    """timm's OpenAI-CLIP ViTs (act_layer quick_gelu) get the fused MLP's third form."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, embed_dim=144, depth=2,
                              num_heads=2, img_size=32, patch_size=8, num_classes=5)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    model, summary = _check_by_rule(perturbed(model), lambda m, dtype: m(images.to(dtype)))
    assert summary.counts()["mlp"] == {"swapped": 2}, str(summary)
    assert {block.mlp.approximate for block in model.blocks} == {"quick"}
