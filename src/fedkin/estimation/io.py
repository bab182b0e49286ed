"""CSV in and out for `fedkin estimate`.

Input: a header with a ``client`` column and either one ``value`` column (scalar data) or
several ``value_*`` columns (vector data), then one row per sample. Other columns are ignored;
blank lines are skipped. Every problem is a :class:`~fedkin.core.errors.DataError` naming the
file, line and column.

Output: one row per client, in order of first appearance: ``client``, ``n``, then
``estimate`` (``estimate_<name>`` for vector data) and, when the method defines one, ``sd``
columns named after what they are (``posterior_sd`` or ``std_error``), empty where undefined.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from fedkin.core.errors import DataError
from fedkin.estimation.api import EstimationResult
from fedkin.estimation.data import ClientData

EXPECTED = "expected a header 'client,value' (or 'client,value_a,value_b,…') and one row per sample"


def _value_columns(header: list[str], name: str) -> list[int]:
    exact = [i for i, h in enumerate(header) if h == "value"]
    prefixed = [i for i, h in enumerate(header) if h.startswith("value_")]
    if exact and prefixed:
        raise DataError(f"{name}: use either a 'value' column or 'value_*' columns, not both")
    if not (exact or prefixed):
        raise DataError(
            f"{name} has no 'value' column (or 'value_*' columns); found: {', '.join(header)}"
        )
    return exact or prefixed


def read_samples_csv(path: str | Path) -> ClientData:
    """Read ``client,value`` rows into per-client sufficient statistics."""
    path = Path(path)
    name = path.name
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            while header is not None and not any(h.strip() for h in header):
                header = next(reader, None)
            if header is None:
                raise DataError(f"{name} is empty: {EXPECTED}")
            header = [h.strip() for h in header]
            if "client" not in header:
                raise DataError(f"{name} has no 'client' column; found: {', '.join(header)}")
            ci = header.index("client")
            vcols = _value_columns(header, name)
            ids: dict[str, int] = {}
            index: list[int] = []
            rows: list[list[float]] = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) != len(header):
                    raise DataError(
                        f"{name} line {line}: {len(row)} fields, but the header has {len(header)}"
                    )
                client = row[ci].strip()
                if not client:
                    raise DataError(f"{name} line {line}: the 'client' field is empty")
                index.append(ids.setdefault(client, len(ids)))
                rows.append([_number(row[j], name, line, header[j]) for j in vcols])
        except csv.Error as err:
            raise DataError(f"{name} line {reader.line_num}: malformed CSV ({err})") from None
        except UnicodeDecodeError:
            raise DataError(f"{name} is not a UTF-8 text file") from None
    if not rows:
        raise DataError(f"{name} has a header but no data rows: {EXPECTED}")
    columns = tuple(header[j] for j in vcols)
    return ClientData.from_samples(
        torch.tensor(index), torch.tensor(rows, dtype=torch.float64), tuple(ids), columns
    )


def _number(cell: str, name: str, line: int, column: str) -> float:
    text = cell.strip()
    if not text:
        raise DataError(f"{name} line {line}, column '{column}': empty value")
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"{name} line {line}, column '{column}': {text!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise DataError(f"{name} line {line}, column '{column}': {text!r} is not a finite number")
    return value


def _suffixes(columns: tuple[str, ...]) -> list[str]:
    if columns == ("value",):
        return [""]
    return ["_" + c.removeprefix("value_") for c in columns]


def write_estimates_csv(path: str | Path, result: EstimationResult) -> None:
    """One row per client: ``client, n, estimate…[, sd…]`` (see module docstring)."""
    path = Path(path)
    suffixes = _suffixes(result.columns)
    header = ["client", "n", *(f"estimate{s}" for s in suffixes)]
    if result.sd is not None:
        header += [f"{result.sd_name}{s}" for s in suffixes]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for i, client in enumerate(result.clients):
                row = [client, int(result.counts[i])]
                row += [_fmt(v) for v in result.estimates[i].tolist()]
                if result.sd is not None:
                    row += [_fmt(v) for v in result.sd[i].tolist()]
                writer.writerow(row)
    except OSError as err:
        raise DataError(f"{path}: cannot write ({err.strerror})") from None


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else repr(value)
