"""Config validation: schema (with defaults) plus the checks a schema cannot express.

Everything here runs at DAG build, before any job, so a mistake costs seconds, not a
crawl. Every error names the config key (dotted path) that caused it.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import math
import os
import re
from pathlib import Path

import jsonschema

from imgpipe.config.params import canonical
from imgpipe.config.schema import (
    ConfigError,
    did_you_mean,
    fill_defaults,
    number_as_text_hint,
    resolve_refs,
    schema_error_message,
)
from imgpipe.config.sweeps import SweepError, expand_sweeps
from imgpipe.core.files import FOLLOW_KEY, error_text, read_list_entries, walk_files
from imgpipe.data.boxes import BoxError, read_box_csv_header

MIN_SIMPLE_CNN_SIZE = 32


def torchvision_classification_models() -> set[str]:
    """Names of torchvision's classification models, read from its source without importing it.

    Importing torchvision costs ~5 s here; reading the `@register_model` decorators of
    the top-level `torchvision/models/*.py` files costs milliseconds and gives exactly
    `torchvision.models.list_models(module=torchvision.models)`.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return set()
    models_dir = Path(next(iter(spec.submodule_search_locations))) / "models"
    names = set()
    for source_file in models_dir.glob("*.py"):
        tree = ast.parse(source_file.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "register_model"
                for dec in node.decorator_list
            ):
                names.add(node.name)
    return names


def _check_sources(config: dict, base_dir: Path, thorough: bool) -> None:
    for class_name, spec in config["classes"].items():
        for index, source in enumerate(spec["sources"]):
            for kind, is_right_type, wanted in (("folder", Path.is_dir, "a folder"), ("urls", Path.is_file, "a file")):
                if kind not in source:
                    continue
                key = f"classes.{class_name}.sources[{index}].{kind}"
                path = base_dir / source[kind]
                if not path.exists():
                    raise ConfigError(
                        f"config key '{key}': '{source[kind]}' does not exist "
                        f"(relative paths are taken from {base_dir.resolve()})"
                    )
                if not is_right_type(path):
                    raise ConfigError(f"config key '{key}': '{source[kind]}' is not {wanted}")
                if kind == "folder" and not walk_files(path, source.get(FOLLOW_KEY, False)):
                    raise ConfigError(f"config key '{key}': the folder '{source[kind]}' holds no files")
                if kind == "urls" and thorough:
                    _check_url_list(key, path)
            if source.get("boxes") not in (None, "voc"):
                boxes = base_dir / source["boxes"]
                if not boxes.is_file():
                    raise ConfigError(f"config key 'classes.{class_name}.sources[{index}].boxes': '{source['boxes']}' "
                                      f"is not a file (a CSV file,x0,y0,x1,y1, or voc)")
                check_box_csv_header(boxes)
            if source.get("engine") == "flickr" and not (source.get("api_key") or os.environ.get("FLICKR_API_KEY")):
                raise ConfigError(
                    f"config key 'classes.{class_name}.sources[{index}].api_key': flickr needs an API key "
                    f"(in the source, or in the FLICKR_API_KEY environment variable)"
                )
            if source.get("engine") in ("bing", "baidu", "google") and source.get("filters") and thorough:
                _check_engine_filters(f"classes.{class_name}.sources[{index}].filters", source)


def _check_url_list(key: str, path: Path) -> None:
    """A URL list that lists nothing would crawl nothing and fail only at the split, a stage later."""
    from imgpipe.data.crawl import (
        read_url_list,  # icrawler and pandas: only configs with URL lists pay them
    )

    try:
        urls = read_url_list(path, key)
    except OSError as error:
        raise ConfigError(f"config key '{key}': cannot read '{path}': {error_text(error)}") from None
    except ValueError as error:  # not UTF-8: the message names the key, the byte and its line
        raise ConfigError(str(error)) from None
    if not urls:
        raise ConfigError(f"config key '{key}': '{path}' lists no URL (only blank lines and # comments); "
                          f"add image URLs, one a line, or remove the source")


def _source_identities(class_name: str, source: dict, base_dir: Path) -> list[tuple[tuple, str, str]]:
    """(identity, key, what) for each thing a source takes its images from: two sources of different
    classes with one identity would label the same images twice."""
    from imgpipe.data import synthetic  # numpy: only configs with synthetic sources pay it

    if "folder" in source or "urls" in source:
        kind = "folder" if "folder" in source else "urls"
        path = (base_dir / source[kind]).resolve()
        return [((kind, path), kind, f"the {'folder' if kind == 'folder' else 'URL list'} {path}")]
    if "digits" in source:
        return [(("digits", source["digits"]), "digits", f"scikit-learn's digit {source['digits']}")]
    if "synthetic" in source:
        chosen = synthetic.settings(source)
        return [(("synthetic", tuple(sorted(chosen.items()))), "synthetic", f"the synthetic images {chosen}")]
    if "greedy" in source:
        start = greedy_scope(source["greedy"])
        return [(("greedy", start), "greedy", f"the site section {start}")]
    if "engine" in source:
        import json

        from imgpipe.data.crawl import engine_queries  # icrawler and pandas: only web configs pay them

        # filters pick other results for one text (bing's colour, flickr's tags): part of what is fetched
        filters = source.get("filters") or {}
        shown = f" with filters {json.dumps(canonical(filters))}" if filters else ""
        return [(("engine", source["engine"], " ".join(query.lower().split()), json.dumps(canonical(filters))),
                 "queries", f"the {source['engine']} query '{query}'{shown}")
                for query in engine_queries(class_name, source)]
    return []


def greedy_scope(start_url: str) -> str:
    """The pages a greedy source crawls, as the prefix of their URLs: icrawler strips the start
    URL's trailing slash and follows a link when that is part of it (is_in_domain), so scheme,
    host and path count, and ``.../cats`` also reaches ``.../cats2/``."""
    from urllib.parse import urlsplit

    parts = urlsplit(start_url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}".rstrip("/")


def _check_sources_belong_to_one_class(config: dict, base_dir: Path) -> None:
    """One folder, URL list, digit, synthetic set, engine query or site in two classes gives the
    same images two labels (dedupe then drops them as cross_class); a folder inside another's too,
    and a site section inside another's (the shorter start URL's crawl reaches the longer's pages)."""
    seen: dict[tuple, tuple[str, str]] = {}
    # kind -> (whether the first contains the second, what the inner one is to the outer)
    nesting = {"folder": (lambda outer, inner: inner.is_relative_to(outer), "a folder inside the folder of"),
               "greedy": (lambda outer, inner: inner.startswith(outer), "a site section inside the crawl of")}
    containers: list[tuple[str, object, str, str]] = []
    for class_name, spec in config["classes"].items():
        for index, source in enumerate(spec["sources"]):
            for identity, kind, what in _source_identities(class_name, source, base_dir):
                key = f"classes.{class_name}.sources[{index}].{kind}"
                earlier_class, earlier_key = seen.setdefault(identity, (class_name, key))
                if earlier_class != class_name:
                    raise ConfigError(f"config keys '{earlier_key}' and '{key}' both name {what}: its images would "
                                      f"be labelled both {earlier_class} and {class_name}; keep it in one class")
                if kind not in nesting:
                    continue
                contains, relation = nesting[kind]
                scope = identity[1]
                for other_kind, other, other_class, other_key in containers:
                    if other_kind != kind or other_class == class_name:
                        continue
                    if contains(other, scope) or contains(scope, other):
                        inner, outer = (key, other_key) if contains(other, scope) else (other_key, key)
                        raise ConfigError(f"config key '{inner}' is {relation} '{outer}': its images would be "
                                          f"labelled both {other_class} and {class_name}; keep them in one class")
                containers.append((kind, scope, class_name, key))


def _check_names_differ_beyond_case(config: dict, keys: ModelKeys) -> None:
    """Class, model and predict-folder names become folder names: 'Cat' and 'cat' are one folder on
    case-insensitive file systems (macOS, Windows) and read as one name in a report."""
    sections = {"classes": config["classes"], "models": config["models"],
                "predict.folders": config["predict"]["folders"]}
    for section, entries in sections.items():
        by_folded: dict[str, str] = {}
        for name in entries:
            other = by_folded.setdefault(name.casefold(), name)
            if other != name:
                where = keys.quoted if section == "models" else (lambda entry: f"'{section}.{entry}'")
                raise ConfigError(f"config keys {where(other)} and {where(name)} differ only in case: they "
                                  f"would share one folder on case-insensitive file systems (macOS, Windows) "
                                  f"and read as one in reports; rename one")


def _check_crawl_format_names(config: dict) -> None:
    """crawl.formats are Pillow's names, in any case ('jpeg' is JPEG, as CrawlLimits reads them); a
    name Pillow never reports (JPG, TIF) would reject every image of that kind: refused with the
    name meant."""
    from PIL import Image

    Image.init()
    # The format names Pillow reports for the files it opens; MPO (phone JPEGs holding several
    # pictures) comes from the JPEG opener, so it has no opener of its own.
    readable = set(Image.OPEN) | {"MPO"}
    by_extension = Image.registered_extensions()  # '.jpg' -> 'JPEG'
    formats = config["crawl"]["formats"]
    for index, name in enumerate(formats):
        if name.upper() in readable:
            continue
        meant = by_extension.get(f".{name.lower()}")
        hint = f"; did you mean '{meant}'? (.{name.lower()} files are {meant})" if meant else did_you_mean(
            name.upper(), readable)
        raise ConfigError(f"config key 'crawl.formats[{index}]': '{name}' is not a format name of Pillow, which "
                          f"names the format it reads in a file{hint}; known: {', '.join(sorted(readable))}")


DIGITS_SIDE = 8  # scikit-learn's handwritten digits are 8x8 pixels


def _check_builtin_sources_pass_crawl_limits(config: dict) -> None:
    """Digits (8x8) and synthetic images (canvas x canvas) are PNGs of a known size: a crawl limit
    that refuses them all would only show at the split, after crawl, dedupe and preprocess ran."""
    from imgpipe.data.crawlstore import CrawlLimits  # numpy, Pillow: when a config is checked, not on import

    limits = CrawlLimits.from_config(config["crawl"])
    for class_name, spec in config["classes"].items():
        for index, source in enumerate(spec["sources"]):
            if "digits" in source:
                side, what = DIGITS_SIDE, "scikit-learn's digits"
            elif "synthetic" in source:
                from imgpipe.data import synthetic  # numpy: only configs with synthetic sources pay it

                side, what = synthetic.settings(source)["canvas"], "its synthetic canvas"
            else:
                continue
            reason = limits.rejection({"width": side, "height": side, "format": "PNG"})
            if not reason:
                continue
            limit = re.search(r"crawl\.(\w+)", reason).group(1)
            fix = {"min_size": f"set crawl.min_size: {side} (or less; config/config.yaml sets 8 for its digits)",
                   "max_pixels": f"set crawl.max_pixels: {side * side} (or more)",
                   "formats": "add PNG to crawl.formats"}.get(limit, f"change crawl.{limit}")
            raise ConfigError(f"config key 'crawl.{limit}': rejects every image of classes.{class_name}.sources"
                              f"[{index}] ({what}: {side}x{side} px PNG; {reason}); {fix}")


def check_box_csv_header(path: Path) -> None:
    try:
        read_box_csv_header(path)
    except BoxError as error:
        raise ConfigError(str(error)) from None


def _check_engine_filters(key: str, source: dict) -> None:
    """icrawler checks filters inside its feeder thread, where an error only kills the thread
    and the crawl quietly returns nothing: check them when the DAG is built instead."""
    from icrawler.builtin.baidu import BaiduFeeder
    from icrawler.builtin.bing import BingFeeder
    from icrawler.builtin.google import GoogleFeeder
    from icrawler.utils import Signal

    feeder = {"bing": BingFeeder, "baidu": BaiduFeeder, "google": GoogleFeeder}[source["engine"]]
    try:
        feeder(1, Signal(), None).get_filter().apply(source["filters"])
    except (KeyError, ValueError, TypeError, AssertionError) as error:
        detail = str(error.args[0]).replace("\uff0c", ",") if isinstance(error, KeyError) else error_text(error)
        raise ConfigError(f"config key '{key}': {detail}") from None


def read_exclude_list(path: str | os.PathLike) -> dict[str, str]:
    """Entries of a hand-kept exclusion list -> their comments: sha256 digests, file paths or origins.

    One entry per line; blank lines are ignored. A comment starts at a ``#`` at the start
    of a line or after whitespace (so URL fragments survive); a comment on an entry's line
    says why it is excluded and shows on the contact sheet.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"exclusion list {path} not found (config key dedupe.exclude): create it, or remove the key"
        )
    try:
        return {entry: comment for _, entry, comment in read_list_entries(path, "dedupe.exclude")}
    except ValueError as error:  # not UTF-8
        raise ConfigError(str(error)) from None


def _check_crawl(config: dict) -> None:
    # (no schema default: configs written before the key existed keep their crawl params)
    allowed = config["crawl"].get("allow_private_hosts")
    if allowed:
        from imgpipe.data.netguard import (
            parse_allowed,  # imports requests: only configs that need it pay
        )

        for entry in allowed:
            try:
                parse_allowed(entry)
            except ValueError as error:
                raise ConfigError(f"config key {error}") from None


def _check_dedupe(config: dict, base_dir: Path) -> None:
    exclude = config["dedupe"]["exclude"]
    if exclude and not (base_dir / exclude).is_file():
        raise ConfigError(f"config key 'dedupe.exclude': '{exclude}' is not a file")
    if exclude:
        read_exclude_list(base_dir / exclude)


def _check_split(config: dict) -> None:
    split = config["split"]
    total = split["train"] + split["val"] + split["test"]
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"config key 'split': train + val + test must sum to 1, got "
            f"{split['train']} + {split['val']} + {split['test']} = {total:g}"
        )


class ModelKeys:
    """Names config keys of models as the user wrote them: a swept model's mistake points at
    its sweep entry (`models.resnet50.head_epochs (sweep model 'resnet50-bs16-sgd')`)."""

    def __init__(self, origins: dict[str, str]):
        self.origins = origins

    def __call__(self, model_name: str, key: str | None = None) -> str:
        return f"config key {self.quoted(model_name, key)}"

    def quoted(self, model_name: str, key: str | None = None) -> str:
        path = f"models.{self.origins.get(model_name, model_name)}" + (f".{key}" if key else "")
        return f"'{path}'" + (f" (sweep model '{model_name}')" if model_name in self.origins else "")


# Set without the strategy or schedule that reads them, these keys would be ignored.
KEYS_READ_ONLY_WITH = {
    "head_epochs": ("strategy", ("staged",)),
    "backbone_lr_factor": ("strategy", ("staged", "finetune")),
    "step_epochs": ("scheduler", ("step",)),
    "step_gamma": ("scheduler", ("step",)),
}


# Transformers: their feature maps are not N x C x H x W (Swin is channels-last, ViT a
# token sequence), so "cut, pool, dense head" does not apply.
UNTRUNCATABLE_PREFIXES = ("vit_", "swin", "maxvit")


def _check_keys_have_effect(models: dict, keys: ModelKeys) -> None:
    """Before defaults are filled: a key the model's strategy or schedule never reads is a mistake."""
    for model_name, model in models.items():
        for key, (switch, values) in KEYS_READ_ONLY_WITH.items():
            current = model.get(switch, "finetune" if switch == "strategy" else "none")
            if key in model and model[key] is not None and current not in values:
                raise ConfigError(f"{keys(model_name, key)}: only used with {switch}: {' or '.join(values)} "
                                  f"(this model has {switch}: {current}); remove it or change {switch}")


def _check_truncation(model_name: str, model: dict, keys: ModelKeys) -> None:
    """The cut point exists in the architecture (builds the network on torch's meta device:
    no memory, no weights, but torchvision's import, only for configs that truncate)."""
    arch, cut = model["arch"], model["truncate"]
    if arch.startswith(UNTRUNCATABLE_PREFIXES):
        raise ConfigError(f"{keys(model_name, 'truncate')}: {arch} is a transformer; truncate (cut, pool, dense "
                          f"head) works on convolutional backbones (resnet, efficientnet, mobilenet, vgg, "
                          f"densenet, regnet, convnext, ...)")
    import torch
    import torchvision

    from imgpipe.models.networks import truncation_points

    with torch.device("meta"):
        network = torchvision.models.get_model(arch, weights=None)
    points = truncation_points(network)
    if cut not in points:
        close = difflib.get_close_matches(cut, points, n=3, cutoff=0.5)
        raise ConfigError(f"{keys(model_name, 'truncate')}: {arch} has no module '{cut}' to cut at"
                          + (f" (similar: {', '.join(close)})" if close else "")
                          + f"; one of: {', '.join(points)}")


def _check_models(config: dict, base_dir: Path, swept: dict[str, list[str]], keys: ModelKeys) -> None:
    known = None
    for model_name, model in config["models"].items():
        arch = model["arch"]
        if model.get("task") == "localize":
            _check_localize(config, model_name, model, keys)
        elif (model.get("early_stopping") or {}).get("metric") == "val_miou":
            raise ConfigError(f"{keys(model_name, 'early_stopping')}: metric val_miou needs task: localize "
                              f"(a box head)")
        if model.get("gpus", 1) > 1 and model["device"] == "mps":
            raise ConfigError(f"{keys(model_name, 'gpus')}: data-parallel training needs CUDA devices or the CPU; "
                              f"device mps has one device")
        if arch == "simple_cnn":
            if config["images"]["size"] < MIN_SIMPLE_CNN_SIZE:
                raise ConfigError(
                    f"{keys(model_name, 'arch')}: simple_cnn needs images.size >= "
                    f"{MIN_SIMPLE_CNN_SIZE}, got {config['images']['size']}"
                )
            if model["truncate"] is not None:
                raise ConfigError(f"{keys(model_name, 'truncate')}: simple_cnn cannot be truncated "
                                  f"(truncate cuts a torchvision backbone)")
        else:
            known = torchvision_classification_models() if known is None else known
            if arch not in known:
                close = difflib.get_close_matches(arch, sorted(known), n=5, cutoff=0.6)
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise ConfigError(
                    f"{keys(model_name, 'arch')}: unknown architecture '{arch}' "
                    f"(simple_cnn or a torchvision classification model{hint})"
                )
            if model["truncate"] is not None:
                _check_truncation(model_name, model, keys)
        if model["truncate"] is None:
            for own_head_key, unset in (("head_hidden", []), ("head_dropout", 0)):
                if model[own_head_key] != unset:
                    raise ConfigError(f"{keys(model_name, own_head_key)}: only a truncated backbone has an "
                                      f"own dense head; set truncate too, or remove {own_head_key}")
        weights = model["weights"]
        if weights not in ("none", "imagenet") and not (base_dir / weights).is_file():
            raise ConfigError(
                f"{keys(model_name, 'weights')}: '{weights}' is neither 'none', "
                f"'imagenet' nor an existing checkpoint file"
            )
        if weights == "imagenet" and arch == "simple_cnn":
            raise ConfigError(f"{keys(model_name, 'weights')}: simple_cnn has no ImageNet weights")
        if model["init_from"] is not None and weights != "none":
            raise ConfigError(f"{keys(model_name, 'init_from')}: init_from and weights ('{weights}') both give "
                              f"starting weights; keep one")
        if model["strategy"] == "staged" and model["head_epochs"] >= model["epochs"]:
            raise ConfigError(f"{keys(model_name, 'head_epochs')}: staged trains the head alone for head_epochs, "
                              f"then all layers, so head_epochs ({model['head_epochs']}) must be below epochs "
                              f"({model['epochs']})")
        if model["warmup_epochs"] >= model["epochs"]:
            raise ConfigError(f"{keys(model_name, 'warmup_epochs')}: {model['warmup_epochs']} warm-up epochs leave "
                              f"none of the {model['epochs']} epochs to train at lr")
    _check_init_from(config["models"], swept, keys)


def _check_init_from(models: dict, swept: dict[str, list[str]], keys: ModelKeys) -> None:
    """init_from names another model of this config with the same network, and never loops."""
    for model_name, model in models.items():
        source = model["init_from"]
        if source is None:
            continue
        if source == model_name:
            raise ConfigError(f"{keys(model_name, 'init_from')}: a model cannot start from itself")
        if source not in models:
            if source in swept:
                raise ConfigError(f"{keys(model_name, 'init_from')}: '{source}' is a sweep; name one of its "
                                  f"models: {', '.join(swept[source])}")
            close = difflib.get_close_matches(source, sorted(models), n=3, cutoff=0.6)
            hint = f"; similar: {', '.join(close)}" if close else f"; models: {', '.join(sorted(models))}"
            raise ConfigError(f"{keys(model_name, 'init_from')}: no model named '{source}' in this config{hint}")
        network = (model["arch"], model["truncate"])
        source_network = (models[source]["arch"], models[source]["truncate"])
        if network != source_network:
            describe = lambda arch, cut: arch + (f" cut at {cut}" if cut else "")  # noqa: E731
            raise ConfigError(f"{keys(model_name, 'init_from')}: '{source}' is a {describe(*source_network)} and "
                              f"this model a {describe(*network)}; weights carry over only between the same "
                              f"network (arch and truncate)")
    for model_name in models:
        chain = [model_name]
        while models[chain[-1]]["init_from"] is not None:
            chain.append(models[chain[-1]]["init_from"])
            if chain[-1] in chain[:-1]:
                cycle = chain[chain.index(chain[-1]):]
                raise ConfigError(f"{keys(cycle[0], 'init_from')}: init_from goes round in a circle: "
                                  f"{' -> '.join(cycle)}")


def _check_predict(config: dict, base_dir: Path, swept: dict[str, list[str]]) -> None:
    """Predict folders exist, predict.models names models of this config, top_k fits the classes."""
    predict = config["predict"]
    for name, folder in predict["folders"].items():
        path = base_dir / folder
        if not path.is_dir():
            problem = "is not a folder" if path.exists() else "does not exist"
            raise ConfigError(f"config key 'predict.folders.{name}': '{folder}' {problem} "
                              f"(relative paths are taken from {base_dir.resolve()})")
    if predict["models"] != "best":
        models = config["models"]
        for index, model_name in enumerate(predict["models"]):
            if model_name in models:
                continue
            if model_name in swept:
                raise ConfigError(f"config key 'predict.models[{index}]': '{model_name}' is a sweep; name its "
                                  f"models: {', '.join(swept[model_name])}")
            close = difflib.get_close_matches(model_name, sorted(models), n=3, cutoff=0.6)
            hint = f"; similar: {', '.join(close)}" if close else f"; models: {', '.join(sorted(models))}"
            raise ConfigError(f"config key 'predict.models[{index}]': no model named '{model_name}' in this "
                              f"config{hint} (or write models: best)")
    n_classes = len(config["classes"])
    if predict["top_k"] is not None and predict["top_k"] > n_classes:
        raise ConfigError(f"config key 'predict.top_k': {predict['top_k']} is more than the {n_classes} classes")


def validate_config(config: dict, schema: dict, base_dir: Path | str = ".", thorough: bool = True) -> dict:
    """Validate against the schema, expand sweeps, fill defaults, run the cross-key checks.

    Returns a new, canonical dict (the input is not modified): mapping keys sorted at every
    level and whole-number floats as ints, so a config re-saved with its keys in another
    order, or with `epochs: 10.0`, gives Snakemake the same params and reruns nothing.
    Top-level `x-...` keys (a home for YAML anchors) are dropped, crawl.formats are written
    as Pillow names them (upper case). Raises ConfigError naming the key.

    thorough=False leaves out the checks that read URL lists or import the crawl code (~1 s:
    pandas, icrawler), icrawler's filters, Pillow or numpy: for a job's own Snakemake process,
    which parses the workflow again after the main process has checked the same config; the
    result is the same.
    """
    config = copy.deepcopy(config)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ConfigError(schema_error_message(errors[0]))
    config = {key: value for key, value in config.items() if not key.startswith("x-")}
    sweeps = {name: model for name, model in config["models"].items() if "sweep" in model}
    config["models"] = _expanded_models(config["models"], schema)
    swept = {name: list(expand_sweeps({name: model})) for name, model in sweeps.items()}
    keys = ModelKeys({expanded: name for name, names in swept.items() for expanded in names})
    _check_keys_have_effect(config["models"], keys)
    fill_defaults(config, schema, schema)
    base_dir = Path(base_dir)
    _check_names_differ_beyond_case(config, keys)
    _check_sources(config, base_dir, thorough)
    if thorough:
        _check_sources_belong_to_one_class(config, base_dir)
        _check_crawl_format_names(config)
        _check_builtin_sources_pass_crawl_limits(config)
    # the crawl's params then do not change with the spelling
    config["crawl"]["formats"] = list(dict.fromkeys(name.upper() for name in config["crawl"]["formats"]))
    _check_dedupe(config, base_dir)
    _check_crawl(config)
    _check_split(config)
    _check_models(config, base_dir, swept, keys)
    _check_predict(config, base_dir, swept)
    return canonical(config)


def _check_localize(config: dict, model_name: str, model: dict, keys) -> None:
    """A localising model needs classes whose sources give boxes, and no augmentation (the
    flips and affine moves would move the object away from its box)."""
    with_boxes = [name for name, spec in config["classes"].items()
                  if any("synthetic" in source or source.get("boxes") for source in spec["sources"])]
    if not with_boxes:
        raise ConfigError(f"{keys(model_name, 'task')}: localize needs boxes, and no class has a source that gives "
                          f"them (a folder's `boxes`, or a synthetic source)")
    if model["augment"] != "none":
        raise ConfigError(f"{keys(model_name, 'augment')}: {model['augment']} flips and moves images, which would "
                          f"leave their boxes behind; task localize trains with augment: none")


def _expanded_models(models: dict, schema: dict) -> dict:
    """Sweeps written out, each swept value checked against the model schema by its key."""
    try:
        expanded = expand_sweeps(models)
    except SweepError as error:
        raise ConfigError(str(error)) from None
    model_schema = resolve_refs(schema["$defs"]["model"], schema) | {"$defs": schema["$defs"]}
    validator = jsonschema.Draft202012Validator(model_schema)
    for base_name, settings in models.items():
        for key, values in settings.get("sweep", {}).items():
            if key not in model_schema["properties"]:
                raise ConfigError(f"config key 'models.{base_name}.sweep.{key}': not a model setting"
                                  f"{did_you_mean(key, model_schema['properties'])}")
            for index, value in enumerate(values):
                error = jsonschema.exceptions.best_match(validator.iter_errors({"arch": "x", key: value}))
                if error is not None:
                    raise ConfigError(f"config key 'models.{base_name}.sweep.{key}[{index}]': {error.message}"
                                      f"{number_as_text_hint(error)}")
    return expanded

