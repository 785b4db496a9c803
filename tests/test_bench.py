"""The benchmark harness, in its CPU smoke mode: real processes, a real (tiny, random) model, real training steps."""
import json
import re

import pytest

from conftest import run_script, script_env


def test_bench_smoke_writes_figures_and_a_table(tmp_path):
    """The harness on the CPU, with --profile: 2 more steps after the timed ones are profiled, and only the timed
    steps count in the figures."""
    proc = run_script("bench", "--smoke", "--profile", "--run-dir", str(tmp_path), env=script_env(tmp_path),
                      timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "bench" / "bench.json").read_text())
    (r,) = results
    assert r["config"] == "plain-reference" and r["backend"] == "hf"
    assert r["steps_timed"] == 3 and r["warmup_steps_excluded"] == 1
    assert r["real_tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["n_params"] > 1e6
    assert len(r["losses"]) == 4 + 2 and all(l > 0 for l in r["losses"])  # the timed steps, then the profiled ones
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert table.startswith("Device: CPU.") and "| plain-reference | 2 x 4 |" in table
    profile = (tmp_path / "bench" / "plain-reference-profile.txt").read_text()
    assert re.match(r"2 optimizer steps from step 5: [0-9.]+ s wall, [0-9.]+ s of CPU operator time \(\d+%\); "
                    r"sorted by self_cpu_time_total", profile), profile.splitlines()[0]
    assert "aten::mm" in profile and "Self CPU" in profile


def test_bench_refuses_the_gpu_run_without_a_gpu(tmp_path):
    proc = run_script("bench", "--run-dir", str(tmp_path), env=script_env(tmp_path))
    assert proc.returncode == 2 and "error: no CUDA GPU: the benchmark measures GPU training; use --smoke" in proc.stderr


def test_every_configuration_trains_the_same_8_sequences_per_step():
    """The comparison is only fair if each configuration learns the same thing: 8 sequences per optimizer step, the
    reference recipe's LoRA; only speed and memory knobs differ."""
    from pathlib import Path

    from cotune.bench import CONFIGS, DEFAULT_CONFIGS
    from cotune.settings import resolve

    reference = resolve({}, environ={}, dotenv_path=Path("/nonexistent"))
    for name, (backend, overrides, _) in CONFIGS.items():
        values = {k: str(v) for k, v in overrides.items() if k != "kbit_upcast"}
        s = resolve(values, environ={}, dotenv_path=Path("/nonexistent"))
        assert s.batch_size * s.grad_accum == 8, name
        assert (s.lora_r, s.target_modules, s.learning_rate, s.load_in_4bit) == (
            reference.lora_r, reference.target_modules, reference.learning_rate, reference.load_in_4bit), name
    assert resolve({"preset": "fast"}, environ={}, dotenv_path=Path("/nonexistent")).offload_embedding == "true"
    assert {"cotune-fast", "unsloth-reference", "plain-reference"} <= set(DEFAULT_CONFIGS)


def test_decode_bench_refuses_a_missing_gguf(tmp_path):
    proc = run_script("bench", "--gguf", str(tmp_path / "nope.gguf"), "--run-dir", str(tmp_path),
                      env=script_env(tmp_path))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_the_benchmark_configures_trl_as_the_training_stage_does_but_for_its_named_overrides(tmp_path):
    """One SFTConfig builder: the benchmark's configuration is the training stage's, changed only where
    BENCH_OVERRIDES says; a name trl doesn't know is refused, not ignored."""
    from pathlib import Path

    import pytest

    from cotune.backends import choose_backend
    from cotune.bench import BENCH_OVERRIDES
    from cotune.distributed import plan
    from cotune.settings import resolve
    from cotune.train import sft_config

    settings = resolve({"preset": "demo"}, environ={}, dotenv_path=Path("/nonexistent"))
    backend = choose_backend(settings, quiet=True)
    layout = plan(settings, nproc_per_node=1, nnodes=1)
    stage = sft_config(settings, backend, layout, "random", tmp_path, eval_on_start=False).to_dict()
    bench = sft_config(settings, backend, layout, "random", tmp_path, eval_on_start=False, **BENCH_OVERRIDES).to_dict()
    changed = {k for k in stage if stage[k] != bench[k]}
    assert changed and changed <= set(BENCH_OVERRIDES), changed
    assert {k: bench[k] for k in BENCH_OVERRIDES} == {k: getattr(v, "value", v) for k, v in BENCH_OVERRIDES.items()}
    with pytest.raises(TypeError, match="lr_schedular"):
        sft_config(settings, backend, layout, "random", tmp_path, eval_on_start=False, lr_schedular="constant")


def test_the_capacity_search_doubles_then_halves_the_gap():
    from cotune.bench import next_length

    tried = {}
    order = []
    fits = lambda n: n <= 5000  # noqa: E731  -- a stack that trains up to 5,000 tokens
    while (n := next_length(tried, 1024, 65536, 512)) is not None:
        order.append(n)
        tried[n] = fits(n)
    assert order == [1024, 2048, 4096, 8192, 6144, 5120, 4608]
    assert max(k for k, ok in tried.items() if ok) == 4608  # within 512 of the true 5,000
    tried = {}
    while (n := next_length(tried, 1024, 4096, 512)) is not None:  # everything fits: stops at the cap
        tried[n] = True
    assert sorted(tried) == [1024, 2048, 4096]


def test_a_length_counts_without_a_second_process_only_if_nothing_ran_out_before_it():
    from cotune.bench import fresh_longest

    ok = lambda n: {"length": n, "ok": True}  # noqa: E731
    out = lambda n: {"length": n, "ok": False}  # noqa: E731
    assert fresh_longest([ok(8192), ok(16384)]) == {"length": 16384, "ok": True}
    assert fresh_longest([ok(16384), ok(8192)])["length"] == 16384  # --lengths need not be sorted
    assert fresh_longest([ok(16384), out(32768)])["length"] == 16384  # ran out only after it
    assert fresh_longest([ok(8192), out(32768), ok(16384)]) is None  # trained after a recovery: confirm it
    assert fresh_longest([ok(16384), out(16384)]) is None  # the same length given twice, once ran out
    assert fresh_longest([out(8192)]) is None and fresh_longest([]) is None


@pytest.mark.slow
def test_capacity_search_on_the_tiny_model_finds_and_confirms_a_length(tmp_path):
    """The capacity mode for real on the CPU: the tiny random model trains one sequence per step under a limit of
    address space beyond the loaded model (RLIMIT_AS); the longest length that trained is trained again in a fresh
    process, and the one that ran out of memory is named."""
    proc = run_script("bench", "--smoke", "--capacity", "--configs", "plain-long", "--limits", "1.5", "--cap",
                      "16384", "--start", "512", "--granularity", "512", "--rope", "", "--run-dir", str(tmp_path),
                      env=script_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (r,) = json.loads((tmp_path / "bench" / "capacity.json").read_text())
    assert r["config"] == "plain-long" and r["limit_gib"] == 1.5
    longest, failed = r["longest_confirmed"], r["shortest_failed"]
    assert longest and failed and longest < failed <= longest + 2 * 512  # bracketed to the granularity
    assert r["confirm"]["ok"] and len(r["confirm"]["step_seconds"]) == 3  # trained again, in a fresh process
    assert any(not t["ok"] and "allocate" in t["error"] for t in r["search"])
    assert all(0.1 < t["peak_host_rss_gib"] < 24 for t in r["search"])  # the process's own RAM, as read from Linux
    table = (tmp_path / "bench" / "capacity.md").read_text()
    assert table.startswith("Device: CPU.") and f"| plain-long | 1.5 | {longest} | {failed:,} |" in table
