"""Data: load and normalise rows, write them, format prompts, the noise manifest, built-in datasets.

Submodules: ``loading`` (:func:`load_rows`), ``writing`` (:func:`write_rows`), ``formatting``
(Alpaca prompts), ``manifest`` (noise ground truth), ``builtin`` (synthetic datasets), ``hub``
(Hub cache), ``columns`` (column mapping shared by the CLI commands).
"""

from infscope.data.builtin import BUILTIN_DATASETS, BuiltinSplit, make_builtin
from infscope.data.columns import ColumnMap, column_map_from_options
from infscope.data.formatting import add_text_column, format_prompt, format_text
from infscope.data.loading import LoadedData, load_rows
from infscope.data.manifest import MANIFEST_FIELDS, read_manifest, write_manifest
from infscope.data.writing import write_rows

__all__ = [
    "BUILTIN_DATASETS",
    "MANIFEST_FIELDS",
    "BuiltinSplit",
    "ColumnMap",
    "LoadedData",
    "add_text_column",
    "column_map_from_options",
    "format_prompt",
    "format_text",
    "load_rows",
    "make_builtin",
    "read_manifest",
    "write_manifest",
    "write_rows",
]
