"""Test-only ComfyUI nodes, copied into the test ComfyUI homes' custom_nodes by tests/comfyui_harness.py (never
shipped with the pack).

DFTestFluxConditioning stands in for DualCLIPLoader + CLIPTextEncode of a Flux workflow: full-size T5-XXL cannot
be built for the tests, so it returns a CONDITIONING of Flux's shapes (T5 tokens of width 4096, CLIP-L's pooled
768) drawn from a generator seeded by the text, with FluxGuidance's `guidance` entry."""
import zlib

import torch


class DFTestFluxConditioning:
    CATEGORY = "diffusion_feature/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})}}

    def encode(self, text, tokens=8, guidance=3.5):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        return ([[torch.randn(1, tokens, 4096, generator=g),
                  {"pooled_output": torch.randn(1, 768, generator=g), "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"DFTestFluxConditioning": DFTestFluxConditioning}
