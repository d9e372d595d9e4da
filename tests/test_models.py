"""Pipelines: the offline tiny-random model, loading from folders/hub ids, scheduler switching, clear errors."""

import json

import pytest
import torch

from freeatm_fast.generate import models
from freeatm_fast.generate.models import (
    UnsupportedModelError,
    build_tiny_random_pipeline,
    build_tiny_tokenizer,
    load_pipeline,
    looks_like_hub_id,
    set_scheduler,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any hub access in these tests is a bug: make the hub client refuse it (the constant is read at import).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: threads only add contention for these tiny ops
    p = build_tiny_random_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


def test_tiny_random_generates_an_image_offline(pipe):
    out = pipe("a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    img = out.images[0]
    assert img.size == (64, 64) and img.mode == "RGB"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # cross-attention at two resolutions, text width 32
    assert pipe.unet.config.cross_attention_dim == 32 and pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 32


def test_tiny_random_weights_are_seeded_and_leave_the_global_rng_alone(pipe):
    state = torch.random.get_rng_state()
    same = build_tiny_random_pipeline(seed=0)
    other = build_tiny_random_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, t in pipe.unet.state_dict().items():
        assert torch.equal(t, same.unet.state_dict()[name]), name
    w = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(pipe.unet.state_dict()[w], other.unet.state_dict()[w])
    for name, t in pipe.text_encoder.state_dict().items():
        assert torch.equal(t, same.text_encoder.state_dict()[name]), name


def test_tiny_tokenizer_words_and_sub_words():
    tok = build_tiny_tokenizer()
    assert tok.model_max_length == 77
    for w in models._TINY_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("a photo of a [dog]".replace("[", "").replace("]", "")).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>",
                                              "<|endoftext|>"]  # fmt: skip
    zebra = tok("zebra", add_special_tokens=False).input_ids
    assert len(zebra) > 1 and tok.decode(zebra) == "zebra"  # unknown words still encode, as sub-words
    padded = tok("A Dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[2] == tok("dog", add_special_tokens=False).input_ids[0]  # lower-cased
    assert tok.pad_token_id == tok.eos_token_id


def test_load_tiny_random_defaults(pipe):
    p = load_pipeline("tiny-random", device="cpu")
    assert p.unet.dtype == torch.float32 and p.unet.device.type == "cpu"
    p16 = load_pipeline("tiny-random", device="cpu", dtype=torch.bfloat16)
    assert p16.unet.dtype == torch.bfloat16 and p16.text_encoder.dtype == torch.bfloat16
    assert models.default_dtype("cuda") == torch.float16 and models.default_dtype("cpu") == torch.float32


def test_load_local_folder_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"), device="cpu")
    assert loaded.safety_checker is None
    assert loaded.tokenizer("a photo of a dog").input_ids == pipe.tokenizer("a photo of a dog").input_ids
    w = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.weight"
    assert torch.equal(loaded.unet.state_dict()[w], pipe.unet.state_dict()[w])
    img = loaded("a dog", num_inference_steps=1, output_type="pt").images
    assert img.shape == (1, 3, 64, 64)


def test_scheduler_switching(pipe):
    set_scheduler(pipe, "dpm")
    try:
        assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # carried over from the pipeline's config
        out = pipe("a cat", num_inference_steps=2, output_type="pt").images
        assert torch.isfinite(out).all()
    finally:
        set_scheduler(pipe, "ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="ddim, dpm"):
        set_scheduler(pipe, "euler")


def _write_index(folder, index):
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
}


def test_sdxl_folder_fails_clearly_before_loading_weights(tmp_path):
    # The folders hold no weights: reaching from_pretrained would fail differently.
    xl = _write_index(tmp_path / "xl", {**SD_INDEX, "_class_name": "StableDiffusionXLPipeline"})
    with pytest.raises(UnsupportedModelError, match=r"SDXL \(two text encoders\) is not supported yet"):
        load_pipeline(xl, device="cpu")
    two = _write_index(tmp_path / "two", {**SD_INDEX, "text_encoder_2": ["transformers", "CLIPTextModel"]})
    with pytest.raises(NotImplementedError, match="SDXL"):
        load_pipeline(two, device="cpu")
    flux = _write_index(tmp_path / "flux", {"_class_name": "FluxPipeline", "transformer": ["d", "x"]})
    with pytest.raises(UnsupportedModelError, match="no unet, text_encoder"):
        load_pipeline(flux, device="cpu")


def test_missing_paths_fail_clearly(tmp_path):
    for missing in (str(tmp_path / "nope"), "./no_such_model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such local folder") as e:
            load_pipeline(missing, device="cpu")
        assert missing in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="single-file"):
        load_pipeline(str(tmp_path / "w.safetensors"), device="cpu")
    bad = _write_index(tmp_path / "bad", {})
    (tmp_path / "bad" / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(bad, device="cpu")


def test_hub_id_is_only_fetched_when_named(monkeypatch):
    assert looks_like_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not looks_like_hub_id("./models/sd") and not looks_like_hub_id("/abs/sd") and not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("../sd")
    # Offline (HF_HUB_OFFLINE=1) and not cached: the error names the model and says what was tried.
    with pytest.raises(FileNotFoundError, match=r"'nobody-xyz/not-a-model'.*model_index.json from the hub"):
        load_pipeline("nobody-xyz/not-a-model", device="cpu")
