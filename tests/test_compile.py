"""swap_modules + torch.compile (issue 24): what the compiler sees, and the numbers it computes.

- The Triton ops are torch.library.triton_ops (_dispatch.define_op): AOTAutograd, whose graph
  Inductor compiles, sees each launch as a Triton kernel call, forward and backward, with static
  and with symbolic batch sizes. Traced on fake CUDA tensors in a subprocess without the
  interpreter (tests/fake_cuda_trace.py): no GPU is needed to trace.
- Under compile the ops that Inductor generates faster run their reference
  (_dispatch.inductor_generates): a swapped block's Dynamo graph holds our attention op and no
  LayerNorm or MLP op.
- Compiled against eager, forward and every gradient, by the numerics rule; fullgraph in each
  mode this CPU can run; torch.export of a swapped inference model, saved and loaded.
"""

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import vit_kernels
from vit_kernels._dispatch import inductor_keeps_launch_options
from vit_kernels.testing import assert_rules, kernel_device, output_and_grads

DEVICE = kernel_device()
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
SCRIPT = Path(__file__).resolve().parent / "fake_cuda_trace.py"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic_batch"])
def test_aot_graphs_call_our_triton_kernels(dynamic):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT)] + (["--dynamic"] if dynamic else []), env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    calls = json.loads(out.stdout.strip().splitlines()[-1])
    want = {
        "add_layer_norm": ["_add_layer_norm_fwd_kernel", "_add_layer_norm_bwd_kernel", "_partial_row_sums_kernel"],
        "bias_gelu": ["_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_partial_row_sums_kernel"],
        "bias_gelu_linear": ["_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_partial_row_sums_kernel"],
        "flash_attention": ["_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"],
        "flash_attention_dropout": ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"],
    }
    if not inductor_keeps_launch_options():  # this torch's Inductor would contract
        for case in ("flash_attention", "flash_attention_dropout"):
            want[case] = ["op:vit_kernels.flash_attention_fwd.default"] + want[case][1:]
    assert calls == want


def _timm_model(**config):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**SMALL, **config}).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.inductor
def test_dynamo_graph_keeps_our_attention_and_leaves_the_rest_to_inductor(seed):
    model, _ = vit_kernels.swap_modules(_timm_model(init_values=0.1))
    block = model.blocks[0]
    called = set()

    def record(graph_module, example_inputs):
        called.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    torch._dynamo.reset()
    x = torch.randn(2, 17, 64, device=DEVICE, requires_grad=True)
    torch.compile(block, backend=record, fullgraph=True)(x)
    ours = {target for target in called if "vit_kernels" in target}
    assert ours == {"vit_kernels.flash_attention_fwd.default"}, called

    called.clear()
    torch._dynamo.reset()
    with torch.no_grad():  # no gradient: attention's forward is SDPA's (faster than ours alone)
        torch.compile(block, backend=record, fullgraph=True)(x)
    assert not {target for target in called if "vit_kernels" in target}, called
    assert any("scaled_dot_product_attention" in target for target in called), called


@pytest.mark.inductor
@pytest.mark.parametrize("config", [dict(init_values=0.1), dict(drop_path_rate=0.0, class_token=False, global_pool="avg")],
                         ids=["layer-scale", "no-cls"])
def test_compiled_swapped_model_by_the_rule(seed, config):
    theirs = _timm_model(**config).train()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    eager = output_and_grads(theirs, lambda m: m(images))
    oracle = output_and_grads(copy.deepcopy(theirs).double(), lambda m: m(images.double()))
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(theirs))
    torch._dynamo.reset()
    compiled = torch.compile(swapped, fullgraph=True, backend="aot_eager")
    got = output_and_grads(compiled, lambda m: m(images))
    assert_rules(got, oracle, eager)


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_fullgraph_in_each_mode(seed, mode):
    """Inductor itself on this CPU (reduce-overhead's CUDA graphs only apply on a GPU)."""
    theirs = _timm_model(depth=1).eval()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        want = theirs(images)
        swapped, _ = vit_kernels.swap_modules(copy.deepcopy(theirs))
        torch._dynamo.reset()
        got = torch.compile(swapped, fullgraph=True, mode=mode)(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_round_trip(seed):
    theirs = _timm_model().eval()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(theirs))
    with torch.no_grad():
        want = swapped(images)
        program = torch.export.export(swapped, (images,))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        got = loaded.module()(images)
        assert_rules({"output": got}, {"output": copy.deepcopy(theirs).double()(images.double())},
                     {"output": theirs(images)})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
