"""The training loop: model, optimizer, schedule, steps, evaluation, checkpoints, throughput.

One `TrainJob` per run. The recipe is the usual ViT one (DeiT/timm): AdamW without weight
decay on norms, biases, position embeddings and the class token; linear warmup then cosine
to zero, set per optimizer step from the step count (so a resumed run needs no scheduler
state); label smoothing; drop path; gradient clipping; bf16/fp16 autocast (GradScaler for
fp16); optional activation checkpointing. `--fused` builds the reference ViT with
fused=True (or applies `swap_modules` to a timm model); `--eager` leaves everything eager.
`--cuda-graph` replays each step from one CUDA graph (`vit_kernels.capture_train_step`): the
learning rate is then a device tensor the schedule fills in place, and with fp16 the AdamW is
fused (GradScaler hands it its found-inf flag on the device, so the scaled step is captured
whole); several processes and activation checkpointing (it saves RNG state on the host) are
refused with it.
`--compile` runs the model through torch.compile.
"""

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from . import data as data_lib

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMM_PREFIX = "timm:"


class ConfigError(ValueError):
    """An argument combination that cannot run (the CLI turns it into exit code 2)."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(on_cuda: bool) -> Distributed:
    """torchrun's environment: init the process group (NCCL when training on GPUs, gloo on CPU,
    also on a machine that has GPUs but was told ``--device cpu``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def model_kwargs(config: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """Arguments both our create_model and timm's take (timm's VisionTransformer names)."""
    kwargs = {"num_classes": num_classes, "img_size": config["img_size"], "drop_path_rate": config["drop_path"]}
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        if config.get(name) is not None:
            kwargs[name] = config[name]
    return kwargs


def build_model(config: Dict[str, Any], num_classes: int, fused: bool) -> nn.Module:
    """Our reference ViT by name, or ``timm:<name>`` (or a name only timm knows) with swap_modules."""
    from ..models import MODEL_CONFIGS, create_model

    name = config["model"]
    kwargs = model_kwargs(config, num_classes)
    if name in MODEL_CONFIGS:
        patch = kwargs.get("patch_size", MODEL_CONFIGS[name]["patch_size"])
        if config["img_size"] % patch:
            raise ConfigError(f"--img-size {config['img_size']} is not a multiple of the patch size {patch}")
        model = create_model(name, fused=fused, **kwargs)
    else:
        try:
            import timm
        except ImportError:
            raise ConfigError(f"unknown model {name!r}: not a reference ViT ({', '.join(sorted(MODEL_CONFIGS))}) "
                              "and timm is not installed") from None
        timm_name = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
        if not timm.is_model(timm_name):
            raise ConfigError(f"unknown model {name!r}: neither a reference ViT "
                              f"({', '.join(sorted(MODEL_CONFIGS))}) nor a timm model")
        try:
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        except (AssertionError, TypeError, ValueError) as error:
            raise ConfigError(f"timm cannot build {timm_name!r} with {kwargs}: {error}") from None
        if fused:
            from ..swap import swap_modules

            model, _ = swap_modules(model)
    if config["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    return model


def enable_uint8_input(model, mean, std) -> bool:
    """Have the model normalize uint8 images inside its patch-embedding op, where it can: our
    reference ViT (fused or eager) and a timm ViT whose patch embedding swap_modules swapped."""
    if callable(getattr(model, "set_input_normalization", None)):
        model.set_input_normalization(mean, std)
        return True
    from ..swap.timm_vit import TimmPatchEmbed

    if isinstance(getattr(model, "patch_embed", None), TimmPatchEmbed):
        from ..swap import set_input_normalization

        set_input_normalization(model, mean, std)
        return True
    return False


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on norms, biases, layer scales, position embeddings and the class token."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token", "reg_token"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 1/warmup to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fsdp_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why this torch's FSDP2 cannot shard on `device`, or None. torch 2.6's runs on GPUs only:
    its all-gather records an event on a CPU stream, which that release's CPU streams lack."""
    if device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
        return (f"--distributed fsdp: torch {torch.__version__}'s FSDP2 does not run on the CPU (its CPU "
                "streams cannot record events); use --distributed ddp there, or a newer torch")
    return None


def wrap_distributed(model: nn.Module, mode: str, dist_info: Distributed, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per block, then the root)."""
    if dist_info.world_size <= 1 or mode == "none":
        return model
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    reason = fsdp_unsupported_reason(device)
    if reason:
        raise ConfigError(reason)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.6-2.7 keep it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


@dataclass
class EpochResult:
    losses: List[float] = field(default_factory=list)
    train_accuracy: float = 0.0
    images_per_second: float = 0.0
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")


class TrainJob:
    """Everything one run holds. ``config`` is the CLI's arguments as a dict."""

    def __init__(self, config: Dict[str, Any], images: data_lib.ImageData, dist_info: Distributed,
                 device: torch.device, *, fused: bool, model_dtype: torch.dtype = torch.float32):
        self.config, self.images, self.dist, self.device = config, images, dist_info, device
        self.model_dtype = model_dtype
        torch.manual_seed(config["seed"])  # the same initial weights on every rank (FSDP2 does not broadcast)
        base = build_model(config, images.num_classes, fused).to(device=device, dtype=model_dtype)
        torch.manual_seed(config["seed"] + dist_info.rank)  # drop path and dropout masks differ per rank
        self.uint8_input = enable_uint8_input(base, images.mean, images.std)
        self.mean = torch.tensor(images.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(images.std, device=device).view(1, -1, 1, 1)
        self.base_model = base
        self.model = wrap_distributed(base, config["distributed"], dist_info, device)
        if config.get("compile"):
            self.model = torch.compile(self.model)
        self.autocast_dtype = AUTOCAST_DTYPES[config["precision"]]
        self.graphed = bool(config.get("cuda_graph"))
        if self.graphed:
            refused = {"several processes (the gradient all-reduce is not in the graph)": dist_info.world_size > 1,
                       "--grad-checkpointing (it saves the RNG state on the host)": config["grad_checkpointing"]}
            for what, applies in refused.items():
                if applies:
                    raise ConfigError(f"--cuda-graph cannot be used with {what}")
        on_cuda = device.type == "cuda"
        # Captured with fp16, GradScaler's step must stay on the device: only a fused optimizer
        # takes its found-inf flag there (vit_kernels.cuda_graph).
        fused = self.graphed and self.autocast_dtype is torch.float16
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config["weight_decay"]), lr=config["lr"],
                                           betas=(0.9, 0.999), capturable=self.graphed and on_cuda,
                                           fused=True if fused else None)
        self._graph_step = None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
        self.steps_per_epoch = data_lib.steps_per_epoch(len(images.train), config["batch_size"], dist_info.world_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size {config['batch_size']} x {dist_info.world_size} process(es) is larger "
                              f"than the training set ({len(images.train)} images)")
        self.total_steps = self.steps_per_epoch * config["epochs"]
        self.warmup_steps = min(config["warmup_steps"], self.total_steps)
        self.step = 0
        self.history: Dict[str, list] = {"train_loss": [], "test_loss": [], "test_accuracy": [],
                                         "images_per_second": []}

    # ---- one step ------------------------------------------------------------------------------

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.uint8_input:
            return images
        # Eager timm models take float images: normalize here (one elementwise pass).
        return ((images.float() / 255.0 - self.mean) / self.std).to(self.model_dtype)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(self._inputs(images))

    def _set_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if not (self.graphed and self.device.type == "cuda"):
                group["lr"] = value
            elif isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)  # read by the graph; no host sync
            else:  # before the capture (also after a resume, whose state holds a float)
                group["lr"] = torch.tensor(value, dtype=torch.float32, device=self.device)

    def _loss_and_hits(self, logits: torch.Tensor, labels: torch.Tensor):
        return self.criterion(logits.float(), labels), (logits.argmax(dim=-1) == labels).sum()

    def _graphed_train_step(self, images: torch.Tensor, labels: torch.Tensor):
        from ..cuda_graph import capture_train_step

        inputs, labels = self._inputs(images), labels.to(self.device, non_blocking=True)
        if self._graph_step is None:
            self._graph_step = capture_train_step(self.model, self.optimizer, self._loss_and_hits, inputs, labels,
                                                  autocast_dtype=self.autocast_dtype,
                                                  max_grad_norm=self.config["clip_grad"] or None,
                                                  grad_scaler=self.scaler)
        loss, hits = self._graph_step(inputs, labels)
        self.step += 1
        return loss, hits

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        self._set_lr(self.config["lr"] * lr_factor(self.step, self.warmup_steps, self.total_steps))
        if self.graphed:
            return self._graphed_train_step(images, labels)
        labels = labels.to(self.device, non_blocking=True)
        logits = self._forward(images)
        loss = self.criterion(logits.float(), labels)
        self.scaler.scale(loss).backward()
        if self.config["clip_grad"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach(), (logits.detach().argmax(dim=-1) == labels).sum()

    # ---- epochs --------------------------------------------------------------------------------

    def _batches(self, dataset, epoch: int, train: bool):
        return data_lib.epoch_batches(len(dataset), self.config["batch_size"], epoch=epoch, seed=self.config["seed"],
                                      shuffle=train, drop_last=train, rank=self.dist.rank,
                                      world_size=self.dist.world_size)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, epoch: int, stop_at_step: Optional[int] = None) -> EpochResult:
        self.model.train()
        skip = self.step - epoch * self.steps_per_epoch  # > 0 when resuming inside this epoch
        batches = self._batches(self.images.train, epoch, train=True)[skip:self.steps_per_epoch]
        if stop_at_step is not None:
            batches = batches[:max(0, stop_at_step - self.step)]
        progress = _progress(len(batches), f"epoch {epoch + 1}/{self.config['epochs']}",
                             enabled=self.config["progress"] and self.dist.is_main, initial=skip,
                             total=self.steps_per_epoch)
        losses, correct, seen = [], torch.zeros((), dtype=torch.int64, device=self.device), 0
        timed_images, start = 0, None
        warm = min(2, len(batches) - 1)  # the first steps compile kernels: not timed
        for i, (images, labels) in enumerate(data_lib.iterate(self.images.train, batches, self.config["workers"],
                                                             self.device.type == "cuda")):
            if i == warm:
                self._sync()
                start = time.perf_counter()
            loss, hits = self.train_step(images, labels)
            losses.append(loss)
            correct += hits
            seen += len(labels)
            if i >= warm:
                timed_images += len(labels) * self.dist.world_size
            if progress is not None and ((i + 1) % self.config["log_every"] == 0 or i + 1 == len(batches)):
                self._sync()
                elapsed = time.perf_counter() - start if start is not None else 0.0
                progress.set_postfix(loss=f"{loss.item():.4f}", acc=f"{correct.item() / seen:.3f}",
                                     img_s=f"{timed_images / elapsed:.0f}" if elapsed > 0 else "-")
            if progress is not None:
                progress.update(1)
        self._sync()
        result = EpochResult()
        if start is not None and timed_images:
            result.images_per_second = timed_images / (time.perf_counter() - start)
        if progress is not None:
            progress.close()
        if losses:
            # Rank-averaged loss per step: what one process with the global batch would see.
            result.losses = (self._all_reduce(torch.stack(losses).float()) / self.dist.world_size).tolist()
            counts = self._all_reduce(torch.stack([correct, torch.tensor(seen, device=self.device)]))
            result.train_accuracy = counts[0].item() / max(1, counts[1].item())
        return result

    @torch.no_grad()
    def evaluate(self) -> tuple:
        """(mean loss, accuracy) over the whole test split, summed across ranks."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        batches = self._batches(self.images.test, 0, train=False)
        for images, labels in data_lib.iterate(self.images.test, batches, self.config["workers"], False):
            labels = labels.to(self.device)
            logits = self._forward(images).float()
            totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                   (logits.argmax(-1) == labels).sum().double(),
                                   torch.tensor(float(len(labels)), dtype=torch.float64, device=self.device)])
        totals = self._all_reduce(totals)
        count = max(1.0, totals[2].item())
        return totals[0].item() / count, totals[1].item() / count

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        state = {"step": self.step, "scaler": self.scaler.state_dict(), "history": self.history}
        checkpoint.save(directory, self.model, self.optimizer, self.config, state)

    def resume(self, directory: str) -> None:
        state = checkpoint.load(directory, self.model, self.optimizer)
        self.step = state["step"]
        self.history = state["history"]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _progress(count: int, description: str, *, enabled: bool, initial: int, total: int):
    if not enabled or count == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True, leave=True)


def log(dist_info: Distributed, message: str) -> None:
    if dist_info.is_main:
        print(message, flush=True)


def run(config: Dict[str, Any], images: data_lib.ImageData, dist_info: Distributed, device: torch.device,
        *, model_dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """Train (resuming if asked), evaluate each epoch, checkpoint each epoch; return the history."""
    job = TrainJob(config, images, dist_info, device, fused=config["fused"], model_dtype=model_dtype)
    last = os.path.join(config["output"], "last")
    if config["resume"]:
        job.resume(config["resume"])
        log(dist_info, f"resumed from {config['resume']} at step {job.step}")
    log(dist_info, f"data: {images.description}; model: {config['model']} "
                   f"({'fused' if config['fused'] else 'eager'}, {sum(p.numel() for p in job.base_model.parameters()):,} "
                   f"parameters); {dist_info.world_size} process(es) on {device}; precision {config['precision']}")
    stop_at = config["stop_after"]
    for epoch in range(job.step // job.steps_per_epoch, config["epochs"]):
        result = job.train_epoch(epoch, stop_at_step=stop_at)
        job.history["train_loss"] += result.losses
        epoch_done = job.step == (epoch + 1) * job.steps_per_epoch
        if epoch_done:
            result.test_loss, result.test_accuracy = job.evaluate()
            job.history["test_loss"].append(result.test_loss)
            job.history["test_accuracy"].append(result.test_accuracy)
            job.history["images_per_second"].append(result.images_per_second)
            log(dist_info, f"epoch {epoch + 1}/{config['epochs']}: train loss "
                           f"{sum(result.losses) / max(1, len(result.losses)):.4f} acc {result.train_accuracy:.3f}; "
                           f"test loss {result.test_loss:.4f} acc {result.test_accuracy:.3f}; "
                           f"{result.images_per_second:.1f} images/s")
        if config["save"]:
            job.save(last)
        if stop_at is not None and job.step >= stop_at:
            hint = f"; resume with --resume {last}" if config["save"] else ""
            log(dist_info, f"stopped after step {job.step} (--stop-after){hint}")
            break
    summary = {"step": job.step, "history": job.history,
               "test_accuracy": job.history["test_accuracy"][-1] if job.history["test_accuracy"] else None}
    if dist_info.is_main and config["save"]:
        import json

        with open(os.path.join(config["output"], "history.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def compare_throughput(config: Dict[str, Any], images: data_lib.ImageData, dist_info: Distributed,
                       device: torch.device, steps: int) -> Dict[str, float]:
    """Training images/s of the eager model, the fused one and (on CUDA, one process) the fused
    one replayed from a CUDA graph, on the same batches and weights, in this one process."""
    measured = {}
    variants = [("eager", False, False), ("fused", True, False)]
    if device.type == "cuda" and dist_info.world_size == 1 and config["precision"] != "fp16":
        variants.append(("fused + graph", True, True))
    else:
        log(dist_info, "fused + graph: not measured (needs one process on CUDA, not fp16)")
    for name, fused, graphed in variants:
        job = TrainJob({**config, "fused": fused, "cuda_graph": graphed}, images, dist_info, device, fused=fused)
        batches = job._batches(images.train, 0, train=True)
        batches = (batches * (2 * steps // max(1, len(batches)) + 1))[:2 * steps]
        loader = list(data_lib.iterate(images.train, batches, config["workers"], device.type == "cuda"))
        for images_, labels in loader[:steps]:  # warm-up: kernel compilation, autotuning, allocator
            job.train_step(images_, labels)
        job._sync()
        start = time.perf_counter()
        for images_, labels in loader[steps:]:
            job.train_step(images_, labels)
        job._sync()
        rate = steps * config["batch_size"] * dist_info.world_size / (time.perf_counter() - start)
        measured[name] = rate
        log(dist_info, f"{name}: {rate:.1f} images/s")
        del job
    measured["ratio"] = measured["fused"] / measured["eager"]
    log(dist_info, f"fused / eager throughput: {measured['ratio']:.2f}x ({steps} timed steps after {steps} warm-up, "
                   f"batch {config['batch_size']}, {config['precision']}, {device})")
    if "fused + graph" in measured:
        measured["graph_ratio"] = measured["fused + graph"] / measured["eager"]
        log(dist_info, f"fused + graph / eager throughput: {measured['graph_ratio']:.2f}x")
    return measured
