"""The settings Snakemake compares to decide what reruns: each job's params, canonical (keys
sorted, whole floats as ints) and without what only says where or how fast a job runs, and the
content fingerprints of the sources, so that a touch or a re-saved config reruns nothing.
"""

from __future__ import annotations

from pathlib import Path

from imgpipe.core.files import FOLLOW_KEY
from imgpipe.core.fingerprints import FileHashCache, content_fingerprint
from imgpipe.data.boxes import is_box_annotation
from imgpipe.models.settings import NEUTRAL_DEFAULTS

# Model settings that say where and how fast a model trains, not what it learns: changing
# them neither retrains a finished model nor discards an interrupted one's resume state.
EXECUTION_KEYS = ("threads", "device")


def training_settings(model: dict) -> dict:
    """A model's settings without EXECUTION_KEYS (and NEUTRAL_DEFAULTS at their neutral value):
    what its train job's rerun trigger compares."""
    return {key: value for key, value in model.items()
            if key not in EXECUTION_KEYS and not (key in NEUTRAL_DEFAULTS and value == NEUTRAL_DEFAULTS[key])}


def canonical(value):
    """Mapping keys sorted at every level, whole-number floats as ints, lists kept in order."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


CRAWL_EXECUTION_KEYS = ("timeout_s", "time_budget_s")


def crawl_settings(config: dict, class_name: str) -> dict:
    """What a class's crawl job depends on besides its sources: limits, target, and (with a
    target) the distance within which an image does not count as new."""
    target = config["classes"][class_name]["target"]
    return canonical({
        # how long to wait changes how fast a crawl goes, not what it keeps: not a rerun trigger
        "limits": {key: value for key, value in config["crawl"].items() if key not in CRAWL_EXECUTION_KEYS},
        "target": target,
        "near_distance": config["dedupe"]["near_distance"] if target is not None else None,
        "near_pixel_difference": config["dedupe"]["near_pixel_difference"] if target is not None else None,
    })


def box_sources(sources: list[dict], cache: FileHashCache | None = None) -> list[dict]:
    """The folder sources that declare boxes, each with a fingerprint of its annotations (the
    CSV's content, or the folder's for VOC files): preprocess reruns when a box changes."""
    cache = cache if cache is not None else FileHashCache()
    found = []
    for source in sources:
        if "synthetic" in source:  # its boxes follow from its settings
            found.append(source)
        elif source.get("boxes") and "folder" in source:
            annotations = source["folder"] if source["boxes"] == "voc" else source["boxes"]
            found.append({"folder": source["folder"], "boxes": source["boxes"],
                          "fingerprint": content_fingerprint(Path(annotations), cache)})
    cache.save()
    return found


def source_fingerprints(sources: list[dict], base_dir: Path | str = ".",
                        cache: FileHashCache | None = None) -> list[str]:
    """One fingerprint per local source (folder or URL list), '' for the others.

    Used as a rule param: Snakemake reruns a class's crawl when a file in its folder (or
    its URL list) is added, removed, renamed or edited, though the config itself did not
    change; a `touch` changes nothing (see imgpipe.core.fingerprints).
    """
    cache = cache if cache is not None else FileHashCache()
    fingerprints = []
    for source in sources:
        local = source.get("folder") or source.get("urls")
        # a folder's box annotations are preprocess's input, not images: editing one crawls nothing again
        skip = (lambda path, boxes=source.get("boxes"): is_box_annotation(path, boxes)) if "boxes" in source else None
        fingerprints.append(content_fingerprint(Path(base_dir) / local, cache, skip, source.get(FOLLOW_KEY, False))
                            if local else "")
    cache.save()
    return fingerprints

