import copy
import re
from pathlib import Path

import pytest
import yaml
from conftest import reordered as reordered_config  # (a test below names its own config `reordered`)

from imgpipe.config.params import source_fingerprints
from imgpipe.config.schema import ConfigError, check_config_files, load_schema
from imgpipe.config.validation import torchvision_classification_models, validate_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow/schemas/config.schema.yaml"
SCHEMA = load_schema(SCHEMA_PATH)


def base_config(tmp_path):
    folder = tmp_path / "cats"
    folder.mkdir(exist_ok=True)
    (folder / "cat.jpg").write_bytes(b"an image, as far as validation looks")
    return {
        "experiment": "pets",
        "classes": {"cat": {"sources": [{"folder": str(folder)}]}, "dog": {"sources": [{"digits": 1}]}},
        "crawl": {"min_size": 8},  # the digits are 8x8, as in config/config.yaml
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
    assert engine["max_num"] is None and engine["threads"] == 4 and engine["filters"] == {}
    assert engine["query_suffixes"] == [] and validated["classes"]["dog"]["target"] is None
    assert validated["crawl"]["max_aspect"] == 10 and validated["crawl"]["time_budget_s"] is None
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
        (lambda c: c.update(colour="rgb"), "colour"),
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


def test_source_fingerprint_follows_content_not_clocks(tmp_path):
    import os

    from imgpipe.core.fingerprints import FileHashCache

    urls = tmp_path / "urls.txt"
    urls.write_text("http://example.com/a.jpg\n")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"aaa")
    sources = [{"urls": str(urls)}, {"folder": str(folder)}]
    cache = FileHashCache(tmp_path / "cache" / "hashes.json")
    first = source_fingerprints(sources, cache=cache)
    for path in (urls, folder / "a.png"):  # a bare touch: same content, later mtime
        os.utime(path, (path.stat().st_mtime + 100, path.stat().st_mtime + 100))
    assert source_fingerprints(sources, cache=FileHashCache(tmp_path / "cache" / "hashes.json")) == first
    (folder / "a.png").rename(folder / "b.png")  # a rename is a change: paths are in the output
    renamed = source_fingerprints(sources, cache=cache)
    assert renamed[0] == first[0] and renamed[1] != first[1]
    urls.write_text("http://example.com/a.jpg\nhttp://example.com/b.jpg\n")
    assert source_fingerprints(sources, cache=cache)[0] != first[0]


def test_file_hashes_are_reused_while_a_file_is_unchanged(tmp_path):
    from imgpipe.core.fingerprints import FileHashCache

    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    cache_path = tmp_path / "hashes.json"
    cache = FileHashCache(cache_path)
    digest = cache.sha256(image)
    cache.save()
    saved = FileHashCache(cache_path)
    assert saved.sha256(image) == digest and not saved.changed  # read from the cache, not the file
    image.write_bytes(b"two")
    assert saved.sha256(image) != digest and saved.changed
    cache_path.write_text("{broken")
    assert FileHashCache(cache_path).sha256(image) == saved.sha256(image)  # an unreadable cache: hashed again


@pytest.mark.parametrize("example", sorted((REPO / "config/examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_are_valid(example, tmp_path):
    config = yaml.safe_load(example.read_text())
    for spec in config["classes"].values():
        for source in spec["sources"]:
            if "folder" in source:
                (tmp_path / source["folder"]).mkdir(parents=True, exist_ok=True)
                (tmp_path / source["folder"] / "image.jpg").write_bytes(b"x")  # an empty folder is refused
    check_config_files([example])
    assert validate_config(config, SCHEMA, tmp_path)["experiment"] == example.stem


def models_config(tmp_path, models):
    config = base_config(tmp_path)
    config["models"] = models
    return config


def test_a_sweep_expands_into_one_readable_model_per_combination(tmp_path):
    config = models_config(tmp_path, {
        "resnet50": {"arch": "resnet50", "lr": 0.001, "sweep": {"optimizer": ["sgd", "adam"], "batch_size": [8, 16, 32]}},
        "cnn": {"arch": "simple_cnn", "sweep": {"augment": ["none", "light"], "lr": [0.01, 1e-4]}},
    })
    models = validate_config(config, SCHEMA, tmp_path)["models"]
    assert sorted(models) == sorted(["cnn-aug-light-lr0.01", "cnn-aug-light-lr0.0001", "cnn-aug-none-lr0.01",
                                     "cnn-aug-none-lr0.0001"] +
                                    [f"resnet50-bs{b}-{o}" for b in (8, 16, 32) for o in ("sgd", "adam")])
    assert models["resnet50-bs16-sgd"]["batch_size"] == 16 and models["resnet50-bs16-sgd"]["optimizer"] == "sgd"
    assert models["resnet50-bs16-sgd"]["lr"] == 0.001 and "sweep" not in models["resnet50-bs16-sgd"]
    assert models["cnn-aug-light-lr0.0001"]["epochs"] == 10  # defaults filled per expanded model


@pytest.mark.parametrize("models, key, message", [
    ({"m": {"arch": "simple_cnn", "sweep": {"batch_size": [8, 0]}}}, "models.m.sweep.batch_size[1]", "minimum"),
    ({"m": {"arch": "simple_cnn", "sweep": {"colour": [1]}}}, "models.m.sweep.colour", "not a model setting"),
    ({"m": {"arch": "simple_cnn", "sweep": {"lr": [0.1]}}, "m-lr0.1": {"arch": "simple_cnn"}}, "models.m.sweep",
     "also made by"),
    ({"m": {"arch": "simple_cnn", "sweep": {"batch_size": []}}}, "models.m.sweep.batch_size", "should be non-empty"),
    ({"m": {"arch": "simple_cnn", "sweep": {"lr": ["1e-4"]}}}, "models.m.sweep.lr[0]",
     r"YAML reads 1e-4 as text; write 0.0001 or 1.0e-04 with a dot"),
])
def test_sweep_mistakes_name_the_key(tmp_path, models, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(models_config(tmp_path, models), SCHEMA, tmp_path)
    assert f"'{key}'" in str(error.value)


@pytest.mark.parametrize("models, key, message", [
    ({"a": {"arch": "simple_cnn", "init_from": "nope"}}, "models.a.init_from", "no model named 'nope'"),
    ({"a": {"arch": "simple_cnn", "init_from": "a"}}, "models.a.init_from", "cannot start from itself"),
    ({"a": {"arch": "simple_cnn", "init_from": "b"}, "b": {"arch": "simple_cnn", "init_from": "c"},
      "c": {"arch": "simple_cnn", "init_from": "a"}}, "models.a.init_from", "a -> b -> c -> a"),
    ({"a": {"arch": "simple_cnn", "init_from": "cnn"}, "cnn": {"arch": "simple_cnn", "sweep": {"lr": [0.1, 0.2]}}},
     "models.a.init_from", "'cnn' is a sweep; name one of its models: cnn-lr0.1, cnn-lr0.2"),
    ({"a": {"arch": "resnet18"}, "b": {"arch": "resnet18", "init_from": "a", "weights": "imagenet"}},
     "models.b.init_from", "keep one"),
    ({"a": {"arch": "resnet18", "strategy": "staged", "epochs": 3, "head_epochs": 3}}, "models.a.head_epochs",
     "must be below epochs"),
    ({"a": {"arch": "resnet18", "epochs": 3, "warmup_epochs": 3}}, "models.a.warmup_epochs", "leave none"),
    ({"a": {"arch": "simple_cnn", "truncate": "layer4"}}, "models.a.truncate", "cannot be truncated"),
    ({"a": {"arch": "resnet18", "head_hidden": [64]}}, "models.a.head_hidden", "set truncate too"),
    ({"a": {"arch": "resnet18", "strategy": "freeze"}}, "models.a.strategy", "is not one of"),
    ({"a": {"arch": "resnet18", "early_stopping": {"metric": "val_loss"}}}, "models.a.early_stopping", "patience"),
    ({"a": {"arch": "resnet18", "lr": "1e-3"}}, "models.a.lr", r"YAML reads 1e-3 as text; write 0.001"),
    ({"a": {"arch": "resnet18", "head_epochs": 2}}, "models.a.head_epochs",
     "only used with strategy: staged .this model has strategy: finetune"),
    ({"a": {"arch": "resnet18", "strategy": "feature_extract", "backbone_lr_factor": 0.1}},
     "models.a.backbone_lr_factor", "only used with strategy: staged or finetune"),
    ({"a": {"arch": "resnet18", "scheduler": "cosine", "step_epochs": 3}}, "models.a.step_epochs",
     "only used with scheduler: step"),
    ({"a": {"arch": "resnet18", "truncate": "layer5"}}, "models.a.truncate",
     "resnet18 has no module 'layer5' to cut at .similar: layer4, layer3, layer2.; one of: bn1, relu, maxpool"),
    ({"a": {"arch": "vit_b_16", "truncate": "encoder"}}, "models.a.truncate", "vit_b_16 is a transformer"),
    ({"a": {"arch": "simple_cnn"}, "b": {"arch": "resnet18", "init_from": "a"}}, "models.b.init_from",
     "'a' is a simple_cnn and this model a resnet18; weights carry over only between the same network"),
    ({"a": {"arch": "resnet18"}, "b": {"arch": "resnet18", "truncate": "layer4", "init_from": "a"}},
     "models.b.init_from", "'a' is a resnet18 and this model a resnet18 cut at layer4"),
])
def test_model_mistakes_name_the_key(tmp_path, models, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(models_config(tmp_path, models), SCHEMA, tmp_path)
    assert f"'{key}" in str(error.value)


def test_init_from_chains_are_fine(tmp_path):
    models = {"a": {"arch": "simple_cnn"}, "b": {"arch": "simple_cnn", "init_from": "a"},
              "c": {"arch": "simple_cnn", "init_from": "b", "sweep": {"lr": [0.1, 0.2]}}}
    validated = validate_config(models_config(tmp_path, models), SCHEMA, tmp_path)["models"]
    assert validated["c-lr0.2"]["init_from"] == "b" and validated["a"]["init_from"] is None


def test_the_same_settings_in_another_key_order_give_an_identical_config(tmp_path):
    config = models_config(tmp_path, {"m": {"arch": "resnet18", "lr": 0.01, "epochs": 10.0,
                                            "early_stopping": {"patience": 2, "metric": "val_loss"},
                                            "sweep": {"optimizer": ["sgd", "adam"], "batch_size": [8, 16]}}})
    config["images"] = {"size": 48, "color": "rgb"}
    reordered = {key: config[key] for key in reversed(list(config))}
    reordered["images"] = {"color": "rgb", "size": 48.0}
    reordered["models"] = {"m": {key: value for key, value in reversed(list(config["models"]["m"].items()))}}
    reordered["models"]["m"]["sweep"] = {"batch_size": [8, 16], "optimizer": ["sgd", "adam"]}
    reordered["models"]["m"]["early_stopping"] = {"metric": "val_loss", "patience": 2}
    first, second = validate_config(config, SCHEMA, tmp_path), validate_config(reordered, SCHEMA, tmp_path)
    # Snakemake compares params by their repr: key order and 10 vs 10.0 must not show
    assert repr(first) == repr(second)
    assert list(first["models"]["m-bs8-sgd"]) == sorted(first["models"]["m-bs8-sgd"])


def test_yaml_anchors_and_merge_keys_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(f"""
experiment: anchors
x-base: &base {{arch: resnet18, optimizer: sgd, lr: 0.001, momentum: 0.9}}
classes:
  cat: {{sources: [{{folder: {tmp_path / 'cats'}}}]}}
  dog: {{sources: [{{digits: 1}}]}}
crawl: {{min_size: 8}}
models:
  finetune:
    <<: *base
    lr: 0.01
  frozen:
    <<: *base
    strategy: feature_extract
""")
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "cat.jpg").write_bytes(b"x")  # an empty folder is refused
    check_config_files([path])  # the override of lr next to the merge key is not a duplicate
    models = validate_config(yaml.safe_load(path.read_text()), SCHEMA, tmp_path)["models"]
    assert models["finetune"]["lr"] == 0.01 and models["frozen"]["lr"] == 0.001
    assert models["frozen"]["strategy"] == "feature_extract" and models["frozen"]["momentum"] == 0.9
    path.write_text(path.read_text() + "    strategy: staged\n")
    with pytest.raises(ConfigError, match=r"'strategy' \(line 15\)"):
        check_config_files([path])


def test_anchor_keys_are_dropped_from_the_resolved_config(tmp_path):
    config = base_config(tmp_path)
    config["x-defaults"] = {"arch": "resnet18"}
    assert "x-defaults" not in validate_config(config, SCHEMA, tmp_path)


def test_a_mistake_in_a_swept_model_points_at_its_sweep_entry(tmp_path):
    config = models_config(tmp_path, {"resnet50": {"arch": "resnet50", "strategy": "staged", "head_epochs": 3,
                                                   "sweep": {"epochs": [5, 3]}}})
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, tmp_path)
    assert str(error.value).startswith(
        "config key 'models.resnet50.head_epochs' (sweep model 'resnet50-ep3'): staged trains the head alone")


def test_a_swept_key_overrides_the_same_key_merged_from_an_anchor(tmp_path):
    path = tmp_path / "config.yaml"
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "cat.jpg").write_bytes(b"x")  # an empty folder is refused
    path.write_text(f"""
experiment: sweep
x-base: &base {{arch: resnet50, batch_size: 16, optimizer: sgd}}
classes:
  cat: {{sources: [{{folder: {tmp_path / 'cats'}}}]}}
  dog: {{sources: [{{digits: 1}}]}}
crawl: {{min_size: 8}}
models:
  resnet50:
    <<: *base
    sweep: {{batch_size: [8, 32]}}
""")
    models = validate_config(yaml.safe_load(path.read_text()), SCHEMA, tmp_path)["models"]
    assert {name: model["batch_size"] for name, model in models.items()} == {"resnet50-bs8": 8, "resnet50-bs32": 32}
    assert models["resnet50-bs8"]["optimizer"] == "sgd"


def test_backbone_lr_factor_applies_to_finetune_only_when_set(tmp_path):
    from imgpipe.training.strategies import needs_parts

    models = validate_config(models_config(tmp_path, {
        "plain": {"arch": "resnet18"}, "discriminative": {"arch": "resnet18", "backbone_lr_factor": 0.2}}),
        SCHEMA, tmp_path)["models"]
    assert not needs_parts(models["plain"]) and needs_parts(models["discriminative"])


@pytest.mark.parametrize("source, message", [
    # The urls branch is the one meant: its own error, not the folder branch's "'threads', 'urls' were unexpected".
    ({"urls": "list.txt", "threads": 0}, "'classes.cat.sources[0].threads': 0 is less than the minimum of 1"),
    ({"engine": "bing", "queries": []}, "'classes.cat.sources[0].queries': [] should be non-empty"),
    ({"greedy": "example.com"}, "'classes.cat.sources[0].greedy': 'example.com' does not match '^https?://'"),
    ({"folder": ".", "treads": 2},
     "'classes.cat.sources[0].treads': unknown key 'treads'; the keys here are boxes, folder"),
    ({"folde": "cats"}, "'classes.cat.sources[0]': needs one of the keys digits, engine, folder, greedy, synthetic, "
                        "urls (got folde); did you mean 'folder'?"),
])
def test_a_source_mistake_is_reported_for_the_kind_of_source_meant(tmp_path, source, message):
    (tmp_path / "list.txt").write_text("http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    config["classes"]["cat"]["sources"] = [source]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config, SCHEMA, tmp_path)


def test_list_files_must_be_utf8_and_a_bom_is_dropped(tmp_path):
    config = base_config(tmp_path)
    (tmp_path / "exclude.txt").write_bytes(b"\xef\xbb\xbf" + b"a" * 64 + b"\n")
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfhttp://example.com/a.jpg\n")
    config["classes"]["cat"]["sources"] = [{"urls": "list.txt"}]
    config["dedupe"] = {"exclude": "exclude.txt"}
    validate_config(config, SCHEMA, tmp_path)

    (tmp_path / "list.txt").write_bytes(b"http://example.com/a.jpg\nhttp://example.com/\xe9t\xe9.jpg\n")
    with pytest.raises(ConfigError, match=r"config key 'classes.cat.sources\[0\].urls': .*list.txt is not UTF-8 text: "
                                          r"byte 44 \(line 2\) is b'\\xe9'. Save the file as UTF-8"):
        validate_config(config, SCHEMA, tmp_path)
    (tmp_path / "list.txt").write_text("http://example.com/a.jpg\n")
    (tmp_path / "exclude.txt").write_bytes(b"\xff\xfea\x00")  # UTF-16
    with pytest.raises(ConfigError, match=r"config key 'dedupe.exclude': .*exclude.txt is not UTF-8 text: byte 0 "):
        validate_config(config, SCHEMA, tmp_path)


@pytest.mark.parametrize("entry, message", [
    ("127.0.0.1:http", "'crawl.allow_private_hosts' entry '127.0.0.1:http': the port must be a number from 1 to 65535"),
    ("10.0.0/8x", "'crawl.allow_private_hosts' entry '10.0.0/8x': not a network (e.g. 10.0.0.0/8)"),
    ("[::1]8080", "'crawl.allow_private_hosts' entry '[::1]8080': write an IPv6 address with a port as [::1]:8080"),
])
def test_a_malformed_allowed_host_fails_at_dag_build(tmp_path, entry, message):
    config = base_config(tmp_path)
    config["crawl"] = {"min_size": 8, "allow_private_hosts": ["nas.local", "10.0.0.0/8", "[::1]:8080", entry]}
    with pytest.raises(ConfigError, match=re.escape(f"config key {message}")):
        validate_config(config, SCHEMA, tmp_path)


def test_the_hostile_source_keys_leave_older_configs_params_as_they_were(tmp_path):
    # no schema defaults: a config written before these keys existed gives its crawls the same params
    config = validate_config(base_config(tmp_path), SCHEMA, tmp_path)
    assert "allow_private_hosts" not in config["crawl"]
    assert config["classes"]["cat"]["sources"] == [{"folder": str(tmp_path / "cats")}]


def test_a_folder_with_link_loops_is_fingerprinted_as_the_crawl_walks_it(tmp_path):
    folder = tmp_path / "cats"
    (folder / "sub").mkdir(parents=True)
    for number in range(13):
        (folder / f"{number}.jpg").write_bytes(b"cat %d" % number)
    (folder / "loop").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")  # two loops: walked as os.walk does, 13 files become millions
    fingerprint = source_fingerprints([{"folder": str(folder)}])[0]
    assert fingerprint.startswith("files=13 ")
    (folder / "gone.jpg").symlink_to("nowhere.jpg")  # the crawl lists a dangling link: its fingerprint changes
    assert source_fingerprints([{"folder": str(folder)}])[0] not in (fingerprint, "")
    assert source_fingerprints([{"folder": str(folder)}])[0].startswith("files=13 ")


def test_an_empty_source_folder_fails_at_dag_build(tmp_path):
    config = base_config(tmp_path)
    (tmp_path / "empty" / "nested").mkdir(parents=True)  # folders only: still no image
    config["classes"]["cat"]["sources"] = [{"folder": "empty"}]
    with pytest.raises(ConfigError, match=r"'classes.cat.sources\[0\].folder': the folder 'empty' holds no files"):
        validate_config(config, SCHEMA, tmp_path)


@pytest.mark.parametrize("filters, message", [
    ({"colour": "red"}, "config key 'classes.cat.sources[0].filters': unsupported filter 'colour', supported filter options are type"),
    ({"type": "vector"}, "config key 'classes.cat.sources[0].filters': "),
])
def test_engine_filters_are_checked_when_the_dag_is_built(tmp_path, filters, message):
    # icrawler checks them in its feeder thread, where a mistake only makes the crawl return nothing
    config = base_config(tmp_path)
    config["classes"]["cat"]["sources"] = [{"engine": "bing", "queries": ["cat"], "filters": filters}]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config, SCHEMA, tmp_path)


def test_crawl_settings_are_canonical_and_near_distance_matters_only_with_a_target(tmp_path):
    from imgpipe.config.params import crawl_settings

    config = validate_config(base_config(tmp_path), SCHEMA, tmp_path)
    assert crawl_settings(config, "cat")["near_distance"] is None
    config["classes"]["cat"]["target"] = 100
    settings = crawl_settings(config, "cat")
    assert settings["target"] == 100 and settings["near_distance"] == config["dedupe"]["near_distance"]
    assert list(settings["limits"]) == sorted(settings["limits"])  # key order never reruns a crawl


def test_a_key_added_later_at_its_neutral_value_does_not_change_what_reruns_training():
    from imgpipe.config.params import training_settings

    before = {"arch": "simple_cnn", "lr": 0.001, "threads": 2, "device": "cpu"}
    assert training_settings({**before, "gpus": 1}) == training_settings(before) == {"arch": "simple_cnn", "lr": 0.001}
    assert training_settings({**before, "gpus": 2})["gpus"] == 2


def test_a_localising_model_needs_boxes_and_no_augmentation():
    from imgpipe.config.schema import ConfigError, load_schema
    from imgpipe.config.validation import validate_config

    schema = load_schema(REPO / "workflow/schemas/config.schema.yaml")
    base = {"experiment": "e", "classes": {"a": {"sources": [{"digits": 1}]}, "b": {"sources": [{"digits": 2}]}},
            "crawl": {"min_size": 8}, "models": {"m": {"arch": "simple_cnn", "task": "localize"}}}
    with pytest.raises(ConfigError, match="'models.m.task': localize needs boxes"):
        validate_config(base, schema)
    base["classes"]["a"] = {"sources": [{"synthetic": {"digit": 1}}]}
    assert validate_config(base, schema)["models"]["m"]["task"] == "localize"
    base["models"]["c"] = {"arch": "simple_cnn", "early_stopping": {"patience": 2, "metric": "val_miou"}}
    with pytest.raises(ConfigError, match="'models.c.early_stopping': metric val_miou needs task: localize"):
        validate_config(base, schema)
    del base["models"]["c"]
    base["models"]["m"]["augment"] = "light"
    with pytest.raises(ConfigError, match="'models.m.augment': light flips and moves images"):
        validate_config(base, schema)


def test_a_box_file_that_is_not_there_or_has_another_header_is_refused_when_the_dag_is_built(tmp_path):
    from imgpipe.config.schema import ConfigError, load_schema
    from imgpipe.config.validation import validate_config

    schema = load_schema(REPO / "workflow/schemas/config.schema.yaml")
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"x")
    config = {"experiment": "e", "classes": {"cat": {"sources": [{"folder": "cats", "boxes": "boxes.csv"}]},
                                             "dog": {"sources": [{"digits": 1}]}},
              "models": {"m": {"arch": "simple_cnn"}}}
    with pytest.raises(ConfigError, match=r"'classes.cat.sources\[0\].boxes': 'boxes.csv' is not a file"):
        validate_config(config, schema, tmp_path)
    (tmp_path / "boxes.csv").write_text("name,left,top\n")
    with pytest.raises(ConfigError, match="boxes.csv:1: the header must be file,x0,y0,x1,y1"):
        validate_config(config, schema, tmp_path)


# --- mistakes a schema cannot see, caught at DAG build ---------------------------------------------------------


def config_error(config: dict, base_dir) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(config, SCHEMA, base_dir)
    return str(error.value)


def test_a_url_list_without_a_url_is_refused_naming_the_key_and_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("# cats, to be filled in\n\n   \n# http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    config["classes"]["cat"]["sources"].append({"urls": "empty.txt"})
    message = config_error(config, tmp_path)
    assert message.startswith("config key 'classes.cat.sources[1].urls': ")
    assert f"'{tmp_path / 'empty.txt'}' lists no URL" in message and "add image URLs" in message
    (tmp_path / "empty.txt").write_text("# cats\nhttp://example.com/a.jpg\n")
    assert validate_config(config, SCHEMA, tmp_path)["classes"]["cat"]["sources"][1]["urls"] == "empty.txt"


@pytest.mark.parametrize("cat_source, dog_source, cat_key, dog_key, what", [
    ({"folder": "cats"}, {"folder": "CATDIR/../cats"}, "folder", "folder", "the folder"),  # one folder, two spellings
    ({"urls": "list.txt"}, {"urls": "./list.txt"}, "urls", "urls", "the URL list"),
    ({"digits": 3}, {"digits": 3}, "digits", "digits", "scikit-learn's digit 3"),
    ({"synthetic": {"digit": 3}}, {"synthetic": {"digit": 3, "canvas": 96, "seed": 0}}, "synthetic", "synthetic",
     "the synthetic images"),  # the defaults written out are the same images
    ({"engine": "bing", "queries": ["Tabby  Cat"]}, {"engine": "bing", "queries": ["dog", "tabby cat"]}, "queries",
     "queries", "the bing query 'tabby cat'"),
    ({"engine": "bing", "queries": ["tabby"], "query_suffixes": ["cat"]}, {"engine": "bing", "queries": ["tabby cat"]},
     "queries", "queries", "the bing query 'tabby cat'"),
    ({"greedy": "http://Example.com/cats/"}, {"greedy": "http://example.com/cats"}, "greedy", "greedy",
     "the site section http://example.com/cats"),
    ({"engine": "bing", "queries": ["car"], "filters": {"color": "red", "type": "photo"}},
     {"engine": "bing", "queries": ["car"], "filters": {"type": "photo", "color": "red"}}, "queries", "queries",
     """the bing query 'car' with filters {"color": "red", "type": "photo"}"""),
])
def test_one_source_in_two_classes_is_refused_naming_both_keys(tmp_path, cat_source, dog_source, cat_key, dog_key,
                                                                what):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"x")
    (tmp_path / "CATDIR").mkdir()
    (tmp_path / "list.txt").write_text("http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    config["classes"] = {"cat": {"sources": [cat_source]}, "dog": {"sources": [{"digits": 1}, dog_source]}}
    message = config_error(config, tmp_path)
    assert message.startswith(f"config keys 'classes.cat.sources[0].{cat_key}' and 'classes.dog.sources[1].{dog_key}' "
                              f"both name {what}")
    assert "labelled both cat and dog; keep it in one class" in message


def test_a_folder_inside_another_classs_folder_is_refused(tmp_path):
    (tmp_path / "animals" / "dogs").mkdir(parents=True)
    (tmp_path / "animals" / "dogs" / "a.jpg").write_bytes(b"x")
    config = base_config(tmp_path)
    config["classes"] = {"cat": {"sources": [{"folder": "animals"}]}, "dog": {"sources": [{"folder": "animals/dogs"}]}}
    assert config_error(config, tmp_path).startswith(
        "config key 'classes.dog.sources[0].folder' is a folder inside the folder of 'classes.cat.sources[0].folder'")


def test_sources_that_only_look_alike_are_fine(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"x")
    (tmp_path / "cats2").mkdir()  # a name that starts like the other folder's is not inside it
    (tmp_path / "cats2" / "a.jpg").write_bytes(b"x")
    config = base_config(tmp_path)
    config["classes"] = {
        "cat": {"sources": [{"folder": "cats"}, {"synthetic": {"digit": 3}}, {"engine": "bing", "queries": ["cat"]}]},
        "dog": {"sources": [{"folder": "cats2"}, {"synthetic": {"digit": 3, "seed": 1}},
                            {"engine": "baidu", "queries": ["cat"]}]},
    }
    assert sorted(validate_config(config, SCHEMA, tmp_path)["classes"]) == ["cat", "dog"]


@pytest.mark.parametrize("cat_start, dog_start", [
    ("https://example.com/cats/", "https://Example.com/cats/kittens/"),
    # icrawler follows every link its start URL (without the trailing slash) is part of: /cats reaches /cats2/
    ("https://example.com/cats", "https://example.com/cats2/"),
])
def test_a_site_section_inside_another_classs_greedy_crawl_is_refused(tmp_path, cat_start, dog_start):
    config = base_config(tmp_path)
    config["classes"] = {"cat": {"sources": [{"greedy": cat_start}]}, "dog": {"sources": [{"greedy": dog_start}]}}
    assert config_error(config, tmp_path).startswith(
        "config key 'classes.dog.sources[0].greedy' is a site section inside the crawl of "
        "'classes.cat.sources[0].greedy': its images would be labelled both cat and dog")


@pytest.mark.parametrize("cat_source, dog_source", [
    ({"engine": "bing", "queries": ["car"], "filters": {"color": "red"}},
     {"engine": "bing", "queries": ["car"], "filters": {"color": "blue"}}),
    ({"engine": "flickr", "queries": ["bird"], "api_key": "x", "filters": {"tags": "eagle"}},
     {"engine": "flickr", "queries": ["bird"], "api_key": "x", "filters": {"tags": "owl"}}),
    ({"greedy": "https://example.com/cats/"}, {"greedy": "https://example.com/dogs/"}),
    ({"greedy": "http://example.com/cats/"}, {"greedy": "https://example.com/cats/"}),  # icrawler matches the scheme
])
def test_one_text_with_other_filters_or_other_sections_of_one_site_are_different_sources(tmp_path, cat_source,
                                                                                          dog_source):
    config = base_config(tmp_path)
    config["classes"] = {"cat": {"sources": [cat_source]}, "dog": {"sources": [dog_source]}}
    assert sorted(validate_config(config, SCHEMA, tmp_path)["classes"]) == ["cat", "dog"]


@pytest.mark.parametrize("formats, message", [
    (["JPG"], "config key 'crawl.formats[0]': 'JPG' is not a format name of Pillow, which names the format it reads "
              "in a file; did you mean 'JPEG'? (.jpg files are JPEG)"),
    (["png", "tif"], "config key 'crawl.formats[1]': 'tif' is not a format name of Pillow, which names the format it "
                     "reads in a file; did you mean 'TIFF'?"),
    (["PNGG"], "config key 'crawl.formats[0]': 'PNGG' is not a format name of Pillow, which names the format it reads "
               "in a file; did you mean 'PNG'?"),
])
def test_a_format_name_pillow_never_reports_is_refused_with_the_name_meant(tmp_path, formats, message):
    config = base_config(tmp_path)
    config["crawl"]["formats"] = formats
    assert config_error(config, tmp_path).startswith(message)


def test_format_names_are_read_case_insensitively_and_written_as_pillow_names_them(tmp_path):
    from imgpipe.config.params import crawl_settings
    from imgpipe.data.crawlstore import CrawlLimits

    config = base_config(tmp_path)
    config["crawl"]["formats"] = ["jpeg", "Mpo", "PNG", "png"]
    validated = validate_config(config, SCHEMA, tmp_path)
    assert validated["crawl"]["formats"] == ["JPEG", "MPO", "PNG"]
    config["crawl"]["formats"] = ["JPEG", "MPO", "PNG"]
    assert crawl_settings(validate_config(config, SCHEMA, tmp_path), "cat") == crawl_settings(validated, "cat")
    limits = CrawlLimits.from_config(validated["crawl"])
    assert limits.rejection({"width": 64, "height": 64, "format": "JPEG"}) == ""  # what the crawl then keeps
    assert "not in crawl.formats" in limits.rejection({"width": 64, "height": 64, "format": "GIF"})


@pytest.mark.parametrize("section, names, message", [
    ("classes", ("Cat", "cat"), "config keys 'classes.Cat' and 'classes.cat' differ only in case"),
    ("models", ("CNN", "cnn"), "config keys 'models.CNN' and 'models.cnn' differ only in case"),
    ("predict", ("New", "new"), "config keys 'predict.folders.New' and 'predict.folders.new' differ only in case"),
])
def test_names_that_differ_only_in_case_are_refused(tmp_path, section, names, message):
    config = base_config(tmp_path)
    if section == "classes":
        config["classes"] = {names[0]: {"sources": [{"digits": 1}]}, names[1]: {"sources": [{"digits": 2}]}}
    elif section == "models":
        config["models"] = {name: {"arch": "simple_cnn"} for name in names}
    else:
        (tmp_path / "new").mkdir()
        config["predict"] = {"folders": {name: "new" for name in names}}
    message_got = config_error(config, tmp_path)
    assert message_got.startswith(message) and "case-insensitive file systems" in message_got


def test_sweep_models_that_differ_only_in_case_name_their_sweep_entries(tmp_path):
    config = base_config(tmp_path)
    config["models"] = {"Cnn": {"arch": "simple_cnn", "sweep": {"lr": [0.1, 0.2]}}, "cnn-lr0.1": {"arch": "simple_cnn"}}
    assert config_error(config, tmp_path).startswith(
        "config keys 'models.cnn-lr0.1' and 'models.Cnn' (sweep model 'Cnn-lr0.1') differ only in case")


@pytest.mark.parametrize("crawl, source, message", [
    # the 4-class digits config that crawled, deduped and preprocessed, then failed at the split
    ({}, {"digits": 1}, "config key 'crawl.min_size': rejects every image of classes.dog.sources[0] (scikit-learn's "
                        "digits: 8x8 px PNG; too small: 8x8 px, below crawl.min_size 32); set crawl.min_size: 8"),
    ({"min_size": 64}, {"synthetic": {"digit": 1, "canvas": 48}},
     "config key 'crawl.min_size': rejects every image of classes.dog.sources[0] (its synthetic canvas: 48x48 px PNG; "
     "too small: 48x48 px, below crawl.min_size 64); set crawl.min_size: 48"),
    ({"min_size": 8, "formats": ["jpeg"]}, {"digits": 1}, "config key 'crawl.formats': rejects every image of "
                                                          "classes.dog.sources[0]"),
    ({"max_pixels": 1000}, {"synthetic": {"digit": 1}}, "set crawl.max_pixels: 9216"),
])
def test_a_built_in_source_no_image_of_which_passes_the_crawl_limits_is_refused(tmp_path, crawl, source, message):
    config = base_config(tmp_path)
    config["crawl"] = crawl
    config["classes"]["dog"]["sources"] = [source]
    assert message in config_error(config, tmp_path)


def test_the_default_config_avoids_the_digits_size_trap_by_setting_min_size():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert config["crawl"]["min_size"] == 8
    del config["crawl"]
    assert "set crawl.min_size: 8" in config_error(config, REPO)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(model={}), "config key 'model': unknown key 'model'; did you mean 'models'?"),
    (lambda c: c["classes"]["cat"].update(source=[]), "config key 'classes.cat.source': unknown key 'source'; "
                                                      "did you mean 'sources'?"),
    (lambda c: c["classes"]["dog"]["sources"].append({"urls": "l.txt", "treads": 2}),
     "config key 'classes.dog.sources[1].treads': unknown key 'treads'; did you mean 'threads'?"),
    (lambda c: c["classes"]["dog"]["sources"].append({"synthetic": {"digit": 2, "canvs": 64}}),
     "config key 'classes.dog.sources[1].synthetic.canvs': unknown key 'canvs'; did you mean 'canvas'?"),
    (lambda c: c["models"]["cnn"].update(learning_rate=0.1), "config key 'models.cnn.learning_rate': unknown key "
                                                             "'learning_rate'; the keys here are arch, augment,"),
    (lambda c: c["models"]["cnn"].update(early_stopping={"patience": 2, "metrc": "val_loss"}),
     "config key 'models.cnn.early_stopping.metrc': unknown key 'metrc'; did you mean 'metric'?"),
    (lambda c: c["models"]["cnn"].update(sweep={"l": [0.1]}), "config key 'models.cnn.sweep.l': not a model setting; "
                                                              "did you mean 'lr'?"),
    (lambda c: c.update(dedupe={"near": 4}), "config key 'dedupe.near': unknown key 'near'; did you mean "
                                             "'near_action' or 'near_distance'?"),
    (lambda c: c.update(crawl={"minsize": 8}), "config key 'crawl.minsize': unknown key 'minsize'; did you mean "
                                               "'min_size'?"),
    (lambda c: c.update(split={"trian": 0.7}), "config key 'split.trian': unknown key 'trian'; did you mean 'train'?"),
    (lambda c: c.update(images={"colour": "rgb"}), "config key 'images.colour': unknown key 'colour'; did you mean "
                                                   "'color'?"),
    (lambda c: c.update(mlflow={"uri": None}), "config key 'mlflow.uri': unknown key 'uri'; did you mean "
                                               "'tracking_uri'?"),
    (lambda c: c.update(predict={"folder": {}}), "config key 'predict.folder': unknown key 'folder'; did you mean "
                                                 "'folders'?"),
    (lambda c: c.update(report={"rank": "accuracy"}), "config key 'report.rank': unknown key 'rank'; did you mean "
                                                      "'rank_by'?"),
    (lambda c: c.update(zzz=1), "config key 'zzz': unknown key 'zzz'; the keys here are classes, crawl, dedupe, "
                                "experiment, images, mlflow, models, predict, report, split (or an x-... key"),
])
def test_an_unknown_key_is_named_with_the_key_meant_at_every_level(tmp_path, change, message):
    (tmp_path / "l.txt").write_text("http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    change(config)
    assert config_error(config, tmp_path).startswith(message)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("experiment: x\nclasses:\n  cat: {sources: [{digits: 1}]\n  dog: {sources: [{digits: 2}]}\n")
    with pytest.raises(ConfigError) as error:
        check_config_files([path])
    assert str(error.value).startswith(f"config file '{path}', line 4, column 3: not valid YAML: expected ',' or '}}'")
    assert "(while parsing a flow mapping that starts at line 3, column 8)" in str(error.value)


def test_snakemake_names_the_line_of_a_yaml_syntax_error_in_the_default_config_before_any_job(tmp_path):
    import subprocess
    import sys

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("experiment: x\nclasses:\n\tcat: {sources: [{digits: 1}]}\n")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    result = subprocess.run([snakemake, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert ("config file 'config/config.yaml', line 3, column 1: not valid YAML: found character '\\t' that cannot "
            "start any token") in output
    assert not (tmp_path / "results").exists()


def test_a_valid_config_with_its_keys_in_another_order_validates_to_the_same_config(tmp_path):
    (tmp_path / "l.txt").write_text("http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    config["classes"]["bird"] = {"sources": [{"urls": "l.txt", "threads": 2}, {"synthetic": {"digit": 4, "seed": 2}},
                                             {"engine": "bing", "queries": ["bird"], "query_suffixes": ["photo"]}]}
    config["crawl"] = {"min_size": 8, "formats": ["png", "jpeg"], "max_aspect": 4}
    config["models"]["resnet"] = {"arch": "resnet18", "early_stopping": {"patience": 2, "metric": "val_loss"}}
    assert repr(validate_config(reordered_config(config), SCHEMA, tmp_path)) == repr(validate_config(config, SCHEMA,
                                                                                                  tmp_path))


def test_a_byte_order_mark_at_the_top_of_the_config_file_changes_nothing(tmp_path):
    from snakemake.common.configfile import load_configfile

    text = (REPO / "config/config.yaml").read_text()
    plain, marked = tmp_path / "plain.yaml", tmp_path / "marked.yaml"
    plain.write_text(text, encoding="utf-8")
    marked.write_text("\ufeff" + text, encoding="utf-8")
    check_config_files([marked])
    loaded = load_configfile(marked)  # Snakemake's own loader, as the workflow reads the file
    assert "experiment" in loaded and loaded == load_configfile(plain)
    assert validate_config(loaded, SCHEMA, REPO) == validate_config(load_configfile(plain), SCHEMA, REPO)


def test_a_jobs_own_snakemake_skips_the_slow_checks_and_gets_the_same_config(tmp_path):
    """Each job's Snakemake parses the workflow again (thorough=False): the checks that read URL
    lists and import the crawl code ran in the main process; what the job gets is the same."""
    import json
    import subprocess
    import sys

    (tmp_path / "l.txt").write_text("http://example.com/a.jpg\n")
    config = base_config(tmp_path)
    config["classes"]["cat"]["sources"] += [{"urls": "l.txt"},
                                            {"engine": "bing", "queries": ["cat"], "filters": {"type": "photo"}}]
    config["crawl"]["formats"] = ["jpeg", "png"]
    assert validate_config(config, SCHEMA, tmp_path, thorough=False) == validate_config(config, SCHEMA, tmp_path)
    (tmp_path / "l.txt").write_text("# no URL yet\n")
    assert validate_config(config, SCHEMA, tmp_path, thorough=False)["crawl"]["formats"] == ["JPEG", "PNG"]
    code = ("import sys, json; from imgpipe.config.schema import load_schema; "
            "from imgpipe.config.validation import validate_config; "
            "validate_config(json.loads(sys.argv[1]), load_schema(sys.argv[2]), sys.argv[3], thorough=False); "
            "print(sorted(m for m in ('pandas', 'icrawler', 'imgpipe.data.crawl', 'PIL.Image') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code, json.dumps(config), str(SCHEMA_PATH), str(tmp_path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert imported == "[]"
