import math

import pytest
import torch
import torch.nn as nn

import common
import runner
import report
from conftest import make_mnist


def test_receptive_field_of_a_known_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1))
    table = common.layer_table(model)
    assert [r["rf"] for r in table] == [3, 5, 6, 10, 10 + (10 - 1) * 2]
    assert [r["output"] for r in table] == [[4, 26, 26], [4, 24, 24], [4, 12, 12], [4, 10, 10], [4, 1, 1]]
    assert sum(r["params"] for r in table) == common.count_params(model)


def test_rotate_by_zero_is_identity_and_by_90_turns_the_image():
    img = torch.zeros(2, 1, 28, 28)
    img[:, :, 2:6, 10:18] = 1.0
    same = common.affine(img, torch.zeros(2), torch.zeros(2, 2))
    assert torch.allclose(same, img, atol=1e-5)
    turned = common.affine(img, torch.tensor([90.0, -90.0]), torch.zeros(2, 2))
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


def linear_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(1))


def test_train_epoch_and_evaluate_return_exact_counts():
    torch.manual_seed(0)
    images, labels = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recipe = common.Recipe(batch_size=16, max_rotation=5.0)
    batches = common.batches(images, labels, (0.5, 0.25), recipe, torch.Generator().manual_seed(0))
    stats = common.train_epoch(model, opt, None, batches, "fp32")
    assert set(stats) == {"loss", "correct", "total", "lr"} and stats["lr"] == 0.1
    assert isinstance(stats["correct"], int) and stats["total"] == 64 and 0 <= stats["correct"] <= 64
    loss, correct = common.evaluate(model, images, labels, (0.5, 0.25))
    assert math.isfinite(loss) and isinstance(correct, int) and 0 <= correct <= 64


def test_batches_cover_every_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.float).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()
    labels = torch.arange(10)
    seen = [(x[:, 0, 0, 0], y) for x, y in common.batches(images, labels, (0.0, 1.0), common.Recipe(batch_size=4),
                                                        torch.Generator().manual_seed(0))]
    assert [len(y) for _, y in seen] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in seen]).tolist()) == list(range(10))
    assert all(torch.equal(x, y.float()) for x, y in seen)  # unaugmented: each image with its own label


def test_train_epoch_stops_at_the_first_bad_loss():
    images, labels = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    model = linear_model()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    batches = common.batches(images, labels, (0.5, 0.25), common.Recipe(batch_size=16), torch.Generator())
    with pytest.raises(common.Diverged) as e:
        common.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), None, batches, "fp32")
    assert e.value.batch == 1


def test_train_yields_each_epoch_with_exact_counts():
    data = common.Data(torch.rand(32, 1, 28, 28), torch.arange(32) % 10, torch.rand(8, 1, 28, 28),
                       torch.arange(8) % 10, (0.5, 0.25), {})
    recipe = common.Recipe(epochs=2, batch_size=8, lr=0.1)
    entries = [entry for _, entry in common.train(linear_model, recipe, data, seed=0)]
    assert [e["epoch"] for e in entries] == [1, 2]
    assert all(e["test_total"] == 8 and e["train_total"] == 32 and isinstance(e["test_correct"], int) for e in entries)


def test_weight_average_moves_weights_and_batchnorm_statistics_towards_the_model():
    model = nn.BatchNorm1d(3)
    average = common.WeightAverage(model, decay=0.9)  # a copy: weight 1, running mean 0
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
    model.num_batches_tracked.fill_(7)
    average.steps = 999
    average.update()  # step 1000, past the ramp: weight 0.1
    averaged = average.model
    assert torch.allclose(averaged.weight, torch.full((3,), 1.1))           # 0.9 * 1 + 0.1 * 2
    assert torch.allclose(averaged.running_mean, torch.full((3,), 0.4))     # 0.9 * 0 + 0.1 * 4
    assert int(averaged.num_batches_tracked) == 7
    average.steps = 0
    average.update()  # step 1, the ramp: decay (1 + 1) / (10 + 1)
    assert torch.allclose(averaged.weight, torch.full((3,), 1.1 + (2 - 1.1) * 9 / 11))


def test_weight_averaging_changes_what_is_tested_not_how_the_model_trains():
    data = common.Data(torch.rand(32, 1, 28, 28), torch.arange(32) % 10, torch.rand(8, 1, 28, 28),
                       torch.arange(8) % 10, (0.5, 0.25), {})
    plain = common.Recipe(epochs=2, batch_size=8, lr=0.1)
    runs = [list(common.train(linear_model, r, data, seed=0))
            for r in (plain, common.dataclasses.replace(plain, ema_decay=0.99))]
    (model, plain_entry), (averaged, averaged_entry) = runs[0][-1], runs[1][-1]
    assert plain_entry["train_loss"] == averaged_entry["train_loss"]
    assert not torch.equal(model[1].weight, averaged[1].weight)
    loss, correct = common.evaluate(averaged, data.test_images, data.test_labels, data.norm)
    assert averaged_entry["test_loss"] == round(loss, 6) != plain_entry["test_loss"]
    assert averaged_entry["test_correct"] == correct


def test_a_record_from_before_a_recipe_field_existed_reads_as_its_default():
    fields = common.dataclasses.asdict(common.Recipe(lr=0.1))
    del fields["ema_decay"]
    assert common.recorded_recipe(fields) == common.Recipe(lr=0.1)
    assert common.recorded_recipe({**fields, "no_such_field": 1}) is None
    assert common.recorded_recipe(None) is None


def test_confusion_matrix_counts_true_by_predicted():
    m = common.confusion_matrix(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 2, 3]))
    assert m[2, 1] == 1 and m.trace() == 3 and m.sum() == 4
    assert report.most_confused(m) == [(2, 1, 1)]


def test_write_file_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    report.write_file(path, "old")
    with pytest.raises(TypeError):
        report.write_file(path, 12345)  # not bytes: fails mid-write
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


def test_ablation_variants_revert_one_change_each():
    import step3
    import step4
    variants = runner.ablation_variants(step4.RECIPE, step4.CHANGES)
    assert variants[0][2] == step4.RECIPE and len(variants) == len(step4.CHANGES) + 1
    for (name, _, recipe), (change, fields) in zip(variants[1:], step4.CHANGES.items()):
        assert name == change
        for field in common.dataclasses.fields(recipe):
            expected = step3.RECIPE if field.name in fields else step4.RECIPE
            assert getattr(recipe, field.name) == getattr(expected, field.name), (name, field.name)


def test_shift_moves_the_image_by_whole_pixels():
    img = torch.zeros(1, 1, 28, 28)
    img[:, :, 10:14, 8:12] = 1.0
    moved = common.affine(img, torch.zeros(1), torch.tensor([[2.0, -3.0]]))
    # a positive dx samples from the right, so the content moves left (and dy < 0: down)
    assert torch.allclose(moved, torch.roll(img, shifts=(3, -2), dims=(2, 3)), atol=1e-5)


def test_augmentation_is_drawn_batch_by_batch_in_a_fixed_order():
    angles, shifts, scales, warps = common.draw_augmentation(10, 4, 7.0, 2.0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected_angles, expected_shifts = [], []
    for size in (4, 4, 2):  # per batch: shifts first, then angles
        expected_shifts.append(common.uniform_symmetric(2 * size, 2.0, g).view(size, 2))
        expected_angles.append(common.uniform_symmetric(size, 7.0, g))
    assert torch.equal(angles, torch.cat(expected_angles)) and torch.equal(shifts, torch.cat(expected_shifts))
    assert scales is None and warps is None  # no bound: nothing drawn, so older runs draw the same numbers
    angles, shifts, scales, warps = common.draw_augmentation(10, 4, 7.0, 0.0, torch.Generator().manual_seed(5))
    assert not shifts.any() and torch.equal(angles, common.uniform_symmetric(10, 7.0, torch.Generator().manual_seed(5)))


def test_scales_are_drawn_last_in_each_batch_and_stay_in_bounds():
    angles, shifts, scales, warps = common.draw_augmentation(10, 4, 7.0, 2.0, torch.Generator().manual_seed(5), 0.1)
    g = torch.Generator().manual_seed(5)
    expected = []
    for size in (4, 4, 2):  # per batch: shifts, angles, then scales
        common.uniform_symmetric(2 * size, 2.0, g), common.uniform_symmetric(size, 7.0, g)
        expected.append(1 + common.uniform_symmetric(size, 0.1, g))
    assert torch.equal(scales, torch.cat(expected)) and ((scales >= 0.9) & (scales <= 1.1)).all()


def test_warps_are_drawn_after_scales_in_each_batch_and_stay_in_bounds():
    *_, warps = common.draw_augmentation(10, 4, 7.0, 2.0, torch.Generator().manual_seed(5), 0.1, 1.5)
    g = torch.Generator().manual_seed(5)
    expected = []
    for size in (4, 4, 2):  # per batch: shifts, angles, scales, then warps
        common.uniform_symmetric(2 * size, 2.0, g), common.uniform_symmetric(size, 7.0, g)
        common.uniform_symmetric(size, 0.1, g)
        expected.append(common.uniform_symmetric(size * 2 * common.WARP_GRID ** 2, 1.5, g))
    assert warps.shape == (10, 2, common.WARP_GRID, common.WARP_GRID)
    assert torch.equal(warps.flatten(), torch.cat(expected)) and warps.abs().max() <= 1.5


def test_a_flat_warp_moves_the_image_as_a_shift_and_a_bent_one_keeps_it_whole():
    img = torch.zeros(1, 1, 28, 28)
    img[:, :, 10:14, 8:12] = 1.0
    flat = torch.zeros(1, 2, common.WARP_GRID, common.WARP_GRID)
    flat[:, 0], flat[:, 1] = 2.0, -3.0  # the same (dx, dy) at every lattice point
    warped = common.affine(img, torch.zeros(1), torch.zeros(1, 2), None, flat)
    assert torch.allclose(warped, common.affine(img, torch.zeros(1), torch.tensor([[2.0, -3.0]])), atol=1e-5)
    assert torch.equal(common.affine(img, torch.zeros(1), torch.zeros(1, 2), None, torch.zeros_like(flat)),
                       common.affine(img, torch.zeros(1), torch.zeros(1, 2)))
    bent = common.affine(img, torch.zeros(1), torch.zeros(1, 2), None,
                         common.uniform_symmetric(2 * common.WARP_GRID ** 2, 1.5, torch.Generator().manual_seed(1))
                         .view(1, 2, common.WARP_GRID, common.WARP_GRID))
    assert not torch.allclose(bent, img, atol=1e-3)  # moved, yet the square's ink is mostly still there
    assert bent.sum().item() == pytest.approx(img.sum().item(), rel=0.35)


def test_scale_draws_a_digit_larger_or_smaller_about_the_centre():
    img = torch.zeros(1, 1, 28, 28)
    img[:, :, 10:18, 10:18] = 1.0  # an 8x8 square at the centre
    same = common.affine(img, torch.zeros(1), torch.zeros(1, 2), torch.ones(1))
    assert torch.allclose(same, img, atol=1e-5)
    larger = common.affine(img, torch.zeros(1), torch.zeros(1, 2), torch.tensor([2.0]))
    smaller = common.affine(img, torch.zeros(1), torch.zeros(1, 2), torch.tensor([0.5]))
    assert larger.sum().item() == pytest.approx(4 * img.sum().item(), rel=0.05)
    assert smaller.sum().item() == pytest.approx(img.sum().item() / 4, rel=0.05)
    assert larger[0, 0, 14, 14] == 1.0 and smaller[0, 0, 14, 14] == 1.0


def test_auto_precision_is_fp32_everywhere():
    assert common.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert common.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert common.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_divergence_names_the_first_bad_batch():
    losses = [torch.tensor(v) for v in (0.5, 0.4, float("nan"), float("inf"))]
    with pytest.raises(common.Diverged) as e:
        common.check_finite(losses, 0)
    assert e.value.batch == 3 and math.isnan(e.value.loss)
    common.check_finite(losses[:2], 0)  # finite: no error
    with pytest.raises(common.Diverged) as e:
        common.check_finite(losses, 3)  # checks only from the 4th batch on
    assert e.value.batch == 4


def test_a_diverged_error_survives_the_trip_from_a_worker_process():
    import pickle
    e = pickle.loads(pickle.dumps(common.Diverged(7, float("nan"), 3)))
    assert (e.batch, e.epoch) == (7, 3) and "epoch 3, batch 7" in str(e)


@pytest.mark.parametrize("items", ["images", "labels"])
def test_a_file_with_a_valid_header_and_no_items_is_corrupt(tmp_path, items):
    root = make_mnist(tmp_path, 50, 20)
    name = f"t10k-{items}-idx{3 if items == 'images' else 1}-ubyte"
    path = root / "MNIST" / "raw" / name
    header = bytearray(path.read_bytes()[:16 if items == "images" else 8])
    header[4:8] = (0).to_bytes(4, "big")
    path.write_bytes(bytes(header))
    with pytest.raises(common.UserError, match=f"{name} holds 0 items: it is corrupt"):
        common.load_mnist(root)


def test_swapped_train_and_test_files_are_named(tmp_path):
    root = make_mnist(tmp_path, 50, 20)
    raw = root / "MNIST" / "raw"
    for kind in ("images-idx3", "labels-idx1"):
        train, test = raw / f"train-{kind}-ubyte", raw / f"t10k-{kind}-ubyte"
        a, b = train.read_bytes(), test.read_bytes()
        train.write_bytes(b), test.write_bytes(a)
    with pytest.raises(common.UserError, match="train-images-idx3-ubyte holds 20 images.*swapped"):
        common.load_mnist(root)


def test_a_failed_rename_puts_the_old_set_back(tmp_path, monkeypatch):
    old = {tmp_path / n: n.encode() for n in ("a.pt", "a.json", "a.log")}
    for path, data in old.items():
        path.write_bytes(data)
    staged = {path: report.write_hidden(path, b"new", "staged") for path in old}
    real_replace, calls = runner.os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # the second new file's rename fails
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(runner.os, "replace", replace)
    with pytest.raises(OSError):
        report.commit(staged)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in old} == old
    for tmp in staged.values():
        tmp.unlink(missing_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.log", "a.pt"]


def test_a_validation_split_replaces_the_test_set_with_the_last_training_images(tmp_path):
    root = make_mnist(tmp_path / "data", n_train=60, n_test=10)
    full = common.load_data(root, torch.device("cpu"))
    split = common.load_data(root, torch.device("cpu"), validation=20)
    assert torch.equal(split.train_images, full.train_images[:40])
    assert torch.equal(split.test_images, full.train_images[40:]) and torch.equal(split.test_labels, full.train_labels[40:])
    assert split.stats["shape"] == [40, 28, 28]


def test_clean_bn_measures_the_statistics_afresh_on_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU())
    images = torch.rand(600, 1, 8, 8)
    measured = common.with_clean_bn(model, images, (0.5, 0.25))
    features = model[0]((images - 0.5) / 0.25)
    # per chunk of EVAL_BATCH images, averaged with equal weight per chunk (update_bn's momentum None)
    chunk_means = [features[s:s + common.EVAL_BATCH].mean((0, 2, 3)) for s in range(0, 600, common.EVAL_BATCH)]
    assert torch.allclose(measured[1].running_mean, torch.stack(chunk_means).mean(0), atol=1e-5)
    assert not model[1].running_mean.any() and model[1].running_var.eq(1).all()  # the original is untouched


@pytest.mark.parametrize("field", ["max_rotation", "max_shift", "max_scale", "max_warp"])
def test_each_augmentation_bound_counts_and_without_augmentation_clears_it(field):
    recipe = common.Recipe(**{field: 0.1}, lr=0.2)
    assert recipe.augmented and not common.Recipe().augmented
    assert not recipe.without_augmentation().augmented
    assert recipe.without_augmentation() == common.Recipe(lr=0.2)


def test_blur_pool_halves_the_map_without_weights_and_keeps_a_flat_map_flat():
    pool = common.BlurPool(3)
    x = torch.rand(2, 3, 24, 24)
    assert pool(x).shape == nn.MaxPool2d(2)(x).shape == (2, 3, 12, 12)
    assert common.count_params(pool) == 0
    flat = torch.full((1, 3, 24, 24), 0.7)
    assert torch.allclose(pool(flat), torch.full((1, 3, 12, 12), 0.7))  # the blur's taps sum to 1


def test_blur_pool_moves_less_than_a_max_pool_when_the_input_moves_by_one_pixel():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 25, 25)
    here, moved = x[..., :24, :24], x[..., 1:, 1:]  # the same content, one pixel apart
    def change(pool):
        return (pool(here) - pool(moved)).abs().mean()
    assert change(common.BlurPool(1)) < change(nn.MaxPool2d(2))


def test_layer_table_counts_the_blur_pool_as_a_4x4_window_at_stride_2():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), common.BlurPool(2), nn.Conv2d(2, 2, 3))
    assert [row["rf"] for row in common.layer_table(model)] == [3, 6, 10]
