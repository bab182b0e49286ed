r"""Clients' own data files: ``data.name=local-files``.

One file (or image folder) holds one client's samples, so a Flower SuperNode can train on the
data of its own device and nothing else. Three formats, chosen by the path:

* ``*.npz`` — arrays ``x`` (``[n, *input_shape]``, or flattened ``[n, prod(input_shape)]``)
  and ``y`` (``[n]`` integer labels); optionally ``x_test`` / ``y_test``, the client's own
  held-out split (then ``x`` / ``y`` are all training samples);
* ``*.csv`` — a header row; the column ``data.label_column`` (default ``label``) holds the
  integer labels, every other column is a feature, in file order (their number must be
  ``prod(input_shape)``);
* a directory — an image folder with one subfolder per class: a subfolder's name is its
  label (``0``, ``1``, …) or one of ``data.class_names`` (the label is its position there,
  so every node maps names to the same labels whichever classes it happens to hold).
  Images (PNG, JPEG, BMP, GIF, TIFF, WebP) are read with Pillow as grayscale (``C = 1``) or
  RGB (``C = 3``), must be ``H×W`` as ``input_shape = [C, H, W]`` says, and are scaled to
  [0, 1].

Features become float32, labels int64 in ``[0, num_classes)``. Every problem stops the load
with one :class:`~fedkin.core.errors.DataError` naming the file and what was expected: a
missing file, an unknown format, missing arrays or columns, a wrong feature dimension or image
size, a non-integer or out-of-range label, non-finite features, too few samples.

**The held-out split.** Unless the file brings its own test split, client ``c`` with ``n``
samples holds out ``n_test = round(test_fraction · n)`` of them (clamped to ``1 … n − 1``):
the rows with the ``n_test`` smallest keys ``Stream(seed).child("data").child("local-files")
.child("split").keys(c, row)``. The split is a function of (seed, client id, the file's row
count) only, so a SuperNode reading its own file and an in-process run listing every file
(``data.files``) hold out the same rows, and train on the same batches.

**Who reads what.** ``data.input_shape`` and ``data.num_classes`` give the population model's
shape, so a deployment's server builds the model from the config alone: with ``data.files``
empty it reads no data (:func:`build_local_files` returns a dataset with every client's
split empty, ``local_clients`` = none). A SuperNode started with ``--node-config
"partition-id=c data-file=PATH"`` loads only PATH, as client ``c`` (:func:`node_dataset`). An
in-process, Ray or Flower-simulation run lists one file per client in ``data.files``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from fedkin.core.errors import DataError
from fedkin.core.rng import Stream
from fedkin.data.config import _DatasetConfig
from fedkin.data.federated import FederatedDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FORMATS = "a .npz or .csv file, or an image folder (one subfolder per class)"


class LocalFilesConfig(_DatasetConfig):
    """Each client's own data file (CSV, NPZ or image folder); see
    :mod:`fedkin.data.local_files`."""

    name: Literal["local-files"] = Field("local-files", description="Dataset name.")
    num_clients: int = Field(2, gt=0, description="Number of clients (one file each).")
    input_shape: list[int] = Field(
        ...,
        min_length=1,
        description="Shape of one sample: [d] for feature vectors (CSV/NPZ), [C, H, W] for "
        "images (C = 1 grayscale or 3 RGB). With model and num_classes it fixes the "
        "population model's shape, so a deployment's server needs no data.",
    )
    num_classes: int = Field(..., ge=2, description="Number of classes; labels are 0..K-1.")
    files: list[str] | dict[int, str] = Field(
        default_factory=list,
        description="The clients' files: a list with one path per client id, or a mapping "
        "client id -> path (relative paths are made absolute against the working directory "
        "when the config is loaded). Empty in a Flower "
        "deployment, where each SuperNode names its own (--node-config data-file=PATH) and the "
        "server reads none.",
    )
    test_fraction: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of a client's samples held out for testing (by a seeded, "
        "per-client split) unless its NPZ file has x_test/y_test.",
    )
    label_column: str = Field("label", description="The CSV column holding the labels.")
    class_names: list[str] | None = Field(
        None,
        description="Image folders: the class subfolder names in label order (None: the "
        "subfolders are named by their labels, 0..num_classes-1).",
    )

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v) or len(v) not in (1, 3):
            raise ValueError(
                f"data.input_shape: must be [d] or [C, H, W] of positive sizes, got {v}"
            )
        return v

    @field_validator("files")
    @classmethod
    def _one_per_client(cls, v, info):
        n = info.data.get("num_clients")
        if n is None:
            return v
        if isinstance(v, list) and v and len(v) != n:
            raise ValueError(
                f"data.files: lists {len(v)} files for data.num_clients={n}; give one per client "
                "id (or none in a Flower deployment, where each SuperNode names its own)"
            )
        if isinstance(v, dict) and any(not 0 <= c < n for c in v):
            raise ValueError(f"data.files: client ids must be in 0..{n - 1}, got {sorted(v)}")
        # absolute from here on: config.yaml, Ray workers and simulated nodes see the same files
        if isinstance(v, dict):
            return {c: _absolute(p) for c, p in v.items()}
        return [_absolute(p) for p in v]

    @field_validator("class_names")
    @classmethod
    def _names(cls, v, info):
        k = info.data.get("num_classes")
        if v is not None and k is not None and len(v) != k:
            raise ValueError(f"data.class_names: {len(v)} names for data.num_classes={k}")
        return v


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


# ----- reading one client's file ---------------------------------------------------------------


def _labels(raw: np.ndarray, path: Path, num_classes: int, what: str = "y") -> torch.Tensor:
    raw = np.asarray(raw)
    if raw.ndim != 1:
        raise DataError(f"{path}: {what} must be one label per sample (shape [n]), got {raw.shape}")
    if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.all(raw == np.round(raw))):
        raise DataError(f"{path}: {what} must hold integer labels 0..{num_classes - 1}")
    bad = (raw < 0) | (raw >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: label {raw[i]:g} (sample {i}) is outside 0..{num_classes - 1} "
            f"(data.num_classes={num_classes})"
        )
    return torch.from_numpy(raw.astype(np.int64))


def _features(raw: np.ndarray, path: Path, shape: list[int], what: str = "x") -> torch.Tensor:
    raw = np.asarray(raw)
    size = int(np.prod(shape))
    if raw.ndim < 1 or (list(raw.shape[1:]) != shape and list(raw.shape[1:]) != [size]):
        got = list(raw.shape[1:]) if raw.ndim else "a scalar"
        raise DataError(
            f"{path}: {what} has per-sample shape {got}; expected {shape} (data.input_shape) "
            f"or {size} flattened features"
        )
    if raw.dtype.kind not in "iuf":
        raise DataError(f"{path}: {what} must be numeric, got dtype {raw.dtype}")
    x = raw.astype(np.float32).reshape(len(raw), *shape)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {what} holds NaN or infinite values")
    return torch.from_numpy(x)


def _read_npz(path: Path, cfg: LocalFilesConfig):
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    with arrays:
        missing = [k for k in ("x", "y") if k not in arrays.files]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {missing}; expected 'x' (features) and 'y' (labels), "
                f"optionally 'x_test' and 'y_test' (found {arrays.files})"
            )
        parts = [("x", "y")]
        if ("x_test" in arrays.files) != ("y_test" in arrays.files):
            raise DataError(f"{path}: 'x_test' and 'y_test' must come together")
        if "x_test" in arrays.files:
            parts.append(("x_test", "y_test"))
        out = []
        for xk, yk in parts:
            x = _features(arrays[xk], path, cfg.input_shape, xk)
            y = _labels(arrays[yk], path, cfg.num_classes, yk)
            if len(x) != len(y):
                raise DataError(f"{path}: {xk} has {len(x)} samples but {yk} has {len(y)}")
            out.append((x, y))
    return out


def _read_csv(path: Path, cfg: LocalFilesConfig):
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty CSV file; expected a header row with a "
                        f"{cfg.label_column!r} column and feature columns")  # fmt: skip
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if cfg.label_column not in header:
        raise DataError(
            f"{path}: no label column {cfg.label_column!r} (data.label_column) in the header "
            f"{header[:8]}{' …' if len(header) > 8 else ''}"
        )
    size = int(np.prod(cfg.input_shape))
    if len(header) - 1 != size:
        raise DataError(
            f"{path}: {len(header) - 1} feature columns; expected {size} "
            f"(data.input_shape={cfg.input_shape})"
        )
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i + 2} has {len(row)} fields, the header {len(header)}")
    try:
        table = np.array(body, dtype=np.float64).reshape(len(body), len(header))
    except ValueError as err:
        raise DataError(f"{path}: a value is not a number ({err})") from None
    label = header.index(cfg.label_column)
    x = np.delete(table, label, axis=1)
    y = _labels(table[:, label], path, cfg.num_classes, f"column {cfg.label_column!r}")
    return [(_features(x, path, cfg.input_shape), y)]


def _read_image_folder(path: Path, cfg: LocalFilesConfig):
    if len(cfg.input_shape) != 3 or cfg.input_shape[0] not in (1, 3):
        raise DataError(
            f"{path}: an image folder needs data.input_shape=[C, H, W] with C = 1 (grayscale) "
            f"or 3 (RGB), got {cfg.input_shape}"
        )
    from PIL import Image, UnidentifiedImageError

    c, h, w = cfg.input_shape
    names = cfg.class_names
    xs, ys = [], []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if names is not None:
            if sub.name not in names:
                raise DataError(f"{sub}: class folder not in data.class_names {names}")
            label = names.index(sub.name)
        elif sub.name.isdigit() and int(sub.name) < cfg.num_classes:
            label = int(sub.name)
        else:
            raise DataError(
                f"{sub}: class folders must be named by their label 0..{cfg.num_classes - 1} "
                "(or listed in data.class_names)"
            )
        for file in sorted(sub.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("L" if c == 1 else "RGB"))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"{file}: not a readable image ({err})") from None
            if pixels.shape[:2] != (h, w):
                raise DataError(
                    f"{file}: image is {pixels.shape[0]}x{pixels.shape[1]} (HxW); expected "
                    f"{h}x{w} (data.input_shape={cfg.input_shape})"
                )
            xs.append(pixels.reshape(h, w, c).transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(
            f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders; expected "
            "one subfolder per class"
        )
    x = torch.from_numpy(np.stack(xs).astype(np.float32) / 255.0)
    return [(x, torch.tensor(ys, dtype=torch.int64))]


def read_client_file(path: str | Path, cfg: LocalFilesConfig):
    """One client's samples: ``[(x, y)]``, or ``[(x, y), (x_test, y_test)]`` when the file
    brings its own test split; validated against ``cfg`` (see the module doc)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected {FORMATS})")
    if path.is_dir():
        return _read_image_folder(path, cfg)
    if path.suffix.lower() == ".npz":
        return _read_npz(path, cfg)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, cfg)
    raise DataError(f"{path}: unknown format {path.suffix or '(no suffix)'!r}; expected {FORMATS}")


def held_out_rows(n: int, fraction: float, client: int, stream: Stream) -> torch.Tensor:
    """Whether each of a client's ``n`` rows is held out for testing (see the module doc)."""
    n_test = min(max(round(fraction * n), 1), n - 1)
    keys = stream.keys(client, torch.arange(n))
    test = torch.zeros(n, dtype=torch.bool)
    test[torch.argsort(keys, stable=True)[:n_test]] = True
    return test


# ----- the dataset -----------------------------------------------------------------------------


def build_local_files(cfg: LocalFilesConfig, stream: Stream) -> FederatedDataset:
    """The clients of ``cfg.files`` (see the module doc); clients without a file here have
    empty splits and are not in ``local_clients``."""
    files = dict(enumerate(cfg.files)) if isinstance(cfg.files, list) else dict(cfg.files)
    empty = torch.zeros(0, dtype=torch.int64)
    xs, ys = [], []
    train, test = [empty] * cfg.num_clients, [empty] * cfg.num_clients
    offset = 0
    for client in sorted(files):
        parts = read_client_file(files[client], cfg)
        if len(parts) == 1:
            (x, y), n = parts[0], len(parts[0][1])
            if n < 2:
                raise DataError(f"{files[client]}: {n} sample(s); a client needs at least 2 "
                                "(1 train, 1 test)")  # fmt: skip
            is_test = held_out_rows(n, cfg.test_fraction, client, stream.child("split"))
        else:
            (x, y), (x_test, y_test) = parts
            for what, k in (("x", len(y)), ("x_test", len(y_test))):
                if k < 1:
                    raise DataError(f"{files[client]}: {what} is empty")
            is_test = torch.cat([torch.zeros(len(y), dtype=torch.bool),
                                 torch.ones(len(y_test), dtype=torch.bool)])  # fmt: skip
            x, y = torch.cat([x, x_test]), torch.cat([y, y_test])
        rows = torch.arange(offset, offset + len(y))
        train[client], test[client] = rows[~is_test], rows[is_test]
        xs.append(x)
        ys.append(y)
        offset += len(y)
    shape = tuple(cfg.input_shape)
    x = torch.cat(xs) if xs else torch.zeros((0, *shape))
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
    return FederatedDataset.from_parts(
        "local-files",
        x,
        y,
        cfg.num_classes,
        train,
        test,
        image_shape=shape if len(shape) == 3 else None,
        local_clients=None
        if len(files) == cfg.num_clients
        else torch.tensor(sorted(files), dtype=torch.int64),
    )


def node_dataset(cfg: LocalFilesConfig, seed: int, client: int, path: str) -> FederatedDataset:
    """What a SuperNode holds: client ``client``'s samples from ``path`` only (split and
    validation rows exactly as an in-process run listing that file for that client)."""
    from fedkin.data import build_dataset

    return build_dataset(cfg.model_copy(update={"files": {client: path}}), seed)
