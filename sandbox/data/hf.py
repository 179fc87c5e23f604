"""HF `datasets` as a corpus (data.source=hf), from local copies only.

Two sources, one text column (`data.hf_field`) each:
- `data.hf_name`: a folder written by `Dataset.save_to_disk` or
  `DatasetDict.save_to_disk` (read with `load_from_disk`; of a DatasetDict,
  the split `data.hf_split`);
- `data.paths`: JSON (lines or array), CSV, Parquet or text files, read by the
  packaged builder `data.hf_format` names (`auto`: from the suffix) through
  `data_files`. A text file is one document (`sample_by="document"`), so its
  newlines survive.
Each record's text is followed by a blank line ("\n\n") to mark where one
document ends and the next begins.

Nothing is downloaded at run time: a name that is not a local folder (a hub
name) is refused at once in one line that says how to make a local copy,
rather than spending half a minute in `huggingface_hub`'s retries when there
is no network and fetching an unpinned copy when there is. A local corpus is
keyed for the caches by its files' names, sizes and mtimes, so a token cache
hit never opens the dataset at all. Importing `datasets` costs most of a
second, so the pipeline imports this module only when data.source=hf.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import datasets

from sandbox.data import builtin
from sandbox.data.text import Corpus, _check_file, file_key
from sandbox.errors import UserError

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SEPARATOR = "\n\n"


def hf_corpus(d) -> Corpus:
    """The corpus data.source=hf describes (`d` is the config's DataConfig)."""
    if d.paths:
        return _files_corpus(d)
    folder = Path(d.hf_name).expanduser()
    if folder.is_dir():
        return _disk_corpus(folder, d)
    if folder.exists() or d.hf_name.startswith((".", "/", "~")):
        raise UserError(f"data.hf_name: {d.hf_name}: folder not found (expected a save_to_disk folder)")
    raise UserError(
        f"data.hf_name: {d.hf_name!r} is not a local folder, and the sandbox does not download data at run "
        f"time: save a copy once (python -c \"import datasets; datasets.load_dataset('{d.hf_name}')"
        f".save_to_disk('DIR')\") and set data.hf_name=DIR, or set data.paths to local JSON/CSV/Parquet/text files")


def _format(files: list[Path], hf_format: str) -> str:
    if hf_format != "auto":
        return hf_format
    formats = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in formats or len(formats) > 1:
        odd = next((f for f in files if f.suffix.lower() not in FORMATS), files[0])
        raise UserError(f"data.hf_format: cannot tell the format of {odd} from its suffix among "
                        f"{', '.join(str(f) for f in files)} (set data.hf_format to one of: json, csv, parquet, text)")
    return formats.pop()


def _files_corpus(d) -> Corpus:
    files = [builtin.resolve(p) for p in d.paths]
    for f in files:
        _check_file(f)
    fmt = _format(files, d.hf_format)

    def read() -> bytes:
        options = {"sample_by": "document"} if fmt == "text" else {}
        with _local_only():
            try:
                ds = datasets.load_dataset(fmt, data_files=[str(f.resolve()) for f in files], split="train",
                                           cache_dir=str(Path(d.cache_dir) / "hf"), **options)
            except Exception as e:  # the builders' many parse errors  # noqa: BLE001
                raise UserError(f"data.paths: cannot read {', '.join(map(str, files))} as {fmt} "
                                f"({e.__class__.__name__}: {_first_line(e)})") from None
        return _joined(ds, d.hf_field, "data.paths")

    return Corpus("data.paths", ("hf-files", fmt, d.hf_field, *file_key(files)), read)


def _disk_corpus(folder: Path, d) -> Corpus:
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    def read() -> bytes:
        with _local_only():
            try:
                ds = datasets.load_from_disk(str(folder))
            except Exception as e:  # noqa: BLE001
                raise UserError(f"data.hf_name: {folder}: not a save_to_disk folder ({e.__class__.__name__}: "
                                f"{_first_line(e)}); for data files set data.paths") from None
        if isinstance(ds, datasets.DatasetDict):
            if d.hf_split not in ds:
                raise UserError(f"data.hf_split: {d.hf_split!r} is not a split of {folder} "
                                f"(splits: {', '.join(sorted(ds))})")
            ds = ds[d.hf_split]
        return _joined(ds, d.hf_field, "data.hf_name")

    return Corpus("data.hf_name", ("hf-disk", d.hf_split, d.hf_field, *file_key(files)), read)


def _joined(ds, field: str, what: str) -> bytes:
    if field not in ds.column_names:
        raise UserError(f"data.hf_field: {field!r} is not a column of {what} (columns: {ds.column_names})")
    parts = []
    for i, text in enumerate(ds[field]):
        if text is None:  # an empty CSV cell: no document
            continue
        if not isinstance(text, str):
            raise UserError(f"data.hf_field: {field!r} holds {type(text).__name__} values (record {i}), not text")
        parts.append(text + SEPARATOR)
    return "".join(parts).encode("utf-8")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


@contextlib.contextmanager
def _local_only():
    """datasets' progress bars and info logs off while it reads local files (restored after)."""
    bars = datasets.utils.logging.is_progress_bar_enabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
