"""Names that `qexport --help` lists, kept here so that help never imports torch (the registries they come from
do). tests/acceptance/test_reporting_labels.py holds each list equal to its registry: a new format, threshold or check that is
not added here fails there."""

from __future__ import annotations

# qexport.formats.user_formats()
FORMATS = ("fp16", "int8", "int4", "int4-asym")
# the fields of qexport.verify.thresholds.Thresholds
THRESHOLDS = ("min_sqnr_db", "dense_min_sqnr_db", "min_quantized_ratio", "max_kld_mean", "max_kld_p99", "min_top1",
              "min_cosine", "reload_max_abs_diff", "max_kld_vs_rtn", "kld_vs_rtn_slack", "max_top1_drop_vs_rtn",
              "max_cosine_gap_vs_rtn", "cosine_vs_rtn_slack")
# qexport.verify.CHECK_NAMES, then the checks of qexport.verify.ENGINE_CHECKS
CHECKS = ("safe_to_load", "model_type", "config_keys", "quantization_config", "shards", "manifest", "tensor_names", "layout", "bytes",
          "weights_sqnr", "tokenizer_files", "side_files", "tokenizer", "reload", "reload_matches_dequant",
          "finite_outputs", "functional", "functional_vs_rtn", "engine_sentence_transformers")
ENGINE_CHECKS = ("engine_vllm",)

EXIT_CODES = "exit codes: 0 all good; 1 a verification check failed; 2 bad input or usage (one line on stderr)"


def verify_epilog(width: int = 78) -> str:
    """Checks, threshold names and exit codes, one wrapped paragraph each (for a raw-text epilog)."""
    import textwrap

    text = (f"checks, in order: {', '.join(CHECKS)} (engine_sentence_transformers only for sentence-transformers "
            f"folders); with --engine vllm also {', '.join(ENGINE_CHECKS)}.\n\n"
            f"thresholds (--threshold NAME=VALUE): {', '.join(THRESHOLDS)}. Defaults per format: "
            f"qexport.verify.thresholds.DEFAULTS; int4-asym takes int4's.\n\n{EXIT_CODES}")
    return "\n\n".join(textwrap.fill(part, width) for part in text.split("\n\n"))
