"""Functional comparison of an export with its source: reload through transformers, run fixed inputs, compare.

Inputs: for a causal LM with a tokenizer, a fixed English text shipped with qexport (`EVAL_TEXT`, written for the
project) tokenized by the reference's own tokenizer and cut into windows (`text_windows`); random token ids only
for a model without a tokenizer (they overstate KLD 2-10x on real models); real sentences for encoders.

Metric definitions (shared by tests, `qexport verify` and reports; see design.md):
- KLD: KL(P_ref || P_quant) of next-token distributions per position; mean, p99 and max;
- top-1: share of positions whose argmax agrees with the reference;
- perplexity: exp of the mean next-token negative log-likelihood of the text (each window's first token is context
  only), for the source and for the export;
- cosine: cosine similarity of mean-pooled last hidden states (encoders), averaged over inputs (min kept too);
- max abs logit difference.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import build_config, model_class
from .checkpoint import declared_dtype, load_config


@contextlib.contextmanager
def quiet():
    """Silence transformers' and compressed-tensors' progress bars and warnings while loading."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    loggers = [logging.getLogger(n) for n in ("compressed_tensors", "accelerate")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def load_model(folder: str | Path, dtype=torch.float32):
    """Load a model folder with plain transformers (compressed-tensors decompresses on load).

    Returns (model, loading_info) where loading_info holds missing / unexpected / mismatched keys.
    """
    config = load_config(Path(folder))
    cls = model_class(build_config(config, Path(folder) / "config.json"))
    with quiet():
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    model.eval()
    return model, {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}


def config_dtype(config: dict) -> torch.dtype:
    """The dtype `from_pretrained` loads a folder in by default: config.json's `dtype` (transformers 5) or
    `torch_dtype` (older writers); float32 when neither names a floating-point dtype."""
    return getattr(torch, declared_dtype(config) or "float32")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class NonFinite:
    """Where a forward pass first produced NaN/Inf: the first module (in execution order) whose output holds one."""

    module: str | None  # e.g. model.layers.1.mlp.down_proj; None if only the final output is non-finite
    layer: int | None  # the block index in `module`'s name, when it has one
    share: float  # fraction of output values that are non-finite

    def describe(self, dtype: torch.dtype) -> str:
        where = "in the final outputs"
        if self.module is not None:
            where = f"first at {self.module}" + (f" (layer {self.layer})" if self.layer is not None else "")
        overflow = ""
        if dtype in (torch.float16, torch.bfloat16):
            overflow = f" ({dtype_name(dtype)} overflows above {torch.finfo(dtype).max:.6g})"
        return (f"{dtype_name(dtype)} load: non-finite hidden state {where}; {self.share:.1%} of the outputs are "
                f"NaN/Inf{overflow}")


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    if hasattr(output, "values") and callable(output.values):  # ModelOutput
        return next((t for t in output.values() if isinstance(t, torch.Tensor)), None)
    return None


@torch.no_grad()
def outputs_with_nonfinite(model, run) -> tuple[torch.Tensor, NonFinite | None]:
    """`run(model)`'s outputs, and where NaN/Inf first appeared inside the model if the outputs hold any.

    Forward hooks on every module record the first one (in the order modules finish, so the innermost) whose
    output is not finite; its name carries the decoder layer index (`model.layers.3.mlp.down_proj`)."""
    import re

    first: list[str] = []

    def hook(name):
        def record(module, args, output):
            t = _first_tensor(output)
            if not first and t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                first.append(name)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        out = run(model)
    finally:
        for h in handles:
            h.remove()
    finite = torch.isfinite(out)
    if bool(finite.all()):
        return out, None
    module = first[0] if first else None
    match = re.search(r"\.(\d+)(?:\.|$)", module or "")
    return out, NonFinite(module, int(match.group(1)) if match else None, 1 - finite.double().mean().item())


def model_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], dtype=torch.float32):
    """The source architecture with the given weights (e.g. our own dequantization), for reference outputs."""
    from transformers.initialization import no_init_weights

    hf_config = build_config({k: v for k, v in config.items() if k != "quantization_config"})
    cls = model_class(hf_config)
    with quiet():
        # Random init is most of the build time and every weight is overwritten below; if some parameter is
        # missing from `state_dict`, build again with init so that it is not uninitialised memory.
        with no_init_weights():
            model = cls._from_config(hf_config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing:
            model = cls._from_config(hf_config, dtype=dtype)
            model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    model.eval()
    return model


EVAL_TEXT = Path(__file__).parent / "data" / "eval_text.txt"
# Bounded compute: SmolLM2-135M (fp32, 2 shared cores) takes ~40 s for 4 x 512 tokens; the text holds ~2,400
# SmolLM2 tokens, so 4 full windows of 512 use 2,048 of them.
TEXT_WINDOW = 512
TEXT_MAX_WINDOWS = 4


def text_windows(tokenizer_dir: str | Path, text: str | None = None, window: int = TEXT_WINDOW,
                 max_windows: int = TEXT_MAX_WINDOWS) -> torch.Tensor:
    """The evaluation text as token ids [windows, window] through the model's own tokenizer.

    Each window starts with the tokenizer's BOS token when the tokenizer adds one on its own (the model was
    trained to see it first); otherwise windows are plain consecutive slices of the text.
    """
    from transformers import AutoTokenizer

    text = EVAL_TEXT.read_text(encoding="utf-8") if text is None else text
    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    prepend = bos is not None and len(probe) > 0 and probe[0] == bos
    body = window - 1 if prepend else window
    count = max(1, min(max_windows, len(ids) // body))
    body = min(body, len(ids) // count)
    rows = torch.tensor(ids[: count * body], dtype=torch.long).reshape(count, body)
    if prepend:
        rows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean NLL) of each window's tokens 1..T-1 given the ones before; logits [B, T, V], ids [B, T]."""
    total, count = 0.0, 0
    for row_logits, row_ids in zip(logits, ids):
        logp = torch.log_softmax(row_logits[:-1].double(), dim=-1)
        total += -logp.gather(-1, row_ids[1:, None]).sum().item()
        count += row_ids.numel() - 1
    import math

    return math.exp(total / max(count, 1))


def fixed_token_ids(vocab_size: int, batch: int = 4, length: int = 64, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


@torch.no_grad()
def model_outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] for a causal LM; mean-pooled last hidden state [B, H] for an encoder."""
    with quiet():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    if getattr(out, "logits", None) is not None:
        return out.logits.float()
    return out.last_hidden_state.float().mean(dim=1)


# Real text for encoders: random token ids are no proxy (MiniLM int4 cosine ~0.88 on them, ~0.94 on text).
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A quantized model stores its weights in fewer bits than the original.",
    "Paris is the capital and most populous city of France.",
    "She forgot her umbrella, so she waited for the rain to stop.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "How do I reset my password if I no longer have access to my email?",
    "The stock market fell sharply after the central bank raised interest rates.",
    "He plays the violin in a small orchestra every weekend.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Our team shipped the new release two days ahead of schedule.",
    "The museum's collection includes paintings from the sixteenth century.",
    "Please remember to bring your passport to the airport.",
    "Neural networks learn representations from large amounts of data.",
    "The restaurant on the corner serves the best noodles in town.",
    "After the storm, the village spent weeks repairing the bridge.",
)


def encode_sentences(tokenizer_dir: str | Path, sentences=SENTENCES) -> dict[str, torch.Tensor]:
    """Sentences tokenized with the model's own tokenizer, padded into one batch (input_ids, attention_mask)."""
    from transformers import AutoTokenizer

    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def pooled_embeddings(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real (unmasked) tokens, [B, H]: sentence-transformers' pooling."""
    with quiet():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@dataclass(frozen=True)
class Agreement:
    kld_mean: float | None
    kld_p99: float | None
    kld_max: float | None
    top1: float | None
    cosine: float | None
    max_abs_diff: float
    cosine_min: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Agreement:
    """Metrics of `candidate` outputs against `reference` outputs (logits or pooled embeddings)."""
    max_abs = (reference - candidate).abs().max().item()
    if reference.dim() == 3:
        # One window at a time: float64 log-probs of a 49k vocabulary are 0.4 MB per position.
        klds, agree, coss = [], [], []
        for ref_row, cand_row in zip(reference, candidate):
            ref_logp = torch.log_softmax(ref_row.double(), dim=-1)
            cand_logp = torch.log_softmax(cand_row.double(), dim=-1)
            # Not clamped: a NaN must stay NaN (and fail), and exact KL is never negative beyond rounding.
            klds.append((ref_logp.exp() * (ref_logp - cand_logp)).sum(-1))
            agree.append(ref_row.argmax(-1) == cand_row.argmax(-1))
            coss.append(torch.nn.functional.cosine_similarity(ref_row, cand_row, dim=-1))
        kld = torch.cat(klds)
        finite = bool(torch.isfinite(kld).all())
        kld = kld.clamp_min(0) if finite else kld
        p99 = torch.quantile(kld, 0.99).item() if finite else float("nan")
        kmax = kld.max().item() if finite else float("nan")
        return Agreement(kld.mean().item(), p99, kmax, torch.cat(agree).double().mean().item(),
                         torch.cat(coss).mean().item(), max_abs)
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    return Agreement(None, None, None, None, cos.mean().item(), max_abs, cos.min().item())


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """20 log10(||w|| / ||w - w_hat||); +inf when the reconstruction is exact."""
    noise = (w.double() - w_hat.double()).norm().item()
    signal = w.double().norm().item()
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    import math

    return 20 * math.log10(signal / noise)
