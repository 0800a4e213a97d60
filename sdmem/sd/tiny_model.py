"""The tiny Stable Diffusion's parts built from configs (no download): the character tokenizer and the pipeline of
the real architecture at toy width. Shared by ``sdmem.sd.tiny`` (the random-weight build and its command) and
``sdmem.sd.pretrained`` (which trains this text encoder's pipeline around its own VAE and UNet)."""

from __future__ import annotations

from pathlib import Path

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-'.,{}"


def tiny_tokenizer():
    """A character-level CLIPTokenizer held in memory: every ASCII letter/digit is a token (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *_CHARS, *(c + "</w>" for c in _CHARS)])}
    import tempfile, json  # noqa: E401 - CLIPTokenizer reads vocab/merges from files
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp, "vocab.json")), str(Path(tmp, "merges.txt")), pad_token="<|endoftext|>",
                             model_max_length=77)


def tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of the real architecture at toy width: UNet (32, 64), VAE with four levels
    (downsampling 8x like SD's), CLIP text encoder of width 32; safety checker off."""
    import torch

    from .components import quiet_transformers

    with quiet_transformers():
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
