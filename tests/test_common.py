import math

import pytest
import torch
import torch.nn as nn

import common
from conftest import make_mnist


def test_receptive_field_of_a_known_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1))
    table = common.layer_table(model)
    assert [r["rf"] for r in table] == [3, 5, 6, 10, 10 + (10 - 1) * 2]
    assert [r["output"] for r in table] == [[4, 26, 26], [4, 24, 24], [4, 12, 12], [4, 10, 10], [4, 1, 1]]
    assert sum(r["params"] for r in table) == common.count_params(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size",
                         [(2, None, 0, False, 24), (3, 2, 1, False, 13), (2, None, 0, True, 7)])
def test_max_pool_gives_the_same_values_and_gradients_as_torch(dtype, kernel, stride, padding, ceil_mode, size):
    torch.manual_seed(0)
    # ReLU output, as in the nets: many tied zeros, and the tie-breaking must match too
    x = torch.randn(4, 5, size, size).relu().to(dtype)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = common.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)(ours_in)
    ref = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)(ref_in)
    grad = torch.randn_like(ref)
    ours.backward(grad)
    ref.backward(grad)
    assert ours.is_contiguous() and torch.equal(ours, ref)
    assert ours_in.grad.is_contiguous() and torch.equal(ours_in.grad, ref_in.grad)


def test_max_pool_counts_as_a_pool_in_the_layer_table():
    table = common.layer_table(nn.Sequential(nn.Conv2d(1, 4, 3), common.MaxPool2d(2)))
    assert [r["rf"] for r in table] == [3, 4] and table[1]["output"] == [4, 13, 13]


def test_rotate_by_zero_is_identity_and_by_90_turns_the_image():
    img = torch.zeros(2, 1, 28, 28)
    img[:, :, 2:6, 10:18] = 1.0
    same = common.rotate(img, torch.zeros(2))
    assert torch.allclose(same, img, atol=1e-5)
    turned = common.rotate(img, torch.tensor([90.0, -90.0]))
    # a quarter turn either way lands on one of torch.rot90's two directions
    assert any(torch.allclose(turned[0, 0], torch.rot90(img[0, 0], k), atol=1e-4) for k in (1, -1))
    assert not torch.allclose(turned[0], turned[1], atol=1e-3)


def test_uniform_symmetric_stay_in_range_and_repeat_with_the_seed():
    a = common.uniform_symmetric(1000, 7.0, torch.Generator().manual_seed(3))
    b = common.uniform_symmetric(1000, 7.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.abs().max() <= 7.0 and a.std() > 3


def test_load_synthetic_mnist_and_measure_it(tmp_path):
    data = common.load_mnist(make_mnist(tmp_path, 50, 20))
    assert data["train_images"].shape == (50, 28, 28) and data["test_labels"].shape == (20,)
    stats = common.data_stats(data["train_images"], data["train_labels"])
    x = data["train_images"].float() / 255
    assert stats["mean"] == pytest.approx(x.mean().item(), abs=1e-4)
    assert stats["class_counts"] == torch.bincount(data["train_labels"], minlength=10).tolist()


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(common.UserError, match=str(tmp_path / "nowhere")) as e:
        common.load_mnist(tmp_path / "nowhere")
    assert "--data-dir" in str(e.value) and "MNIST_DIR" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "magic", "shape"])
def test_corrupt_file_is_named(tmp_path, damage):
    root = make_mnist(tmp_path, 50, 20)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "magic":
        data[3] = 0
    else:
        data[11] = 27  # claims 27x28 images
    path.write_bytes(bytes(data))
    with pytest.raises(common.UserError, match="train-images-idx3-ubyte .*delete it and download"):
        common.load_mnist(root)


def test_labels_that_do_not_match_images_count_as_corrupt(tmp_path):
    root = make_mnist(tmp_path, 50, 20)
    src = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    other = make_mnist(tmp_path / "other", 40, 30) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    src.write_bytes(other.read_bytes())
    with pytest.raises(common.UserError, match="t10k-labels-idx1-ubyte"):
        common.load_mnist(root)


def test_train_epoch_and_evaluate_return_their_numbers():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    labels = torch.arange(64) % 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = common.train_epoch(model, opt, None, images, labels, 16, torch.Generator().manual_seed(0),
                               (0.5, 0.25), max_rotation=5.0)
    assert set(stats) == {"loss", "acc", "lr"} and 0 <= stats["acc"] <= 100 and stats["lr"] == 0.1
    loss, acc = common.evaluate(model, images, labels, (0.5, 0.25))
    assert math.isfinite(loss) and 0 <= acc <= 100


def test_train_epoch_stops_at_the_first_bad_loss():
    images = torch.rand(64, 1, 28, 28)
    labels = torch.arange(64) % 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(1))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(common.Diverged) as e:
        common.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), None, images, labels,
                           16, torch.Generator().manual_seed(0), (0.5, 0.25))
    assert e.value.batch == 1


def test_confusion_matrix_counts_true_by_predicted():
    m = common.confusion_matrix(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 2, 3]))
    assert m[2, 1] == 1 and m.trace() == 3 and m.sum() == 4
    assert common.most_confused(m) == [(2, 1, 1)]


def test_write_atomic_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    common.write_atomic(path, "old")
    with pytest.raises(TypeError):
        common.write_atomic(path, 12345)  # not bytes: fails mid-write
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_ablation_variants_revert_one_change_each():
    import step3
    import step4
    variants = common.ablation_variants(step4.RECIPE, step3.RECIPE, step4.CHANGES)
    assert variants[0][2] == step4.RECIPE and len(variants) == len(step4.CHANGES) + 1
    for (name, _, recipe), (change, fields) in zip(variants[1:], step4.CHANGES.items()):
        assert name == change
        for field in common.dataclasses.fields(recipe):
            expected = step3.RECIPE if field.name in fields else step4.RECIPE
            assert getattr(recipe, field.name) == getattr(expected, field.name), (name, field.name)


def test_shift_moves_the_image_by_whole_pixels():
    img = torch.zeros(1, 1, 28, 28)
    img[:, :, 10:14, 8:12] = 1.0
    moved = common.rotate(img, torch.zeros(1), torch.tensor([[2.0, -3.0]]))
    # a positive dx samples from the right, so the content moves left (and dy < 0: down)
    assert torch.allclose(moved, torch.roll(img, shifts=(3, -2), dims=(2, 3)), atol=1e-5)


def test_augmentation_is_drawn_batch_by_batch_in_a_fixed_order():
    angles, shifts = common.draw_augmentation(10, 4, 7.0, 2.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected_angles, expected_shifts = [], []
    for size in (4, 4, 2):  # per batch: shifts first, then angles
        expected_shifts.append(common.uniform_symmetric(2 * size, 2.0, g).view(size, 2))
        expected_angles.append(common.uniform_symmetric(size, 7.0, g))
    assert torch.equal(angles, torch.cat(expected_angles)) and torch.equal(shifts, torch.cat(expected_shifts))
    angles, shifts = common.draw_augmentation(10, 4, 7.0, 0.0, torch.Generator().manual_seed(5))
    assert shifts is None and torch.equal(angles, common.uniform_symmetric(10, 7.0, torch.Generator().manual_seed(5)))


def test_auto_precision_is_bf16_on_cpu_and_fp32_on_cuda():
    assert common.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert common.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert common.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_divergence_names_the_first_bad_batch():
    losses = torch.tensor([0.5, 0.4, float("nan"), float("inf")])
    with pytest.raises(common.Diverged) as e:
        common._check_finite(losses)
    assert e.value.batch == 3 and math.isnan(e.value.loss)
    common._check_finite(losses[:2])  # finite: no error
