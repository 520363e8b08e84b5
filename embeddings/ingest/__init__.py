"""Ingest: a dataset description -> blocks of image and caption records with stable ids.

Supported inputs (``format="auto"`` picks by path):

- a manifest table (``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``) with columns
  ``image`` (path relative to the root), ``caption`` or ``captions``, ``label`` and/or
  ``labels`` (list, or ``|``-separated in CSV), optional ``split`` and ``id``.  Contiguous
  rows that share an image (or an explicit id) are one image with several captions;
- an image folder ``ROOT/<class>/<file>`` (or ``ROOT/<split>/<class>/<file>``);
- COCO-captions JSON (``images`` + ``annotations``) and Karpathy-split JSON
  (``images[*].sentences``), one image with several captions;
- webdataset tar shards (img2dataset's output, with its sidecar parquet), local or remote:
  :mod:`.webdataset`, one block per shard.

Images are read through an image source (:mod:`embeddings.sources`): files under the
root, objects under a remote root, or the tar shards' members.

:func:`open_dataset` + :meth:`Source.blocks` stream a manifest of any size in bounded
memory; :func:`load_dataset` materialises it.  Problems in rows become :class:`Reject`
entries with a short reason class; problems with the file itself (missing, empty, not
UTF-8, unreadable) raise :class:`~embeddings.errors.UserError` subclasses.
"""

from .normalise import CAPTION_KEYS, IMAGE_KEYS, LABEL_SEP
from .readers import FORMATS, IMAGE_EXTS, SPLITS, detect_format
from .records import (
    CAPTION_SCHEMA,
    IMAGE_SCHEMA,
    MAX_CAPTION_CHARS,
    Block,
    CaptionRecord,
    Dataset,
    ImageRecord,
    IngestStats,
    Reject,
)
from .source import Source, load_dataset, open_dataset
from .webdataset import Fields, TarDataset

__all__ = [
    "CAPTION_KEYS", "CAPTION_SCHEMA", "FORMATS", "IMAGE_EXTS", "IMAGE_KEYS", "IMAGE_SCHEMA",
    "LABEL_SEP", "MAX_CAPTION_CHARS", "SPLITS", "Block", "CaptionRecord", "Dataset",
    "Fields", "ImageRecord", "IngestStats", "Reject", "Source", "TarDataset", "detect_format",
    "load_dataset", "open_dataset",
]
