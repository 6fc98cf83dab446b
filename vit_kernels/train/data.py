"""Training data as uint8 image batches: scikit-learn's digits (the default: real images that
need no download), an image folder (one subfolder per class, decoded with PIL), or synthetic.

Images stay uint8 ``[B, C, H, W]`` up to the model: the reference ViT normalizes them inside
its patch-embedding op (a quarter of float32's bytes cross to the GPU). Batches come from a
per-epoch permutation seeded by (seed, epoch), so a resumed run sees the same batches, and
each rank of a distributed run takes its slice of every global batch, so N ranks with batch
b see what one process with batch N*b sees.
"""

import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The data the user pointed at cannot be used (the CLI turns it into exit code 2)."""


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory: uint8 ``[N, C, H, W]`` and int64 labels ``[N]``."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class FolderImages(torch.utils.data.Dataset):
    """Image files decoded with PIL: RGB, shorter side resized to img_size, center crop."""

    def __init__(self, samples: Sequence[Tuple[str, int]], img_size: int):
        self.samples, self.img_size = list(samples), img_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image  # checked by image_folder

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = self.img_size / min(image.size)
            size = (max(self.img_size, round(image.size[0] * scale)), max(self.img_size, round(image.size[1] * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - self.img_size) // 2, (size[1] - self.img_size) // 2
            image = image.crop((left, top, left + self.img_size, top + self.img_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(self.img_size, self.img_size, 3).permute(2, 0, 1).contiguous(), label


@dataclass
class ImageData:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    mean: Tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: Tuple[float, ...]
    description: str


def _channel_stats(images: Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    scaled = images.double() / 255.0
    return tuple(scaled.mean(dim=(0, 2, 3)).tolist()), tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def digits(img_size: int, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 1797 8x8 handwritten digits, upsampled (bilinear) to img_size, as 3 channels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn: pip install 'vit_kernels[train]'") from None

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (pixels * 255.0).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # a fixed split
    num_test = int(len(labels) * test_fraction)
    test, train = order[:num_test], order[num_test:]
    mean, std = _channel_stats(images[train])
    return ImageData(TensorImages(images[train], labels[train]), TensorImages(images[test], labels[test]), 10,
                     mean, std, f"digits ({len(train)} train / {len(test)} test, upsampled to {img_size}px)")


def synthetic(img_size: int, num_classes: int, num_images: int, seed: int = 0) -> ImageData:
    """Random uint8 images and labels, for throughput runs (accuracy means nothing here)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    num_test = max(1, num_images // 10)
    return ImageData(TensorImages(images[num_test:], labels[num_test:]), TensorImages(images[:num_test], labels[:num_test]),
                     num_classes, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), f"synthetic ({num_images} images, {img_size}px)")


def _class_folders(root: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def _images_in(folder: str) -> List[str]:
    found = []
    for directory, _, files in os.walk(folder):
        found += [os.path.join(directory, name) for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def image_folder(root: str, img_size: int, val_fraction: float = 0.1, seed: int = 0) -> ImageData:
    """``root/<class>/*.jpg``; or ``root/train/<class>/...`` with ``root/val`` (or ``root/test``) beside it.

    Without a val/test folder, val_fraction of each class is held out (a fixed, seeded choice).
    Normalization uses ImageNet's mean and std.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("an image folder needs Pillow: pip install 'vit_kernels[train]'") from None
    held_out = next((name for name in ("val", "test") if os.path.isdir(os.path.join(root, name))), None)
    train_root = os.path.join(root, "train") if held_out and os.path.isdir(os.path.join(root, "train")) else root
    classes = _class_folders(train_root)
    if not classes:
        raise DataError(f"data folder {train_root!r} has no class subfolders (expected {train_root}/<class>/<image>)")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        files = _images_in(os.path.join(train_root, name))
        if train_root != root:
            train += [(path, label) for path in files]
            test += [(path, label) for path in _images_in(os.path.join(root, held_out, name))]
            continue
        order = torch.randperm(len(files), generator=generator).tolist()
        num_test = int(math.floor(len(files) * val_fraction))
        test += [(files[i], label) for i in order[:num_test]]
        train += [(files[i], label) for i in order[num_test:]]
    if not train:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {train_root!r}'s class folders")
    return ImageData(FolderImages(train, img_size), FolderImages(test, img_size), len(classes),
                     IMAGENET_MEAN, IMAGENET_STD,
                     f"{root} ({len(classes)} classes, {len(train)} train / {len(test)} test, {img_size}px)")


def epoch_batches(num_items: int, batch_size: int, *, epoch: int, seed: int, shuffle: bool, drop_last: bool,
                  rank: int = 0, world_size: int = 1) -> List[List[int]]:
    """This rank's index lists for one epoch: global batches of batch_size * world_size from a
    permutation seeded by (seed, epoch), each sliced by rank. Empty slices are dropped."""
    if shuffle:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    else:
        order = list(range(num_items))
    global_batch = batch_size * world_size
    stop = num_items - num_items % global_batch if drop_last else num_items
    batches = []
    for start in range(0, stop, global_batch):
        chunk = order[start:start + global_batch][rank * batch_size:(rank + 1) * batch_size]
        if chunk:
            batches.append(chunk)
    return batches


def iterate(dataset, batches: List[List[int]], workers: int, pin_memory: bool) -> Iterator[Tuple[Tensor, Tensor]]:
    """(images uint8 [B, C, H, W], labels int64 [B]) per index list; files decode in worker processes."""
    if isinstance(dataset, TensorImages):
        for indices in batches:
            index = torch.as_tensor(indices)
            yield dataset.images[index], dataset.labels[index]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory)
    yield from loader


def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    return num_items // (batch_size * world_size)


def load(data: str, img_size: int, *, num_classes: Optional[int], synthetic_images: int, seed: int) -> ImageData:
    """``data`` is "digits", "synthetic" or a folder path."""
    if data == "digits":
        return digits(img_size)
    if data == "synthetic":
        return synthetic(img_size, num_classes or 1000, synthetic_images, seed)
    return image_folder(data, img_size, seed=seed)
