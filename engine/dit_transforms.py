"""DiTF's feature transform for diffusion transformers (Gan et al., NeurIPS 2025, "Unleashing Diffusion Transformers
for Visual Correspondence by Modulating Massive Activations"): a block's input residual with its massive-activation
channels zeroed, then the block's own AdaLN, (1 + scale) * LayerNorm(x) + shift.

Massive activations are a few channels of a DiT's residual stream that are orders of magnitude larger than the
rest in nearly every token; through the LayerNorm they flatten every other channel. They belong to the checkpoint
(DiTF hard-codes Flux.1-dev's 154 and 1446), so here they are detected from the feature's own statistics and
returned, and any checkpoint (or another DiT) gets its own.

The modulation is not recomputed from the block's weights: the block's [shift | scale] is captured beside its input
by a companion tap (`layer_catalog.modulation_taps`, key "<id>:modulation"), i.e. the very tensor the model derived
from its timestep and text embeddings, on either backend. Capture the input unpooled (feature_resize 1): the
LayerNorm runs over each token's channels, which pooling first would change; pool the result instead.

    taps = resolve_taps("ditf", model, family="flux")
    with FeatureCapture(model, taps + modulation_taps(model, [t.id for t in taps]), ...) as cap: cap.run(...)
    features, massive = apply_ditf(cap.features)   # massive["vit-block28-in"].channels: the detected channels

Every entry point does this itself when the layer request names the `ditf` preset (`DitfRun`): extract and the
CLI on DF_MODEL, DFExtractFeatures, DFExtractNative and DFCaptureLayers / DFCollectFeatures on ComfyUI's MODEL.
Then every block input `vit-block{B}-in` of the request is transformed (add one beside the preset, "ditf,
vit-block20-in", for DiTF's feature of another block), per sample (an image's channels and feature do not depend on
its batch), before feature_resize pools it and before an ensemble averages; the metadata records the transform and
the channels found in any sample ("massive_channels": {id: [channels]}).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layer_catalog.families.dit_layout import MODULATION_SUFFIX
from ..layer_catalog.hooks import UNPOOLED_KINDS, pool_spatial
from ..layer_catalog.resolver import names_preset
from ..layer_catalog.taps import modulation_taps

# The preset that asks for DiTF's feature (the families that have it list it in their presets).
DITF = "ditf"

# A channel is massive when its typical magnitude is this many times that of the typical channel. Massive
# activations sit two to four orders above the rest (Sun et al. 2024 name values 100x-10000x the median); ordinary
# channels of a LayerNorm-fed residual stream stay within a factor of a few of each other.
DEFAULT_RATIO = 100.0
# The LayerNorm of Flux's and SD3's AdaLN blocks (no affine weights; the modulation is the affine part).
DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class MassiveChannels:
    """The channels found massive in a feature, ascending, and each one's typical magnitude over the typical
    channel's (what made it massive)."""

    channels: tuple[int, ...]
    ratios: tuple[float, ...]

    def __str__(self) -> str:
        if not self.channels:
            return "no massive-activation channel"
        return "massive-activation channels " + ", ".join(
            f"{c} ({r:.0f}x)" for c, r in zip(self.channels, self.ratios))


def _channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """Per channel (axis 1), the median over samples and positions of |x|: a massive activation is large in nearly
    every token, so a few outlier tokens (a register-like token, a border) do not make a channel massive."""
    return x.detach().float().abs().transpose(0, 1).reshape(x.shape[1], -1).median(dim=1).values


def _relative(x: torch.Tensor) -> torch.Tensor:
    magnitudes = _channel_magnitudes(x)
    return magnitudes / magnitudes.median().clamp_min(torch.finfo(torch.float32).tiny)


def detect_massive_channels(x: torch.Tensor, ratio: float = DEFAULT_RATIO) -> MassiveChannels:
    """The massive-activation channels of a feature (B, C, ...) (channels on axis 1, as captured)."""
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1 (how many times the typical channel's magnitude), got {ratio!r}")
    relative = _relative(x)
    channels = (relative >= ratio).nonzero().flatten().tolist()
    return MassiveChannels(tuple(channels), tuple(float(relative[c]) for c in channels))


def _checked(channels, width: int) -> list[int]:
    channels = sorted(set(channels))
    bad = [c for c in channels if not (isinstance(c, int) and 0 <= c < width)]
    if bad:
        raise ValueError(f"channels {bad} are not channels of a feature with {width} (0 to {width - 1})")
    return channels


def suppress_channels(x: torch.Tensor, channels) -> torch.Tensor:
    """A copy of the feature (B, C, ...) with those channels zeroed."""
    channels = _checked(channels, x.shape[1])
    x = x.clone()
    x[:, channels] = 0
    return x


def adaln(x: torch.Tensor, modulation: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """(1 + scale) * LayerNorm(x) + shift over the channels of each token of a feature (B, C, ...), with the
    block's [shift | scale] (B, 2C) (its companion modulation tensor). Computed in float32, returned in x's dtype."""
    b, c = x.shape[:2]
    if modulation.shape != (b, 2 * c):
        raise ValueError(f"the modulation is {tuple(modulation.shape)}; a feature {tuple(x.shape)} needs [shift | "
                         f"scale] of shape ({b}, {2 * c}) (its block's companion '{MODULATION_SUFFIX}' tensor)")
    shift, scale = modulation.float().to(x.device).chunk(2, dim=1)
    tokens = x.float().movedim(1, -1)  # (B, ..., C)
    view = (b,) + (1,) * (tokens.dim() - 2) + (c,)
    out = F.layer_norm(tokens, (c,), eps=eps) * (1 + scale.reshape(view)) + shift.reshape(view)
    return out.movedim(-1, 1).to(x.dtype)


def ditf(x: torch.Tensor, modulation: torch.Tensor, channels=None, ratio: float = DEFAULT_RATIO,
         eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, MassiveChannels]:
    """DiTF's feature from a block's input x (B, C, ...) and its modulation (B, 2C): the massive channels (detected,
    or the given ones) zeroed, then the block's AdaLN. Returns (feature, the channels suppressed)."""
    if channels is None:
        massive = detect_massive_channels(x, ratio)
    else:
        chosen = _checked(channels, x.shape[1])
        relative = _relative(x) if chosen else None
        massive = MassiveChannels(tuple(chosen), tuple(float(relative[c]) for c in chosen))
    return adaln(suppress_channels(x, massive.channels), modulation, eps), massive


def apply_ditf(features: dict, channels=None, ratio: float = DEFAULT_RATIO, eps: float = DEFAULT_EPS):
    """Every feature of a capture that has a companion modulation ("<id>:modulation") put through `ditf`; the
    companions are dropped, other features pass unchanged. Returns (features, {id: MassiveChannels})."""
    out, found = {}, {}
    for key, value in features.items():
        if key.endswith(MODULATION_SUFFIX):
            continue
        companion = features.get(key + MODULATION_SUFFIX)
        if companion is None:
            out[key] = value
        else:
            out[key], found[key] = ditf(value, companion, channels, ratio, eps)
    if not found:
        raise ValueError("no feature has its block's modulation: capture a block input (e.g. the ditf preset) with "
                         "layer_catalog.modulation_taps beside it")
    return out, found


def record_channels(meta: dict, found: dict) -> None:
    """Add DiTF's transform and the channels found ({id: channels}) to features' metadata, as a union with any
    channels it already records (other samples, draws, batches)."""
    meta["transform"] = DITF
    known = meta.setdefault("massive_channels", {})
    for layer_id, channels in found.items():
        known[layer_id] = sorted(set(known.get(layer_id, ())) | set(channels))


def merge_meta(meta: dict, other: dict) -> None:
    """Fold the transform metadata of another batch's features into `meta` (extraction in batches)."""
    if "massive_channels" in other:
        record_channels(meta, other["massive_channels"])


class DitfRun:
    """DiTF's feature for one extraction or capture whose layer request names the ditf preset.

    taps: what to capture (the request's taps and each block input's companion modulation), unpooled: feed the
    capture feature_resize 1 and `finish` pools after the transform."""

    def __init__(self, model, taps, feature_resize: int = 1):
        companions = modulation_taps(model, [t.id for t in taps])
        if not companions:
            raise ValueError(f"the {DITF} preset transforms block inputs (vit-block{{B}}-in) of a diffusion "
                             "transformer whose blocks have an AdaLN modulation; this request holds none")
        self.requested = list(taps)
        self.taps = self.requested + companions
        self.transformed = [t.id[:-len(MODULATION_SUFFIX)] for t in companions]
        self.feature_resize = feature_resize

    def finish(self, features: dict, meta: dict | None = None) -> dict:
        """The request's features from one capture's (companions included): each block input through `ditf`
        sample by sample, then pooled by feature_resize; the channels found are added to `meta`."""
        out, found = dict(features), {}
        for layer_id in self.transformed:
            x, modulation = features[layer_id], features[layer_id + MODULATION_SUFFIX]
            rows = [ditf(x[i:i + 1], modulation[i:i + 1]) for i in range(x.shape[0])]
            out[layer_id] = torch.cat([row for row, _ in rows])
            found[layer_id] = {c for _, massive in rows for c in massive.channels}
        if meta is not None:
            record_channels(meta, found)
        r = self.feature_resize
        return {t.id: pool_spatial(out[t.id], r) if r > 1 and t.kind not in UNPOOLED_KINDS else out[t.id]
                for t in self.requested}


def kept_request(ids: list[str], transformed: bool) -> list[str]:
    """Resolved ids as a layer request that still asks for DiTF's transform when it did (a model or capture that
    keeps its ids hands this on to the extraction that reads them)."""
    return [DITF, *ids] if transformed else list(ids)


def ditf_run(spec, model, taps, feature_resize: int = 1) -> DitfRun | None:
    """The DitfRun of a layer request that names the ditf preset, else None."""
    return DitfRun(model, taps, feature_resize) if names_preset(spec, DITF) else None
