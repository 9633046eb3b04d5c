"""A prepared dataset, as `python -m distgan.prepare` writes it and training reads it, and images held as one tensor.

A prepared dataset is a directory (local or s3://) of uint8 shards and one manifest:

    manifest.json                    count, shape [C, S, S], class names, every shard's name, count and sha256,
                                     the source's fingerprint, the options it was prepared with, distgan's version
    shard-<i>-<h>.images.npy         uint8 (n, C, S, S): the images, decoded, resized and centre-cropped once
    shard-<i>-<h>.labels.npy         int64 (n,): their class indices into the manifest's class names
    shard-<i>-<h>.json               the shard's record, written after its arrays (a re-run skips recorded shards)

<i> is the shard's position and <h> a hash of its inputs (files, sizes, times, options), so a re-run finds the
shards it has already written for the same inputs. The manifest is written last: a directory without one is
an unfinished preparation, never read by training.

Training holds a worker's images as one uint8 tensor (InMemoryImages) and normalises a whole batch at once
(distgan.sampler.TensorLoader); the embedded digits take the same path. The driver checks a prepared dataset by
its manifest and its shards' checksums (check_prepared), not by decoding anything.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from distgan import storage
from distgan.config import DataError

MANIFEST_FILE = "manifest.json"
FORMAT = 1  # the manifest's layout; a reader refuses another
# A worker holds a dataset of at most this many bytes in its own memory; a larger one is copied once into a local
# cache file and memory-mapped, so that the page cache holds one copy per node, shared by all its workers, and
# the OS pages it in and out as memory allows. 2 GiB a worker keeps 8 workers of a GPU node within 16 GiB; it is
# 175,000 images at 3x64x64. DISTGAN_PREPARED_MEMORY_BYTES overrides it (0: always memory-map).
MEMORY_BUDGET_BYTES = 2 * 2**30
MEMORY_BUDGET_ENV = "DISTGAN_PREPARED_MEMORY_BYTES"
# On a GPU the whole uint8 array moves to the device when it takes at most this share of the device's free memory
# at start-up, so batches are gathered there; what remains is for the models, activations and evaluation.
DEVICE_SHARE = 0.25
HASH_CHUNK = 8 * 2**20  # sha256 reads a shard in 8 MiB pieces: bounded memory, full speed


# ------------------------------------------------------------------ images as one tensor


def to_model_range(images_uint8: np.ndarray | torch.Tensor, image_size: int = 28) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float (N, C, S, S) in [-1, 1]."""
    x = torch.as_tensor(images_uint8)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.float().div_(127.5).sub_(1.0)
    if x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            antialias=True, align_corners=False).clamp_(-1, 1)
    return x




class InMemoryImages(Dataset):
    """Images as one uint8 tensor (N, C, S, S) and labels as int64 (N,); item i is (float (C, S, S) in [-1, 1],
    label). `batch(index)` gathers and normalises a whole batch in one operation (distgan.sampler.TensorLoader).

    `load` (optional) builds (images, labels) on first use, so a driver that only asks len() (the schedule
    check) reads nothing; `count` is then len() until it runs."""

    def __init__(self, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                 load: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None, count: Optional[int] = None):
        if (images is None) == (load is None):
            raise ValueError("InMemoryImages needs images and labels, or a load function")
        self._images, self._labels, self._load = images, labels, load
        self._count = len(images) if images is not None else count

    def _materialise(self) -> None:
        if self._images is None:
            self._images, self._labels = self._load()
            if self._images.dtype != torch.uint8 or self._images.dim() != 4:
                raise ValueError(f"expected uint8 images (N, C, S, S), got {self._images.dtype} "
                                 f"{tuple(self._images.shape)}")
            self._count = len(self._images)

    @property
    def images(self) -> torch.Tensor:
        self._materialise()
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        self._materialise()
        return self._labels

    def __len__(self) -> int:
        return self._count if self._images is None else len(self._images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_range(self.images[i:i + 1], self.images.shape[-1])[0], self.labels[i]

    def batch(self, index: torch.Tensor, images: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, C, S, S) in [-1, 1] and int64 (B,) labels of the images at `index` (int64 (B,)); `images`:
        the same uint8 tensor on another device (the gather and the normalisation run there)."""
        images = self.images if images is None else images
        return to_model_range(images[index.to(images.device)], images.shape[-1]), self.labels[index]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8 [0, 255], rounded: the inverse of to_model_range up to 8 bits."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def device_copy(images: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """`images` on `device` when that is a GPU with room for it (DEVICE_SHARE of its free memory), else None."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() * images.element_size() > DEVICE_SHARE * free:
        return None
    return images.to(device)


# ------------------------------------------------------------------ the manifest


def shard_files(name: str) -> tuple[str, str, str]:
    """(images, labels, record) file names of a shard."""
    return f"{name}.images.npy", f"{name}.labels.npy", f"{name}.json"


def fingerprint_of(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of what the images are: shape, class names and every shard's checksums, in order. Computed
    from the manifest alone; equal fingerprints mean the same images, labels and order."""
    content = {"shape": manifest["shape"], "classes": manifest["classes"],
               "shards": [[s["count"], s["sha256"]["images"], s["sha256"]["labels"]] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def is_prepared(root: str | os.PathLike) -> bool:
    """Whether `root` (a local path or URI) holds a manifest. Unreachable storage: False."""
    try:
        return storage.is_file(storage.join(root, MANIFEST_FILE))
    except (OSError, ValueError):
        return False


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the prepared dataset at `root`, its fingerprint checked. Raises DataError naming what is
    missing or malformed."""
    where = storage.join(root, MANIFEST_FILE)
    try:
        data = storage.read_bytes(where)
    except (OSError, ValueError) as e:
        raise DataError(f"--data-root: cannot read {where}: {storage.first_line(e)}") from None
    if data is None:
        raise DataError(f"--data-root: {root} is not a prepared dataset (no {MANIFEST_FILE}; an unfinished "
                        f"preparation has none: run python -m distgan.prepare again)")
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise DataError(f"--data-root: {where} has format {manifest.get('format')!r}; this distgan reads "
                            f"format {FORMAT}: prepare the dataset again")
        shape = manifest["shape"]
        if (len(shape) != 3 or shape[0] not in (1, 3) or shape[1] != shape[2]
                or sum(s["count"] for s in manifest["shards"]) != manifest["count"]):
            raise ValueError("shape or counts do not add up")
        if fingerprint_of(manifest) != manifest["fingerprint"]:
            raise ValueError("its fingerprint does not match its shards")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"--data-root: {where} is not a valid manifest ({storage.first_line(e, with_type=True)})"
                        ) from None
    return manifest


def _sha256(location: str) -> Optional[str]:
    """The hex sha256 of a file, read in pieces; None when it does not exist."""
    from pyarrow.fs import FileType

    fs, path = storage.open_location(location)
    if fs.get_file_info(path).type != FileType.File:
        return None
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shards(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Checks every shard file against the manifest's sha256 (threads: hashlib releases the GIL). Raises
    DataError naming every missing or changed file."""
    files = [(storage.join(root, name), shard["sha256"][kind])
             for shard in manifest["shards"]
             for kind, name in zip(("images", "labels"), shard_files(shard["name"])[:2])]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda f: _sha256(f[0]), files))
    missing = [where for (where, _), got in zip(files, digests) if got is None]
    changed = [where for (where, want), got in zip(files, digests) if got is not None and got != want]
    if missing or changed:
        parts = ([f"{len(missing)} missing: {', '.join(missing)}"] if missing else []) + \
                ([f"{len(changed)} corrupted (sha256 differs from {MANIFEST_FILE}): {', '.join(changed)}"]
                 if changed else [])
        raise DataError(f"--data-root: prepared dataset {root} has shards {'; '.join(parts)}; prepare it again")


def check_prepared(root: str | os.PathLike, image_size: int, channels: int) -> dict[str, Any]:
    """The driver's check, before any worker starts: the manifest, its shape against the run's --image-size and
    --channels, every shard's checksum. Reads no image. Returns the manifest; raises DataError."""
    manifest = read_manifest(root)
    c, s, _ = manifest["shape"]
    if s != image_size:
        raise DataError(f"--image-size: the prepared dataset {root} holds {s}x{s} images; train with --image-size "
                        f"{s}, or prepare it again at {image_size}", field="image_size")
    if c != channels:
        raise DataError(f"--channels: the prepared dataset {root} holds {c}-channel images; train with --channels "
                        f"{c}, or prepare it again with --channels {channels}", field="channels")
    verify_shards(root, manifest)
    return manifest


# ------------------------------------------------------------------ reading it on a worker


def memory_budget() -> int:
    value = os.environ.get(MEMORY_BUDGET_ENV)
    try:
        return int(value) if value else MEMORY_BUDGET_BYTES
    except ValueError:
        raise DataError(f"{MEMORY_BUDGET_ENV}={value!r} is not a number of bytes") from None


def _cache_dir() -> Path:
    from distgan.hardware import cache_dir

    return cache_dir() / "prepared"


def _read_npy(location: str) -> np.ndarray:
    """A shard's array: memory-mapped from a local file (read once, by the copy into its place), or downloaded."""
    if not storage.is_uri(location):
        return np.load(location, mmap_mode="r")
    return np.load(io.BytesIO(storage.read_bytes(location)))


def _fill(root: str, manifest: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Copies every shard's images into `images` (N, C, S, S), in order; returns the labels (N,)."""
    labels, at = np.empty(manifest["count"], np.int64), 0
    shape = tuple(manifest["shape"])
    for shard in manifest["shards"]:
        image_file, label_file, _ = shard_files(shard["name"])
        part, part_labels = _read_npy(storage.join(root, image_file)), _read_npy(storage.join(root, label_file))
        n = shard["count"]
        if part.dtype != np.uint8 or part.shape != (n, *shape) or part_labels.shape != (n,):
            raise DataError(f"--data-root: {storage.join(root, image_file)} holds {part.dtype} {part.shape}, not "
                            f"the manifest's uint8 {(n, *shape)}; prepare the dataset again")
        images[at:at + n] = part
        labels[at:at + n] = part_labels
        at += n
    return labels


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save given a name would append ".npy" to it
        np.save(fh, array)


def load_prepared(root: str, manifest: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, S, S) and int64 labels (N,) of a prepared dataset: in this process's memory up to
    memory_budget() bytes, else memory-mapped from a local cache file named by the manifest's fingerprint
    (written once per node, then reused)."""
    shape = (manifest["count"], *manifest["shape"])
    if int(np.prod(shape)) <= memory_budget():
        images = np.empty(shape, np.uint8)
        labels = _fill(root, manifest, images)
        return torch.from_numpy(images), torch.from_numpy(labels)
    cache = _cache_dir() / f"{manifest['fingerprint']}.npy"
    labels_cache = cache.with_suffix(".labels.npy")
    if not (cache.is_file() and labels_cache.is_file()):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        try:
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            labels = _fill(root, manifest, images)
            images.flush()
            del images
            storage.atomic_write(labels_cache, lambda path: _save_npy(path, labels))
            os.replace(tmp, cache)  # last: a cache file that exists is complete
        finally:
            tmp.unlink(missing_ok=True)
    # copy-on-write: a writable view (torch wants one) that never writes the file; pages are shared per node
    images = np.load(cache, mmap_mode="c")
    if images.shape != shape:
        raise DataError(f"cached images {cache} hold {images.shape}, not {shape}; delete the file")
    return torch.from_numpy(images), torch.from_numpy(np.load(labels_cache))


def prepared_dataset(root: str) -> InMemoryImages:
    """The training images of the prepared dataset at `root`, read on first use (len() reads only the manifest)."""
    manifest = read_manifest(root)
    # a partial, not a lambda: a dataset handed to spawned DataLoader workers travels by pickle
    dataset = InMemoryImages(load=functools.partial(load_prepared, root, manifest), count=manifest["count"])
    dataset.manifest = manifest
    dataset.classes = manifest["classes"]
    return dataset
