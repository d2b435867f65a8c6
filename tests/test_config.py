import copy
from pathlib import Path

import pytest
import yaml

from imgpipe.config import (ConfigError, check_config_files, load_schema, source_fingerprints,
                            torchvision_classification_models, validate_config)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(REPO / "workflow/schemas/config.schema.yaml")


def base_config(tmp_path):
    folder = tmp_path / "cats"
    folder.mkdir(exist_ok=True)
    return {
        "experiment": "pets",
        "classes": {"cat": {"sources": [{"folder": str(folder)}]}, "dog": {"sources": [{"digits": 1}]}},
        "models": {"cnn": {"arch": "simple_cnn"}},
    }


def test_default_config_is_valid_and_gets_schema_defaults():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validated = validate_config(config, SCHEMA, REPO)
    assert validated["experiment"] == "digits"
    assert len(validated["classes"]) == 10
    assert validated["models"]["cnn"]["device"] == "auto"
    assert validated["models"]["resnet18"]["momentum"] == 0.9
    assert validated["report"]["rank_by"] == "accuracy"
    assert validated["mlflow"]["experiment"] is None


def test_defaults_fill_only_the_matching_source_kind(tmp_path):
    config = base_config(tmp_path)
    config["classes"]["dog"]["sources"].append({"engine": "bing", "queries": ["dog"]})
    validated = validate_config(config, SCHEMA, tmp_path)
    folder, engine = validated["classes"]["cat"]["sources"][0], validated["classes"]["dog"]["sources"][1]
    assert set(folder) == {"folder"}
    assert engine["max_num"] == 100 and engine["threads"] == 4 and engine["filters"] == {}
    assert validated["images"] == {"size": 40, "color": "grayscale", "resize": "pad", "pad_color": "black"}
    assert validated["split"]["train"] == 0.7


def test_validation_does_not_modify_its_input(tmp_path):
    config = base_config(tmp_path)
    before = copy.deepcopy(config)
    validate_config(config, SCHEMA, tmp_path)
    assert config == before


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: c["models"]["cnn"].update(arch="resnet19"), "models.cnn.arch"),
        (lambda c: c.update(split={"train": 0.7, "val": 0.2, "test": 0.2}), "split"),
        (lambda c: c["classes"]["cat"].update(sources=[]), "classes.cat.sources"),
        (lambda c: c["classes"].update(bird={}), "classes.bird"),
        (lambda c: c["classes"]["cat"]["sources"][0].update(folder="no/such/folder"), "classes.cat.sources[0].folder"),
        (lambda c: c.update(images={"size": 0}), "images.size"),
        (lambda c: c.update(images={"size": -40}), "images.size"),
        (lambda c: c.update(images={"size": 20}), "models.cnn.arch"),
        (lambda c: c["models"]["cnn"].update(weights="missing.pt"), "models.cnn.weights"),
        (lambda c: c["models"]["cnn"].update(optimizer="rmsprop"), "models.cnn.optimizer"),
        (lambda c: c["classes"]["dog"]["sources"].append({"engine": "altavista", "queries": ["x"]}),
         "classes.dog.sources[1]"),
        (lambda c: c.update(classes={"cat": {"sources": [{"digits": 1}]}}), "classes"),
        (lambda c: c["classes"].update({"a b": {"sources": [{"digits": 2}]}}), "classes"),
        (lambda c: c.update(colour="rgb"), "<top level>"),
        (lambda c: c.update(dedupe={"exclude": "no/such/list.txt"}), "dedupe.exclude"),
        (lambda c: c["classes"]["dog"]["sources"].append({"engine": "flickr", "queries": ["dog"]}),
         "classes.dog.sources[1].api_key"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, monkeypatch, change, key):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    config = base_config(tmp_path)
    change(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, tmp_path)
    assert f"'{key}" in str(error.value)


def test_unknown_architecture_suggests_similar_names(tmp_path):
    config = base_config(tmp_path)
    config["models"]["cnn"]["arch"] = "resnet19"
    with pytest.raises(ConfigError, match="resnet18"):
        validate_config(config, SCHEMA, tmp_path)


def test_torchvision_model_list_is_read_without_importing_torchvision():
    names = torchvision_classification_models()
    assert {"resnet18", "resnet50", "efficientnet_b0", "efficientnet_b4", "mobilenet_v3_small",
            "mobilenet_v3_large", "vgg16"} <= names
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


def test_two_classes_with_one_name_are_caught_in_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("experiment: x\nclasses:\n  cat: {sources: [{digits: 1}]}\n  cat: {sources: [{digits: 2}]}\n")
    with pytest.raises(ConfigError, match=r"'cat' \(line 4\)"):
        check_config_files([path])
    check_config_files([REPO / "config/config.yaml"])


def test_source_fingerprint_changes_when_a_folder_changes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    sources = [{"folder": str(folder)}, {"digits": 3}]
    first = source_fingerprints(sources)
    assert first[1] == "" and "files=1" in first[0]
    assert source_fingerprints(sources) == first
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(b"yy")
    assert source_fingerprints(sources)[0] != first[0]


@pytest.mark.parametrize("example", sorted((REPO / "config/examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_are_valid(example, tmp_path):
    config = yaml.safe_load(example.read_text())
    for spec in config["classes"].values():
        for source in spec["sources"]:
            if "folder" in source:
                (tmp_path / source["folder"]).mkdir(parents=True, exist_ok=True)
    check_config_files([example])
    assert validate_config(config, SCHEMA, tmp_path)["experiment"] == example.stem
