"""The toy text-to-image model's data set: ``data.toy_source=model`` (issue #8).

``ensure_generated_toyworld(cfg.data)`` generates ``data.toy_train_images`` images from the toy world's train-split
captions (``builtin:toyworld``: colour words marked, ``IMAGES_PER_CAPTION`` images per caption like the rendered
toy world) with the model ``data.toy_model`` ("toy" = the shipped one) through the ordinary generator
(``freeatm_fast.generate.sampler.generate``: the same capture and mask recipe as for Stable Diffusion, with the
model's own measured sampling and recipe defaults), into ``generated_toyworld_dir(cfg.data)`` under
``$FREEATM_CACHE``. First use only: ``complete.json`` there records the settings and the weights' digest, and a later
call with the same ones returns at once; new weights regenerate. Several processes (ranks) share one generation
through an ``fcntl`` lock. The generator's shards are resumable, so an interrupted first use continues.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from freeatm_fast.data.shards import atomic_write_bytes

__all__ = ["ensure_generated_toyworld", "model_digest"]

log = logging.getLogger(__name__)

GENERATED_VERSION = 1


def model_digest(model: str) -> str:
    """sha256 (first 16 hex digits) of the toy model's weights file."""
    from freeatm_fast.toy.model import SHIPPED_DIR, WEIGHTS_NAME

    folder = SHIPPED_DIR if model == "toy" else Path(model).expanduser()
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"data.toy_model={model!r}: no toy model weights at {weights}")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _settings(cfg_data: Any) -> dict:
    from freeatm_fast.data.toyworld import IMAGES_PER_CAPTION

    n = int(cfg_data.toy_train_images)
    return {
        "version": GENERATED_VERSION,
        "model": str(cfg_data.toy_model),
        "weights": model_digest(str(cfg_data.toy_model)),
        "num_images": n,
        "prompts": f"builtin:toyworld:{max(1, n // IMAGES_PER_CAPTION)}",
        "seed": int(cfg_data.toy_seed),
    }


def ensure_generated_toyworld(cfg_data: Any, *, device: str | None = None, progress: bool = True) -> Path:
    """The generated train split for ``cfg_data`` (module docstring), generated first when missing or stale."""
    from freeatm_fast.data.toyworld import generated_toyworld_dir

    root = generated_toyworld_dir(cfg_data)
    marker = root / "complete.json"
    want = _settings(cfg_data)
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == want:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if marker.is_file():
            if json.loads(marker.read_text()).get("settings") == want:
                return root  # another process generated it while this one waited
            log.warning(f"{root}: generated with other settings or weights; generating again")
            shutil.rmtree(root)
        # named by the weights: an interrupted first use resumes, one of other weights is never mixed in
        partial = root.with_name(f"{root.name}.partial-{want['weights']}")
        t0 = time.time()
        log.warning(
            f"generating the toy model's data set in {root} ({want['num_images']} images, first use; later runs "
            "reuse it)"
        )
        _generate(want, partial, device=device, progress=progress)
        seconds = time.time() - t0
        atomic_write_bytes(
            partial / "complete.json",
            (json.dumps({"settings": want, "seconds": round(seconds, 1)}) + "\n").encode(),
        )
        partial.rename(root)
        log.warning(f"generated {root} in {seconds:.0f} s")
    return root


def _generate(want: dict, out: Path, *, device: str | None, progress: bool) -> dict:
    from freeatm_fast.generate.sampler import config_with_model_defaults, generate

    config = config_with_model_defaults(
        want["model"], prompts=want["prompts"], num_images=want["num_images"], batch_size=64, seed=want["seed"],
        shard_size=1000, out=str(out), device=device,
    )  # fmt: skip
    return generate(config, progress=progress, dist=(0, 1, 0))  # this process generates every shard
