"""Training checkpoints: full state in safetensors + JSON, written atomically, never pickled.

A checkpoint is a folder ``checkpoint-<step>`` holding one safetensors file per module and per
optimizer, and ``state.json`` (step and any JSON-able extras). It is written under a temporary
name and renamed into place, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into flat tensors and a JSON-able remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_tensors`: load the state back into ``opt``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step}"
    tmp = run_dir / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    opt_meta = {}
    for name, opt in (optimizers or {}).items():
        tensors, opt_meta[name] = optimizer_to_tensors(opt)
        save_file(tensors, str(tmp / f"optimizer-{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizers": opt_meta, **(extra or {})}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(list_checkpoints(run_dir))[:-keep]:
        shutil.rmtree(run_dir / f"{PREFIX}{old}", ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir``, ascending."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    steps = []
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file():
            try:
                steps.append(int(p.name[len(PREFIX):]))
            except ValueError:
                continue
    return sorted(steps)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or ``None``."""
    steps = list_checkpoints(run_dir)
    return Path(run_dir) / f"{PREFIX}{steps[-1]}" if steps else None


def load_checkpoint(
    ckpt: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> dict[str, Any]:
    """Load modules (and optimizers) from a checkpoint folder; returns its ``state.json``."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ckpt / f"{name}.safetensors")))
    for name, opt in (optimizers or {}).items():
        optimizer_from_tensors(opt, load_file(str(ckpt / f"optimizer-{name}.safetensors")), state["optimizers"][name])
    return state
