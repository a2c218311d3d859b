import torch

from dd2cli.digits import load_digits_classifier, load_digits_dataset, split_indices


def test_split_is_fixed_and_disjoint():
    train, held = split_indices(1797)
    assert len(train) == 1438 and len(held) == 359
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.equal(split_indices(1797)[1], held)


def test_dataset_shapes_and_range():
    x, y = load_digits_dataset(16, "heldout")
    assert x.shape == (359, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (359,)
    assert 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == set(range(10))
    x32, _ = load_digits_dataset(32, "all")
    assert x32.shape == (1797, 3, 32, 32)


def test_shipped_classifier_accuracy_at_all_resolutions():
    clf = load_digits_classifier()
    for res in (8, 16, 32):
        x, y = load_digits_dataset(res, "heldout")
        acc = (clf.predict(x) == y).float().mean().item()
        assert acc >= 0.97, (res, acc)
    assert clf.features(x[:4]).shape == (4, clf.feature_dim)

