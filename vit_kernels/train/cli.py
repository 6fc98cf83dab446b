"""``python -m vit_kernels.train``: argument parsing and the exit codes.

Bad arguments (a missing or empty folder, an unknown model, a batch size of 0, ...) end with
a one-line message and exit code 2, like argparse's own errors; never a traceback.
"""

import argparse
import os
import sys
from typing import List, Optional

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit_kernels.train",
        description="Train a ViT with vit_kernels' fused kernels (or eager, to compare). "
                    "Multi-GPU: torchrun --nproc_per_node N -m vit_kernels.train ... [--distributed fsdp].")
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default="vit_tiny_patch16_224",
                      help="a reference ViT name (vit_kernels.models.MODEL_CONFIGS), or timm:<name> / a name only "
                           "timm knows (built with pretrained=False, then swap_modules)")
    what.add_argument("--data", default="digits",
                      help="'digits' (scikit-learn's bundled digits, upsampled; the default), 'synthetic', or an "
                           "image folder: <dir>/<class>/<image>, or <dir>/train/<class>/... with <dir>/val")
    what.add_argument("--img-size", type=_positive_int, default=None,
                      help="image side in pixels (default: 32 for digits, 224 otherwise)")
    what.add_argument("--patch-size", type=_positive_int, default=None,
                      help="override the model's patch size (default for digits: 4)")
    what.add_argument("--embed-dim", type=_positive_int, default=None, help="override the model's width")
    what.add_argument("--depth", type=_positive_int, default=None, help="override the model's depth")
    what.add_argument("--num-heads", type=_positive_int, default=None, help="override the model's head count")
    what.add_argument("--num-classes", type=_positive_int, default=None, help="classes for --data synthetic (1000)")
    what.add_argument("--synthetic-images", type=_positive_int, default=2048, help="images for --data synthetic")
    what.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="data loader processes for an image folder")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--fused", dest="fused", action="store_true", default=True,
                      help="vit_kernels' fused modules (the default)")
    kind.add_argument("--eager", dest="fused", action="store_false", help="plain PyTorch modules, to compare")
    kind.add_argument("--compare", action="store_true",
                      help="time --compare-steps training steps eager, fused and (on CUDA) fused in a CUDA graph, "
                           "and print the throughput ratios (no training run)")
    parser.add_argument("--compare-steps", type=_positive_int, default=20)
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=_positive_int, default=10)
    recipe.add_argument("--batch-size", type=_positive_int, default=64, help="per process")
    recipe.add_argument("--lr", type=_non_negative_float, default=1e-3, help="peak learning rate")
    recipe.add_argument("--weight-decay", type=_non_negative_float, default=0.05)
    recipe.add_argument("--warmup-steps", type=int, default=50)
    recipe.add_argument("--label-smoothing", type=_probability, default=0.1)
    recipe.add_argument("--drop-path", type=_probability, default=0.1, help="stochastic depth rate (last block)")
    recipe.add_argument("--clip-grad", type=_non_negative_float, default=1.0, help="max gradient norm; 0 = off")
    recipe.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on CPU); fp16 uses a GradScaler")
    recipe.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    recipe.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--cuda-graph", action="store_true",
                     help="capture each training step in one CUDA graph (vit_kernels.capture_train_step) and "
                          "replay it; on the CPU the step runs eagerly")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--distributed", choices=("ddp", "fsdp", "none"), default="ddp",
                     help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard per block)")
    run.add_argument("--output", default="runs/vit_kernels_train", help="checkpoints and history.json go here")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT", help="a checkpoint folder (<output>/last)")
    run.add_argument("--no-save", dest="save", action="store_false", help="write no checkpoint")
    run.add_argument("--stop-after", type=_positive_int, default=None, metavar="STEPS",
                     help="stop (and checkpoint) after this many optimizer steps; the schedule still spans --epochs")
    run.add_argument("--log-every", type=_positive_int, default=10, help="progress bar refresh, in steps")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return parser


_MODEL_KEYS = ("model", "data", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "fused")


def parse_config(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser()
    config = vars(parser.parse_args(argv))
    if config["data"] == "digits":
        # 8x8 digits upsampled to 32 pixels: 4-pixel patches give an 8x8 grid (16-pixel ones, 2x2).
        config["img_size"] = config["img_size"] or 32
        config["patch_size"] = config["patch_size"] or 4
    config["img_size"] = config["img_size"] or 224
    if config["device"] is None:
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if config["precision"] is None:
        config["precision"] = "bf16" if config["device"].startswith("cuda") else "fp32"
    if config["warmup_steps"] < 0:
        parser.error("--warmup-steps must be >= 0")
    if config["workers"] < 0:
        parser.error("--workers must be >= 0")
    if config["resume"] is not None:
        from .checkpoint import CONFIG_FILE, read_config

        if not os.path.isfile(os.path.join(config["resume"], CONFIG_FILE)):
            parser.error(f"--resume {config['resume']!r}: not a checkpoint folder (no {CONFIG_FILE})")
        saved = read_config(config["resume"])
        changed = [key for key in _MODEL_KEYS if saved.get(key) != config[key]]
        if changed:
            parser.error(f"--resume: the checkpoint was trained with other {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
    return config


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_config(argv)
    parser_error = build_parser().error
    from . import data as data_lib
    from .job import ConfigError, compare_throughput, run, setup_distributed

    dist_info = setup_distributed(config["device"].startswith("cuda"))
    device = torch.device(config["device"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_info.local_rank)
    try:
        images = data_lib.load(config["data"], config["img_size"], num_classes=config["num_classes"],
                               synthetic_images=config["synthetic_images"], seed=config["seed"])
        if config["save"] and dist_info.is_main:
            os.makedirs(config["output"], exist_ok=True)
        if config["compare"]:
            compare_throughput(config, images, dist_info, device, config["compare_steps"])
        else:
            run(config, images, dist_info, device)
    except (data_lib.DataError, ConfigError) as error:
        parser_error(str(error))  # exit code 2
    finally:
        if dist_info.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
