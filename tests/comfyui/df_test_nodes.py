"""Test-only ComfyUI nodes, copied into the test ComfyUI homes' custom_nodes by tests/comfyui_harness.py (never
shipped with the pack).

DFTestFluxConditioning stands in for the text encoders of a Flux or SD3 workflow: full-size T5-XXL (and CLIP-G)
cannot be built for the tests, so it returns a CONDITIONING of the family's shapes drawn from a generator seeded by
the text: Flux's T5 tokens of width 4096, CLIP-L's pooled 768 and FluxGuidance's `guidance` entry (DualCLIPLoader +
CLIPTextEncode + FluxGuidance); SD3's tokens of width 4096 (CLIP-L + CLIP-G padded, then T5) and the pooled CLIP-L +
CLIP-G 2048, no guidance (TripleCLIPLoader + CLIPTextEncode); z-image's Qwen3-4B hidden states of width 2560 with the
attention mask ComfyUI's Lumina2-type text encoders return (its sum is NextDiT's num_tokens), no pooled vector
(CLIPLoader qwen_3_4b + CLIPTextEncode); qwen-image's Qwen2.5-VL hidden states of width 3584, nothing else (CLIPLoader
qwen_2.5_vl_7b + CLIPTextEncode)."""
import zlib

import torch

WIDTH = {"flux": 4096, "sd3": 4096, "z-image": 2560, "qwen-image": 3584}
POOLED = {"flux": 768, "sd3": 2048}
MASKED = ("z-image",)


class DFTestFluxConditioning:
    CATEGORY = "diffusion_feature/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})},
                "optional": {"family": (list(WIDTH), {"default": "flux"})}}

    def encode(self, text, tokens=8, guidance=3.5, family="flux"):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
        extra = {"pooled_output": torch.randn(1, POOLED[family], generator=g)} if family in POOLED else {}
        if family in MASKED:
            extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if family == "flux":
            extra["guidance"] = guidance
        return ([[torch.randn(1, tokens, WIDTH[family], generator=g), extra]],)


NODE_CLASS_MAPPINGS = {"DFTestFluxConditioning": DFTestFluxConditioning}


# ---- a test-only route: what still holds the pack's loaded models (for the failure message of the memory tests) ----
def _holders(obj, depth: int = 5, walk=None) -> list[str]:
    """Chains of objects that refer to `obj`, up to `depth` levels up, each named by its type (a frame by its
    function, a dict by the key that holds the object, a module by its name), leaving out the walk's own objects."""
    import gc
    import inspect
    import types

    walk = {"seen": set(), "own": set()} if walk is None else walk
    walk["own"].add(id(inspect.currentframe()))
    refs = gc.get_referrers(obj)
    walk["own"].add(id(refs))
    chains = []
    for ref in refs:
        if id(ref) in walk["seen"] or id(ref) in walk["own"] or ref is walk or ref in walk.values():
            continue
        walk["seen"].add(id(ref))
        if inspect.isframe(ref):
            chains.append(f"frame {ref.f_code.co_name} ({ref.f_code.co_filename}:{ref.f_lineno})")
            continue
        if isinstance(ref, types.ModuleType):
            chains.append(f"module {ref.__name__}")
            continue
        if isinstance(ref, dict):
            keys = []  # a loop, not a comprehension: that would make `obj` a cell, one more referrer
            for k, v in ref.items():
                if v is obj:
                    keys.append(repr(k))
            label = f"dict[{', '.join(keys[:3])}]"
        else:
            label = type(ref).__qualname__
        above = _holders(ref, depth - 1, walk) if depth > 1 else []
        chains += [f"{label} <- {a}" for a in above] or [label]
    return chains[:40]


def _register_holders_route():
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return

    @PromptServer.instance.routes.get("/df_test/holders")
    async def holders(request):
        import gc
        import sys

        gc.collect()
        live = next((m.LIVE_DENOISERS for name, m in list(sys.modules.items())
                     if name.endswith("engine.loading") and hasattr(m, "LIVE_DENOISERS")), ())
        return web.json_response([_holders(model) for model in list(live)])


_register_holders_route()
