"""`exl2conv inspect`: read an EXL2 model's quantized linears and report their layouts and bitrates,
and optionally how far the decoded weights are from the FP16 model they came from.

Tensors are read lazily through ``safetensors.safe_open``, one linear at a time, so memory stays at
about one decoded matrix. Nothing here prints or exits: the CLI calls ``inspect`` and ``format_report``.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import FormatError
from .pack import LINEAR_KEYS, decode_linear, decoded_bits, find_linears, parse_q_groups
from .qparams import ATTN_LINEARS, HEAD_OPTIONS, MLP_LINEARS, MOE_LINEARS, Group, describe_groups

_DECODER = re.compile(r"^(language_model\.)?model\.layers\.")
_REL_ERR_CHUNK = 4096  # output rows compared at once, to bound float32 temporaries on large heads


class _Index:
    """Tensor name -> the open safetensors file holding it, over one or more files."""

    def __init__(self, files: list[Path], stack: ExitStack):
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error type for every malformed header
                raise FormatError(f"{f}: not a readable safetensors file ({e}); is it truncated or "
                                  "of another format?") from e
            self._handles[f] = handle
            for k in keys:
                if k in self.where:
                    raise FormatError(f"{f}: tensor {k} is also in {self.where[k]}; "
                                      "a model folder must hold each tensor once")
                self.where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise FormatError(f"{f}: cannot read tensor {name} ({e})") from e


def _safetensors_files(path: Path, what: str) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FormatError(f"{path}: no *.safetensors files in this {what} folder")
        return files
    if path.is_file():
        return [path]
    raise FormatError(f"{path}: no such file or folder")


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


_MODEL_ORDER = ATTN_LINEARS + MLP_LINEARS + MOE_LINEARS


def _model_order(name: str) -> tuple:
    """Sort key: layer by layer, attention then MLP in the model's order, the head last."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    last = name.rsplit(".", 1)[-1]
    rank = _MODEL_ORDER.index(last) if last in _MODEL_ORDER else len(_MODEL_ORDER)
    return (_is_head(name), int(layer.group(1)) if layer else -1, rank, name)


def _describe(name: str, groups: list[Group], k: int) -> str:
    """The layout's description. The file stores rows, not proportions, and several table entries
    can give the same rows for a small K; for the head, prefer the -hb table, which made it."""
    if _is_head(name):
        for q in HEAD_OPTIONS.values():
            if q.groups(k) == groups:
                return q.desc
    return describe_groups(groups, k)


def _load_linear(index: _Index, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    tensors, files = {}, {}
    for key in LINEAR_KEYS:
        full = f"{name}.{key}"
        if full in index:
            tensors[key] = index.get(full)
            files[key] = index.where[full]
    return tensors, files


def _in_file(err: FormatError, name: str, files: dict[str, Path]) -> FormatError:
    """Prefix a tensor-level error with the file holding the tensor it names."""
    msg = str(err)
    f = next((files[k] for k in files if msg.startswith(f"{name}.{k}:")), files["q_weight"])
    return FormatError(f"{f}: {msg}")


def _fp16_weight(ref: _Index, name: str) -> torch.Tensor | None:
    """The FP16 model's weight [out, in] for a quantized linear; a tied head reads the embedding."""
    candidates = [f"{name}.weight"]
    if _is_head(name):
        prefix = name[: -len("lm_head")]
        candidates.append(f"{prefix}model.embed_tokens.weight")
    for c in candidates:
        if c in ref:
            return ref.get(c)
    return None


def _rel_err(wt: torch.Tensor, w_ref: torch.Tensor, name: str, ref_dir: Path) -> float:
    """||Wt^T[:out] - W_ref||_F / ||W_ref||_F in float32. wt: [K, N]; w_ref: [out, K], out <= N."""
    k, n = wt.shape
    if w_ref.dim() != 2 or w_ref.shape[1] != k or w_ref.shape[0] > n:
        raise FormatError(f"{ref_dir}: the FP16 weight for {name} has shape {list(w_ref.shape)}, but the "
                          f"quantized linear is [out <= {n}, in = {k}]; is this the model it was made from?")
    diff2 = ref2 = 0.0
    for a in range(0, w_ref.shape[0], _REL_ERR_CHUNK):
        ref = w_ref[a:a + _REL_ERR_CHUNK].float()
        dec = wt[:, a:a + ref.shape[0]].T.float()
        diff2 += float(torch.sum((dec - ref) ** 2))
        ref2 += float(torch.sum(ref ** 2))
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / ref2)


def inspect(path: Path, fp16_dir: Path | None = None) -> dict:
    """Inspect an EXL2 model folder (every *.safetensors in it) or a single .safetensors file.

    Returns {"layers": [{"name", "desc", "bpw", "k", "n"[, "rel_err"]}], "decoder_bpw": float | None
    (None when no decoder-layer linears), "head_bpw": float | None}, and with ``fp16_dir`` also
    "rel_err_mean", "rel_err_max" over the linears found in the FP16 model and "fp16_missing" (names
    of linears it has no weight for). bpw counts every stored bit (as ExLlamaV2's
    conversion/qparams.py, QParams.total_bits, counts them) per weight K*N.
    Raises FormatError naming the file and tensor on anything malformed.
    """
    path = Path(path)
    with ExitStack() as stack:
        index = _Index(_safetensors_files(path, "model"), stack)
        names = sorted(find_linears(index.where), key=_model_order)
        if not names:
            raise FormatError(f"{path}: no quantized linears (no *.q_weight tensors); is this an EXL2 model?")
        ref = _Index(_safetensors_files(fp16_dir, "FP16 model"), stack) if fp16_dir is not None else None
        layers, missing = [], []
        for name in names:
            tensors, files = _load_linear(index, name)
            try:
                bits = decoded_bits(tensors, name)
                k = tensors["q_invperm"].numel()
                n = tensors["q_weight"].shape[1]
                groups = parse_q_groups(tensors["q_groups"], k, f"{name}.q_groups")
                wt = decode_linear(tensors, name) if ref is not None else None
            except FormatError as e:
                raise _in_file(e, name, files) from e
            layer = {"name": name, "desc": _describe(name, groups, k), "bpw": bits / (k * n),
                     "k": k, "n": n, "bits": bits}
            if ref is not None:
                w_ref = _fp16_weight(ref, name)
                if w_ref is None:
                    missing.append(name)
                else:
                    layer["rel_err"] = _rel_err(wt, w_ref, name, Path(fp16_dir))
            layers.append(layer)
    result = {"path": str(path), "layers": layers,
              "decoder_bpw": _bpw([x for x in layers if _DECODER.match(x["name"])]),
              "head_bpw": _bpw([x for x in layers if _is_head(x["name"])])}
    if ref is not None:
        errs = [x["rel_err"] for x in layers if "rel_err" in x]
        if not errs:
            raise FormatError(f"{fp16_dir}: holds none of the quantized linears' weights "
                              f"(looked for e.g. {names[0]}.weight); is this the model it was made from?")
        result.update(rel_err_mean=sum(errs) / len(errs), rel_err_max=max(errs), fp16_missing=missing)
    return result


def _bpw(layers: list[dict]) -> float | None:
    weights = sum(x["k"] * x["n"] for x in layers)
    return sum(x["bits"] for x in layers) / weights if weights else None


def format_report(result: dict) -> str:
    """A readable table of inspect()'s result: name, layout, bpw, rel_err, then the totals."""
    has_err = "rel_err_mean" in result
    header = ["linear", "layout", "bpw"] + (["rel_err"] if has_err else [])
    rows = []
    for x in result["layers"]:
        row = [x["name"], x["desc"], f"{x['bpw']:.4f}"]
        if has_err:
            row.append(f"{x['rel_err']:.6f}" if "rel_err" in x else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        return "  ".join(cells).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    n_dec = sum(1 for x in result["layers"] if _DECODER.match(x["name"]))
    dec, head = result["decoder_bpw"], result["head_bpw"]
    out.append("")
    out.append(f"decoder: {dec:.4f} bpw over {n_dec} linears" if dec is not None
               else "decoder: no decoder-layer linears")
    out.append(f"head:    {head:.4f} bpw" if head is not None else "head:    not quantized in these files")
    if has_err:
        out.append(f"rel_err: mean {result['rel_err_mean']:.6f}, max {result['rel_err_max']:.6f} "
                   f"(Frobenius, decoded vs FP16)")
        if result.get("fp16_missing"):
            out.append(f"no FP16 weight for {len(result['fp16_missing'])} linears: "
                       + ", ".join(result["fp16_missing"][:5]) + (" ..." if len(result["fp16_missing"]) > 5 else ""))
    return "\n".join(out)
