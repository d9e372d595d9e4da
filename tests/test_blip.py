"""BLIP pretraining (issue #7): each loss (ITC, ITM, LM) back-propagates into the image encoder and the text models,
no host sync in a training step, the attention patterns of the text encoder and decoder, the momentum encoders'
EMA, the feature queues, the hard-negative sampler, retrieval scores with and without ITM re-ranking, loading a
BERT checkpoint, config errors, training through the engine, and the issue's command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from freeatm_fast.config import ConfigError, config_from_dict, load_config
from freeatm_fast.methods import build_method
from freeatm_fast.methods.blip import BLIP, RERANK_LOW, hard_negatives, sample_rows
from freeatm_fast.methods.text import build_tokenizer, tokenize

ROOT = Path(__file__).resolve().parents[1]
S = 32
VIT = {"img_size": S, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# text width 48 != the ViT's 32: the image tokens go through the image_to_text projection
TINY_VLP = {
    "text_width": 48,
    "text_layers": 2,
    "text_heads": 2,
    "embed_dim": 16,
    "queue_size": 16,
    "max_len": 32,
    "vocab_size": 300,
}
TOY_DATA = {"toy_train_images": 96, "toy_val_images": 48, "toy_image_size": 32, "num_workers": 0}
CAPTIONS = [
    "a red circle on a striped background",
    "a small blue star and a green square on a dotted background . The block 3 has a blue star .",
    "a yellow triangle, a small red ring and a white cross on a checkered background",
    "a green circle on a noisy background . The block 5 has a green circle .",
    "a blue square and a small yellow star on a gradient background",
    "a white ring on a striped background . The block 9 has a white ring .",
]


def tiny_cfg(vlp=None, **sections):
    values = {
        "method": "blip",
        "model": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": VIT, "channels_last": False},
        "data": {"views": "vlp", "image_size": S, **TOY_DATA},
        "vlp": {**TINY_VLP, **(vlp or {})},
    }
    values.update(sections)
    return config_from_dict(values)


def tiny_model(seed=0, **vlp) -> BLIP:
    torch.manual_seed(seed)
    model = build_method(tiny_cfg(vlp))
    assert isinstance(model, BLIP)
    return model


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

# parameters that each loss must reach (gradient not None and not all zero)
REACHES = {
    "loss_itc": [
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.attn.qkv.weight",
        "vision_proj.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_proj.weight",
        "temp",
    ],
    "loss_itm": [
        "backbone.patch_embed.proj.weight",
        "image_to_text.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "itm_head.weight",
    ],
    "loss_lm": [
        "backbone.patch_embed.proj.weight",
        "image_to_text.weight",
        "text_decoder.embeddings.word_embeddings.weight",
        "text_decoder.encoder.layer.0.attention.self.query.weight",
        "text_decoder.encoder.layer.1.crossattention.self.value.weight",
        "lm_head.decoder.weight",
    ],
}
# ... and parameters it must not reach
MISSES = {
    "loss_itc": [
        "text_encoder.encoder.layer.0.crossattention.self.key.weight",
        "itm_head.weight",
        "lm_head.decoder.weight",
    ],
    "loss_itm": ["vision_proj.weight", "text_proj.weight", "text_decoder.embeddings.word_embeddings.weight"],
    "loss_lm": ["text_encoder.embeddings.word_embeddings.weight", "vision_proj.weight", "itm_head.weight"],
}


def test_each_loss_back_propagates_into_the_image_encoder_and_the_text_models(toy_cache):
    model = tiny_model()
    params = dict(model.named_parameters())
    out = model.losses(_batch())
    assert 0 <= float(out["acc_itm"]) <= 1
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        loss = out[name]
        assert loss.dim() == 0 and torch.isfinite(loss), name
        names = REACHES[name] + MISSES[name]
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
        grad = dict(zip(names, grads, strict=True))
        for n in REACHES[name]:
            assert grad[n] is not None and grad[n].abs().sum() > 0, f"{name} does not reach {n}"
        for n in MISSES[name]:
            assert grad[n] is None or grad[n].abs().sum() == 0, f"{name} reaches {n}"
    # the momentum encoders are frozen and left out of the optimizer
    momentum = (model.backbone_m, model.text_encoder_m, model.vision_proj_m, model.text_proj_m)
    frozen = {id(p) for mod in momentum for p in mod.parameters()}
    assert all(not p.requires_grad for mod in momentum for p in mod.parameters())
    in_optimizer = {id(p) for g in model.param_groups(0.05) for p in g["params"]}
    assert not frozen & in_optimizer
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_forward_combines_the_weighted_losses(toy_cache):
    model = tiny_model(itm_weight=0.5, lm_weight=2.0).eval()  # eval: no dropout, deterministic apart from sampling
    batch = _batch()
    ids, mask = tokenize(model.tokenizer, batch["caption"], model.cfg.vlp.max_len)
    # ITC by hand (before the forward enqueues): soft targets 0.4 * softmax(momentum sims) + 0.6 * one-hot over
    # [batch momentum features; queue], temperature 0.07, mean of both directions
    with torch.no_grad():
        img = model.image_features(model.image_tokens(batch["image"]))
        txt = model.text_features(ids, mask)
        img_m, txt_m = model.momentum_features(batch["image"], ids, mask)
        keys_t, keys_i = torch.cat([txt_m, model.text_queue]), torch.cat([img_m, model.image_queue])
        one_hot = torch.eye(6, keys_t.shape[0])

        def soft_ce(anchor, anchor_m, keys):
            target = 0.4 * F.softmax(anchor_m @ keys.T / 0.07, dim=1) + 0.6 * one_hot
            return -(F.log_softmax(anchor @ keys.T / 0.07, dim=1) * target).sum(1).mean()

        want_itc = (soft_ce(img, img_m, keys_t) + soft_ce(txt, txt_m, keys_i)) / 2
    torch.manual_seed(3)
    out = model(batch)
    assert float(out["loss_itc"]) == pytest.approx(float(want_itc), rel=1e-5)
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm", "acc_itm"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss") and out["loss"].requires_grad
    want = out["loss_itc"] + 0.5 * out["loss_itm"] + 2.0 * out["loss_lm"]
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-6)
    # LM loss by hand: next-token cross-entropy with label smoothing 0.1 over the real tokens after [DEC]
    with torch.no_grad():
        image = model.image_to_text(model.image_tokens(batch["image"]))
        dec = ids.clone()
        dec[:, 0] = model.tokenizer.bos_token_id
        logits = model.lm_head(model.text_decoder(dec, mask, image, causal=True))[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        want_lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=0.1)
    assert float(out["loss_lm"]) == pytest.approx(float(want_lm), rel=1e-5)


def test_training_step_without_host_sync(toy_cache):
    model = tiny_model()
    batch = _batch()
    with OpRecorder() as rec:
        out = model(batch)
        out["loss"].backward()
    assert rec.ops.get("aten._local_scalar_dense.default", 0) == 0, "host sync in forward/backward"
    assert torch.isfinite(out["loss"])


def test_text_attention_patterns(toy_cache):
    """Encoder: bidirectional, padding invisible; decoder: causal; cross-attention sees the image."""
    model = tiny_model().eval()
    ids, mask = tokenize(model.tokenizer, CAPTIONS[:2], model.cfg.vlp.max_len)
    n = int(mask[0].sum())
    image = torch.randn(2, 17, 48)
    with torch.no_grad():
        enc = model.text_encoder(ids, mask)
        later = ids.clone()
        later[:, n - 2] = ids[1, 1]  # change a late real token of caption 0
        assert not torch.allclose(model.text_encoder(later, mask)[0, 0], enc[0, 0])  # [CLS] sees it
        pads = ids.clone()
        pads[0, n:] = ids[1, 1]  # junk in the padding of caption 0
        assert torch.allclose(model.text_encoder(pads, mask)[0, :n], enc[0, :n], atol=1e-6)
        dec = model.text_decoder(ids, None, image, causal=True)
        # right padding: the causal decoder needs no padding mask for the real tokens
        masked = model.text_decoder(ids, mask, image, causal=True)
        assert torch.allclose(masked[0, :n], dec[0, :n], atol=1e-5)
        dec_later = model.text_decoder(later, None, image, causal=True)
        assert torch.allclose(dec_later[0, : n - 2], dec[0, : n - 2], atol=1e-6)  # earlier positions unchanged
        assert not torch.allclose(dec_later[0, n - 2], dec[0, n - 2])
        grounded = model.text_encoder(ids, mask, image)
        assert not torch.allclose(model.text_encoder(ids, mask, image.flip(0))[0, 0], grounded[0, 0])


# ---------------------------------------------------------------------------------------------------------------
# momentum encoders, queues, negatives


def test_ema_moves_the_momentum_encoders_toward_the_online_ones(toy_cache):
    model = tiny_model(momentum=0.9)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    model(_batch())["loss"].backward()
    opt.step()
    pairs = [
        (model.backbone_m, model.backbone),
        (model.vision_proj_m, model.vision_proj),
        (model.text_encoder_m, model.text_encoder),
        (model.text_proj_m, model.text_proj),
    ]

    def gap() -> float:
        return sum(
            float((t - o.detach()).norm())
            for m, online in pairs
            for t, o in zip(m.parameters(), online.parameters(), strict=True)
        )

    before = [[p.detach().clone() for p in m.parameters()] for m, _ in pairs]
    gap_before = gap()
    assert gap_before > 0  # the step moved the online models away from their copies
    with torch.no_grad():
        model.temp.fill_(2.0)  # out of BLIP's range: after_step clamps it back
        model.after_step(0, 10)
    for (m, online), ts in zip(pairs, before, strict=True):
        for t0, t1, o in zip(ts, m.parameters(), online.parameters(), strict=True):
            assert torch.allclose(t1, 0.9 * t0 + 0.1 * o.detach(), atol=1e-6)
    assert gap() == pytest.approx(0.9 * gap_before, rel=1e-4)
    assert float(model.temp.detach()) == 0.5


def test_queues_take_the_momentum_features(toy_cache):
    model = tiny_model().eval()  # no dropout: the momentum features can be recomputed exactly
    assert model.image_queue.shape == model.text_queue.shape == (16, 16)
    batches = [_batch(6, seed=s) for s in range(3)]
    expected = []
    for b in batches:
        ids, mask = tokenize(model.tokenizer, b["caption"], model.cfg.vlp.max_len)
        expected.append(model.momentum_features(b["image"], ids, mask))
        model(b)
    # 18 features into a ring of 16: batch 0 at rows 0-5 (rows 0-1 overwritten by batch 2), 1 at 6-11, 2 at 12-15, 0-1
    assert int(model.image_queue_ptr) == int(model.text_queue_ptr) == 18 % 16
    for q, k in ((model.image_queue, 0), (model.text_queue, 1)):
        assert torch.allclose(q[2:6], expected[0][k][2:6], atol=1e-5)
        assert torch.allclose(q[6:12], expected[1][k], atol=1e-5)
        assert torch.allclose(q[12:16], expected[2][k][:4], atol=1e-5)
        assert torch.allclose(q[0:2], expected[2][k][4:], atol=1e-5)
        assert torch.allclose(q.norm(dim=1), torch.ones(16), atol=1e-5)
    # queue_size=0: the batch alone gives the negatives
    empty = tiny_model(queue_size=0)
    out = empty(_batch())
    assert empty.image_queue.shape == (0, 16) and torch.isfinite(out["loss"])


def test_negative_sampler_matches_multinomial():
    """sample_rows draws index j with probability w_j / sum(w), like torch.multinomial(w, 1); zero weights never."""
    torch.manual_seed(0)
    w = torch.tensor([[0.0, 1.0, 2.0, 5.0], [3.0, 0.0, 1.0, 0.0]])
    n = 20000
    draws = sample_rows(w.repeat(n, 1)).view(n, 2)
    ref = torch.multinomial(w.repeat(n, 1), 1).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=4).float() / n
        ref_freq = torch.bincount(ref[:, row], minlength=4).float() / n
        p = w[row] / w[row].sum()
        assert (freq - p).abs().max() < 0.015, (freq, p)
        assert (ref_freq - p).abs().max() < 0.015
        assert freq[w[row] == 0].sum() == 0


def test_hard_negatives_are_similar_but_never_the_positive():
    torch.manual_seed(0)
    B = 16
    rows = torch.arange(B)
    hard = (rows + 3) % B  # the most similar wrong partner of each row
    sim = torch.zeros(B, B)
    sim[rows, rows] = 4.0
    sim[rows, hard] = 8.0
    picks_text, picks_image = [], []
    for _ in range(200):
        neg_text, neg_image = hard_negatives(sim, sim.T.contiguous())
        assert neg_text.dtype == neg_image.dtype == torch.int64 and neg_text.shape == (B,)
        assert (neg_text != rows).all() and (neg_image != rows).all()
        picks_text.append(neg_text)
        picks_image.append(neg_image)
    # softmax weights ~e^8 vs 1 for the 14 others (the positive zeroed): the hard partner ~99.5% of the time
    assert (torch.stack(picks_text) == hard).float().mean() > 0.97
    assert (torch.stack(picks_image) == torch.argsort(hard)).float().mean() > 0.97
    # nearly uniform similarities: every other index gets drawn
    draws = torch.stack([hard_negatives(torch.zeros(4, 4), torch.zeros(4, 4))[0] for _ in range(300)])
    for i in range(4):
        assert set(draws[:, i].tolist()) == set(range(4)) - {i}


# ---------------------------------------------------------------------------------------------------------------
# retrieval


def test_retrieval_scores_itc_and_reranking(toy_cache):
    model = tiny_model(rerank_k=0).eval()
    images = _batch(5, seed=1)["image"]
    captions = CAPTIONS + ["a black circle on a dotted background"]  # 7 texts
    i2t, t2i = model.retrieval_scores(images, captions)
    assert i2t.shape == t2i.shape == (5, 7) and i2t.dtype == torch.float32
    assert torch.equal(i2t, t2i)
    ids, mask = tokenize(model.tokenizer, captions, model.cfg.vlp.max_len)
    with torch.no_grad():
        sim = model.image_features(model.image_tokens(images)) @ model.text_features(ids, mask).T
    assert torch.allclose(i2t, sim, atol=1e-5)

    k = 2
    model.cfg = tiny_cfg({"rerank_k": k})
    r_i2t, r_t2i = model.retrieval_scores(images, captions)
    assert r_i2t.shape == r_t2i.shape == (5, 7)
    top_t = sim.topk(k, dim=1).indices  # per image
    top_i = sim.topk(k, dim=0).indices  # per text
    kept_i2t = torch.zeros(5, 7, dtype=torch.bool).scatter_(1, top_t, True)
    kept_t2i = torch.zeros(5, 7, dtype=torch.bool).scatter_(0, top_i, True)
    # only the top-k entries carry scores, the others are RERANK_LOW
    assert torch.equal(r_i2t != RERANK_LOW, kept_i2t) and torch.equal(r_t2i != RERANK_LOW, kept_t2i)
    # a kept entry is the pair's ITM positive logit plus its similarity
    with torch.no_grad():
        image = model.image_to_text(model.image_tokens(images))
        for i, j in [(0, int(top_t[0, 0])), (3, int(top_t[3, 1]))]:
            logit = model.itm_logits(ids[j : j + 1], mask[j : j + 1], image[i : i + 1])[0, 1]
            assert float(r_i2t[i, j]) == pytest.approx(float(logit + sim[i, j]), abs=1e-4)
        j = 4
        i = int(top_i[1, j])
        logit = model.itm_logits(ids[j : j + 1], mask[j : j + 1], image[i : i + 1])[0, 1]
        assert float(r_t2i[i, j]) == pytest.approx(float(logit + sim[i, j]), abs=1e-4)
    assert not torch.allclose(r_i2t[kept_i2t], sim[kept_i2t])  # re-ranking changed the kept scores
    # k larger than the candidates: every pair is re-ranked
    model.cfg = tiny_cfg({"rerank_k": 50})
    all_i2t, all_t2i = model.retrieval_scores(images, captions)
    assert (all_i2t != RERANK_LOW).all() and torch.allclose(all_i2t, all_t2i, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# text checkpoint, errors


def test_text_pretrained_loads_a_bert_checkpoint(toy_cache, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(5)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=120,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    model = tiny_model(text_pretrained=str(tmp_path / "bert"))
    ref = bert.state_dict()
    assert model.text_config.hidden_size == 24 and model.text_config.num_hidden_layers == 2
    vocab = len(model.tokenizer)
    assert model.text_encoder.embeddings.word_embeddings.weight.shape == (vocab, 24)  # resized to the tokenizer
    rows = min(vocab, 120)
    for text in (model.text_encoder, model.text_decoder):
        assert torch.equal(
            text.embeddings.word_embeddings.weight[:rows], ref["bert.embeddings.word_embeddings.weight"][:rows]
        )
        q = "encoder.layer.1.attention.self.query.weight"
        assert torch.equal(text.state_dict()[q], ref[f"bert.{q}"])
    assert torch.equal(model.lm_head.transform.dense.weight, ref["cls.predictions.transform.dense.weight"])
    assert model.image_to_text.out_features == 24 and model.itm_head.in_features == 24
    out = model(_batch())
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="vlp.text_pretrained"):
        tiny_model(text_pretrained=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="vlp.max_len"):
        tiny_model(text_pretrained=str(tmp_path / "bert"), max_len=100)


def test_config_errors(toy_cache):
    with pytest.raises(ConfigError, match="data.views"):
        build_method(tiny_cfg(data={"views": "two", "image_size": S, **TOY_DATA}))
    with pytest.raises(ConfigError, match="model.backbone"):
        build_method(tiny_cfg(model={"backbone": "resnet10t"}))
    with pytest.raises(ConfigError, match="img_size"):
        build_method(tiny_cfg(data={"views": "vlp", "image_size": 64, **TOY_DATA}))


# ---------------------------------------------------------------------------------------------------------------
# through the engine

TINY = [
    f"model.backbone_kwargs={json.dumps(VIT)}",
    *(f"vlp.{k}={v}" for k, v in TINY_VLP.items()),
    f"data.image_size={S}",
    *(f"data.{k}={v}" for k, v in TOY_DATA.items()),
    "train.batch_size=8",
    "train.max_steps=3",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.tensorboard=false",
]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["blip", "blip_freeatm"])
def test_training_steps_through_the_engine(name, toy_cache, tmp_path):
    from freeatm_fast.engine import train

    retrieval = name == "blip_freeatm"  # one engine run with the retrieval eval
    extra = ["eval.retrieval=true", "vlp.retrieval_max_images=16"] if retrieval else ["eval.retrieval=false"]
    run = tmp_path / "run"
    summary = train(load_config(name, [*TINY, *extra, f"train.out_dir={run}"]))
    rows = _metrics(run)
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("loss", "loss_itc", "loss_itm", "loss_lm"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 0 <= r["acc_itm"] <= 1
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert (run / "model.safetensors").is_file() and (run / "backbone.safetensors").is_file()
    # the saved tokenizer loads back as vlp.tokenizer and fits the saved text models
    from safetensors import safe_open

    saved = build_tokenizer(tiny_cfg({"tokenizer": str(run / "tokenizer")}))
    assert saved.bos_token == "[DEC]" and "[ENC]" in saved.get_vocab()
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        for name in ("text_encoder", "text_decoder"):
            assert f.get_slice(f"{name}.embeddings.word_embeddings.weight").get_shape() == [len(saved), 48]
        assert f.get_slice("lm_head.decoder.weight").get_shape() == [len(saved), 48]
    if retrieval:
        result = summary["eval"]["retrieval"]
        assert result["n_images"] == 16 and 0 <= result["r_mean"] <= 1
        assert (run / "eval_retrieval.json").is_file()


def test_issue_command_line(tmp_path, clean_env):
    """python freeatm_fast/train.py --config blip_freeatm train.max_steps=3 train.out_dir=<tmp> (the full toy
    config; retrieval on 1,000 held-out images)."""
    cmd = [sys.executable, "freeatm_fast/train.py", "--config", "blip_freeatm", "train.max_steps=3"]
    cmd += [f"train.out_dir={tmp_path}/run"]
    # a fresh one-process group, the full toy world where the user keeps it (conftest's clean_env)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=clean_env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "method=blip freeatm=on" in out and "step 3/3" in out
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert "retrieval i2t R@1/5/10" in out
    assert (tmp_path / "run" / "eval_retrieval.json").is_file()
