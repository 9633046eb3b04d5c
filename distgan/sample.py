"""`python -m distgan.sample --checkpoint DIR --num-samples N --output out.png|out.npz`

Images from a checkpoint's generator (the EMA weights when the checkpoint has them). npz: key `images`,
uint8, shape (N, H, W, C). png: one grid (torchvision make_grid/save_image).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from distgan.checkpoint import CheckpointError, load_into, load_state
from distgan.config import config_from_dict
from distgan.models import Generator


def load_generator(checkpoint_dir: str | Path, use_ema: bool = True) -> Generator:
    state = load_state(checkpoint_dir)
    cfg = config_from_dict(state["config"])
    g = Generator(cfg.z_dim, cfg.image_size, cfg.image_channels, cfg.negative_slope, kernels="eager")
    where = str(Path(checkpoint_dir) / "state.pt")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m distgan.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (holds state.pt)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--output", default="samples.png", help="path ending in .png or .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw generator, not its EMA")
    args = p.parse_args(argv)
    if args.num_samples <= 0:
        print(f"error: --num-samples must be positive, got {args.num_samples}", file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.suffix not in (".png", ".npz"):
        print(f"error: --output must end in .png or .npz, got {out}", file=sys.stderr)
        return 2
    try:
        g = load_generator(args.checkpoint, use_ema=not args.no_ema)
    except CheckpointError as e:
        print(f"error: --checkpoint: {e}", file=sys.stderr)
        return 2
    images = generate(g, args.num_samples, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez_compressed(out, images=u8)
    else:
        from torchvision.utils import save_image

        save_image(images, out, nrow=int(math.ceil(math.sqrt(args.num_samples))), normalize=True,
                   value_range=(-1, 1))
    print(f"wrote {args.num_samples} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
