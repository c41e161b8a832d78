"""UViM: the procedural tasks and their metrics, code dropout, stage-I and language-model shapes,
and UViM's VQ (EMA dictionary, codeword splitting)."""

from __future__ import annotations

import math

import pytest
import torch

from fsq_kernels import uvim_tasks as T
from fsq_kernels.models.uvim import QUANTIZERS, StageOne, UViMVectorQuantizer, code_dropout
from fsq_kernels.models.uvim_lm import CodeLM, lm_loss


# --------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("task", T.TASKS)
def test_generators_are_deterministic_per_seed(task):
    a = T.generate(task, 40, seed=3, split="train")
    b = T.generate(task, 40, seed=3, split="train")
    prefix = T.generate(task, 7, seed=3, split="train")
    other_seed = T.generate(task, 40, seed=4, split="train")
    other_split = T.generate(task, 40, seed=3, split="test")
    for f in ("x", "y", "fg"):
        assert torch.equal(getattr(a, f), getattr(b, f))
        assert torch.equal(getattr(a, f)[:7], getattr(prefix, f))  # image i does not depend on n
    assert not torch.equal(a.x, other_seed.x)
    assert not torch.equal(a.x, other_split.x)
    task_obj = T.get_task(task)
    assert a.x.shape == (40, task_obj.x_channels, 32, 32) and a.x.dtype == torch.uint8


def test_depth_is_positive_within_its_range():
    d = T.generate("depth", 200, seed=0)
    assert d.y.min() >= T.DEPTH_RANGE[0] and d.y.max() <= T.DEPTH_RANGE[1]
    # the background wall is farther than every shape
    assert (d.y[:, 0][d.fg] < 8.5).all() and (d.y[:, 0][~d.fg] >= 8.5).all()


def test_panoptic_targets_are_canonical():
    d = T.generate("panoptic", 300, seed=1)
    cls, inst = d.y[:, 0].long(), d.y[:, 1].long()
    assert torch.equal(cls == 0, inst == 0)  # background is the one stuff segment
    assert inst.max() <= T.MAX_INSTANCES and cls.max() <= 3
    coords = torch.arange(32, dtype=torch.float64) + 0.5
    for i in range(300):
        k = int(inst[i].max())
        assert k >= 1 and set(inst[i].unique().tolist()) == set(range(k + 1))  # ids 1..k, no gaps
        com = []
        for j in range(1, k + 1):
            m = (inst[i] == j).double()
            assert m.sum() >= T.MIN_VISIBLE
            assert cls[i][inst[i] == j].unique().numel() == 1  # one class per instance
            com.append((math.floor((m.sum(1) * coords).sum() / m.sum()), float((m.sum(0) * coords).sum() / m.sum())))
        assert com == sorted(com)  # by the centre of mass's pixel row, then its x


def test_colorization_input_is_the_luminance_of_the_target():
    d = T.generate("colorization", 50, seed=2)
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    gray = (d.y.float() / 255 * luma).sum(1, keepdim=True)
    assert (gray - d.x.float() / 255).abs().max() < 3 / 255


def test_colorization_hues_of_a_family_share_their_luminance():
    # the gray image must give a shape's colour family (through its type) but never its hue
    luma = torch.tensor([0.299, 0.587, 0.114])
    palettes = torch.from_numpy(T._PALETTES)  # (family, hue, RGB)
    fam = palettes @ luma
    assert (fam - fam[:, :1]).abs().max() < 1e-6
    assert (palettes[:, :, None] - palettes[:, None]).abs().amax(-1).add(torch.eye(3)).min() > 0.15  # hues differ
    assert ((palettes >= 0) & (palettes <= 1)).all()
    bg = torch.from_numpy(T._BACKGROUNDS) @ luma
    assert abs(bg[0] - bg[1]) < 1e-6 and abs(bg[2] - bg[3]) < 1e-6 and bg[2] - bg[0] > 0.5


def test_depth_is_set_by_height_in_the_visual_field():
    d = T.generate("depth", 300, seed=5)
    rows = torch.arange(32, dtype=torch.float32)
    for i in range(300):
        y = d.y[i, 0]
        for v in y[d.fg[i]].unique():
            m = y == v  # one visible shape (depths are continuous, so distinct)
            lowest = rows[m.any(1)].max()
            # the bottom edge of the visible part is no lower than the shape's own bottom edge
            assert float(v) <= T.SHAPE_DEPTH[0] + (T.SHAPE_DEPTH[1] - T.SHAPE_DEPTH[0]) * float(
                (32 - (lowest + 0.5)) / (32 - 2 * 0.18 * 32)) + 0.6


def test_generate_validates_its_arguments():
    with pytest.raises(ValueError, match="task"):
        T.generate("segmentation", 4)
    with pytest.raises(ValueError, match="split"):
        T.generate("depth", 4, split="dev")
    with pytest.raises(ValueError, match="n must"):
        T.generate("depth", 0)


# --------------------------------------------------------------------------------------------
# metrics


def _panoptic_map(segments, size=12):
    """(1, 2, size, size) from [(class, instance, row0, row1, col0, col1)] painted in order."""
    y = torch.zeros(1, 2, size, size, dtype=torch.long)
    for cls, inst, r0, r1, c0, c1 in segments:
        y[0, 0, r0:r1, c0:c1] = cls
        y[0, 1, r0:r1, c0:c1] = inst
    return y


def test_pq_perfect_prediction():
    gt = _panoptic_map([(1, 1, 0, 4, 0, 4), (1, 2, 6, 10, 6, 10), (2, 3, 0, 3, 8, 12)])
    assert T.panoptic_quality(T.panoptic_stats(gt, gt)) == {"pq": 1.0, "sq": 1.0, "rq": 1.0}


def test_pq_one_missed_instance():
    gt = _panoptic_map([(1, 1, 0, 4, 0, 4), (1, 2, 6, 10, 6, 10)])
    pred = _panoptic_map([(1, 1, 0, 4, 0, 4)])  # instance 2 predicted as background
    stats = T.panoptic_stats(pred, gt)
    # class 1: TP 1 (IoU 1), FN 1 -> 1 / 1.5; background: IoU = 112 / 128 (gt 144-32, pred 144-16), TP
    pq_thing = 1 / 1.5
    pq_bg = (144 - 32) / (144 - 16)
    got = T.panoptic_quality(stats)
    assert got["pq"] == pytest.approx((pq_thing + pq_bg) / 2, abs=1e-12)
    assert stats[0, 1].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_pq_two_instances_merged():
    gt = _panoptic_map([(1, 1, 0, 4, 0, 4), (1, 2, 0, 4, 4, 8)])
    pred = _panoptic_map([(1, 1, 0, 4, 0, 8)])  # one segment over both: IoU 0.5 with each, no match
    stats = T.panoptic_stats(pred, gt)
    assert stats[0, 1].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert T.panoptic_quality(stats)["pq"] == pytest.approx((0.0 + 1.0) / 2)


def test_pq_ignores_instance_ids_of_the_background_and_aggregates_over_images():
    gt = _panoptic_map([(1, 1, 0, 4, 0, 4)])
    pred = gt.clone()
    pred[0, 1][pred[0, 0] == 0] = 3  # an instance id on background pixels changes nothing
    both = T.panoptic_stats(torch.cat([pred, gt]), torch.cat([gt, gt]))
    assert T.panoptic_quality(both)["pq"] == 1.0 and both.shape == (2, 4, 4)


def test_depth_and_colour_metrics():
    depth = T.get_task("depth")
    y = torch.full((2, 1, 4, 4), 4.0)
    stats = depth.image_stats(y + 1.0, y, None)
    assert depth.aggregate(stats) == pytest.approx({"rmse": 1.0, "abs_rel": 0.25})
    col = T.get_task("colorization")
    d = T.generate("colorization", 64, seed=5)
    target = d.y.float() / 255
    same = col.aggregate(col.image_stats(target, d.y, d.fg))
    assert same["colour_fd"] == pytest.approx(0.0, abs=1e-6) and same["mse"] < 1e-8
    flat = target.mean((0, 2, 3), keepdim=True).expand_as(target)  # the mean colour everywhere
    worse = col.aggregate(col.image_stats(flat, d.y, d.fg))
    assert worse["colour_fd"] > 0.05


def test_bootstrap_is_paired_and_seeded():
    stats = torch.randn(100, 1, dtype=torch.float64)
    a = T.bootstrap(lambda s, t: float(s.mean() - t.mean()), [stats, stats], reps=20, seed=1)
    assert torch.equal(a, torch.zeros(20, dtype=torch.float64))  # the same rows in both
    b = T.bootstrap(lambda s: float(s.mean()), [stats], reps=20, seed=1)
    assert torch.equal(b, T.bootstrap(lambda s: float(s.mean()), [stats], reps=20, seed=1))
    assert b.std() > 0


# --------------------------------------------------------------------------------------------
# code dropout


def test_code_dropout_keeps_a_uniform_number_of_tokens():
    n = 16
    draws = 17_000
    g = torch.Generator().manual_seed(0)
    keep = code_dropout(draws, (4, 4), g)
    assert keep.shape == (draws, 4, 4) and set(keep.unique().tolist()) <= {0.0, 1.0}
    counts = torch.bincount(keep.flatten(1).sum(1).long(), minlength=n + 1).double()
    assert counts.numel() == n + 1  # 0 .. n kept
    expected = draws / (n + 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square with 16 degrees of freedom: P(chi2 > 60) < 1e-6
    assert chi2 < 60.0, counts.tolist()
    # the permutation spreads kept tokens evenly: each position is kept with probability E[k] / n = 1/2,
    # independently across examples; |z| > 5.5 at any of 16 positions has probability < 1e-6
    freq = keep.flatten(1).mean(0)
    se = math.sqrt(0.25 / draws)
    assert (freq - 0.5).abs().max() < 5.5 * se, freq.tolist()


def test_code_dropout_mask_channel_marks_dropped_tokens():
    model = StageOne(3, 1, 1, "fsq", [3, 3])
    x = torch.rand(2, 3, 32, 32)
    codes = torch.zeros(2, 2, 4, 4)  # the all-zero vector is an FSQ codeword
    kept = model.decode(x, codes, torch.ones(2, 4, 4))
    dropped = model.decode(x, codes, torch.zeros(2, 4, 4))
    assert not torch.allclose(kept, dropped)
    assert torch.equal(model.decode(x, None), dropped)


# --------------------------------------------------------------------------------------------
# shapes: the oracle path and the language-model path


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("task", T.TASKS)
def test_oracle_path_shapes(task, quantizer):
    t = T.get_task(task)
    d = T.generate(task, 5, seed=0)
    model = StageOne(t.x_channels, t.y_channels, t.out_channels, quantizer, [5, 3, 3], vq_dim=6)
    x, y = t.x(d, torch.arange(5)), d.y
    out, indices = model(x, t.encode_target(y), torch.Generator().manual_seed(0))
    assert out.shape == (5, t.out_channels, 32, 32)
    assert indices.shape == (5, 4, 4) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < model.codebook_size == 45
    loss = t.loss(out, y) + model.aux_loss
    loss.backward()
    assert model.oracle.net[0].weight.grad is not None  # the code is trained through the quantizer
    model.eval()
    codes, ind = model.encode(x, t.encode_target(y))
    assert torch.allclose(model.codes(ind), codes, atol=1e-6)  # indices decode to the same code
    pred = t.predict(model.decode(x, codes))
    assert pred.shape[0] == 5 and t.aggregate(t.image_stats(pred, y, d.fg))[t.metric] >= 0
    # what the language model reads with lm_input="features": the no-code bottleneck on the 8x8 grid
    feats = model.image_features(x)
    assert feats.shape == (5, 2 * 32, 8, 8)
    h1, h2, h = model.base.encode(x, torch.zeros(5, model.code_dim, 4, 4), torch.zeros(5, 4, 4))
    assert torch.equal(feats, h)


@pytest.mark.parametrize("in_stride,x_shape", [(4, (3, 1, 32, 32)), (1, (3, 64, 8, 8))])
def test_language_model_path_shapes_and_causality(in_stride, x_shape):
    torch.manual_seed(0)
    lm = CodeLM(vocab=45, num_tokens=16, x_channels=x_shape[1], width=32, depth=1, heads=2, in_stride=in_stride)
    x = torch.rand(*x_shape)
    tokens = torch.randint(0, 45, (3, 16))
    logits = lm(x, tokens)
    assert logits.shape == (3, 16, 45)
    assert lm.prefix(x).shape == (3, 64, 32)  # 8x8 image tokens
    # position j also reads the image under code cell j: changing the image there changes logit j
    x2 = x.clone()
    x2[..., -x_shape[-1] // 4:, -x_shape[-1] // 4:] += 1.0  # the last cell of the 4x4 code grid
    with torch.no_grad():
        assert not torch.allclose(lm(x2, tokens)[:, 15], logits[:, 15])
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 45
    after = lm(x, changed)
    assert torch.allclose(logits[:, :8], after[:, :8], atol=1e-5)  # position j sees tokens < j only
    assert not torch.allclose(logits[:, 8:], after[:, 8:])
    ce, acc = lm_loss(logits, tokens)
    assert ce.item() > 0 and 0 <= acc.item() <= 1
    lm.eval()
    greedy = lm.generate(x, temperature=0)
    assert greedy.shape == (3, 16) and greedy.dtype == torch.int64 and int(greedy.max()) < 45
    assert torch.equal(greedy, lm.generate(x, temperature=0))
    with torch.no_grad():  # greedy decoding is the argmax of the teacher-forced logits on its own output
        assert torch.equal(lm(x, greedy).argmax(-1), greedy)
    s1 = lm.generate(x, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(s1, lm.generate(x, 1.0, torch.Generator().manual_seed(5)))


# --------------------------------------------------------------------------------------------
# UViM's VQ


def test_uvim_vq_codewords_are_unit_norm_and_there_is_no_commitment_loss():
    vq = UViMVectorQuantizer(8, 4)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out, ind = vq(z)
    assert out.shape == z.shape and ind.shape == (2, 3, 3)
    assert torch.allclose(vq.codewords().norm(dim=1), torch.ones(8))
    assert float(vq.aux_loss) == 0.0
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through
    vq.eval()  # (a training forward moves the dictionary after quantizing)
    out, ind = vq(z)
    assert torch.allclose(out.detach(), vq.indices_to_codes(ind), atol=1e-6)


def test_uvim_vq_splits_the_most_used_codeword_into_the_rarest():
    vq = UViMVectorQuantizer(4, 3, min_count=0.1, perturb=1e-3)
    vq.counts.copy_(torch.tensor([10.0, 0.05, 3.0, 2.0]))
    before = vq.dictionary.clone()
    assert vq.split_rare() == 1
    assert vq.counts.tolist() == [5.0, 5.0, 3.0, 2.0]
    assert torch.allclose(vq.dictionary[0], before[0] / 2)
    ratio = vq.dictionary[1] / vq.dictionary[0]
    assert ((ratio - 1).abs() <= 1e-3 + 1e-6).all() and not torch.equal(vq.dictionary[1], vq.dictionary[0])
    assert torch.equal(vq.dictionary[2:], before[2:]) and int(vq.num_splits) == 1
    assert vq.split_rare() == 0  # nothing below min_count any more


def test_uvim_vq_revives_unused_codewords_during_training():
    torch.manual_seed(0)
    vq = UViMVectorQuantizer(16, 4, decay=0.5, min_count=0.1)
    vq.train()
    # data on two directions only: most codewords go unused, their counts decay, and they are split
    z = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]).repeat(64, 1)[:, :, None, None]
    z = z + 0.3 * torch.randn_like(z)
    for _ in range(10):
        vq(z)
    assert int(vq.num_splits) > 0
    assert (vq.counts >= 0.1).all()
    vq.eval()
    used = vq(z)[1].unique().numel()
    assert used > 2  # split codewords share the data of the frequent ones


def test_uvim_vq_split_is_deterministic():
    a, b = UViMVectorQuantizer(8, 4, decay=0.5, seed=3), UViMVectorQuantizer(8, 4, decay=0.5, seed=3)
    z = torch.randn(16, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        a(z), b(z)
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.counts, b.counts)
