"""`qexport demo`: build a tiny model locally, export every format, reload each through transformers, compare."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch


def reload_check(export_dir: Path, source_dir: Path, ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """Reload through transformers; compare with the source and with our own dequantization of the files."""
    from .checkpoint import load_config
    from .dequant import dequantized_state_dict
    from .functional import compare, load_model, model_from_state_dict, model_outputs

    model, info = load_model(export_dir)
    loaded = model_outputs(model, ids)
    ours = model_outputs(model_from_state_dict(load_config(source_dir), dequantized_state_dict(export_dir)), ids)
    agreement = compare(reference, loaded)
    return {
        "reload ok": not any(info.values()),
        "equals own dequant": torch.equal(loaded, ours),
        "max |Δlogit| vs source": agreement.max_abs_diff,
        "KLD mean": agreement.kld_mean,
        "top-1": agreement.top1,
    }


def demo_verification(check: dict, ids: torch.Tensor) -> dict:
    """The demo's checks as a verification result for the export's model card and manifest."""
    from .card import verification_result

    return verification_result("qexport demo", [
        {"name": "reload: no missing / unexpected / mismatched keys", "value": check["reload ok"],
         "threshold": "yes", "passed": check["reload ok"]},
        {"name": "reloaded logits equal qexport's own dequantization", "value": check["equals own dequant"],
         "threshold": "bit for bit", "passed": check["equals own dequant"]},
        # Random-init weights are no quality proxy: these are reported, not judged.
        {"name": "KLD mean vs source", "value": check["KLD mean"]},
        {"name": "top-1 agreement vs source", "value": check["top-1"]},
        {"name": "max |Δlogit| vs source", "value": check["max |Δlogit| vs source"]},
    ], reference="the bf16 source model (random init)",
        inputs=f"{ids.shape[0]} x {ids.shape[1]} fixed token ids")


def run_demo(out: str | Path, preset: str = "qwen3") -> int:
    from .card import update_card_verification
    from .export import ExportOptions, export_folder
    from .functional import fixed_token_ids, load_model, model_outputs
    from .report import export_rows, table
    from .tiny import PRESETS, build_tiny_model

    out = Path(out)
    if preset not in PRESETS:
        from .errors import InputError

        raise InputError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    source = out / "source"
    if source.exists():
        shutil.rmtree(source)
    print(f"building tiny {preset} model in {source} (random init, bf16) ...")
    build_tiny_model(source, preset)
    export_dir = out / "export"
    print(f"exporting to {export_dir}/{{fp16,int8,int4}} ...")
    started = time.perf_counter()
    manifests = export_folder(source, export_dir, ExportOptions(overwrite=True, progress=False))
    seconds = time.perf_counter() - started

    src_model, _ = load_model(source)
    ids = fixed_token_ids(src_model.config.vocab_size)
    reference = model_outputs(src_model, ids)
    rows = export_rows(manifests)
    failed = False
    for row in rows:
        check = reload_check(export_dir / row["format"], source, ids, reference)
        failed |= not (check["reload ok"] and check["equals own dequant"])
        row.update(check)
        update_card_verification(export_dir / row["format"], demo_verification(check, ids))
    print(f"\nexported 3 formats in {seconds:.1f} s\n")
    print(table(rows))
    print("\nreload ok: transformers reports no missing / unexpected / mismatched keys;"
          "\nequals own dequant: its logits equal those of qexport's own dequantized weights, bit for bit.")
    return 1 if failed else 0
