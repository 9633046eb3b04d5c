import numpy as np
import pytest
import torch
from PIL import Image

from distgan.config import TrainConfig
from distgan.data import DataError, build_dataset, check_data_root, mnist5k


def test_mnist5k_is_the_embedded_real_digits_split_per_class():
    train_x, train_y = mnist5k("train")
    test_x, test_y = mnist5k("test")
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    assert np.bincount(train_y).tolist() == [400] * 10 and np.bincount(test_y).tolist() == [100] * 10
    assert train_x.dtype == np.uint8 and train_x.max() == 255 and train_x.mean() > 20
    # the splits are disjoint
    train_keys = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train_keys for x in test_x)


@pytest.mark.parametrize("size", [28, 32])
def test_mnist5k_dataset_is_scaled_to_minus_one_one(size):
    ds = build_dataset(TrainConfig(image_size=size).validate(), "train")
    x, y = ds[0]
    assert x.shape == (1, size, size) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9


def _write_idx(path, array, magic):
    import struct

    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.tobytes())


def test_torchvision_mnist_loader_reads_real_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images, 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels, 2049)
    cfg = TrainConfig(dataset="mnist", data_root=str(tmp_path)).validate()
    check_data_root(cfg)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 7
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == labels[3]
    assert torch.allclose(x, torch.from_numpy(images[3]).float() / 127.5 - 1, atol=1e-5)


def test_cifar10_and_folder_loaders_resize_and_keep_three_channels(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            arr = np.random.default_rng(i).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), image_size=32).validate()
    check_data_root(cfg)
    ds = build_dataset(cfg)
    x, y = ds[0]
    assert len(ds) == 4 and x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1


def test_missing_and_empty_roots_are_errors_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        check_data_root(TrainConfig(dataset="mnist", data_root=str(tmp_path / "nope")).validate())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        check_data_root(TrainConfig(dataset="cifar10", data_root=str(tmp_path / "empty")).validate())
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "README").write_text("not mnist")
    with pytest.raises(DataError, match="mnist not readable"):
        check_data_root(TrainConfig(dataset="mnist", data_root=str(tmp_path / "wrong")).validate())


def test_a_malformed_image_in_a_folder_dataset_is_reported_by_path(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 7).save(tmp_path / "a" / "ok.png")
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png"):
        check_data_root(TrainConfig(dataset="folder", data_root=str(tmp_path)).validate())


def _save(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8) + 9).save(path)


def test_a_folder_without_readable_images_says_how_many_were_found_where_and_no_download_hint(tmp_path):
    for cls in ("cats", "dogs", "birds"):
        _save(tmp_path / cls / "a.gif")  # PIL opens GIFs, torchvision's ImageFolder does not read them
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path)).validate()
    with pytest.raises(DataError) as e:
        check_data_root(cfg)
    msg = str(e.value)
    assert msg.startswith(f"--data-root: found 0 images in {tmp_path}'s 3 class subfolders (looked for .jpg")
    assert "a.gif" in msg and "--download" not in msg and "\n" not in msg
    with pytest.raises(DataError) as e:  # the worker-side loader's error carries no download hint either
        build_dataset(cfg)
    assert "--download" not in str(e.value) and "\n" not in str(e.value)


def test_a_class_folder_without_images_is_named(tmp_path):
    _save(tmp_path / "cats" / "a.png")
    _save(tmp_path / "dogs" / "b.JPG")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"found 2 images in 2 of 3 class subfolders of .*; 1 hold none \(empty\)"):
        check_data_root(TrainConfig(dataset="folder", data_root=str(tmp_path)).validate())


def test_images_without_class_folders_are_counted(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    with pytest.raises(DataError, match=f"found 2 images directly in {tmp_path} and no class subfolders"):
        check_data_root(TrainConfig(dataset="folder", data_root=str(tmp_path)).validate())


def test_the_folder_check_counts_what_image_folder_reads(tmp_path):
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from distgan.data import IMAGE_SUFFIXES, verify_image_folder

    assert set(IMAGE_SUFFIXES) == set(IMG_EXTENSIONS)
    _save(tmp_path / "a" / "x.png")
    _save(tmp_path / "a" / "deep" / "y.webp")
    _save(tmp_path / "b" / "z.jpeg")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path)).validate()
    assert verify_image_folder(tmp_path) == len(build_dataset(cfg)) == 3


def test_the_download_hint_is_only_for_datasets_that_can_be_downloaded(tmp_path):
    with pytest.raises(DataError, match="pass --download"):
        check_data_root(TrainConfig(dataset="cifar10", data_root=str(tmp_path / "nope")).validate())
    with pytest.raises(DataError) as e:
        check_data_root(TrainConfig(dataset="folder", data_root=str(tmp_path / "nope")).validate())
    assert "--download" not in str(e.value)


# ------------------------------------------------------------------ image folders made by someone else


def test_a_16_bit_grayscale_folder_trains_as_its_values_scaled_to_8_bits(tmp_path):
    """A smooth 16-bit ramp stays a smooth ramp: v * 255 / 65535, not Pillow's convert("L"), which clips."""
    ramp = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(ramp).save(tmp_path / cls / "ramp.png")
        Image.fromarray(ramp).save(tmp_path / cls / "ramp.tif")
    assert Image.open(tmp_path / "a" / "ramp.png").mode == "I;16"
    want = torch.from_numpy(((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.float32)) / 127.5 - 1
    for channels in (1, 3):
        cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), channels=channels).validate()
        check_data_root(cfg)
        ds = build_dataset(cfg)
        for i in range(len(ds)):
            x, _ = ds[i]
            assert x.shape == (channels, 28, 28)
            assert torch.allclose(x, want.expand(channels, 28, 28), atol=1e-6)
        assert len(torch.unique(x)) > 200  # of 256 levels; a clipped or binarised ramp has a handful


def test_a_32_bit_float_image_is_refused_naming_the_file_and_its_mode(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "a" / "f.tif")
    proc_msg = pytest.raises(DataError, match=r"image .*f\.tif has mode F \(32-bit float samples\)")
    with proc_msg:
        check_data_root(TrainConfig(dataset="folder", data_root=str(tmp_path)).validate())


def test_an_oversized_image_is_reported_by_path_and_the_driver_exits_2(tmp_path, capsys):
    """A PNG whose header declares 20000 x 20000 pixels: Pillow refuses it as a decompression bomb."""
    import struct
    import zlib

    from distgan.train import main

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    bomb = tmp_path / "a" / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    assert main(["--dataset", "folder", "--data-root", str(tmp_path), "--storage-path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --data-root: cannot read image {bomb}: DecompressionBombError: ")
    assert "\n" not in err


def test_every_dataset_distgan_builds_loads_in_spawn_and_forkserver_workers(tmp_path):
    """DataLoader workers started by spawn or forkserver get the dataset by pickle (transforms included)."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "folder" / cls / "x.png")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", np.full((3, 28, 28), 50, np.uint8), 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(3, dtype=np.uint8), 2049)
    datasets = [Subset(build_dataset(TrainConfig().validate()), range(2)),
                build_dataset(TrainConfig(dataset="mnist", data_root=str(tmp_path)).validate()),
                build_dataset(TrainConfig(dataset="folder", data_root=str(tmp_path / "folder")).validate()),
                build_dataset(TrainConfig(dataset="folder", data_root=str(tmp_path / "folder"), channels=1).validate())]
    everything = ConcatDataset(datasets)
    want = [everything[i][0] for i in range(len(everything))]
    for method in ("spawn", "forkserver"):
        loader = DataLoader(everything, batch_size=None, num_workers=1, multiprocessing_context=method)
        got = [x for x, _ in loader]
        assert len(got) == len(want) == 9
        assert all(torch.equal(a, b) for a, b in zip(got, want)), method


# ------------------------------------------------------------------ transparency: what the image shows


def _transparent_images(tmp_path):
    """One file per Pillow form of transparency; each hides red (or grey 200) under alpha 0 in its left half
    and shows opaque blue (or grey 50) in its right half."""
    hidden, shown = (255, 0, 0), (0, 0, 255)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = hidden + (0,)
    rgba[:, 4:] = shown + (255,)
    la = np.zeros((8, 8, 2), np.uint8)
    la[:, :4], la[:, 4:] = (200, 0), (50, 255)
    files = {"rgba.png": Image.fromarray(rgba, "RGBA"), "la.png": Image.fromarray(la, "LA")}
    pal = Image.fromarray(rgba, "RGBA").convert("P")  # a palette with per-entry alpha (tRNS)
    files["p.png"] = pal
    key = Image.fromarray(rgba[..., :3], "RGB")
    files["rgb_key.png"] = key  # written with a tRNS colour key: the hidden red is transparent
    for name, im in files.items():
        kwargs = {"transparency": hidden} if name == "rgb_key.png" else {}
        im.save(tmp_path / name, **kwargs)
    return files


@pytest.mark.parametrize("background, expected", [("white", 255), ("black", 0)])
def test_transparent_pixels_show_the_background_not_the_colour_they_hide(tmp_path, background, expected):
    from distgan.data import load_image

    for name in _transparent_images(tmp_path):
        with Image.open(tmp_path / name) as raw:
            assert raw.mode in ("RGBA", "LA", "P", "RGB") and (raw.mode != "RGB" or "transparency" in raw.info)
        im = load_image(tmp_path / name, background=background)
        px = np.asarray(im.convert("RGB"))
        assert "A" not in im.mode and "transparency" not in im.info, name
        assert (px[:, :4] == expected).all(), (name, px[0, 0])  # the background, never the hidden red/grey
        assert (px[:, 4:] == px[0, 4]).all() and tuple(px[0, 4]) in ((0, 0, 255), (50, 50, 50)), name


def test_folder_dataset_composites_transparency_over_alpha_background(tmp_path):
    (tmp_path / "a").mkdir()
    _transparent_images(tmp_path / "a")
    for background, corner in (("white", [1.0, 1.0, 1.0]), ("#000000", [-1.0, -1.0, -1.0])):
        cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), alpha_background=background).validate()
        check_data_root(cfg)
        for x, _ in build_dataset(cfg):
            assert x[:, 0, 0].tolist() == corner  # was [1, -1, -1]: the red a transparent pixel stored


def test_alpha_background_must_name_a_colour():
    from distgan.config import ConfigError

    with pytest.raises(ConfigError, match="--alpha-background: 'whiteish' is not a colour"):
        TrainConfig(alpha_background="whiteish").validate()


# ------------------------------------------------------------------ fingerprints: what a run trains on


def test_folder_fingerprint_changes_with_any_file_and_only_then(tmp_path):
    import os

    from distgan.data import dataset_fingerprint

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path)).validate()
    first = dataset_fingerprint(cfg)
    assert first["images"] == 6 and first == dataset_fingerprint(cfg)
    (tmp_path / "a" / "notes.txt").write_text("still not an image")  # what the workers never read
    assert dataset_fingerprint(cfg) == first
    seen = {first["fingerprint"]}
    for change in (lambda: os.utime(tmp_path / "a" / "0.png", ns=(1, 1)),                      # touched
                   lambda: (tmp_path / "b" / "2.png").rename(tmp_path / "b" / "9.png"),         # renamed
                   lambda: (tmp_path / "b" / "1.png").unlink()):                                # removed
        change()
        now = dataset_fingerprint(cfg)
        assert now["fingerprint"] not in seen
        seen.add(now["fingerprint"])
    assert now["images"] == 5


def test_embedded_digits_fingerprint_is_fixed_and_differs_from_a_folders(tmp_path):
    from distgan.data import dataset_fingerprint

    cfg = TrainConfig().validate()
    fp = dataset_fingerprint(cfg)
    assert fp == dataset_fingerprint(cfg) and fp["images"] == 4000 and len(fp["fingerprint"]) == 64
