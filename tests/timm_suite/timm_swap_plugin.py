"""A pytest plug-in for timm's own tests/test_models.py: keep the ViT-family models named in
`--vit-kernels-models` and, with `--vit-kernels-swap`, run each through `vit_kernels.swap_modules`
right after `create_model`, as a user would. tests/test_timm_model_suite.py runs timm's file with and
without the swap and compares the failures.

Loaded with ``-p timm_swap_plugin`` (this folder on PYTHONPATH).
"""

import functools

import pytest

SWAPS = {"models": 0, "modules": 0}


def pytest_addoption(parser):
    parser.addoption("--vit-kernels-models", default="", help="comma-separated timm model names to keep")
    parser.addoption("--vit-kernels-swap", action="store_true", help="swap_modules after every create_model")


def _swapping(create_model):
    @functools.wraps(create_model)
    def create_and_swap(*args, **kwargs):
        import vit_kernels

        model = create_model(*args, **kwargs)
        model, summary = vit_kernels.swap_modules(model)
        SWAPS["models"] += 1
        SWAPS["modules"] += len(summary.swapped)
        return model

    return create_and_swap


def pytest_collection_modifyitems(session, config, items):
    models = {name for name in config.getoption("--vit-kernels-models").split(",") if name}
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        (keep if name in models else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
    if not config.getoption("--vit-kernels-swap"):
        return
    for module in {item.module for item in keep}:
        if hasattr(module, "create_model") and not hasattr(module.create_model, "__wrapped__"):
            module.create_model = _swapping(module.create_model)


@pytest.hookimpl(tryfirst=True)
def pytest_report_header(config):
    swap = "after swap_modules" if config.getoption("--vit-kernels-swap") else "unswapped"
    return f"vit_kernels timm suite: models {config.getoption('--vit-kernels-models')}, {swap}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("--vit-kernels-swap"):
        terminalreporter.write_line(f"vit_kernels: swap_modules ran on {SWAPS['models']} models, "
                                    f"swapped {SWAPS['modules']} modules")
