"""Backends: BACKEND's choices are the registry's keys, auto says aloud what it passed over and why, a stack that
can't run here is refused in one line, and a new backend is one module and one row of the registry."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, SCRIPTS, assert_user_error, run_script, script_env


def no_gpu_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: what auto takes depends on whether Unsloth is installed")


def test_the_settings_choices_are_the_registry_keys():
    from cotune.backends import STACKS
    from cotune.settings import FIELDS

    assert FIELDS["backend"].metadata["choices"] == ("auto", *STACKS)
    assert list(STACKS) == ["unsloth", "hf"], "auto's order of preference: the reference stack first"
    assert all(stack.label for stack in STACKS.values()), "every backend names itself in WARNINGs"


def test_the_plain_stack_says_it_ignores_the_unsloth_only_settings(capsys):
    """TILED_MLP and OFFLOAD_EMBEDDING are Unsloth's: the plain stack loads the real embedded model as asked, and a
    WARNING names each setting it ignores, so that a long-row run on it is not mistaken for one with them."""
    from cotune.backends import choose_backend, load_for_training
    from cotune.models import embedded_hf_folder
    from cotune.settings import resolve

    settings = resolve({"backend": "hf", "tiled_mlp": "true", "offload_embedding": "true", "load_in_4bit": "false"},
                       environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True)
    model, _ = load_for_training(settings, backend, embedded_hf_folder())
    err = capsys.readouterr().err
    assert "WARNING: TILED_MLP=true ignored: only the Unsloth backend runs the MLP in slices" in err
    assert "WARNING: OFFLOAD_EMBEDDING=true ignored" in err
    assert model.get_input_embeddings().weight.device.type == backend.device


def test_auto_without_a_gpu_takes_the_plain_stack_and_says_why(capsys):
    no_gpu_here()
    from cotune.backends import choose_backend
    from cotune.settings import resolve

    backend = choose_backend(resolve({}, environ={}, dotenv_path=Path("/nonexistent")))
    err = capsys.readouterr().err
    assert (backend.name, backend.device, backend.dtype, backend.load_in_4bit) == ("hf", "cpu", "fp32", False)
    assert "WARNING: backend hf (transformers + peft + trl) instead of Unsloth: no CUDA GPU is visible" in err
    assert backend.stack.split == "batch_rebalance" and backend.stack.checkpointing("unsloth") is True


def test_unsloth_asked_for_where_it_cant_run_is_one_line(tmp_path):
    no_gpu_here()
    proc = run_script("ask", "baseline", *DEMO, "--run-dir", str(tmp_path / "run"), "--backend", "unsloth",
                      env=script_env(tmp_path))
    assert_user_error(proc, "BACKEND=unsloth: no CUDA GPU is visible (Unsloth trains on NVIDIA GPUs); BACKEND=auto "
                            "takes what runs here")
    assert not list((tmp_path / "run").rglob("*.json")), "refused before anything was written"


NEW_STACK = '''
from cotune.backends.hf import PlainStack


class EagerStack(PlainStack):
    """The plain stack with transformers' eager attention: a backend of its own."""
    label = "transformers (eager attention) + peft + trl"

    def load_for_training(self, settings, backend, model_path, **kwargs):
        model, tokenizer = super().load_for_training(settings, backend, model_path, **kwargs)
        model.base_model.model.config._attn_implementation = "eager"
        print(f"hf-eager loaded {model_path.name} with {model.base_model.model.config._attn_implementation} attention",
              flush=True)
        return model, tokenizer


STACK = EagerStack()
'''


@pytest.mark.slow
def test_a_backend_added_as_one_module_and_one_row_trains(tmp_path):
    """The registry is the one place: settings accept the new key, training dispatches to it, the record names it."""
    (tmp_path / "eager_stack.py").write_text(NEW_STACK)
    run = tmp_path / "run"
    env = script_env(tmp_path, PYTHONPATH=str(tmp_path))
    run_script("data", *DEMO, "--run-dir", str(run), env=env, check=True)
    args = [str(SCRIPTS / "train.py"), *DEMO, "--run-dir", str(run), "--backend", "hf-eager", "--max-steps", "3",
            "--warmup-steps", "1", "--save-steps", "3"]
    code = ("import eager_stack\nfrom cotune.backends import STACKS\nSTACKS['hf-eager'] = eager_stack.STACK\n"
            f"import runpy, sys\nsys.argv = {args!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hf-eager loaded" in proc.stdout and "with eager attention" in proc.stdout
    summary = json.loads((run / "train" / "run.json").read_text())["summary"]
    assert summary["backend"] == "hf-eager" and summary["global_step"] == 3, summary
    assert (run / "train" / "adapter" / "adapter_config.json").is_file()

    unknown = run_script("train", *DEMO, "--run-dir", str(run), "--backend", "hf-eager", env=env)
    assert_user_error(unknown, "BACKEND='hf-eager': not allowed; choose one of auto, unsloth, hf")


def test_the_private_names_the_cpu_demo_rests_on_are_there(monkeypatch, capsys):
    """The CPU demo's two speed-ups rest on private names: trl's `_use_triton` (rebound so that the CPU projects only
    labelled positions onto the vocabulary) and torch.cpu's bf16 checks. An upgrade that drops one would leave the
    demo slower behind a WARNING; here it fails first. And the WARNING is there when trl lacks the name."""
    import torch
    import trl.trainer.utils as trl_utils

    from cotune.backends import CPU_BF16_CHECKS, _cpu_bf16
    from cotune.train import score_labelled_positions_only

    assert all(callable(getattr(torch.cpu, name, None)) for name in CPU_BF16_CHECKS)
    assert _cpu_bf16() in (True, False)
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    assert trl_utils._use_triton(torch.device("cpu")) is False
    score_labelled_positions_only()
    assert trl_utils._use_triton(torch.device("cpu")) is True and capsys.readouterr().err == ""
    monkeypatch.delattr(trl_utils, "_use_triton")
    score_labelled_positions_only()
    assert "WARNING: trl " in capsys.readouterr().err


def test_a_torch_that_cannot_tell_about_bf16_keeps_fp32_and_says_why(monkeypatch, capsys):
    no_gpu_here()
    import torch

    from cotune.backends import CPU_BF16_CHECKS, choose_backend
    from cotune.settings import resolve

    for name in CPU_BF16_CHECKS:
        monkeypatch.delattr(torch.cpu, name)
    backend = choose_backend(resolve({"backend": "hf", "dtype": "bf16"}, environ={}, dotenv_path=Path("/nonexistent")))
    assert (backend.dtype, backend.autocast) == ("fp32", None)
    assert "DTYPE=bf16 ignored on the CPU (this torch has neither torch.cpu._is_amx_tile_supported nor " \
           "torch.cpu._is_avx512_bf16_supported" in capsys.readouterr().err
