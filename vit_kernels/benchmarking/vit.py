"""End to end: a whole ViT, inference and a training step, under bf16 autocast.

Two families of models. timm's ViTs, providers all from the same weights (timm's keys are ours):
  timm                   timm's VisionTransformer as is (its SDPA attention)
  timm_swapped           the same model after `vit_kernels.swap_modules`
  timm_compile           torch.compile(timm)
  timm_swapped_compile   torch.compile(timm after swap_modules)
  reference_fused        `vit_kernels.models.create_model(name, fused=True)`
  <provider>_graph       timm, timm_swapped and reference_fused, each step (or inference
                         forward) captured in one CUDA graph by vit_kernels.capture_train_step
  timm_compile_cudagraphs  torch.compile(timm, mode="reduce-overhead"): Inductor's CUDA graphs
transformers' vision towers (CLIP, SigLIP), fine-tuned as a tower is: a linear classifier on the
pooled output (TowerClassifier), the tower on transformers' default SDPA attention:
  transformers                   the tower as is
  transformers_swapped           the same model after `vit_kernels.swap_modules` (which finds the
                                 tower inside the classifier and swaps only it)
  transformers_compile           torch.compile(transformers)
  transformers_swapped_compile   torch.compile(transformers after swap_modules)
A training step is forward + cross-entropy + backward + AdamW step. Agreement first: the
logits and every parameter gradient of one step, each provider against a float64 copy of
the family's unswapped model, within twice its eager error (the numerics rule). Reported: images/s,
MFU (model FLOPs / time / the measured bf16 matmul rate) and peak memory.

Shared by `benchmarks/test_bench_vit.py` and `python -m vit_kernels.bench`.
"""

import copy
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..testing import RuleCheck, check_rule, output_and_grads
from . import timing

VIT_PROVIDERS = ("timm", "timm_swapped", "timm_compile", "timm_swapped_compile", "reference_fused", "timm_graph",
                 "timm_swapped_graph", "reference_fused_graph", "timm_compile_cudagraphs")
GRAPHED = "_graph"  # the provider without the suffix, its step captured by vit_kernels.capture_train_step
TOWER_PROVIDERS = ("transformers", "transformers_swapped", "transformers_compile", "transformers_swapped_compile")


@dataclass(frozen=True)
class Family:
    providers: tuple
    eager: str  # the yardstick of the rule and of the speedups
    baseline: str  # the strongest PyTorch alternative, for the "x baseline" column


FAMILIES = {"timm": Family(VIT_PROVIDERS, "timm", "timm_compile"),
            "transformers": Family(TOWER_PROVIDERS, "transformers", "transformers_compile")}

# Batches that keep an 80 GB H100 busy without running the eager baseline out of memory. A spec:
# family (timm when absent), name (timm's model name; the tower's kind for transformers), config
# (timm.create_model's keywords; the tower config's fields), batch per mode.
VIT_MODELS = {
    "ViT-B/16": dict(name="vit_base_patch16_224", config={}, batch={"inference": 256, "train": 128}),
    "ViT-L/16": dict(name="vit_large_patch16_224", config={}, batch={"inference": 128, "train": 64}),
    # The towers of the vision-language models people fine-tune (d = 72; 729 tokens, no class token).
    "SigLIP-so400m/14@384": dict(family="transformers", name="siglip",
                                 config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                             num_attention_heads=16, image_size=384, patch_size=14),
                                 batch={"inference": 64, "train": 32}),
    "CLIP-ViT-L/14@336": dict(family="transformers", name="clip",
                              config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14,
                                          hidden_act="quick_gelu"),
                              batch={"inference": 128, "train": 64}),
}
# Numerics only, on CPU through Triton's interpreter: tiny models in float32.
VIT_SMALL_MODELS = {
    "tiny (32px, P8, D64, 2 blocks)": dict(name="vit_tiny_patch16_224",
                                           config=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
                                           batch={"inference": 2, "train": 2}),
    "tiny SigLIP (32px, P8, D144, d72)": dict(family="transformers", name="siglip",
                                             config=dict(hidden_size=144, intermediate_size=200, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=8),
                                             batch={"inference": 2, "train": 2}),
    "tiny CLIP (32px, P8, D64, quick_gelu)": dict(family="transformers", name="clip",
                                                 config=dict(hidden_size=64, intermediate_size=128,
                                                             num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                                             patch_size=8, hidden_act="quick_gelu"),
                                                 batch={"inference": 2, "train": 2}),
}
MODES = ("inference", "train")


def family_of(spec: dict) -> Family:
    return FAMILIES[spec.get("family", "timm")]


def image_size(spec: dict) -> int:
    return spec["config"].get("img_size", spec["config"].get("image_size", 224))


class TowerClassifier(nn.Module):
    """A transformers vision tower with a linear classifier on its pooled output: the shape of a
    tower fine-tuned alone, and a model swap_modules does not plan whole (it swaps the tower in it)."""

    def __init__(self, tower: nn.Module, num_classes: int = 1000):
        super().__init__()
        self.tower = tower
        self.num_classes = num_classes
        self.head = nn.Linear(tower.config.hidden_size, num_classes)

    def forward(self, images):
        return self.head(self.tower(pixel_values=images).pooler_output)


def _linear_flops(module: nn.Module, rows: int) -> int:
    return sum(2 * rows * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _encoder_flops(layers, tokens: int, width: int, patches: int, patch_weight: torch.Tensor) -> int:
    """The patch embedding, each layer's GEMMs (24 N D^2 at mlp_ratio 4, read off the Linear
    shapes) and attention (4 N^2 D)."""
    return 2 * patches * patch_weight.numel() + sum(_linear_flops(layer, tokens) + 4 * tokens * tokens * width
                                                    for layer in layers)


def vit_flops_per_image(model: nn.Module) -> int:
    """Forward FLOPs of one image: the encoder (_encoder_flops), the pooling head and the classifier."""
    if isinstance(model, TowerClassifier):
        return _tower_flops_per_image(model)
    patches = model.patch_embed.num_patches
    tokens = patches + getattr(model, "num_prefix_tokens", 1)
    return (_encoder_flops(model.blocks, tokens, model.embed_dim, patches, model.patch_embed.proj.weight)
            + 2 * model.embed_dim * model.num_classes)


def _tower_flops_per_image(model: TowerClassifier) -> int:
    # transformers 5.x before 5.25 wraps the encoder in .vision_model; 5.25 flattened it into the tower.
    vision = getattr(model.tower, "vision_model", model.tower)
    embeddings, width = vision.embeddings, model.tower.config.hidden_size
    patches = embeddings.num_patches
    tokens = embeddings.num_positions  # CLIP: the class token too; SigLIP: the patches
    flops = _encoder_flops(vision.encoder.layers, tokens, width, patches, embeddings.patch_embedding.weight)
    head = getattr(vision, "head", None)
    if head is not None:  # SigLIP's attention pool: keys and values over every token, the rest on one query row
        flops += 2 * (2 * tokens + 1) * width * width + 4 * tokens * width + _linear_flops(head, 1)
    return flops + _linear_flops(model.head, 1)


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # trained-looking weights: the libraries' inits leave zero biases and unit norms
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def base_model(spec: dict, device: torch.device) -> nn.Module:
    """The family's unswapped model (seeded: every provider starts from these weights)."""
    torch.manual_seed(0)
    if spec.get("family", "timm") == "timm":
        import timm

        return _perturbed(timm.create_model(spec["name"], pretrained=False, **spec["config"])).to(device)
    import transformers

    config_class, model_class = {"clip": ("CLIPVisionConfig", "CLIPVisionModel"),
                                 "siglip": ("SiglipVisionConfig", "SiglipVisionModel")}[spec["name"]]
    tower = getattr(transformers, model_class)(getattr(transformers, config_class)(**spec["config"]))
    tower.set_attn_implementation("sdpa")
    return _perturbed(TowerClassifier(tower)).to(device)


def build(provider: str, spec: dict, device: torch.device, base: nn.Module = None) -> nn.Module:
    """The provider's model, with `base`'s (base_model's) weights."""
    import vit_kernels
    from ..models import create_model

    providers = family_of(spec).providers
    if provider not in providers:
        raise ValueError(f"provider must be one of {', '.join(providers)}; got {provider!r}")
    base = base if base is not None else base_model(spec, device)
    provider = provider.removesuffix(GRAPHED)  # the same model: the capture happens in vit_case
    if provider == "reference_fused":
        model = create_model(spec["name"], fused=True, **spec["config"]).to(device)
        model.load_state_dict(base.state_dict(), strict=True)
    elif "_swapped" in provider:
        model, _ = vit_kernels.swap_modules(copy.deepcopy(base))
    else:
        model = copy.deepcopy(base)
    if provider.endswith("_compile"):
        return timing.compile_fresh(model)
    if provider == "timm_compile_cudagraphs":
        return timing.compile_fresh(model, mode="reduce-overhead")
    return model


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _inputs(spec: dict, batch: int, device: torch.device, num_classes: int, generator_seed: int):
    generator = torch.Generator(device="cpu").manual_seed(generator_seed)
    size = image_size(spec)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    return images, labels


def _logits_and_grads(model: nn.Module, images, labels, autocast_dtype) -> Dict[str, torch.Tensor]:
    """The logits ("output") and every parameter's gradient of one cross-entropy step."""
    def run(m):
        with _autocast(images.device, autocast_dtype):
            return m(images)

    return output_and_grads(model, run, loss=lambda logits: F.cross_entropy(logits.float(), labels))


def vit_agreement(spec: dict, device: torch.device, autocast_dtype, providers=None) -> Dict[str, RuleCheck]:
    """The worst rule check (logits, every gradient of one step) per provider (default: the
    family's), at a small batch."""
    family = family_of(spec)
    providers = family.providers if providers is None else providers
    base = base_model(spec, device).train()
    images, labels = _inputs(spec, 4, device, base.num_classes, 1)
    oracle = _logits_and_grads(copy.deepcopy(base).double(), images.double(), labels, None)
    eager = _logits_and_grads(base, images, labels, autocast_dtype)
    worst = {}
    for provider in providers:
        if provider == family.eager or provider.endswith(GRAPHED):
            continue
        got = _logits_and_grads(build(provider, spec, device, base).train(), images, labels, autocast_dtype)
        if got.keys() != eager.keys():
            raise AssertionError(f"{provider}: gradients of {sorted(set(got) ^ set(eager))} missing on one side")
        checks = [check_rule(name, got[name].to(eager[name].dtype), oracle[name], eager[name]) for name in got]
        worst[provider] = max(checks, key=lambda c: (not c.ok, c.ratio))
    for provider in providers:  # a graph replays its model's kernels: its numbers are its model's
        base = provider.removesuffix(GRAPHED)
        if provider.endswith(GRAPHED) and base in worst:
            worst[provider] = worst[base]
    return worst


def _loss(logits, labels):
    return F.cross_entropy(logits.float(), labels)


@dataclass
class VitCase:
    model: str
    mode: str
    provider: str
    batch: int
    run: Callable[[], object]  # one inference call or one training step, on the next batch
    flops: int  # per call: forward, or 3x forward for a training step


def vit_case(provider: str, model_label: str, mode: str, device: torch.device, spec: dict = None,
             batch: int = None) -> VitCase:
    spec = spec or VIT_MODELS[model_label]
    batch = batch or spec["batch"][mode]
    model = build(provider, spec, device)
    plain = getattr(model, "_orig_mod", model)
    per_image = vit_flops_per_image(plain)
    batches = [_inputs(spec, batch, device, plain.num_classes, seed) for seed in range(2)]
    state = {"i": 0}

    def next_batch():
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    if provider.endswith(GRAPHED):
        return _graphed_case(model, model_label, mode, provider, batch, batches, next_batch, per_image, device)
    if mode == "inference":
        model.eval()

        def run():
            images, _ = next_batch()
            with torch.no_grad(), _autocast(device, torch.bfloat16):
                return model(images)

        return VitCase(model_label, mode, provider, batch, run, per_image * batch)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def run():
        images, labels = next_batch()
        with _autocast(device, torch.bfloat16):
            logits = model(images)
        _loss(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return VitCase(model_label, mode, provider, batch, run, 3 * per_image * batch)


def _graphed_case(model, model_label, mode, provider, batch, batches, next_batch, per_image, device) -> VitCase:
    """The same step as vit_case's, captured by vit_kernels.capture_train_step / capture_inference
    (a capturable AdamW: its step count stays on the device)."""
    import vit_kernels

    if mode == "inference":
        forward = vit_kernels.capture_inference(model.eval(), batches[0][0])
        return VitCase(model_label, mode, provider, batch, lambda: forward(next_batch()[0]), per_image * batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, capturable=device.type == "cuda")
    step = vit_kernels.capture_train_step(model.train(), optimizer, _loss, *batches[0])
    return VitCase(model_label, mode, provider, batch, lambda: step(*next_batch()), 3 * per_image * batch)


def measure_vit(case: VitCase, *, reps: int = 10, warmup: int = 3) -> dict:
    """Median ms per call (CUDA events), images/s, TFLOP/s and peak memory of the timed calls."""
    for _ in range(warmup):  # compile, autotune, allocator
        case.run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = timing.time_cuda_ms(case.run, warmup=1, reps=reps)
    return dict(ms=ms, images_per_s=case.batch / (ms * 1e-3), tflops=case.flops / (ms * 1e-3) / 1e12,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
