"""Test-only ComfyUI nodes, copied into the test ComfyUI homes' custom_nodes by tests/comfyui_harness.py (never
shipped with the pack).

DFTestFluxConditioning stands in for the text encoders of a Flux or SD3 workflow: full-size T5-XXL (and CLIP-G)
cannot be built for the tests, so it returns a CONDITIONING of the family's shapes drawn from a generator seeded by
the text: Flux's T5 tokens of width 4096, CLIP-L's pooled 768 and FluxGuidance's `guidance` entry (DualCLIPLoader +
CLIPTextEncode + FluxGuidance); SD3's tokens of width 4096 (CLIP-L + CLIP-G padded, then T5) and the pooled CLIP-L +
CLIP-G 2048, no guidance (TripleCLIPLoader + CLIPTextEncode)."""
import zlib

import torch

POOLED = {"flux": 768, "sd3": 2048}


class DFTestFluxConditioning:
    CATEGORY = "diffusion_feature/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})},
                "optional": {"family": (list(POOLED), {"default": "flux"})}}

    def encode(self, text, tokens=8, guidance=3.5, family="flux"):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        extra = {"pooled_output": torch.randn(1, POOLED[family], generator=g)}
        if family == "flux":
            extra["guidance"] = guidance
        return ([[torch.randn(1, tokens, 4096, generator=g), extra]],)


NODE_CLASS_MAPPINGS = {"DFTestFluxConditioning": DFTestFluxConditioning}
