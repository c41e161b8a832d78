"""Export -> from_pretrained, pretokenizing -> MaskGIT from codes, and image folders with corrupt
files: what a user of the trained tokenizer relies on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fsq_kernels.models import FSQTokenizer, MaskGIT, PretrainedError
from fsq_kernels.train import load_data, load_maskgit, load_tokenizer, tokenize_dataset
from fsq_kernels.train.cli import main
from tests.test_train import make_image_folder

CPU = torch.device("cpu")
TINY = ["--preset", "tiny", "--seed", "2", "--device", "cpu", "--set", "fsq_backend=cpp", "--steps", "2"]


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exp") / "tok")
    assert main(["tokenizer", *TINY, "--out", out]) == 0
    return out


def test_export_from_pretrained_round_trip(tok_run, tmp_path):
    exp = str(tmp_path / "export")
    assert main(["export", "--from", tok_run, "--out", exp]) == 0
    assert sorted(os.listdir(exp)) == ["SHA256SUMS", "config.json", "model.safetensors"]
    conf = json.load(open(os.path.join(exp, "config.json")))
    assert conf["model_type"] == "fsq_tokenizer" and conf["levels"] == [8, 5, 5, 5] and conf["variant"] == "paper"
    assert conf["quantizer"] == "fsq" and conf["architecture"]["channels"] == 8
    loaded = FSQTokenizer.from_pretrained(exp, map_location="cpu", backend="cpp")
    trained, tcfg = load_tokenizer(tok_run, CPU)  # the training checkpoint's EMA weights
    x = load_data(tcfg, 2)[1].batch(torch.arange(16))[0] * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[1], trained.encode(x)[1])
    # a run folder and its export load the same through the pipeline's loader
    assert torch.equal(load_tokenizer(exp, CPU)[0].encode(x)[1], trained.encode(x)[1])


def test_from_pretrained_names_the_bad_file(tok_run, tmp_path):
    exp = str(tmp_path / "e")
    main(["export", "--from", tok_run, "--out", exp])
    weights, config, sums = (os.path.join(exp, n) for n in ("model.safetensors", "config.json", "SHA256SUMS"))
    good = open(weights, "rb").read()
    open(weights, "wb").write(good[:-10] + b"0123456789")  # corrupted
    with pytest.raises(PretrainedError, match="model.safetensors is corrupted"):
        FSQTokenizer.from_pretrained(exp)
    open(weights, "wb").write(good)
    with pytest.raises(PretrainedError, match="describes a 'fsq_tokenizer' model; expected 'maskgit'"):
        MaskGIT.from_pretrained(exp)
    # a config that no longer matches the weights (sums recomputed, so only the shapes disagree)
    conf = json.load(open(config))
    conf["architecture"]["channels"] = 16
    json.dump(conf, open(config, "w"))
    from fsq_kernels.models.pretrained import sha256_file

    open(sums, "w").write(f"{sha256_file(weights)}  model.safetensors\n{sha256_file(config)}  config.json\n")
    with pytest.raises(PretrainedError, match="model.safetensors does not match the architecture"):
        FSQTokenizer.from_pretrained(exp)
    os.remove(config)
    with pytest.raises(PretrainedError, match="config.json is missing"):
        FSQTokenizer.from_pretrained(exp)


def test_tokenize_then_maskgit_from_codes(tok_run, tmp_path, capsys):
    codes = str(tmp_path / "codes")
    assert main(["tokenize", "--tokenizer", tok_run, "--out", codes, "--batch", "100", "--device", "cpu"]) == 0
    meta = json.load(open(os.path.join(codes, "meta.json")))
    assert meta["levels"] == [8, 5, 5, 5] and meta["token_grid"] == [8, 8] and meta["image_size"] == 32
    assert meta["data"] == "shapes" and meta["dtype"] == "int16" and meta["num_train"] == 256
    tokens = np.load(os.path.join(codes, "tokens.npy"), mmap_mode="r")
    assert tokens.dtype == np.int16 and tokens.shape == (256, 64)
    # the same ids as the in-memory tokenization MaskGIT used so far (other batch size, same model)
    tok, tcfg = load_tokenizer(tok_run, CPU)
    train_ds, val_ds = load_data(tcfg, 2)
    assert np.array_equal(tokens, tokenize_dataset(tok, train_ds, tcfg.channels_last, CPU).numpy())
    assert np.array_equal(np.load(os.path.join(codes, "labels.npy")), train_ds.labels.numpy())
    assert np.load(os.path.join(codes, "val_tokens.npy")).shape == (len(val_ds), 64)
    mg = str(tmp_path / "mg")
    assert main(["maskgit", "--preset", "tiny", "--seed", "2", "--device", "cpu", "--codes", codes,
                 "--steps", "2", "--out", mg]) == 0
    records = [json.loads(x) for x in open(os.path.join(mg, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("val_loss" in r and np.isfinite(r["val_loss"]) for r in records)
    model, _, tmeta = load_maskgit(mg, CPU)
    assert tmeta["codebook_size"] == 1000 and model.num_tokens == 64
    # MaskGIT exports and loads back the same way
    exp = str(tmp_path / "mg_export")
    assert main(["export", "--from", mg, "--out", exp]) == 0
    back = MaskGIT.from_pretrained(exp)
    t = torch.from_numpy(tokens[:4].astype(np.int64))
    with torch.no_grad():
        assert torch.equal(back(t, torch.zeros(4, dtype=torch.long)), model(t, torch.zeros(4, dtype=torch.long)))


def test_corrupt_image_folder_error_or_skip(tmp_path, capsys):
    root = tmp_path / "imgs"
    make_image_folder(root, 6, 16, 16)
    (root / "a" / "garbage.png").write_bytes(b"not a png at all")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    common = ["--preset", "tiny", "--device", "cpu", "--data", f"folder:{root}", "--set", "image_size=16",
              "--set", "num_workers=0", "--set", "num_val=2", "--set", "num_train=0", "--steps", "1"]
    out = tmp_path / "tok"
    assert main(["tokenizer", *common, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 unreadable image(s)" in err and "garbage.png" in err and "truncated.png" in err
    assert "skip_bad_images=true" in err and not list(out.glob("ckpt_*"))  # nothing trained
    assert main(["tokenizer", *common, "--set", "skip_bad_images=true", "--out", str(out)]) == 0
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    assert (out / "ckpt_00000001.pt").exists()
