"""Image grids for reconstructions and samples (PNG)."""
from __future__ import annotations

import numpy as np


def make_grid(images: np.ndarray, cols: int = 0, pad: int = 2) -> np.ndarray:
    """``images: n h w 3`` (or ``n h w``) in [0, 1] -> one uint8 ``H W 3`` grid, white padding."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"make_grid expects n h w 3 (or n h w) images, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    return grid


def save_grid(path: str, images: np.ndarray, cols: int = 0) -> None:
    import os
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(make_grid(images, cols)).save(path)
