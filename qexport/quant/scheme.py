"""Which config group of a compressed-tensors `quantization_config` applies to a module: the one matcher of
`targets` and `ignore` that the rest of qexport calls, with the rules compressed-tensors applies when transformers
loads a model (compressed_tensors.utils.match, `is_match` and `match_targets`):

- a target `re:<pattern>` matches a module name the pattern matches from its start (`re.match`: a prefix is
  enough, the end of the name is not anchored);
- any other target matches the exact module name, or the name of the module's class or of one of its bases
  (`Linear`); a plain target never matches a suffix of the name;
- a module that any `ignore` entry matches is not quantized, whatever its groups say;
- when several targets match, the most specific wins: exact names first, then patterns (each in sorted order),
  then classes; a target listed in two groups belongs to the later one.

Where only tensor names are known (headers, stored checkpoints), the module's class is unknown: `classes=None`
then lets every target that can name a class (CamelCase, not `re:`) match, after the names and patterns.
Patterns come from untrusted config.json and are matched through io.untrusted_regex (bounded in size and time).
"""

from __future__ import annotations

from qexport.io import untrusted_regex

# The tensors compressed-tensors stores for one quantized Linear, by leaf name (beside its dense `weight`).
QUANT_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")

WHERE = "config.json: quantization_config"
LINEAR = ("Linear", "Module")  # the class names an nn.Linear answers to (its class and its bases)


def classes_of(module) -> tuple[str, ...]:
    """The class names a module answers to as a target: its class and every torch.nn.Module base."""
    import torch

    return tuple(c.__name__ for c in type(module).__mro__ if issubclass(c, torch.nn.Module))


def strings(value) -> list[str]:
    """A list of strings from a JSON value that should be one (targets, ignore); anything else gives []."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def config_groups(qc) -> dict[str, dict]:
    """The config groups that are JSON objects, by name ({} for a config without any)."""
    groups = qc.get("config_groups") if isinstance(qc, dict) else None
    return {str(k): v for k, v in groups.items() if isinstance(v, dict)} if isinstance(groups, dict) else {}


def name_matches(target: str, name: str, where: str = WHERE) -> bool:
    """compressed-tensors' `match_name`: a `re:` pattern matched from the start of `name`, else the exact name."""
    if target.startswith("re:"):
        return untrusted_regex.match(target[3:], name, where)
    return target == name


def class_matches(target: str, classes: tuple[str, ...] | None) -> bool:
    """A target naming one of `classes`; with classes unknown (None), any target that can name a class."""
    if target.startswith("re:"):
        return False
    return target[:1].isupper() if classes is None else target in classes


def matches(target, name: str, classes: tuple[str, ...] | None = LINEAR, where: str = WHERE) -> bool:
    """One target or ignore entry against module `name` of `classes` (compressed-tensors' `is_match`)."""
    return isinstance(target, str) and (name_matches(target, name, where) or class_matches(target, classes))


def is_ignored(qc, name: str, classes: tuple[str, ...] | None = LINEAR, where: str = WHERE) -> bool:
    return isinstance(qc, dict) and any(matches(t, name, classes, where) for t in strings(qc.get("ignore")))


def group_for(qc, name: str, classes: tuple[str, ...] | None = LINEAR,
              where: str = WHERE) -> tuple[str, dict] | None:
    """(group name, group) of the config group whose targets pick module `name`, `ignore` not considered; None
    when no target matches it."""
    owner = {}
    for group, spec in config_groups(qc).items():
        for target in strings(spec.get("targets")):
            owner[target] = (group, spec)
    ordered = sorted(owner, key=lambda t: ("re:" in t, t))
    for target in ordered:
        if name_matches(target, name, where):
            return owner[target]
    for target in ordered:
        if class_matches(target, classes):
            return owner[target]
    return None


def weights_args(qc, name: str, classes: tuple[str, ...] | None = LINEAR, where: str = WHERE) -> dict | None:
    """The `weights` quantization args that apply to module `name`, or None if it is ignored, not targeted, or
    its group has no `weights` object."""
    if is_ignored(qc, name, classes, where):
        return None
    found = group_for(qc, name, classes, where)
    weights = found[1].get("weights") if found else None
    return weights if isinstance(weights, dict) else None
