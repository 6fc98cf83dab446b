"""Host (CPU) time per call of the fused ops and of a ViT step, without a GPU.

A ViT step at a small batch is launch-bound: the GPU waits for Python. This measures the
Python and dispatcher cost of our ops on any machine: CPU tensors, the op's kernel path
forced, and every Triton launch replaced by a no-op (Triton's own launcher is therefore not
counted; `scripts/gpu_diag.py overhead` measures the whole host cost on a device). The
eager equivalents run their real CPU kernels on tiny tensors: their numbers count that tiny
compute where a GPU would count the CUDA launch's host cost (a few us each), as ours count a
no-op where a GPU counts Triton's C launcher. Neither side pays the driver here, so a ratio is
the Python and dispatcher work compared, not a bound on either side's GPU host time; the
device's numbers come from `scripts/gpu_diag.py`. Ours and eager's take turns, a batch of calls each, 7 rounds:
times are each one's minimum over the rounds, in us (ops) or ms (ViT steps), and each ratio is
the median of the rounds' ratios (the machine's drift falls on both sides alike).

--triton-launch keeps Triton's own Python launch path (JITFunction.run: argument binding and
specialization, the kernel-cache key and lookup, the grid; the autotuner's config lookup)
and fakes only what needs a GPU: the driver's device, stream and target (sm_90), the compile
(a stand-in kernel is cached instead) and the C launcher's call (a no-op; on a GPU it costs a
few us more). Its numbers minus the default mode's are Triton's Python cost per launch, for
whichever Triton is first on the path (e.g. PYTHONPATH=<dir with triton 3.6> for the
device image's).

    python scripts/host_overhead.py [--reps N] [--no-vit] [--triton-launch [--free-launches]] [--threads N] [--profile add_layer_norm|flash_attention|bias_gelu]

Eager's CPU kernels run on one thread unless --threads says otherwise: a GPU step's host path is
one thread, and an OpenMP team on 5-row GEMMs times thread wake-ups and contention with other
processes instead (benchmarks/results/cpu-host-overhead-2026-12-05.md).
    python scripts/host_overhead.py --saved-activations

--free-launches (with --triton-launch) makes every Triton launch of the ops return at once, before
Triton's path and ours (vit_kernels' launch helpers): what the rest of each call costs, the
bound that a launch path with no host cost at all would reach.

--saved-activations instead counts what a ViT-B/16 training step keeps for backward per
image (the bytes of the distinct storages autograd saves in the forward, bf16 autocast,
224 px), timm eager against timm after swap_modules: the part of the step's peak memory
that grows with the batch, from shapes alone (the stubbed kernels compute nothing).

Run it without TRITON_INTERPRET (interpreted kernels cannot be stubbed out).
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from vit_kernels._fake_launch import stub_out_kernels


class _FreeLauncher:
    @staticmethod
    def call(*args, **kwargs):
        return None


def free_launches():
    """Each op module's launches (ops/_launcher.launcher_for(kernel).call, attention's _launch over
    ops/_tuning) return at once: the op's own Python, its allocations and aten calls are kept."""
    import importlib

    from vit_kernels._fake_launch import OP_MODULES

    for name in OP_MODULES:
        module = importlib.import_module(f"vit_kernels.ops.{name}")
        if hasattr(module, "launcher_for"):
            module.launcher_for = lambda kernel: _FreeLauncher
        if hasattr(module, "_launch"):
            module._launch = lambda *args, **kwargs: None


def per_call_seconds(fn, reps: int) -> float:
    return interleaved_seconds([fn], reps)[0][0]


def interleaved_seconds(fns, reps: int):
    """([best seconds per call of each fn], [median over rounds of each fn's time / the last fn's]).

    The functions take turns, a batch each per round, so that the machine's drift (other tenants,
    clock changes) falls on all of them alike: timed one after the other, a ratio moved by 10-20%
    between runs on this machine."""
    for fn in fns:
        for _ in range(max(reps // 20, 5)):
            fn()
    batch = max(reps // 7, 1)
    rounds = [[] for _ in fns]
    for _ in range(7):
        for times, fn in zip(rounds, fns):
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            times.append((time.perf_counter() - start) / batch)
    ratios = [statistics.median(t / base for t, base in zip(times, rounds[-1])) for times in rounds]
    return [min(times) for times in rounds], ratios


def op_cases():
    """(name, ours, eager): each a function of no arguments returning a tuple of outputs."""
    from vit_kernels.ops import add_layer_norm, bias_gelu, flash_attention

    dtype, hidden = torch.bfloat16, 64
    x, residual = (torch.randn(2, 5, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(hidden, requires_grad=True) for _ in range(2))
    q, k, v = (torch.randn(2, 5, 2, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    h = torch.randn(2, 5, 4 * hidden, dtype=dtype, requires_grad=True)
    h_bias = torch.randn(4 * hidden, requires_grad=True)

    def eager_layer_norm():
        h_new = x + residual
        return F.layer_norm(h_new, (hidden,), weight, bias, 1e-6), h_new

    def eager_attention():
        return (F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),)

    return [
        ("add_layer_norm", lambda: add_layer_norm(x, residual, weight, bias), eager_layer_norm),
        ("flash_attention", lambda: (flash_attention(q, k, v),), eager_attention),
        ("bias_gelu", lambda: (bias_gelu(h, h_bias),), lambda: (F.gelu(h + h_bias),)),
    ]


def forward_and_backward(fn):
    def run():
        outputs = fn()
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    return run


def vit_cases():
    """timm's ViT-B/16 layout (12 blocks) at a tiny width and image, eager and swapped; and the same
    layout as transformers' ViT, eager and swapped (its blocks take the per-op path: the one-node
    block step is for timm's and our blocks)."""
    import timm
    import transformers

    import vit_kernels

    def make(swap):
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=64, num_heads=2,
                                  num_classes=10)
        return vit_kernels.swap_modules(model)[0] if swap else model

    def make_transformers(swap):
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=2,
                                        intermediate_size=256, image_size=32, patch_size=16, num_labels=10)
        model = transformers.ViTForImageClassification(config)
        return vit_kernels.swap_modules(model)[0] if swap else model

    images = torch.randn(1, 3, 32, 32)
    models = {"timm": make(False), "timm swapped": make(True), "transformers": make_transformers(False),
              "transformers swapped": make_transformers(True)}

    def train_step(model):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _logits(model(images)).float().sum()
            loss.backward()
        return run

    def inference(model):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(images)
        return run

    return models, train_step, inference


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def saved_activation_bytes(model, images) -> int:
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in parameters)


def report_saved_activations():
    """Per image: the saved bytes at batch 2 minus those at batch 1, so that what does not grow
    with the batch (autocast's bf16 weight copies, which dominate at a tiny batch) cancels."""
    import timm

    import vit_kernels
    from vit_kernels.nn import FusedMlp

    per_image = {}
    for name in ("timm", "timm swapped", "timm swapped, fc2 keeping the GELU output"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False).train()
        if name != "timm":
            vit_kernels.swap_modules(model)
        if name.endswith("output"):  # FusedMlp's unfused path: timm's Mlp forward
            for module in model.modules():
                if isinstance(module, FusedMlp):
                    module._fc2_follows_gelu_directly = lambda: False
        one, two = (saved_activation_bytes(model, torch.randn(b, 3, 224, 224)) for b in (1, 2))
        per_image[name] = two - one
    print("ViT-B/16, 224 px, bf16 autocast: activations kept for backward per image, MB (x timm)")
    for name, nbytes in per_image.items():
        print(f"  {name:45s} {nbytes / 1e6:8.2f}  {nbytes / per_image['timm']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1400)
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--profile", choices=["add_layer_norm", "flash_attention", "bias_gelu"])
    parser.add_argument("--saved-activations", action="store_true")
    parser.add_argument("--triton-launch", action="store_true",
                        help="keep Triton's Python launch path; fake only the driver, the compile and the C launcher")
    parser.add_argument("--free-launches", action="store_true",
                        help="with --triton-launch: every launch of the ops returns at once (the bound of a free launch path)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for eager's kernels (default 1: a GPU step's host path is one thread)")
    args = parser.parse_args()
    # OpenMP teams on the tiny CPU GEMMs would time thread wake-ups and contention with other
    # processes (a 5-row bf16 linear: 20 us on one thread, 160 us on two beside a busy core).
    torch.set_num_threads(args.threads)
    stub_out_kernels(triton_launch=args.triton_launch)
    if args.free_launches:
        free_launches()
    torch.manual_seed(0)
    if args.saved_activations:
        report_saved_activations()
        return
    import triton

    from vit_kernels._extension import bound_launch_path

    launches = (f"Triton {triton.__version__}'s launch path kept, its C launcher a no-op, bound launches "
                f"{bound_launch_path()}" if args.triton_launch else "kernel launches stubbed out")
    if args.free_launches:
        launches = "every launch free: the ops' launch helpers return at once"
    print(f"host time per call, us ({launches}; eager runs tiny CPU kernels)")
    print(f"{'op':18s} {'mode':10s} {'ours':>8s} {'eager':>8s} {'ours/eager':>10s}")
    cases = op_cases()
    for name, ours, eager in cases:
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                with torch.no_grad():
                    times, ratios = interleaved_seconds((ours, eager), args.reps)
            else:
                times, ratios = interleaved_seconds((forward_and_backward(ours), forward_and_backward(eager)),
                                                    args.reps // 2)
            print(f"{name:18s} {mode:10s} {times[0] * 1e6:8.1f} {times[1] * 1e6:8.1f} {ratios[0]:10.2f}", flush=True)
    if not args.no_vit:
        models, train_step, inference = vit_cases()
        from vit_kernels.nn import block_step

        blocks = ("each block one C++ autograd node" if block_step.cpp_step() is not None
                  else f"blocks on the per-op path: {block_step.cpp_step_unavailable()}")
        print(f"\nViT-B/16 layout (12 blocks, width 64, 32x32 image, batch 1, bf16 autocast; {blocks}), ms per step")
        for mode, make_run in (("train step", train_step), ("inference", inference)):
            names = ("timm swapped", "timm")
            times, ratios = interleaved_seconds([make_run(models[name]) for name in names], max(args.reps // 50, 14))
            print(f"{mode:10s} " + "  ".join(f"{name} {t * 1e3:.2f}" for name, t in zip(names, times))
                  + f"  swapped/timm {ratios[0]:.2f}", flush=True)
        print("transformers' ViT, the same layout (the per-op path), ms per step")
        for mode, make_run in (("train step", train_step), ("inference", inference)):
            names = ("transformers swapped", "transformers")
            times, ratios = interleaved_seconds([make_run(models[name]) for name in names], max(args.reps // 50, 14))
            print(f"{mode:10s} " + "  ".join(f"{name} {t * 1e3:.2f}" for name, t in zip(names, times))
                  + f"  swapped/eager {ratios[0]:.2f}", flush=True)
    if args.profile:
        ours = forward_and_backward(dict((name, fn) for name, fn, _ in cases)[args.profile])
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            ours()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
