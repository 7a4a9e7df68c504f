"""The README.md model card of an export folder, computed from its manifest (qexport.json) and config.json.

The card is a pure function of (manifest, config, source README): the same export writes the same bytes. It is
written before the manifest and listed in the manifest's `files`, so every byte of the folder is accounted for.
Verification results live in the manifest under "verification"; `update_card_verification` stores them there,
rewrites the card and updates the card's entry in the manifest in one step.

A verification result is a JSON-able dict:

    {"tool": "qexport verify",                 # who checked
     "reference": "the source model folder",   # what the export was compared with (optional)
     "inputs": "4 x 64 fixed token ids",       # what was run (optional)
     "checks": [{"name": "KLD mean", "value": 0.0012, "threshold": "<= 0.01", "passed": True}, ...],
     "thresholds_changed": ["min_top1: disabled (default 0.9)"]}   # thresholds that are not the defaults

`threshold` and `passed` are None for a number reported without a limit; "passed" of the whole result is
computed: no check has passed == False.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qexport.io.identity import FRONT_MATTER, HUB_ID, readme_front_matter
from qexport.report.escape import markdown_block_safe, markdown_safe, quote_markdown, terminal_safe
from qexport.report.values import format_value, human_bytes
from qexport.io.checkpoint import MANIFEST_FILE, declared_dtype
from qexport.io.safe_fs import write_text_atomic

CARD_FILE = "README.md"
CARD_MARK = "<!-- qexport model card"
README_BEGIN = "<!-- qexport:source-readme begin -->"
README_END = "<!-- qexport:source-readme end -->"
PATH_PLACEHOLDER = "path/to/this/folder"
# Front matter keys of the source's card that still describe the export (a quantized copy keeps its license).
CARRIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag")
PACKAGES = {"transformers": "transformers>=4.56", "compressed-tensors": "compressed-tensors>=0.12"}
LM_HEAD_WHY = ("the output projection stays 16-bit by default (`ignore`): it is the layer most sensitive to "
               "quantization error, and in many models it shares its matrix with the input embedding")


# ---------------------------------------------------------------------------------------------------------------
# Facts


def layer_type(name: str) -> str:
    """A tensor name with its block numbers replaced by `*`: model.layers.*.mlp.up_proj.weight."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def verification_result(tool: str, checks: list[dict], reference: str | None = None,
                        inputs: str | None = None, thresholds_changed: list[str] | None = None) -> dict:
    """A verification result in the shape the card and the manifest store (see the module docstring).

    `thresholds_changed` lists the thresholds that differ from the format's defaults (`min_top1: disabled
    (default 0.9)`): the card states them next to the verdict, so a pass under a loosened gate never reads as
    a plain PASSED."""
    normalized = []
    for check in checks:
        unknown = set(check) - {"name", "value", "threshold", "passed"}
        if "name" not in check or unknown:
            raise ValueError(f"verification check {check!r}: needs 'name', may have value, threshold, passed")
        normalized.append({"name": str(check["name"]), "value": check.get("value"),
                           "threshold": check.get("threshold"), "passed": check.get("passed")})
    return {"tool": tool, "reference": reference, "inputs": inputs,
            "passed": all(c["passed"] is not False for c in normalized), "checks": normalized,
            "thresholds_changed": [str(t) for t in thresholds_changed or []]}


def _normalize(results: dict) -> dict:
    return verification_result(results["tool"], list(results.get("checks", [])), results.get("reference"),
                               results.get("inputs"), results.get("thresholds_changed"))


# ---------------------------------------------------------------------------------------------------------------
# The source README: embedded as a Markdown block quote between markers (`quote_markdown`). Quoted, nothing in it
# (a heading, a line reading "PASSED", YAML front matter, a lone "\r", a `</blockquote>`) can pass for part of the
# card; every line is kept. What reads back is the README as embedded (`readme_as_embedded`): line breaks other
# than "\n" as character references, HTML shown as text.


def embed_readme(text: str) -> str:
    return quote_markdown(text)


def readme_as_embedded(text: str) -> str:
    """What `source_readme_of` reads back from a card that embeds `text`."""
    return unembed_readme(embed_readme(text))


def unembed_readme(region: str) -> str:
    """The inverse of `embed_readme`; also reads cards written before the quoting (the README verbatim, its front
    matter fenced as a yaml code block)."""
    lines = region.split("\n")
    if all(line.startswith(">") for line in lines):
        return "\n".join(line[2:] if line.startswith("> ") else line[1:] for line in lines)
    fence = "```yaml\n"
    if region.startswith(fence):
        match = FRONT_MATTER.match(region, len(fence))
        if match and region.startswith("```\n", match.end()):
            return match.group(0) + region[match.end() + len("```\n"):]
    return region


def source_readme_of(card_text: str) -> str | None:
    """The source README a card embeds; a README.md that is not a qexport card is itself the source README."""
    if CARD_MARK not in card_text:
        return card_text
    # The markers are whole lines of the card's own: a name quoting them inside a line (in inline code) is not one.
    begin, end = card_text.find(f"\n{README_BEGIN}\n"), card_text.rfind(f"\n{README_END}")
    if begin < 0 or end < begin:
        return None
    region = card_text[begin + len(README_BEGIN) + 2: end + 1]
    return unembed_readme(region.removesuffix("\n"))


# ---------------------------------------------------------------------------------------------------------------
# Rendering. Every string that comes from the folders (names of tensors, modules and files, config and manifest
# values, check details) goes through `markdown_safe` (qexport.report.escape): it cannot add a line (a forged
# **PASSED**), HTML, a link, emphasis or a table cell to the card.


def _plain(text) -> str:
    """One line of text for a table cell or sentence (markdown_safe)."""
    return markdown_safe(text)


def _code(name) -> str:
    """A name as inline code (literal inside: `model.layers.*.mlp`); one that a code span cannot hold as it is (a
    backtick, a control character or line break, a table's `|`, outer spaces) as markdown_safe HTML code."""
    name = str(name)
    if "`" in name or "|" in name or terminal_safe(name) != name or name != name.strip() or not name:
        return f"<code>{markdown_safe(name)}</code>"
    return f"`{name}`"


def _inert(value) -> bool:
    """A value from the folders (front matter, manifest words) with nothing markdown_safe would change: it can be
    written as it is."""
    if isinstance(value, str):
        return markdown_safe(value) == value
    if isinstance(value, (list, tuple)):
        return all(_inert(v) for v in value)
    return isinstance(value, (int, float, bool)) or value is None


def _num(value) -> str:
    return format_value(value, missing="–")


def _ratio(value) -> str:
    return "–" if value is None else f"{format_value(value)}×"


def _is_causal_lm(config: dict) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def _is_quantized(manifest: dict) -> bool:
    return bool(manifest.get("parameters", {}).get("weights"))


def _float_dtypes(manifest: dict) -> list[str]:
    """The floating dtypes the folder stores, as fp16 / bf16 / fp32 (in order of first appearance)."""
    names = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}
    return list(dict.fromkeys(names[t["dtype"]] for t in manifest["tensors"].values() if t["dtype"] in names))


def _title(manifest: dict, config: dict) -> str:
    """The heading's text, markdown_safe: `architectures`, base_model and the manifest's words come from files."""
    return markdown_safe(_title_text(manifest, config))


def _title_text(manifest: dict, config: dict) -> str:
    architectures = config.get("architectures")
    arch = ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures else "model"
    name = manifest["source"].get("base_model") or f"{manifest.get('model_type')} ({arch})"
    params = manifest.get("parameters", {})
    weights = params.get("weights")
    if not weights:
        return f"{name}, unquantized {'/'.join(_float_dtypes(manifest)).upper()}"
    detail = f"group {weights['group_size']}" if weights.get("strategy") == "group" else f"per {weights['strategy']}"
    return f"{name}, {manifest['format'].upper()} {params.get('scheme', '')} ({detail})".replace("  ", " ")


def front_matter(manifest: dict, config: dict, source_readme: str | None) -> str:
    source = readme_front_matter(source_readme)
    data: dict = {}
    base = manifest["source"].get("base_model")
    quantized = _is_quantized(manifest)
    if isinstance(base, str) and HUB_ID.fullmatch(base):
        data["base_model"] = base
        if quantized:
            data["base_model_relation"] = "quantized"
    data["library_name"] = "transformers"
    if quantized:
        tags = ["qexport", manifest["format"], "compressed-tensors", manifest["parameters"]["scheme"].lower()]
    else:
        tags = ["qexport", *_float_dtypes(manifest)]
    data["tags"] = [t for t in tags if _inert(t)]
    for key in CARRIED_KEYS:
        if key in source and _inert(source[key]):  # a value with a line break or markup is left behind
            data[key] = source[key]
    if "pipeline_tag" not in data and _is_causal_lm(config):
        data["pipeline_tag"] = "text-generation"
    import yaml

    # width: no value is folded onto a line of its own
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=float("inf")) + "---\n"


def _quantized_description(manifest: dict, config: dict) -> str:
    weights = manifest["parameters"]["weights"]
    qc = config.get("quantization_config") or {}
    layout = qc.get("format", "")
    params = manifest["parameters"]
    scale_dtype, scheme = markdown_safe(params.get("scale_dtype", "float16")), markdown_safe(params.get("scheme"))
    count = sum(1 for name, t in manifest["tensors"].items() if t["quantized"] and name.endswith(
        (".weight_packed", ".weight")) and t["dtype"] in ("I32", "I8"))
    bits = weights["num_bits"]
    if layout == "pack-quantized":
        stored = (f"{bits}-bit signed integers packed {32 // bits} per int32 word (`weight_packed`), the original "
                  f"shape (`weight_shape`)")
    else:
        stored = f"{bits}-bit signed integers, one per int{bits} (`weight`)"
    if weights.get("strategy") == "group":
        choice = {"auto": " (chosen automatically: the largest of 128, 64, 32 that every quantized Linear's "
                          "input size divides by)", "given": " (given with `--group-size`)"}
        scales = f"one {scale_dtype} scale per group of " \
                 f"{markdown_safe(weights['group_size'])} input columns (`weight_scale`)" \
                 + choice.get(manifest["parameters"].get("group_size_choice"), "")
    else:
        scales = f"one {scale_dtype} scale per output channel (`weight_scale`)"
    if weights.get("symmetric", True):
        arithmetic = f"symmetric, no zero point, scale = absmax / {(2 ** bits - 1) / 2}"
    else:
        arithmetic = (f"asymmetric: scale = (max − min) / {2 ** bits - 1} over each group's range (widened to "
                      f"include 0), with a {bits}-bit zero point per group packed {32 // bits} per int32 word "
                      f"along the output dimension (`weight_zero_point`); w ≈ (q − zero point) · scale")
    if manifest["parameters"].get("method") == "mse":
        arithmetic += (" — each group's range first clipped by the factor from 1.0 down to 0.8 whose "
                       "reconstruction has the lowest error (sum |w − ŵ|^2.4) (`--int4-method mse`, no data)")
    return (f"- **Quantized**: {count} `nn.Linear` weights, {manifest['summary']['quantized_weights']:,} "
            f"weights in all: {stored} and {scales}; {arithmetic}, round half to even. Activations stay 16-bit "
            f"({scheme}): transformers dequantizes on load, vLLM runs its own "
            f"kernels.")


def quantized_share_line(summary: dict) -> str | None:
    """How much of the Linears this export targets is quantized, or None for a manifest without the counts."""
    share = summary.get("quantized_linear_share")
    if summary.get("linear_weights") is None or share is None:
        return None
    dense = summary["linear_weights"] - summary["quantized_linears"]
    return (f"- **Quantized share**: {summary['quantized_linears']} of {summary['linear_weights']} targeted "
            f"`nn.Linear` weights, {100 * share:.1f}% of their bytes"
            + (f" ({dense} kept dense, listed below)" if dense else "") + ".")


def _dense_description(manifest: dict, config: dict) -> list[str]:
    lines = []
    if not _is_quantized(manifest):
        dtypes = ", ".join(_float_dtypes(manifest)) or "no floating-point tensors"
        lines.append(f"- **Nothing is quantized**: floating-point tensors are stored as {dtypes}; integer tensors "
                     "are kept as they are.")
    else:
        lines.append(f"- **Kept dense ({declared_dtype(config) or 'float32'})**:")
        tensors = manifest["tensors"]
        for module in manifest.get("ignore", []):
            if f"{module}.weight" in manifest.get("dense_linears", {}):
                continue
            present = f"{module}.weight" in tensors
            if module == "lm_head" and not present and config.get("tie_word_embeddings") and _is_causal_lm(config):
                lines.append(f"  - {_code(module)}: tied to the input embedding (stored once, dense); {LM_HEAD_WHY}")
            elif not present:
                continue  # an ignore pattern this model has no module for (lm_head of an encoder)
            elif module == "lm_head":
                lines.append(f"  - {_code(module)}: {LM_HEAD_WHY}")
            else:
                lines.append(f"  - {_code(module)}: in the `ignore` list of this export")
        for name, why in manifest.get("dense_linears", {}).items():
            lines.append(f"  - {_code(name.removesuffix('.weight'))}: {_plain(why)}")
        ignored = {f"{m}.weight" for m in manifest.get("ignore", [])} | set(manifest.get("dense_linears", {}))
        other = [n for n, t in tensors.items() if not t["quantized"] and n not in ignored]
        kinds = list(dict.fromkeys(layer_type(n) for n in other))
        if other:
            lines.append(f"  - everything that is not an `nn.Linear` weight (embeddings, norms, biases): "
                         f"{len(other)} tensors, {sum(tensors[n]['stored_bytes'] for n in other):,} bytes: "
                         + ", ".join(_code(k) for k in kinds))
    return lines


def _size_section(manifest: dict) -> list[str]:
    s = manifest["summary"]
    lines = ["## Size", "", "| file | bytes | size |", "|---|---:|---:|"]
    for f in manifest["files"]:
        if f["name"] != CARD_FILE:
            lines.append(f"| {_plain(f['name'])} | {f['bytes']:,} | {human_bytes(f['bytes'])} |")
    lines += ["", f"Plus this {CARD_FILE} and {MANIFEST_FILE} (the manifest: sha256 of every file, predicted and "
              "stored bytes of every tensor).", "",
              "| measure | value |", "|---|---:|",
              f"| bytes of all tensors | {s['tensor_bytes']:,} |",
              f"| the same tensors in float16 | {s['fp16_tensor_bytes']:,} |",
              f"| ratio vs fp16, whole model | {_ratio(s['ratio_vs_fp16'])} |",
              f"| quantized weights | {s['quantized_weights']:,} |",
              f"| bytes of quantized weights (with scales and shapes) | {s['quantized_bytes']:,} |",
              f"| ratio vs fp16, quantized weights | {_ratio(s['quantized_ratio_vs_fp16'])} |",
              "| bits per quantized weight | "
              + _num(s["bits_per_quantized_weight"])
              + " |", ""]
    return lines


def _verification_section(verification: dict | None) -> list[str]:
    lines = ["## Verification", ""]
    if not verification:
        return lines + ["Not verified yet. `qexport verify THIS_FOLDER --reference SOURCE` reloads it, compares it "
                        "with the source and records the results here.", ""]
    v = _normalize(verification)
    changed = v["thresholds_changed"]
    verdict = "PASSED" if v["passed"] else "FAILED"
    if changed:
        verdict += f" with {len(changed)} threshold(s) loosened, disabled or changed from the defaults"
    lines.append(f"**{verdict}** ({_plain(v['tool'])}"
                 + (f"; reference: {_plain(v['reference'])}" if v["reference"] else "")
                 + (f"; inputs: {_plain(v['inputs'])}" if v["inputs"] else "") + ").")
    if changed:
        # an empty item would end the list; a leading "-" or ">" would open a nested block
        lines += [""] + [f"- {markdown_block_safe(str(t).strip()) or '–'}" for t in changed]
    lines += ["", "| check | value | threshold | result |", "|---|---:|---|---|"]
    for c in v["checks"]:
        result = {True: "pass", False: "**FAIL**", None: "reported"}[c["passed"]]
        cells = [c["name"], _num(c["value"]), c["threshold"] or "–"]
        lines.append("| " + " | ".join(_plain(x) for x in cells) + f" | {result} |")
    return lines + [""]


def needed_packages(config: dict) -> list[str]:
    packages = [PACKAGES["transformers"]]
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        packages.append(PACKAGES["compressed-tensors"])
    return packages


def loading_snippet(config: dict, file_names: list[str]) -> str:
    """Python that loads the folder at PATH_PLACEHOLDER and runs it once."""
    has_tokenizer = any(n in file_names for n in ("tokenizer.json", "tokenizer_config.json"))
    causal = _is_causal_lm(config)
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    imports = f"from transformers import {auto}" + (", AutoTokenizer" if has_tokenizer else "")
    lines = ["import torch", imports, "",
             f'model_dir = "{PATH_PLACEHOLDER}"  # or the Hub repo id once uploaded',
             f"model = {auto}.from_pretrained(model_dir)  # computes in config.json's dtype "
             f"({declared_dtype(config) or 'float32'})"]
    if has_tokenizer:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(model_dir)",
                  'inputs = tokenizer("The quick brown fox", return_tensors="pt")']
    else:
        lines.append("inputs = {\"input_ids\": torch.tensor([[1, 2, 3, 4]])}")
    if causal and has_tokenizer:
        lines += ["output = model.generate(**inputs, max_new_tokens=20, do_sample=False)",
                  "print(tokenizer.decode(output[0], skip_special_tokens=True))"]
    elif causal:
        lines += ["with torch.no_grad():", "    logits = model(**inputs).logits", "print(logits.shape)"]
    else:
        lines += ["with torch.no_grad():", "    embedding = model(**inputs).last_hidden_state.mean(dim=1)",
                  "print(embedding.shape)"]
    return "\n".join(lines) + "\n"


def _loading_section(manifest: dict, config: dict) -> list[str]:
    names = [f["name"] for f in manifest["files"]]
    packages = " ".join(f'"{p}"' for p in needed_packages(config))
    lines = ["## How to load", "", f"Needs `{'`, `'.join(needed_packages(config))}` and torch:", "",
             "```bash", f"pip install {packages} torch", "```", "",
             "```python", loading_snippet(config, names).rstrip("\n"), "```", ""]
    if _is_quantized(manifest) and _is_causal_lm(config):
        lines.append(f"vLLM loads the same folder: the compressed-tensors layout is its native format for "
                     f"{markdown_safe(manifest['parameters']['scheme'])} (`vllm serve {PATH_PLACEHOLDER}`).")
    elif _is_quantized(manifest):
        lines.append("vLLM reads the same compressed-tensors layout for the encoder architectures it supports.")
    else:
        lines.append(f"vLLM loads the same folder as a plain checkpoint (`vllm serve {PATH_PLACEHOLDER}`).")
    return lines + [""]


def render_card(manifest: dict, config: dict, source_readme: str | None = None,
                verification: dict | None = None) -> str:
    """The card's text: front matter, what the folder is, sizes, verification, loading, the source's README."""
    verification = verification if verification is not None else manifest.get("verification")
    title = _title(manifest, config)
    base = manifest["source"].get("base_model")
    origin = _code(base) if base else f"a {_code(manifest.get('model_type'))} model"
    # `original` is the internal format of `qexport merge` (tensors unchanged): no "export" a user asked for.
    holds = f"{origin}, unquantized" if manifest["format"] == "original" else \
        f"the {_code(manifest['format'])} export of {origin}"
    what = (f"This folder holds {holds}, written by qexport "
            f"{markdown_safe(manifest['qexport_version'])}"
            + (f" in the compressed-tensors {_code(config['quantization_config'].get('format'))} layout, which "
               "transformers and vLLM load natively." if config.get("quantization_config") else
               ": a plain safetensors checkpoint.")
            + (" The source is a merge made by `qexport merge` (what was merged: `source.merge` in "
               f"{MANIFEST_FILE})." if manifest["source"].get("merge") else ""))
    lines = [front_matter(manifest, config, source_readme).rstrip("\n"),
             f"{CARD_MARK}: generated from {MANIFEST_FILE}; `qexport verify` rewrites it -->", "",
             f"# {title}", "", what, "", "## What is stored", ""]
    if _is_quantized(manifest):
        lines.append(_quantized_description(manifest, config))
        share = quantized_share_line(manifest["summary"])
        if share:
            lines.append(share)
    lines += _dense_description(manifest, config)
    if _is_quantized(manifest):
        lines += ["", "Which tensors are `nn.Linear` weights was read from the model's structure (instantiated "
                  "without memory on the `meta` device), not guessed from names."]
    lines.append("")
    lines += _size_section(manifest)
    lines += _verification_section(verification)
    lines += _loading_section(manifest, config)
    if source_readme is not None:
        lines += ["## Original model card", "",
                  "The source folder's README.md, unchanged but quoted: nothing below is a statement of this card.",
                  "", README_BEGIN, embed_readme(source_readme), README_END, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Files


def _read_config(folder: Path) -> dict:
    from qexport.io.safe_fs import MAX_CONFIG_BYTES, load_json

    config = load_json(folder / "config.json", "config.json", MAX_CONFIG_BYTES)
    return config if isinstance(config, dict) else {}


def write_card(folder: str | Path, manifest: dict, verification: dict | None = None,
               source_readme: str | None = None) -> dict:
    """Write FOLDER/README.md from the manifest; returns its file record {name, bytes, sha256}.

    `source_readme` None keeps the source README the folder's current card embeds (a README.md that is not a
    qexport card is kept whole). `verification` None uses manifest["verification"]. This writes only README.md:
    use `update_card_verification` to keep qexport.json consistent.
    """
    from qexport.io.safetensors_file import sha256_file

    folder = Path(folder)
    path = folder / CARD_FILE
    text = card_text(folder, manifest, verification, source_readme)
    write_text_atomic(path, text)
    return {"name": CARD_FILE, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def card_text(folder: Path, manifest: dict, verification: dict | None = None, source_readme: str | None = None) -> str:
    """What `write_card` writes, without writing it."""
    from qexport.errors import InputError
    from qexport.io.safe_fs import MAX_JSON_BYTES, read_bytes

    path = Path(folder) / CARD_FILE
    if source_readme is None and path.is_file():
        source_readme = source_readme_of(read_bytes(path, CARD_FILE, MAX_JSON_BYTES).decode("utf-8", "replace"))
    try:
        return render_card(manifest, _read_config(Path(folder)), source_readme, verification)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"{Path(folder) / MANIFEST_FILE}: not a complete qexport manifest, cannot render the "
                         f"card ({type(e).__name__}: {str(e)[:80]})")


def update_card_verification(folder: str | Path, results: dict) -> dict:
    """Record verification results in FOLDER/qexport.json, rewrite README.md and its manifest entry; returns
    the updated manifest. `results` is a verification result (see the module docstring)."""
    import hashlib

    from qexport.errors import InputError
    from qexport.io import folder_transaction
    from qexport.io.safe_fs import load_json

    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    # One transaction under the folder's lock: the manifest read, the card rendered from it, both written together
    # (a run killed between the two renames is finished by the next one; a second run waits).
    with folder_transaction.settled(folder):
        manifest = load_json(manifest_path, MANIFEST_FILE)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), list)
                and isinstance(manifest.get("summary"), dict)
                and all(isinstance(f, dict) and isinstance(f.get("bytes"), int) for f in manifest["files"])):
            raise InputError(f"{manifest_path}: not a qexport manifest (needs files and summary); card not written")
        manifest["verification"] = _normalize(results)
        data = card_text(folder, manifest).encode("utf-8", errors="backslashreplace")
        record = {"name": CARD_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        files = [f for f in manifest["files"] if f.get("name") != CARD_FILE] + [record]
        manifest["files"] = files
        manifest["summary"]["total_bytes"] = sum(f["bytes"] for f in files)
        manifest_text = json.dumps(manifest, indent=2) + "\n"
        folder_transaction.replace(folder, {CARD_FILE: data, MANIFEST_FILE: manifest_text.encode("utf-8")})
    return manifest
