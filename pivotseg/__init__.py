"""pivotseg: vision foundation models adapted for segmentation that generalises."""

__version__ = "0.1.0"
