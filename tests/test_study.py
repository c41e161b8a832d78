"""The FSQ-vs-VQ codebook study (fsq_kernels/study.py) and the VQ baseline (models/vq.py)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from fsq_kernels.models.tokenizer import FSQTokenizer
from fsq_kernels.models.vq import VectorQuantizer
from fsq_kernels.study import CSV_COLUMNS, PAPER_LEVELS, StudySettings, run_study


# --------------------------------------------------------------------------------------------
# VectorQuantizer

def _spread_vq(k=16, dim=3, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(k, dim, **kw)
    with torch.no_grad():
        vq.embedding.copy_(torch.randn(k, dim))
    if vq.ema:
        vq.embedding_sum.copy_(vq.embedding)
    return vq


def test_vq_nearest_code_and_shapes():
    vq = _spread_vq()
    z = torch.randn(2, 3, 4, 5)  # channel-first (B, dim, H, W)
    out, ind = vq(z)
    assert out.shape == z.shape and ind.shape == (2, 4, 5) and ind.dtype == torch.long
    flat = z.movedim(1, -1).reshape(-1, 3)
    ref = torch.cdist(flat.double(), vq.embedding.detach().double()).argmin(1)
    assert torch.equal(ind.flatten(), ref)
    torch.testing.assert_close(out, vq.indices_to_codes(ind))
    with pytest.raises(ValueError, match="dim=3"):
        vq(torch.randn(2, 4, 3, 3))


def test_vq_chunked_search_matches_full():
    vq = _spread_vq(k=4096, dim=4)  # 2^18 / 4096 = 64 rows per chunk: many chunks and a partial one
    flat = torch.randn(1000, 4)
    ref = torch.cdist(flat.double(), vq.embedding.detach().double()).argmin(1)
    assert torch.equal(vq._nearest(flat), ref)


def test_vq_straight_through_gradient():
    vq = _spread_vq()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, _ = vq(z)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # d out / d z = identity
    assert vq.embedding.grad is None or torch.count_nonzero(vq.embedding.grad) == 0


def test_vq_losses_and_their_gradients():
    vq = _spread_vq(beta=0.25)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out, ind = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    q = vq.embedding.detach()[ind.flatten()]
    mse = F.mse_loss(q, flat)
    torch.testing.assert_close(vq.aux_loss, (1 + 0.25) * mse)
    vq.aux_loss.backward()
    n = flat.numel()
    # codebook loss ||sg(z) - e||^2 moves the codes; commitment beta ||z - sg(e)||^2 moves the encoder
    want_e = torch.zeros_like(vq.embedding).index_add_(0, ind.flatten(), 2 * (q - flat) / n)
    torch.testing.assert_close(vq.embedding.grad, want_e)
    want_z = (0.25 * 2 * (flat - q) / n).view(2, 4, 4, 3).movedim(-1, 1)
    torch.testing.assert_close(z.grad, want_z)


def test_vq_ema_update_moves_codes_toward_assigned_vectors():
    vq = _spread_vq(k=8, dim=2, ema=True, decay=0.9)
    assert not vq.embedding.requires_grad
    before = vq.embedding.detach().clone()
    # vectors around code 0 and code 1, offset by a fixed amount
    target = before[:2] + torch.tensor([[0.05, -0.05], [-0.05, 0.05]])
    z = target.repeat_interleave(10, 0).view(2, 10, 1, 2).permute(0, 3, 1, 2)  # (2, dim, 10, 1)
    vq.train()
    for _ in range(20):
        _, ind = vq(z)
        assert set(ind.unique().tolist()) == {0, 1}
    after = vq.embedding.detach()
    for c in (0, 1):
        assert (after[c] - target[c]).norm() < 0.5 * (before[c] - target[c]).norm()
    # codes never assigned keep their place (the EMA state starts consistent with the codebook)
    torch.testing.assert_close(after[2:], before[2:], rtol=1e-4, atol=1e-4)
    # eval mode: no update
    vq.eval()
    frozen = vq.embedding.detach().clone()
    vq(z + 1.0)
    torch.testing.assert_close(vq.embedding.detach(), frozen)


def test_tokenizer_vq_option():
    tok = FSQTokenizer(levels=[8, 6, 5], channels=8, channel_mult=[1, 2], quantizer="vq")
    assert isinstance(tok.quantizer, VectorQuantizer)
    assert tok.codebook_size == 240 and tok.quantizer.dim == 3
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, ind = tok(x)
    assert rec.shape == x.shape and ind.shape == (2, 8, 8)
    assert tok.quantizer.aux_loss.requires_grad
    assert tok.decode_indices(ind).shape == x.shape
    assert FSQTokenizer(levels=[8, 6, 5], channels=8, channel_mult=[1, 2], quantizer="vq",
                        vq_dim=16).quantizer.dim == 16
    with pytest.raises(ValueError, match="quantizer"):
        FSQTokenizer(levels=[8, 6, 5], channels=8, quantizer="rvq")


# --------------------------------------------------------------------------------------------
# the study

def test_paper_levels():
    assert {k: math.prod(v) for k, v in PAPER_LEVELS.items()} == {6: 64, 8: 240, 10: 1000, 12: 4375, 14: 15360}


TINY = StudySettings(sizes=[6, 8], steps=2, usage_tokens=2000, psnr_images=16, jobs=1,
                     overrides=dict(num_train=64, num_val=16, image_size=16, tok_channels=8, tok_batch=8,
                                    warmup_steps=1))


def test_run_study_tiny(tmp_path):
    out = tmp_path / "study"
    rows = run_study(str(out), settings=TINY)
    assert len(rows) == 4
    for name in ("study.csv", "study.md", "study.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "study.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        recs = list(reader)
    assert sorted((r["quantizer"], int(r["nominal_size"])) for r in recs) == [
        ("fsq", 64), ("fsq", 256), ("vq", 64), ("vq", 256)]
    for r in recs:
        k = int(r["codebook_size"])
        assert k == {64: 64, 256: 240}[int(r["nominal_size"])]
        usage, ppl, psnr = float(r["codebook_usage"]), float(r["perplexity"]), float(r["psnr"])
        assert 0 < usage <= 1 and usage * k == pytest.approx(round(usage * k), abs=1e-3)
        assert 1 <= ppl <= usage * k + 1e-6
        assert 0 < psnr < 60
    md = (out / "study.md").read_text()
    assert "| 2^6 |" in md and "| 2^8 |" in md and "2,000 tokens" in md  # 125 images x 16
    assert rows[0]["usage_tokens"] >= TINY.usage_tokens
    # a rerun with the same OUT reuses the finished models
    again = run_study(str(out), settings=TINY)
    assert [r["codebook_usage"] for r in again] == [r["codebook_usage"] for r in rows]


def test_train_cli_dispatches_study(capsys):
    from fsq_kernels.train import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
