"""Contact sheets, and the audit columns of the dedupe manifest they are drawn from."""

import pandas as pd
from crawl_server import distinct_jpeg
from PIL import Image

from imgpipe.data.dedupe import decide_fates
from imgpipe.data.review import write_contact_sheet


def raw_rows(tmp_path):
    """A crawl manifest of two classes: a kept image, its copy, an image in both classes, a failure."""
    files = {}
    for name, seed in (("cat_a.jpg", 1), ("cat_b.jpg", 2), ("dog_a.jpg", 3)):
        files[name] = tmp_path / name
        files[name].write_bytes(distinct_jpeg(seed))
    (tmp_path / "cat_copy.jpg").write_bytes(distinct_jpeg(1))
    (tmp_path / "dog_shared.jpg").write_bytes(distinct_jpeg(2))
    rows = [
        ("cat_a.jpg", "cat", "http://x/a.jpg", "sha-a", "ok", ""),
        ("cat_copy.jpg", "cat", "http://x/copy.jpg", "sha-a", "ok", ""),
        ("cat_b.jpg", "cat", "http://x/b.jpg", "sha-b", "ok", ""),
        ("", "cat", "http://x/gone.jpg", "", "failed", "HTTP 404 Not Found"),
        ("dog_a.jpg", "dog", "http://y/a.jpg", "sha-d", "ok", ""),
        ("dog_shared.jpg", "dog", "http://y/shared.jpg", "sha-b", "ok", ""),
    ]
    raw = pd.DataFrame(rows, columns=["file", "class", "origin", "sha256", "status", "reason"])
    raw["file"] = [str(tmp_path / f) if f else "" for f in raw["file"]]
    raw["source"], raw["query"] = "urls", ""
    return raw


def test_fates_carry_origin_detail_and_the_exclusion_entry(tmp_path):
    raw = raw_rows(tmp_path)
    hashes = {"sha-a": 1, "sha-b": 2**40, "sha-d": 2**50 + 7}
    fates = decide_fates(raw, hashes, near_distance=0, exclude=["http://y/a.jpg"])
    assert list(fates["origin"]) == list(raw["origin"])
    assert list(fates["reason"]) == ["", "exact_duplicate", "cross_class_exact", "failed", "excluded",
                                     "cross_class_exact"]
    assert fates["detail"][3] == "HTTP 404 Not Found"
    assert fates["detail"][4] == "excluded by hand: http://y/a.jpg"


def test_contact_sheet_links_duplicates_and_shows_exclusion_comments(tmp_path):
    raw = raw_rows(tmp_path)
    fates = decide_fates(raw, {"sha-a": 1, "sha-b": 2**40, "sha-d": 2**50 + 7}, near_distance=0,
                         exclude=["http://y/a.jpg"])
    counts = write_contact_sheet(fates, "cat", tmp_path / "cat.html", tmp_path / "cat.png")
    assert counts == {"kept": 1, "exact_duplicate": 1, "cross_class_exact": 1}
    page = (tmp_path / "cat.html").read_text()
    # kept first; the copy links to the kept tile; the cross-class copy to the dog sheet's tile
    assert page.index("cat_a.jpg") < page.index("cat_b.jpg") < page.index("cat_copy.jpg")  # reasons in rule order
    assert 'of <a href="#t0">cat_a.jpg</a> (distance 0)' in page
    assert 'of <a href="dog.html#t1">dog_shared.jpg in dog</a>' in page
    assert "http://x/gone.jpg</td><td>failed</td><td>HTTP 404 Not Found" in page
    assert page.count("data:image/jpeg;base64,") == 3  # self-contained
    with Image.open(tmp_path / "cat.png") as grid:
        assert grid.width > 500 and grid.height > 80

    write_contact_sheet(fates, "dog", tmp_path / "dog.html", tmp_path / "dog.png",
                        exclude_comments={"http://y/a.jpg": "a cat in a dog costume"})
    dog = (tmp_path / "dog.html").read_text()
    assert 'id="t1" style="border-color:#1565c0" title="http://y/shared.jpg"' in dog and "excluded by hand: a cat in a dog costume" in dog
