"""What the swap tests share: perturbed weights and the by-the-rule check of a whole swap."""

import copy

import torch

import vit_kernels
from vit_kernels.testing import assert_rules, kernel_device, output_and_grads

DEVICE = kernel_device()


def perturbed(model):
    """`model` on the test device with every parameter nudged (the inits leave unit norms and zero biases)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(DEVICE)


def check_swap_by_rule(original, run, train=False):
    """Swap `original`; its outputs and every gradient by the rule against the unswapped model
    (eager) and a float64 copy; state_dict keys and values unchanged. ``run(model, dtype)``
    gives the output to compare. Returns (model, summary)."""
    original.train(train)
    oracle_model = copy.deepcopy(original).double()
    state = {k: v.clone() for k, v in original.state_dict().items()}
    eager = output_and_grads(original, lambda m: run(m, torch.float32))
    oracle = output_and_grads(oracle_model, lambda m: run(m, torch.float64))
    model, summary = vit_kernels.swap_modules(original)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert_rules(output_and_grads(model, lambda m: run(m, torch.float32)), oracle, eager)
    return model, summary
