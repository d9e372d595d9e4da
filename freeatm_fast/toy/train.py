"""``freeatm toy-train``: train the toy text-to-image model on the toy world (issue #8).

Data: a pool of toy-world *train*-split images rendered at the model's size (``render_sample(seed, "train", i)``,
``i < pool_images``; the held-out evaluation uses the *val* split), random horizontal flips (captions name no
positions). Captions: the toy world's, with ``shape_only_prob`` of them rewritten without colour words ("a circle and
a small star on a dotted background") so that shape words must carry their objects on their own, and
``caption_dropout`` of them empty (the unconditional text of classifier-free guidance).

Objective: v-prediction MSE at uniform timesteps of the cosine schedule; AdamW with linear warm-up and cosine decay,
gradient clipping at 1; an EMA of the weights (``ema``) is what gets exported.

Model selection: every ``val_every`` steps the EMA model's free masks are scored in the re-noise mode of ``freeatm
eval masks`` (:func:`freeatm_fast.eval.masks.evaluate_renoise`) on ``val_images`` + ``val_images`` toy-world images of
a seed of their own (``val_toy_seed``; neither the training pool nor the toy-world seed 0 images that ``eval masks``
reports on): the recipe is chosen on the first half, and the colour-word mIoU of the second half is the checkpoint's
score. The loss does not say how well the maps localise (the issue's probe saw its 8x8 maps get worse with
training), so the exported model is the best-scoring EMA checkpoint from ``val_from`` on; the last EMA is exported
beside it (``out_dir/last/``), and ``out_dir/val.jsonl`` holds the curve (for the shipped model it rose to 0.686 at
step 2,750 and then flattened: 0.691 at 3,500 and 3,750, the selected step, 0.690 at 4,000). ``val_every=0``: no
validation, the last EMA is exported.

Runs on CUDA when present (bf16 autocast), else on every CPU core. Resumable: ``out_dir/checkpoint.pt`` (weights,
EMA, optimizer, step, RNG state) is written every ``ckpt_every`` steps through a temporary name; a rerun with the
same settings continues from it (other settings: an error naming the keys; ``resume=false`` starts over). The EMA
model is exported to ``out_dir/model/`` (``toy_t2i.safetensors`` fp16 + ``toy_t2i.json``) at every checkpoint, so
``--model <out_dir>/model`` samples from a run at any time. Progress: step, loss, lr, images/s, ETA.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from freeatm_fast.toy.model import ToyModelConfig, build_toy_pipeline, make_scheduler, save_toy_model

__all__ = ["ToyTrainConfig", "shape_only_caption", "toy_train", "parse_overrides"]


@dataclass(frozen=True)
class ToyTrainConfig:
    """Settings of ``freeatm toy-train`` (``key=value`` overrides on the command line; ``model.*`` for the
    architecture)."""

    out_dir: str = "runs/toy"
    steps: int = 4000  # the shipped model: `freeatm toy-train` with these defaults (about 62 min on 2 CPU cores)
    batch_size: int = 32
    lr: float = 7e-4
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema: float = 0.995
    caption_dropout: float = 0.1
    shape_only_prob: float = 0.1
    pool_images: int = 40000
    toy_seed: int = 0  # the toy world's seed (train split)
    seed: int = 0  # weights, timesteps, noise, batches
    ckpt_every: int = 250
    log_every: int = 50
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = True
    stop_at: int = 0  # stop (with a checkpoint) after this step without changing the schedule; 0 = run to steps
    val_every: int = 250  # score the EMA model's free masks every this many steps (and at the end); 0 = never
    val_from: int = 1000  # checkpoints before this step are scored but not selected
    val_images: int = 48  # re-noise images in each half (recipe choice / score) of the selection set
    val_toy_seed: int = 1000  # toy-world seed of the selection images (eval masks reports on seed 0)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "pool_images", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"toy-train: {name} must be an int >= 1, got {v!r}")
        for name in ("val_every", "val_from"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"toy-train: {name} must be an int >= 0, got {v!r}")
        if not isinstance(self.val_images, int) or isinstance(self.val_images, bool) or self.val_images < 1:
            raise ValueError(f"toy-train: val_images must be an int >= 1, got {self.val_images!r}")
        for name in ("caption_dropout", "shape_only_prob"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"toy-train: {name} must be in [0, 1], got {v!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"toy-train: ema must be in [0, 1), got {self.ema!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"toy-train: device must be auto, cpu or cuda, got {self.device!r}")
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ToyModelConfig.from_dict(self.model))

    def run_invariant(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        d = asdict(self)
        for key in ("out_dir", "ckpt_every", "log_every", "device", "resume", "steps", "stop_at"):
            d.pop(key)
        return d


def parse_overrides(overrides: list[str], base: ToyTrainConfig | None = None) -> ToyTrainConfig:
    """``["steps=100", "model.text_layers=1"]`` -> ToyTrainConfig; ValueError naming an unknown key or bad value."""
    import yaml

    cfg = asdict(base or ToyTrainConfig())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"toy-train: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.split(".")
        target = cfg
        for p in parts[:-1]:
            if not isinstance(target.get(p), dict):
                raise ValueError(f"toy-train: unknown key {key!r}")
            target = target[p]
        if parts[-1] not in target:
            raise ValueError(f"toy-train: unknown key {key!r} (known: {', '.join(sorted(target))})")
        if isinstance(target[parts[-1]], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        target[parts[-1]] = value
    try:
        return ToyTrainConfig(**{**cfg, "model": ToyModelConfig.from_dict(cfg["model"])})
    except TypeError as exc:
        raise ValueError(f"toy-train: bad settings: {exc}") from exc


def shape_only_caption(meta: dict) -> str:
    """The toy-world caption of ``meta`` without colour words: "a circle, a small star and a square on a striped
    background"."""
    parts = []
    for obj in meta["objects"]:
        words = ["small", obj["shape"]] if obj.get("small") else [obj["shape"]]
        parts.append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} on a {meta['background']} background"


def _render_pool(cfg: ToyTrainConfig) -> tuple[np.ndarray, list[str], list[str]]:
    from freeatm_fast.data.toyworld import render_sample

    size = cfg.model.image_size
    images = np.empty((cfg.pool_images, size, size, 3), np.uint8)
    captions, shape_only = [], []
    for i in range(cfg.pool_images):
        s = render_sample(cfg.toy_seed, "train", i, image_size=size)
        images[i] = s.image
        captions.append(s.meta["caption"])
        shape_only.append(shape_only_caption(s.meta))
    return images, captions, shape_only


def _lr(cfg: ToyTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


VAL_TAUS = (0.3, 0.4, 0.5, 0.6, 0.7)


def validate(ema_unet, ema_text, pipe, cfg: ToyTrainConfig) -> dict:
    """Score the EMA model's free masks (module docstring): ``{"score", "recipe", "colour", "shape", "phrase",
    "seconds"}`` with the test-half mIoU of each word kind under the recipe chosen on the first half."""
    from freeatm_fast.eval.masks import evaluate_renoise
    from freeatm_fast.toy.model import ToyPipeline

    view = ToyPipeline(unet=ema_unet, text_encoder=ema_text, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    res = evaluate_renoise(
        view,
        num_images=cfg.val_images,
        num_timesteps=10,
        taus=VAL_TAUS,
        upsamples=("bicubic",),
        normalizes=("max",),  # the selection score stays that of the DESIGN §4 normalisation
        batch_size=16,
        toy_seed=cfg.val_toy_seed,
        png_rows=0,
    )
    kinds = res["test"]["kinds"]
    chosen = res["chosen"]
    score = kinds["colour"]["miou"]
    return {
        "score": -1.0 if score is None else float(score),
        "recipe": {k: chosen[k] for k in ("window", "resolutions", "upsample", "normalize", "tau") if k in chosen},
        **{k: kinds[k]["miou"] for k in ("colour", "shape", "phrase")},
        "seconds": res["seconds"],
    }


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def toy_train(cfg: ToyTrainConfig, *, log=print) -> dict:
    """Train (or continue) the toy model described by ``cfg``; returns a summary dict (also ``summary.json``)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    settings_file, ckpt_file = out / "toy_train.json", out / "checkpoint.pt"
    state = None
    if cfg.resume and ckpt_file.is_file():
        saved = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        differ = sorted(
            k
            for k in set(saved) | set(cfg.run_invariant())
            if saved.get(k) != json.loads(json.dumps(cfg.run_invariant())).get(k)
        )
        if differ:
            raise ValueError(
                f"{out}: holds a toy-train run with other settings ({', '.join(differ)}); use another out_dir or "
                "resume=false to start over"
            )
        state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    tmp = settings_file.with_name(f".{settings_file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cfg.run_invariant(), indent=1) + "\n")
    os.replace(tmp, settings_file)

    pipe = build_toy_pipeline(cfg.model, seed=cfg.seed)
    unet, text = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train()
    params = [*unet.parameters(), *text.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    for p in ema_params:
        p.requires_grad_(False)
    scheduler = make_scheduler(cfg.model, "ddpm")
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    # the best-scoring EMA weights so far (module docstring) and every validation's result
    best: dict = {"step": None, "score": None, "ema_unet": None, "ema_text_encoder": None}
    history: list[dict] = []
    if state is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        best = state.get("best", best)
        history = list(state.get("val_history", []))
        start = int(state["step"])
        log(f"[toy-train] resumed from {ckpt_file} at step {start}")
    if start >= cfg.steps:
        log(f"[toy-train] {out} already trained {start} >= {cfg.steps} steps")

    t0 = time.time()
    images, captions, shape_only = _render_pool(cfg)
    log(
        f"[toy-train] rendered {cfg.pool_images} toy-world train images at {cfg.model.image_size}px in "
        f"{time.time() - t0:.1f}s; device {device}, {sum(p.numel() for p in params) / 1e6:.2f} M parameters"
    )
    pool = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 [N,3,S,S]
    tokenizer = pipe.tokenizer
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def export(step: int) -> None:
        info = {"trained_steps": step, "train": asdict(cfg)}
        if cfg.val_every == 0 or best["step"] is None:
            save_toy_model(ema_unet, ema_text, cfg.model, out / "model", info=info)
            return
        selection = {"step": best["step"], "score": best["score"], "history": history}
        save_toy_model(ema_unet, ema_text, cfg.model, out / "last", info={**info, "selection": selection})
        bu, bt = copy.deepcopy(ema_unet), copy.deepcopy(ema_text)
        bu.load_state_dict(best["ema_unet"])
        bt.load_state_dict(best["ema_text_encoder"])
        save_toy_model(
            bu, bt, cfg.model, out / "model", info={**info, "selected_step": best["step"], "selection": selection}
        )

    def validate_now(step: int) -> None:
        r = validate(ema_unet, ema_text, pipe, cfg)
        r = {"step": step, **r}
        history.append(r)
        selectable = step >= cfg.val_from or step == cfg.steps  # the last step is always a candidate
        mark = ""
        if selectable and (best["score"] is None or r["score"] > best["score"]):
            best.update(
                step=step,
                score=r["score"],
                ema_unet={k: v.detach().cpu().clone() for k, v in ema_unet.state_dict().items()},
                ema_text_encoder={k: v.detach().cpu().clone() for k, v in ema_text.state_dict().items()},
            )
            mark = " (best)"

        def fmt(x):
            return "-" if x is None else f"{x:.3f}"

        log(
            f"[toy-train] val step {step}: colour mIoU {fmt(r['colour'])} shape {fmt(r['shape'])} phrase "
            f"{fmt(r['phrase'])} recipe {r['recipe']} ({r['seconds']:.0f}s){mark}"
        )
        tmp_val = out / f".val.jsonl.tmp-{os.getpid()}"  # the whole history (a resumed run restores it)
        tmp_val.write_text("".join(json.dumps(h) + "\n" for h in history))
        os.replace(tmp_val, out / "val.jsonl")

    def checkpoint(step: int) -> None:
        _atomic_save(
            {
                "step": step,
                "unet": unet.state_dict(),
                "text_encoder": text.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text_encoder": ema_text.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "best": best,
                "val_history": history,
            },
            ckpt_file,
        )
        export(step)

    loss_sum, n_loss, t_log, step = torch.zeros((), device=device), 0, time.time(), start
    metrics = open(out / "metrics.jsonl", "a" if start else "w")
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    for step in range(start, end):
        idx = torch.randint(0, cfg.pool_images, (cfg.batch_size,), generator=gen)
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        u = torch.rand(cfg.batch_size, generator=gen)
        texts = []
        for j, i in enumerate(idx.tolist()):
            if u[j] < cfg.caption_dropout:
                texts.append("")
            elif u[j] < cfg.caption_dropout + cfg.shape_only_prob:
                texts.append(shape_only[i])
            else:
                texts.append(captions[i])
        x0 = pool[idx].float().div_(127.5).sub_(1.0)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        xt = a * x0 + s * noise
        target = a * noise - s * x0  # v
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )["input_ids"].to(device)
        lr = _lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            pred = unet(xt, t, encoder_hidden_states=text(ids)[0], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - cfg.ema)
        loss_sum += loss.detach()
        n_loss += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            dt = time.time() - t_log
            mean = float(loss_sum) / n_loss
            ips = n_loss * cfg.batch_size / max(dt, 1e-9)
            eta = (cfg.steps - done) * dt / n_loss
            log(
                f"[toy-train] step {done}/{cfg.steps} loss {mean:.4f} lr {lr:.2e} {ips:.0f} images/s "
                f"eta {eta / 60:.1f} min"
            )
            metrics.write(json.dumps({"step": done, "loss": mean, "lr": lr, "images_per_s": ips}) + "\n")
            metrics.flush()
            loss_sum.zero_()
            n_loss, t_log = 0, time.time()
        if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps):
            with torch.no_grad():
                validate_now(done)
        if done % cfg.ckpt_every == 0 or done == end:
            checkpoint(done)
    metrics.close()
    if start >= cfg.steps and not (out / "model").is_dir():
        export(start)
    summary = {
        "steps": max(start, end),
        "model_dir": str(out / "model"),
        "selected_step": best["step"],
        "selected_score": best["score"],
        "seconds": time.time() - t0,
    }
    tmp = out / f".summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")
    log(f"[toy-train] done: EMA model in {out / 'model'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    toy_train(parse_overrides(args))
    return 0
