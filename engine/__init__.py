"""The engine on a diffusers model (DF_MODEL), ComfyUI-free: load -> encode -> hook -> run -> features ->
visualize / save. Library users import from here (`from diffusion_feature.engine.extraction import extract`); the
ComfyUI node faces in `nodes/` are thin callers of these modules, and the CLI (`cli.py`) is another.

Shared types have their own modules so data flows one way: `conditioning` (what the denoiser is conditioned on)
and `schedule` (training timesteps and their noise) sit below prompts, extraction, generation and inversion.
"""
