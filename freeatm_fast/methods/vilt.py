"""ViLT (Kim et al. 2021): one transformer over text tokens and image patches, trained with masked language
modelling (MLM) and image-text matching (ITM) (DESIGN §7, issue #7). Random initialisation by default.

Model. The single-stream transformer *is* the timm ViT of ``model.backbone`` (a ``vit_*`` name, sizes in
``model.backbone_kwargs``): its patch embedding, class token, position embedding, blocks and final norm, so a ViT
checkpoint in ``model.pretrained`` initialises it as in ViLT, and the engine exports / kNN-evaluates it as an image
encoder. Text side: transformers' ``BertEmbeddings`` (word + position embeddings, LayerNorm, dropout) built from a
``BertConfig`` with vocabulary ``len(tokenizer)``, width = the ViT's ``embed_dim`` and ``vlp.max_len`` positions;
its dropout is the ViT's ``drop_rate`` (ViLT uses one rate for both). A modality-type embedding (``nn.Embedding(2,
D)``: 0 text, 1 image) is added to every token. The sequence is ``[text tokens ; image class token + patches]``
through the ViT's blocks, then the ViT's final norm. The transformer's width, depth and heads come from the ViT:
``vlp.text_width`` / ``vlp.text_layers`` / ``vlp.text_heads`` are not used by ViLT (the config still validates
them, for BLIP).

Padding. Text padding is masked in attention by a key-padding mask ``[N,1,1,L+T]`` (bool, True = attend) passed
to every block as ``attn_mask``: timm 1.0's ``Block.forward(x, attn_mask=...)`` hands it to
``F.scaled_dot_product_attention`` (or adds it to the scores on the non-fused path), which is exactly BERT's
extended attention mask. Reusing the ViT's blocks this way keeps "the transformer is the ViT" literally true and
needs no attention code of our own; a timm whose blocks lack ``attn_mask`` is rejected at construction
(ConfigError naming ``model.backbone``). Padded positions are never keys, so they cannot change any other
position's output (tested); they still get (ignored) outputs of their own.

Losses, in one forward pass per batch:

- ITM: each sample keeps its image with probability 0.5; otherwise its image is replaced by another image of the
  batch, chosen by a random derangement (a random permutation rolled by one: ``other[perm[i]] = perm[i+1]``, so no
  sample is given its own image; every other image is equally likely). The pooled first text token ([CLS]; dense +
  tanh as BERT's pooler) goes to a linear head with 2 classes (1 = matched); cross-entropy over the batch.
- MLM: of each caption's eligible tokens (not padding, not special), ``k = max(1, floor(n * vlp.mlm_prob + u))``
  are chosen uniformly (``u`` ~ U[0,1): stochastic rounding, so the expected share is exactly ``mlm_prob`` whenever
  ``n * mlm_prob >= 1``, and every caption with an eligible token has one to predict: captions are short). Chosen
  tokens become [MASK] (80%), a random token of the vocabulary (10%) or stay (10%), BERT's rule. A BERT MLM head
  (transform + decoder) predicts the original tokens at the text positions; cross-entropy over the chosen tokens of
  the *matched* pairs only (rows weighted by the ITM label, no boolean indexing).
- ``loss = vlp.lm_weight * loss_mlm + vlp.itm_weight * loss_itm``; logs ``loss_mlm``, ``loss_itm``, ``acc_itm``,
  ``acc_mlm``. Every random draw is made on the device; nothing in forward / backward synchronises with the host.

Retrieval (``retrieval_scores``): the ITM positive logit for every (image, caption) pair, computed in chunks of at
most ``pairs_per_forward`` (256) pairs: each image chunk is embedded once and repeated against a text chunk. The
cost is quadratic (Ni x Nt transformer passes), hence a small ``vlp.retrieval_max_images`` in the configs.

Differences from ViLT, on purpose or for the toy setting:

- no whole-word masking (ViLT masks every sub-word of a chosen word); tokens are chosen individually, at least one
  per caption, with an exact per-caption count instead of an independent coin per token;
- no word-patch alignment (WPA / optimal-transport) loss and no masked patch prediction;
- one forward pass computes both losses: the ITM input carries the MLM-masked text (ViLT runs a separate pass
  with unmasked text for ITM), and MLM uses only the matched half of the batch;
- ITM negatives are other images of the batch, not random images of the data set; a negative may by chance show
  the same caption (the toy world has 4 images per caption), which ViLT's sampling does not avoid either;
- no RandAugment, no image-patch sampling (ViLT keeps at most 200 patches), no ``rank_output`` head for retrieval
  (the ITM positive logit ranks the pairs);
- random initialisation by default (ViLT starts from ImageNet-21k ViT-B/32); ``vlp.text_pretrained`` optionally
  loads word embeddings from a Hugging Face checkpoint (ViLT learns them from scratch);
- the MLM decoder is not tied to the word embeddings (as in ViLT).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from freeatm_fast.config import ConfigError

from .backbone import build_backbone
from .common import Method, require, weighted_mean
from .text import build_tokenizer, save_tokenizer, tokenize

# MLM corruption of a chosen token (BERT): [MASK] with this probability, else a random token with this
# probability, else unchanged
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1
# most (image, caption) pairs per transformer pass in retrieval_scores
PAIRS_PER_FORWARD = 256


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation (as ViLT's ``init_weights``): N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLMHead(nn.Module):
    """BERT's MLM head: dense + GELU + LayerNorm (``BertPredictionHeadTransform``), then a linear map to the
    vocabulary. [..., D] -> [..., V]. (transformers 5's ``BertOnlyMLMHead`` also holds a separate ``bias``
    parameter that only ``BertForMaskedLM``'s weight tying uses; standalone it would be a parameter without
    gradient, so the head is rebuilt here from the same pieces.)"""

    def __init__(self, bert_config) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(bert_config)
        self.decoder = nn.Linear(bert_config.hidden_size, bert_config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class ViLT(Method):
    """ViLT (MLM + ITM) on a timm ViT. Batch (data.views=vlp): "image" [B,3,S,S], "caption" list[str] [B]."""

    uses_tokenizer = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings

        if cfg.data.views != "vlp":
            raise ConfigError(f"data.views: vilt needs data.views=vlp (one view + its caption), got {cfg.data.views!r}")
        self.backbone = vit = build_backbone(cfg.model)
        needed = ("patch_embed", "_pos_embed", "blocks", "norm", "embed_dim")
        if not all(hasattr(vit, a) for a in needed) or not len(vit.blocks):
            raise ConfigError(
                f"model.backbone: vilt needs a timm VisionTransformer (a vit_* model), got {cfg.model.backbone!r}"
            )
        if not all("attn_mask" in inspect.signature(blk.forward).parameters for blk in vit.blocks):
            raise ConfigError(
                f"model.backbone: the blocks of {cfg.model.backbone!r} take no attn_mask in this timm version, so "
                "text padding could not be masked; use a timm >= 1.0 ViT"
            )
        img = getattr(vit.patch_embed, "img_size", None)
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        if not getattr(vit, "dynamic_img_size", False) and img != (cfg.data.image_size, cfg.data.image_size):
            raise ConfigError(
                f"model.backbone_kwargs: the ViT takes {img[0]}x{img[1]} images but data.image_size="
                f"{cfg.data.image_size}; set img_size: {cfg.data.image_size} in model.backbone_kwargs"
            )
        vlp = cfg.vlp
        self.tokenizer = tok = build_tokenizer(cfg)
        if tok.mask_token_id is None or tok.pad_token_id is None:
            raise ConfigError(f"vlp.tokenizer: {cfg.vlp.tokenizer!r} has no [MASK] or [PAD] token (MLM needs both)")
        width = int(vit.embed_dim)
        drop = vit.pos_drop.p if isinstance(getattr(vit, "pos_drop", None), nn.Dropout) else 0.0
        self.bert_config = BertConfig(
            vocab_size=len(tok),
            hidden_size=width,
            num_hidden_layers=len(vit.blocks),
            num_attention_heads=int(getattr(vit.blocks[0].attn, "num_heads", 1)),
            intermediate_size=4 * width,
            max_position_embeddings=vlp.max_len,
            type_vocab_size=1,  # the modality type is added separately (modality_embeddings)
            pad_token_id=tok.pad_token_id,
            hidden_dropout_prob=drop,
            attention_probs_dropout_prob=drop,
        )
        self.text_embeddings = BertEmbeddings(self.bert_config)
        self.modality_embeddings = nn.Embedding(2, width)  # 0: text token, 1: image token
        self.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())  # BERT's pooler on the first text token
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(self.bert_config)
        for m in (self.text_embeddings, self.modality_embeddings, self.pooler, self.itm_head, self.mlm_head):
            _bert_init(m)
        special = torch.zeros(len(tok), dtype=torch.bool)
        special[[i for i in tok.all_special_ids if 0 <= i < len(tok)]] = True
        self.register_buffer("special_ids", special, persistent=False)  # [V] True for tokens never masked
        self.vocab_size = len(tok)
        self.mask_token_id = int(tok.mask_token_id)
        if vlp.text_pretrained:
            self._load_word_embeddings(vlp.text_pretrained)

    def _load_word_embeddings(self, path: str) -> None:
        """Copy the input embeddings of a Hugging Face checkpoint into the first rows of the word embeddings (the
        tokenizer may add a few tokens after the checkpoint's vocabulary: those rows keep their initialisation)."""
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(path)
        except Exception as exc:  # OSError / ValueError / hub errors, depending on what is wrong
            raise ConfigError(f"vlp.text_pretrained: cannot load a checkpoint from {path!r}: {exc}") from exc
        weight = model.get_input_embeddings().weight.detach()
        own = self.text_embeddings.word_embeddings.weight
        if weight.shape[1] != own.shape[1]:
            raise ConfigError(
                f"vlp.text_pretrained: {path!r} has {weight.shape[1]}-wide embeddings but the ViT's embed_dim is "
                f"{own.shape[1]} (model.backbone_kwargs.embed_dim)"
            )
        if weight.shape[0] > own.shape[0]:
            raise ConfigError(
                f"vlp.text_pretrained: {path!r} has {weight.shape[0]} tokens, more than the tokenizer's "
                f"{own.shape[0]}; set vlp.tokenizer to the checkpoint's tokenizer"
            )
        with torch.no_grad():
            own[: weight.shape[0]].copy_(weight)

    def save_artifacts(self, run_dir) -> None:
        save_tokenizer(self.tokenizer, run_dir)

    # ---- the transformer

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [N,L] -> text tokens [N,L,D] (word + position + LayerNorm, then modality type 0)."""
        return self.text_embeddings(input_ids) + self.modality_embeddings.weight[0]

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] -> image tokens [B,T,D] (class token + patches with position embeddings, the ViT's
        own embedding path, then modality type 1)."""
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        return x + self.modality_embeddings.weight[1].to(x.dtype)

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The single-stream transformer: text [N,L,D], text_mask [N,L] (1 = token, 0 = padding), image [N,T,D]
        -> [N, L+T, D] after the ViT's blocks and final norm. Padded text positions are masked as keys."""
        n, t = image.shape[0], image.shape[1]
        keys = torch.cat([text_mask.bool(), torch.ones(n, t, dtype=torch.bool, device=text_mask.device)], dim=1)
        attn_mask = keys[:, None, None, :]  # [N,1,1,L+T], broadcast over heads and queries
        x = torch.cat([text, image.to(text.dtype)], dim=1)
        for blk in self.backbone.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.backbone.norm(x)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """[N, L+T, D] -> ITM logits [N,2] (column 1 = matched) from the first text token ([CLS])."""
        return self.itm_head(self.pooler(fused[:, 0]))

    # ---- training inputs

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """MLM corruption (module docstring): -> (corrupted input_ids [N,L], labels [N,L] with the original id at
        the chosen tokens and -100 elsewhere). All draws on the device of ``input_ids``."""
        n_rows, length = input_ids.shape
        dev = input_ids.device
        eligible = attention_mask.bool() & ~self.special_ids[input_ids]
        p = float(self.cfg.vlp.mlm_prob)
        if p <= 0:
            return input_ids, torch.full_like(input_ids, -100)
        count = eligible.sum(1)  # [N]
        k = torch.floor(count * p + torch.rand(n_rows, device=dev)).clamp_min(1)  # stochastic rounding, >= 1
        score = torch.rand(n_rows, length, device=dev).masked_fill(~eligible, 2.0)  # ineligible tokens rank last
        rank = score.argsort(dim=1).argsort(dim=1)
        chosen = (rank < k[:, None]) & eligible
        labels = input_ids.masked_fill(~chosen, -100)
        r = torch.rand(n_rows, length, device=dev)
        random_ids = torch.randint(self.vocab_size, (n_rows, length), device=dev)
        out = torch.where(chosen & (r < MASK_SHARE), torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(chosen & (r >= MASK_SHARE) & (r < MASK_SHARE + RANDOM_SHARE), random_ids, out)
        return out, labels

    def itm_pairs(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index int64 [B], matched bool [B]): sample i is shown image ``index[i]``, its own when matched,
        else ``other[i] != i`` from a random derangement (module docstring). A batch of 1 has no negatives."""
        own = torch.arange(batch_size, device=device)
        if batch_size < 2:
            return own, torch.ones(batch_size, dtype=torch.bool, device=device)
        perm = torch.rand(batch_size, device=device).argsort()
        other = torch.empty_like(perm).scatter_(0, perm, perm.roll(-1))  # other[perm[i]] = perm[i+1]
        matched = torch.rand(batch_size, device=device) >= 0.5
        return torch.where(matched, own, other), matched

    # ---- training step

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        require(batch, ("image", "caption"), "vilt", "needs data.views=vlp")
        images = batch["image"]
        dev = images.device
        vlp = self.cfg.vlp
        input_ids, attention_mask = tokenize(self.tokenizer, batch["caption"], vlp.max_len, dev)
        masked_ids, labels = self.mask_tokens(input_ids, attention_mask)
        image_index, matched = self.itm_pairs(images.shape[0], dev)
        image_tokens = self.embed_image(images).index_select(0, image_index)
        fused = self.fuse(self.embed_text(masked_ids), attention_mask, image_tokens)

        itm_logits = self.itm_logits(fused).float()
        itm_labels = matched.long()
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        acc_itm = (itm_logits.detach().argmax(1) == itm_labels).float().mean()

        length = input_ids.shape[1]
        mlm_logits = self.mlm_head(fused[:, :length]).float()  # [B,L,V]
        per_token = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        weight = ((labels != -100) & matched[:, None]).flatten()
        loss_mlm = weighted_mean(per_token, weight)
        hit = (mlm_logits.detach().argmax(-1).flatten() == labels.flatten()).float()
        acc_mlm = weighted_mean(hit, weight, global_denominator=False)

        loss = vlp.lm_weight * loss_mlm + vlp.itm_weight * loss_itm
        return {
            "loss": loss,
            "loss_mlm": loss_mlm.detach(),
            "loss_itm": loss_itm.detach(),
            "acc_itm": acc_itm,
            "acc_mlm": acc_mlm.detach(),
        }

    # ---- evaluation

    @torch.no_grad()
    def retrieval_scores(
        self, images: torch.Tensor, captions: list[str], *, pairs_per_forward: int = PAIRS_PER_FORWARD
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM positive logit of every (image, caption) pair: images [Ni,3,S,S] on the module's device, captions
        [Nt] -> (s, s) with s float32 [Ni, Nt] on that device. At most ``pairs_per_forward`` pairs per transformer
        pass: ``ct = min(Nt, pairs)`` captions against ``max(1, pairs // ct)`` images. Captions are cut to the
        longest one's length (the rest is padding for all of them)."""
        dev = images.device
        n_img, n_txt = images.shape[0], len(captions)
        scores = torch.zeros(n_img, n_txt, dtype=torch.float32, device=dev)
        if n_img == 0 or n_txt == 0:
            return scores, scores
        input_ids, attention_mask = tokenize(self.tokenizer, captions, self.cfg.vlp.max_len)  # on the host
        # padding is masked, so dropping the columns that are padding in every caption changes no score and
        # shortens every pass (toy captions: ~20 of 48 tokens)
        length = max(1, int(attention_mask.sum(1).max()))
        input_ids, attention_mask = input_ids[:, :length].to(dev), attention_mask[:, :length].to(dev)
        text_chunk = min(n_txt, max(1, pairs_per_forward))
        image_chunk = max(1, pairs_per_forward // text_chunk)
        for i0 in range(0, n_img, image_chunk):
            image_tokens = self.embed_image(images[i0 : i0 + image_chunk])
            ni = image_tokens.shape[0]
            for t0 in range(0, n_txt, text_chunk):
                ids = input_ids[t0 : t0 + text_chunk]
                nt = ids.shape[0]
                text = self.embed_text(ids)
                fused = self.fuse(
                    text.repeat(ni, 1, 1),  # pair (a, b) = image a, caption b at row a * nt + b
                    attention_mask[t0 : t0 + text_chunk].repeat(ni, 1),
                    image_tokens.repeat_interleave(nt, dim=0),
                )
                scores[i0 : i0 + ni, t0 : t0 + nt] = self.itm_logits(fused)[:, 1].float().view(ni, nt)
        return scores, scores


__all__ = ["MLMHead", "ViLT"]
