"""The training engine (DESIGN §8): one distributed path for ``deepspeed``, ``torchrun`` and plain ``python``.

``train(cfg)`` sets up the process group from the environment, builds the method (``methods.build_method``)
and the loader (``data.loader.build_loader``), wraps them in a DeepSpeed engine generated from the config
(ZeRO stage, precision, clipping, the optimizer and schedule of ``freeatm_fast.optim``), runs the loop, saves
checkpoints that resume the exact run, exports the backbone as safetensors loadable by timm, and evaluates it
with kNN at the end.

Run directory (``train.out_dir``): ``config.yaml`` (the resolved config), ``checkpoints/`` (DeepSpeed tags +
per-rank RNG states), ``metrics.jsonl`` (one line per log interval), ``tensorboard/``, ``backbone.safetensors``,
``eval_knn.json``, ``summary.json``.

The loop never synchronises with the device except at log intervals: losses are summed on the device and read
once per ``train.log_every`` steps; images/s and the data-wait share (host time blocked on the loader over
wall time) are measured on the host between log points.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freeatm_fast.config import Config, ConfigError, load_config, save_config

# keys that may differ between a run and its resumption (everything else must match the saved config)
RESUMABLE_DIFFERENCES = (
    "train.max_steps",
    "train.stop_at",
    "train.log_every",
    "train.ckpt_every",
    "train.resume",
    "train.tensorboard",
    "train.export_backbone",
    "data.num_workers",
    "data.skip_bad",
    "eval.",
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(local_rank: int | None = None) -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (set by ``deepspeed`` and ``torchrun``; plain ``python`` gets a
    one-process group on a free local port) and initialise the process group through DeepSpeed: NCCL on CUDA,
    gloo on CPU."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON config generated from ``cfg`` (``deepspeed.extra`` is merged on top)."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * world_size,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # our optimizers are plain torch ones (SGD / LARS / AdamW): ZeRO wraps them
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision != "fp32":
        # Mixed precision through torch.autocast: weights (and so the momentum encoders' EMA) stay fp32, convs and
        # matmuls run in bf16/fp16; DeepSpeed adds a GradScaler for fp16. (DeepSpeed's "bf16" mode would cast the
        # whole module, and an EMA step of 1% is mostly rounded away in bf16 weights.)
        ds["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[t.precision]}
    if t.clip_grad > 0:
        ds["gradient_clipping"] = t.clip_grad
    return _merge_dicts(ds, cfg.deepspeed.extra)


def _merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("backbone_kwargs", "extra"):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def check_resumable(saved: Config, cfg: Config) -> None:
    """Refuse to resume a run directory whose saved config differs in anything but the allowed keys."""
    a, b = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_DIFFERENCES)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ConfigError(
            f"train.out_dir {cfg.train.out_dir!r} holds a run with other settings ({shown}); use another "
            f"train.out_dir or train.resume=none to start over"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global state third-party code may use
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - saving the global state, whoever uses it
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """Move a loader batch to the device (non-blocking); 4-d float tensors (images) become channels_last when asked.
    Inputs stay fp32: with bf16/fp16, autocast casts inside the ops."""

    def move(x):
        if isinstance(x, torch.Tensor):
            x = x.to(device, non_blocking=True)
            if channels_last and x.is_floating_point() and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return x
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return move(batch)


def _latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


class _Log:
    """Rank-0 console, metrics.jsonl and TensorBoard output."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, *, resumed: bool):
        self.enabled = enabled
        self.tb = None
        self.metrics = None
        if not enabled:
            return
        # a resumed run continues the file; a fresh start (also train.resume=none) replaces it
        self.metrics = open(run_dir / "metrics.jsonl", "a" if resumed else "w")
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError as exc:  # tensorboard is a declared dependency; say so when it is missing
                print(f"[freeatm] tensorboard unavailable ({exc}); scalars go to metrics.jsonl only", flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(f"[freeatm] {text}", flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def _backend_summary() -> str:
    try:
        from freeatm_kernels import _backend

        return (
            f"triton={'interpreter' if _backend.TRITON_INTERPRET else ('yes' if _backend.HAS_TRITON else 'no')}, "
            f"cuda_ext={'yes' if _backend.extension_has('mask_pool_forward') else 'no'}"
        )
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({exc})"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Config, *, local_rank: int | None = None, loader=None) -> dict:
    """Run (or resume) the training run described by ``cfg``; returns the summary dict (also written to
    ``summary.json`` by rank 0). Every rank calls this.

    ``loader``: an iterable of batches to use instead of ``build_loader(cfg)`` (the benchmark feeds a fixed
    batch to measure the training step alone); it must have a ``dataset`` with a length."""
    import deepspeed

    from freeatm_fast.data.loader import build_loader
    from freeatm_fast.methods import build_method, method_class
    from freeatm_fast.optim import build_optimizer, build_scheduler, scaled_lr

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist = setup_distributed(local_rank)
    t = cfg.train
    run_dir = Path(t.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()

    resume_tag: str | None = None
    resume_dir = ckpt_dir
    if t.resume == "auto":
        resume_tag = _latest_tag(ckpt_dir)
    elif t.resume != "none":
        resume_dir = Path(t.resume)
        resume_tag = _latest_tag(resume_dir) if (resume_dir / "latest").is_file() else None
        if resume_tag is None:
            resume_dir, resume_tag = resume_dir.parent, resume_dir.name
        if not (resume_dir / resume_tag).is_dir():
            raise ConfigError(f"train.resume: no checkpoint at {t.resume!r}")
    if cfg.data.root == "" and cfg.data.toy_source == "model":
        # the toy text-to-image model's data set: generated once (first use, cached), by rank 0
        from freeatm_fast.toy.data import ensure_generated_toyworld

        if dist.is_main:
            ensure_generated_toyworld(cfg.data, device=str(dist.device))
        torch.distributed.barrier()
    if resume_tag is not None and (run_dir / "config.yaml").is_file() and resume_dir == ckpt_dir:
        check_resumable(load_config(run_dir / "config.yaml"), cfg)
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    log = _Log(cfg, run_dir, dist.is_main, resumed=resume_tag is not None)

    # identical initial weights on every rank (DeepSpeed also broadcasts them from rank 0)
    _seed_everything(t.seed)
    method_cfg = cfg
    if method_class(cfg.method).uses_tokenizer and not cfg.vlp.tokenizer:
        # one offline tokenizer per run: trained on rank 0 into the run directory (or the resumed run's), loaded
        # by every rank; the saved config keeps vlp.tokenizer empty
        from freeatm_fast.methods.text import run_tokenizer

        tok_dir = run_tokenizer(
            cfg,
            run_dir,
            is_main=dist.is_main,
            barrier=torch.distributed.barrier,
            resume_dir=resume_dir.parent if resume_tag is not None else None,
        )
        method_cfg = dataclasses.replace(cfg, vlp=dataclasses.replace(cfg.vlp, tokenizer=str(tok_dir)))
        _seed_everything(t.seed)  # the tokenizer's data pass must not change the initial weights
    method = build_method(method_cfg)
    if dist.is_main:
        method.save_artifacts(run_dir)
    # model.channels_last puts the *inputs* in channels_last: cuDNN then picks NHWC convolutions (it follows the
    # input or the weight). The weights stay contiguous: DeepSpeed broadcasts and flattens parameters as flat
    # byte views, which channels_last weights cannot give.
    global_batch = t.batch_size * dist.world_size
    lr = scaled_lr(t.lr, global_batch)
    optimizer = build_optimizer(
        t.optimizer, method.param_groups(t.weight_decay), lr=lr, momentum=t.momentum, betas=t.betas
    )
    scheduler = build_scheduler(
        optimizer, max_steps=t.max_steps, warmup_steps=t.warmup_steps, min_ratio=t.min_lr / t.lr
    )
    engine, _, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, dist.world_size)
    )

    start_step = 0
    if resume_tag is not None:
        _, client = engine.load_checkpoint(str(resume_dir), tag=resume_tag)
        start_step = int(client["step"])
        log.info(f"resumed from {resume_dir / resume_tag} at step {start_step}")
    # per-rank randomness after (re)start: seeded by (seed, rank), or restored exactly from the checkpoint
    _seed_everything(t.seed * 1000 + dist.rank + 1)
    if resume_tag is not None:
        rng_file = resume_dir / resume_tag / f"rng_rank{dist.rank:05d}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            print(
                f"[freeatm] rank {dist.rank}: {rng_file} is missing; random state re-seeded, so the resumed run "
                f"will not repeat the uninterrupted one bit for bit",
                flush=True,
            )
    if loader is None:
        loader = build_loader(cfg, rank=dist.rank, world_size=dist.world_size, start_step=start_step)

    n_params = sum(
        getattr(p, "ds_numel", p.numel()) for p in method.parameters() if p.requires_grad
    )  # ZeRO-3: full size
    log.info(
        f"method={cfg.method} freeatm={'on' if cfg.freeatm.enabled else 'off'}"
        + (f" mae.masking={cfg.mae.masking}" if cfg.method == "mae" else "")
        + f" backbone={cfg.model.backbone} "
        f"({n_params / 1e6:.2f} M trainable params) world_size={dist.world_size} device={dist.device} "
        f"precision={t.precision} zero_stage={cfg.deepspeed.zero_stage}"
    )
    log.info(
        f"batch {t.batch_size}/rank, effective batch {global_batch}; lr {t.lr} x {global_batch}/256 = {lr:.4g} "
        f"({t.optimizer}, warm-up {t.warmup_steps}, cosine to {t.min_lr}); steps {start_step}->{t.max_steps}; "
        f"data {cfg.data.loader} loader, {len(loader.dataset)} samples, {cfg.data.num_workers} workers; "
        f"kernels: {_backend_summary()}; run dir {run_dir}"
    )

    def save(step: int) -> None:
        # The RNG state goes in first (temporary name, then rename); DeepSpeed writes `latest` last, so a run
        # killed while saving resumes from the previous complete checkpoint.
        tag = f"step{step:08d}"
        rng_file = ckpt_dir / tag / f"rng_rank{dist.rank:05d}.pt"
        rng_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = rng_file.with_name(f".{rng_file.name}.tmp-{os.getpid()}")
        torch.save(_rng_state(), tmp)
        os.replace(tmp, rng_file)
        torch.distributed.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
        torch.distributed.barrier()

    stop = t.max_steps if t.stop_at <= 0 else min(t.max_steps, t.stop_at)
    method.begin(start_step, t.max_steps)
    it = iter(loader)
    sums: dict[str, torch.Tensor] = {}
    n_in_window = 0
    window_start = time.perf_counter()
    data_wait = 0.0
    run_start = window_start
    step = start_step
    last_logs: dict = {}
    engine.train()
    while step < stop:
        t0 = time.perf_counter()
        batch = next(it)
        data_wait += time.perf_counter() - t0
        batch = to_device(batch, dist.device, cfg.model.channels_last)
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        with torch.no_grad():
            method.after_step(step, t.max_steps)
        for k, v in out.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v.clone()
        n_in_window += 1
        step += 1
        if step % t.log_every == 0 or step == stop:
            values = {k: float(v) / n_in_window for k, v in sums.items()}  # the one host sync per interval
            elapsed = time.perf_counter() - window_start
            values["lr"] = float(engine.get_lr()[0])
            values["images_per_s"] = n_in_window * global_batch / max(elapsed, 1e-9)
            values["data_wait"] = data_wait / max(elapsed, 1e-9)
            eta = (t.max_steps - step) * elapsed / n_in_window
            parts = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k not in ("lr", "images_per_s", "data_wait"))
            log.info(
                f"step {step}/{t.max_steps} | {parts} | lr {values['lr']:.4g} | {values['images_per_s']:.1f} img/s "
                f"| data-wait {100 * values['data_wait']:.0f}% | eta {_fmt_eta(eta)}"
            )
            log.scalars(step, values)
            last_logs = values
            sums, n_in_window, data_wait = {}, 0, 0.0
            window_start = time.perf_counter()
        if t.checkpoint and t.ckpt_every and step % t.ckpt_every == 0 and step < stop:
            save(step)
    train_time = time.perf_counter() - run_start
    if hasattr(loader, "close"):
        loader.close()  # persistent workers would otherwise live until garbage collection
    if t.checkpoint and (step > start_step or resume_tag is None):
        save(step)
    replicas = _replicas_identical(method, cfg.deepspeed.zero_stage, dist.world_size)
    if replicas is not None:
        log.info(f"parameters identical on all {dist.world_size} ranks: {'yes' if replicas else 'NO'}")

    summary: dict = {
        "method": cfg.method,
        "freeatm": cfg.freeatm.enabled,
        "backbone": cfg.model.backbone,
        "steps": step,
        "max_steps": t.max_steps,
        "world_size": dist.world_size,
        "train_seconds": round(train_time, 2),
        "replicas_identical": replicas,
        "last": last_logs,
    }
    finished = step >= t.max_steps
    from freeatm_fast.methods.common import Method

    if finished and type(method).write_figures is not Method.write_figures:
        figures = _write_figures(cfg, method, run_dir, dist)
        if figures:
            summary["figures"] = [str(f) for f in figures]
            log.info(f"figures: {', '.join(str(f) for f in figures)}")
    backbone = method.backbone
    if finished and (t.export_backbone or cfg.eval.knn or cfg.eval.linear):
        backbone_path = run_dir / "backbone.safetensors"
        with _gathered(backbone, cfg.deepspeed.zero_stage):
            if dist.is_main:
                from freeatm_fast.eval.export import export_backbone

                export_backbone(backbone, cfg.model.backbone, dict(cfg.model.backbone_kwargs), backbone_path)
                summary["backbone_file"] = str(backbone_path)
        torch.distributed.barrier()
        if dist.is_main and (cfg.eval.knn or cfg.eval.linear):
            summary["eval"] = _evaluate(cfg, backbone_path, dist.device, log)
        torch.distributed.barrier()
    if finished and type(method).retrieval_scores is not Method.retrieval_scores:
        with _gathered(method, cfg.deepspeed.zero_stage):
            if dist.is_main:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
                tmp = run_dir / f".model.safetensors.tmp-{os.getpid()}"
                save_file(state, str(tmp))
                os.replace(tmp, run_dir / "model.safetensors")
                summary["model_file"] = str(run_dir / "model.safetensors")
                if cfg.eval.retrieval:
                    from freeatm_fast.eval.retrieval import evaluate_retrieval, retrieval_line

                    method.eval()
                    result = evaluate_retrieval(method, cfg, device=dist.device)
                    method.train()
                    summary.setdefault("eval", {})["retrieval"] = result
                    log.info(retrieval_line(result))
                    _write_json(run_dir / "eval_retrieval.json", result)
        torch.distributed.barrier()
    if dist.is_main:
        _write_json(run_dir / "summary.json", summary)
    log.close()
    return summary


def _write_figures(cfg: Config, method: torch.nn.Module, run_dir: Path, dist) -> list:
    """The method's end-of-run pictures from 8 validation images (the train split when there is no val split).
    Every rank takes part in gathering ZeRO-3 partitions; rank 0 draws and writes."""
    import dataclasses

    from freeatm_fast.data.loader import build_loader

    small = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, loader="torch", num_workers=0),
        train=dataclasses.replace(cfg.train, batch_size=8),
    )
    try:
        loader = build_loader(small, split="val")
    except (FileNotFoundError, ValueError):
        loader = build_loader(small, split="train")
    try:
        batch = to_device(next(iter(loader)), dist.device, False)
    finally:
        loader.close()
    out: list = []
    with _gathered(method, cfg.deepspeed.zero_stage):
        if dist.is_main:
            out = method.write_figures(run_dir, batch)
    torch.distributed.barrier()
    return out


def _replicas_identical(method: torch.nn.Module, zero_stage: int, world_size: int) -> bool | None:
    """Whether every rank holds bit-identical parameters (data parallelism's invariant), by comparing a
    per-parameter digest across ranks; None for one rank or ZeRO-3 (parameters are partitioned there)."""
    if world_size == 1 or zero_stage == 3:
        return None
    with torch.no_grad():
        digest = torch.stack(
            [
                p.detach()
                .double()
                .flatten()
                .mul(1.0 + torch.arange(p.numel(), dtype=torch.float64, device=p.device).remainder(7))
                .sum()
                for p in method.parameters()
            ]
        ).cpu()
    gathered = [torch.empty_like(digest) for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, digest)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


class _gathered:
    """Under ZeRO-3 the backbone's parameters are partitioned: gather them for export; otherwise a no-op."""

    def __init__(self, module: torch.nn.Module, zero_stage: int):
        self.ctx = None
        if zero_stage == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False


def _evaluate(cfg: Config, backbone_path: Path, device: torch.device, log: _Log) -> dict:
    from freeatm_fast.eval.export import load_backbone
    from freeatm_fast.eval.run import evaluate, summary_line

    backbone = load_backbone(backbone_path).to(device)
    result = evaluate(backbone, cfg, device=device)
    result["backbone"] = str(backbone_path)
    log.info(summary_line(result))
    for kind in ("knn", "linear"):
        if kind in result:
            r = result[kind]
            log.info(f"{kind} accuracy: {100 * r['top1']:.2f}% top-1 (chance {100 / result['num_classes']:.1f}%)")
            # the same file the `freeatm eval` command writes: the whole result
            _write_json(Path(cfg.train.out_dir) / f"eval_{kind}.json", result)
    return result


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def shutdown(exit_code: int = 0) -> None:
    """End a launched worker: flush, destroy the process group, ``os._exit`` (gloo workers can abort in the
    interpreter's exit otherwise, TOOLCHAIN.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(exit_code)
