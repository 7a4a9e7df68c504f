"""Functional comparison of an export with its source: reload through transformers, run fixed inputs, compare.

Inputs: for a causal LM with a tokenizer, a fixed English text shipped with qexport (`EVAL_TEXT`, written for the
project) tokenized by the reference's own tokenizer and cut into windows (`text_windows`); random token ids only
for a model without a tokenizer (they overstate KLD 2-10x on real models); real sentences for encoders.

Metric definitions (shared by tests, `qexport verify` and reports; see docs/design.md):
- KLD: KL(P_ref || P_quant) of next-token distributions per position; mean, p99 and max;
- top-1: share of positions whose argmax agrees with the reference;
- perplexity: exp of the mean next-token negative log-likelihood of the text (each window's first token is context
  only), for the source and for the export;
- cosine: cosine similarity of mean-pooled last hidden states (encoders), averaged over inputs (min kept too);
- max abs logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from qexport.io.checkpoint import Checkpoint, declared_dtype, load_config
from qexport.model.architecture import build_config, model_class
from qexport.io.library_guard import LOAD_KWARGS
from qexport.model.quiet import quiet
from qexport.model.streamed import NotStreamable, WeightSource, streamed_model


def load_model(folder: str | Path, dtype=torch.float32, meta: bool = False):
    """Load a model folder with plain transformers (compressed-tensors decompresses on load).

    Returns (model, loading_info) where loading_info holds missing / unexpected / mismatched keys. With `meta`,
    every parameter stays on the `meta` device (`device_map={"": "meta"}`): transformers matches the checkpoint's
    names and shapes with the model's as in a full load, and reads no weight.
    """
    config = load_config(Path(folder))
    cls = model_class(build_config(config, Path(folder) / "config.json"))
    placement = {"device_map": {"": "meta"}} if meta else {}
    with quiet():
        model, info = cls.from_pretrained(str(folder), dtype=dtype, output_loading_info=True, **placement, **LOAD_KWARGS)
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
def outputs_with_nonfinite(model, run) -> tuple["torch.Tensor | LogitWindows", NonFinite | None]:
    """`run(model)`'s outputs, and where NaN/Inf first appeared inside the model if the outputs hold any.

    Forward hooks on every module record the first one (in the order modules finish, so the innermost) whose
    output is not finite; its name carries the decoder layer index (`model.layers.3.mlp.down_proj`). When `run`
    makes several forward passes (one per window), "first" is still by execution order within a pass."""
    import re

    order: dict[str, int] = {}  # module name -> its place in a forward pass (the same in every pass)
    bad: set[str] = set()

    def hook(name):
        def record(module, args, output):
            order.setdefault(name, len(order))
            if name in bad:
                return
            t = _first_tensor(output)
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                bad.add(name)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        out = run(model)
    finally:
        for h in handles:
            h.remove()
    share = nonfinite_share(out)
    if share == 0:
        return out, None
    module = min(bad, key=order.__getitem__) if bad else None
    match = re.search(r"\.(\d+)(?:\.|$)", module or "")
    return out, NonFinite(module, int(match.group(1)) if match else None, share)


def nonfinite_share(outputs: "torch.Tensor | LogitWindows") -> float:
    """Fraction of output values that are NaN/Inf."""
    if isinstance(outputs, LogitWindows):
        return outputs.nonfinite / max(outputs.numel, 1)
    finite = torch.isfinite(outputs)
    return 0.0 if bool(finite.all()) else 1 - finite.double().mean().item()


def model_from_state_dict(config: dict, state_dict: dict[str, torch.Tensor], dtype=torch.float32):
    """The source architecture with the given weights (e.g. our own dequantization), for reference outputs."""
    return model_from_tensors(config, lambda: iter(state_dict.items()), dtype)


def model_from_tensors(config: dict, tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                       dtype=torch.float32, strict: bool = False):
    """The source architecture filled one tensor at a time from `tensors()` (name, tensor) pairs.

    Memory: the model once plus the tensor in flight. The model is built without initialising its weights
    (`torch.empty`: no page is touched until a tensor is copied in), so a streamed source never sits next to a
    second full copy. Tied parameters count as loaded when one of their names is. If some parameter gets no
    tensor: with `strict`, None (the caller loads another way); otherwise the model is built again with init (so
    that it is not uninitialised memory) and `tensors()` is streamed a second time. With `strict`, a name the
    model does not have gives None too."""
    from transformers.initialization import no_init_weights

    hf_config = build_config({k: v for k, v in config.items() if k != "quantization_config"})
    cls = model_class(hf_config)
    with quiet():
        with no_init_weights():  # random init is most of the build time and every weight is overwritten below
            model = cls._from_config(hf_config, dtype=dtype)
        missing, unexpected = _stream_into(model, tensors())
        if strict and (missing or unexpected):
            return None
        if missing:
            del model
            model = cls._from_config(hf_config, dtype=dtype)
            _stream_into(model, tensors())
    model.tie_weights()
    model.eval()
    return model


def _stream_into(model, tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str]]:
    """Copy each (name, tensor) into `model` (as `load_state_dict(strict=False)` would, name by name); returns the
    names of the model's state that got nothing (aliases of a loaded tied parameter excepted) and the names
    the model does not have."""
    loaded: set[str] = set()
    for name, tensor in tensors:
        model.load_state_dict({name: tensor}, strict=False)
        loaded.add(name)
        del tensor
    aliases: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(value), []).append(key)
    keys = {key for names in aliases.values() for key in names}
    missing = [key for names in aliases.values() if not loaded.intersection(names) for key in names]
    return missing, sorted(loaded - keys)


def load_streamed(folder: str | Path, dtype=torch.float32):
    """A dense model folder loaded tensor by tensor (`Checkpoint.read`, no memory map): resident memory is the
    model in `dtype` plus one tensor, where transformers' `from_pretrained` also keeps the mapped files (a 1B
    bf16 checkpoint loaded in float32 peaks at 6.1 GB that way, 4.3 GB this way). The same weights and
    architecture as `load_model`, which it falls back to when the checkpoint's names are not the model's own
    (architectures whose weights transformers renames or fuses while loading)."""
    from qexport.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder)
    try:
        model = model_from_tensors(ckpt.config, lambda: ((name, ckpt.read(name)) for name in ckpt.names), dtype,
                                   strict=True)
    except RuntimeError:  # a shape the built model does not have: let transformers load (and judge) it
        model = None
    if model is None:
        model, _ = load_model(folder, dtype)
    return model


# Where the streamed blocks run (`qexport verify --device`).
DEVICE = "cpu"


def streamed(config: dict, source: WeightSource, dtype=torch.float32, transform=None):
    """The architecture of `config` streamed from `source` (model.streamed.streamed_model) on DEVICE."""
    with quiet():
        return streamed_model(config, source, dtype, transform, device=DEVICE)


def reference_source(ckpt: Checkpoint) -> WeightSource:
    """A dense folder's tensors as stored, each a positioned read of its shard (`Checkpoint.read`)."""
    return WeightSource(ckpt.names, ckpt.read)


def dequantized_source(ckpt: Checkpoint, dtype=torch.float32) -> WeightSource:
    """The export as qexport reads it (quant.dequant): each quantized module's `weight` dequantized in `dtype`
    (the other tensors cast to it) and handed over as float32, under the original names."""
    from qexport.quant.dequant import dequantize_module, num_bits_of, quantized_modules

    modules = quantized_modules(ckpt)
    parts = {stored for leaves in modules.values() for stored in leaves.values()}
    names = [n for n in ckpt.names if n not in parts] + [f"{m}.weight" for m in modules]

    def read(name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in modules:
            tensors = {leaf: ckpt.read(stored) for leaf, stored in modules[module].items()}
            return dequantize_module(tensors, num_bits_of(ckpt.config, module), dtype).float()
        t = ckpt.read(name)
        return t.to(dtype).float() if t.is_floating_point() else t

    return WeightSource(names, read)


class NotLikeTransformers(Exception):
    """The export uses a part of compressed-tensors that `transformers_source` does not reproduce."""


def transformers_source(ckpt: Checkpoint, dtype=torch.float32) -> WeightSource:
    """The export's tensors as transformers computes them when it loads the folder in `dtype`: the quantization
    config applied to the architecture by compressed-tensors (`apply_quantization_config`, `compress_model`: the
    steps of transformers' CompressedTensorsHfQuantizer, here on a `meta` copy), and each quantized module's
    stored tensors (floating ones cast to `dtype`, as the load casts them) decompressed by compressed-tensors'
    `decompress_module`, the function its decompression hook calls on the first forward pass. Dense tensors as
    stored (the model casts them to `dtype`). A `dequantize` load (the config asks transformers to decompress
    while loading) follows that route instead. Raises NotLikeTransformers for what it does not reproduce:
    activation quantization (the quantized forward would also quantize inputs/outputs)."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.base import decompress_module
    from compressed_tensors.quantization import apply_quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qexport.model.architecture import meta_model

    qc = ckpt.config.get("quantization_config")
    if not isinstance(qc, dict):
        return reference_source(ckpt)
    if qc.get("dequantize"):
        return _dequantize_route_source(ckpt, qc)
    with quiet():
        hf_qc = CompressedTensorsConfig.from_dict(dict(qc))
        hf_qc.post_init()
        compressor = ModelCompressor.from_compression_config(hf_qc)
        model = meta_model(build_config(ckpt.config))
        if compressor is not None and compressor.quantization_config is not None:
            apply_quantization_config(model, copy.deepcopy(compressor.quantization_config), run_compressed=False)
            if hf_qc.is_quantization_compressed:
                compressor.compress_model(model=model)
    modules = {name: module for name, module in model.named_modules()
               if getattr(module, "quantization_scheme", None) is not None}
    for name, module in modules.items():
        scheme = module.quantization_scheme
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise NotLikeTransformers(f"{name}: activation quantization")
    stored = {name: [f"{name}.{leaf}" for leaf, _ in _direct_tensors(module)] for name, module in modules.items()}
    parts = {n for names in stored.values() for n in names}
    names = [n for n in ckpt.names if n not in parts] + [f"{m}.weight" for m in modules]
    force = getattr(compressor, "force_compression_format", None)

    def read(name: str) -> torch.Tensor:
        module_name = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module_name in modules):
            return ckpt.read(name)
        module = copy.deepcopy(modules[module_name])
        for leaf, old in _direct_tensors(module):
            if f"{module_name}.{leaf}" not in ckpt.entries:
                raise NotLikeTransformers(f"{module_name}.{leaf} is not in the export")
            value = ckpt.read(f"{module_name}.{leaf}")
            value = value.to(dtype) if value.is_floating_point() else value
            if leaf in module._parameters:
                module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[leaf] = value
        with quiet():
            decompress_module(module, force)
        return module.weight.data

    return WeightSource(names, read)


def _dequantize_route_source(ckpt: Checkpoint, qc: dict) -> WeightSource:
    """transformers' `dequantize` load (CompressedTensorsDequantize): each module stored with a `weight_scale`
    decompressed from its tensors as stored by the compressor of the config's dense scheme (`get_dense_scheme`),
    while loading; the model casts the result to its dtype."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from transformers.integrations.compressed_tensors import get_dense_scheme
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qexport.quant.dequant import quantized_modules

    with quiet():
        hf_qc = CompressedTensorsConfig.from_dict(dict(qc))
        hf_qc.post_init()
        ct_config = ModelCompressor.from_compression_config(hf_qc).quantization_config
        scheme = get_dense_scheme(ct_config)
    compressor = BaseCompressor.get_value_from_registry(scheme.format or ct_config.format)
    modules = {m: leaves for m, leaves in quantized_modules(ckpt).items() if "weight_scale" in leaves}
    parts = {stored for leaves in modules.values() for stored in leaves.values()}
    names = [n for n in ckpt.names if n not in parts] + [f"{m}.weight" for m in modules]

    def read(name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module in modules):
            return ckpt.read(name)
        state = {leaf: ckpt.read(stored) for leaf, stored in modules[module].items()}
        with quiet():
            return compressor.decompress(state, scheme)["weight"]

    return WeightSource(names, read)


# What a streamed build or run raises where the architecture or the export does not allow streaming (a module
# reading a parameter outside its forward meets a `meta` tensor: RuntimeError / NotImplementedError; a stored shape
# the model does not have: ValueError); the caller loads the model whole instead.
STREAMING_ERRORS = (NotStreamable, NotLikeTransformers, RuntimeError, NotImplementedError, ValueError)


def _direct_tensors(module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


class LogitWindows:
    """Logits of a causal LM on the fixed text, [windows, T, V] float32, held in an unlinked temporary file and
    read back one window [T, V] at a time (indexing, iteration).

    Full-vocabulary logits of every window are large (4 x 512 positions x a 150k vocabulary is 1.2 GB in float32)
    and verify compares several models' outputs: on disk they never add up in memory. Counts NaN/Inf as written."""

    def __init__(self):
        import tempfile

        self._file = tempfile.TemporaryFile(prefix="qexport-logits-")
        self.window_shape: tuple[int, ...] | None = None
        self.count = 0
        self.nonfinite = 0

    def append(self, window: torch.Tensor) -> None:
        window = window.detach().to(torch.float32).contiguous()
        if self.window_shape is None:
            self.window_shape = tuple(window.shape)
        elif tuple(window.shape) != self.window_shape:
            raise ValueError(f"window of shape {list(window.shape)} after {list(self.window_shape)}")
        self.nonfinite += int((~torch.isfinite(window)).sum())
        self._file.seek(self.count * self._window_bytes)
        self._file.write(memoryview(window.numpy()).cast("B"))
        self.count += 1

    @property
    def _window_bytes(self) -> int:
        import math

        return 4 * math.prod(self.window_shape or ())

    @property
    def numel(self) -> int:
        return self.count * self._window_bytes // 4

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *(self.window_shape or ()))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        window = torch.empty(self.window_shape, dtype=torch.float32)
        self._file.seek((index % self.count) * self._window_bytes)
        got = self._file.readinto(memoryview(window.numpy()).cast("B"))
        if got != self._window_bytes:
            raise OSError(f"logits file truncated: window {index} has {got} of {self._window_bytes} bytes")
        return window

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.count))

    def close(self) -> None:
        self._file.close()


EVAL_TEXT = Path(__file__).parent.parent / "data" / "eval_text.txt"
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
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **LOAD_KWARGS)
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


def perplexity(logits: "torch.Tensor | LogitWindows", ids: torch.Tensor) -> float:
    """exp(mean NLL) of each window's tokens 1..T-1 given the ones before; logits [B, T, V] (a tensor or
    LogitWindows, read one window at a time), ids [B, T]."""
    total, count = 0.0, 0
    for row_logits, row_ids in zip(logits, ids):
        logp = torch.log_softmax(row_logits[:-1].double(), dim=-1)
        total += -logp.gather(-1, row_ids[1:, None]).sum().item()
        count += row_ids.numel() - 1
        del logp
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


# Logits per forward pass: windows go through the model together (each streamed weight read once per run) in
# batches whose float32 logits stay under this many bytes (4 x 512 positions x a 32k vocabulary is 256 MB; a 150k
# vocabulary runs two windows a pass).
LOGIT_BATCH_BYTES = 512 * 2**20


def window_logits(model, ids: torch.Tensor, step: Callable[[int, int], None] | None = None,
                  threads: int = 1) -> LogitWindows:
    """A causal LM's logits on `ids` [B, T]: windows in batches of at most LOGIT_BATCH_BYTES of float32 logits,
    each window's logits written to a LogitWindows in order; `step(done, total)` after each batch. Each batch runs
    on one torch thread (qexport.verify.threads.parallel_map), `threads` batches at once only for a model held
    whole: a streamed model (model.streamed) loads and drops weights in its hooks, which two threads must not do at
    once. The logits are the same for any `threads`."""
    from qexport.verify.threads import parallel_map

    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    per_pass = max(1, LOGIT_BATCH_BYTES // (4 * ids.shape[1] * vocab))
    batches = [ids[start:start + per_pass] for start in range(0, len(ids), per_pass)]

    def forward(rows: torch.Tensor) -> torch.Tensor:
        return model(input_ids=rows, attention_mask=torch.ones_like(rows)).logits

    windows, done = LogitWindows(), 0
    at_once = 1 if hasattr(model, "weights_map") else threads
    with quiet():  # once, around the pool: quiet() swaps process-wide streams and is not for threads
        for logits in parallel_map(forward, batches, at_once):
            for window in logits:
                windows.append(window)
            done += len(logits)
            del logits
            if step is not None:
                step(done, len(ids))
    return windows


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
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), **LOAD_KWARGS)
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


# Positions per slice when comparing logits: float64 log-probs of a 150k vocabulary are 1.2 MB per position, and
# a slice holds a few of those arrays at once (~160 MB at 128 positions). Rows are independent, so slicing does not
# change a single value.
COMPARE_POSITIONS = 128


def compare(reference: "torch.Tensor | LogitWindows", candidate: "torch.Tensor | LogitWindows") -> Agreement:
    """Metrics of `candidate` outputs against `reference` outputs: logits [B, T, V] (tensors or LogitWindows, read
    one window at a time) or pooled embeddings [B, H]."""
    if isinstance(reference, LogitWindows) or isinstance(candidate, LogitWindows) or reference.dim() == 3:
        klds, agree, coss, diffs = [], [], [], []
        for ref_window, cand_window in zip(reference, candidate):
            diffs.append((ref_window - cand_window).abs().max())  # a NaN stays NaN
            for start in range(0, ref_window.shape[0], COMPARE_POSITIONS):
                ref_row = ref_window[start:start + COMPARE_POSITIONS]
                cand_row = cand_window[start:start + COMPARE_POSITIONS]
                ref_logp = torch.log_softmax(ref_row.double(), dim=-1)
                cand_logp = torch.log_softmax(cand_row.double(), dim=-1)
                # Not clamped: a NaN must stay NaN (and fail), and exact KL is never negative beyond rounding.
                klds.append((ref_logp.exp() * (ref_logp - cand_logp)).sum(-1))
                del ref_logp, cand_logp
                agree.append(ref_row.argmax(-1) == cand_row.argmax(-1))
                coss.append(torch.nn.functional.cosine_similarity(ref_row, cand_row, dim=-1))
        kld = torch.cat(klds)
        finite = bool(torch.isfinite(kld).all())
        kld = kld.clamp_min(0) if finite else kld
        p99 = torch.quantile(kld, 0.99).item() if finite else float("nan")
        kmax = kld.max().item() if finite else float("nan")
        return Agreement(kld.mean().item(), p99, kmax, torch.cat(agree).double().mean().item(),
                         torch.cat(coss).mean().item(), torch.stack(diffs).max().item())
    max_abs = (reference - candidate).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(reference, candidate, dim=-1)
    return Agreement(None, None, None, None, cos.mean().item(), max_abs, cos.min().item())


# Elements per slice of a large tensor in `sqnr_db`: float64 copies of a 150k x 4096 embedding would be 5 GB each.
SQNR_SLICE_ELEMENTS = 2**24


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """20 log10(||w|| / ||w - w_hat||); +inf when the reconstruction is exact.

    Norms in float64; a tensor of more than SQNR_SLICE_ELEMENTS elements is taken a slice of rows at a time
    (the sum of the slices' squared norms), so memory stays at one slice of float64 whatever the tensor."""
    if w.numel() <= SQNR_SLICE_ELEMENTS or w.dim() == 0 or w.shape != w_hat.shape:
        noise = (w.double() - w_hat.double()).norm().item()
        signal = w.double().norm().item()
    else:
        rows = max(1, SQNR_SLICE_ELEMENTS // max(1, w[0].numel()))
        noise_sq = signal_sq = 0.0
        for start in range(0, w.shape[0], rows):
            a, b = w[start:start + rows].double(), w_hat[start:start + rows].double()
            noise_sq += (a - b).norm().item() ** 2
            signal_sq += a.norm().item() ** 2
            del a, b
        noise, signal = noise_sq ** 0.5, signal_sq ** 0.5
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    import math

    return 20 * math.log10(signal / noise)
