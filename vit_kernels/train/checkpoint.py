"""Checkpoints: safetensors for the tensors, JSON for the config and the progress.

A checkpoint is a folder:
  model.safetensors        the model's state_dict (full, unsharded; its own keys, so
                           `model.load_state_dict(safetensors.torch.load_file(...))` loads it)
  optimizer.safetensors    AdamW's state per parameter, keyed "<parameter name>/<state name>"
  rng-rank<r>.safetensors  each rank's torch RNG states (drop path and dropout continue exactly)
  config.json              the run's arguments
  state.json               step, epoch, optimizer param_groups, GradScaler state, history

It is written into a sibling folder first and renamed into place, so a run killed while
saving leaves the previous checkpoint whole. Under DDP or FSDP2 every rank takes part in
gathering the full state dicts; rank 0 writes them (the folder must be on a file system all
ranks see).
"""

import json
import os
import shutil
from typing import Any, Dict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _rng_state() -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(directory: str, model, optimizer, config: Dict[str, Any], state: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    rank = _rank()
    model_state = get_model_state_dict(model, options=_FULL)  # collective under DDP/FSDP
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    staging = directory.rstrip("/") + ".saving"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    save_file({k: v.detach().contiguous() for k, v in _rng_state().items()}, os.path.join(staging, _rng_file(rank)))
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in model_state.items()}, os.path.join(staging, MODEL_FILE))
        flat = {f"{name}/{key}": value.detach().contiguous()
                for name, per_param in optimizer_state["state"].items() for key, value in per_param.items()}
        save_file(flat, os.path.join(staging, OPTIMIZER_FILE))
        state = {**state, "param_groups": optimizer_state["param_groups"]}
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
    _barrier()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    _barrier()


def read_config(directory: str) -> Dict[str, Any]:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        return json.load(f)


def load(directory: str, model, optimizer) -> Dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; return state.json's content."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    set_model_state_dict(model, load_file(os.path.join(directory, MODEL_FILE)), options=_FULL)
    per_param: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in load_file(os.path.join(directory, OPTIMIZER_FILE)).items():
        name, _, entry = key.rpartition("/")
        per_param.setdefault(name, {})[entry] = value
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": state.pop("param_groups")},
                             options=_FULL)
    rng_path = os.path.join(directory, _rng_file(_rank()))
    if os.path.exists(rng_path):
        rng = load_file(rng_path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
