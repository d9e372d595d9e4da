"""The ``freeatm`` command.

Sub-commands are added as the parts they drive land (generate, show, train, eval, toy-train: see
DESIGN.md); each one listed here works. Heavy packages (torch models, diffusers, PIL) are imported
inside the command functions, so ``import freeatm_fast.cli`` and ``freeatm --help`` stay light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _cmd_train(args: argparse.Namespace) -> int:
    from freeatm_fast.train import main as train_main

    return train_main((["--config", args.config] if args.config else []) + list(args.overrides))


def _cmd_toy_train(args: argparse.Namespace) -> int:
    from freeatm_fast.toy.train import parse_overrides, toy_train

    try:
        cfg = parse_overrides(list(args.overrides))
        summary = toy_train(cfg, log=lambda msg: print(msg, flush=True))
    except (ValueError, OSError) as exc:
        return _fail("toy-train", exc)
    print(json.dumps(summary))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from freeatm_kernels.info import main as info_main

    return info_main(["--json"] if args.json else [])


def _fail(command: str, exc: BaseException) -> int:
    """Report an expected failure (bad input, damaged shard, missing file) as one line on stderr; exit status 2.

    ``FREEATM_DEBUG=1`` in the environment prints the traceback too.
    """
    if os.environ.get("FREEATM_DEBUG") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    print(f"freeatm {command}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_generate(args: argparse.Namespace) -> int:
    from freeatm_fast.generate.models import UnsupportedModelError

    try:
        config = generate_config_from_args(args)
        from freeatm_fast.generate.sampler import generate

        summary = generate(config, progress=not args.quiet)
    except (ValueError, OSError, UnsupportedModelError) as exc:  # ShardError is a ValueError
        return _fail("generate", exc)
    print(json.dumps(summary))
    return 0


def generate_config_from_args(args: argparse.Namespace):
    """The GenerateConfig of ``freeatm generate``: command-line values, else the model's own defaults
    (``models.model_defaults``: the toy model's measured recipe), else GenerateConfig's (SD's)."""
    from freeatm_fast.generate.sampler import config_with_model_defaults

    return config_with_model_defaults(
        args.model,
        backend=args.backend,
        prompts=args.prompts,
        objects=args.objects,
        num_images=args.num_images,
        batch_size=args.batch_size,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        size=args.size,
        mask_size=args.mask_size,
        shard_size=args.shard_size,
        jpeg_quality=args.jpeg_quality,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
    )


def _cmd_show(args: argparse.Namespace) -> int:
    from freeatm_fast.generate.show import show

    try:
        info = show(args.dir, args.out, num=args.num, cols=args.cols)
    except (ValueError, OSError) as exc:
        return _fail("show", exc)
    print(f"wrote {info['path']}: {info['num']} samples, {info['size'][0]}x{info['size'][1]} pixels")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from freeatm_fast.data.shards import verify_dir

    if not Path(args.dir).is_dir():
        return _fail("verify", NotADirectoryError(f"{args.dir} is not a directory"))
    report = verify_dir(args.dir)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0 if report["ok"] else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    """``freeatm eval knn|linear``: accuracy of a saved backbone; writes RUN_DIR/eval_<kind>.json with --run."""
    import dataclasses
    from pathlib import Path

    try:
        import torch

        from freeatm_fast.config import Config, load_config
        from freeatm_fast.data.shards import atomic_write_bytes
        from freeatm_fast.eval.export import load_backbone
        from freeatm_fast.eval.run import evaluate, summary_line

        run_dir = Path(args.run) if args.run else None
        if run_dir is not None:
            if not run_dir.is_dir():
                raise NotADirectoryError(f"--run {run_dir}: not a directory")
            config_file = run_dir / "config.yaml"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file}: the run directory has no config.yaml")
            cfg = load_config(config_file)
        else:
            cfg = Config()
        backbone_file = args.backbone or (run_dir / "backbone.safetensors" if run_dir is not None else None)
        if backbone_file is None:
            raise ValueError("give --run RUN_DIR, or --backbone FILE (and --model NAME if the file does not name it)")
        # Command-line settings override the run's eval section; the dataclass re-validates them by dotted name.
        overrides = {
            "knn": args.eval_kind == "knn",
            "linear": args.eval_kind == "linear",
            "image_size": args.image_size,
            "crop_ratio": args.crop_ratio,
            "batch_size": args.batch_size,
            "max_train_images": args.max_train_images,
            "knn_k": getattr(args, "k", None),
            "knn_temperature": getattr(args, "temperature", None),
            "linear_epochs": getattr(args, "epochs", None),
            "linear_lr": getattr(args, "lr", None),
        }
        eval_cfg = dataclasses.replace(cfg.eval, **{k: v for k, v in overrides.items() if v is not None})
        data_cfg = cfg.data if args.num_workers is None else dataclasses.replace(cfg.data, num_workers=args.num_workers)
        cfg = dataclasses.replace(cfg, eval=eval_cfg, data=data_cfg)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone = load_backbone(backbone_file, args.model).to(device)
        if cfg.model.channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        result = evaluate(backbone, cfg, device=device, train_root=args.train, val_root=args.val)
        result.update(kind=args.eval_kind, backbone=str(backbone_file), device=str(device))
        if run_dir is not None:
            text = json.dumps(result, indent=1) + "\n"
            atomic_write_bytes(run_dir / f"eval_{args.eval_kind}.json", text.encode("utf-8"))
    except (ValueError, OSError, ImportError) as exc:  # ConfigError, ShardError, BackboneFileError are ValueErrors
        return _fail("eval", exc)
    print(json.dumps(result) if args.json else summary_line(result))
    return 0


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    """``freeatm eval retrieval --run RUN_DIR``: image-text recall@k of a saved BLIP / ViLT run.

    Rebuilds the method from RUN_DIR/config.yaml with the run's saved tokenizer (``vlp.tokenizer=RUN_DIR/tokenizer``)
    and no initial backbone weights (``model.pretrained`` cleared: every weight comes from the model file), loads
    RUN_DIR/model.safetensors strictly, and evaluates on --data (default: the run's ``eval.root``, else the held-out
    split of its training data). Writes RUN_DIR/eval_retrieval.json, the result with ``source`` naming the data
    (the end-of-training result stays in RUN_DIR/summary.json).
    """
    import dataclasses
    from pathlib import Path

    try:
        import torch

        from freeatm_fast.config import load_config
        from freeatm_fast.data.shards import atomic_write_bytes
        from freeatm_fast.eval.retrieval import evaluate_retrieval, retrieval_line
        from freeatm_fast.methods import build_method

        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise NotADirectoryError(f"--run {run_dir}: not a directory")
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: the run directory has no config.yaml")
        tokenizer = run_dir / "tokenizer"
        if not tokenizer.is_dir():
            raise FileNotFoundError(f"{tokenizer}: the run directory has no saved tokenizer (BLIP / ViLT runs save it)")
        model_file = run_dir / "model.safetensors"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: the run directory has no model file (written when a run finishes)")
        cfg = load_config(config_file)
        cfg = dataclasses.replace(
            cfg,
            vlp=dataclasses.replace(cfg.vlp, tokenizer=str(tokenizer)),
            model=dataclasses.replace(cfg.model, pretrained=""),
            eval=cfg.eval if args.image_size is None else dataclasses.replace(cfg.eval, image_size=args.image_size),
        )
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        method = build_method(cfg)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(model_file))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{model_file}: not a readable safetensors file ({exc})") from exc
        fit = f"{model_file}: does not fit method {cfg.method!r} of {config_file}"
        try:  # strict: every key of the method and no other (checked below, for a one-line message)
            missing, unexpected = method.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"{fit}: {' '.join(str(exc).split())}") from exc
        if missing or unexpected:
            raise ValueError(f"{fit}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        method.to(device)
        result = evaluate_retrieval(method, cfg, device=device, root=args.data or "", max_images=args.max_images)
        result.update(method=cfg.method, run=str(run_dir), model_file=str(model_file), device=str(device))
        atomic_write_bytes(run_dir / "eval_retrieval.json", (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    except (ValueError, OSError, ImportError) as exc:  # ConfigError and ShardError are ValueErrors
        return _fail("eval", exc)
    print(json.dumps(result) if args.json else retrieval_line(result))
    return 0


def _cmd_eval_masks(args: argparse.Namespace) -> int:
    """``freeatm eval masks``: per-word mIoU / pointing of the free masks (shard mode or re-noise mode)."""
    try:
        from freeatm_fast.eval.masks import evaluate_renoise, evaluate_shards, summary_line

        if args.toyworld:
            if args.dir is not None:
                raise ValueError(f"give DIR (shard mode) or --toyworld (re-noise mode), not both (DIR={args.dir})")
            if not args.model or not args.out:
                raise ValueError("re-noise mode (--toyworld) needs --model MODEL and --out OUT")
            target = None
            if args.write_recipe:
                from freeatm_fast.toy.model import toy_model_dir

                target = toy_model_dir(args.model)
                if target is None:
                    raise ValueError(
                        f"--write-recipe: --model {args.model!r} is not a toy model ('toy' or a folder with "
                        "toy_t2i.json); only a toy model's JSON records its recipe"
                    )
            result = evaluate_renoise(
                args.model, out=args.out, num_images=args.images, num_timesteps=args.timesteps,
                image_size=args.image_size, mask_size=args.mask_size, batch_size=args.batch_size, seed=args.seed,
                toy_seed=args.toy_seed, device=args.device, dtype=args.dtype, backend=args.backend,
                progress=not args.json,
            )  # fmt: skip
            if target is not None:
                from freeatm_fast.toy.model import write_toy_recipe

                command = (
                    f"freeatm eval masks --toyworld --model <this> --images {args.images} --timesteps {args.timesteps}"
                ) + "".join(f" --{k} {v}" for k, v in (("seed", args.seed), ("toy-seed", args.toy_seed)) if v)
                recipe = write_toy_recipe(target, result, command=command)
                print(f"[eval masks] recipe written to {target / 'toy_t2i.json'}: {recipe}", file=sys.stderr)
        elif args.write_recipe:
            raise ValueError("--write-recipe belongs to re-noise mode (--toyworld --model MODEL)")
        else:
            if args.dir is None:
                raise ValueError("give a shard directory DIR (shard mode), or --model MODEL --toyworld (re-noise mode)")
            if args.model:
                raise ValueError(
                    "--model belongs to re-noise mode: add --toyworld, or leave it out to score DIR's masks"
                )
            result = evaluate_shards(
                args.dir, reference=args.reference, out=args.out, max_samples=args.max_samples, tau=args.tau,
                colour_distance=args.colour_distance, skip_unknown=args.skip_unknown,
            )  # fmt: skip
    except (ValueError, OSError, ImportError, NotImplementedError) as exc:  # UnsupportedModelError: NotImplemented
        return _fail("eval masks", exc)
    print(json.dumps(result) if args.json else summary_line(result))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeatm", description="Free-ATM: fast SSL on diffusion-generated images")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which kernel backends (torch, Triton, CUDA extension) run on this machine")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)

    gen = sub.add_parser(
        "generate",
        help="sample images with free cross-attention masks into resumable shards",
        description="Sample images with their object masks into OUT/shard-NNNNNN.tar (DESIGN §4-5). Rerunning the "
        "same command resumes: complete shards are skipped. Data parallel over RANK/WORLD_SIZE (torchrun, "
        "deepspeed launcher); LOCAL_RANK picks the GPU. Prints a JSON summary on stdout.",
    )
    gen.add_argument(
        "--model",
        default="tiny-random",
        help="tiny-random, toy (the shipped toy-world model), a toy-train model folder, a local diffusers folder or "
        "a hub id",
    )
    gen.add_argument(
        "--prompts",
        required=True,
        help="prompt file, builtin:imagenet[:N], builtin:toyworld[:N] (toy-world captions, colour words marked), "
        "builtin:toyworld-shapes[:N] or builtin:toyworld-words[:N]",
    )
    gen.add_argument("--objects", default=None, metavar="FILE", help="vocabulary matched against unbracketed prompts")
    gen.add_argument("--num-images", type=_positive_int, required=True, help="N: samples in the data set")
    gen.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per pipeline call (default 8)")
    gen.add_argument(
        "--steps", type=_positive_int, default=None, help="denoising steps (default: the model's, else 50)"
    )
    gen.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's, else 7.5)"
    )
    gen.add_argument("--scheduler", choices=("ddim", "dpm"), default=None, help="default: the model's, else ddim")
    gen.add_argument("--seed", type=int, default=0, help="base seed; sample i uses seed*1000003+i (default 0)")
    gen.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    gen.add_argument("--mask-size", type=int, default=None, help="mask side (default: the latent size)")
    gen.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)")
    gen.add_argument("--jpeg-quality", type=int, default=95)
    gen.add_argument("--out", required=True, help="output shard directory")
    gen.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda:LOCAL_RANK if available)")
    gen.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on GPU, else fp32")
    gen.add_argument(
        "--backend", choices=("auto", "torch", "triton", "cuda"), default="auto", help="cross_attention_with_maps"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    gen.set_defaults(func=_cmd_generate)

    show = sub.add_parser("show", help="draw a grid of samples with mask overlays, boxes and captions (PNG)")
    show.add_argument("dir", help="shard directory")
    show.add_argument("--out", required=True, help="PNG to write")
    show.add_argument("--num", type=_positive_int, default=16, help="samples to draw (default 16)")
    show.add_argument("--cols", type=_positive_int, default=4, help="grid columns (default 4)")
    show.set_defaults(func=_cmd_show)

    verify = sub.add_parser(
        "verify", help="validate every sample of a shard directory; JSON report, exit 1 on problems"
    )
    verify.add_argument("dir", help="shard directory")
    verify.set_defaults(func=_cmd_verify)

    tr = sub.add_parser(
        "train",
        help="pretrain (same as `python freeatm_fast/train.py`; use `deepspeed`/`torchrun` on that script for "
        "several processes)",
    )
    tr.add_argument(
        "--config", default=None, help="a shipped config NAME or a YAML path (default mocov2_freeatm_generated)"
    )
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    tr.set_defaults(func=_cmd_train)

    toy = sub.add_parser(
        "toy-train",
        help="train the toy text-to-image model of the toy world (CPU, or GPU when present; resumable)",
        description="Train the toy world's text-to-image model (freeatm_fast/toy): v-prediction on toy-world "
        "train images at 32x32, EMA weights exported to OUT_DIR/model (load with --model OUT_DIR/model). "
        "Rerunning the same command continues from OUT_DIR/checkpoint.pt. Settings: key=value "
        "(out_dir, steps, batch_size, lr, ema, caption_dropout, shape_only_prob, pool_images, seed, device, "
        "stop_at, model.text_layers, ...; see freeatm_fast/toy/train.py).",
    )
    toy.add_argument("overrides", nargs="*", help="key=value settings, e.g. steps=2500 out_dir=runs/toy")
    toy.set_defaults(func=_cmd_toy_train)

    ev = sub.add_parser(
        "eval",
        help="kNN or linear-probe accuracy of a trained backbone; retrieval recall of a BLIP / ViLT run; mask quality",
        description="Evaluate a backbone on frozen features: weighted kNN or a linear probe, trained on TRAIN and "
        "scored on VAL (labelled shard directories or ImageFolders; default: the run's eval.train_root / eval.root, "
        "and the toy world's train / val split when those are empty). Prints one line (or JSON with --json); with "
        "--run, also writes RUN_DIR/eval_<kind>.json.",
    )
    ev_sub = ev.add_subparsers(dest="eval_kind", required=True, metavar="{knn,linear,retrieval,masks}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", metavar="RUN_DIR", help="a training run: its config.yaml and backbone.safetensors")
    common.add_argument("--backbone", metavar="FILE", help="a backbone .safetensors (default: RUN_DIR's)")
    common.add_argument("--model", metavar="NAME", help="timm model name (default: from the file's metadata)")
    common.add_argument("--train", metavar="ROOT", help="kNN memory bank / probe training set")
    common.add_argument("--val", metavar="ROOT", help="the labelled set scored")
    common.add_argument("--image-size", type=_positive_int, metavar="N", help="crop side (default: eval/data config)")
    common.add_argument("--crop-ratio", type=float, metavar="R", help="resize to N/R then centre-crop N (default 1.0)")
    common.add_argument("--batch-size", type=_positive_int, metavar="N", help="feature-extraction batch")
    common.add_argument("--max-train-images", type=int, metavar="N", help="cap on the training set (0 = all)")
    common.add_argument("--num-workers", type=int, metavar="N", help="data-loader workers (default: data config)")
    common.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    common.add_argument("--json", action="store_true", help="print the full result as JSON")
    knn = ev_sub.add_parser("knn", parents=[common], help="weighted kNN accuracy (InstDisc / MoCo protocol)")
    knn.add_argument("--k", type=_positive_int, metavar="K", help="neighbours (default: eval.knn_k)")
    knn.add_argument("--temperature", type=float, metavar="T", help="vote weight exp(sim/T) (default: eval config)")
    knn.set_defaults(func=_cmd_eval)
    linear = ev_sub.add_parser("linear", parents=[common], help="linear probe (logistic regression) accuracy")
    linear.add_argument("--epochs", type=_positive_int, help="default: eval.linear_epochs")
    linear.add_argument("--lr", type=float, help="default: eval.linear_lr")
    linear.set_defaults(func=_cmd_eval)
    retrieval = ev_sub.add_parser(
        "retrieval",
        help="image-text retrieval recall@1/5/10 of a BLIP / ViLT run",
        description="Image->text and text->image recall@1/5/10 of a finished BLIP / ViLT run (its config.yaml, "
        "tokenizer/ and model.safetensors) on held-out image-caption pairs: --data (a shard directory, or a folder "
        "of images with captions.json in the COCO Karpathy or a [{image, caption}] list format), default the run's "
        "eval.root, else the held-out split of its training data. Prints one line (or JSON with --json) and writes "
        "RUN_DIR/eval_retrieval.json, the data recorded in its 'source'.",
    )
    retrieval.add_argument("--run", metavar="RUN_DIR", required=True, help="a finished BLIP / ViLT training run")
    retrieval.add_argument("--data", metavar="FOLDER_OR_SHARDS", help="image-caption pairs (default: see above)")
    retrieval.add_argument("--max-images", type=int, metavar="N", help="first N images (0 = all; default: config)")
    retrieval.add_argument("--image-size", type=_positive_int, metavar="N", help="side (default: eval/data config)")
    retrieval.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    retrieval.add_argument("--json", action="store_true", help="print the full result as JSON")
    retrieval.set_defaults(func=_cmd_eval_retrieval)
    masks = ev_sub.add_parser(
        "masks",
        help="free-mask quality: per-word mIoU and pointing accuracy (shard directory, or re-noised toy world)",
        description="Score the free attention masks word by word: mIoU of the binary masks (argmax against tau, "
        "DESIGN §4) and pointing accuracy (the most attended pixel inside the reference), per word, word kind "
        "(colour / shape / phrase / other) and overall. SHARD MODE, `freeatm eval masks DIR`: the soft masks stored by "
        "freeatm generate in DIR, against the exact masks of --reference REF_DIR (same keys and object order) or "
        "else a colour segmentation of each generated image (toy-world captions name every object's colour). "
        "RE-NOISE MODE, `freeatm eval masks --model MODEL --toyworld --out OUT`: held-out toy-world images noised to "
        "a grid of timesteps and denoised by one UNet forward each with the map capture on, scored against their "
        "exact masks per word kind x resolution x timestep window; the mask recipe (resolutions, window, upsampling, "
        "per-token normalisation, tau) with the best colour-word mIoU on a validation split is reported on a "
        "separate test split (--write-recipe: and recorded as a toy model's generation defaults). Writes "
        "OUT/eval_masks.json and OUT/eval_masks.png (image | soft mask | binary mask | reference per word) and "
        "prints one summary line (or the JSON with --json).",
    )
    masks.add_argument(
        "dir", nargs="?", metavar="DIR", help="shard mode: a shard directory written by freeatm generate"
    )
    masks.add_argument("--out", metavar="OUT", help="output folder (shard mode default: DIR; needed in re-noise mode)")
    masks.add_argument("--reference", metavar="REF_DIR", help="shard mode: exact masks (default: colour segmentation)")
    masks.add_argument("--max-samples", type=int, metavar="N", help="shard mode: first N samples only (default: all)")
    masks.add_argument("--tau", type=float, help="shard mode: background score (default: DIR's generator's, else 0.4)")
    masks.add_argument(
        "--colour-distance", type=float, default=60.0, metavar="D", help="shard mode: RGB radius of a colour (60)"
    )
    masks.add_argument("--skip-unknown", action="store_true", help="shard mode: skip words without a colour, counted")
    masks.add_argument(
        "--toyworld", action="store_true", help="re-noise mode: held-out toy-world images (needs --model)"
    )
    masks.add_argument("--model", metavar="MODEL", help="re-noise mode: tiny-random, toy, a diffusers folder or hub id")
    masks.add_argument(
        "--write-recipe",
        action="store_true",
        help="re-noise mode, toy models: record the chosen recipe in MODEL's toy_t2i.json (the generator's defaults)",
    )
    masks.add_argument("--images", type=_positive_int, default=32, metavar="N", help="re-noise: images per split (32)")
    masks.add_argument("--timesteps", type=_positive_int, default=10, metavar="T", help="re-noise: timestep grid (10)")
    masks.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="re-noise: images per call")
    masks.add_argument("--image-size", type=_positive_int, metavar="S", help="re-noise: default the model's size")
    masks.add_argument("--mask-size", type=_positive_int, metavar="M", help="re-noise: default the image size")
    masks.add_argument("--seed", type=int, default=0, help="re-noise: noise seed (default 0)")
    masks.add_argument(
        "--toy-seed", type=int, default=0, metavar="S", help="re-noise: seed of the toy world rendered (default 0)"
    )
    masks.add_argument("--device", metavar="D", help="re-noise: cpu, cuda or cuda:N (default: cuda when available)")
    masks.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="re-noise: default fp16 on GPU, else fp32")
    masks.add_argument(
        "--backend", choices=("auto", "torch", "triton", "cuda"), default="auto", help="cross_attention_with_maps"
    )
    masks.add_argument("--json", action="store_true", help="print the full result as JSON")
    masks.set_defaults(func=_cmd_eval_masks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
