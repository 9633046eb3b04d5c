"""Every seed a run derives from --seed, in one place: the trainer, the benchmarks and the tests draw the same
numbers from the same formulas. Changing one changes what a checkpoint's RNG state continues, so a formula here
is part of the checkpoint format's meaning.

The multipliers are primes larger than any rank, step or epoch offset they are combined with, so two
(seed, rank, step) triples do not land on the same seed in practice.
"""

NOISE_PRIME = 7919
STEP_PRIME = 1_000_003
EVAL_OFFSET = 12345  # the evaluation's latents: apart from seed + rank, which training draws from


def model_init(seed: int) -> int:
    """The models' initial weights (identical on every rank) and the fixed-noise sample grid."""
    return seed


def training(seed: int, rank: int) -> int:
    """The global torch / numpy / python streams of a rank's training (D's dropout)."""
    return seed + rank


def noise(seed: int, rank: int, offset: int = 0) -> int:
    """A rank's latent-noise generator; `offset` separates other per-rank streams (augmentation, a reseed)."""
    return seed * NOISE_PRIME + rank + 1 + offset


def reseeded_training(seed: int, rank: int, step: int) -> int:
    """The training streams after a resume that cannot restore them (another world size or device kind)."""
    return seed + rank + STEP_PRIME * step


def data_loader(seed: int, epoch: int) -> int:
    """The DataLoader generator's seed at the start of an epoch (each iter() draws its base seed from it)."""
    return seed * STEP_PRIME + epoch


def evaluation(seed: int) -> int:
    """The latents of the quality metrics' generated images."""
    return seed + EVAL_OFFSET
