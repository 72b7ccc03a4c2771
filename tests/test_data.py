import torch

from fastdmd.data import load_digits
from fastdmd.data.digits import IMAGE_SIZE, NUM_CLASSES


def test_split_sizes_are_stratified_and_disjoint():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.bincount(test.labels, minlength=NUM_CLASSES), torch.full((NUM_CLASSES,), 100))
    assert train.images.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE)
    # No held-out image appears in the train split.
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:4000]}
    assert not any(tuple(x.flatten().tolist()) in flat_train for x in test.images)


def test_images_are_scaled_to_unit_range_with_ink():
    train = load_digits("train")
    assert train.images.min() == -1.0 and train.images.max() <= 1.0
    assert (train.images > 0).float().mean() > 0.05  # digits, not blank frames


def test_split_is_reproducible():
    assert torch.equal(load_digits("test").labels, load_digits("test").labels)


def test_bad_split_name():
    import pytest
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_digits("validation")
