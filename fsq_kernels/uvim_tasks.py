"""UViM's three dense-prediction tasks as procedural 32x32 data, and their metrics.

Every image is generated from (seed, split, index) alone: the parameters of image i are row i of
one uniform matrix drawn from ``np.random.default_rng([seed, task, split])``, so image i is the
same whatever the number of images, and the splits use disjoint streams. Nothing is downloaded.

- ``depth``: 2-4 shapes (disk, square, triangle) of random size and colour standing on a ground
  plane in front of a wall at 9.5; depth lies in DEPTH_RANGE = [1, 10]. A shape's depth is set by
  height in the visual field: linear in the row of its bottom edge, from 1.5 (bottom of the image)
  to 7.5 (highest possible bottom), and nearer shapes occlude farther ones. Per-shape appearance
  cues stay weak (random colour and size; weak fog pulls colour towards grey by up to
  0.3 x (depth-1)/9): depth is read from where a shape stands in the image, which needs absolute
  position (a translation-equivariant base model has it only from the border; the language
  model's image tokens and code positions carry it explicitly).
- ``colorization``: gray (luminance) in, RGB out. 1-3 shapes; a shape's type sets its colour family
  (disk: reds, square: greens, triangle: blues; three hues each, of equal luminance within a
  family) and the background is one of four colours (two dark, two light, of equal luminance
  within each pair): the gray image gives the family and dark/light, never the hue, so the
  colours stay multi-modal given x; the code picks them.
- ``panoptic``: 1-MAX_INSTANCES shapes of 3 classes (same-class instances share a colour, so
  touching ones are ambiguous), target per-pixel class (0 = background "stuff", 1-3) and
  instance id (0 = background; things 1..k ordered by centre of mass, row-major: by the pixel
  row that holds the centre, then by its x). Instances left with fewer than MIN_VISIBLE pixels by occlusion are not drawn.

Metrics come from per-image statistics (``Task.image_stats``) and a dataset-level aggregate
(``Task.aggregate``), so that ``bootstrap`` can resample held-out images for standard errors:
depth RMSE (per image, averaged) and abs-rel; colorization's Frechet distance between Gaussian
fits of per-image colour statistics (foreground/background mean and std of R, G, B, on the
true foreground mask) plus per-pixel MSE (reported, not ranked: a mean colour wins on it);
panoptic quality (IoU > 0.5 matching within a class, PQ per class over the dataset, then the
mean over classes that occur).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "DEPTH_RANGE", "MAX_INSTANCES", "TaskData", "Task", "get_task", "generate",
           "panoptic_stats", "panoptic_quality", "bootstrap"]

TASKS = ("depth", "colorization", "panoptic")
SIZE = 32
DEPTH_RANGE = (1.0, 10.0)
SHAPE_DEPTH = (1.5, 7.5)  # shapes: from the lowest bottom edge (nearest) to the highest
WALL_DEPTH = 9.5
MAX_INSTANCES = 4
NUM_THING_CLASSES = 3
MIN_VISIBLE = 6
_SPLITS = {"train": 0, "val": 1, "test": 2}
_SLOT = 8  # parameters per shape slot: kind, size, x, y, depth or hue, 3 x colour
_HEAD = 16  # per-image parameters before the slots: count, background, class colours
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _equal_luma(red_blue: list, luma: float) -> np.ndarray:
    """RGB colours with the given red and blue and the green that puts each at luminance `luma`,
    so that the gray image cannot tell them apart."""
    rb = np.array(red_blue, dtype=np.float64)
    g = (luma - _LUMA[0] * rb[:, 0] - _LUMA[2] * rb[:, 1]) / _LUMA[1]
    return np.stack([rb[:, 0], g, rb[:, 1]], 1).astype(np.float32)


# A shape's type sets its colour family; the three hues of a family share one luminance (the gray
# image gives the family through the shape, never the hue). Families differ in luminance.
_PALETTES = np.stack([
    _equal_luma([[0.95, 0.20], [0.75, 0.08], [0.85, 0.75]], 0.45),   # disk: red, orange, magenta
    _equal_luma([[0.15, 0.15], [0.55, 0.05], [0.05, 0.70]], 0.55),   # square: green, olive, teal
    _equal_luma([[0.05, 0.95], [0.55, 0.95], [0.05, 0.60]], 0.35),   # triangle: azure, violet, petrol
])
# Backgrounds: two dark of one luminance, two light of another.
_BACKGROUNDS = np.concatenate([_equal_luma([[0.10, 0.45], [0.35, 0.10]], 0.15),      # navy, maroon
                               _equal_luma([[0.95, 0.60], [0.65, 0.95]], 0.85)])     # cream, sky


@dataclasses.dataclass
class TaskData:
    """x: uint8 (N, Cx, S, S); y: the target (depth float32 (N, 1, S, S); colour uint8 (N, 3, S, S);
    panoptic uint8 (N, 2, S, S): class, instance); fg: bool (N, S, S), pixels covered by a shape."""
    x: Tensor
    y: Tensor
    fg: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """bool (m, S, S): disk (0), square (1) or upright triangle (2) per row, tested at pixel centres."""
    c = np.arange(SIZE, dtype=np.float32) + 0.5
    u = c[None, None, :] - cx[:, None, None]
    v = c[None, :, None] - cy[:, None, None]
    rr = r[:, None, None]
    disk = u * u + v * v <= rr * rr
    square = (np.abs(u) <= 0.85 * rr) & (np.abs(v) <= 0.85 * rr)
    triangle = (v <= 0.8 * rr) & (np.abs(u) <= (v + rr) * 0.62)
    k = kind[:, None, None]
    return np.where(k == 0, disk, np.where(k == 1, square, triangle))


def _slots(p: np.ndarray, first: int, count: int, r_lo: float, r_hi: float):
    """Kind, radius, centre of `count` shape slots read from params p[:, first:]."""
    s = p[:, first:first + count * _SLOT].reshape(len(p), count, _SLOT)
    kind = np.minimum((s[..., 0] * 3).astype(np.int64), 2)
    r = (r_lo + (r_hi - r_lo) * s[..., 1]) * SIZE
    cx = r + s[..., 2] * (SIZE - 2 * r)
    cy = r + s[..., 3] * (SIZE - 2 * r)
    return s, kind, r, cx, cy


def _depth(p: np.ndarray) -> TaskData:
    n = len(p)
    s, kind, r, cx, cy = _slots(p, _HEAD, 4, 0.18, 0.30)
    count = 2 + np.minimum((p[:, 0] * 3).astype(np.int64), 2)
    active = np.arange(4)[None] < count[:, None]
    # Height in the visual field: the shapes stand on a ground plane seen from above its horizon,
    # so a shape whose bottom is lower in the image is nearer (depth linear in the bottom's row).
    bottom = cy + r
    depth = SHAPE_DEPTH[0] + (SHAPE_DEPTH[1] - SHAPE_DEPTH[0]) * np.clip(
        (SIZE - bottom) / (SIZE - 2 * 0.18 * SIZE), 0.0, 1.0)
    colour = 0.15 + 0.8 * s[..., 5:8]
    fog = (0.3 * (depth - DEPTH_RANGE[0]) / (DEPTH_RANGE[1] - DEPTH_RANGE[0]))[..., None]
    colour = colour * (1 - fog) + 0.5 * fog
    img = np.broadcast_to((0.2 + 0.6 * p[:, 2:5])[:, :, None, None], (n, 3, SIZE, SIZE)).copy()
    dmap = np.full((n, 1, SIZE, SIZE), WALL_DEPTH, dtype=np.float64)
    fg = np.zeros((n, SIZE, SIZE), dtype=bool)
    order = np.argsort(np.where(active, -depth, -np.inf), axis=1)  # far to near; inactive first, skipped
    rows = np.arange(n)
    for j in range(4):
        i = order[:, j]
        m = _masks(kind[rows, i], cx[rows, i], cy[rows, i], r[rows, i]) & active[rows, i][:, None, None]
        img = np.where(m[:, None], colour[rows, i][:, :, None, None], img)
        dmap = np.where(m[:, None], depth[rows, i][:, None, None, None], dmap)
        fg |= m
    return TaskData(_to_uint8(img), torch.from_numpy(dmap.astype(np.float32)), torch.from_numpy(fg))


def _colorization(p: np.ndarray) -> TaskData:
    n = len(p)
    s, kind, r, cx, cy = _slots(p, _HEAD, 3, 0.18, 0.32)
    count = 1 + np.minimum((p[:, 0] * 3).astype(np.int64), 2)
    hue = np.minimum((s[..., 4] * 3).astype(np.int64), 2)
    colour = _PALETTES[kind, hue] + 0.08 * (s[..., 5:8] - 0.5)
    bg = _BACKGROUNDS[np.minimum((p[:, 1] * 4).astype(np.int64), 3)] + 0.08 * (p[:, 2:5] - 0.5)
    rgb = np.broadcast_to(bg[:, :, None, None], (n, 3, SIZE, SIZE)).copy()
    fg = np.zeros((n, SIZE, SIZE), dtype=bool)
    for j in range(3):
        m = _masks(kind[:, j], cx[:, j], cy[:, j], r[:, j]) & (j < count)[:, None, None]
        rgb = np.where(m[:, None], colour[:, j][:, :, None, None], rgb)
        fg |= m
    rgb = np.clip(rgb, 0, 1)
    gray = np.einsum("c,nchw->nhw", _LUMA, rgb)[:, None]
    return TaskData(_to_uint8(gray), _to_uint8(rgb), torch.from_numpy(fg))


def _panoptic(p: np.ndarray) -> TaskData:
    n = len(p)
    k = MAX_INSTANCES
    s, kind, r, cx, cy = _slots(p, _HEAD, k, 0.15, 0.25)
    count = 1 + np.minimum((p[:, 0] * k).astype(np.int64), k - 1)
    active = np.arange(k)[None] < count[:, None]
    masks = np.stack([_masks(kind[:, j], cx[:, j], cy[:, j], r[:, j]) for j in range(k)], 1)  # (n, k, S, S)
    # Paint in slot order, drop instances that occlusion leaves nearly invisible, paint again (a
    # dropped instance only uncovers pixels, so every instance left keeps >= MIN_VISIBLE of them).
    for final in (False, True):
        owner = np.full((n, SIZE, SIZE), -1)
        for j in range(k):
            owner = np.where(masks[:, j] & active[:, j, None, None], j, owner)
        visible = owner[:, None] == np.arange(k)[None, :, None, None]
        if not final:
            active &= visible.sum((2, 3)) >= MIN_VISIBLE
    area = visible.sum((2, 3))
    c = np.arange(SIZE, dtype=np.float64) + 0.5
    com_y = (visible.sum(3) * c).sum(2) / np.maximum(area, 1)
    com_x = (visible.sum(2) * c).sum(2) / np.maximum(area, 1)
    # row-major: by the pixel row holding the centre of mass, then by its column (x)
    key = np.floor(com_y) * (2 * SIZE) + com_x
    rank = np.argsort(np.argsort(np.where(active, key, np.inf), axis=1), axis=1)
    inst = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    cls = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    for j in range(k):
        m = owner == j
        inst = np.where(m, (rank[:, j] + 1)[:, None, None], inst)
        cls = np.where(m, (kind[:, j] + 1)[:, None, None], cls)
    class_colour = 0.15 + 0.8 * p[:, 1:4 * 3 + 1].reshape(n, 4, 3)  # background + 3 classes
    img = class_colour[np.arange(n)[:, None, None], cls].transpose(0, 3, 1, 2)
    y = np.stack([cls, inst], 1).astype(np.uint8)
    return TaskData(_to_uint8(img), torch.from_numpy(y), torch.from_numpy(owner >= 0))


def _to_uint8(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))


_GENERATORS = {"depth": _depth, "colorization": _colorization, "panoptic": _panoptic}


def generate(task: str, n: int, seed: int = 0, split: str = "train") -> TaskData:
    """n images of `task` for (seed, split); image i does not depend on n."""
    if task not in _GENERATORS:
        raise ValueError(f"task must be one of {list(TASKS)}; got {task!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}; got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    rng = np.random.default_rng([int(seed), 1000 + TASKS.index(task), _SPLITS[split]])
    params = rng.random((n, _HEAD + MAX_INSTANCES * _SLOT), dtype=np.float64).astype(np.float32)
    out = []
    for i in range(0, n, 512):  # bounded memory
        out.append(_GENERATORS[task](params[i:i + 512]))
    return TaskData(*(torch.cat([getattr(d, f.name) for d in out]) for f in dataclasses.fields(TaskData)))


# --------------------------------------------------------------------------------------------
# panoptic quality

def panoptic_stats(pred: Tensor, target: Tensor) -> Tensor:
    """Per image and class: (IoU sum of matches, TP, FP, FN), float64 (N, C, 4), C = 1 + things.

    pred, target: integer (N, 2, H, W), class and instance. A segment is one (class, instance)
    pair of a thing class; all background pixels (class 0) form one stuff segment. A predicted and
    a true segment of the same class match when IoU > 0.5 (such a match is unique)."""
    c = NUM_THING_CLASSES + 1
    k = MAX_INSTANCES + 1
    nseg = c * k

    def seg_ids(t: Tensor) -> Tensor:
        cls, inst = t[:, 0].long().clamp(0, c - 1), t[:, 1].long().clamp(0, k - 1)
        return (cls * k + torch.where(cls == 0, 0, inst)).flatten(1)

    n = pred.shape[0]
    gid, pid = seg_ids(target), seg_ids(pred)
    flat = (gid * nseg + pid) + torch.arange(n)[:, None] * nseg * nseg
    inter = torch.bincount(flat.flatten(), minlength=n * nseg * nseg).view(n, nseg, nseg).double()
    garea, parea = inter.sum(2), inter.sum(1)
    iou = inter / (garea[:, :, None] + parea[:, None, :] - inter).clamp(min=1)
    seg_class = torch.arange(nseg) // k
    same = seg_class[:, None] == seg_class[None, :]
    matched = (iou > 0.5) & same
    out = torch.zeros(n, c, 4, dtype=torch.float64)
    for cl in range(c):
        rows = seg_class == cl
        m = matched[:, rows][:, :, rows]
        tp = m.sum((1, 2)).double()
        out[:, cl, 0] = (iou[:, rows][:, :, rows] * m).sum((1, 2))
        out[:, cl, 1] = tp
        out[:, cl, 2] = (parea[:, rows] > 0).sum(1) - tp
        out[:, cl, 3] = (garea[:, rows] > 0).sum(1) - tp
    return out


def panoptic_quality(stats: Tensor) -> dict:
    """PQ per class over the dataset (sum IoU / (TP + FP/2 + FN/2)), averaged over classes with any
    segment; also SQ and RQ averaged the same way."""
    tot = stats.sum(0)
    iou, tp, fp, fn = tot.unbind(-1)
    present = (tp + fp + fn) > 0
    denom = (tp + 0.5 * fp + 0.5 * fn).clamp(min=1e-12)
    pq = (iou / denom)[present]
    sq = (iou / tp.clamp(min=1e-12))[present]
    rq = (tp / denom)[present]
    return {"pq": float(pq.mean()), "sq": float(sq.mean()), "rq": float(rq.mean())}


# --------------------------------------------------------------------------------------------
# task definitions: model targets, losses, predictions, metrics


class Task:
    """What stage I and the metrics need to know about a task."""

    name: str
    x_channels: int      # image channels
    y_channels: int      # channels of the target encoding the oracle reads
    out_channels: int    # base model output channels
    metric: str          # the ranking metric (lower is better unless higher_is_better)
    higher_is_better = False

    def x(self, data: TaskData, idx: Tensor) -> Tensor:
        return data.x[idx].float().div_(255.0)

    def encode_target(self, y: Tensor) -> Tensor:
        """Target (as stored) -> float (B, y_channels, S, S) in [-1, 1], the oracle's input."""
        raise NotImplementedError

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, out: Tensor) -> Tensor:
        """Base model output -> a prediction in the stored target's form."""
        raise NotImplementedError

    def image_stats(self, pred: Tensor, y: Tensor, fg: Tensor) -> Tensor:
        """float64 (B, ...) per-image statistics that `aggregate` turns into the metrics."""
        raise NotImplementedError

    def aggregate(self, stats: Tensor) -> dict:
        raise NotImplementedError

    def to_rgb(self, y: Tensor) -> Tensor:
        """A target or prediction (stored form) -> RGB in [0, 1] for the PNG grid."""
        raise NotImplementedError


class DepthTask(Task):
    name, x_channels, y_channels, out_channels, metric = "depth", 3, 1, 1, "rmse"
    _mid, _half = (DEPTH_RANGE[0] + DEPTH_RANGE[1]) / 2, (DEPTH_RANGE[1] - DEPTH_RANGE[0]) / 2

    def encode_target(self, y):
        return (y.float() - self._mid) / self._half

    def loss(self, out, y):
        return F.mse_loss(out, self.encode_target(y))

    def predict(self, out):
        return (out.float() * self._half + self._mid).clamp(*DEPTH_RANGE)

    def image_stats(self, pred, y, fg):
        err = pred.detach().double() - y.double()
        return torch.stack([err.square().flatten(1).mean(1).sqrt(), (err.abs() / y.double()).flatten(1).mean(1)], 1)

    def aggregate(self, stats):
        return {"rmse": float(stats[:, 0].mean()), "abs_rel": float(stats[:, 1].mean())}

    def to_rgb(self, y):
        return (1 - (y.float() - DEPTH_RANGE[0]) / (DEPTH_RANGE[1] - DEPTH_RANGE[0])).expand(-1, 3, -1, -1)


class ColorizationTask(Task):
    name, x_channels, y_channels, out_channels, metric = "colorization", 1, 3, 3, "colour_fd"

    def encode_target(self, y):
        return y.float() / 127.5 - 1 if y.dtype == torch.uint8 else y.float() * 2 - 1

    def loss(self, out, y):
        return F.mse_loss(out, self.encode_target(y))

    def predict(self, out):
        return ((out.float() + 1) / 2).clamp(0, 1)

    def image_stats(self, pred, y, fg):
        def colour_stats(img: Tensor) -> Tensor:
            img = (img.float() / 255.0 if img.dtype == torch.uint8 else img.float()).double()
            feats = []
            for m in (fg, ~fg):
                w = m[:, None].double()
                cnt = w.sum((2, 3)).clamp(min=1)
                mean = (img * w).sum((2, 3)) / cnt
                var = ((img - mean[:, :, None, None]).square() * w).sum((2, 3)) / cnt
                feats += [mean, var.sqrt()]
            return torch.cat(feats, 1)
        target = y.float() / 255.0 if y.dtype == torch.uint8 else y.float()
        pred = pred.detach()
        mse = (pred.double() - target.double()).square().flatten(1).mean(1, keepdim=True)
        return torch.cat([colour_stats(pred), colour_stats(target), mse], 1)

    def aggregate(self, stats):
        from .train.metrics import frechet_distance  # the package's one Frechet distance

        d = (stats.shape[1] - 1) // 2
        return {"colour_fd": frechet_distance(stats[:, :d], stats[:, d:2 * d]), "mse": float(stats[:, -1].mean())}

    def to_rgb(self, y):
        return y.float() / 255.0 if y.dtype == torch.uint8 else y.float()


class PanopticTask(Task):
    name, x_channels, out_channels, metric = "panoptic", 3, NUM_THING_CLASSES + 1 + MAX_INSTANCES + 1, "pq"
    y_channels = out_channels
    higher_is_better = True

    def encode_target(self, y):
        y = y.long()
        cls = F.one_hot(y[:, 0], NUM_THING_CLASSES + 1)
        inst = F.one_hot(y[:, 1], MAX_INSTANCES + 1)
        return torch.cat([cls, inst], -1).permute(0, 3, 1, 2).float() * 2 - 1

    def loss(self, out, y):
        y = y.long()
        c = NUM_THING_CLASSES + 1
        return F.cross_entropy(out[:, :c], y[:, 0]) + F.cross_entropy(out[:, c:], y[:, 1])

    def predict(self, out):
        c = NUM_THING_CLASSES + 1
        return torch.stack([out[:, :c].argmax(1), out[:, c:].argmax(1)], 1)

    def image_stats(self, pred, y, fg):
        return panoptic_stats(pred, y).flatten(1)

    def aggregate(self, stats):
        return panoptic_quality(stats.view(stats.shape[0], NUM_THING_CLASSES + 1, 4))

    def to_rgb(self, y):
        palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.3, 0.3], [0.3, 0.8, 0.3], [0.3, 0.4, 0.9]])
        cls, inst = y[:, 0].long().clamp(0, NUM_THING_CLASSES), y[:, 1].long().clamp(0, MAX_INSTANCES)
        shade = 1.0 - 0.18 * (inst.float() - 1).clamp(min=0)  # instances of one class in darker shades
        return (palette[cls] * shade[..., None]).permute(0, 3, 1, 2).clamp(0, 1)


_TASK_OBJECTS = {"depth": DepthTask(), "colorization": ColorizationTask(), "panoptic": PanopticTask()}


def get_task(name: str) -> Task:
    if name not in _TASK_OBJECTS:
        raise ValueError(f"task must be one of {list(TASKS)}; got {name!r}")
    return _TASK_OBJECTS[name]


def bootstrap(fn, stats: list[Tensor], reps: int = 200, seed: int = 0) -> Tensor:
    """fn(*[s[idx] for s in stats]) -> float over `reps` resamples of the images (the same indices
    for every tensor in `stats`, so differences are paired); returns the (reps,) values."""
    n = stats[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(reps, dtype=torch.float64)
    for i in range(reps):
        idx = torch.randint(0, n, (n,), generator=g)
        out[i] = fn(*[s[idx] for s in stats])
    return out
