"""Chest X-ray federations: a synthetic one generated from a seed (the default), real X-ray folders, and MedMNIST's
`.npz` files.

Both return `(train_sets, test_sets)`: one `Site` per hospital, items `(image 1xHxW float tensor, label 0./1.)`,
with every image decoded once and held in memory as one tensor, so no epoch and no scheme decodes again.
"""
import csv
import functools
import hashlib
import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
CLASS_NAMES = {"0": 0, "normal": 0, "negative": 0, "neg": 0, "healthy": 0,
               "1": 1, "tb": 1, "positive": 1, "pos": 1, "tuberculosis": 1, "abnormal": 1}
LESION_STRENGTH = (0.15, 0.5)  # opacity over the lung field: low end hard to see, high end obvious
NUM_SITES = 3  # the synthetic federation's sites, and a pooled folder's, unless told
SITE_SIZES = (340, 214, 128)  # train + test; 256, 160, 96 for training: whole batches of 32. Then 96 each.
SHARED_SCANNER = dict(contrast=0.8, gamma=1.0, noise=0.045, blur=0.6)  # the middle of every site's range
MEDMNIST_SPLITS = ("train", "val", "test")  # the arrays of a MedMNIST file: {split}_images, {split}_labels
MAX_PIXELS = 50_000_000  # an image larger is refused from its header (a chest X-ray has up to about 20 million)
MIN_IMAGE_SIZE = 29  # DenseNet-121 halves an image five times; 29 pixels is the least that leaves 1x1


class Site(torch.utils.data.Dataset):
    """One hospital's images (N x 1 x H x W float32) and labels (N float32, 0. or 1.)."""

    def __init__(self, images, labels, name):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self):
        return f"Site({self.name!r}, {len(self)} images, {int(self.labels.sum())} positive)"


def _check_image_size(image_size):
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size {image_size} is too small for DenseNet-121 (at least {MIN_IMAGE_SIZE} pixels)")


def _stratified_split(labels, test_fraction, rng, name):
    """Indices (train, test) with each label on both sides, in proportion."""
    train, test = [], []
    for label in (0, 1):
        index = np.flatnonzero(labels == label)
        if len(index) < 2:
            raise ValueError(f"site {name!r} is too small for a stratified train/test split: it needs at least "
                             f"2 images of each label and has {int((labels == 0).sum())} of label 0, "
                             f"{int((labels == 1).sum())} of label 1")
        index = rng.permutation(index)
        num_test = min(max(1, round(len(index) * test_fraction)), len(index) - 1)
        test += list(index[:num_test])
        train += list(index[num_test:])
    return np.sort(train), np.sort(test)


def _train_test(images, labels, name, test_fraction, rng):
    train, test = map(torch.from_numpy, _stratified_split(labels.numpy(), test_fraction, rng, name))
    return Site(images[train], labels[train], name), Site(images[test], labels[test], name)


def _grid(size):
    coords = torch.linspace(-1, 1, size)
    return coords.view(1, -1).expand(size, size), coords.view(-1, 1).expand(size, size)


def _blob(x, y, cx, cy, rx, ry, sharpness=8.0):
    """A soft ellipse: 1 inside, 0 outside, a smooth edge."""
    return torch.sigmoid(sharpness * (1 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2))


def _gauss(x, y, cx, cy, sx, sy):
    return torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _chest(rng, x, y, positive):
    """One chest X-ray-like image in [0, 1]: body, lungs, ribs, heart, spine, and lesions if positive."""
    side = torch.tensor([-1.0, 1.0])
    lung_cx = 0.37 + rng.normal(0, 0.03)
    lung_rx, lung_ry = 0.26 + rng.normal(0, 0.02), 0.55 + rng.normal(0, 0.04)
    lungs = [_blob(x, y, s * lung_cx, -0.05, lung_rx, lung_ry) for s in side]
    lung_mask = torch.maximum(*lungs)
    image = 0.08 + 0.5 * _blob(x, y, rng.normal(0, 0.03), 0.1, 0.88 + rng.normal(0, 0.04), 1.05)
    image = image - 0.32 * lung_mask
    ribs = (0.5 + 0.5 * torch.sin(rng.uniform(11, 15) * (y + 0.35 * x ** 2) + rng.uniform(0, 6.3))) ** 6
    image = image + 0.07 * ribs * lung_mask
    image = image + 0.25 * _blob(x, y, 0.1, 0.3, 0.24, 0.22) + 0.18 * _blob(x, y, 0.0, 0.0, 0.06, 1.2)
    if positive:
        for _ in range(rng.integers(1, 4)):
            s = float(rng.choice(side))
            kind = rng.choice(["nodule", "patch", "cavity"])
            cx = s * lung_cx + rng.normal(0, 0.08)
            cy = -0.05 + (rng.uniform(-0.5, -0.15) if kind == "patch" else rng.uniform(-0.4, 0.35))
            strength = rng.uniform(*LESION_STRENGTH)
            if kind == "nodule":
                r = rng.uniform(0.04, 0.1)
                lesion = _gauss(x, y, cx, cy, r, r)
            elif kind == "patch":  # upper-lobe consolidation: large and diffuse
                lesion = _gauss(x, y, cx, cy, rng.uniform(0.08, 0.16), rng.uniform(0.06, 0.12))
            else:  # cavity: a bright wall around a dark centre
                r = rng.uniform(0.06, 0.11)
                lesion = _gauss(x, y, cx, cy, r, r) - 1.2 * _gauss(x, y, cx, cy, r / 2, r / 2)
            image = image + strength * lesion * lung_mask
    if rng.random() < 0.4:  # distractors any image may carry: a calcified granuloma, a button or an ECG lead
        cx, cy = rng.uniform(-0.7, 0.7), rng.uniform(-0.6, 0.6)
        r = rng.uniform(0.015, 0.035)
        image = image + rng.uniform(0.2, 0.5) * _gauss(x, y, cx, cy, r, r)
    return image


def _acquire(images, rng, contrast, gamma, noise, blur):
    """A site's scanner: gamma and contrast, blur, then noise; images N x 1 x H x W."""
    images = images.clamp(0, 1) ** gamma * contrast + (1 - contrast) / 2
    if blur > 0:
        radius = max(1, math.ceil(3 * blur))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / blur) ** 2)
        taps = taps / taps.sum()
        images = F.conv2d(F.pad(images, (radius,) * 4, mode="replicate"), (taps.view(-1, 1) * taps).view(1, 1, *taps.shape * 2))
    images = images + noise * torch.from_numpy(rng.standard_normal(images.shape)).float()
    return images.clamp(0, 1)


def default_site_sizes(num_sites=NUM_SITES):
    """The synthetic sites' numbers of images (train + test): `SITE_SIZES`, then 96 each."""
    return [SITE_SIZES[k] if k < len(SITE_SIZES) else 96 for k in range(num_sites)]


def synthetic_sites(num_sites=NUM_SITES, image_size=48, seed=0, site_sizes=None, prevalences=None, test_fraction=0.25,
                    shapes_only=False, only_site=None, same_scanner=False):
    """The default federation: synthetic chest X-rays, non-IID across sites, generated from `seed`.

    Sites differ in size (default `SITE_SIZES`, then 96 each: 256, 160, 96, then 72 training images),
    prevalence of tuberculosis (default 0.5, 0.3, 0.4, 0.25, ...) and acquisition (contrast,
    gamma, noise, blur). `same_scanner`: every site acquires with `SHARED_SCANNER` instead of its own (the
    same patients and labels; the sites then differ in size and prevalence only).
    `shapes_only`: the same sites and labels, with images on the meta device (shapes, no pixels), for counting costs.
    `only_site`: make the images of that site only, the others shapes only (a client of a distributed run).
    """
    _check_image_size(image_size)
    if num_sites < 1:
        raise ValueError(f"number of sites must be at least 1, not {num_sites}")
    site_sizes = site_sizes or default_site_sizes(num_sites)
    prevalences = prevalences or [(0.5, 0.3, 0.4, 0.25)[k % 4] for k in range(num_sites)]
    if len(site_sizes) != num_sites or len(prevalences) != num_sites:
        raise ValueError(f"site_sizes and prevalences need one value for each of the {num_sites} sites")
    x, y = _grid(image_size)
    train_sets, test_sets = [], []
    for site, (size, prevalence) in enumerate(zip(site_sizes, prevalences)):
        rng = np.random.default_rng([seed, site])
        labels = np.zeros(size, dtype=np.float32)
        labels[: round(size * prevalence)] = 1
        labels = rng.permutation(labels)
        if shapes_only or only_site not in (None, site):
            images = torch.empty(size, 1, image_size, image_size, device="meta")
        else:
            images = torch.stack([_chest(rng, x, y, label == 1) for label in labels]).unsqueeze(1)
            scanner = dict(contrast=rng.uniform(0.6, 1.0), gamma=rng.uniform(0.7, 1.4),
                           noise=rng.uniform(0.02, 0.07), blur=rng.uniform(0, 1.2))
            scanner = SHARED_SCANNER if same_scanner else scanner
            images = _acquire(images, rng, **dict(scanner, blur=scanner["blur"] * image_size / 64))
        train, test = _train_test(images, torch.from_numpy(labels), f"synthetic-{site}", test_fraction, rng)
        train_sets.append(train)
        test_sets.append(test)
    return train_sets, test_sets


def _too_many_pixels(path, pixels, max_pixels, what):
    if pixels > max_pixels:
        raise ValueError(f"{path}: {what}, {pixels:,} pixels, more than --max-pixels {max_pixels:,} (an X-ray "
                         f"has a few million; raise the limit if this one is meant)")


def _check_header(image, path, max_pixels):
    """What a PIL image's header says, before its pixels are decoded: not too many of them (`max_pixels`: a small
    file can decode into gigabytes), one page, and no colour channel deeper than the 8 bits Pillow reads."""
    _too_many_pixels(path, image.width * image.height, max_pixels, f"{image.width} x {image.height}")
    if getattr(image, "n_frames", 1) > 1:
        raise ValueError(f"{path}: {image.n_frames} pages (frames), not one X-ray")
    raw_mode = image.tile[0][3] if image.tile and isinstance(image.tile[0][3], str) else ""
    if image.mode in ("RGB", "RGBA") and "16" in raw_mode:
        raise ValueError(f"{path}: 16 bits a colour channel ({raw_mode}), which Pillow reads as 8: save it as "
                         f"16-bit grayscale")


def _to_gray(image, path):
    """A PIL image as one float32 channel in [0, 1], its own full range stretched (16-bit kept, never clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        pixels = np.asarray(image).astype(np.float64)
    elif image.mode in ("LA", "La"):
        pixels = np.asarray(image)[..., 0].astype(np.float64)
    else:  # RGB, RGBA (alpha dropped), palette, CMYK, ...
        rgb = np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGB")).astype(np.float64)
        pixels = rgb[..., :3] @ np.array([0.299, 0.587, 0.114])
    if pixels.ndim != 2:
        raise ValueError(f"cannot read image {path}: unexpected shape {pixels.shape}")
    return _stretch(_finite(pixels, path)).astype(np.float32)


def _finite(pixels, path):
    """`pixels`, once every one is a number (a float TIFF may hold NaN or infinity: it would train into NaN)."""
    bad = ~np.isfinite(pixels)
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} pixel(s) are NaN or infinite")
    return pixels


def _stretch(pixels):
    """Pixel values onto [0, 1] from their own minimum and maximum (a flat image gives zeros)."""
    low, high = pixels.min(), pixels.max()
    return (pixels - low) / (high - low) if high > low else pixels * 0


def is_dicom(path):
    """A .dcm/.dicom file, or a file without a suffix that opens with the DICOM preamble ("DICM" at byte 128)."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix or not path.is_file():
        return False
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _window(values, center, width, function):
    """The VOI window of DICOM PS3.3 C.11.2.1.2 onto [0, 1]: LINEAR (the default), LINEAR_EXACT or SIGMOID."""
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0, 1)
    if width < 1:
        raise ValueError(f"window width {width} is below 1")
    return np.clip((values - (center - 0.5)) / max(width - 1, 1) + 0.5, 0, 1)


def _read_dicom(path, max_pixels):
    """A DICOM X-ray as a radiologist sees it, one float channel in [0, 1]: stored values through the modality
    rescale (RescaleSlope/Intercept or a modality LUT), then the VOI window (WindowCenter/Width, the first
    if there are several) or VOI LUT when the file has one, else its own range stretched as for other images;
    MONOCHROME1 (bone dark) inverted so that bone is bright as in MONOCHROME2. Never a label: labels come from
    class folders, names or the manifest."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ValueError(f'{path} is a DICOM file: reading it needs pydicom (pip install -e ".[dicom]")') from None
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise ValueError(f"cannot read DICOM file {path}: {str(error).splitlines()[0]}") from None
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: a colour DICOM image ({dataset.get('PhotometricInterpretation')}); "
                         f"a chest X-ray is one grayscale channel")
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: a multi-frame DICOM ({dataset.NumberOfFrames} frames), not one X-ray")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    _too_many_pixels(path, rows * columns, max_pixels, f"{rows} x {columns}")
    try:
        stored = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        raise ValueError(f"{path}: cannot decode its pixel data ({getattr(syntax, 'name', syntax)}): "
                         f"{' '.join(str(error).split())}") from None
    values = _finite(np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64), path)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        first = lambda value: value[0] if isinstance(value, pydicom.multival.MultiValue) and len(value) else value
        try:
            center, width = float(first(dataset.WindowCenter)), float(first(dataset.WindowWidth))
            if not (math.isfinite(center) and math.isfinite(width)):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{path}: its VOI window is not two numbers (WindowCenter {dataset.WindowCenter!r}, "
                             f"WindowWidth {dataset.WindowWidth!r})") from None
        try:
            pixels = _window(values, center, width, str(dataset.get("VOILUTFunction", "LINEAR")).upper())
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        if "VOILUTSequence" in dataset:
            values = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
        pixels = _stretch(values)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = 1 - pixels
    return pixels.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _decode_cached(path, mtime_ns, file_size, image_size, cache_dir, max_pixels):
    key = hashlib.sha1(f"{path}|{mtime_ns}|{file_size}|{image_size}".encode()).hexdigest()
    cached = Path(cache_dir, key + ".npy") if cache_dir else None
    if cached and cached.exists():
        return torch.from_numpy(np.load(cached))
    if is_dicom(path):
        pixels = _read_dicom(path, max_pixels)
    else:
        try:
            with warnings.catch_warnings():  # (Pillow's warning of a large image: --max-pixels decides, in one line)
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(path)
            with image:
                _check_header(image, path, max_pixels)
                image.load()
                pixels = _to_gray(image, path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(str(error) if str(error).startswith(f"{path}:") else f"cannot read image {path}: {error}") \
                from None
    resized = F.interpolate(torch.from_numpy(pixels)[None, None], size=(image_size, image_size),
                            mode="bilinear", antialias=True, align_corners=False)[0]
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        np.save(cached, resized.numpy())
    return resized


def load_image(path, image_size, cache_dir=None, max_pixels=None):
    """Decode and resize one X-ray to 1 x image_size x image_size, once per file, size and modification; `path` may
    also be (a MedMNIST file, the image's row in it), as `folder_sites` lists them. An image of more than
    `max_pixels` (default `MAX_PIXELS`) is refused from its header, before it is decoded."""
    if isinstance(path, tuple):
        pixels = _medmnist(*_stamped(path[0]))[0][path[1]]
        return F.interpolate(torch.from_numpy(_stretch(pixels.astype(np.float64)).astype(np.float32))[None, None],
                             size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)[0]
    return _decode_cached(*_stamped(path), image_size, cache_dir and str(cache_dir), max_pixels or MAX_PIXELS)


def _stamped(path):
    """(path, modification time, size): a cache key that a rewritten file changes."""
    stat = os.stat(path)
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=None)
def _medmnist(path, mtime_ns, file_size):
    """A MedMNIST `.npz` file's images (N x H x W, any number type; colour made gray) and binary labels, its
    splits (`MEDMNIST_SPLITS`) pooled in that order: the package draws its own train and test split per site."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    splits = [split for split in MEDMNIST_SPLITS if f"{split}_images" in found]
    if not splits:
        raise ValueError(f"{path} is not a MedMNIST file: it has no train_images, val_images or test_images "
                         f"(it holds {', '.join(sorted(found)) or 'nothing'})")
    images, labels = [], []
    for split in splits:
        pixels, label = found[f"{split}_images"], found.get(f"{split}_labels")
        if label is None:
            raise ValueError(f"{path}: {split}_images without {split}_labels")
        if pixels.ndim == 4 and pixels.shape[-1] in (1, 3):  # MedMNIST's colour sets: N x H x W x 3
            pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if pixels.ndim != 3 or not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
            raise ValueError(f"{path}: {split}_images is {pixels.dtype} of shape {pixels.shape}, not N x H x W numbers")
        label = label.reshape(len(label), -1) if label.ndim else label.reshape(1, 1)
        if len(label) != len(pixels) or label.shape[1] != 1:
            raise ValueError(f"{path}: {split}_labels has shape {found[f'{split}_labels'].shape} for {len(pixels)} images; "
                             f"the package's task needs one binary label an image")
        if not np.isin(label, (0, 1)).all():
            values = np.unique(label)
            raise ValueError(f"{path}: {split}_labels holds {', '.join(map(str, values[:6]))}{' ...' if len(values) > 6 else ''}, "
                             f"not 0 and 1 (a multi-class MedMNIST task; the package's task is binary)")
        images.append(_finite(pixels, f"{path} {split}_images"))
        labels.append(label[:, 0].astype(int))
    return np.concatenate(images), np.concatenate(labels)


def _class_label(name):
    return CLASS_NAMES.get(name.lower())


def _label_of(path, folder):
    """A label from a class folder between `folder` and the file, or from a Shenzhen-style name *_0 / *_1."""
    for part in path.relative_to(folder).parts[:-1]:
        if _class_label(part) is not None:
            return _class_label(part)
        if part.isdigit():
            raise ValueError(f"class folder {path.parent} is not a binary label (use 0/1, normal/tb or negative/positive)")
    match = re.search(r"_(\d+)$", path.stem)
    if match and match.group(1) in ("0", "1"):
        return int(match.group(1))
    if match and len(match.group(1)) == 1:
        raise ValueError(f"label {match.group(1)} of {path} is not binary (0 or 1)")
    raise ValueError(f"cannot tell the label of {path}: put it in a class folder (0/1, normal/tb, "
                     f"negative/positive) or name it like CHNCXR_0001_0.png")


def _is_image(path):
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path))


def _images_in(folder):
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _scan_medmnist(path):
    """{its name: [((path, row), label)]}: a MedMNIST file is one site, every split of it pooled."""
    _, labels = _medmnist(*_stamped(path))
    return {Path(path).stem: [((path, row), int(label)) for row, label in enumerate(labels)]}


def _scan(root):
    """{site: [(where the image is, label)]} from a folder, a CSV manifest or a MedMNIST file."""
    if root.is_file():
        return _scan_medmnist(root) if root.suffix.lower() == ".npz" else _scan_manifest(root)
    files = sorted(path for path in root.glob("*.npz") if path.is_file())
    if files and not any(_is_image(path) for path in root.iterdir()):  # a MedMNIST file per site
        return {name: items for path in files for name, items in _scan_medmnist(path).items()}
    return _scan_folder(root)


def _scan_folder(root):
    """{site: [(path, label)]}: subfolders of `root` are sites, unless `root` itself holds classes or images."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    pooled = any(_class_label(d.name) is not None for d in subdirs) or any(
        _is_image(p) for p in root.iterdir())
    folders = [root] if pooled or not subdirs else subdirs
    sites = {}
    for folder in folders:
        paths = _images_in(folder)
        if not paths:
            raise ValueError(f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} and "
                             f"DICOM files without a suffix)")
        sites[folder.name] = [(p, _label_of(p, folder)) for p in paths]
    return sites


def _scan_manifest(manifest):
    """{site: [(path, label)]} from a CSV of `path,label[,site]` (a header row is optional; a spreadsheet's byte
    order mark too). An image named on two lines is refused, naming both: as a training and a test image it would
    inflate the AUROC, under two labels it is one of them wrong."""
    sites, lines = {}, {}
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.reader(file))
    except UnicodeDecodeError as error:
        raise ValueError(f"{manifest} is not a CSV manifest (path,label[,site]): not text ({error.reason} at byte "
                         f"{error.start})") from None
    except csv.Error as error:
        raise ValueError(f"{manifest} is not a CSV manifest (path,label[,site]): {error}") from None
    for line, row in enumerate(rows, start=1):
        if not row or (line == 1 and row[0].strip().lower() == "path"):
            continue
        if len(row) < 2:
            raise ValueError(f"{manifest} line {line}: expected path,label[,site]")
        label = _class_label(row[1].strip())
        if label is None:
            raise ValueError(f"{manifest} line {line}: label {row[1].strip()!r} is not binary (0 or 1)")
        path = Path(manifest).parent / row[0].strip()
        if not path.is_file():
            raise ValueError(f"{manifest} line {line}: image {path} does not exist")
        earlier = lines.setdefault(path.resolve(), (line, label))
        if earlier[0] != line:
            raise ValueError(f"{manifest} lines {earlier[0]} and {line} name the same image {path}"
                             + (f", under labels {earlier[1]} and {label}" if earlier[1] != label else ""))
        sites.setdefault(row[2].strip() if len(row) > 2 else Path(manifest).stem, []).append((path, label))
    if not sites:
        raise ValueError(f"no images found in manifest {manifest}")
    return sites


def _partition(labels, num_sites, partition, alpha, rng):
    """Split one pool into `num_sites` index lists: "iid" deals each label out evenly, "dirichlet" skews labels."""
    if num_sites > len(labels):
        raise ValueError(f"{num_sites} sites but only {len(labels)} images")
    for _ in range(100):
        parts = [[] for _ in range(num_sites)]
        for label in (0, 1):
            index = rng.permutation(np.flatnonzero(labels == label))
            if partition == "iid":
                for k in range(num_sites):
                    parts[k] += list(index[k::num_sites])
            else:
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(index)).round().astype(int)[:-1]
                for k, chunk in enumerate(np.split(index, cuts)):
                    parts[k] += list(chunk)
        if all(min((labels[p] == 0).sum(), (labels[p] == 1).sum()) >= 2 for p in parts):
            return [np.sort(p) for p in parts]
    raise ValueError(f"partition {partition!r} (alpha={alpha}) cannot give each of {num_sites} sites 2 images "
                     f"of each label; use fewer sites or a larger alpha")


def site_names(root):
    """The sites `folder_sites(root)` finds, in its order, without decoding an image."""
    return list(site_sizes(root))


def site_sizes(root):
    """{site: its number of images} as `folder_sites(root)` finds them, without decoding an image."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"data folder {root} does not exist")
    return {name: len(items) for name, items in _scan(root).items()}


def _refuse_duplicates(items, seen):
    """One image twice (the same file, or a copy of it under another name: the same bytes) would be a training and a
    test image at once, inflating the AUROC, or under two labels one of them wrong: refused, naming both. `seen`:
    what the sites before held, {the image's digest: (where, label)}, added to."""
    where = lambda path: f"{path[0]} row {path[1]}" if isinstance(path, tuple) else str(path)
    for path, label in items:
        if isinstance(path, tuple):  # a MedMNIST row: its pixels
            content = _medmnist(*_stamped(path[0]))[0][path[1]].tobytes()
        else:
            content = Path(path).read_bytes()
        earlier = seen.setdefault(hashlib.sha1(content).digest(), (path, label))
        if earlier[0] != path:
            same = "the same file" if not isinstance(path, tuple) and Path(earlier[0]).resolve() == Path(path).resolve() \
                else "the same image"
            raise ValueError(f"{where(earlier[0])} and {where(path)} are {same}"
                             + (f", under labels {earlier[1]} and {label}" if earlier[1] != label else "")
                             + ": each image may be in the data once")


def folder_sites(root, image_size=224, num_sites=None, partition="site", seed=0, test_fraction=0.25,
                 alpha=0.5, cache_dir=None, only_site=None, max_pixels=None):
    """Real X-rays as sites: a folder per site, one pooled folder split into sites, a CSV manifest, a MedMNIST `.npz`
    file (one site, its splits pooled), or a folder of such files (one site each).

    partition: "site" keeps the sites as found; "iid" or "dirichlet" (label skew, `alpha`) pools every image
    and splits the pool into `num_sites` sites. Each site gets a seeded, stratified test split.
    `only_site`: decode the images of that site (an index) only; the others have their labels and
    shape-only images (a client of a distributed run). An image twice (`_refuse_duplicates`; in the sites decoded)
    and one larger than `max_pixels` (default `MAX_PIXELS`, read from its header before it is decoded) are refused.
    """
    _check_image_size(image_size)
    root = Path(root)
    if not root.exists():
        raise ValueError(f"data folder {root} does not exist")
    if partition not in ("site", "iid", "dirichlet"):
        raise ValueError(f"partition must be site, iid or dirichlet, not {partition!r}")
    found = _scan(root)
    if partition == "site":
        if num_sites is not None and num_sites != len(found):
            raise ValueError(f"{root} holds {len(found)} sites ({', '.join(found)}), not {num_sites}; "
                             f"use partition iid or dirichlet to split it into {num_sites}")
        groups = found
    else:
        pool = [item for items in found.values() for item in items]
        labels = np.array([label for _, label in pool])
        parts = _partition(labels, num_sites or NUM_SITES, partition, alpha, np.random.default_rng(seed))
        groups = {f"{partition}-{k}": [pool[i] for i in part] for k, part in enumerate(parts)}
    train_sets, test_sets, seen = [], [], {}
    for site, (name, items) in enumerate(groups.items()):
        if only_site not in (None, site):
            images = torch.empty(len(items), 1, image_size, image_size, device="meta")
        else:
            _refuse_duplicates(items, seen)
            images = torch.stack([load_image(path, image_size, cache_dir, max_pixels) for path, _ in items])
        labels = torch.tensor([float(label) for _, label in items])
        train, test = _train_test(images, labels, name, test_fraction, np.random.default_rng([seed, site]))
        train_sets.append(train)
        test_sets.append(test)
    return train_sets, test_sets
