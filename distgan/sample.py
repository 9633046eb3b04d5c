"""`python -m distgan.sample --checkpoint CHECKPOINT_OR_RUN_DIR [--num-samples N] [--output out.png|out.npz]`

Images from a checkpoint's generator (the EMA weights when the checkpoint has them). --checkpoint is a
checkpoint directory (it holds state.pt) or a run directory, local or a URI (s3://bucket/prefix/name). For a
run directory the best checkpoint is used: the lowest FID among its evaluated checkpoints, else the newest;
one that does not validate as a resume would validate it (torn, never registered) is skipped with a warning.

Output: by default <run dir>/samples/sample-<checkpoint>-seed<seed>.png, next to the run's other files (a
URI run directory gets the file uploaded there); --output PATH (local or URI) writes elsewhere. png: one
grid (torchvision make_grid/save_image). npz: key `images`, uint8, shape (N, H, W, C).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from distgan import storage
from distgan.checkpoint import STATE_FILE, CheckpointError, fetch_state, load_into
from distgan.config import config_from_dict
from distgan.models import Generator
from distgan.plots import save_grid
from distgan.rundir import RunDir, checkpoint_order
from distgan.storage import first_line


class Choice(NamedTuple):
    checkpoint: str  # local path or URI of the checkpoint directory
    run_dir: str  # its run directory (the parent)
    reason: str  # one line: which checkpoint and why
    state: dict[str, Any] | None = None  # its validated state, when choosing it meant loading it


def choose_checkpoint(location: str) -> Choice:
    """A checkpoint directory as given, or the best checkpoint of a run directory. Raises CheckpointError
    for a path that does not exist or holds no checkpoint, OSError when the storage cannot be reached."""
    from pyarrow.fs import FileType

    problem = storage.location_problem(location)
    if problem:
        raise CheckpointError(f"{location!r} {problem}")
    if not storage.is_uri(location):  # local paths are shown resolved
        location = storage.open_location(location)[1].rstrip("/") or "/"
    if storage.is_file(storage.join(location, STATE_FILE)):
        return Choice(location, storage.parent(location), f"using {storage.basename(location)}")
    fs, path = storage.open_location(location)
    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        raise CheckpointError(f"{location}: no such checkpoint or run directory")
    if info.type != FileType.Directory:
        raise CheckpointError(f"{location}: not a directory (expected a checkpoint or a run directory)")
    run = RunDir.at(location)
    names = run.checkpoint_names()
    if not names:
        raise CheckpointError(f"{location}: no {STATE_FILE} and no checkpoint_<step> directories in it (not a "
                              f"checkpoint or a run directory)")
    fids = run.checkpoint_fids(names)
    # best FID first (ties to the newer), then the unevaluated ones newest first; the first that validates wins
    ranked = sorted(fids, key=lambda n: (fids[n], [-k for k in checkpoint_order(n)]))
    ranked += [n for n in reversed(names) if n not in fids]
    skipped: list[str] = []
    for name in ranked:
        where = storage.join(location, name)
        try:  # the validation a resume applies (load_state): a torn or unregistered checkpoint is passed over
            state = fetch_state(where if storage.is_uri(where) else Path(where))
        except CheckpointError as e:
            print(f"WARNING: skipping checkpoint: {e}", file=sys.stderr, flush=True)
            skipped.append(str(e))
            continue
        if name in fids:
            among = f"among {len(fids)} evaluated of" if len(fids) < len(names) else "of"
            reason = f"using {name} (best FID {fids[name]:.4g} {among} {len(names)} checkpoints"
        else:
            reason = f"using {name} (newest of {len(names)} checkpoints" + \
                ("; none was evaluated" if not fids else "; no evaluated one is valid")
        reason += f"; {len(skipped)} invalid skipped)" if skipped else ")"
        return Choice(where, location, reason, state)
    raise CheckpointError(f"{location}: none of its {len(names)} checkpoints is valid: {'; '.join(skipped)}")


def load_generator(checkpoint_dir: str | Path, use_ema: bool = True, state: dict[str, Any] | None = None) -> Generator:
    """The generator of a checkpoint directory (local path or URI), EMA weights when present; `state`: its state
    when already loaded and validated."""
    if state is None:
        state = fetch_state(checkpoint_dir if storage.is_uri(checkpoint_dir) else Path(checkpoint_dir))
    cfg = config_from_dict(state["config"])
    g = Generator(cfg.z_dim, cfg.image_size, cfg.image_channels, cfg.negative_slope, kernels="eager")
    where = storage.join(checkpoint_dir, STATE_FILE)
    if use_ema and "ema" in state:
        load_into(state["ema"], where, model=g)
    else:
        load_into(state, where, generator=g)
    return g.eval()


@torch.no_grad()
def generate(g: Generator, num_samples: int, seed: int = 0, batch: int = 500) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = [g(torch.randn(min(batch, num_samples - i), g.z_dim, generator=gen)) for i in range(0, num_samples, batch)]
    return torch.cat(out)


def write_images(images: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        with open(path, "wb") as fh:  # a file object: savez would append .npz to a temporary name
            np.savez_compressed(fh, images=u8)
    else:
        save_grid(images, path)


def save(images: torch.Tensor, output: str) -> None:
    """Writes to a local path, or to a temporary file uploaded to a URI."""
    if not storage.is_uri(output):
        write_images(images, Path(output))
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / storage.basename(output)
        write_images(images, local)
        storage.upload(local, output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distgan.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (holds state.pt) or a run directory; local path or URI")
    p.add_argument("--num-samples", type=int, default=64,
                   help="how many images to draw (default: 64)")
    p.add_argument("--output", default=None, help="path or URI ending in .png or .npz (default: "
                   "<run dir>/samples/sample-<checkpoint>-seed<seed>.png)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise vectors: the same seed and checkpoint draw the same images (default: 0)")
    p.add_argument("--no-ema", action="store_true", help="use the raw generator, not its EMA")
    args = p.parse_args(argv)
    if args.num_samples <= 0:
        print(f"error: --num-samples must be positive, got {args.num_samples}", file=sys.stderr)
        return 2
    if args.output is not None and storage.suffix(args.output) not in (".png", ".npz"):
        print(f"error: --output must end in .png or .npz, got {args.output}", file=sys.stderr)
        return 2
    try:
        choice = choose_checkpoint(args.checkpoint)
        print(choice.reason, flush=True)
        g = load_generator(choice.checkpoint, use_ema=not args.no_ema, state=choice.state)
    except CheckpointError as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pyarrow: a malformed URI or an unknown scheme
        print(f"error: --checkpoint {args.checkpoint}: {first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # pyarrow: unreachable storage, denied access
        print(f"error: --checkpoint {args.checkpoint}: cannot read the storage ({first_line(e)})", file=sys.stderr)
        return 1
    output = args.output
    if output is None:
        name = storage.basename(choice.checkpoint)
        output = storage.join(choice.run_dir, "samples",
                              f"sample-{name}-seed{args.seed}{'-raw' if args.no_ema else ''}.png")
    images = generate(g, args.num_samples, args.seed)
    try:
        save(images, output)
    except (OSError, ValueError) as e:
        print(f"error: --output {output}: cannot write ({first_line(e)})", file=sys.stderr)
        return 1
    print(f"wrote {args.num_samples} images to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
