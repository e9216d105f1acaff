"""Folder-per-class datasets in the layouts of the public releases and of our own export.

Canonical classes are those of NCT-CRC-HE-100K. Folder names map onto them as documented in
``FOLDER_TO_CLASS``:

- NCT-CRC-HE-100K, CRC-VAL-HE-7K, PathMNIST folder exports and Cloudiopsy's own export of reviewed
  labels: the canonical names (``ADI`` ... ``TUM``);
- the 2016 Kather texture set (Zenodo 53169): numbered folders, ``01_TUMOR`` -> TUM, ``02_STROMA``
  -> STR, ``04_LYMPHO`` -> LYM, ``05_DEBRIS`` -> DEB, ``06_MUCOSA`` -> NORM, ``07_ADIPOSE`` -> ADI,
  ``08_EMPTY`` -> BACK; ``03_COMPLEX`` (complex stroma) has no single canonical class and is
  skipped, not guessed;
- MedMNIST-style folders named by label text (``adipose``, ``colorectal adenocarcinoma
  epithelium`` ...) or by PathMNIST label index (``0`` ... ``8``, in the canonical order).

Images are listed, never loaded: training streams them from disk. A dataset's scale comes from a
``dataset.json`` in its root (``{"um_per_px": 0.5}``) when present, else from its layout
(Kather 2016 numbered folders: 0.495 µm/px; canonical names: 0.5 µm/px as NCT-CRC-HE-100K).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

CANONICAL_CLASSES: tuple[str, ...] = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})

_MEDMNIST_NAMES = (
    "ADIPOSE",
    "BACKGROUND",
    "DEBRIS",
    "LYMPHOCYTES",
    "MUCUS",
    "SMOOTH_MUSCLE",
    "NORMAL_COLON_MUCOSA",
    "CANCER_ASSOCIATED_STROMA",
    "COLORECTAL_ADENOCARCINOMA_EPITHELIUM",
)

# Folder name (upper case, spaces and hyphens as underscores) -> canonical class, or None for
# "no canonical class: skip".
FOLDER_TO_CLASS: dict[str, str | None] = {
    **{name: name for name in CANONICAL_CLASSES},
    **dict(zip(_MEDMNIST_NAMES, CANONICAL_CLASSES, strict=True)),
    **{str(i): name for i, name in enumerate(CANONICAL_CLASSES)},
    "01_TUMOR": "TUM",
    "02_STROMA": "STR",
    "03_COMPLEX": None,  # complex stroma: mixed tissue, no single NCT class
    "04_LYMPHO": "LYM",
    "05_DEBRIS": "DEB",  # debris and mucus
    "06_MUCOSA": "NORM",  # normal mucosal glands
    "07_ADIPOSE": "ADI",
    "08_EMPTY": "BACK",
}


@dataclass(frozen=True)
class LabelledImage:
    """One image file with its canonical class.

    Attributes:
        path: the image file.
        label: canonical class name (one of ``CANONICAL_CLASSES``).
        source: name of the dataset folder it came from.
        group: slide/patient group when the file name says it (for leakage-free splits),
            otherwise the file stem.
        um_per_px: micrometres per pixel of the source, or None when unknown.
    """

    path: Path
    label: str
    source: str
    group: str
    um_per_px: float | None = None


_KATHER2016_SLIDE = re.compile(r"(CRC-Prim-HE-\d+)", re.IGNORECASE)


def _group_of(path: Path) -> str:
    match = _KATHER2016_SLIDE.search(path.name)
    return match.group(1) if match else path.stem


def _folder_key(name: str) -> str:
    return name.strip().upper().replace(" ", "_").replace("-", "_")


def class_of_folder(name: str) -> str | None:
    """Canonical class for a dataset folder name, or None when it has none (skipped)."""
    return FOLDER_TO_CLASS.get(_folder_key(name))


# The real samples the demo model is trained on (folders of ../shared/data) and the ImageNet
# weights file it starts from, relative to that folder.
DEMO_SOURCES = ("nct-crc-he-100k-samples", "crc-val-he-7k-png", "kather2016-tfds-224", "kather2016-tiles-150")
DEMO_WEIGHTS = "mobilenetv2-0.35-imagenet/mobilenet_v2_0.35_224_no_top.h5"

KATHER2016_FOLDERS = {"01_TUMOR", "02_STROMA", "06_MUCOSA", "08_EMPTY"}
KATHER2016_UM_PER_PX = 0.495
KATHER2016_TILE_PX = 150


def kather2016_um_per_px(first_image: Path) -> float:
    """Scale of a Kather 2016 tile folder from its tiles' width: every tile covers 150 px x 0.495 µm
    = 74 µm of tissue, so a resampled copy (e.g. the 224 px TFDS export: 0.33 µm/px) keeps its
    true scale instead of being taken for 0.495 µm/px."""
    with Image.open(first_image) as image:
        width = image.size[0]
    return round(KATHER2016_UM_PER_PX * KATHER2016_TILE_PX / width, 4) if width else KATHER2016_UM_PER_PX


def source_um_per_px(root: Path, folder_names: list[str]) -> float | None:
    """A dataset's scale in µm/px: ``dataset.json`` if present, else its layout's convention."""
    info = root / "dataset.json"
    if info.is_file():
        value = json.loads(info.read_text()).get("um_per_px")
        return float(value) if value else None
    keys = {_folder_key(n) for n in folder_names}
    if keys & KATHER2016_FOLDERS:
        return KATHER2016_UM_PER_PX  # Kather 2016 texture tiles: 150 px = 74 µm
    if keys & set(CANONICAL_CLASSES):
        return 0.5  # NCT-CRC-HE-100K / CRC-VAL-HE-7K convention
    return None


def _manifest_groups(root: Path) -> dict[str, str]:
    """{relative file: patient group} from our export's manifest.csv, when the folder has one."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    import csv

    with open(manifest, newline="") as handle:
        return {row["file"]: f"patient-{row['group']}" for row in csv.DictReader(handle) if row.get("group")}


def dataset_version(root: str | Path) -> str | None:
    """The version our export recorded in dataset.json (the manifest's SHA-256), if any."""
    info = Path(root) / "dataset.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("dataset_version")


def scan_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> list[LabelledImage]:
    """List the labelled images under a folder-per-class dataset root (nothing is loaded).

    Args:
        root: directory whose sub-directories are class folders (``TUM/``, ``06_MUCOSA/`` ...).
        classes: keep only these canonical classes (default: all).

    Returns:
        Images sorted by path, so the order is the same on every machine.

    Raises:
        FileNotFoundError: the root does not exist. ValueError: it holds no class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found: list[LabelledImage] = []
    known_folder = False
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    um_per_px = source_um_per_px(root, [f.name for f in folders])
    groups = _manifest_groups(root)
    for folder in folders:
        if _folder_key(folder.name) not in FOLDER_TO_CLASS:
            continue
        known_folder = True
        label = class_of_folder(folder.name)
        if label is None or (classes is not None and label not in classes):
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(
                    LabelledImage(
                        path=path,
                        label=label,
                        source=root.name,
                        group=groups.get(f"{folder.name}/{path.name}") or _group_of(path),
                        um_per_px=um_per_px,
                    )
                )
    if found and um_per_px == KATHER2016_UM_PER_PX and not (root / "dataset.json").is_file():
        scale = kather2016_um_per_px(found[0].path)
        found = [replace(i, um_per_px=scale) for i in found]
    if not known_folder:
        raise ValueError(f"{root} has no class folders (expected names such as TUM/ or 01_TUMOR/)")
    return found


def manifest_sha256(images: list[LabelledImage]) -> str:
    """SHA-256 over (source, relative path, label, file sha256) of every image: the data's identity."""
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: (i.source, str(i.path))):
        file_hash = hashlib.sha256(image.path.read_bytes()).hexdigest()
        line = json.dumps([image.source, image.path.parent.name + "/" + image.path.name, image.label, file_hash])
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def difference_hash(path: Path) -> int:
    """64-bit dHash of an image: near-identical tiles (re-saved, re-compressed, rescaled) share it."""
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


# dHashes at most this many bits apart are the same tile (re-saved, re-compressed, rescaled): a JPEG
# re-compression of a shared sample changes 1 bit; distinct real tiles in ../shared/data differ in
# 9 or more of 64 bits.
NEAR_DUPLICATE_BITS = 4


def leakage_groups(images: list[LabelledImage]) -> list[str]:
    """A split group per image. Images of one slide (from the file name) or with nearly the same
    dHash (near-identical tiles) share a group, so that a split never puts them on both sides."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    # Candidates share one of eight 8-bit bands: two hashes within 4 (even 7) bits always do.
    bands: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
    for image in images:
        group = f"{image.source}/{image.group}"
        find(group)
        digest = difference_hash(image.path)
        seen: set[int] = set()
        for band in range(8):
            key = (band, (digest >> (8 * band)) & 0xFF)
            for other, other_group in bands[key]:
                if other not in seen and (other ^ digest).bit_count() <= NEAR_DUPLICATE_BITS:
                    parent[find(group)] = find(other_group)
                seen.add(other)
            bands[key].append((digest, group))
    return [find(f"{i.source}/{i.group}") for i in images]
