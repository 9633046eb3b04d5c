"""`python -m distgan.prepare`: a folder becomes uint8 shards and a manifest, local or in a bucket, with the pixels
training decodes; re-runs skip what is done; unreadable files are all named; bad flags are one line. The fast
tests run the shard tasks in this process (`in_process`), everything else as the command does; the slow ones
run Ray Data on a 2-node cluster, and train from a prepared dataset, killed and resumed, bitwise."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from distgan import prepare, prepared
from distgan.config import TrainConfig
from distgan.data import DataError, build_dataset, check_data_root, dataset_fingerprint
from distgan.prepared import MANIFEST_FILE, read_manifest

from conftest import REPO, assert_same_training_state, describe, use_s3
from support import run_module


def in_process(job, todo, verbose, progress):
    """run_shards without Ray: the same task, one shard after another."""
    records = []
    for row in todo:
        records.append(prepare.prepare_shard(row, job))
        progress(records[-1]["count"] + len(records[-1]["unreadable"]))
    return records, {"this process"}, 1.0


@pytest.fixture
def no_ray(monkeypatch):
    """The shard tasks in this process; starting Ray would fail the test."""
    import distgan.cluster

    monkeypatch.setattr(prepare, "run_shards", in_process)
    monkeypatch.setattr(prepare, "SHARD_IMAGES", 4)  # several shards from a few images
    monkeypatch.setattr(distgan.cluster, "connect_ray", lambda *a, **k: pytest.fail("Ray started"))


def make_folder(root, per_class=5, size=(40, 50), classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def run_prepare(capsys, *args):
    """(exit status, stdout lines, stderr lines) of the command run in this process."""
    try:
        code = prepare.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


# ------------------------------------------------------------------ what is written


def test_prepared_pixels_are_what_training_decodes_from_the_folder(tmp_path, no_ray, capsys):
    src = make_folder(tmp_path / "src", per_class=3)
    # the modes training converts: transparency, a palette, 16-bit grey
    rgba = np.random.default_rng(1).integers(0, 256, (30, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(src / "cat" / "rgba.png")
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "dog" / "palette.png")
    Image.fromarray((np.arange(900, dtype=np.uint16).reshape(30, 30) * 70)).save(src / "dog" / "grey16.png")
    for channels in (1, 3):
        dst = tmp_path / f"dst{channels}"
        code, out, err = run_prepare(capsys, "--data-root", src, "--image-size", 32, "--channels", channels,
                                     "--output", dst)
        assert code == 0, err
        assert out[-1] == (f"train on it: python -m distgan.train --dataset prepared --data-root {dst} "
                           f"--image-size 32 --channels {channels}")
        folder = build_dataset(TrainConfig(dataset="folder", data_root=str(src), image_size=32,
                                           channels=channels).validate())
        cfg = TrainConfig(dataset="prepared", data_root=str(dst), image_size=32, channels=channels).validate()
        check_data_root(cfg)
        ds = build_dataset(cfg)
        assert len(ds) == len(folder) == 9 and ds.classes == folder.classes == ["cat", "dog"]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (9, channels, 32, 32)
        assert torch.equal(pickle.loads(pickle.dumps(ds)).images, ds.images)  # as spawned loader workers get it
        for i in range(len(folder)):
            want, label = folder[i]
            got, got_label = ds[i]
            assert got_label == label
            # ToTensor + Normalize(0.5, 0.5) there, x / 127.5 - 1 here: the same uint8 pixels, float rounding apart
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_torchvision_dataset_is_prepared_from_its_training_split(tmp_path, no_ray, capsys):
    import struct

    raw = tmp_path / "src" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), rng.integers(0, 10, 9, dtype=np.uint8)
    for split in ("train", "t10k"):  # the IDX files torchvision reads: magic number, dimensions, bytes
        for name, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            with open(raw / f"{split}-{name}-ubyte", "wb") as fh:
                fh.write(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())
    dst = tmp_path / "dst"
    code, _, err = run_prepare(capsys, "--dataset", "mnist", "--data-root", tmp_path / "src", "--image-size", 32,
                               "--output", dst)
    assert code == 0, err
    want = build_dataset(TrainConfig(dataset="mnist", data_root=str(tmp_path / "src"), image_size=32).validate())
    got = build_dataset(TrainConfig(dataset="prepared", data_root=str(dst), image_size=32, channels=1).validate())
    assert len(got) == 9 and got.labels.tolist() == labels.tolist()
    for i in range(9):
        torch.testing.assert_close(got[i][0], want[i][0], atol=1e-6, rtol=0)


def test_the_manifest_records_shape_classes_checksums_source_and_version(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)[0] == 0
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    assert manifest["count"] == 10 and manifest["shape"] == [3, 28, 28] and manifest["classes"] == ["cat", "dog"]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    for shard in manifest["shards"]:
        data = (dst / f"{shard['name']}.images.npy").read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]["images"]
    cfg = TrainConfig(dataset="folder", data_root=str(src)).validate()
    assert manifest["source"] == {"dataset": "folder", "root": str(src), **dataset_fingerprint(cfg)}
    assert manifest["distgan_version"] and manifest["options"]["alpha_background"] == "white"
    # what checkpoints record: the manifest's fingerprint, read without the images; a folder holding a manifest
    # is read as the prepared dataset it is
    want = {"fingerprint": manifest["fingerprint"], "images": 10}
    assert dataset_fingerprint(TrainConfig(dataset="prepared", data_root=str(dst)).validate()) == want
    assert dataset_fingerprint(TrainConfig(dataset="folder", data_root=str(dst)).validate()) == want


# ------------------------------------------------------------------ re-runs


def test_a_second_run_on_an_unchanged_source_does_nothing_and_says_so(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)
    assert code == 0 and len(out) == 1 and out[0].startswith(f"{dst} is up to date with {src} (10 images")
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == before
    # other options are another dataset
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 32, "--output", dst)
    assert code == 0 and read_manifest(dst)["shape"] == [3, 32, 32]


def test_a_changed_source_is_prepared_again_where_it_changed_and_its_fingerprint_differs(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)[0] == 0
    old = read_manifest(dst)
    # dog/4.png is alone in the last shard: rewriting it changes that shard only
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(src / "dog" / "4.png")
    os.utime(src / "dog" / "4.png", ns=(1, 1))
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)
    assert code == 0 and out[0] == f"2 of 3 shards already prepared in {dst} for these files; preparing the other 1"
    new = read_manifest(dst)
    assert new["fingerprint"] != old["fingerprint"] and new["source"]["fingerprint"] != old["source"]["fingerprint"]
    assert new["shards"][:2] == old["shards"][:2] and new["shards"][2] != old["shards"][2]
    names = {p.name for p in dst.iterdir()}
    assert not any(old["shards"][2]["name"] in n for n in names), "the replaced shard's files are deleted"
    assert len(names) == 1 + 3 * 3
    # a run checkpointed on the old images is checked against the new fingerprint (distgan.runs.check_same_data)
    cfg = TrainConfig(dataset="prepared", data_root=str(dst)).validate()
    assert dataset_fingerprint(cfg)["fingerprint"] == new["fingerprint"]


def test_an_interrupted_run_goes_on_from_the_shards_it_finished(tmp_path, no_ray, capsys, monkeypatch):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"

    def interrupted(job, todo, verbose, progress):
        prepare.prepare_shard(todo[0], job)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "run_shards", interrupted)
    code, _, err = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)
    assert code == 130 and "the same command goes on from them" in err[-1]
    assert not (dst / MANIFEST_FILE).exists()
    monkeypatch.setattr(prepare, "run_shards", in_process)
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)
    assert code == 0 and out[0] == f"1 of 3 shards already prepared in {dst} for these files; preparing the other 2"
    assert read_manifest(dst)["count"] == 10


# ------------------------------------------------------------------ bad input


def test_every_unreadable_file_is_named_and_no_manifest_is_written(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    bad = [src / "cat" / "0.png", src / "cat" / "3.png", src / "dog" / "4.png"]  # in three shards
    for path in bad:
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    code, _, err = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)
    assert code == 1 and not (dst / MANIFEST_FILE).exists()
    named = [line for line in err if line.startswith("error: cannot read ")]
    assert len(named) == 3 and all(line.startswith(f"error: cannot read {p}: ") for line, p in zip(named, bad))
    assert err[-1].startswith("error: 3 of 10 source images could not be read (listed above); no manifest")
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst, "--skip-unreadable")
    left_out = [line for line in out if line.startswith("left out")]
    assert code == 0 and len(left_out) == 3
    assert all(line.startswith(f"left out (unreadable): {p}: ") for line, p in zip(left_out, bad))
    manifest = read_manifest(dst)
    assert manifest["count"] == 7 and len(manifest["unreadable"]) == 3
    assert len(build_dataset(TrainConfig(dataset="prepared", data_root=str(dst)).validate())) == 7


def test_bad_flags_and_sources_are_one_line_and_exit_2_before_ray(tmp_path, no_ray, capsys):
    src = make_folder(tmp_path / "src")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"")
    cases = [
        (["--data-root", tmp_path / "nope", "--image-size", 28, "--output", tmp_path / "d"],
         f"error: --data-root: {tmp_path / 'nope'} does not exist"),
        (["--data-root", src, "--image-size", 30, "--output", tmp_path / "d"],
         "error: argument --image-size: invalid choice: 30 (choose from 28, 32, 64)"),
        (["--data-root", src, "--image-size", 28, "--channels", 2, "--output", tmp_path / "d"],
         "error: argument --channels: invalid choice: 2 (choose from 1, 3)"),
        (["--data-root", src, "--image-size", 28, "--output", src / "prepared"],
         f"error: --output: {src / 'prepared'} is inside --data-root {src}; write the prepared dataset elsewhere"),
        (["--data-root", src, "--image-size", 28, "--output", tmp_path / "other"],
         f"error: --output: {tmp_path / 'other'} holds 1 entries distgan.prepare did not write (e.g. notes.txt); "
         f"give a new or empty directory, or a prepared dataset's"),
        (["--data-root", src, "--image-size", 28, "--output", "s3:/bucket/x"],
         "error: --output: 's3:/bucket/x' looks like a URI with a slash missing (s3://...), not a local path"),
        (["--data-root", src, "--image-size", 28, "--output", tmp_path / "d", "--alpha-background", "blurple"],
         "error: argument --alpha-background: 'blurple' is not a colour; give a name (white, black) or #rrggbb"),
        (["--data-root", tmp_path / "loose", "--image-size", 28, "--output", tmp_path / "d"],
         f"error: --data-root: folder not readable under {tmp_path / 'loose'}: Couldn't find any class folder in "
         f"{tmp_path / 'loose'}."),
        (["--image-size", 28, "--output", tmp_path / "d"], "error: the following arguments are required: --data-root"),
        (["--data-root", tmp_path / "done", "--image-size", 28, "--output", tmp_path / "d"],
         f"error: --data-root: {tmp_path / 'done'} is a prepared dataset already; train on it with --dataset prepared, "
         f"or give the image folder it was prepared from"),
    ]
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", tmp_path / "done")[0] == 0
    for args, want in cases:
        code, out, err = run_prepare(capsys, *args)
        assert (code, err) == (2, [want]), (args, err)
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ what training checks


def test_a_corrupted_or_missing_shard_is_refused_naming_it(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)[0] == 0
    cfg = TrainConfig(dataset="prepared", data_root=str(dst)).validate()
    shards = read_manifest(dst)["shards"]
    corrupt = dst / f"{shards[1]['name']}.images.npy"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 1
    corrupt.write_bytes(bytes(data))
    (dst / f"{shards[2]['name']}.labels.npy").unlink()
    with pytest.raises(DataError) as e:
        check_data_root(cfg)
    assert str(e.value) == (f"--data-root: prepared dataset {dst} has shards 1 missing: {dst}/{shards[2]['name']}"
                            f".labels.npy; 1 corrupted (sha256 differs from manifest.json): {corrupt}; prepare it "
                            f"again")
    # the driver refuses it in one line, exit 2, before any worker starts
    proc = subprocess.run([sys.executable, "-m", "distgan.local", "--dataset", "prepared", "--data-root", str(dst),
                           "--storage-path", str(tmp_path / "runs"), "--wandb-mode", "disabled"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [f"error: {e.value}"], describe(proc)


def test_a_prepared_dataset_of_another_shape_names_the_flag_to_change(tmp_path, no_ray, capsys):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 32, "--channels", 1, "--output", dst)[0] == 0
    with pytest.raises(DataError, match=r"^--image-size: the prepared dataset .* holds 32x32 images; train with "
                                        r"--image-size 32"):
        check_data_root(TrainConfig(dataset="prepared", data_root=str(dst), channels=1).validate())
    with pytest.raises(DataError, match=r"^--channels: the prepared dataset .* holds 1-channel images; train with "
                                        r"--channels 1"):
        check_data_root(TrainConfig(dataset="prepared", data_root=str(dst), image_size=32).validate())
    with pytest.raises(DataError, match=r"is not a prepared dataset \(no manifest.json"):
        check_data_root(TrainConfig(dataset="prepared", data_root=str(src)).validate())


def test_above_the_memory_budget_a_worker_memory_maps_one_cached_copy(tmp_path, no_ray, capsys, monkeypatch):
    src, dst = make_folder(tmp_path / "src"), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", dst)[0] == 0
    cfg = TrainConfig(dataset="prepared", data_root=str(dst)).validate()
    in_memory = build_dataset(cfg)
    monkeypatch.setenv(prepared.MEMORY_BUDGET_ENV, "0")
    monkeypatch.setenv("DISTGAN_CACHE_DIR", str(tmp_path / "cache"))
    mapped = build_dataset(cfg)
    assert torch.equal(mapped.images, in_memory.images) and torch.equal(mapped.labels, in_memory.labels)
    cached = tmp_path / "cache" / "prepared" / f"{read_manifest(dst)['fingerprint']}.npy"
    assert isinstance(np.load(cached, mmap_mode="r"), np.memmap)
    assert mapped.images.untyped_storage().data_ptr() != in_memory.images.untyped_storage().data_ptr()
    assert torch.equal(build_dataset(cfg).images, in_memory.images)  # the next worker reuses the cached copy


# ------------------------------------------------------------------ a bucket


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    return use_s3(monkeypatch, s3_endpoint, "prepared")


def test_a_prepared_dataset_round_trips_through_a_bucket(tmp_path, no_ray, capsys, bucket):
    src = make_folder(tmp_path / "src")
    uri = "s3://prepared/digits"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", tmp_path / "local")[0] == 0
    code, out, err = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", uri)
    assert code == 0, err
    assert out[-1] == f"train on it: python -m distgan.train --dataset prepared --data-root {uri} --image-size 28 " \
                      f"--channels 3"
    code, out, _ = run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", uri)
    assert code == 0 and out[0].startswith(f"{uri} is up to date")
    cfg = TrainConfig(dataset="prepared", data_root=uri).validate()
    assert cfg.data_root == uri
    check_data_root(cfg)
    local = build_dataset(TrainConfig(dataset="prepared", data_root=str(tmp_path / "local")).validate())
    remote = build_dataset(cfg)
    assert torch.equal(remote.images, local.images) and torch.equal(remote.labels, local.labels)
    assert read_manifest(uri)["fingerprint"] == read_manifest(tmp_path / "local")["fingerprint"]
    # a shard changed in the bucket is refused by name
    name = f"prepared/digits/{read_manifest(uri)['shards'][0]['name']}.labels.npy"
    with bucket.open_output_stream(name) as fh:
        fh.write(b"not the labels")
    with pytest.raises(DataError, match=f"1 corrupted .*: s3://{name}; prepare it again"):
        check_data_root(cfg)
    # other datasets are read from local directories only
    with pytest.raises(ValueError, match="only a prepared dataset"):
        TrainConfig(dataset="folder", data_root=uri).validate()


# ------------------------------------------------------------------ Ray Data, and training from it


@pytest.mark.slow
def test_preparation_runs_on_ray_data_across_two_nodes(tmp_path, no_ray, capsys):
    """The command on a cluster of two 1-CPU nodes (RAY_ADDRESS): the shards are spread over both and the result
    is the one preparing them in this process gives."""
    from ray.cluster_utils import Cluster

    src = make_folder(tmp_path / "src", per_class=12)
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--output", tmp_path / "here")[0] == 0
    # the head has no CPUs, so every task runs on a worker node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_AUTH_")}
        script = ("import sys; from distgan import prepare; prepare.SHARD_IMAGES = 4; "
                  "sys.exit(prepare.main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", script, "--data-root", str(src), "--image-size", "28",
                               "--output", str(tmp_path / "cluster")], env={**env, "RAY_ADDRESS": cluster.address},
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, describe(proc)
    assert "prepared 24 images (6 of 6 shards, on 2 nodes)" in proc.stdout, describe(proc)
    assert read_manifest(tmp_path / "cluster")["fingerprint"] == read_manifest(tmp_path / "here")["fingerprint"]


LOCAL_ARGS = ("--dataset", "prepared", "--image-size", 28, "--channels", 1, "--max-steps", 12, "--num-workers", 2,
              "--batch-size", 16, "--checkpoint-every-steps", 4, "--eval-every", 0, "--seed", 3,
              "--checkpoint-every-minutes", 0, "--wandb-mode", "disabled")


def local(*args, env=None):
    return run_module("distgan.local", *args, env=env)


@pytest.mark.slow
def test_training_from_a_prepared_dataset_killed_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path, no_ray,
                                                                                              capsys):
    src, dst = make_folder(tmp_path / "src", per_class=40, size=(28, 28)), tmp_path / "dst"
    assert run_prepare(capsys, "--data-root", src, "--image-size", 28, "--channels", 1, "--output", dst)[0] == 0
    runs = tmp_path / "runs"
    full = local(*LOCAL_ARGS, "--data-root", dst, "--storage-path", runs, "--name", "full")
    assert full.returncode == 0, describe(full)
    kill = {"DISTGAN_TEST_MARKER_DIR": str(tmp_path), "DISTGAN_TEST_KILL_AT_STEP": "7", "DISTGAN_TEST_KILL_RANK": "1"}
    killed = local(*LOCAL_ARGS, "--data-root", dst, "--storage-path", runs, "--name", "killed", env=kill)
    assert killed.returncode == 1, describe(killed)
    resumed = local(*LOCAL_ARGS, "--data-root", dst, "--storage-path", runs, "--name", "killed", env=kill)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, describe(resumed)
    from distgan.checkpoint import load_state

    got = load_state(runs / "killed" / "checkpoint_00000012_resume00000004")
    want = load_state(runs / "full" / "checkpoint_00000012")
    assert_same_training_state(got, want)
    assert got["data"] == want["data"] == {"fingerprint": read_manifest(dst)["fingerprint"], "images": 80}
