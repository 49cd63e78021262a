import pytest
import torch
from prodigyopt import Prodigy

from studio.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _model_and_opt(seed, optimizer="adamw"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    if optimizer == "prodigy":  # its step-size estimate lives in the param groups, beside the per-parameter state
        opt = Prodigy(model.parameters(), lr=1.0, use_bias_correction=True, safeguard_warmup=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, optimizer):
    straight, opt = _model_and_opt(0, optimizer)
    _train(straight, opt, 3, seed=1)
    _train(straight, opt, 3, seed=2)

    first, opt1 = _model_and_opt(0, optimizer)
    _train(first, opt1, 3, seed=1)
    save_checkpoint(tmp_path, 3, {"model": first}, {"opt": opt1}, {"note": "x"})
    resumed, opt2 = _model_and_opt(99, optimizer)  # different init: everything must come from the checkpoint
    state = load_checkpoint(latest_checkpoint(tmp_path), {"model": resumed}, {"opt": opt2})
    assert state["step"] == 3 and state["note"] == "x"
    if optimizer == "prodigy":
        back, saved = opt2.param_groups[0], opt1.param_groups[0]
        assert back["k"] == saved["k"] == 3 and back["d_numerator"] == saved["d_numerator"] > 0  # its estimate came back
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_keeps_newest_and_ignores_partial_writes(tmp_path):
    model, opt = _model_and_opt(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model}, {"opt": opt}, keep=2)
    (tmp_path / ".tmp-checkpoint-4").mkdir()  # a write killed half-way
    (tmp_path / "checkpoint-5").mkdir()  # no state.json: incomplete
    assert list_checkpoints(tmp_path) == [2, 3]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert list(tmp_path.glob("checkpoint-3/*.safetensors"))
