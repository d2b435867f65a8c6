"""Tests of imgpipe.data.dedupe: perceptual hashing, Hamming pair search, and the fate rules."""

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance
from sklearn.datasets import load_sample_images

from imgpipe.config.schema import load_schema
from imgpipe.config.validation import read_exclude_list
from imgpipe.data.crawlstore import CrawlLimits, TargetCounter
from imgpipe.data.dedupe import (
    decide_fates,
    dedupe_images,
    located_exclusions,
    near_duplicate_warnings,
    summarize_fates,
)
from imgpipe.data.hamming import (
    choose_hamming_method,
    group_pairs,
    hamming_pairs,
    hamming_pairs_brute_force,
    hamming_pairs_multi_index,
    owner_pairs,
)
from imgpipe.data.hashing import format_hash, hash_distance, hash_images, perceptual_hashes
from imgpipe.data.lowtexture import SHAPES, distinct, low_texture_set, write_images, write_low_texture_set
from imgpipe.data.nearmatch import DEFAULT_PIXEL_DIFFERENCE, MAX_CHROMA_DIFFERENCE, PixelCheck, confirm

SCHEMA = Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class PixelsAgree(PixelCheck):
    """For rules tested on made-up hashes of files that do not exist: every candidate's pixels
    agree, so the hashes alone decide (the pixel test has tests of its own)."""

    def differences(self, first_files, first_regions, second_files, second_regions):
        return np.zeros(len(first_files), dtype=np.float32)

    chroma_differences = differences


AGREE = PixelsAgree()


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def whole_hash(path) -> int:
    return perceptual_hashes(path).whole


def cropped(image: Image.Image, fraction: float) -> Image.Image:
    """`image` with `fraction` of its width and height cut from each side."""
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


@pytest.fixture(scope="module")
def photos():
    """The two photos scikit-learn ships (427x640 RGB)."""
    return [Image.fromarray(array) for array in load_sample_images().images]


def manifest(*rows):
    """A crawl manifest from (file, class, sha256[, status[, origin]]) tuples."""
    records = []
    for index, (file, cls, sha, *rest) in enumerate(rows):
        status = rest[0] if rest else "ok"
        origin = rest[1] if len(rest) > 1 else f"https://example.org/{file}"
        records.append(
            {
                "file": file,
                "class": cls,
                "source": "bing",
                "source_index": 0,
                "query": cls,
                "origin": origin,
                "sha256": sha if status == "ok" else "",
                "status": status,
                "reason": "" if status == "ok" else "broken",
                "width": 10,
                "height": 10,
                "format": "JPEG",
                "index": index,
            }
        )
    return pd.DataFrame(records).drop(columns="index")


def fate(fates, file):
    return fates.set_index("file").loc[file]


# ----------------------------------------------------------------- perceptual hash


def test_phash_survives_reencoding_and_resizing_but_tells_photos_apart(tmp_path, photos):
    china, flower = photos
    china.save(tmp_path / "china.png")
    china.save(tmp_path / "china_q30.jpg", quality=30)
    china.resize((160, 107), Image.Resampling.BILINEAR).save(tmp_path / "china_small.jpg", quality=75)
    flower.save(tmp_path / "flower.jpg", quality=90)
    original = whole_hash(tmp_path / "china.png")

    assert distance(original, whole_hash(tmp_path / "china_q30.jpg")) <= 4
    assert distance(original, whole_hash(tmp_path / "china_small.jpg")) <= 4
    assert distance(original, whole_hash(tmp_path / "flower.jpg")) >= 20


def test_phash_applies_exif_orientation(tmp_path, photos):
    china = photos[0]
    china.save(tmp_path / "upright.jpg", quality=90)
    # Stored rotated, with the tag that tells viewers to rotate it back upright.
    stored = china.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", quality=90, exif=exif)
    stored.save(tmp_path / "rotated.jpg", quality=90)
    upright = whole_hash(tmp_path / "upright.jpg")

    assert distance(upright, whole_hash(tmp_path / "tagged.jpg")) <= 2
    assert distance(upright, whole_hash(tmp_path / "rotated.jpg")) >= 16


def test_phash_reads_16_bit_and_palette_images_without_clipping(tmp_path, photos):
    gray = photos[0].convert("L")
    gray.save(tmp_path / "gray.png")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    photos[0].convert("P").save(tmp_path / "palette.png")
    reference = whole_hash(tmp_path / "gray.png")

    assert distance(reference, whole_hash(tmp_path / "gray16.png")) <= 2
    assert distance(reference, whole_hash(tmp_path / "palette.png")) <= 4


def test_phash_of_flat_image_is_only_the_dc_bit(tmp_path):
    Image.new("RGB", (50, 30), (120, 130, 140)).save(tmp_path / "flat.png")

    assert perceptual_hashes(tmp_path / "flat.png") == (1 << 63, 1 << 63)
    assert format_hash(1 << 63) == "8000000000000000"
    assert format_hash(5) == "0000000000000005"


def test_center_hash_brings_a_cropped_copy_within_reach(tmp_path, photos):
    """pHash of the whole picture moves ~10 bits for a 5%-per-side crop (the default
    near_distance); the crop is the original's center, which the center hash covers."""
    for k, photo in enumerate(photos):
        photo.save(tmp_path / f"photo{k}.jpg", quality=90)
        cropped(photo, 0.05).save(tmp_path / f"crop{k}.jpg", quality=85)
        original, crop = perceptual_hashes(tmp_path / f"photo{k}.jpg"), perceptual_hashes(tmp_path / f"crop{k}.jpg")

        assert distance(original.whole, crop.whole) >= 8
        assert distance(original.center, crop.whole) <= 4
        assert hash_distance(original, crop) == min(distance(a, b) for a in original for b in crop) <= 4
    other = perceptual_hashes(tmp_path / "photo1.jpg")
    assert hash_distance(perceptual_hashes(tmp_path / "photo0.jpg"), other) >= 20


# ------------------------------------------------------------------ Hamming search


def test_owner_pairs_pair_owners_by_their_nearest_hashes():
    rng = np.random.default_rng(3)
    owners = np.sort(rng.integers(0, 150, 400))
    hashes = rng.integers(0, 2**64, size=400, dtype=np.uint64)
    hashes[::7] = hashes[::7] & ~np.uint64(0xFFFF)  # crowded low bits: many pairs
    by_owner: dict[int, list[int]] = {}
    for owner, value in zip(owners.tolist(), hashes.tolist()):
        by_owner.setdefault(owner, []).append(value)
    expected = sorted(
        [a, b, hash_distance(by_owner[a], by_owner[b])]
        for a, b in itertools.combinations(sorted(by_owner), 2)
        if hash_distance(by_owner[a], by_owner[b]) <= 20
    )

    assert expected and owner_pairs(hashes, owners, 20).tolist() == expected
    with pytest.raises(ValueError, match="3 owners for 2 hashes"):
        owner_pairs([1, 2], [0, 0, 1], 3)


def all_pairs(hashes):
    return [
        (i, j, distance(int(a), int(b))) for (i, a), (j, b) in itertools.combinations(enumerate(hashes), 2)
    ]


def planted_hashes(seed, n_random=200, n_planted=80):
    """Random hashes, near copies of some of them (0-12 bits flipped), exact repeats."""
    rng = np.random.default_rng(seed)
    base = [int(x) for x in rng.integers(0, 2**64, size=n_random, dtype=np.uint64)]
    planted = []
    for _ in range(n_planted):
        value = base[rng.integers(n_random)]
        for bit in rng.choice(64, size=rng.integers(0, 13), replace=False):
            value ^= 1 << int(bit)
        planted.append(value)
    hashes = base + planted + base[:3]
    rng.shuffle(hashes)
    return np.array(hashes, dtype=np.uint64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hamming_pairs_equal_brute_force(seed):
    hashes = planted_hashes(seed)
    pairs = all_pairs(hashes)
    for max_distance in [0, 1, 2, 5, 8, 10, 13, 24]:
        expected = [pair for pair in pairs if pair[2] <= max_distance]
        # Per-chunk radius 0, 1 and 2.
        chunk_counts = {max(1, (max_distance + 1) // k) for k in (1, 2, 3)}
        results = {
            "auto": hamming_pairs(hashes, max_distance),
            "brute force": hamming_pairs_brute_force(hashes, max_distance),
        }
        results |= {m: hamming_pairs_multi_index(hashes, max_distance, m) for m in chunk_counts}
        for method, got in results.items():
            assert got.dtype == np.int64 and got.shape[1] == 3
            assert [tuple(map(int, row)) for row in got] == expected, (method, max_distance)
        assert expected or max_distance == 0


def test_hamming_pairs_distance_zero_finds_only_identical_hashes():
    hashes = np.array([5, 4, 5, 7, 5], dtype=np.uint64)

    assert hamming_pairs(hashes, 0).tolist() == [[0, 2, 0], [0, 4, 0], [2, 4, 0]]
    assert hamming_pairs(hashes, 1).tolist() == [
        [0, 1, 1],
        [0, 2, 0],
        [0, 3, 1],
        [0, 4, 0],
        [1, 2, 1],
        [1, 4, 1],
        [2, 3, 1],
        [2, 4, 0],
        [3, 4, 1],
    ]


def test_hamming_pairs_edge_cases():
    assert hamming_pairs(np.array([], dtype=np.uint64), 3).shape == (0, 3)
    assert hamming_pairs([2**64 - 1], 3).shape == (0, 3)
    assert hamming_pairs([0, 2**64 - 1], 64).tolist() == [[0, 1, 64]]
    with pytest.raises(ValueError, match="max_distance"):
        hamming_pairs([1, 2], -1)


def test_method_choice_follows_the_cost_model():
    assert choose_hamming_method(100_000, 0) == 1  # one chunk: equal hashes
    assert choose_hamming_method(100_000, 10) not in (None, 11)  # beats pigeonhole with r=0
    assert choose_hamming_method(100_000, 40) is None  # brute force


def planted_near_pairs(seed, n=4000, n_planted=400, max_flips=12):
    """Random hashes; near copies (0..max_flips bits, half of them within a 20-bit window,
    so that some pairs are near on one chunk only); exact repeats; and a crowd that shares
    its low 40 bits, so that many hashes share each chunk value."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    ends = rng.choice(n, 2 * n_planted, replace=False)
    for k, (source, target) in enumerate(zip(ends[:n_planted], ends[n_planted:])):
        window = int(rng.integers(0, 45)) + np.arange(20) if k % 2 else np.arange(64)
        flips = rng.choice(window, size=rng.integers(0, max_flips + 1), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(b) for b in flips))
    hashes[:40] = hashes[40:80]
    crowd = rng.choice(n, 300, replace=False)
    low = np.uint64((1 << 40) - 1)
    hashes[crowd] = (hashes[crowd] & ~low) | (hashes[crowd[0]] & low)
    return hashes


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_search_equals_brute_force_on_planted_pairs(seed):
    hashes = planted_near_pairs(seed)
    everything = hamming_pairs_brute_force(hashes, 12)
    for max_distance in [0, 1, 3, 5, 8, 10, 12]:
        expected = everything[everything[:, 2] <= max_distance]
        chosen = choose_hamming_method(len(hashes), max_distance)
        # Chunk radii 0..3, in dense tables (up to 24 bits) and by sorted lookups (wider).
        chunk_counts = {3, 4, max_distance + 1, chosen or 4} | ({2} if max_distance <= 3 else set())
        results = {"auto": hamming_pairs(hashes, max_distance)}
        results |= {m: hamming_pairs_multi_index(hashes, max_distance, m) for m in chunk_counts}
        for method, got in results.items():
            assert np.array_equal(got, expected), (method, max_distance)
        assert len(expected) > 40 * (max_distance > 0)
    assert choose_hamming_method(len(hashes), 6) is not None  # "auto" searched by chunks


# ----------------------------------------------------------------------- the rules


def test_unusable_rows_are_carried_through_with_their_reason():
    raw = manifest(("a.jpg", "cat", "s1"), ("b.jpg", "cat", "", "corrupt"), ("c.jpg", "dog", "", "failed"))
    fates = decide_fates(raw, {"s1": 1}, near_distance=4, check=AGREE)

    assert fates["file"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert fates["status"].tolist() == ["kept", "dropped", "dropped"]
    assert fates["reason"].tolist() == ["", "corrupt", "failed"]
    assert fates["phash"].tolist() == ["0000000000000001", "", ""]
    assert fates["group"].tolist() == ["a.jpg", "", ""]
    assert fates["distance"].isna().all()


def test_exclude_by_sha_path_and_origin_drops_every_copy():
    sha_a, sha_b = "a" * 64, "b" * 64
    raw = manifest(
        ("data/x.jpg", "cat", sha_a),
        ("data/x_copy.jpg", "cat", sha_a),
        ("data/y.jpg", "cat", sha_b),
        ("data/z.jpg", "dog", "s3", "ok", "https://bad.example/z.jpg#frag"),
        ("data/w.jpg", "dog", "s4"),
    )
    phashes = {sha_a: 1, sha_b: 2**40, "s3": 2**50, "s4": 2**60}
    fates = decide_fates(
        raw, phashes, 0, exclude={sha_a.upper(), "./data/y.jpg", "https://bad.example/z.jpg#frag"}
    )

    assert fates["reason"].tolist() == ["excluded"] * 4 + [""]
    assert decide_fates(raw, phashes, 0, exclude={"data/x_copy.jpg"}, check=AGREE)["reason"].tolist()[:2] == [
        "excluded",
        "excluded",
    ]


def test_cross_class_exact_copy_is_dropped_from_both_classes():
    raw = manifest(("cat1", "cat", "s1"), ("cat2", "cat", "s1"), ("dog1", "dog", "s1"), ("dog2", "dog", "s2"))
    fates = decide_fates(raw, {"s1": 0, "s2": 2**63 - 1}, near_distance=0)

    assert fates["reason"].tolist() == ["cross_class_exact"] * 3 + [""]
    assert fates["duplicate_of"].tolist() == ["dog1", "dog1", "cat1", ""]
    assert fates["distance"].tolist()[:3] == [0, 0, 0]


def test_cross_class_near_copy_is_dropped_from_both_classes():
    raw = manifest(("cat1", "cat", "s1"), ("dog1", "dog", "s2"), ("dog2", "dog", "s3"), ("cat2", "cat", "s4"))
    phashes = {"s1": 0b0000, "s2": 0b0111, "s3": 0b1111 << 20, "s4": 0xFF << 40}
    near = decide_fates(raw, phashes, near_distance=3, check=AGREE)
    exact_only = decide_fates(raw, phashes, near_distance=0)
    below = decide_fates(raw, phashes, near_distance=2, check=AGREE)

    assert near["reason"].tolist() == ["cross_class_near", "cross_class_near", "", ""]
    assert near["duplicate_of"].tolist() == ["dog1", "cat1", "", ""]
    assert near["distance"].tolist()[:2] == [3, 3]
    assert (exact_only["status"] == "kept").all()
    assert (below["status"] == "kept").all()


def test_exact_duplicates_within_a_class_keep_the_first():
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s2"), ("c", "cat", "s1"), ("d", "cat", "S1"))
    fates = decide_fates(raw, {"s1": 0, "s2": 2**64 - 1}, near_distance=4, check=AGREE)

    assert fates["reason"].tolist() == ["", "", "exact_duplicate", "exact_duplicate"]
    assert fates["duplicate_of"].tolist() == ["", "", "a", "a"]
    assert fates["distance"].tolist()[2:] == [0, 0]


def test_near_drop_is_greedy_in_manifest_order():
    # a-b and b-c are within 2 bits, a-c is not: b goes, so c has no kept neighbour.
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s2"), ("c", "cat", "s3"), ("d", "cat", "s4"))
    phashes = {"s1": 0b0000, "s2": 0b0011, "s3": 0b1111, "s4": 0b0001}
    fates = decide_fates(raw, phashes, near_distance=2, near_action="drop", check=AGREE)

    assert fates["reason"].tolist() == ["", "near_duplicate", "", "near_duplicate"]
    assert fates["duplicate_of"].tolist() == ["", "a", "", "a"]
    assert fates["distance"].tolist()[1] == 2 and fates["distance"].tolist()[3] == 1
    assert fates["group"].tolist() == ["a", "", "c", ""]


def test_images_with_several_hashes_are_as_near_as_their_nearest_hashes():
    # (whole, center): b's whole picture is near a's center (b is a crop of a); c and d (two
    # classes) are near by their centers only.
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s2"), ("c", "cat", "s3"), ("d", "dog", "s4"))
    phashes = {"s1": (0xFF << 8, 0xF), "s2": (0b0111, 0xFF << 40), "s3": (0xFF << 20, 0xFF << 30),
               "s4": (0xFF << 50, 0xFF << 31)}
    fates = decide_fates(raw, phashes, near_distance=2, check=AGREE)

    assert fates["reason"].tolist() == ["", "near_duplicate", "cross_class_near", "cross_class_near"]
    assert fates["duplicate_of"].tolist() == ["", "a", "d", "c"]
    assert fates["distance"].tolist() == [pd.NA, 1, 2, 2]
    assert fates[["phash", "phash_center"]].iloc[1].tolist() == ["0000000000000007", "0000ff0000000000"]


def test_near_drop_leaves_kept_images_pairwise_apart():
    hashes = planted_hashes(seed=5, n_random=60, n_planted=120)
    rows = [(f"f{i}", "cls", f"s{i}") for i in range(len(hashes))]
    phashes = {f"s{i}": int(h) for i, h in enumerate(hashes)}
    fates = decide_fates(manifest(*rows), phashes, near_distance=6, check=AGREE)
    kept = [int(hashes[i]) for i in np.nonzero(fates["status"] == "kept")[0]]

    assert 0 < fates["reason"].eq("near_duplicate").sum() < len(hashes) - 60
    assert min(distance(a, b) for a, b in itertools.combinations(kept, 2)) > 6
    for _, row in fates[fates["reason"] == "near_duplicate"].iterrows():
        assert fate(fates, row["duplicate_of"])["status"] == "kept"


def test_near_group_keeps_all_and_links_components():
    raw = manifest(
        ("a", "cat", "s1"), ("x", "cat", "s5"), ("b", "cat", "s2"), ("c", "cat", "s3"), ("dog", "dog", "s6")
    )
    phashes = {"s1": 0b0000, "s2": 0b0011, "s3": 0b1111, "s5": 0xFF << 30, "s6": 0b1111 << 50}
    fates = decide_fates(raw, phashes, near_distance=2, near_action="group", check=AGREE)

    assert (fates["status"] == "kept").all()
    assert fates["group"].tolist() == ["a", "x", "a", "a", "dog"]
    assert summarize_fates(fates)["n_groups"] == 1
    assert summarize_fates(fates)["n_grouped_images"] == 3


def test_near_distance_zero_disables_near_checks():
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s2"), ("c", "dog", "s3"))
    fates = decide_fates(raw, {"s1": 7, "s2": 7, "s3": 7}, near_distance=0, near_action="drop")

    assert (fates["status"] == "kept").all()


def test_bad_options_and_inputs_fail_with_the_key():
    raw = manifest(("a", "cat", "s1"))
    with pytest.raises(ValueError, match="near_action"):
        decide_fates(raw, {"s1": 1}, 2, near_action="merge", check=AGREE)
    with pytest.raises(ValueError, match="no perceptual hash"):
        decide_fates(raw, {}, 2, check=AGREE)
    with pytest.raises(ValueError, match="origin"):
        decide_fates(raw.drop(columns="origin"), {"s1": 1}, 2, check=AGREE)


def test_summary_counts_every_class_and_reason():
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s1"), ("c", "dog", "", "failed"), ("d", "dog", "s1"))
    summary = summarize_fates(decide_fates(raw, {"s1": 1}, 0, check=AGREE))

    assert summary["n_images"] == 4 and summary["n_kept"] == 0 and summary["n_dropped"] == 4
    assert summary["kept_cat"] == 0 and summary["kept_dog"] == 0
    assert summary["dropped_cross_class_exact"] == 3
    assert summary["dropped_cross_class_exact_cat"] == 2
    assert summary["dropped_failed_dog"] == 1
    assert summary["dropped_near_duplicate"] == 0 and summary["dropped_near_duplicate_cat"] == 0
    assert all(isinstance(value, int) for value in summary.values())


# ------------------------------------------------------------ on real image files


@pytest.fixture
def crawl(tmp_path, photos):
    """A small crawl: copies, re-encodes and a cross-class re-encode of two photos."""
    china, flower = photos
    paths = {}

    def save(name, image, **options):
        paths[name] = str(tmp_path / name)
        image.save(paths[name], **options)

    save("cat_china.jpg", china, quality=90)
    save("cat_china_small.jpg", china.resize((213, 142)), quality=60)
    save("cat_flower.png", flower)
    save("dog_flower.jpg", flower, quality=40)
    save("dog_tile.jpg", china.crop((0, 0, 200, 200)), quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths["broken.jpg"] = str(tmp_path / "broken.jpg")
    rows = [
        (paths["cat_china.jpg"], "cat", "c1"),
        (paths["cat_china_small.jpg"], "cat", "c2"),
        (paths["cat_china.jpg"], "cat", "c1"),
        (paths["cat_flower.png"], "cat", "c3"),
        (paths["dog_flower.jpg"], "dog", "d1"),
        (paths["dog_tile.jpg"], "dog", "d2"),
        (paths["broken.jpg"], "dog", "d3"),
    ]
    return manifest(*rows)


def test_dedupe_images_on_files(crawl, caplog):
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        fates = dedupe_images(crawl, near_distance=10, near_action="drop", threads=2)

    assert fates["reason"].tolist() == [
        "",
        "near_duplicate",
        "exact_duplicate",
        "cross_class_near",
        "cross_class_near",
        "",
        "corrupt",
    ]
    assert fates["duplicate_of"][3] == crawl["file"][4] and fates["duplicate_of"][4] == crawl["file"][3]
    assert fates["phash"].str.len().tolist() == [16] * 6 + [0]
    assert fates["phash_center"].str.len().tolist() == [16] * 6 + [0]
    assert "cannot decode" in caplog.text and "hashed 6/6 images" in caplog.text


def test_a_cropped_copy_is_a_near_duplicate(tmp_path, photos):
    for k, photo in enumerate(photos):
        photo.save(tmp_path / f"photo{k}.jpg", quality=90)
        cropped(photo, 0.05).save(tmp_path / f"crop{k}.jpg", quality=85)
    raw = manifest(
        *[(str(tmp_path / f"{name}{k}.jpg"), "cat", f"{name}{k}") for k in (0, 1) for name in ("crop", "photo")]
    )
    fates = dedupe_images(raw, near_distance=6)  # whole pictures 8-10 bits apart, centers <= 4

    assert fates["reason"].tolist() == ["", "near_duplicate", "", "near_duplicate"]
    assert fates["duplicate_of"].tolist() == ["", raw["file"][0], "", raw["file"][2]]


def test_crawl_hashes_are_reused_and_rows_without_a_center_hash_hashed_again(crawl, caplog):
    hashed = dedupe_images(crawl, near_distance=10)
    crawl = crawl.assign(phash=hashed["phash"], phash_center=hashed["phash_center"])
    crawl.loc[3, "phash_center"] = ""  # a row from a store written before center hashes existed
    with caplog.at_level(logging.INFO, logger="imgpipe"):
        again = dedupe_images(crawl, near_distance=10)

    pd.testing.assert_frame_equal(again, hashed)
    # the row without a center hash, and the undecodable file (no hash at all)
    assert "4 hashed by the crawl, 2 to hash" in caplog.text and "hashed 2/2 images" in caplog.text


def test_dedupe_images_is_deterministic(crawl):
    first = dedupe_images(crawl, near_distance=10, near_action="group", threads=1)
    again = dedupe_images(crawl, near_distance=10, near_action="group", threads=2)

    pd.testing.assert_frame_equal(first, again)
    assert first["group"][1] == crawl["file"][0]


def test_missing_file_is_an_error_not_a_corrupt_image(tmp_path):
    raw = manifest((str(tmp_path / "gone.jpg"), "cat", "s1"))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        dedupe_images(raw, near_distance=4)


# ------------------------------------------------------------------ exclusion list


def test_read_exclude_list(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text(
        "# hand-picked\n\n"
        f"{'ab' * 32}   # watermark\n"
        "results/x/crawl/cat/000001.jpg\n"
        "  https://example.org/a.jpg#part  \n"
    )

    assert read_exclude_list(path) == {
        "ab" * 32: "watermark",
        "results/x/crawl/cat/000001.jpg": "",
        "https://example.org/a.jpg#part": "",
    }
    with pytest.raises(FileNotFoundError, match="missing.txt.*dedupe.exclude"):
        read_exclude_list(tmp_path / "missing.txt")


def test_an_exclusion_list_saved_with_a_bom_keeps_its_first_entry(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_bytes(b"\xef\xbb\xbf" + f"{'ab' * 32}  # watermark\n".encode())
    assert read_exclude_list(path) == {"ab" * 32: "watermark"}


def test_an_exclusion_list_that_is_not_utf8_names_key_file_and_byte(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_bytes(f"{'ab' * 32}\n".encode() + "https://example.org/caf\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"config key 'dedupe.exclude': .*exclude.txt is not UTF-8 text: byte 88 "
                                         r"\(line 2\) is b'\\xe9'. Save the file as UTF-8"):
        read_exclude_list(path)


def test_exclusion_entries_that_name_nothing_are_warned_about_with_their_line(tmp_path, caplog):
    sha_a = "a" * 64
    raw = manifest(("data/x.jpg", "cat", sha_a), ("data/gone.jpg", "cat", "", "failed", "https://example.org/gone"))
    path = tmp_path / "exclude.txt"
    path.write_text(f"# why\n{sha_a}\ndata/typo.jpg  # a stray letter\n\nhttps://example.org/gone\n{'c' * 64}\n")
    exclude = located_exclusions(sorted(read_exclude_list(path)), str(path))
    with caplog.at_level(logging.WARNING, logger="imgpipe.data.dedupe"):
        fates = decide_fates(raw, {sha_a: 1}, 0, exclude=exclude)
    assert fates["reason"].tolist() == ["excluded", "failed"]
    warned = [record.getMessage() for record in caplog.records]
    assert warned == [
        f"exclusion entry {'c' * 64!r} (dedupe.exclude {path} line 6) names no row of the crawl manifests (neither a "
        f"sha256, a file nor a URL or path the crawl got): check it for a typo, or remove it",
        f"exclusion entry 'data/typo.jpg' (dedupe.exclude {path} line 3) names no row of the crawl manifests (neither "
        f"a sha256, a file nor a URL or path the crawl got): check it for a typo, or remove it",
    ]  # the URL that failed is named by a row: not warned about


def test_a_hash_given_as_a_signed_integer_is_the_same_bits():
    raw = manifest(("a", "cat", "s1"), ("b", "cat", "s2"))
    signed = decide_fates(raw, {"s1": np.int64(-1), "s2": (np.int64(-2), 5)}, near_distance=1, check=AGREE)
    unsigned = decide_fates(raw, {"s1": 2**64 - 1, "s2": (2**64 - 2, 5)}, near_distance=1, check=AGREE)

    pd.testing.assert_frame_equal(signed, unsigned)
    assert signed["reason"].tolist() == ["", "near_duplicate"] and signed["phash"][0] == "ffffffffffffffff"


# ----------------------------------------------- near duplicates confirmed on pixels


def default_near_settings() -> tuple[int, float]:
    """dedupe.near_distance and dedupe.near_pixel_difference as the schema's defaults give them."""
    dedupe = load_schema(SCHEMA)["properties"]["dedupe"]["properties"]
    return dedupe["near_distance"]["default"], dedupe["near_pixel_difference"]["default"]


@pytest.fixture(scope="module")
def low_texture(tmp_path_factory):
    """The generated set of distinct low-texture images (imgpipe.data.lowtexture) as a crawl manifest."""
    written = write_low_texture_set(tmp_path_factory.mktemp("low_texture"))
    return manifest(*[(path, label, f"{k:064x}") for k, (path, label) in enumerate(written)])


def test_default_pixel_difference_is_the_schemas():
    assert default_near_settings()[1] == DEFAULT_PIXEL_DIFFERENCE


def test_generated_low_texture_images_are_distinct_by_construction():
    images = low_texture_set(per_class=40, per_other=10)
    shapes = [image for image in images if image.family == "shape"]

    assert len(images) == 3 * 40 + 5 * 10 and {image.label for image in images} >= set(SHAPES)
    assert all(distinct(a, b) for a, b in itertools.combinations(images, 2))
    first = shapes[0]
    assert not distinct(first, replace(first, numbers={**first.numbers, "x": first.numbers["x"] + 0.5}))
    assert distinct(first, replace(first, numbers={**first.numbers, "x": first.numbers["x"] + 1}))


def test_no_distinct_low_texture_image_is_dropped_at_the_defaults(low_texture):
    near_distance, pixel_difference = default_near_settings()
    fates = dedupe_images(low_texture, near_distance, near_pixel_difference=pixel_difference, threads=2)

    assert len(fates) >= 900
    assert (fates["status"] == "kept").all(), fates.loc[fates["status"] != "kept", ["file", "reason", "detail"]]
    # the hashes alone (the old rule) would have dropped many, across the shape classes too
    by_hashes = summarize_fates(dedupe_images(low_texture, near_distance, near_pixel_difference=255, threads=2))
    assert by_hashes["dropped_cross_class_near"] > 50 and by_hashes["dropped_near_duplicate"] > 20


def test_whole_vs_center_matches_of_distinct_images_are_rejected(low_texture):
    near_distance, pixel_difference = default_near_settings()
    files = low_texture["file"].tolist()
    hashes = np.array(hash_images(files, 2), dtype=np.uint64)
    pairs = group_pairs(hashes, near_distance)
    whole = np.bitwise_count(hashes[pairs[:, 0], 0] ^ hashes[pairs[:, 1], 0])
    through_center = pairs[whole > 2 * near_distance]  # whole pictures far apart: matched via a center hash
    verdict = confirm(hashes[through_center[:, 0]], hashes[through_center[:, 1]],
                      [files[a] for a in through_center[:, 0]], [files[b] for b in through_center[:, 1]],
                      near_distance, PixelCheck(pixel_difference))

    assert len(through_center) >= 20
    assert not verdict["confirmed"].any()
    assert (verdict["difference"] > pixel_difference).all()


def confirm_files(first: str, second: str, check: PixelCheck | None = None):
    """The verdict on one pair of files, with every hash comparison a candidate (distance 64)."""
    hashes = [perceptual_hashes(first), perceptual_hashes(second)]
    return confirm(np.array([hashes[0]], dtype=np.uint64), np.array([hashes[1]], dtype=np.uint64), [first], [second],
                   64, check or PixelCheck(default_near_settings()[1])).iloc[0]


def test_transparent_icons_are_seen_on_white_as_preprocessing_sees_them(tmp_path):
    def icon(shape, mode):
        image = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
        pen = ImageDraw.Draw(image)
        if shape == "triangle":
            pen.polygon([(64, 10), (118, 118), (10, 118)], fill=(0, 0, 0, 255))
        else:
            getattr(pen, shape)((20, 20, 108, 108), fill=(0, 0, 0, 255))
        path = tmp_path / f"{shape}_{mode}.png"
        if mode == "P":  # palette entry 0 (black) transparent, entry 1 (black) the ink
            indices = Image.fromarray((np.asarray(image)[..., 3] > 0).astype(np.uint8), "L").convert("P")
            indices.putpalette([0, 0, 0] * 2)
            indices.save(path, transparency=0)
        else:
            image.convert(mode).save(path)
        return str(path)

    white = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(white).ellipse((20, 20, 108, 108), fill="black")
    white.save(on_white := tmp_path / "circle_on_white.png")
    for mode in ("RGBA", "LA", "P"):
        circle, square, triangle = (icon(shape, mode) for shape in ("ellipse", "rectangle", "triangle"))
        assert perceptual_hashes(circle) == perceptual_hashes(on_white), mode
        for other in (square, triangle):
            verdict = confirm_files(circle, other)
            assert not verdict["confirmed"] and verdict["difference"] > DEFAULT_PIXEL_DIFFERENCE, (mode, other)
            assert hash_distance(perceptual_hashes(circle), perceptual_hashes(other)) > 8, (mode, other)


def test_shapes_that_differ_only_in_colour_are_not_copies_but_a_grayscale_copy_is(tmp_path, photos):
    def circle(colour):
        image = Image.new("RGB", (200, 200), "white")
        ImageDraw.Draw(image).ellipse((50, 50, 150, 150), fill=colour)
        image.save(path := tmp_path / f"circle_{colour}.png")
        return str(path)

    for first, second in (((255, 0, 0), (0, 130, 0)), ((200, 30, 30), (30, 110, 200))):
        verdict = confirm_files(circle(first), circle(second))
        # the gray levels agree (same brightness); the colour tells them apart
        assert verdict["difference"] <= DEFAULT_PIXEL_DIFFERENCE
        assert not verdict["confirmed"] and verdict["chroma"] > MAX_CHROMA_DIFFERENCE
    assert confirm_files(circle((255, 0, 0)), circle((250, 5, 5)))["confirmed"]
    photos[0].save(original := tmp_path / "photo.png")
    photos[0].convert("L").save(gray := tmp_path / "photo_gray.jpg")
    ImageEnhance.Color(photos[0]).enhance(1.2).save(saturated := tmp_path / "photo_saturated.png")
    assert confirm_files(str(original), str(gray))["confirmed"]
    assert confirm_files(str(original), str(saturated))["confirmed"]


def edited_copies(photo: Image.Image, folder, stem: str) -> list[str]:
    """The photo as a JPEG and edited copies of it a person calls the same picture."""
    paths = []

    def save(name, image, **options):
        paths.append(str(folder / f"{stem}_{name}.jpg"))
        image.save(paths[-1], **({"quality": 85} | options))

    save("original", photo, quality=90)
    save("reencode_q50", photo, quality=50)
    save("resize_half", photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.BICUBIC))
    save("darker_20pct", ImageEnhance.Brightness(photo).enhance(0.8))
    save("brighter_20pct", ImageEnhance.Brightness(photo).enhance(1.2))
    save("crop_5pct", cropped(photo, 0.05))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; viewers (and imgpipe) turn it back upright
    save("exif_rotation", photo.transpose(Image.Transpose.ROTATE_90), exif=exif)
    return paths


def test_edited_copies_are_still_near_duplicates_at_the_defaults(tmp_path, photos):
    near_distance, pixel_difference = default_near_settings()
    paths = [p for k, photo in enumerate(photos) for p in edited_copies(photo, tmp_path, f"photo{k}")]
    raw = manifest(*[(path, "cat", f"{k:064x}") for k, path in enumerate(paths)])
    fates = dedupe_images(raw, near_distance, near_pixel_difference=pixel_difference)

    originals = [p for p in paths if p.endswith("_original.jpg")]
    assert fates.loc[fates["status"] == "kept", "file"].tolist() == originals
    copies = fates[fates["status"] == "dropped"]
    assert (copies["reason"] == "near_duplicate").all()
    assert [Path(p).name.split("_")[0] for p in copies["duplicate_of"]] == \
        [Path(p).name.split("_")[0] for p in copies["file"]]
    assert copies["detail"].str.contains("pixels differ by").all()
    crop = copies[copies["file"].str.endswith("crop_5pct.jpg")]
    assert crop["detail"].str.contains("vs center|center vs").all()


def test_near_duplicate_warnings_name_the_keys_and_the_contact_sheet():
    rows = [("a", "cat", "s1"), ("b", "cat", "s2"), ("c", "cat", "s3"), ("d", "dog", "s4"), ("e", "dog", "s5"),
            ("f", "bird", "s6")] + [(f"g{k}", "bird", f"t{k}") for k in range(10)]
    # b and c near a (cat loses 2 of 3); e near f across classes; the birds are far apart
    phashes = {"s1": 0, "s2": 1, "s3": 3, "s4": 2**40 - 1, "s5": 0xFF << 20, "s6": (0xFF << 20) | 1}
    phashes |= {f"t{k}": (2**64 - 1) >> (6 * k) << (6 * k) for k in range(10)}
    fates = decide_fates(manifest(*rows), phashes, near_distance=2, check=AGREE)
    warnings = near_duplicate_warnings(fates)

    assert sorted(warnings) == ["bird", "cat", "dog"]
    assert "2 of 3 images (67%) dropped as near duplicates" in warnings["cat"]
    assert "cross_class_near" in warnings["dog"] and "near duplicates of images in another class" in warnings["bird"]
    for warning in warnings.values():
        assert "dedupe.near_distance" in warning and "dedupe.near_pixel_difference" in warning
    assert "review/cat.html" in warnings["cat"]
    assert near_duplicate_warnings(decide_fates(manifest(*rows), phashes, near_distance=0)) == {}


def test_near_duplicate_share_counts_only_the_images_that_were_compared():
    # 1,000 rows: 600 failed, 100 skipped, 300 usable images of which 90 are near copies (30%)
    rows = [(f"f{k}", "cat", "", "failed") for k in range(600)] + [(f"s{k}", "cat", "", "skipped") for k in range(100)]
    rows += [(f"i{k}", "cat", f"u{k}") for k in range(300)]
    phashes = {f"u{k}": int(value) for k, value in enumerate(np.random.default_rng(0).integers(0, 2**63, 300))}
    phashes |= {f"u{k}": phashes[f"u{k % 10}"] ^ 1 for k in range(10, 100)}  # 90 near copies of the first ten
    fates = decide_fates(manifest(*rows), phashes, near_distance=2, check=AGREE)
    warnings = near_duplicate_warnings(fates)

    assert (fates["reason"] == "near_duplicate").sum() == 90
    assert "90 of 300 images (30%) dropped as near duplicates" in warnings["cat"]


def test_target_counter_counts_distinct_low_texture_images_and_not_edited_copies(tmp_path, photos):
    near_distance, pixel_difference = default_near_settings()
    store = tmp_path / "files"
    store.mkdir()
    # two distinct shapes whose hashes match (a candidate the pixels reject), and a photo's copies
    images = {image.name: image for image in low_texture_set(per_class=300, per_other=0)}
    written = write_images(list(images.values()), tmp_path / "set")
    hashes = np.array(hash_images([path for path, _ in written], 2), dtype=np.uint64)
    a, b, _ = group_pairs(hashes, near_distance)[0]
    copies = edited_copies(photos[0], tmp_path, "photo")
    offered = [written[a][0], written[b][0], copies[0], copies[2], copies[5]]
    counter = TargetCounter(target=10, near_distance=near_distance, files=store,
                            near_pixel_difference=pixel_difference)
    counted = []
    for k, path in enumerate(offered):
        stored = f"{k:06d}{Path(path).suffix}"
        (store / stored).write_bytes(Path(path).read_bytes())
        whole, center = perceptual_hashes(store / stored)
        record = {"status": "ok", "reason": "", "sha256": f"{k:064x}", "stored": stored, "width": 100, "height": 100,
                  "format": "PNG" if path.endswith(".png") else "JPEG", "bytes": 1,
                  "phash": format_hash(whole), "phash_center": format_hash(center)}
        counted.append(counter.offer(record, CrawlLimits()))

    assert counted == [True, True, True, False, False]
    assert counter.count == 3
