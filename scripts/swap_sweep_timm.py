"""swap_modules over timm's whole registry of ViT-like models: for each model, what the swap did, and
whether the swapped model computes what the original did. CI checks chosen models
(tests/test_swap*.py, tests/test_timm_model_suite.py); this checks every one a user may hold.

    python scripts/swap_sweep_timm.py [--log FILE] [--train] [--max-params 150e6] [--timeout 120] [PATTERN ...]

Per model (random weights, pretrained=False, its default input size, batch 2, float32):
- eval: the logits after the swap against before, and the state_dict keys (same keys, same order);
- with --train, for each model the swap changed: a training step's logits and every parameter's
  gradient, the swapped model against a second build of the original with the same seed.
A line per model in the log (resumed where it stopped: models already in it are skipped):
`name OK|DIFF|ERR|TIMEOUT|SKIP ...`; the exit status is 1 if any model is DIFF or ERR.

Run without TRITON_INTERPRET, on the CPU: the ops then run their PyTorch references, so what is
under test is the swap itself (what it replaces, with which arguments, what it leaves alone) at
full size; the kernels are held to the numerics rule by tests/. A relative difference
(max |a - b| / max |b|) under 1e-4 for logits and 1e-3 for gradients is OK at once: float32 with
other summation orders. Past it, the numerics rule decides against a float64 build of the
original (vit_kernels.testing.check_rule: each tensor's error at most twice eager's plus 1e-5 of
max(1, its largest value)). At random weights attention is near uniform, its softmax backward a
difference of nearly equal terms, and in some models every gradient upstream of it is float32
noise: eager itself 2-30% off float64 (vit_small_patch8_224, vit_base_patch14_reg1_tipsv2). Those
gradients are around 1e-8, so the rule's absolute floor decides for them; the line shows the worst
tensor's error, eager's and the bound.
"""

import argparse
import os
import signal
import sys
import time

import torch

PATTERNS = ["*vit*", "*deit*", "eva*", "beit*", "*siglip*", "*dinov*", "*clip*", "cait*", "xcit*", "pit*",
            "levit*", "twins*", "crossvit*", "volo*", "mvit*", "hiera*", "tnt*", "convit*", "sam*", "naflex*",
            "qwen*", "gemma*", "deepseek*"]


class _Timeout(Exception):
    pass


def _raise_timeout(*_):
    raise _Timeout


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _outputs(name: str, timm, images, train: bool, dtype=torch.float32, swap=None) -> tuple:
    """({"logits": ..., and with `train` every parameter's gradient}, the state_dict keys) of a
    fresh build (seed 0), swapped by `swap` when given."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).train(train).to(dtype)
    if swap is not None:
        model = swap(model)
    torch.manual_seed(1)
    with torch.set_grad_enabled(train):
        logits = model(images.to(dtype))
    outputs = {"logits": logits.detach()}
    if train:
        logits.float().pow(2).mean().backward()
        outputs.update((key, p.grad) for key, p in model.named_parameters() if p.grad is not None)
    return outputs, list(model.state_dict())


def _quick_threshold(key: str) -> float:
    return 1e-4 if key == "logits" else 1e-3


def compare(name: str, timm, images, got: dict, want: dict, train: bool) -> tuple:
    """(ok, words): `got` (swapped) against `want` (original), both float32; past the quick
    thresholds, by the numerics rule against a float64 build."""
    if set(got) != set(want):
        return False, f"gradients of {sorted(set(got) ^ set(want))[:3]} differ in presence"
    errors = {key: relative_difference(got[key], want[key]) for key in want}
    worst = max(errors, key=lambda key: errors[key] / _quick_threshold(key))
    words = f"{'train' if train else 'eval'} {errors['logits']:.1e}, worst {worst} {errors[worst]:.1e}"
    if all(error < _quick_threshold(key) for key, error in errors.items()):
        return True, words
    from vit_kernels.testing import check_rule

    oracle, _ = _outputs(name, timm, images, train, torch.float64)
    checks = [check_rule(key, got[key], oracle[key], want[key]) for key in want]
    check = max(checks, key=lambda c: (not c.ok, c.ratio))
    return check.ok, f"{words}; by the rule, worst {check}"


def check_model(name: str, timm, vit_kernels, images, train: bool) -> tuple:
    """(ok, words) for one model: eval, then with `train` a training step if the swap changed it."""
    summaries = []

    def swap(model):
        model, summary = vit_kernels.swap_modules(model)
        summaries.append(summary)
        return model

    want, keys = _outputs(name, timm, images, False)
    got, swapped_keys = _outputs(name, timm, images, False, swap=swap)
    ok, words = compare(name, timm, images, got, want, False)
    if keys != swapped_keys:
        ok, words = False, f"{words}; state_dict keys DIFFER"
    if ok and train and summaries[0].swapped:
        ok, train_words = compare(name, timm, images, _outputs(name, timm, images, True, swap=swap)[0],
                                  _outputs(name, timm, images, True)[0], True)
        words = f"{train_words} | {words}"
    return ok, f"{words} | {str(summaries[0]).splitlines()[0]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="*", default=PATTERNS)
    parser.add_argument("--log", default="swap_sweep_timm.log")
    parser.add_argument("--train", action="store_true", help="also a training step's gradients")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1 (the docstring says why)")
    import timm

    import vit_kernels

    torch.set_num_threads(1)
    done = set()
    if os.path.exists(args.log):
        with open(args.log) as log:
            done = {line.split()[0] for line in log if line.strip()}
    names = [n for n in sorted(set(timm.list_models(args.patterns))) if n not in done]
    signal.signal(signal.SIGALRM, _raise_timeout)
    failed = 0
    with open(args.log, "a") as log:
        for name in names:
            start = time.time()
            signal.alarm(args.timeout)
            try:
                with torch.device("meta"):
                    probe = timm.create_model(name, pretrained=False)
                n_params = sum(p.numel() for p in probe.parameters())
                if n_params > args.max_params:
                    line = f"{name} SKIP {n_params / 1e6:.0f}M parameters"
                else:
                    images = torch.randn(2, *probe.pretrained_cfg.get("input_size", (3, 224, 224)))
                    ok, words = check_model(name, timm, vit_kernels, images, args.train)
                    failed += not ok
                    line = f"{name} {'OK' if ok else 'DIFF'} {time.time() - start:.0f}s {words}"
            except _Timeout:
                line = f"{name} TIMEOUT after {args.timeout}s"
            except Exception as err:  # a model the swap breaks, or one timm cannot build here
                failed += 1
                line = f"{name} ERR {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            finally:
                signal.alarm(0)
            print(line, file=log, flush=True)
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
