"""End to end: ViT-B/16 and ViT-L/16 at 224 (timm eager, timm after swap_modules, torch.compile
of each, CUDA graphs, our reference ViT fused) and transformers' SigLIP so400m/14@384 and CLIP
ViT-L/14@336 towers (as is, swapped, torch.compile of each), bf16 autocast, inference and a full
training step (forward + backward + AdamW). Agreement (logits and one step's gradients, the numerics
rule) is asserted per model and provider before timing. extra_info: images/s, MFU (model FLOPs / time /
the measured bf16 matmul rate), peak memory.
"""

import pytest
import torch

from vit_kernels.benchmarking.vit import MODES, VIT_MODELS, family_of, measure_vit, vit_agreement, vit_case

_agreed = set()
MODEL_PROVIDERS = [(model, provider) for model, spec in VIT_MODELS.items() for provider in family_of(spec).providers]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model,provider", MODEL_PROVIDERS)
def test_vit(benchmark, matmul_tflops, model, mode, provider):
    spec = VIT_MODELS[model]
    pytest.importorskip(spec.get("family", "timm"))
    device = torch.device("cuda")
    checked = provider.removesuffix("_graph")  # a graph replays its model's kernels
    # The rule for the provider timed (the family's eager model is the yardstick).
    if checked != family_of(spec).eager and (model, checked) not in _agreed:
        for result in vit_agreement(VIT_MODELS[model], device, torch.bfloat16, providers=(checked,)).values():
            assert result.ok, str(result)
        _agreed.add((model, checked))
    case = vit_case(provider, model, mode, device)

    def timed():
        case.run()
        torch.cuda.synchronize()

    benchmark.group = f"{model} {mode} batch {case.batch}"
    benchmark.pedantic(timed, rounds=5, warmup_rounds=3, iterations=1)
    measured = measure_vit(case)
    benchmark.extra_info.update(provider=provider, batch=case.batch, cuda_event_median_ms=measured["ms"],
                                images_per_s=measured["images_per_s"], tflops=measured["tflops"],
                                mfu_pct=100 * measured["tflops"] / matmul_tflops, bf16_matmul_tflops=matmul_tflops,
                                peak_memory_gib=measured["peak_memory_gib"])
    del case
    torch.cuda.empty_cache()
