"""Generated test data for the curation tests: clustered embeddings with planted copies, and small images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from curation.storage import l2_normalize


def random_unit(rng: np.random.Generator, num: int, dim: int) -> np.ndarray:
    """Random directions: in high dimension their pairwise cosines are close to 0."""
    return l2_normalize(rng.normal(size=(num, dim)).astype(np.float32))


def noisy_copies(rng: np.random.Generator, x: np.ndarray, cosine: float) -> np.ndarray:
    """Copies of the rows of ``x`` at (about) the given cosine similarity."""
    noise = random_unit(rng, len(x), x.shape[1])
    noise -= (noise * x).sum(1, keepdims=True) * x  # orthogonal to x, so the cosine is exact
    noise = l2_normalize(noise)
    return l2_normalize(cosine * x + np.sqrt(1 - cosine**2) * noise)


def skewed_concepts(
    rng: np.random.Generator, sizes: list[int], dim: int, *, spread: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, concept of each row)``: Gaussian blobs around random unit centres, one per size."""
    centres = random_unit(rng, len(sizes), dim)
    concept = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[concept] + spread * rng.normal(size=(len(concept), dim)).astype(np.float32)
    return l2_normalize(x), concept


def make_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A random picture: a coloured background and a few random rectangles and ellipses."""
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([int(x0), int(y0), int(x1), int(y1)], fill=colour)
    return image


def augment(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """A near-duplicate: a slight crop, rescale and brightness change (then re-encoded as JPEG by the caller)."""
    w, h = image.size
    dx, dy = rng.integers(0, max(1, w // 20), 2)
    out = image.crop((int(dx), int(dy), int(w - dx), int(h - dy))).resize((w, h), Image.BILINEAR)
    return ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.9, 1.1)))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(folder: Path, images: dict[str, bytes]) -> None:
    """Write ``{relative name: encoded bytes}`` under ``folder``."""
    for name, data in images.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
