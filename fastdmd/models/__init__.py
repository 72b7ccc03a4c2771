"""Model adapters: one per family. Each says how to noise a clean sample and how a raw
prediction becomes a clean estimate, x0_pred = a * x_t + b * pred (see METHODS.md)."""

from fastdmd.models.digits import DigitsClassifier, DigitsFlowAdapter, build_digits_unet, load_digits_assets

__all__ = ["DigitsClassifier", "DigitsFlowAdapter", "build_digits_unet", "load_digits_assets"]
