"""Folder-per-class datasets in the layouts of the public Kather releases.

Canonical classes are those of NCT-CRC-HE-100K. Folder names of the other releases map onto
them as documented in ``FOLDER_TO_CLASS``; folders with no canonical class (the 2016
texture set's ``03_COMPLEX``) are skipped, not guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

CANONICAL_CLASSES: tuple[str, ...] = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})

# Folder name (upper case) -> canonical class, or None for "no canonical class: skip".
# NCT-CRC-HE-100K / CRC-VAL-HE-7K use the canonical names directly.
# Kather 2016 texture set (Zenodo 53169): numbered folders.
FOLDER_TO_CLASS: dict[str, str | None] = {
    **{name: name for name in CANONICAL_CLASSES},
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
    """

    path: Path
    label: str
    source: str
    group: str


_KATHER2016_SLIDE = re.compile(r"(CRC-Prim-HE-\d+)", re.IGNORECASE)


def _group_of(path: Path) -> str:
    match = _KATHER2016_SLIDE.search(path.name)
    return match.group(1) if match else path.stem


def class_of_folder(name: str) -> str | None:
    """Canonical class for a dataset folder name, or None when it has none (skipped)."""
    return FOLDER_TO_CLASS.get(name.strip().upper())


def scan_folder(root: str | Path, classes: tuple[str, ...] | None = None) -> list[LabelledImage]:
    """List the labelled images under a folder-per-class dataset root.

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
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.strip().upper() not in FOLDER_TO_CLASS:
            continue
        known_folder = True
        label = class_of_folder(folder.name)
        if label is None or (classes is not None and label not in classes):
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(LabelledImage(path=path, label=label, source=root.name, group=_group_of(path)))
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
