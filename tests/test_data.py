"""Tests for data.py: the shapes data set and its colour judge, held-out captions, image folders, CIFAR-10, caption
folders, the data loader, the data set on the device, grey images, inpainting masks, and a run's held-out split."""
import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data
from utils import UsageError, to_uint8


# ----------------------------------------------------------------------------- shapes

def test_shapes_deterministic_and_seeded():
    a, b = data.ShapesDataset(32, size=20, seed=0), data.ShapesDataset(32, size=20, seed=0)
    other = data.ShapesDataset(32, size=20, seed=1)
    assert torch.equal(a[7][0], b[7][0])
    assert not torch.equal(a[7][0], other[7][0])
    assert not torch.equal(a[7][0], a[17][0])


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_shape_range_and_background(size):
    dataset = data.ShapesDataset(size, size=10)
    for i in range(10):
        image, label = dataset[i]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert image[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
        assert label == i
        assert (image > -0.5).any()


def test_shapes_balance_and_captions():
    dataset = data.ShapesDataset(16, size=50)
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert np.bincount(labels).tolist() == [5] * 10
    assert dataset.classes == list(data.SHAPE_NAMES) and dataset.classes[0] == "circle"
    assert dataset.color_names == list(data.COLOR_NAMES) and len(set(data.SHAPE_COLORS)) == 10
    for i in (0, 17, 49):
        color, shape = dataset.attributes(i)
        assert shape == dataset[i][1] == i % 10
        assert dataset.caption(i) == f"a {data.COLOR_NAMES[color]} {data.SHAPE_NAMES[shape]}"
        assert data.parse_shape_caption(dataset.caption(i)) == (color, shape)
    assert data.parse_shape_caption("A  Gray Stripe") == (9, 9)
    assert data.parse_shape_caption("a photo of a cat") is None and data.parse_shape_caption("a red cat") is None
    assert len(set(data.all_shape_captions())) == 100
    with pytest.raises(IndexError):
        dataset[50]
    with pytest.raises(IndexError):
        dataset.attributes(-1)


def test_shapes_colour_is_independent_of_the_shape():
    """Every colour with every shape, at about the same rate: the colour tells nothing of the class."""
    dataset = data.ShapesDataset(16, size=5000, seed=0)
    counts = np.zeros((10, 10), dtype=int)  # (colour, shape)
    for i in range(len(dataset)):
        counts[dataset.attributes(i)] += 1
    assert counts.min() >= 25 and counts.max() <= 80  # expected 50 each
    # chi-square test of independence, 81 degrees of freedom: p = 0.001 at 124
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    assert ((counts - expected) ** 2 / expected).sum() < 124


def test_the_image_has_the_captions_colour():
    dataset = data.ShapesDataset(16, size=30, seed=2)
    palette = torch.tensor(data.SHAPE_COLORS, dtype=torch.float32) / 255
    for i in range(len(dataset)):
        image = (dataset[i][0] + 1) / 2  # (3, S, S) in [0, 1]
        brightest = image.flatten(1)[:, image.amax(0).flatten().argmax()]  # a pixel inside the shape
        color, _ = dataset.attributes(i)
        assert torch.cdist(brightest[None], palette).argmin().item() == color


@pytest.mark.parametrize("size", [16, 32])
def test_colour_judge_reads_real_images_and_is_chance_on_shuffled_colours(size):
    dataset = data.ShapesDataset(size, size=500, seed=5)
    images = torch.stack([dataset[i][0] for i in range(500)])
    colors = torch.tensor([dataset.attributes(i)[0] for i in range(500)])
    assert (data.classify_colors(images) == colors).float().mean() >= 0.98
    assert (data.classify_colors(to_uint8(images)) == colors).float().mean() >= 0.98
    shuffled = colors[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    assert (data.classify_colors(images) == shuffled).float().mean() < 0.2  # chance is 0.1


def test_colour_judge_of_a_black_image_is_minus_one():
    black = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    predicted = data.classify_colors(black)
    assert predicted.dtype == torch.long and predicted.tolist() == [-1, -1]
    assert data.classify_colors(-torch.ones(1, 3, 8, 8)).tolist() == [-1]


def test_without_captions_drops_every_held_out_caption_and_refuses_an_unknown_one():
    dataset = data.get_caption_dataset("shapes", "", 16, size=1000)
    holdout = ["a red triangle", "A  Blue Plus"]
    kept = data.without_captions(dataset, holdout)
    captions = [dataset.caption(i) for i in range(len(dataset))]
    removed = sum(c in ("a red triangle", "a blue plus") for c in captions)
    assert removed > 0 and len(kept) == len(dataset) - removed
    assert not {kept.caption(i) for i in range(len(kept))} & {"a red triangle", "a blue plus"}
    image, caption = kept[0]
    assert image.shape == (3, 16, 16) and caption == kept.caption(0)
    assert data.without_captions(dataset, []) is dataset
    with pytest.raises(UsageError, match="holdout prompt 'a red cirle' is no caption of the data set"):
        data.without_captions(dataset, ["a red cirle"])


# ----------------------------------------------------------------------------- file data sets

def _write_image_folder(root):
    """Two classes with RGB, L, P and RGBA PNGs, a text file and a corrupt PNG."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for name in ("zebra_fish", "apple"):
        folder = root / name
        folder.mkdir(parents=True)
        Image.fromarray(rgb).save(folder / "rgb.png")
        Image.fromarray(rgb).convert("L").save(folder / "grey.png")
        Image.fromarray(rgb).convert("P").save(folder / "palette.png")
        Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "zebra_fish" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def test_imagefolder_reads_all_modes_and_warns_once(tmp_path):
    _write_image_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.get_dataset("imagefolder", str(tmp_path), 16)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 " in messages[0]
    assert dataset.classes == ["apple", "zebra_fish"]
    assert len(dataset) == 8
    labels = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        labels.append(label)
    assert sorted(labels) == [0] * 4 + [1] * 4
    assert dataset.caption(len(dataset) - 1) == "a photo of a zebra fish"
    with pytest.warns(UserWarning, match="skipped 2"):
        subset = data.get_dataset("imagefolder", str(tmp_path), 16, size=3, seed=1)
    assert len(subset) == 3
    for i in range(3):
        assert subset.caption(i) == "a photo of a " + subset.classes[subset[i][1]].replace("_", " ")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        data.get_dataset("imagefolder", str(tmp_path / "nowhere"), 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty"):
        data.get_dataset("imagefolder", str(empty), 16)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(UsageError, match="one subfolder per class"):
        data.get_dataset("imagefolder", str(loose), 16)
    junk = tmp_path / "junk" / "cat"
    junk.mkdir(parents=True)
    (junk / "readme.txt").write_text("x")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(UsageError, match="no readable images"):
        data.get_dataset("imagefolder", str(tmp_path / "junk"), 16)


def test_get_dataset_rejects_bad_name_and_size():
    with pytest.raises(UsageError, match="image_size 30 is not divisible by 8"):
        data.get_dataset("shapes", "", 30)
    with pytest.raises(UsageError, match="cifar10, imagefolder or shapes"):
        data.get_dataset("mnist", "", 32)
    dataset = data.get_dataset("shapes", "", 16, size=30, seed=2)
    assert len(dataset) == 30 and dataset[0][0].shape == (3, 16, 16)


def test_cifar10_offline_is_a_usage_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UsageError) as info:
        data.get_dataset("cifar10", str(tmp_path), 32)
    message = str(info.value)
    assert "--dataset shapes" in message and "Name or service not known" in message
    assert "\n" not in message


def test_make_dataloader_seeded_and_too_small():
    dataset = torch.utils.data.TensorDataset(torch.arange(20))  # each item is its index

    def order(seed):
        return [index for (batch,) in data.make_dataloader(dataset, 4, seed=seed) for index in batch.tolist()]

    first, again, other = order(1), order(1), order(2)
    assert first == again and sorted(first) == list(range(20))  # 5 batches of 4: every item once
    assert first != list(range(20)) and other != first  # shuffled, by the seed
    with pytest.raises(UsageError, match="batch_size 32"):
        data.make_dataloader(dataset, 32)


# ----------------------------------------------------------------------------- caption folders

def write_image(path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


def test_caption_folder_reads_metadata_and_txt_and_names_errors(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    write_image(folder / "a.png")
    write_image(folder / "b.png")
    lines = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "a red dot"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = data.get_caption_dataset("captions", str(folder), 16)
    image, caption = dataset[1]
    assert image.shape == (3, 16, 16) and caption == "a red dot" and dataset.caption(0) == "a red square"
    (folder / "metadata.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(UsageError, match="line 2"):
        data.get_caption_dataset("captions", str(folder), 16)

    folder = tmp_path / "txt"
    folder.mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        data.get_caption_dataset("captions", str(folder), 16)
    write_image(folder / "cat.jpg")
    (folder / "cat.txt").write_text("a  photo of\na cat\n")
    assert data.get_caption_dataset("captions", str(folder), 16).caption(0) == "a photo of a cat"
    write_image(folder / "dog.png")
    with pytest.raises(UsageError, match="'dog.png' .* no caption file dog.txt"):
        data.get_caption_dataset("captions", str(folder), 16)


def _halves_image(width=32, height=32):
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def _fake_sklearn_digits(monkeypatch, images, target):
    """Stands in for scikit-learn, which CI does not install, with a load_digits of these arrays."""
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: types.SimpleNamespace(images=images, target=target)
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)


def test_digits_folder_holds_one_subfolder_per_digit_and_the_pixels_scaled_to_255(tmp_path, monkeypatch):
    images = np.zeros((3, 8, 8))
    images[0, 2, 3], images[1, 4, 4], images[2, 7, 0] = 16, 8, 4  # scikit-learn's digits are 0..16
    _fake_sklearn_digits(monkeypatch, images, np.array([7, 0, 7]))
    assert data.write_digits_folder(str(tmp_path / "digits")) == 3
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["0", "7"]
    first = np.asarray(Image.open(tmp_path / "digits" / "7" / "0000.png"))
    assert first.shape == (8, 8) and first[2, 3] == 255 and first.sum() == 255
    assert np.asarray(Image.open(tmp_path / "digits" / "0" / "0001.png"))[4, 4] == 128
    folder = data.get_dataset("imagefolder", str(tmp_path / "digits"), 16)
    assert folder.classes == ["0", "7"] and [label for _, label in folder] == [0, 1, 1]  # sorted by folder


def test_digits_folder_refuses_a_full_folder_and_names_the_missing_package(tmp_path, monkeypatch):
    _fake_sklearn_digits(monkeypatch, np.zeros((1, 8, 8)), np.array([3]))
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not empty"):
        data.write_digits_folder(str(tmp_path))
    assert (tmp_path / "old.txt").read_text() == "keep me"
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(UsageError, match="pip install scikit-learn"):
        data.write_digits_folder(str(tmp_path / "new"))


def test_augmentation_resize_is_the_centre_crop_of_the_resized_image():
    out = data.augmentation(16, "resize")(_halves_image())
    expected = torch.full((3, 16, 16), -1.0)
    expected[0, :, :8] = 1.0  # red left half
    expected[2, :, 8:] = 1.0  # blue right half
    sharp = [*range(7), *range(9, 16)]  # the antialiased resize blends columns 7 and 8 at the edge
    torch.testing.assert_close(out[..., sharp], expected[..., sharp], atol=2 / 255, rtol=0)
    tall = data.augmentation(16, "resize")(_halves_image(32, 64))  # 32 x 64 -> 16 x 32 -> its middle 16 x 16
    torch.testing.assert_close(tall, out)


def test_augmentation_flip_mirrors_some_draws_and_reference_crops_at_random():
    torch.manual_seed(0)
    plain = data.augmentation(16, "resize")(_halves_image())
    flips = [data.augmentation(16, "flip")(_halves_image()) for _ in range(20)]
    assert all(torch.equal(f, plain) or torch.equal(f, plain.flip(-1)) for f in flips)
    assert any(torch.equal(f, plain) for f in flips) and any(torch.equal(f, plain.flip(-1)) for f in flips)
    crops = [data.augmentation(16, "reference")(_halves_image()) for _ in range(5)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert any(not torch.equal(c, crops[0]) for c in crops[1:])  # the reference's crop is random


def test_augmentation_defaults_flip_cifar_only_and_refuses_unknown_modes(tmp_path):
    _write_image_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = data.get_dataset("imagefolder", str(tmp_path), 16)
    names = [type(t).__name__ for t in folder.base.transform.transforms]
    assert "RandomHorizontalFlip" not in names and "CenterCrop" in names  # digits and text are never flipped
    with pytest.raises(UsageError, match="augment 'zoom' is unknown"):
        data.augmentation(16, "zoom")


# ----------------------------------------------------------------------------- the data set on the device

def _noise_folder(root, per_class=10, size=20):
    """Two classes of random RGB PNGs: 8-bit files, as CIFAR-10 and image folders hold."""
    rng = np.random.default_rng(1)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return data.get_dataset("imagefolder", str(root), 16)


def _batches(dataset, held, processes, rank, skip=0, epochs=2):
    """Every batch of `epochs` epochs of one process, through Accelerate's seeded sharded loader as training
    prepares it: the data set's own DataLoader, or (held given) the DataLoader of indices and DeviceData.fetch."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    loader = data.make_dataloader(dataset if held is None else held, 4, seed=3)
    loader = prepare_data_loader(loader, num_processes=processes, process_index=rank, use_seedable_sampler=True,
                                 data_seed=3, put_on_device=False)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in skip_first_batches(loader, skip) if epoch == 0 and skip else loader:
            out.append(list(batch) if held is None else held.fetch(batch, seed=0))
    return out


@pytest.mark.parametrize("kind", ["shapes", "imagefolder"])
def test_device_data_yields_the_dataloaders_batches_for_each_process_epoch_and_resume(tmp_path, kind):
    """Same seeded order, same shard per process (2 processes), same batches after a resume's skip."""
    dataset = data.ShapesDataset(16, size=24) if kind == "shapes" else _noise_folder(tmp_path)
    held = data.DeviceData.load(dataset, "cpu")
    for processes, rank, skip in [(1, 0, 0), (2, 0, 0), (2, 1, 0), (2, 1, 1)]:
        expected, got = _batches(dataset, None, processes, rank, skip), _batches(dataset, held, processes, rank, skip)
        assert len(got) == len(expected) > 2
        for (images, labels), (held_images, held_labels) in zip(expected, got):
            assert torch.equal(images, held_images) and torch.equal(labels, held_labels)
    first, second = (_batches(dataset, held, 2, rank) for rank in (0, 1))
    assert not torch.equal(first[0][0], second[0][0])  # each process its own shard


def test_eight_bit_images_are_held_as_uint8_and_decode_to_the_same_floats(tmp_path):
    folder = _noise_folder(tmp_path)
    held = data.DeviceData.load(folder, "cpu")
    assert held.fields[0].dtype == torch.uint8 and held.fields[1].dtype == torch.int64
    assert torch.equal(held.fetch(torch.tensor([3]), seed=0)[0][0], folder[3][0])
    shapes = data.DeviceData.load(data.ShapesDataset(16, size=4), "cpu")  # anti-aliased floats: kept as they are
    assert shapes.fields[0].dtype == torch.float32
    captions = data.DeviceData.load(data.Captioned(data.ShapesDataset(16, size=4)), "cpu")
    assert captions.fetch(torch.tensor([2, 0]), seed=0)[1] == [captions.fields[1][2], captions.fields[1][0]]


def test_flips_are_drawn_on_the_device_from_the_batch_seed(tmp_path):
    _noise_folder(tmp_path)
    flipping = data.get_dataset("imagefolder", str(tmp_path), 16, augment="flip")
    held, note = data.data_on_device(flipping, "cpu")
    assert held.flips and "flips drawn there" in note
    plain, indices = data.get_dataset("imagefolder", str(tmp_path), 16), torch.arange(20)
    images = held.fetch(indices, seed=5)[0]
    mirrored = [torch.equal(image, plain[i][0].flip(-1)) for i, image in enumerate(images)]
    assert all(m or torch.equal(image, plain[i][0]) for i, (m, image) in enumerate(zip(mirrored, images)))
    assert 0 < sum(mirrored) < 20
    assert torch.equal(held.fetch(indices, seed=5)[0], images)  # the same seed (a resumed run): the same flips
    assert not torch.equal(held.fetch(indices, seed=6)[0], images)


def test_data_on_device_holds_what_fits_and_says_why_not(tmp_path, monkeypatch):
    folder = _noise_folder(tmp_path)
    held, note = data.data_on_device(folder, "cpu")
    assert held is not None and note.startswith("data: 20 items held on cpu") and "uint8, int64" in note
    assert data.data_on_device(folder, "cpu", wanted=False) == (None, "data: a DataLoader with 0 worker processes "
                                                                      "(--data_on_device false)")
    reference = data.get_dataset("imagefolder", str(tmp_path), 16, augment="reference")
    held, note = data.data_on_device(reference, "cpu")
    assert held is None and "--augment reference" in note
    with pytest.raises(UsageError, match="random crops on the device: use --augment flip or resize"):
        data.data_on_device(reference, "cpu", wanted=True)
    monkeypatch.setattr(data, "free_memory", lambda device: 4 * 20 * 3 * 16 * 16 - 4)  # a quarter is too small
    held, note = data.data_on_device(folder, "cpu")
    assert held is None and "more than a quarter of the free memory on cpu" in note
    assert data.data_on_device(folder, "cpu", wanted=True)[0] is not None


def test_holdout_split_is_disjoint_seeded_and_keeps_every_item():
    dataset = data.ShapesDataset(8, size=50)
    rest, held = data.holdout_split(dataset, 10, seed=3)
    assert len(held) == 10 and len(rest) == 40
    assert sorted(held.indices + rest.indices) == list(range(50))
    assert data.holdout_split(dataset, 10, seed=3)[1].indices == held.indices
    assert data.holdout_split(dataset, 10, seed=4)[1].indices != held.indices
    assert torch.equal(held[0][0], dataset[held.indices[0]][0]) and held.caption(0) == dataset.caption(held.indices[0])


# ----------------------------------------------------------------------------- grey images (--channels 1)

def _grey_folder(root, size=16, per_class=4, mode="L"):
    """Two classes of grey images whose pixel values are known: image i of class k is filled with 20 k + 7 i."""
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size, size), 20 * k + 7 * i, dtype=np.uint8)
            image = Image.fromarray(pixels, mode="L")
            (image.convert("I;16") if mode == "I;16" else image).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_dataset_channels_is_1_only_for_a_folder_of_grey_files(tmp_path, mode):
    folder = _grey_folder(tmp_path / "grey", mode=mode)
    assert data.dataset_channels("imagefolder", str(folder)) == 1
    assert data.dataset_channels("captions", str(folder)) == 1
    Image.new("RGB", (16, 16), (10, 10, 10)).save(folder / "a" / "rgb.png")  # one colour file: not clearly grey
    assert data.dataset_channels("imagefolder", str(folder)) == 3
    assert data.dataset_channels("shapes", None) == data.dataset_channels("cifar10", str(folder)) == 3
    assert data.dataset_channels("imagefolder", str(tmp_path / "nowhere")) == 3  # get_dataset names that error


def test_grey_images_keep_their_pixels_on_both_data_paths(tmp_path):
    dataset = data.get_dataset("imagefolder", str(_grey_folder(tmp_path)), 16, channels=1)
    for index in range(len(dataset)):
        image, label = dataset[index]
        value = 20 * label + 7 * int(dataset.base.samples[dataset.indices[index]][0][-5])
        assert image.shape == (1, 16, 16) and torch.equal(image, torch.full_like(image, value / 127.5 - 1))
    held, _ = data.data_on_device(dataset, "cpu", wanted=True)
    assert held.fields[0].dtype == torch.uint8 and held.fields[0].shape == (8, 1, 16, 16)
    batch = held.fetch(torch.arange(8), seed=0)
    assert torch.equal(batch[0], torch.stack([dataset[i][0] for i in range(8)]))
    rgb = data.get_dataset("imagefolder", str(tmp_path), 16, channels=3)[0][0]
    assert rgb.shape == (3, 16, 16) and torch.equal(rgb[:1], dataset[0][0])
    with pytest.raises(UsageError, match="channels 2 is not supported: use 1"):
        data.get_dataset("imagefolder", str(tmp_path), 16, channels=2)


def test_grey_shapes_are_the_luma_of_the_colour_ones():
    rgb, grey = data.ShapesDataset(16, size=10), data.ShapesDataset(16, size=10, channels=1)
    for index in range(10):
        colour = (rgb[index][0] + 1) / 2
        expected = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        assert grey[index][1] == rgb[index][1]
        torch.testing.assert_close((grey[index][0][0] + 1) / 2, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- inpainting masks, held-out split

@pytest.mark.parametrize("spec", data.MASKS)
def test_every_mask_kind_is_binary_marks_a_hole_and_leaves_pixels_known(spec):
    holes = data.Masks(spec, 16).draw(64, torch.Generator().manual_seed(0))
    assert holes.shape == (64, 1, 16, 16) and holes.dtype == torch.float32
    assert set(torch.unique(holes).tolist()) <= {0.0, 1.0}
    covered = holes.flatten(1).mean(dim=1)  # (64,)
    assert (covered > 0).all() and (covered < 1).all()
    if spec in ("boxes", "strokes", "halves"):
        assert len({tuple(h.flatten().tolist()) for h in holes}) > 2  # drawn per image, not one mask for all


def test_lower_and_halves_masks_are_the_halves_of_the_image():
    lower = data.Masks("lower", 8).draw(3)
    assert (lower[:, :, 4:] == 1).all() and (lower[:, :, :4] == 0).all()
    halves = data.Masks("halves", 8).draw(200, torch.Generator().manual_seed(0))
    kinds = {(h[0, 0, 0].item(), h[0, 7, 0].item(), h[0, 0, 7].item()) for h in halves}
    assert kinds == {(1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 0, 1)}  # top, bottom, left, right


def test_a_mask_folder_is_read_resized_and_drawn_from(tmp_path):
    pixels = np.zeros((32, 32), dtype=np.uint8)
    pixels[:, :8] = 255
    Image.fromarray(pixels).save(tmp_path / "left.png")
    holes = data.Masks(str(tmp_path), 16).draw(5)
    assert holes.shape == (5, 1, 16, 16)
    assert (holes[:, :, :, :4] == 1).all() and (holes[:, :, :, 4:] == 0).all()


@pytest.mark.parametrize("fill, message", [
    ("grey", r"mask '.*' is not binary: it has 3 grey levels; save it with only black"),
    ("empty", r"mask '.*' is empty: no pixel is white, so there is nothing to fill"),
    ("full", r"mask '.*' covers every pixel: nothing of the image is known"),
])
def test_a_bad_mask_file_is_one_line_naming_the_fix(tmp_path, fill, message):
    pixels = {"grey": np.array([[0, 128], [255, 0]]), "empty": np.zeros((2, 2)), "full": np.full((2, 2), 255)}[fill]
    path = tmp_path / "mask.png"
    Image.fromarray(pixels.astype(np.uint8).repeat(4, 0).repeat(4, 1)).save(path)
    with pytest.raises(UsageError, match=message):
        data.read_mask(str(path), 8)
    with pytest.raises(UsageError, match=message):
        data.Masks(str(tmp_path), 8)
    with pytest.raises(UsageError, match="masks 'blobs' is neither one of boxes, halves, lower, strokes nor a folder"):
        data.Masks("blobs", 8)


def test_run_datasets_hold_out_the_same_images_every_time_and_never_train_on_them():
    train, held, classes = data.run_datasets("shapes", None, 16, seed=3, size=50, holdout=10)
    again = data.run_datasets("shapes", None, 16, seed=3, size=50, holdout=10)[1]
    assert (len(train), len(held), classes) == (40, 10, list(data.SHAPE_NAMES))
    assert held.indices == again.indices and not set(held.indices) & set(train.indices)
    assert data.run_datasets("shapes", None, 16, size=50)[1] is None
    with pytest.raises(UsageError, match="holdout 50 leaves none of the 50 images to train on"):
        data.run_datasets("shapes", None, 16, size=50, holdout=50)


def test_a_runs_held_out_images_are_rebuilt_from_its_saved_config_as_it_split_them():
    saved = {"dataset": "shapes", "image_size": 16, "seed": 3, "dataset_size": 50, "holdout": 10}
    train, held, _ = data.run_datasets("shapes", None, 16, seed=3, size=50, holdout=10)
    rebuilt_train, rebuilt_held = data.saved_run_split(saved, 3)
    assert rebuilt_held.indices == held.indices and rebuilt_train.indices == train.indices
    images, labels = data.heldout_images(saved, 4, 3)
    assert images.shape == (4, 3, 16, 16) and torch.equal(images, torch.stack([held[i][0] for i in range(4)]))
    assert labels.dtype == torch.long and labels.tolist() == [held[i][1] for i in range(4)]
    assert len(data.heldout_images(saved, 100, 3)[0]) == 10  # no more than the run held out
    grey_held = data.run_datasets("shapes", None, 16, seed=3, size=50, channels=1, holdout=10)[1]
    assert torch.equal(data.heldout_images(saved, 2, 1)[0], torch.stack([grey_held[i][0] for i in range(2)]))
    for no_holdout in ({**saved, "holdout": 0}, {k: v for k, v in saved.items() if k != "holdout"}):
        with pytest.raises(UsageError, match=r"this run held no images out of training \(holdout 0\), so there is "
                                             r"nothing unseen to measure on: train it with --holdout 300"):
            data.heldout_images(no_holdout, 4, 3)


def test_held_out_images_are_read_without_the_runs_random_augmentation(tmp_path):
    """A run trained with --augment flip is measured on its held-out images as they are, the same every time."""
    _noise_folder(tmp_path)
    saved = {"dataset": "imagefolder", "dataset_path": str(tmp_path), "image_size": 16, "seed": 1, "holdout": 6,
             "augment": "flip"}
    torch.manual_seed(0)
    first = data.heldout_images(saved, 6, 3)[0]
    second = data.heldout_images(saved, 6, 3)[0]
    plain = data.run_datasets("imagefolder", str(tmp_path), 16, seed=1, augment="resize", holdout=6)[1]
    assert torch.equal(first, second) and torch.equal(first, torch.stack([plain[i][0] for i in range(6)]))
