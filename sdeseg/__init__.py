"""sdeseg: semantic segmentation from few labels with self-supervised depth, at cluster scale."""

__version__ = "0.1.0"
