"""Synthetic specialists for tests and benchmarks: a real base checkpoint plus seeded perturbations.

Every decoder-layer tensor ``W`` becomes ``W + σ_dense N + σ_low A B`` with ``N``, ``A``
(``rows × rank``) and ``B`` (``rank × columns``) standard normal from a generator seeded
per model; 1-D tensors get the dense term only. Embeddings, final norm and head are
copied unchanged, so their deltas are exactly zero.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hm_utils.merge.io import SafetensorsStreamWriter, TensorReader, atomic_output_dir, copy_auxiliary_files
from hm_utils.merge.params import decoder_layer_of


def perturb_checkpoint(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    dense_scale: float = 1e-3,
    low_rank_scale: float = 2e-3,
    rank: int = 4,
) -> Path:
    """Write a perturbed copy of ``base_dir`` (safetensors, config, tokenizer) to ``out_dir``."""
    generator = torch.Generator().manual_seed(seed)
    with TensorReader(base_dir) as reader, atomic_output_dir(out_dir) as staging:
        layout = [(name, info.dtype, info.shape) for name, info in reader.index.items()]
        with SafetensorsStreamWriter(staging, layout) as writer:
            for name, _, shape in layout:
                tensor = reader.read(name)
                if decoder_layer_of(name) is not None and tensor.is_floating_point():
                    noise = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(dense_scale)
                    if len(shape) == 2:
                        left = torch.randn(shape[0], rank, generator=generator)
                        right = torch.randn(rank, shape[1], generator=generator)
                        noise.addmm_(left, right, alpha=low_rank_scale)
                    tensor = (tensor.float() + noise).to(tensor.dtype)
                writer.write(name, tensor)
        copy_auxiliary_files(base_dir, staging)
    return Path(out_dir)
