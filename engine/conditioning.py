"""What the denoiser is conditioned on besides the latent: text embeddings and each family's extras.

Its own module because prompts (which make it), ControlNets (which ride on it) and every run (which consume it)
all need it, and none of them should import another's module for a type.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """What the denoiser needs besides the latent: text embeddings and, per family, extras.

    encoder_hidden_states: (1 or B, tokens, dim). added_cond_kwargs: SDXL's text_embeds/time_ids or PixArt's
    resolution/aspect_ratio. encoder_attention_mask: PixArt's T5 padding mask (1 or B, tokens). pooled: the pooled
    text embedding (1 or B, dim) of transformers that take one as `pooled_projections` (Flux's CLIP-L).
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None
    encoder_attention_mask: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    controls: tuple = ()
    pooled: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def take(self, start: int, stop: int) -> "Conditioning":
        """The conditioning of images start..stop-1 (prompts and control images given one per image are cut; one
        given for all is kept)."""
        controls = tuple(dataclasses.replace(h, image=h.image[start:stop]) if h.image.shape[0] > 1 else h
                         for h in self.controls)
        if self.batch == 1:
            return dataclasses.replace(self, controls=controls)
        cut = lambda x: x[start:stop] if torch.is_tensor(x) and x.shape[0] == self.batch else x  # noqa: E731
        added = {k: cut(v) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return dataclasses.replace(self, encoder_hidden_states=cut(self.encoder_hidden_states),
                                   added_cond_kwargs=added, encoder_attention_mask=cut(self.encoder_attention_mask),
                                   pooled=cut(self.pooled), prompts=self.prompts[start:stop], controls=controls)

    def for_batch(self, batch: int, device, dtype) -> dict:
        """Forward kwargs for a batch of `batch` latents (a single prompt is repeated)."""
        def fit(x):
            if x is None or not torch.is_tensor(x):
                return x
            if x.shape[0] not in (1, batch):
                raise ValueError(f"conditioning holds {x.shape[0]} prompts for {batch} images; give one prompt "
                                 "for the batch or one per image")
            x = x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

        kwargs = {"encoder_hidden_states": fit(self.encoder_hidden_states)}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {k: fit(v) for k, v in self.added_cond_kwargs.items()}
        if self.encoder_attention_mask is not None:
            kwargs["encoder_attention_mask"] = fit(self.encoder_attention_mask)
        if self.pooled is not None:
            kwargs["pooled_projections"] = fit(self.pooled)
        return kwargs


def with_time_ids(cond: Conditioning, height: int, width: int) -> Conditioning:
    """SDXL micro-conditioning from the real image size: original = target = (H, W), no crop."""
    if cond.added_cond_kwargs is None or "text_embeds" not in cond.added_cond_kwargs:
        return cond
    pooled = cond.added_cond_kwargs["text_embeds"]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
    return dataclasses.replace(cond, added_cond_kwargs=dict(cond.added_cond_kwargs, time_ids=time_ids))
