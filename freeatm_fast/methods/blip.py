"""BLIP (Li et al. 2022) pretraining: image-text contrast (ITC), image-text matching (ITM) and captioning (LM) on
image-caption pairs; Free-ATM adds position prompts to the captions on the data side (DESIGN §7, issue #7).

Models (random initialisation unless ``vlp.text_pretrained`` / ``model.pretrained`` name weights):

- image encoder: ``self.backbone``, a timm ViT (:func:`build_backbone`); ``forward_features`` gives its tokens
  [B, 1+L, Dv] after the final norm, the class token (position 0) gives the ITC image feature. When Dv differs from
  ``vlp.text_width`` a Linear (``image_to_text``) maps the tokens to the text width for cross-attention.
- text encoder (:class:`TextTransformer`): BERT layers (``transformers.BertConfig``: vocabulary = the tokenizer's,
  ``vlp.text_width`` / ``text_layers`` / ``text_heads``, feed-forward 4x, ``vlp.max_len`` positions), each with
  bidirectional self-attention (padding masked), a cross-attention to image tokens and the feed-forward block.
  Text-only mode (ITC): ``[CLS] caption`` without cross-attention. Image-grounded mode (ITM): ``[ENC]`` replaces
  ``[CLS]`` and every layer cross-attends to the image tokens.
- text decoder: the same layers with causal self-attention, ``[DEC]`` (the tokenizer's ``bos_token``) first,
  cross-attention to the image tokens, and BERT's LM head (``lm_head``).
- ``vlp.text_pretrained`` (a local folder or hub id): both text models and the LM head start from that BERT
  checkpoint (``BertForMaskedLM.from_pretrained``, token embeddings resized to the tokenizer; the cross-attention
  layers stay freshly initialised, as in BLIP), and the checkpoint's sizes replace ``vlp.text_width`` /
  ``text_layers`` / ``text_heads``.

Losses, ``L = L_itc + vlp.itm_weight * L_itm + vlp.lm_weight * L_lm``:

- ITC: normalised ``vision_proj`` (class token) and ``text_proj`` ([CLS]) features of dimension ``vlp.embed_dim``,
  a learnable temperature (initial ``vlp.temperature``, kept in [0.001, 0.5]). The keys are the momentum encoders'
  features (EMA copies of image encoder, text encoder and both projections, ``vlp.momentum``, updated in
  ``after_step``) of the global batch plus a queue of ``vlp.queue_size`` earlier ones per modality (0 = the batch
  only). Targets: momentum distillation, ``0.4 * softmax(momentum similarities) + 0.6 * one-hot``; the loss is the
  mean of the image-to-text and text-to-image soft cross-entropies.
- ITM: for each image one negative text and for each text one negative image, drawn from the softmax of the
  in-batch ITC similarities with the diagonal zeroed (hard negatives); the image-grounded encoder's position-0
  output goes to ``itm_head`` (2 classes); cross-entropy over the B positive and 2B negative pairs.
- LM: the decoder predicts each next token of the caption (labels: ids with padding and the ``[DEC]`` position set
  to -100), cross-entropy with label smoothing 0.1.

Retrieval (:meth:`BLIP.retrieval_scores`): the ITC similarity of every image and caption; with ``vlp.rerank_k`` > 0,
BLIP's re-ranking: for each image its top-k texts (and for each text its top-k images) get the ITM positive logit
plus the ITC similarity, every other pair :data:`RERANK_LOW`.

Nothing in a training step synchronises with the host: captions are tokenised on the host into one host-to-device
copy, the negatives are sampled on the device, the temperature is clamped with a tensor op.

Differences from the BLIP paper and code, on purpose:

- The text encoder and decoder share no parameters (BLIP ties all but the self-attention layers of the two), and
  the LM head's output layer is not tied to the word embeddings (a tied tensor cannot be written to safetensors
  twice, and the run saves ``model.safetensors``).
- transformers 5 builds cross-attention only into causal (decoder) BERT layers, so the layer stack here is put
  together from transformers' BERT modules (``BertEmbeddings``, ``BertAttention``, ``BertIntermediate``,
  ``BertOutput``) with the parameter names of ``BertModel``; attention runs through PyTorch SDPA with boolean
  masks, and without dropout on the attention probabilities (it sends PyTorch's CPU SDPA to a ~40x slower path;
  BERT's hidden-state dropout 0.1 stays). Image tokens are projected to the text width by a Linear (BLIP sizes
  the cross-attention's key and value inputs with ``encoder_width`` instead).
- ITC keys are the momentum features of the *global* batch (gathered across ranks) plus the queue; BLIP uses the
  local batch plus the queue. ITM hard negatives come from each rank's own batch, as in BLIP's pretraining.
- The distillation weight alpha is a constant 0.4 (BLIP ramps it up over the first two epochs).
- Hard negatives are drawn with the exponential race ``argmax(p / q)``, ``q ~ Exp(1)``: the algorithm
  ``torch.multinomial(p, 1)`` itself runs, without its argument checks, which read values back to the host in
  some PyTorch versions.
- Positive and negative ITM pairs go through the encoder in one pass of 3B pairs (BLIP: two passes).
- The momentum update happens after each optimizer step (``after_step``) instead of at the start of the next
  forward: the same sequence of weights.
- Re-ranking gives the pairs outside the top-k :data:`RERANK_LOW` (BLIP: -100).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from freeatm_fast.config import ConfigError

from .backbone import build_backbone
from .common import (
    MASKED_LOGIT,
    Method,
    concat_all_gather,
    ema_update,
    enqueue,
    make_momentum_copy,
    rank_and_world,
    require,
)
from .text import ENC_TOKEN, build_tokenizer, save_tokenizer, tokenize

# BLIP's momentum-distillation weight: targets = ALPHA * softmax(momentum similarities) + (1 - ALPHA) * one-hot
ALPHA = 0.4
# BLIP keeps its learnable temperature in this range
TEMPERATURE_RANGE = (0.001, 0.5)
# BLIP's captioning loss uses label smoothing 0.1
LM_LABEL_SMOOTHING = 0.1
# retrieval: score of the pairs that re-ranking leaves out (below any ITM logit + similarity)
RERANK_LOW = MASKED_LOGIT
# retrieval: most images, texts or image-text pairs encoded at once
RETRIEVAL_BATCH = 256


# --------------------------------------------------------------------------------------------------------------
# text models


def text_config(vocab_size: int, vlp, pad_token_id: int):
    """The ``transformers.BertConfig`` of the text models built from the ``vlp`` section (random initialisation)."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=vlp.text_width,
        num_hidden_layers=vlp.text_layers,
        num_attention_heads=vlp.text_heads,
        intermediate_size=4 * vlp.text_width,
        max_position_embeddings=vlp.max_len,
        pad_token_id=pad_token_id,
    )
    return _attention_settings(config)


def _attention_settings(config):
    """SDPA attention (the masks here are boolean, True = attend: SDPA's convention) without dropout on the
    attention probabilities: with it PyTorch's CPU SDPA leaves its fused kernel for the math path (~40x slower on
    the toy sizes). The hidden-state dropout (BERT's 0.1) stays."""
    config._attn_implementation = "sdpa"
    config.attention_probs_dropout_prob = 0.0
    return config


def bert_init(module: nn.Module, std: float) -> None:
    """BERT's initialisation (``BertPreTrainedModel._init_weights``): Linear and Embedding weights N(0, std),
    biases 0, the padding embedding 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TextLayer(nn.Module):
    """A BERT layer with an optional cross-attention: self-attention (bidirectional with a key padding mask, or
    causal), cross-attention to image tokens when they are given, feed-forward. Parameter names are those of
    transformers' ``BertLayer`` (``attention``, ``crossattention``, ``intermediate``, ``output``)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

        self.attention = BertAttention(config)
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """h [B,T,W]; mask bool [B,1,1,T] (True = attend) or None; image [B,N,W] or None -> [B,T,W]."""
        h = self.attention(h, attention_mask=mask, is_causal=causal)[0]
        if image is not None:
            h = self.crossattention(h, encoder_hidden_states=image, encoder_attention_mask=None, is_causal=False)[0]
        return self.output(self.intermediate(h), h)


class TextTransformer(nn.Module):
    """BERT embeddings + :class:`TextLayer` s, with the state-dict names of ``transformers.BertModel``
    (``embeddings.*``, ``encoder.layer.{i}.*``), so BERT checkpoints load into it."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict(
            {"layer": nn.ModuleList(TextLayer(config) for _ in range(config.num_hidden_layers))}
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """input_ids int64 [B,T]; attention_mask [B,T] (1 = token, 0 = padding; None = no padding); image [B,N,W]
        tokens to cross-attend to (None = text only); causal: each position sees itself and earlier ones only
        (right padding then needs no mask for the real tokens). Returns hidden states [B,T,W]."""
        h = self.embeddings(input_ids=input_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B,1,1,T]
        if causal and mask is not None:
            # SDPA ignores is_causal when given a mask: the mask carries the causal pattern too
            T = input_ids.shape[1]
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
        for layer in self.encoder["layer"]:
            h = layer(h, mask, image, causal)
        return h


class LMHead(nn.Module):
    """BERT's LM head (transform: dense + activation + LayerNorm, then a Linear to the vocabulary); the output
    layer has its own weight (not tied to the word embeddings)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[..., W] -> logits [..., vocab]."""
        return self.decoder(self.transform(h))


def load_text_pretrained(path: str, vocab_size: int):
    """A BERT checkpoint (local folder or hub id) through ``BertForMaskedLM.from_pretrained``, its token
    embeddings resized to ``vocab_size``. Returns (its BertConfig with SDPA attention, its state dict);
    ConfigError naming ``vlp.text_pretrained`` when it cannot be loaded."""
    from transformers import BertForMaskedLM

    try:
        hf = BertForMaskedLM.from_pretrained(path)
    except Exception as exc:  # OSError / ValueError / hub errors, depending on what is wrong
        raise ConfigError(f"vlp.text_pretrained: cannot load a BERT checkpoint from {path!r}: {exc}") from exc
    hf.resize_token_embeddings(vocab_size)
    config = copy.deepcopy(hf.config)
    config.vocab_size = vocab_size
    return _attention_settings(config), hf.state_dict()


# --------------------------------------------------------------------------------------------------------------
# sampling


def sample_rows(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of non-negative ``weights`` [N,M], drawn with probability proportional to the row:
    int64 [N]. The exponential race ``argmax_j w_j / q_j`` with ``q_j ~ Exp(1)`` (what ``torch.multinomial(w, 1)``
    computes, without its host-side argument checks). A zero weight is never drawn unless the whole row is 0."""
    q = torch.empty_like(weights).exponential_(1.0)
    return (weights / q).argmax(dim=1)


@torch.no_grad()
def hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM negatives from the in-batch ITC similarities [B,B] (row i: image i against the texts, text i
    against the images; the positive on the diagonal): for each image a text and for each text an image, drawn
    from ``softmax(similarities) + 1e-4`` (every other pair stays possible) with the positive zeroed. Returns
    (negative text of each image, negative image of each text), int64 [B] each, on the device."""
    w_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
    w_i2t.fill_diagonal_(0)
    w_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4
    w_t2i.fill_diagonal_(0)
    return sample_rows(w_i2t), sample_rows(w_t2i)


# --------------------------------------------------------------------------------------------------------------
# the method


class BLIP(Method):
    """BLIP pretraining (module docstring). Batch (``data.views=vlp``): "image" float [B,3,S,S] and "caption"
    list[str] [B]."""

    uses_tokenizer = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        v = cfg.vlp
        if cfg.data.views != "vlp":
            raise ConfigError(f"data.views: blip needs data.views=vlp (images with captions), got {cfg.data.views!r}")

        # image encoder
        self.backbone = vit = build_backbone(cfg.model)
        if not all(hasattr(vit, a) for a in ("patch_embed", "blocks", "forward_features")) or (
            getattr(vit, "cls_token", None) is None
        ):
            raise ConfigError(
                f"model.backbone: blip needs a timm ViT with a class token (a vit_* model), got {cfg.model.backbone!r}"
            )
        img = getattr(vit.patch_embed, "img_size", None)
        if img is not None and not getattr(vit, "dynamic_img_size", False):
            img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
            if img != (cfg.data.image_size, cfg.data.image_size):
                raise ConfigError(
                    f"model.backbone_kwargs: the ViT takes {img[0]}x{img[1]} images but data.image_size="
                    f"{cfg.data.image_size}; set img_size: {cfg.data.image_size} (or dynamic_img_size: true)"
                )
        vision_width = int(vit.embed_dim)

        # tokenizer and text models
        self.tokenizer = tok = build_tokenizer(cfg)
        tok.padding_side = "right"  # position 0 is [CLS] / [ENC] / [DEC]; the causal decoder relies on it
        first = tok(["a"])["input_ids"][0][0]
        if tok.cls_token_id is None or first != tok.cls_token_id:
            raise ConfigError(
                f"vlp.tokenizer: blip needs a tokenizer that starts every text with [CLS] ({v.tokenizer!r})"
            )
        self.enc_token_id = int(tok.convert_tokens_to_ids(ENC_TOKEN))
        self.bos_token_id = int(tok.bos_token_id)
        vocab = len(tok)
        state = None
        if v.text_pretrained:
            config, state = load_text_pretrained(v.text_pretrained, vocab)
            if config.max_position_embeddings < v.max_len:
                raise ConfigError(
                    f"vlp.max_len: {v.max_len} exceeds the {config.max_position_embeddings} positions of "
                    f"vlp.text_pretrained={v.text_pretrained!r}"
                )
        else:
            config = text_config(vocab, v, tok.pad_token_id)
        self.text_config = config
        width = config.hidden_size
        self.text_encoder = TextTransformer(config)
        self.text_decoder = TextTransformer(config)
        self.lm_head = LMHead(config)
        for module in (self.text_encoder, self.text_decoder, self.lm_head):
            bert_init(module, config.initializer_range)
        if state is not None:
            self._load_text_state(state)

        # heads
        self.image_to_text = nn.Linear(vision_width, width) if vision_width != width else nn.Identity()
        self.vision_proj = nn.Linear(vision_width, v.embed_dim)
        self.text_proj = nn.Linear(width, v.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        # shape [1], not a 0-dim tensor: DeepSpeed broadcasts parameters as byte views, which 0-dim ones cannot give
        self.temp = nn.Parameter(torch.full((1,), float(v.temperature)))

        # momentum encoders (frozen; EMA in after_step) and feature queues
        self.backbone_m = make_momentum_copy(self.backbone)
        self.vision_proj_m = make_momentum_copy(self.vision_proj)
        self.text_encoder_m = make_momentum_copy(self.text_encoder)
        self.text_proj_m = make_momentum_copy(self.text_proj)
        q = v.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(q, v.embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(q, v.embed_dim), dim=1))
        self.register_buffer("image_queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("text_queue_ptr", torch.zeros((), dtype=torch.long))

    def _load_text_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a ``BertForMaskedLM`` state dict into the text encoder, the decoder (``bert.*``; the
        cross-attention layers stay freshly initialised, as in BLIP) and the LM head (``cls.predictions.*``)."""
        where = f"vlp.text_pretrained={self.cfg.vlp.text_pretrained!r}"
        bert = {k.removeprefix("bert."): t for k, t in state.items() if k.startswith("bert.")}
        for module in (self.text_encoder, self.text_decoder):
            try:
                missing, unexpected = module.load_state_dict(bert, strict=False)
            except RuntimeError as exc:  # shape mismatch
                raise ConfigError(f"vlp.text_pretrained: {where} does not fit the text model: {exc}") from exc
            missing = [k for k in missing if ".crossattention." not in k]
            unexpected = [k for k in unexpected if not k.startswith("pooler.")]
            if missing or unexpected:
                raise ConfigError(
                    f"vlp.text_pretrained: {where} is not a BERT checkpoint (missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]})"
                )
        pre = "cls.predictions."
        head = {k.removeprefix(pre): t for k, t in state.items() if k.startswith(pre + "transform.")}
        head["decoder.weight"] = state.get(pre + "decoder.weight")
        head["decoder.bias"] = state.get(pre + "bias", state.get(pre + "decoder.bias"))
        try:
            self.lm_head.load_state_dict({k: t for k, t in head.items() if t is not None})
        except RuntimeError as exc:  # missing or mis-shaped LM head weights
            raise ConfigError(f"vlp.text_pretrained: {where} has no usable BERT LM head: {exc}") from exc

    def save_artifacts(self, run_dir) -> None:
        """The tokenizer, in ``run_dir/tokenizer`` (``vlp.tokenizer=<run_dir>/tokenizer`` loads it again)."""
        save_tokenizer(self.tokenizer, run_dir)

    # ---------------------------------------------------------------------------------------------------------
    # encoders

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,S,S] -> ViT tokens [B, 1+L, Dv] (class token first)."""
        return self.backbone.forward_features(images)

    def image_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens [B,1+L,Dv] -> normalised ITC features [B, embed_dim] (fp32)."""
        return F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text-only encoder: ids, mask [B,T] -> normalised ITC features [B, embed_dim] (fp32)."""
        return F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0]).float(), dim=-1)

    def itm_logits(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Image-grounded encoder: ids, mask [N,T] (position 0 is replaced by [ENC]), image tokens at the text
        width [N,1+L,W] -> ITM logits [N,2] (class 1 = the text matches the image)."""
        ids = ids.clone()
        ids[:, 0] = self.enc_token_id
        return self.itm_head(self.text_encoder(ids, mask, image)[:, 0])

    @torch.no_grad()
    def momentum_features(
        self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Momentum encoders' normalised ITC features of images [B,3,S,S] and texts [B,T]: ([B,E], [B,E])."""
        img = F.normalize(self.vision_proj_m(self.backbone_m.forward_features(images)[:, 0]).float(), dim=-1)
        txt = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask)[:, 0]).float(), dim=-1)
        return img, txt

    # ---------------------------------------------------------------------------------------------------------
    # losses

    def temperature(self) -> torch.Tensor:
        """The ITC temperature (0-dim), clamped to BLIP's range (a tensor op: no host sync)."""
        return self.temp.clamp(*TEMPERATURE_RANGE)[0]

    def itc_loss(
        self, img_feat: torch.Tensor, txt_feat: torch.Tensor, img_feat_m: torch.Tensor, txt_feat_m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC with momentum distillation. Online features img_feat, txt_feat [B,E] (the anchors), momentum
        features [B,E] (gathered over ranks, then the queue: the keys). Returns (loss, in-batch image-to-text and
        text-to-image similarities [B,B] of this rank's batch, detached, for the ITM negatives)."""
        rank, _ = rank_and_world()
        B = img_feat.shape[0]
        temp = self.temperature()
        # a new tensor each (torch.cat copies): the queues change in place after the loss
        img_keys = torch.cat([concat_all_gather(img_feat_m), self.image_queue])  # [world*B + Q, E]
        txt_keys = torch.cat([concat_all_gather(txt_feat_m), self.text_queue])
        pos = rank * B + torch.arange(B, device=img_feat.device)
        # fp32 similarities also under autocast (small matmuls; bf16 would round them to ~3 digits)
        with torch.autocast(device_type=img_feat.device.type, enabled=False):
            with torch.no_grad():
                one_hot = (pos[:, None] == torch.arange(img_keys.shape[0], device=pos.device)[None, :]).float()
                t_i2t = ALPHA * F.softmax(img_feat_m @ txt_keys.T / temp, dim=1) + (1 - ALPHA) * one_hot
                t_t2i = ALPHA * F.softmax(txt_feat_m @ img_keys.T / temp, dim=1) + (1 - ALPHA) * one_hot
            sim_i2t = img_feat @ txt_keys.T / temp  # [B, world*B + Q]
            sim_t2i = txt_feat @ img_keys.T / temp
            loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
            loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
        local = slice(rank * B, (rank + 1) * B)
        return (loss_i2t + loss_t2i) / 2, sim_i2t[:, local].detach(), sim_t2i[:, local].detach()

    def itm_loss(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        image: torch.Tensor,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM over B positive pairs and 2B hard negatives. ids, mask [B,T]; image tokens at the text width
        [B,1+L,W]; in-batch similarities [B,B] (rows: anchors). Returns (loss, accuracy detached)."""
        B = ids.shape[0]
        neg_text, neg_image = hard_negatives(sim_i2t, sim_t2i)
        pair_ids = torch.cat([ids, ids, ids[neg_text]])
        pair_mask = torch.cat([mask, mask, mask[neg_text]])
        pair_image = torch.cat([image, image[neg_image], image])
        logits = self.itm_logits(pair_ids, pair_mask, pair_image).float()  # [3B, 2]
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(ids.device)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, acc

    def lm_loss(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Captioning loss: the causal decoder reads ``[DEC] caption`` [B,T] and cross-attends to the image tokens
        [B,1+L,W]; next-token cross-entropy (label smoothing 0.1) over the real tokens after [DEC]."""
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        labels = dec_ids.masked_fill(mask == 0, -100)
        labels[:, 0] = -100
        # right padding: a real token never sees padding under the causal mask, so no padding mask is needed
        h = self.text_decoder(dec_ids, None, image, causal=True)
        logits = self.lm_head(h[:, :-1]).float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=LM_LABEL_SMOOTHING,
        )

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The three losses (differentiable) and the ITM accuracy for a batch; enqueues the momentum features."""
        require(batch, ("image", "caption"), "blip", "needs data.views=vlp")
        images = batch["image"]
        ids, mask = tokenize(self.tokenizer, batch["caption"], self.cfg.vlp.max_len, images.device)
        tokens = self.image_tokens(images)
        img_feat = self.image_features(tokens)
        txt_feat = self.text_features(ids, mask)
        img_feat_m, txt_feat_m = self.momentum_features(images, ids, mask)
        loss_itc, sim_i2t, sim_t2i = self.itc_loss(img_feat, txt_feat, img_feat_m, txt_feat_m)
        image = self.image_to_text(tokens)
        loss_itm, acc_itm = self.itm_loss(ids, mask, image, sim_i2t, sim_t2i)
        loss_lm = self.lm_loss(ids, mask, image)
        # queues after the losses: this step's momentum features become negatives from the next step on
        with torch.no_grad():
            enqueue(self.image_queue, self.image_queue_ptr, concat_all_gather(img_feat_m))
            enqueue(self.text_queue, self.text_queue_ptr, concat_all_gather(txt_feat_m))
        return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm, "acc_itm": acc_itm}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" (scalar, differentiable) and the detached logs "loss_itc", "loss_itm", "loss_lm",
        "acc_itm"."""
        out = self.losses(batch)
        v = self.cfg.vlp
        loss = out["loss_itc"] + v.itm_weight * out["loss_itm"] + v.lm_weight * out["loss_lm"]
        return {"loss": loss, **{k: t.detach() for k, t in out.items()}}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        """EMA of the momentum encoders (constant ``vlp.momentum``); the temperature back into its range."""
        m = self.cfg.vlp.momentum
        ema_update(self.backbone_m, self.backbone, m)
        ema_update(self.vision_proj_m, self.vision_proj, m)
        ema_update(self.text_encoder_m, self.text_encoder, m)
        ema_update(self.text_proj_m, self.text_proj, m)
        getattr(self.temp, "ds_tensor", self.temp.data).clamp_(*TEMPERATURE_RANGE)  # ZeRO-3: the local shard

    # ---------------------------------------------------------------------------------------------------------
    # retrieval

    @torch.no_grad()
    def retrieval_scores(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """images [Ni,3,S,S] on the module's device, captions [Nt] -> (i2t, t2i), float32 [Ni,Nt] each.

        ITC similarities of normalised image (class token) and text-only ([CLS]) features; with
        ``vlp.rerank_k`` = k > 0, BLIP's re-ranking: in row i of i2t the k texts most similar to image i get
        ``ITM positive logit + similarity`` and the others :data:`RERANK_LOW`; column j of t2i likewise for the k
        images most similar to text j. Without re-ranking i2t and t2i are the same tensor."""
        device = images.device
        n = RETRIEVAL_BATCH
        img_feats, img_tokens = [], []
        for start in range(0, images.shape[0], n):
            tokens = self.image_tokens(images[start : start + n])
            img_feats.append(self.image_features(tokens))
            img_tokens.append(self.image_to_text(tokens))
        ids, mask = tokenize(self.tokenizer, list(captions), self.cfg.vlp.max_len, device)
        txt_feats = [self.text_features(ids[s : s + n], mask[s : s + n]) for s in range(0, ids.shape[0], n)]
        with torch.autocast(device_type=device.type, enabled=False):  # fp32: bf16 would create ties
            sim = torch.cat(img_feats) @ torch.cat(txt_feats).T  # [Ni, Nt]
        k = min(self.cfg.vlp.rerank_k, sim.shape[1]), min(self.cfg.vlp.rerank_k, sim.shape[0])
        if k[0] == 0 or k[1] == 0:
            return sim.float(), sim.float()
        image = torch.cat(img_tokens)
        i2t = self._rerank(sim, k[0], image, ids, mask, images_are_rows=True)
        t2i = self._rerank(sim.T, k[1], image, ids, mask, images_are_rows=False).T
        return i2t, t2i

    def _rerank(
        self,
        sim: torch.Tensor,
        k: int,
        image: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        images_are_rows: bool,
    ) -> torch.Tensor:
        """Re-rank each row of ``sim`` [R,C] (rows: queries, columns: candidates): its top-k columns get the ITM
        positive logit of the pair plus the similarity, the others RERANK_LOW. Returns float32 [R,C]."""
        out = torch.full(sim.shape, RERANK_LOW, dtype=torch.float32, device=sim.device)
        top_sim, top_idx = sim.float().topk(k, dim=1)  # [R,k]
        rows_per_batch = max(1, RETRIEVAL_BATCH // k)
        for start in range(0, sim.shape[0], rows_per_batch):
            rows = torch.arange(start, min(start + rows_per_batch, sim.shape[0]), device=sim.device)
            query = rows.repeat_interleave(k)  # [r*k]
            cand = top_idx[rows].reshape(-1)
            img_idx, txt_idx = (query, cand) if images_are_rows else (cand, query)
            score = self.itm_logits(ids[txt_idx], mask[txt_idx], image[img_idx])[:, 1].float()
            out[rows] = out[rows].scatter(1, top_idx[rows], score.view(-1, k) + top_sim[rows])
        return out
