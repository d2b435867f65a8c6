"""The config schema (JSON Schema in YAML, with defaults): loading it, filling defaults, and
saying what is wrong in the words of the key that holds it (did you mean, which branch was
meant, a number written as text); YAML syntax errors and keys given twice, with line and column.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A config mistake, reported with the key that holds it."""


def key_path(parts) -> str:
    """Dotted key path: ('classes', 'cat', 'sources', 0) -> 'classes.cat.sources[0]'."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def load_schema(schema_path: Path | str) -> dict:
    with open(schema_path) as handle:
        return yaml.safe_load(handle)


def resolve_refs(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        pointer = schema["$ref"].removeprefix("#/").split("/")
        schema = root
        for part in pointer:
            schema = schema[part]
    return schema


def fill_defaults(instance: Any, schema: dict, root: dict) -> None:
    """Set schema defaults in place, descending into properties, maps, lists and oneOf.

    jsonschema's usual default-setting validator mutates the instance while trying every
    oneOf branch, which corrupts sources; this walker only descends into the branch the
    (already valid) instance matches.
    """
    schema = resolve_refs(schema, root)
    if "oneOf" in schema:
        for branch in schema["oneOf"]:
            resolved = resolve_refs(branch, root) | {"$defs": root.get("$defs", {})}
            if jsonschema.Draft202012Validator(resolved).is_valid(instance):
                fill_defaults(instance, branch, root)
                return
        return
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name, subschema in properties.items():
            subschema_resolved = resolve_refs(subschema, root)
            if name not in instance and "default" in subschema_resolved:
                instance[name] = copy.deepcopy(subschema_resolved["default"])
            if name in instance:
                fill_defaults(instance[name], subschema, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in properties:
                    fill_defaults(value, extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"], root)


def schema_error_message(error: jsonschema.ValidationError) -> str:
    best = jsonschema.exceptions.best_match([error])
    if best.context:
        best = _intended_branch_error(best)
    if best.validator == "additionalProperties" and best.validator_value is False and isinstance(best.instance, dict):
        return _unknown_keys_message(best)
    return f"config key '{key_path(best.absolute_path)}': {best.message}{number_as_text_hint(best)}"


def _unknown_keys_message(error: jsonschema.ValidationError) -> str:
    """"unknown key 'model'; did you mean 'models'?" instead of jsonschema's "does not match any
    of the regexes: '^x-'" or "Additional properties are not allowed", at every level."""
    known = list(error.schema.get("properties", {}))
    patterns = list(error.schema.get("patternProperties", {}))
    unknown = [key for key in error.instance
               if key not in known and not any(re.search(pattern, str(key)) for pattern in patterns)]
    anchors = " (or an x-... key for YAML anchors)" if "^x-" in patterns else ""
    return "; ".join(
        f"config key '{key_path([*error.absolute_path, key])}': unknown key '{key}'"
        + (did_you_mean(str(key), known) or f"; the keys here are {', '.join(sorted(known))}{anchors}")
        for key in unknown)


def did_you_mean(name: str, choices) -> str:
    """"; did you mean 'x'?" for the closest of `choices` (a typo, or a part of the name: 'uri' for
    'tracking_uri'), or "" when none is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close and len(name) >= 3:
        close = [choice for choice in choices if name.lower() in choice.lower()][:2]
    return f"; did you mean {' or '.join(repr(choice) for choice in close)}?" if close else ""


def _intended_branch_error(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The error of the oneOf branch the user meant: the one whose required keys are all there.

    A source `{urls: list.txt, threads: 0}` fails every branch; only the urls branch has its
    required key, so its error ('threads: 0 is less than the minimum of 1') is the mistake,
    not the folder branch's "'threads', 'urls' were unexpected".
    """
    by_branch: dict = {}
    for branch_error in error.context:
        by_branch.setdefault(branch_error.relative_schema_path[0], []).append(branch_error)
    meant = [errors for errors in by_branch.values() if not any(e.validator == "required" for e in errors)]
    if len(meant) == 1:
        return jsonschema.exceptions.best_match(meant[0])
    instance = error.instance if isinstance(error.instance, dict) else {}
    # No branch complete: the one sharing a required key with the instance ({engine: bing}
    # lacks the engine branch's queries).
    partly = [errors for errors in by_branch.values()
              if any(e.validator == "required" and set(e.schema["required"]) & set(instance) for e in errors)]
    if not meant and len(partly) == 1:
        return next(e for e in partly[0] if e.validator == "required")
    if not meant and isinstance(error.instance, dict):
        # Each branch's first required key names its kind (folder, digits, engine, urls).
        required = sorted({e.schema["required"][0] for e in error.context if e.validator == "required"})
        hint = next(filter(None, (did_you_mean(str(key), required) for key in error.instance)), "")
        got = ", ".join(map(str, error.instance)) or "none"
        error.message = f"needs one of the keys {', '.join(required)} (got {got}){hint}"
        return error
    return jsonschema.exceptions.best_match(error.context)


def number_as_text_hint(error: jsonschema.ValidationError) -> str:
    """YAML 1.1 (PyYAML, Snakemake) reads `1e-3` as text: say so where a number was wanted."""
    if error.validator != "type" or not isinstance(error.instance, str):
        return ""
    try:
        value = float(error.instance)
    except ValueError:
        return ""
    return f" (YAML reads {error.instance} as text; write {value!r} or {value:.1e} with a dot)"


def find_duplicate_keys(yaml_path: Path | str) -> list[str]:
    """Keys given twice in one mapping of a YAML file (YAML loaders silently keep the last).

    Keys that a mapping sets next to a merge key (`<<: *base`) override the merged ones:
    that is what merge keys are for, so only keys written twice by hand count.
    """

    class StrictLoader(yaml.SafeLoader):
        pass

    duplicates: list[str] = []

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                duplicates.append(f"'{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    with open(yaml_path, encoding="utf-8") as handle:  # as Snakemake reads it (PyYAML skips a BOM)
        yaml.load(handle, Loader=StrictLoader)
    return duplicates


def check_config_files(paths) -> None:
    """Fail on a YAML syntax error (with its line and column: Snakemake's own loader names neither)
    and on keys given twice in a config file (two classes or models with one name)."""
    for path in paths:
        try:
            duplicates = find_duplicate_keys(path)
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            context = f" ({error.context}" if error.context else ""
            if context and error.context_mark:
                context += f" that starts at line {error.context_mark.line + 1}, column {error.context_mark.column + 1}"
            raise ConfigError(f"config file '{path}'{where}: not valid YAML: {error.problem or error}"
                              f"{context + ')' if context else ''}; fix the file there") from None
        if duplicates:
            raise ConfigError(f"config file '{path}': key given twice: {', '.join(duplicates)}")

