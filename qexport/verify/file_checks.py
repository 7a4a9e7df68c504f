"""Checks of tokenizer and side files, and of the tokenizer's behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qexport.errors import InputError
from qexport.io.checkpoint import INDEX_FILE, MANIFEST_FILE, WEIGHT_SUFFIXES
from qexport.io.library_guard import LOAD_KWARGS
from qexport.io.safe_fs import load_json
from qexport.io.safetensors_file import sha256_file
from qexport.verify.context import (TOKENIZER_FILES, CheckResult, Context, fail, listing, ok, skip, has_tokenizer,
                      json_equal)


def _side_files(folder: Path) -> dict[str, Path]:
    not_side = {"config.json", INDEX_FILE, MANIFEST_FILE}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in not_side and not rel.startswith(".") and not rel.endswith(WEIGHT_SUFFIXES):
            out[rel] = path
    return out


def _is_tokenizer_file(rel: str) -> bool:
    return rel in TOKENIZER_FILES or rel.startswith("tokenizer")


# Files an export may legitimately rewrite: the model card (qexport writes its own card and embeds the source's
# README verbatim; other tools write theirs). Every other side file must hold the reference's content.
REWRITTEN_BY_EXPORT = ("README.md",)


def _read_json(path: Path, root: Path | None):
    """The JSON value of a side file, or None when it is not JSON within safe_fs' limits (compared as bytes)."""
    try:
        return load_json(path, path.name, root=root)
    except InputError:
        return None


def same_content(ref: Path, ours: Path, ref_root: Path | None = None, our_root: Path | None = None) -> bool:
    """Identical bytes, or (JSON files) the same JSON value once `transformers_version` is set aside: another
    tool's `save_pretrained` re-serialises generation_config.json and stamps its own version, which is not a
    change of content. NaN equals NaN."""
    if sha256_file(ref, root=ref_root) == sha256_file(ours, root=our_root):
        return True
    if ref.suffix != ".json":
        return False
    a, b = _read_json(ref, ref_root), _read_json(ours, our_root)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    a, b = ({k: v for k, v in d.items() if k != "transformers_version"} for d in (a, b))
    return json_equal(a, b)


def _card_keeps_source_readme(ref: Path, ours: Path) -> bool:
    """A qexport model card must embed the reference README unchanged; another tool's README may say anything."""
    from qexport.report.card import CARD_MARK, readme_as_embedded, source_readme_of

    text = ours.read_text(encoding="utf-8", errors="replace")
    if CARD_MARK not in text:
        return True
    embedded = source_readme_of(text)
    # The card ends the embedded README at its last line (trailing newlines are not kept); it embeds HTML as text
    # and line breaks other than "\n" as character references (readme_as_embedded).
    reference = readme_as_embedded(ref.read_text(encoding="utf-8", errors="replace"))
    return embedded is not None and embedded.rstrip("\n") == reference.rstrip("\n")


def _compare_files(ctx: Context, name: str, wanted: Callable[[str], bool]) -> CheckResult:
    ref = {rel: p for rel, p in _side_files(ctx.reference.folder).items() if wanted(rel)}
    if not ref:
        return skip(name, "the reference has none")
    missing = [rel for rel in ref if not (ctx.export / rel).is_file()]
    present = [rel for rel in ref if rel not in missing]
    rewritten = [rel for rel in present if rel in REWRITTEN_BY_EXPORT]
    changed = [rel for rel in present if rel not in rewritten and not same_content(
        ref[rel], ctx.export / rel, ctx.reference.folder, ctx.export)]
    changed += [rel for rel in rewritten if not _card_keeps_source_readme(ref[rel], ctx.export / rel)]
    metrics = {"missing": missing, "changed": changed, "allowed_to_differ": rewritten}
    if missing or changed:
        parts = ([f"missing {listing(missing)}"] if missing else []) + (
            [f"content differs from the reference: {listing(changed)}"] if changed else [])
        return fail(name, "; ".join(parts), **metrics)
    note = f" ({listing(rewritten)} may be rewritten: the model card)" if rewritten else ""
    return ok(name, f"all {len(ref)} reference files present with the reference's content{note}", **metrics)


def check_tokenizer_files(ctx: Context) -> CheckResult:
    return _compare_files(ctx, "tokenizer_files", _is_tokenizer_file)


def check_side_files(ctx: Context) -> CheckResult:
    """Generation config, chat templates, sentence-transformers modules, ...: present with the reference's content
    (README.md excepted: see REWRITTEN_BY_EXPORT)."""
    return _compare_files(ctx, "side_files", lambda rel: not _is_tokenizer_file(rel))


def check_tokenizer(ctx: Context) -> CheckResult:
    """The export's tokenizer loads and encodes real text exactly as the reference's does."""
    from qexport.verify.functional import SENTENCES
    from qexport.model.quiet import quiet

    name = "tokenizer"
    if not has_tokenizer(ctx.reference.folder):
        return skip(name, "the reference has no tokenizer")
    if ctx.tokenizer_problem is not None:
        return fail(name, ctx.tokenizer_problem)
    from transformers import AutoTokenizer

    texts = list(SENTENCES[:6]) + ["Unicode: naïve café — 東京 🙂", "  leading spaces\tand\ttabs\n"]
    try:
        with quiet():
            ref = AutoTokenizer.from_pretrained(str(ctx.reference.folder), **LOAD_KWARGS)
            ours = AutoTokenizer.from_pretrained(str(ctx.export), **LOAD_KWARGS)
    except Exception as e:
        return fail(name, f"AutoTokenizer.from_pretrained(export) fails: {type(e).__name__}: {e}")
    for text in texts:
        if ref(text)["input_ids"] != ours(text)["input_ids"]:
            return fail(name, f"encodes {text!r} differently from the reference")
    if getattr(ref, "chat_template", None) != getattr(ours, "chat_template", None):
        return fail(name, "chat template differs from the reference")
    return ok(name, f"{type(ours).__name__} encodes {len(texts)} texts as the reference does")



# Checks that hand a folder to transformers / tokenizers / sentence-transformers / vLLM: none of them runs on a
# folder whose JSON files name remote code, a path outside it or a module pickle (check_safe_to_load says which).
LIBRARY_CHECKS = ("config_keys", "tokenizer", "reload", "reload_matches_dequant", "finite_outputs", "functional",
                  "functional_vs_rtn", "engine_sentence_transformers", "engine_vllm")


def unsafe_summary(ctx: Context) -> str | None:
    """'export tokenizer_config.json: auto_map: ...' for the first finding of either folder, None if none."""
    found = [f"{which} {finding}" for which, findings in getattr(ctx, "unsafe", {}).items()
             for finding in findings]
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def check_safe_to_load(ctx: Context) -> CheckResult:
    """Neither folder names remote code, a path outside itself or a module pickle in its JSON files
    (json_paths.folder_findings), and the export holds no hard-linked file (json_paths.hard_linked)."""
    name = "safe_to_load"
    problems = [f"{which} {finding}" for which, findings in getattr(ctx, "unsafe", {}).items()
             for finding in findings]
    problems += [f"export {rel}: has other hard links (it may share its bytes with a file outside the export; "
                 f"publish a copy made with `cp -r`)" for rel in getattr(ctx, "hard_links", [])]
    metrics = {"problems": problems}
    if problems:
        blocked = "; no library was given these folders" if unsafe_summary(ctx) else ""
        return fail(name, "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                                      else "") + blocked, **metrics)
    return ok(name, "no remote code, no path outside the folders, no module pickle, no hard link", **metrics)
