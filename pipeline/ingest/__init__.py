"""Ingest of facility files into scan stores: readers behind one registry, conversions,
streaming copy, archives with a catalog. See `core.ingest_file` and `core.ingest_archive`.

Adding a file layout is adding a module here that calls `register_reader`.
"""

from ptyinr.ingest.catalog import read_catalog, write_catalog
from ptyinr.ingest.convert import Conversions
from ptyinr.ingest.core import (
    ArchiveReport,
    ingest_archive,
    ingest_file,
    ingest_one,
    sha256_file,
)
from ptyinr.ingest.registry import (
    READERS,
    SourceScan,
    detect_format,
    get_reader,
    load_readers,
    register_reader,
)

__all__ = [
    "READERS",
    "ArchiveReport",
    "Conversions",
    "SourceScan",
    "detect_format",
    "get_reader",
    "ingest_archive",
    "ingest_file",
    "ingest_one",
    "load_readers",
    "read_catalog",
    "register_reader",
    "sha256_file",
    "write_catalog",
]
