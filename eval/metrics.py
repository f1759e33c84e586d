"""The paper's metrics as plain functions over embeddings (rows = items) or images.

DINO and CLIP-I: mean cosine over every (real, generated) pair. Drift: mean DINO cosine between base-model and
adapted images of the same prompt and seed, on prompts that name no subject. CLIP-T: cosine of each generated image with
its prompt, x100. Diversity: mean distance over the i<j pairs of one subject-and-prompt's images, with LPIPS
(DreamBooth's DIV) or 1 - DINO cosine. CMMD: RBF-kernel MMD between two embedding sets (Jayasumana et al. 2024).
"""
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from waveft.errors import UserError

Item = TypeVar("Item")
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def mean_pairwise_cosine(real: np.ndarray, generated: np.ndarray) -> float:
    """DINO / CLIP-I: the mean cosine similarity over all len(real) x len(generated) pairs."""
    return float((_unit_rows(real) @ _unit_rows(generated).T).mean())


def paired_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cosine(a[i], b[i]) for each row i; (n, d) x (n, d) -> (n,)."""
    return (_unit_rows(a) * _unit_rows(b)).sum(axis=-1)


def clip_t_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """CLIP-T per image: 100 x cosine(image i, its prompt i), not clipped at 0 (torchmetrics' CLIPScore clips)."""
    return 100.0 * paired_cosines(image_embeddings, text_embeddings)


def drift_scores(base_embeddings: np.ndarray, adapted_embeddings: np.ndarray) -> np.ndarray:
    """Drift per image pair: the DINO cosine between the base model's image and the adapted model's image of the
    same prompt and seed (1: the adapter left that unrelated prompt untouched)."""
    return paired_cosines(base_embeddings, adapted_embeddings)


def mean_pairwise_distance(items: Sequence[Item], distance: Callable[[Item, Item], float]) -> float:
    """Mean of distance(items[i], items[j]) over all i < j; NaN with fewer than two items."""
    pairs = list(itertools.combinations(range(len(items)), 2))
    if not pairs:
        return math.nan
    return float(np.mean([distance(items[i], items[j]) for i, j in pairs]))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(_unit_rows(a) @ _unit_rows(b))


def dino_diversity(embeddings: np.ndarray) -> float:
    """1 - mean pairwise DINO cosine among the images of one prompt (0 for identical images)."""
    return mean_pairwise_distance(list(embeddings), cosine_distance)


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """scale x MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), the biased (V-statistic) estimate that the
    CMMD reference code computes; pass the embeddings as the encoder gives them (CLIP, L2-normalised)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a, b):
        squared_distances = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.exp(-gamma * squared_distances).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)))


class LpipsDistance:
    """LPIPS between two PIL images of the same size, inputs scaled to [-1, 1]. The `lpips` package is imported
    only here: it pulls torchvision, which the CPU test environment cannot run."""

    def __init__(self, net: str = "alex", device: str = "cpu"):
        try:
            import lpips
        except ImportError:
            raise UserError(
                "LPIPS diversity needs the lpips package: pip install lpips (it pulls torchvision)"
            ) from None
        self.net = net
        self.device = device
        self.model = lpips.LPIPS(net=net, verbose=False).eval().to(device)

    def _tensor(self, image):
        import torch

        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)[None]
        return (pixels / 127.5 - 1.0).to(self.device)

    def __call__(self, a, b) -> float:
        import torch

        with torch.inference_mode():
            return float(self.model(self._tensor(a), self._tensor(b)).item())
