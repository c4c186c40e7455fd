"""sdeseg: semantic segmentation from few labels with self-supervised depth, at cluster scale.

``sdeseg.load_model(path)`` loads any export (``.pt`` of a stage or ``.safetensors`` of
``sdeseg export``) for inference; see :mod:`sdeseg.exports`.
"""

__version__ = "0.1.0"


def load_model(path):
    """The network of an export, ready for inference (:func:`sdeseg.exports.load_model`)."""
    from sdeseg.exports import load_model as _load

    return _load(path)


__all__ = ["load_model"]
