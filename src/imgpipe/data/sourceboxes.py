"""The boxes a class's sources give: box files beside folder sources (a CSV or VOC XML) and
the exact boxes of synthetic sources, keyed as the crawl records each image's origin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgpipe.core.files import FOLLOW_KEY, walk_files
from imgpipe.data import synthetic
from imgpipe.data.boxes import VOC, Box, BoxError, box_key, read_box_csv, read_voc_box


@dataclass
class SourceBoxes:
    """A class's boxes by box_key, the images whose box could not be read (key -> the problem,
    naming file and line), and the problems that name no image."""

    boxes: dict[str, tuple[Box, str]]
    invalid: dict[str, str]
    problems: list[str]


def source_boxes(sources: list[dict]) -> SourceBoxes:
    """The boxes a class's sources give: folder sources that declare them (`boxes`: a CSV or
    'voc'; a CSV's `file` is relative to the folder, or absolute) and synthetic ones (exact)."""
    found = SourceBoxes({}, {}, [])
    for source in sources:
        if "synthetic" in source:
            found.boxes.update(synthetic.boxes(source))
            continue
        declared = source.get("boxes")
        if not declared or "folder" not in source:
            continue
        folder = Path(source["folder"])
        if declared == VOC:
            for path in walk_files(folder, source.get(FOLLOW_KEY, False)):
                annotation = path.with_suffix(".xml")
                if path.suffix.lower() == ".xml" or not annotation.is_file():
                    continue  # an image without an XML file is reported as missing when preprocessed
                try:
                    found.boxes[box_key(str(path))] = (read_voc_box(annotation), str(annotation))
                except BoxError as error:
                    found.invalid[box_key(str(path))] = str(error)
            continue
        rows, problems = read_box_csv(declared)
        for name, problem in problems:
            if name is None:
                found.problems.append(problem)
            else:
                found.invalid[box_key(str(folder / name))] = problem
        for name, (box, where) in rows.items():
            key = box_key(str(folder / name))  # an absolute name stays itself
            if key in found.boxes:
                found.problems.append(f"{where}: a second box for {key} (first at {found.boxes[key][1]}); one box "
                                      f"per image")
                continue
            found.boxes[key] = (box, where)
    return found
