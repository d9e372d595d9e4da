"""Text side of the vision-language methods (BLIP, ViLT): the tokenizer and batch tokenisation (issue #7).

``build_tokenizer(cfg)`` returns a ``transformers.PreTrainedTokenizerFast``:

- ``vlp.tokenizer`` set: ``AutoTokenizer.from_pretrained(path or hub id)`` (a run directory's saved
  ``tokenizer/`` folder works too). Nothing is downloaded unless the user names a hub id.
- ``vlp.tokenizer`` empty (offline default): a BERT-style WordPiece tokenizer (lower-casing, BERT
  pre-tokenisation, ``[CLS] text [SEP]``) trained with ``tokenizers`` on every distinct caption of the training
  data plus the words of the Free-ATM position prompts (block numbers 1..grid^2), ``vlp.vocab_size`` tokens.
  ``tokenizers``' trainer is not deterministic (its alphabet and tie-breaks follow hash-map order: two trainings
  on the same captions give different token ids), so a training run never trains it on more than one process:
  :func:`run_tokenizer` (called by the engine before it builds the method) trains it once on rank 0 into
  ``<out_dir>/tokenizer``, every rank loads that folder, and a resumed run loads the folder it saved.

Every tokenizer gets BLIP's two extra tokens: ``[DEC]`` (``bos_token``: starts a caption for the decoder) and
``[ENC]`` (first token of the text fed to the image-grounded encoder for ITM); ``[MASK]`` is ensured for ViLT's
MLM. ``tokenize(tokenizer, captions, max_len, device)`` pads/truncates a list of strings to ``max_len``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from freeatm_fast.config import ConfigError

__all__ = [
    "DEC_TOKEN",
    "ENC_TOKEN",
    "build_tokenizer",
    "run_tokenizer",
    "save_tokenizer",
    "tokenize",
    "training_captions",
]

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def training_captions(cfg: Any) -> list[str]:
    """Every distinct caption of the training split (sorted), plus a text holding the position-prompt words."""
    from freeatm_fast.data.dataset import ShardDataset
    from freeatm_fast.data.loader import caption_groups, resolve_root
    from freeatm_fast.data.views import PROMPT_TEMPLATE

    captions, _ = caption_groups(ShardDataset(resolve_root(cfg, "train"), skip_bad=cfg.data.skip_bad))
    grid = cfg.vlp.prompt_grid
    prompts = [PROMPT_TEMPLATE.format(block=b, object="object") for b in range(1, grid * grid + 1)]
    return captions + prompts


def _train_wordpiece(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[*_SPECIAL, DEC_TOKEN, ENC_TOKEN])
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token=DEC_TOKEN,
        additional_special_tokens=[ENC_TOKEN],
    )


def build_tokenizer(cfg: Any):
    """The run's tokenizer (module docstring); ConfigError naming ``vlp.tokenizer`` when it cannot be loaded."""
    if cfg.vlp.tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(cfg.vlp.tokenizer, use_fast=True)
        except Exception as exc:  # OSError / ValueError / HF hub errors, depending on what is wrong
            raise ConfigError(f"vlp.tokenizer: cannot load a tokenizer from {cfg.vlp.tokenizer!r}: {exc}") from exc
        extra = {}
        if tok.bos_token is None or tok.bos_token != DEC_TOKEN and DEC_TOKEN not in tok.get_vocab():
            extra["bos_token"] = DEC_TOKEN
        if ENC_TOKEN not in tok.get_vocab():
            extra["additional_special_tokens"] = [ENC_TOKEN]
        if tok.mask_token is None:
            extra["mask_token"] = "[MASK]"
        if tok.pad_token is None:
            extra["pad_token"] = "[PAD]"
        if extra:
            tok.add_special_tokens(extra)
        if tok.bos_token != DEC_TOKEN and DEC_TOKEN in tok.get_vocab():
            tok.bos_token = DEC_TOKEN
        return tok
    return _train_wordpiece(training_captions(cfg), cfg.vlp.vocab_size)


def save_tokenizer(tokenizer, run_dir: str | os.PathLike) -> Path:
    """Save to ``run_dir/tokenizer`` (a temporary folder renamed into place); returns the folder. Loadable with
    ``vlp.tokenizer=<run_dir>/tokenizer``."""
    out = Path(run_dir) / "tokenizer"
    tmp = out.with_name(f".tokenizer.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def run_tokenizer(
    cfg: Any, run_dir: str | os.PathLike, *, is_main: bool, barrier, resume_dir: str | os.PathLike | None = None
) -> Path:
    """The tokenizer folder every process of a training run loads (``vlp.tokenizer`` empty; module docstring).

    Fresh run: rank 0 (``is_main``) trains the WordPiece tokenizer and saves it to ``run_dir/tokenizer``.
    Resumed run (``resume_dir``: the run directory whose checkpoint is resumed): the tokenizer that run saved,
    copied into ``run_dir`` when it is another directory; a FileNotFoundError naming the folder when it is missing
    (training again would give different ids than the checkpoint learned). ``barrier()`` is called by every rank
    after rank 0 has written; returns ``run_dir/tokenizer``."""
    out = Path(run_dir) / "tokenizer"
    if is_main:
        if resume_dir is None:
            save_tokenizer(build_tokenizer(cfg), run_dir)
        else:
            saved = Path(resume_dir) / "tokenizer"
            if not (saved / "tokenizer.json").is_file():
                raise FileNotFoundError(
                    f"{saved}: the resumed run's tokenizer is missing (a retrained one would not match the "
                    f"checkpoint's token ids); restore it or set vlp.tokenizer to the tokenizer the run used"
                )
            if saved.resolve() != out.resolve():
                tmp = out.with_name(f".tokenizer.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(saved, tmp)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
    barrier()
    return out


def tokenize(tokenizer, captions: list[str], max_len: int, device: torch.device | str = "cpu"):
    """captions -> (input_ids int64 [N, max_len], attention_mask int64 [N, max_len]) on ``device``, padded and
    truncated to ``max_len`` (tokenised on the host; one host-to-device copy)."""
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"].to(device, non_blocking=True), enc["attention_mask"].to(device, non_blocking=True)
