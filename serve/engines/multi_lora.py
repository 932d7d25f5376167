"""Fused multi-LoRA for mixed-adapter batches: every row of a batch uses its own adapter in one pass.

peft's mixed-batch inference (`adapter_names=`) loops over the adapters present in each LoRA layer
and runs a sub-batch per adapter: ~8 small ops x adapters x layers per decode step, which on a CPU
costs as much as the base model itself. Here each target Linear gets one forward hook that does

    y = W x + ((x @ A_cat^T) * row_mask) @ B_cat^T          A_cat: (sum r, d_in), B_cat: (d_out, sum r)

A_cat/B_cat concatenate the loaded adapters' LoRA matrices (B pre-scaled by alpha/r), and
row_mask (rows, sum r) keeps, for each row, only its adapter's columns (all zero for the base).
Four ops per layer, whatever the adapter mix. Adapters are read from the standard PEFT files
(adapter_config.json + adapter_model.safetensors); outputs equal peft's (tested against it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lm.adapters import lora_rank

_PREFIX = "base_model.model."


class MultiLoRA:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # name -> module -> (A, B*s)
        self.order: list[str] = []  # adapter index = position + 1 (0 = base)
        self._fused: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # module -> (A_cat, B_cat, owner)
        self._hooks = []
        self._row_idx: torch.Tensor | None = None  # (rows,) adapter index per batch row
        self._masks: dict[int, torch.Tensor] = {}
        self._any = False

    # -- adapters ----------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> None:
        self.install(name, self.read(name, path))

    def read(self, name: str, path: str | Path, meta: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An adapter's checked weights, module -> (A, B*scale); touches no served state, so it may run
        on any thread while the model serves (only `install` must wait for the engine thread).
        meta: the safetensors header only, as shape-only tensors: every check, no weights read."""
        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if str(cfg.get("peft_type", "")).upper() != "LORA" or cfg.get("use_dora"):
            raise ValueError(f"{name}: only plain LoRA adapters can be fused (got {cfg.get('peft_type')})")
        if cfg.get("fan_in_fan_out"):
            raise ValueError(f"{name}: fan_in_fan_out adapters are not supported")
        file = str(path / "adapter_model.safetensors")
        tensors = _header(file) if meta else load_file(file)
        mods: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if not key.startswith(_PREFIX) or not key.endswith(".weight"):
                raise ValueError(f"{name}: unexpected tensor {key}")
            module, kind = key[len(_PREFIX):-len(".weight")].rsplit(".", 1)
            if kind not in ("lora_A", "lora_B"):
                raise ValueError(f"{name}: unsupported tensor {key} (only lora_A/lora_B)")
            mods.setdefault(module, {})[kind] = t
        declared = lora_rank(cfg)  # what the server's rank limit was checked against
        return {module: self._weights(name, module, ab, cfg, declared) for module, ab in mods.items()}

    def _weights(self, name: str, module: str, ab: dict[str, torch.Tensor], cfg: dict,
                 declared: int) -> tuple[torch.Tensor, torch.Tensor]:
        lin = self.linears.get(module)
        if lin is None:
            raise ValueError(f"{name}: target {module} is not a Linear of the base model")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{name}: {module} has {sorted(ab)}, needs lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: {module} LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the base")
        r = a.shape[0]
        if r > declared:  # tensors larger than adapter_config.json says would slip past the rank limit
            raise ValueError(f"{name}: {module} has LoRA rank {r}, adapter_config.json declares {declared}")
        leaf = module.rsplit(".", 1)[-1]
        alpha = _pattern(cfg.get("alpha_pattern"), module, leaf, cfg.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        dtype = lin.weight.dtype
        return a.to(dtype).contiguous(), (b * scale).to(dtype).contiguous()

    def install(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                evict: tuple[str, ...] = ()) -> None:
        """Serve `weights` as `name` (replacing a same-named adapter), dropping `evict`, in one rebuild.
        Engine thread only."""
        for old in evict:
            self.adapters.pop(old, None)
            if old in self.order:
                self.order.remove(old)
        self.adapters[name] = weights
        if name not in self.order:
            self.order.append(name)
        self._rebuild()

    def unload(self, name: str) -> None:
        self.adapters.pop(name, None)
        if name in self.order:
            self.order.remove(name)
        self._rebuild()

    def _rebuild(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._fused = [], {}
        owners: dict[tuple, torch.Tensor] = {}  # identical column layouts share one tensor, hence one mask per step
        modules = sorted({m for w in self.adapters.values() for m in w})
        for module in modules:
            a_parts, b_parts, owner = [], [], []
            for i, name in enumerate(self.order, start=1):
                ab = self.adapters[name].get(module)
                if ab is None:
                    continue
                a_parts.append(ab[0])
                b_parts.append(ab[1])
                owner += [i] * ab[0].shape[0]
            owner_t = owners.setdefault(tuple(owner), torch.tensor(owner))
            # A_cat^T (d_in, sum r) and B_cat^T (sum r, d_out), contiguous for plain 2-D matmuls
            self._fused[module] = (torch.cat(a_parts, 0).t().contiguous(), torch.cat(b_parts, 1).t().contiguous(), owner_t)
            self._hooks.append(self.linears[module].register_forward_hook(self._hook(module)))

    # -- per forward -------------------------------------------------------------
    def set_rows(self, adapters: list[str | None]) -> None:
        """Adapter of each batch row for the next forward (None = base model)."""
        index = {n: i for i, n in enumerate(self.order, start=1)}
        self._row_idx = torch.tensor([index[a] if a else 0 for a in adapters])
        self._any = bool(self._row_idx.any())  # all base rows: no delta anywhere
        self._masks = {}

    def _mask(self, owner: torch.Tensor, dtype: torch.dtype, t: int) -> torch.Tensor:
        """(rows * T, sum r): 1 where a column belongs to the token's row adapter. Cached per step and layout."""
        key = (id(owner), t)
        m = self._masks.get(key)
        if m is None:
            m = (self._row_idx[:, None] == owner[None, :]).to(dtype)
            if t > 1:
                m = m.repeat_interleave(t, dim=0)
            self._masks[key] = m
        return m

    @property
    def active(self) -> bool:
        """Rows are set and at least one adapter is loaded."""
        return self._row_idx is not None and self._any and bool(self._fused)

    def apply(self, module: str, x: torch.Tensor, out: torch.Tensor, t: int) -> None:
        """out (rows*t, d_out) += each token's adapter delta for x (rows*t, d_in); out may be a column slice."""
        fused = self._fused.get(module)
        if fused is None or self._row_idx is None or not self._any:
            return
        a_t, b_t, owner = fused
        xa = torch.mm(x, a_t).mul_(self._mask(owner, x.dtype, t))  # (rows*t, sum r)
        out.addmm_(xa, b_t)

    def _hook(self, module: str):
        def hook(mod, inputs, out):
            x = inputs[0]  # (rows, T, d_in); out is this Linear's fresh output, updated in place
            self.apply(module, x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), x.shape[1])
            return None
        return hook


def _header(file: str) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares, on the meta device (safe_open checks the file covers them)."""
    with safe_open(file, "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}


def _pattern(pattern: dict | None, module: str, leaf: str, default):
    for key, value in (pattern or {}).items():
        if module.endswith(key) or leaf == key:
            return value
    return default
