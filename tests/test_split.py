import pandas as pd
import pytest

from imgpipe.data.split import (
    SplitError,
    describe_losses,
    split_sizes,
    stratified_group_split,
    target_counts,
    write_manifest,
)

RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def images(counts, group_size=1):
    rows = []
    for label, count in counts.items():
        for index in range(count):
            rows.append((f"img/{label}/{index:04d}.png", label, f"{label}-{index // group_size}"))
    return pd.DataFrame(rows, columns=["path", "label", "group"])


def test_each_class_is_split_by_the_ratios():
    manifest = stratified_group_split(images({"cat": 100, "dog": 40}), RATIOS, seed=1)
    sizes = split_sizes(manifest)
    assert (sizes["n_train_cat"], sizes["n_val_cat"], sizes["n_test_cat"]) == (70, 15, 15)
    assert (sizes["n_train_dog"], sizes["n_val_dog"], sizes["n_test_dog"]) == (28, 6, 6)
    assert list(manifest.columns) == ["path", "label", "split"]
    assert manifest["path"].is_unique


def test_target_counts_never_leave_a_split_empty():
    assert target_counts(3, RATIOS) == {"val": 1, "test": 1, "train": 1}


def test_near_duplicate_groups_never_straddle_splits():
    data = images({"cat": 90, "dog": 60}, group_size=3)
    manifest = stratified_group_split(data, RATIOS, seed=7).merge(data, on=["path", "label"])
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_same_inputs_and_seed_give_byte_identical_manifests(tmp_path):
    data = images({"a": 30, "b": 31})
    write_manifest(stratified_group_split(data, RATIOS, seed=3), tmp_path / "one.csv")
    write_manifest(stratified_group_split(data.sample(frac=1, random_state=0), RATIOS, seed=3), tmp_path / "two.csv")
    write_manifest(stratified_group_split(data, RATIOS, seed=4), tmp_path / "three.csv")
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    assert (tmp_path / "one.csv").read_bytes() != (tmp_path / "three.csv").read_bytes()
    assert (tmp_path / "one.csv").read_text().startswith("path,label,split\n")


def test_a_class_with_too_few_images_is_named():
    with pytest.raises(SplitError, match=r"class 'rare' has 2 image\(s\) left"):
        stratified_group_split(images({"common": 50, "rare": 2}), RATIOS, seed=0)


def test_a_class_whose_groups_cannot_fill_every_split_is_named():
    with pytest.raises(SplitError, match=r"class 'clumped': 6 images in 2 near-duplicate group"):
        stratified_group_split(images({"fine": 30, "clumped": 6}, group_size=3), RATIOS, seed=0)


def test_a_configured_class_with_no_images_left_is_named_with_what_was_dropped():
    fates = pd.DataFrame({"class": ["common", "gone", "gone", "gone", "gone"],
                          "status": ["kept", "dropped", "dropped", "dropped", "dropped"],
                          "reason": ["", "exact_duplicate", "corrupt", "exact_duplicate", "exact_duplicate"]})
    notes = describe_losses(fates)
    assert notes["common"] == "collected 1, dropped 0"
    assert notes["gone"] == "collected 4, dropped 4: corrupt 1, exact_duplicate 3"
    with pytest.raises(SplitError, match=r"class 'gone' has 0 image\(s\) .*\(collected 4, dropped 4"):
        stratified_group_split(images({"common": 50}), RATIOS, seed=0, classes=["common", "gone"],
                               class_notes=notes)


def test_adding_a_class_leaves_the_other_classes_split_alone():
    before = stratified_group_split(images({"cat": 40, "dog": 40}), RATIOS, seed=2)
    after = stratified_group_split(images({"cat": 40, "dog": 40, "ant": 30}), RATIOS, seed=2)
    pd.testing.assert_frame_equal(before.reset_index(drop=True),
                                  after[after["label"] != "ant"].reset_index(drop=True))
