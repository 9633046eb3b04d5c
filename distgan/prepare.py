"""`python -m distgan.prepare --data-root SRC --image-size S [--channels C] --output DST`: a prepared dataset.

Decodes every image of SRC once, the way training decodes it (distgan.data.load_image: 16-bit, transparency,
palettes; then the training transform's grayscale or RGB conversion, resize and centre crop to S), and writes
the results as uint8 shards with their labels and a manifest to DST, a local directory or s3://
(distgan.prepared describes the layout). Training reads them with `--dataset prepared --data-root DST`.

SRC is an image folder (class subfolders as labels) or, with --dataset, a torchvision dataset's root (its
training split). The work runs on Ray Data: one task per shard reads, decodes and writes its images, on every
CPU of this machine or of the cluster that RAY_ADDRESS names (there, SRC must be at the same path on every
node, e.g. NFS, and DST on shared storage or s3://).

A re-run is cheap: an unchanged source whose manifest is complete does nothing, and an interrupted or failed
run keeps the shards it finished (each shard's name holds a hash of its inputs). Every unreadable file is named,
and then no manifest is written, unless --skip-unreadable leaves them out (the manifest lists them). Bad flags
and sources are one line and exit 2 before Ray starts; unreadable files exit 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from distgan import storage
from distgan.config import DOWNLOADABLE, IMAGE_SIZES, ConfigError, TrainConfig
from distgan.prepared import FORMAT, MANIFEST_FILE, fingerprint_of, shard_files

SOURCES = ("folder", *DOWNLOADABLE)
# Images per shard: one Ray Data task decodes a shard (about a second of work for 64x64 PNGs), so a few thousand
# images make enough tasks to keep every CPU busy to the end, and a changed file re-prepares one shard, not all.
SHARD_IMAGES = 1024
# What distgan.prepare writes in DST (a re-run deletes those the new manifest does not name, and refuses a
# directory holding anything else): shard files, their temporaries (storage.atomic_write) and the manifest.
_OURS = re.compile(r"^\.?(shard-\d{5}-[0-9a-f]{16}\.(images\.npy|labels\.npy|json)|manifest\.json)(\.tmp-\d+)?$")


class PrepareError(ConfigError):
    """A bad flag or source, found before Ray starts: one line, exit 2."""


@dataclass(frozen=True)
class Job:
    """What every shard task needs: where the images come from and go, and how they are decoded."""

    dataset: str  # SOURCES
    root: str  # the source, absolute
    output: str  # local path or URI
    image_size: int
    channels: int
    alpha_background: str
    skip_unreadable: bool

    def options(self) -> dict[str, Any]:
        """What the pixels depend on besides the source (recorded in the manifest)."""
        return {"image_size": self.image_size, "channels": self.channels, "alpha_background": self.alpha_background}

    def train_config(self, download: bool = False) -> TrainConfig:
        return TrainConfig(dataset=self.dataset, data_root=self.root, image_size=self.image_size,
                           channels=self.channels, alpha_background=self.alpha_background, download=download)


# ------------------------------------------------------------------ the source


@functools.lru_cache(maxsize=1)
def _reader(job: Job) -> Callable[[Any], Any]:
    """key -> the PIL image training would decode for it, before its transform: a folder's relative path through
    load_image, a torchvision dataset's index through the dataset itself. One per process (a task's worker)."""
    from distgan.data import load_image

    if job.dataset == "folder":
        root = Path(job.root)
        return lambda key: load_image(root / key, background=job.alpha_background)
    source = _torchvision(job, download=False)
    return lambda key: source[key][0]


def _torchvision(job: Job, download: bool):
    """The torchvision dataset of `job`, without a transform (its items are PIL images)."""
    from torchvision import datasets

    from distgan.data import DataError

    kind = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
    try:
        return kind[job.dataset](job.root, train=True, download=download)
    except (RuntimeError, OSError) as e:
        hint = "" if download else " (pass --download to fetch it, if this machine is online)"
        raise DataError(f"--data-root: {job.dataset} not readable under {job.root}: {storage.first_line(e)}{hint}"
                        ) from None


def list_source(job: Job, download: bool = False) -> tuple[list[str], list[list], dict[str, Any]]:
    """(class names, [key, label] of every image in training's order, the source's fingerprint record), without
    decoding: a folder's keys are relative paths, a torchvision dataset's are indices. Raises DataError naming
    the source."""
    from distgan.data import DataError, build_dataset, dataset_fingerprint
    from distgan.prepared import is_prepared

    if job.dataset == "folder":
        root = Path(job.root)
        if not root.is_dir():
            raise DataError(f"--data-root: {root} {'is not a directory' if root.exists() else 'does not exist'}")
        if is_prepared(root):
            raise DataError(f"--data-root: {root} is a prepared dataset already; train on it with --dataset "
                            f"prepared, or give the image folder it was prepared from")
        cfg = job.train_config()
        dataset = build_dataset(cfg)  # torchvision's ImageFolder: the files and labels training reads, in order
        items = [[Path(path).relative_to(root).as_posix(), label] for path, label in dataset.samples]
    else:
        cfg = job.train_config(download)
        dataset = _torchvision(job, download)
        items = [[i, int(label)] for i, label in enumerate(dataset.targets)]
    return list(dataset.classes), items, {"dataset": job.dataset, "root": job.root,
                                          **dataset_fingerprint(cfg, dataset)}


def plan_shards(job: Job, items: list[list], source: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards, SHARD_IMAGES items each, in order: {"index", "name", "items"}. A shard's name holds a hash of
    its inputs: its items and, for a folder, their sizes and times (a torchvision release: the source's
    fingerprint), and the options; the same inputs give the same name, so a re-run finds what it wrote."""
    shards = []
    for index, start in enumerate(range(0, len(items), SHARD_IMAGES)):
        chunk = items[start:start + SHARD_IMAGES]
        if job.dataset == "folder":
            root = Path(job.root)
            inputs = [[key, label, *_size_and_time(root / key)] for key, label in chunk]
        else:
            inputs = [source["fingerprint"], chunk]
        digest = hashlib.sha256(json.dumps([FORMAT, job.dataset, job.options(), inputs]).encode()).hexdigest()
        shards.append({"index": index, "name": f"shard-{index:05d}-{digest[:16]}", "items": json.dumps(chunk)})
    return shards


def _size_and_time(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------ one shard (a Ray Data task)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def prepare_shard(row: dict[str, Any], job: Job) -> dict[str, Any]:
    """Decodes a shard's images ({"index", "name", "items"} of plan_shards), writes its images, labels and (when
    complete, or with --skip-unreadable) its record to job.output, and returns the record. A file that cannot be
    decoded is named in the record's "unreadable" ("<key>: <error>"), never raised."""
    from distgan.data import image_transform

    read, transform = _reader(job), image_transform(job.image_size, job.channels)
    items = json.loads(row["items"])
    images = np.empty((len(items), job.channels, job.image_size, job.image_size), np.uint8)
    labels, unreadable = [], []
    for key, label in items:
        try:
            pixels = np.asarray(transform(read(key)), dtype=np.uint8)
        except Exception as e:  # whatever a decoder raises; every file is named, not the first
            unreadable.append(f"{key}: {storage.first_line(e, with_type=True)}")
            continue
        images[len(labels)] = pixels.reshape(job.image_size, job.image_size, -1).transpose(2, 0, 1)
        labels.append(label)
    images = images[:len(labels)]
    image_file, label_file, record_file = shard_files(row["name"])
    image_bytes, label_bytes = _npy_bytes(images), _npy_bytes(np.asarray(labels, dtype=np.int64))
    record = {"name": row["name"], "index": row["index"], "count": len(labels), "unreadable": unreadable,
              "sha256": {"images": hashlib.sha256(image_bytes).hexdigest(),
                         "labels": hashlib.sha256(label_bytes).hexdigest()}}
    storage.write_bytes(storage.join(job.output, image_file), image_bytes)
    storage.write_bytes(storage.join(job.output, label_file), label_bytes)
    if not unreadable or job.skip_unreadable:  # last: a record means its arrays are complete
        storage.write_bytes(storage.join(job.output, record_file), json.dumps(record).encode())
    return record


def _shard_task(row: dict[str, Any], job: Job) -> dict[str, Any]:
    """prepare_shard as a Ray Data row: {"record": JSON (one string column, whatever the record holds), "node"}."""
    import ray

    return {"record": json.dumps(prepare_shard(row, job)), "node": ray.get_runtime_context().get_node_id()}


# ------------------------------------------------------------------ the output directory


def _output_names(output: str) -> list[str]:
    """The names in DST (none when it does not exist). Raises PrepareError when it cannot be read or holds files
    distgan.prepare did not write."""
    try:
        names = [info.base_name for info in storage.entries(output)]
    except (OSError, ValueError) as e:
        raise PrepareError(f"--output: cannot read {output} ({storage.first_line(e)})") from None
    foreign = sorted(n for n in names if not _OURS.match(n))
    if foreign:
        raise PrepareError(f"--output: {output} holds {len(foreign)} entries distgan.prepare did not write (e.g. "
                           f"{foreign[0]}); give a new or empty directory, or a prepared dataset's")
    return names


def _read_json(location: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(storage.read_bytes(location) or b"null")
    except (OSError, ValueError):
        return None


def finished_shards(job: Job, shards: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> record of the shards an earlier run finished for the same inputs (record and arrays present)."""
    done = [s["name"] for s in shards if all(f in names for f in shard_files(s["name"]))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:  # an object store: one GET a record
        records = pool.map(lambda name: _read_json(storage.join(job.output, shard_files(name)[2])), done)
    return {name: rec for name, rec in zip(done, records)
            if rec and rec.get("name") == name and (not rec["unreadable"] or job.skip_unreadable)}


def build_manifest(job: Job, classes: list[str], source: dict[str, Any], records: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    manifest = {
        "format": FORMAT, "count": sum(r["count"] for r in records),
        "shape": [job.channels, job.image_size, job.image_size], "dtype": "uint8", "classes": classes,
        "shards": [{"name": r["name"], "count": r["count"], "sha256": r["sha256"]} for r in records],
        "source": source, "options": job.options(),
        "unreadable": [f for r in records for f in r["unreadable"]],
        "distgan_version": importlib.metadata.version("distgan"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["fingerprint"] = fingerprint_of(manifest)
    return manifest


def up_to_date(job: Job, source: dict[str, Any], names: list[str]) -> Optional[dict[str, Any]]:
    """The manifest in DST when it was prepared from this very source with these options, else None."""
    if MANIFEST_FILE not in names:
        return None
    manifest = _read_json(storage.join(job.output, MANIFEST_FILE))
    if (not manifest or manifest.get("format") != FORMAT or manifest.get("options") != job.options()
            or manifest.get("source") != source or (manifest.get("unreadable") and not job.skip_unreadable)):
        return None
    return manifest


# ------------------------------------------------------------------ the command


def _colour(text: str) -> str:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a colour; give a name (white, black) or #rrggbb") from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")  # one line naming the flag, not the usage block


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m distgan.prepare", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the source: an image folder (class subfolders), or a "
                                                      "torchvision dataset's root with --dataset")
    p.add_argument("--output", required=True, help="the prepared dataset's directory: a local path or s3://...")
    p.add_argument("--image-size", type=int, required=True, choices=IMAGE_SIZES,
                   help="square side the images are resized and centre-cropped to, as training does")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB) (default: 3 for folder and cifar10, else 1, as training's)")
    p.add_argument("--dataset", choices=SOURCES, default="folder", help="what --data-root holds (default: folder)")
    p.add_argument("--download", action="store_true", help=f"let torchvision download {'/'.join(DOWNLOADABLE)}")
    p.add_argument("--alpha-background", type=_colour, default=TrainConfig.alpha_background,
                   help="colour transparent pixels are composited over, as training's flag (default: "
                        f"{TrainConfig.alpha_background})")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out files that cannot be decoded (the manifest lists them) instead of failing")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Ray Data's own output")
    return p


def make_job(args: argparse.Namespace) -> Job:
    """The job of parsed flags; raises PrepareError for a DST that is not a location or not writable, or inside
    SRC."""
    root = Path(args.data_root).expanduser().resolve()
    output = args.output
    problem = storage.location_problem(output)
    if problem:
        raise PrepareError(f"--output: {output!r} {problem}")
    if not storage.is_uri(output):
        output = str(Path(output).expanduser().resolve())
        problem = storage.directory_problem(Path(output))
        if problem:
            raise PrepareError(f"--output: {problem}")
        if Path(output) == root or root in Path(output).parents:
            raise PrepareError(f"--output: {output} is inside --data-root {root}; write the prepared dataset "
                               f"elsewhere")
    channels = TrainConfig(dataset=args.dataset, channels=args.channels).image_channels
    return Job(dataset=args.dataset, root=str(root), output=output, image_size=args.image_size, channels=channels,
               alpha_background=args.alpha_background, skip_unreadable=args.skip_unreadable)


def _configure_ray_data(verbose: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Ray Data keeps part of the cluster's CPUs for each operator's downstream ones (half of them, on 2 CPUs one
    # task at a time); this pipeline has one operator, which may use them all
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = False  # one bar: this command's, in images
    ctx.print_on_execution_start = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def run_shards(job: Job, todo: list[dict[str, Any]], verbose: bool, progress: Callable[[int], None]
               ) -> tuple[list[dict[str, Any]], set[str], float]:
    """Joins RAY_ADDRESS or starts Ray on this machine, and prepares `todo` on Ray Data; returns (their records,
    the Ray nodes that ran them, seconds from Ray's start to the last record). `progress(n)` as each shard's n
    images are done."""
    import ray.data

    from distgan import cluster

    cluster.connect_ray(TrainConfig(verbose=verbose))
    try:
        t0 = time.perf_counter()
        _configure_ray_data(verbose)
        # one block, so one task, per shard: Ray Data runs as many at once as the cluster has CPUs
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map(functools.partial(_shard_task, job=job))
        records, nodes = [], set()
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            records.append(record)
            nodes.add(row["node"])
            progress(record["count"] + len(record["unreadable"]))
        return records, nodes, time.perf_counter() - t0
    finally:
        cluster.disconnect_ray()


def run(args: argparse.Namespace, out=print) -> int:
    """The command, from parsed flags to the manifest; returns the exit status. Raises PrepareError (a
    DataError of the source is one too: both are ConfigErrors) before Ray starts."""
    from distgan import cluster, worker

    job = make_job(args)
    try:
        cluster.check_ray_address()
    except cluster.LaunchError as e:
        raise PrepareError(str(e)) from None
    t0 = time.perf_counter()
    classes, items, source = list_source(job, download=args.download)
    names = _output_names(job.output)
    done = up_to_date(job, source, names)
    if done is not None:
        out(f"{job.output} is up to date with {job.root} ({done['count']} images, source unchanged since "
            f"{done['created']}); nothing to do")
        return 0
    shards = plan_shards(job, items, source)
    finished = finished_shards(job, shards, names)
    todo = [s for s in shards if s["name"] not in finished]
    if finished:
        out(f"{len(finished)} of {len(shards)} shards already prepared in {job.output} for these files; "
            f"preparing the other {len(todo)}")
    if MANIFEST_FILE in names:  # from here on the old manifest would describe shards that are being replaced
        storage.delete(storage.join(job.output, MANIFEST_FILE))
    nodes: set[str] = set()
    records = list(finished.values())
    if todo:
        from tqdm import tqdm

        pending = sum(len(json.loads(s["items"])) for s in todo)
        try:
            with tqdm(total=pending, desc="prepare", unit="img", mininterval=worker.progress_every_s()) as bar:
                new, nodes, seconds = run_shards(job, todo, args.verbose, bar.update)
        except Exception as e:  # a task's failure (storage, memory): Ray wraps it; its cause is what happened
            cause = getattr(e, "cause", None) or e
            print(f"error: preparation failed: {storage.first_line(cause, with_type=True)}; the shards already "
                  f"prepared are kept: the same command goes on from them", file=sys.stderr)
            return 1
        records += new
        rate = pending / max(seconds, 1e-9)
    records.sort(key=lambda r: r["index"])
    unreadable = [f"{job.root}/{f}" for r in records for f in r["unreadable"]]
    if unreadable and not job.skip_unreadable:
        for line in unreadable:
            print(f"error: cannot read {line}", file=sys.stderr)
        print(f"error: {len(unreadable)} of {len(items)} source images could not be read (listed above); no "
              f"manifest was written. Fix or remove them and run the same command again (the shards already "
              f"prepared are kept), or pass --skip-unreadable to leave them out", file=sys.stderr)
        return 1
    manifest = build_manifest(job, classes, source, records)
    storage.write_bytes(storage.join(job.output, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
    keep = {MANIFEST_FILE, *(f for s in manifest["shards"] for f in shard_files(s["name"]))}
    for name in _output_names(job.output):
        if name not in keep:  # shards of an earlier source, temporaries of an interrupted run
            storage.delete(storage.join(job.output, name))
    if todo:
        out(f"prepared {len(items) - len(unreadable)} images ({len(todo)} of {len(shards)} shards, on "
            f"{len(nodes)} node{'s' * (len(nodes) != 1)}) in {time.perf_counter() - t0:.1f} s: {rate:.0f} "
            f"images/s once Ray was up")
    for line in unreadable:
        out(f"left out (unreadable): {line}")
    out(f"wrote {job.output}/{MANIFEST_FILE}: {manifest['count']} images of {job.channels}x{job.image_size}x"
        f"{job.image_size}, {len(classes)} classes")
    out(f"train on it: python -m distgan.train --dataset prepared --data-root {job.output} --image-size "
        f"{job.image_size} --channels {job.channels}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the shards already prepared are kept: the same command goes on from them",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run as distgan.prepare, not __main__: Ray pickles the shard task and its Job by module name
    from distgan.prepare import main as prepare_main

    sys.exit(prepare_main())
