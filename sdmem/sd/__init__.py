"""Stable Diffusion UNet fine-tuning (paper Sec. 6, Table 3, Appendix G): config, components, LoRA, latent cache,
trainer, generator. Importing this package (or sdmem.sd.config) imports no diffusers."""
