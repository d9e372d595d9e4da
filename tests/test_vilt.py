"""ViLT (issue #7): MLM and ITM losses back-propagate into the transformer and the text embeddings, the masking
statistics, padding that cannot change the other positions, ITM negatives that never show a sample its own image,
forward/backward without host syncs, retrieval scores in chunks, text_pretrained and config errors, training
through the engine (vilt, vilt_freeatm) and the issue's command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from freeatm_fast.config import ConfigError, config_from_dict, load_config
from freeatm_fast.methods import build_method
from freeatm_fast.methods.text import _train_wordpiece, run_tokenizer, save_tokenizer, tokenize
from freeatm_fast.methods.vilt import ViLT

ROOT = Path(__file__).resolve().parents[1]
S, P, D = 32, 8, 32  # 16 patches + class token
TINY_KWARGS = {"img_size": S, "patch_size": P, "embed_dim": D, "depth": 2, "num_heads": 2}
TINY_MODEL = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_KWARGS, "channels_last": False}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
CAPTIONS = [
    "a red circle on a plain background",
    "a small blue square and a green star on a striped background",
    "an orange triangle, a purple cross and a yellow circle on a dotted background",
    "a green square on a plain background . the block 5 has a square .",
    "a yellow star",
    "a blue cross and a red triangle on a striped background",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A WordPiece tokenizer trained on toy-world-like words (what build_tokenizer trains from the data), saved
    like a run's, so that the unit tests need no rendered data set."""
    words = COLOURS + SHAPES + ["a", "an", "small", "and", "on", "plain", "striped", "dotted", "background"]
    texts = CAPTIONS + [" ".join(words)] + [f"the block {b} has a object ." for b in range(1, 10)]
    path = save_tokenizer(_train_wordpiece(texts, 200), tmp_path_factory.mktemp("tok"))
    return str(path)


def tiny_cfg(tokenizer_dir, **vlp):
    return config_from_dict(
        {
            "method": "vilt",
            "model": TINY_MODEL,
            "data": {"views": "vlp", "image_size": S},
            "vlp": {"tokenizer": tokenizer_dir, "max_len": 24, **vlp},
        }
    )


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, S, S, generator=g), "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------
# losses and gradients


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def _nonzero(g) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


TRANSFORMER = ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.weight", "backbone.norm.weight")
TEXT = ("text_embeddings.word_embeddings.weight", "text_embeddings.position_embeddings.weight")


def test_forward_backward_without_host_sync(tokenizer_dir):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir, lm_weight=0.5, itm_weight=2.0))
    assert isinstance(model, ViLT)
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)
    with OpRecorder() as rec:
        out = model(_batch())
        out["loss"].backward()
    assert rec.ops.get("aten._local_scalar_dense.default", 0) == 0, "host sync in forward/backward"
    assert set(out) == {"loss", "loss_mlm", "loss_itm", "acc_itm", "acc_mlm"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert float(out["loss"].detach()) == pytest.approx(
        0.5 * float(out["loss_mlm"]) + 2.0 * float(out["loss_itm"]), rel=1e-6
    )
    # random init: MLM near log(V), ITM near log(2)
    assert abs(float(out["loss_itm"]) - math.log(2)) < 0.3
    assert abs(float(out["loss_mlm"]) - math.log(model.vocab_size)) < 1.5
    grads = _grads(model)
    for name in (*TRANSFORMER, *TEXT, "backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.pos_embed"):
        assert _nonzero(grads[name]), name
    assert _nonzero(grads["modality_embeddings.weight"]) and _nonzero(grads["itm_head.weight"])
    assert _nonzero(grads["mlm_head.decoder.weight"]) and _nonzero(grads["pooler.0.weight"])
    opt.step()


@pytest.mark.parametrize("loss", ["mlm", "itm"])
def test_each_loss_reaches_the_transformer_and_the_text_embeddings(loss, tokenizer_dir):
    """With the other loss weighted 0, each loss alone back-propagates into the blocks and the text embeddings,
    and leaves the other loss's head without gradient."""
    torch.manual_seed(1)
    weights = {"lm_weight": 1.0, "itm_weight": 0.0} if loss == "mlm" else {"lm_weight": 0.0, "itm_weight": 1.0}
    model = build_method(tiny_cfg(tokenizer_dir, **weights))
    out = model(_batch())
    assert torch.isfinite(out[f"loss_{loss}"]) and float(out[f"loss_{loss}"]) > 0
    out["loss"].backward()
    grads = _grads(model)
    for name in (*TRANSFORMER, *TEXT, "backbone.patch_embed.proj.weight", "modality_embeddings.weight"):
        assert _nonzero(grads[name]), name
    own, other = ("mlm_head.decoder.weight", "itm_head.weight")[:: 1 if loss == "mlm" else -1]
    assert _nonzero(grads[own]) and not _nonzero(grads[other])


def test_mlm_counts_only_the_masked_tokens_of_matched_pairs(tokenizer_dir):
    """loss_mlm equals the mean cross-entropy over the chosen tokens of the matched rows (recomputed from the same
    random draws); the unmatched rows' tokens are left out."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir)).eval()
    batch = _batch(8)
    with torch.no_grad():
        model.mlm_head.decoder.weight.mul_(30.0)  # spread the per-token losses (at init they are all ~log V)
        torch.manual_seed(3)
        out = model(batch)
        torch.manual_seed(3)
        ids, am = tokenize(model.tokenizer, batch["caption"], 24)
        masked, labels = model.mask_tokens(ids, am)
        index, matched = model.itm_pairs(8, torch.device("cpu"))
        fused = model.fuse(model.embed_text(masked), am, model.embed_image(batch["image"])[index])
        logits = model.mlm_head(fused[:, :24])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(8, 24)
        chosen = labels != -100
        itm = torch.nn.functional.cross_entropy(model.itm_logits(fused), matched.long())
    assert 0 < int(matched.sum()) < 8  # this seed draws both kinds
    want = ce[chosen & matched[:, None]].mean()
    assert float(out["loss_mlm"]) == pytest.approx(float(want), rel=1e-5)
    assert float(out["loss_mlm"]) != pytest.approx(float(ce[chosen].mean()), rel=1e-3)
    assert float(out["loss_itm"]) == pytest.approx(float(itm), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# masking and pairing


def test_masking_statistics(tokenizer_dir):
    """Over many draws the share of chosen tokens is mlm_prob, split 80/10/10 into [MASK] / random / unchanged;
    special and padding tokens are never chosen; every caption with a token to mask gets at least one."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir, mlm_prob=0.15, max_len=48))
    tok = model.tokenizer
    long_caption = " and ".join(f"a {c} {s}" for c in COLOURS for s in SHAPES[:2]) + " on a plain background"
    ids, am = tokenize(tok, [long_caption] * 3000, 48)
    eligible = am.bool() & ~model.special_ids[ids]
    assert int(eligible[0].sum()) >= 40 and int((am[0] == 0).sum()) == 0  # fills the 48 tokens
    corrupted, labels = model.mask_tokens(ids, am)
    chosen = labels != -100
    assert not (chosen & ~eligible).any()
    assert torch.equal(labels[chosen], ids[chosen])
    share = float(chosen.sum()) / float(eligible.sum())
    assert abs(share - 0.15) < 0.005, share  # 3000 x 46 tokens: sigma ~ 0.0003
    masked = chosen & (corrupted == tok.mask_token_id)
    same = chosen & (corrupted == ids)
    other = chosen & ~masked & ~same
    n = float(chosen.sum())
    assert abs(float(masked.sum()) / n - 0.8) < 0.02
    assert abs(float(same.sum()) / n - (0.1 + 0.1 / model.vocab_size)) < 0.02
    assert abs(float(other.sum()) / n - 0.1 * (1 - 1 / model.vocab_size)) < 0.02
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # nothing else changes

    # short captions and padding: one token each (0.15 x 3 rounds to 1 at most), never [CLS] / [SEP] / [PAD]
    ids, am = tokenize(tok, ["a red circle", "a small blue star on a plain background", ""] * 500, 48)
    corrupted, labels = model.mask_tokens(ids, am)
    chosen = labels != -100
    counts = chosen.sum(1).view(500, 3)
    assert (counts[:, 0] == 1).all() and (counts[:, 1] >= 1).all() and (counts[:, 2] == 0).all()
    specials = torch.tensor(tok.all_special_ids)
    assert not torch.isin(ids[chosen], specials).any() and not (chosen & (am == 0)).any()
    assert torch.equal(corrupted[am == 0], ids[am == 0]) and (ids[:, 0] == tok.cls_token_id).all()
    assert (corrupted[:, 0] == tok.cls_token_id).all()

    zero = build_method(tiny_cfg(tokenizer_dir, mlm_prob=0.0))
    _, labels = zero.mask_tokens(ids, am)
    assert (labels == -100).all()


def test_itm_negatives_never_show_a_sample_its_own_image(tokenizer_dir):
    model = build_method(tiny_cfg(tokenizer_dir))
    torch.manual_seed(0)
    for b in (2, 3, 5, 8):
        hits = torch.zeros(b, b)
        n_matched = 0
        for _ in range(400):
            index, matched = model.itm_pairs(b, torch.device("cpu"))
            own = torch.arange(b)
            assert torch.equal(index[matched], own[matched])  # matched: its own image
            assert (index[~matched] != own[~matched]).all()  # negative: never its own image
            assert ((index >= 0) & (index < b)).all()
            hits[own[~matched], index[~matched]] += 1
            n_matched += int(matched.sum())
        assert abs(n_matched / (400 * b) - 0.5) < 0.08
        off = hits[~torch.eye(b, dtype=torch.bool)]
        assert (hits.diagonal() == 0).all() and (off > 0).all()  # every other image gets used
    index, matched = model.itm_pairs(1, torch.device("cpu"))
    assert index.tolist() == [0] and matched.tolist() == [True]
    # through forward: with distinct captions, a negative pair shows another caption's image
    batch = _batch(6)
    assert len(set(batch["caption"])) == 6
    torch.manual_seed(5)
    model(batch)
    torch.manual_seed(5)
    ids, am = tokenize(model.tokenizer, batch["caption"], 24)
    model.mask_tokens(ids, am)
    index, matched = model.itm_pairs(6, torch.device("cpu"))
    assert all(batch["caption"][j] != batch["caption"][i] for i, j in enumerate(index.tolist()) if not matched[i])


def test_padding_does_not_change_the_other_positions(tokenizer_dir):
    """Changing the ids at padded positions, or padding to a longer length, leaves every real text token's and
    every image token's output unchanged; without the mask (padding attended) they would change."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir, max_len=24)).eval()
    captions = ["a red circle", "a small blue square and a green star on a striped background"]
    images = _batch(2)["image"]
    with torch.no_grad():
        image = model.embed_image(images)
        ids, am = tokenize(model.tokenizer, captions, 16)
        assert (am[0] == 0).sum() >= 8  # the short caption is mostly padding
        base = model.fuse(model.embed_text(ids), am, image)
        scrambled = torch.where(am.bool(), ids, torch.randint(model.vocab_size, ids.shape))
        out = model.fuse(model.embed_text(scrambled), am, image)
        ids24, am24 = tokenize(model.tokenizer, captions, 24)
        longer = model.fuse(model.embed_text(ids24), am24, image)
        attended = model.fuse(model.embed_text(scrambled), torch.ones_like(am), image)
    real = am.bool()
    for other, text_len in ((out, 16), (longer, 24)):
        assert torch.allclose(other[:, :16][real], base[:, :16][real], atol=1e-5)
        assert torch.allclose(other[:, text_len:], base[:, 16:], atol=1e-5)  # image tokens
    assert not torch.allclose(attended[:, 16:], base[:, 16:], atol=1e-3)
    with torch.no_grad():
        s1 = model.itm_logits(base)
        s2 = model.itm_logits(longer)
    assert torch.allclose(s1, s2, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# retrieval, text_pretrained, config errors


def test_retrieval_scores(tokenizer_dir):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir)).eval()
    images = _batch(3)["image"]
    captions = CAPTIONS[:5]
    i2t, t2i = model.retrieval_scores(images, captions)
    assert i2t.shape == (3, 5) and i2t is t2i and i2t.dtype == torch.float32 and not i2t.requires_grad
    assert torch.isfinite(i2t).all() and i2t.std() > 0
    small, _ = model.retrieval_scores(images, captions, pairs_per_forward=4)  # 4 captions x 1 image per pass
    assert torch.allclose(small, i2t, atol=1e-5)
    with torch.no_grad():  # pair (2, 3) alone
        ids, am = tokenize(model.tokenizer, [captions[3]], 24)
        one = model.itm_logits(model.fuse(model.embed_text(ids), am, model.embed_image(images[2:3])))[0, 1]
    assert float(i2t[2, 3]) == pytest.approx(float(one), abs=1e-5)


def test_text_pretrained_word_embeddings(tokenizer_dir, tmp_path):
    from transformers import BertConfig, BertModel

    vocab = len(_tokenizer(tokenizer_dir)) - 2  # the tokenizer has two tokens more than the checkpoint
    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=1, num_attention_heads=2))
    bert.save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    model = build_method(tiny_cfg(tokenizer_dir, text_pretrained=str(tmp_path / "bert")))
    word = model.text_embeddings.word_embeddings.weight
    assert torch.equal(word[:vocab], bert.embeddings.word_embeddings.weight)
    assert not torch.equal(word[vocab:], torch.zeros_like(word[vocab:]))
    with pytest.raises(ConfigError, match="vlp.text_pretrained"):
        build_method(tiny_cfg(tokenizer_dir, text_pretrained=str(tmp_path / "missing")))
    wide = BertModel(BertConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=1, num_attention_heads=2))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match="vlp.text_pretrained.*embed_dim"):
        build_method(tiny_cfg(tokenizer_dir, text_pretrained=str(tmp_path / "wide")))


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_config_errors(tokenizer_dir):
    vlp = {"tokenizer": tokenizer_dir}
    with pytest.raises(ConfigError, match="data.views"):
        build_method(config_from_dict({"method": "vilt", "model": TINY_MODEL, "data": {"image_size": S}, "vlp": vlp}))
    with pytest.raises(ConfigError, match="model.backbone"):
        cfg = {"method": "vilt", "model": {"backbone": "resnet10t"}, "data": {"views": "vlp"}, "vlp": vlp}
        build_method(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="img_size"):
        cfg = {"method": "vilt", "model": TINY_MODEL, "data": {"views": "vlp", "image_size": 64}, "vlp": vlp}
        build_method(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="vlp.tokenizer"):
        build_method(tiny_cfg("/nonexistent/tokenizer"))
    with pytest.raises(ConfigError, match="vlp.mlm_prob"):
        load_config("vilt", ["vlp.mlm_prob=1.5"])


# ---------------------------------------------------------------------------------------------------------------
# through the engine

TINY = [
    f"model.backbone_kwargs={json.dumps(TINY_KWARGS)}",
    f"data.image_size={S}",
    "data.num_workers=0",
    "data.toy_train_images=96",
    "data.toy_val_images=48",
    "data.toy_image_size=32",
    "vlp.max_len=32",
    "train.batch_size=8",
    "train.max_steps=3",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.tensorboard=false",
    "eval.knn=false",
]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["vilt", "vilt_freeatm"])
def test_training_steps(name, toy_cache, tmp_path):
    """Three steps through the engine; vilt_freeatm also runs the retrieval eval on 16 images."""
    from freeatm_fast.engine import train

    retrieval = name == "vilt_freeatm"
    extra = ["eval.retrieval=true", "vlp.retrieval_max_images=16"] if retrieval else ["eval.retrieval=false"]
    run = tmp_path / "run"
    summary = train(load_config(name, [*TINY, *extra, f"train.out_dir={run}"]))
    rows = _metrics(run)
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("loss", "loss_mlm", "loss_itm", "acc_itm", "acc_mlm"):
            assert math.isfinite(r[k]), (k, r)
        assert 0 <= r["acc_itm"] <= 1 and 0 <= r["acc_mlm"] <= 1
    assert (run / "tokenizer" / "tokenizer.json").is_file()  # save_artifacts
    assert (run / "model.safetensors").is_file() and (run / "backbone.safetensors").is_file()
    tok = _tokenizer(run / "tokenizer")
    assert tok.mask_token == "[MASK]" and len(tok) == _saved_vocab(run)
    if retrieval:
        assert "retrieval" in summary["eval"] and (run / "eval_retrieval.json").is_file()


def test_tokenizer_trained_once_per_run_and_kept_on_resume(toy_cache, tmp_path):
    """tokenizers' WordPiece trainer orders its vocabulary by hash-map order (two trainings on the same captions
    differ); the engine trains it once into the run directory and a resumed run loads that file unchanged."""
    from freeatm_fast.engine import train

    cfg = load_config("vilt", [*TINY, "eval.retrieval=false"])
    run = tmp_path / "run"
    args = [*TINY, "eval.retrieval=false", f"train.out_dir={run}"]
    train(load_config("vilt", [*args, "train.stop_at=2"]))  # stops with a checkpoint after step 2
    saved = (run / "tokenizer" / "tokenizer.json").read_bytes()
    summary = train(load_config("vilt", args))  # resumes at step 2
    assert summary["steps"] == 3 and [r["step"] for r in _metrics(run)] == [1, 2, 3]
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == saved  # loaded, not retrained
    assert len(_tokenizer(run / "tokenizer")) == _saved_vocab(run)

    # run_tokenizer alone: a resume from another run's checkpoints copies that run's tokenizer
    other = tmp_path / "other"
    barriers = []
    got = run_tokenizer(cfg, other, is_main=True, barrier=lambda: barriers.append(1), resume_dir=run)
    assert got == other / "tokenizer" and (got / "tokenizer.json").read_bytes() == saved and barriers == [1]
    # a resumed run without its tokenizer: a clear error, nothing trained
    with pytest.raises(FileNotFoundError, match="tokenizer is missing"):
        run_tokenizer(cfg, tmp_path / "third", is_main=True, barrier=lambda: None, resume_dir=tmp_path / "nowhere")
    # a non-main rank only waits, then loads the folder rank 0 wrote
    assert run_tokenizer(cfg, run, is_main=False, barrier=lambda: None) == run / "tokenizer"
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == saved


def _saved_vocab(run_dir) -> int:
    """The MLM decoder's output size in the saved model (= the saved tokenizer's length)."""
    from safetensors import safe_open

    with safe_open(str(Path(run_dir) / "model.safetensors"), framework="pt") as f:
        return f.get_slice("mlm_head.decoder.weight").get_shape()[0]


def test_issue_command_line(tmp_path, clean_env):
    """python freeatm_fast/train.py --config vilt_freeatm train.max_steps=3 train.out_dir=<tmp> (the shipped toy
    config on the full toy world)."""
    cmd = [sys.executable, "freeatm_fast/train.py", "--config", "vilt_freeatm", "train.max_steps=3"]
    cmd.append(f"train.out_dir={tmp_path}/run")
    # a fresh one-process group, the full toy world where the user keeps it (conftest's clean_env)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=clean_env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "method=vilt freeatm=on" in out and "step 3/3" in out and "loss_mlm" in out and "loss_itm" in out
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "eval_retrieval.json").is_file() and "retrieval i2t R@1/5/10" in out
