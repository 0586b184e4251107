"""sd-scripts' `cache_info` (`--cache_info`, or the subset key): a DreamBooth folder's image sizes and
captions kept in `<image_dir>/metadata_cache.json`, so that a large dataset starts without reading
every image again.

The file is sd-scripts' (`{"<image path>": {"caption": ..., "resolution": [width, height]}}`), so
either trainer reads what the other wrote; ours adds each image's `file_stamp` (bytes, modification
time in ns). Two differences, so that the cache never trains on stale facts: an entry is used only
while its image still has the stamp it was written with (an entry without one, as sd-scripts writes
them, is read again once and stamped), and captions are always read from their files (sd-scripts
trains on the cached captions even after a caption file is edited). A cached image is not decoded
to check it can be read: it was checked when its entry was written. Entries are matched by file
name, so a folder reached by another path (or written by sd-scripts from another working folder)
keeps its cache.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from library.data.folder_dataset import ImageItem

logger = logging.getLogger(__name__)

CACHE_FILE = "metadata_cache.json"  # sd-scripts' IMAGE_INFO_CACHE_FILE


def file_stamp(path: Path) -> list[int]:
    """[bytes, modification time in ns]: changes whenever the image file is rewritten."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def cached_sizes(folder: Path) -> dict[Path, tuple[int, int]]:
    """(width, height) of the images of `folder` whose cache entry still holds; {} without a usable file."""
    cache = folder / CACHE_FILE
    if not cache.is_file():
        logger.info("cache_info: no %s yet; it is written after this scan", cache)
        return {}
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        logger.warning("cache_info: %s cannot be read (%s); the images are read again and it is rewritten",
                       cache, error)
        return {}
    sizes = {}
    for key, entry in entries.items():
        path = folder / Path(key).name
        if _holds(entry, path):
            sizes[path] = (int(entry["resolution"][0]), int(entry["resolution"][1]))
    return sizes


def _holds(entry: object, path: Path) -> bool:
    if not isinstance(entry, dict) or not path.is_file():
        return False
    resolution, stamp = entry.get("resolution"), entry.get("file_stamp")
    return isinstance(resolution, list) and len(resolution) == 2 and stamp == file_stamp(path)


def write_cache(folder: Path, items: list[ImageItem], sizes: dict[Path, tuple[int, int]]) -> None:
    """Write `folder`'s cache for `items` (its images, their sizes in `sizes`), replacing the old file
    in one step (several processes may write the same content); a folder that cannot be written to
    only costs the speed-up."""
    entries = {
        str(item.path): {"caption": item.caption, "resolution": list(sizes[item.path]),
                         "file_stamp": file_stamp(item.path)}
        for item in sorted(items, key=lambda item: item.path) if item.path in sizes
    }
    cache = folder / CACHE_FILE
    temporary = folder / f".{CACHE_FILE}.{os.getpid()}.tmp"
    try:
        temporary.write_text(json.dumps(entries, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(temporary, cache)
    except OSError as error:
        logger.warning("cache_info: %s cannot be written (%s); the next run reads the images again", cache, error)
        temporary.unlink(missing_ok=True)
