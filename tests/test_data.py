"""The data: the synthetic federation, X-ray folders and manifests, DICOM (the [dicom] extra)."""
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
from test_all import SHARED_XRAYS


def test_synthetic_is_deterministic_and_its_sites_differ():
    train_a, test_a = data.synthetic_sites(image_size=32, seed=3)
    train_b, test_b = data.synthetic_sites(image_size=32, seed=3)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(train_a, train_b))
    other, _ = data.synthetic_sites(image_size=32, seed=4)
    assert not torch.equal(other[0].images, train_a[0].images)
    sizes = [len(a) + len(t) for a, t in zip(train_a, test_a)]
    assert len(set(sizes)) == 3
    prevalence = [float(torch.cat([a.labels, t.labels]).mean()) for a, t in zip(train_a, test_a)]
    assert max(prevalence) - min(prevalence) > 0.1
    contrast = [float(a.images.std()) for a in train_a]
    assert max(contrast) - min(contrast) > 0.01
    for site in train_a + test_a:  # stratified: both labels on both sides
        assert 0 < site.labels.sum() < len(site)
        assert site.images.shape[1:] == (1, 32, 32) and 0 <= site.images.min() and site.images.max() <= 1
    # the bench's --data-seed draws it (--seeds does not): its default is seed 0
    args = lambda *flags: bench.parse_args(["--image-size", "32", *flags])[0]
    assert torch.equal(bench.load_sites(args())[0][0].images, data.synthetic_sites(image_size=32, seed=0)[0][0].images)
    assert torch.equal(bench.load_sites(args("--data-seed", "3"))[0][1].images, train_a[1].images)
    assert torch.equal(bench.load_sites(args("--seeds", "2"))[0][0].images, bench.load_sites(args())[0][0].images)


def save_png(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)


def gray(value, size=40):
    return np.full((size, size), value, np.uint8) + np.arange(size, dtype=np.uint8)[None]


def test_folder_layouts_shenzhen_names_and_class_folders(tmp_path):
    for i in range(8):
        save_png(tmp_path / "shenzhen" / f"CHNCXR_{i:04d}_{i % 2}.png", gray(10 * i))
    for i in range(4):
        save_png(tmp_path / "montgomery" / "Normal" / f"a{i}.png", gray(5 * i + 3))
        save_png(tmp_path / "montgomery" / "TB" / f"b{i}.png", gray(200 - 5 * i))
    train_sets, test_sets = data.folder_sites(tmp_path, image_size=32)
    assert [s.name for s in train_sets] == ["montgomery", "shenzhen"]
    for train, test in zip(train_sets, test_sets):
        assert len(train) + len(test) == 8 and len(test) == 2
        assert train.labels.sum() == 3 and test.labels.sum() == 1
        assert train.images.shape[1:] == (1, 32, 32)


def test_csv_manifest_with_sites(tmp_path):
    rows = []
    for i in range(16):
        save_png(tmp_path / "img" / f"{i}.png", gray(7 * i))
        rows.append(f"img/{i}.png,{'tb' if i % 2 else 'normal'},{'north' if i < 8 else 'south'}")
    (tmp_path / "manifest.csv").write_text("path,label,site\n" + "\n".join(rows) + "\n")
    train_sets, test_sets = data.folder_sites(tmp_path / "manifest.csv", image_size=32)
    assert [s.name for s in train_sets] == ["north", "south"]
    assert sum(len(s) for s in train_sets + test_sets) == 16


def test_16_bit_range_kept_and_rgba_becomes_gray(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))  # a 12-bit image in a 16-bit PNG
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = data.load_image(tmp_path / "ramp.png", 64)[0]
    assert image.min() == 0 and image.max() == 1  # stretched to its own full range, not divided by 65535
    assert len(torch.unique(image[0])) > 60  # not clipped to 8 bits or saturated
    assert torch.all(image[0, 1:] >= image[0, :-1])
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = gray(0), 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image = data.load_image(tmp_path / "rgba.png", 40)
    assert image.shape == (1, 40, 40) and image.max() == 1 and image.min() == 0
    assert torch.allclose(image[0, 0], torch.arange(40.0) / 39)  # red alone, stretched; alpha ignored


def test_bad_folders_are_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.folder_sites(tmp_path / "missing")
    (tmp_path / "empty" / "site").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        data.folder_sites(tmp_path / "empty")
    for i in range(8):
        save_png(tmp_path / "corrupt" / f"x_{i % 2}.png", gray(i))
    (tmp_path / "corrupt" / "bad_1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad_1.png"):
        data.folder_sites(tmp_path / "corrupt")
    for i in range(3):
        save_png(tmp_path / "ternary" / str(i) / f"{i}.png", gray(i))
    with pytest.raises(ValueError, match="not a binary label"):
        data.folder_sites(tmp_path / "ternary")
    for i in range(5):
        save_png(tmp_path / "small" / f"x_{int(i == 0)}.png" if i == 0 else tmp_path / "small" / f"y{i}_0.png", gray(i))
    with pytest.raises(ValueError, match="too small for a stratified"):
        data.folder_sites(tmp_path / "small")
    with pytest.raises(ValueError, match="4 sites but only 3 images"):
        data._partition(np.array([0, 1, 1]), 4, "iid", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="too small for DenseNet"):
        data.synthetic_sites(image_size=16)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_cover_every_image_exactly_once(partition):
    labels = np.array([0] * 60 + [1] * 40)
    parts = data._partition(labels, 4, partition, 0.5, np.random.default_rng(0))
    assert sorted(np.concatenate(parts)) == list(range(100))
    if partition == "iid":
        assert all(abs(labels[p].mean() - 0.4) < 0.05 for p in parts)


def test_pooled_folder_split_into_sites(tmp_path):
    for i in range(24):
        save_png(tmp_path / ("tb" if i % 3 == 0 else "normal") / f"{i}.png", gray(i))
    train_sets, test_sets = data.folder_sites(tmp_path, image_size=32, num_sites=2, partition="iid")
    assert len(train_sets) == 2 and sum(len(s) for s in train_sets + test_sets) == 24


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=16, **elements):
    """A one-frame grayscale DICOM file, written with pydicom."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.PatientID = "DX", "test"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for key, value in elements.items():
        setattr(dataset, key, value)
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


RAMP = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))  # 12-bit values, left to right


@pytest.mark.extras
def test_dicom_monochrome1_is_inverted_to_look_like_monochrome2(tmp_path):
    bright_bone = write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2", 12)
    dark_bone = write_dicom(tmp_path / "m1.dcm", 4095 - RAMP, "MONOCHROME1", 12)
    assert torch.equal(data.load_image(bright_bone, 64), data.load_image(dark_bone, 64))


@pytest.mark.extras
def test_dicom_12_bit_in_16_with_a_rescale_keeps_its_range(tmp_path):
    path = write_dicom(tmp_path / "ct", RAMP, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024)  # no suffix
    assert data.is_dicom(path)
    image = data.load_image(path, 64)[0]
    assert image.min() == 0 and image.max() == 1 and len(torch.unique(image[0])) == 64  # every level kept
    assert torch.allclose(image[0], torch.arange(64.0) / 63, atol=1e-6)


@pytest.mark.extras
def test_dicom_window_clips_as_the_standard_says(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", RAMP, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    image = data.load_image(path, 64)[0, 0].double()
    values = torch.from_numpy(RAMP[0].astype(np.float64))
    expected = ((values - 2047.5) / 1023 + 0.5).clamp(0, 1)  # PS3.3 C.11.2.1.2: linear, c - 0.5, w - 1
    assert torch.allclose(image, expected, atol=1e-6)
    assert (image[values <= 1536] == 0).all() and (image[values > 2559] == 1).all()


@pytest.mark.extras
def test_dicom_in_site_folders_and_the_file_pydicom_ships(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    for site in ("north", "south"):
        for i in range(8):
            write_dicom(tmp_path / site / ("tb" if i % 2 else "normal") / f"{i}.dcm", RAMP + 7 * i, bits_stored=12)
    write_dicom(tmp_path / "south" / "CHNCXR_0009_1", RAMP, bits_stored=12)  # a name that is its label, no suffix
    train_sets, test_sets = data.folder_sites(tmp_path, image_size=32)
    assert [len(a) + len(b) for a, b in zip(train_sets, test_sets)] == [8, 9]
    assert sum(int(s.labels.sum()) for s in train_sets + test_sets) == 9
    ct = data.load_image(get_testdata_file("CT_small.dcm"), 32)  # read from pydicom's own files, no network
    assert ct.shape == (1, 32, 32) and 0 <= ct.min() < ct.max() <= 1


@pytest.mark.extras
def test_dicom_that_cannot_be_used_is_a_one_line_error_naming_the_file(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    for name, message in (("SC_rgb_small_odd.dcm", "colour"), ("rtdose.dcm", "multi-frame"),
                          ("JPEGLSNearLossless_08.dcm", "cannot decode")):
        with pytest.raises(ValueError, match=message) as error:
            data.load_image(get_testdata_file(name), 32)
        assert name in str(error.value) and "\n" not in str(error.value)


def test_dicom_without_pydicom_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "image"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # the preamble is all it takes to be taken for DICOM
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ValueError, match=r"image is a DICOM file: reading it needs pydicom .*\[dicom\]"):
        data.load_image(path, 32)


@pytest.mark.extras
def test_a_dicom_window_that_is_empty_is_one_line_naming_the_file(tmp_path):
    for name, center, width in (("center.dcm", "", 1024), ("both.dcm", "", "")):
        path = write_dicom(tmp_path / name, RAMP, bits_stored=12, WindowCenter=center, WindowWidth=width)
        with pytest.raises(ValueError, match="its VOI window is not two numbers") as error:
            data.load_image(path, 32)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_nan_or_infinite_pixels_are_one_line_naming_the_file(tmp_path):
    for value in (np.nan, np.inf):
        pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
        pixels[3, 5] = value
        path = tmp_path / "site" / "tb" / f"{value}.tiff"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="F").save(path)
        with pytest.raises(ValueError, match=r"1 pixel\(s\) are NaN or infinite") as error:
            data.load_image(path, 32)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def medmnist_file(path, sizes=(12, 4, 6), side=28, seed=0):
    """A file laid out as MedMNIST writes one: {split}_images N x side x side uint8, {split}_labels N x 1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, size in zip(data.MEDMNIST_SPLITS, sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (size, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(size) % 2).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return arrays


def test_a_medmnist_file_reads_as_its_images_saved_as_png(tmp_path):
    arrays = medmnist_file(tmp_path / "pneumonia.npz")
    pooled = np.concatenate([arrays[f"{split}_images"] for split in data.MEDMNIST_SPLITS])
    labels = np.concatenate([arrays[f"{split}_labels"][:, 0] for split in data.MEDMNIST_SPLITS])
    for row, (pixels, label) in enumerate(zip(pooled, labels)):  # the reference: the same images as PNG files
        save_png(tmp_path / "png" / str(label) / f"{row:03d}.png", pixels)
    from_npz, _ = data.folder_sites(tmp_path / "pneumonia.npz", image_size=32, seed=5)
    from_png, _ = data.folder_sites(tmp_path / "png", image_size=32, seed=5)
    assert [s.name for s in from_npz] == ["pneumonia"] and data.site_sizes(tmp_path / "pneumonia.npz") == {"pneumonia": 22}
    # the png folder lists label 0's images first, the file its rows in order: compare image by image
    for row in range(len(pooled)):
        assert torch.equal(data.load_image((tmp_path / "pneumonia.npz", row), 32),
                           data.load_image(tmp_path / "png" / str(labels[row]) / f"{row:03d}.png", 32))
    assert sorted(map(tuple, from_npz[0].images.flatten(1).tolist())) == sorted(map(tuple, from_png[0].images.flatten(1).tolist()))
    assert from_npz[0].labels.sum() == from_png[0].labels.sum()


def test_medmnist_files_as_sites_and_one_file_split_into_sites(tmp_path):
    (tmp_path / "sites").mkdir()
    for name, seed in (("north", 1), ("south", 2)):
        medmnist_file(tmp_path / "sites" / f"{name}.npz", seed=seed)
    train_sets, test_sets = data.folder_sites(tmp_path / "sites", image_size=32)
    assert [s.name for s in train_sets] == ["north", "south"] and all(len(a) + len(b) == 22 for a, b in zip(train_sets, test_sets))
    medmnist_file(tmp_path / "one.npz", sizes=(40, 8, 12))
    train_sets, test_sets = data.folder_sites(tmp_path / "one.npz", image_size=32, num_sites=3, partition="iid")
    assert len(train_sets) == 3 and sum(len(s) for s in train_sets + test_sets) == 60
    flags = ["--data", str(tmp_path / "one.npz"), "--sites", "3", "--partition", "iid", "--image-size", "32"]
    seeded = lambda *more: bench.load_sites(bench.parse_args(flags + list(more))[0])[0][0].images
    assert torch.equal(seeded(), train_sets[0].images) and not torch.equal(seeded("--data-seed", "1"), seeded())
    with pytest.raises(ValueError, match="holds 1 sites .*not 3; use partition iid"):
        data.folder_sites(tmp_path / "one.npz", image_size=32, num_sites=3)


def test_a_file_that_is_not_binary_medmnist_is_one_line_naming_it(tmp_path):
    cases = {"other.npz": dict(x=np.zeros(3)), "multiclass.npz": dict(train_images=np.zeros((4, 28, 28), np.uint8),
                                                                        train_labels=np.array([[0], [1], [2], [3]])),
             "multilabel.npz": dict(train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 14), np.uint8)),
             "unlabelled.npz": dict(train_images=np.zeros((2, 28, 28), np.uint8)),
             "objects.npz": dict(train_images=np.array([None, 1], dtype=object), train_labels=np.zeros((2, 1)))}
    messages = {"other.npz": "not a MedMNIST file", "multiclass.npz": "not 0 and 1", "multilabel.npz": "one binary label",
                "unlabelled.npz": "without train_labels", "objects.npz": "cannot read"}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=messages[name]) as raised:
            data.folder_sites(tmp_path / name, image_size=32)
        assert name in str(raised.value) and "\n" not in str(raised.value)
    (tmp_path / "broken.npz").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="cannot read .*broken.npz"):
        data.site_sizes(tmp_path / "broken.npz")


@pytest.mark.skipif(not SHARED_XRAYS.exists(), reason="the real X-rays (../shared/data) are not beside the project")
def test_the_real_xray_file_reads_as_its_readme_says():
    sizes = data.site_sizes(SHARED_XRAYS)
    assert sizes == {"pneumoniamnist-dev": 5206}
    train_sets, test_sets = data.folder_sites(SHARED_XRAYS, image_size=32, num_sites=3, partition="iid")
    labels = torch.cat([s.labels for s in train_sets + test_sets])
    assert len(labels) == 5206 and int(labels.sum()) == 3858  # 1,348 normal, 3,858 pneumonia
    assert all(0 <= s.images.min() and s.images.max() <= 1 and s.images.shape[1:] == (1, 32, 32) for s in train_sets)


def png_48_bit(path, pixels):
    """An RGB PNG of 16 bits a channel (which Pillow cannot write), chunk by chunk as the PNG standard lays it out."""
    import struct
    import zlib
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_data_that_would_inflate_or_corrupt_a_result_is_one_line_naming_it(tmp_path, monkeypatch):
    for i in range(8):
        save_png(tmp_path / "img" / f"{i}.png", gray(7 * i))
    manifest = lambda name, *rows: (tmp_path / name).write_text("path,label\n" + "".join(f"{row}\n" for row in rows))
    cases = [(manifest("twice.csv", *[f"img/{i}.png,{i % 2}" for i in range(8)], "img/3.png,1"),
              "twice.csv lines 5 and 10 name the same image"),
             (manifest("labels.csv", *[f"img/{i}.png,{i % 2}" for i in range(8)], "img/./2.png,1"),
              "labels.csv lines 4 and 10 name the same image .*, under labels 0 and 1")]
    for _, message in cases:
        with pytest.raises(ValueError, match=message):
            data.folder_sites(tmp_path / message.split()[0], image_size=32)
    (tmp_path / "img" / "copy.png").write_bytes((tmp_path / "img" / "5.png").read_bytes())  # a copy, another name
    manifest("copied.csv", *[f"img/{i}.png,{i % 2}" for i in range(8)], "img/copy.png,0")
    with pytest.raises(ValueError, match=r"img/5.png and .*img/copy.png are the same image, under labels 1 and 0"):
        data.folder_sites(tmp_path / "copied.csv", image_size=32)
    manifest("plain.csv", *[f"img/{i}.png,{i % 2}" for i in range(8)])
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())  # as a spreadsheet saves it
    assert [len(s) for s in data.folder_sites(bom, image_size=32)[0]] == [len(s) for s in data.folder_sites(
        tmp_path / "plain.csv", image_size=32)[0]]
    with pytest.raises(ValueError, match=r"0.png is not a CSV manifest \(path,label\[,site\]\): not text"):
        data.folder_sites(tmp_path / "img" / "0.png", image_size=32)
    with pytest.raises(ValueError, match=r"0.png: 40 x 40, 1,600 pixels, more than --max-pixels 1,000"):
        data.folder_sites(tmp_path / "plain.csv", image_size=32, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's warning of a bomb: --max-pixels's line alone
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"0.png: 40 x 40, 1,600 pixels, more than"):
        warnings.simplefilter("error")
        data.load_image(tmp_path / "img" / "0.png", 32, max_pixels=1000)
    monkeypatch.undo()
    pages = [Image.fromarray(gray(value)) for value in (10, 20)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    png_48_bit(tmp_path / "deep.png", np.random.default_rng(0).integers(0, 65536, (8, 8, 3)))
    with Image.open(tmp_path / "deep.png") as deep:
        assert deep.mode == "RGB"  # (Pillow would read it as 8 bits a channel, silently)
    for name, message in (("pages.tif", "2 pages"), ("deep.png", "16 bits a colour channel")):
        with pytest.raises(ValueError, match=message) as error:
            data.load_image(tmp_path / name, 32)
        assert name in str(error.value) and "\n" not in str(error.value)
    write_dicom(tmp_path / "large.dcm", np.zeros((50, 40), np.uint16))
    with pytest.raises(ValueError, match=r"large.dcm: 50 x 40, 2,000 pixels, more than --max-pixels 1,000"):
        data.load_image(tmp_path / "large.dcm", 32, max_pixels=1000)
