"""The benchmark harness, in its CPU smoke mode: real processes, a real (tiny, random) model, real training steps."""
import json

from conftest import run_script, script_env


def test_bench_smoke_writes_figures_and_a_table(tmp_path):
    proc = run_script("bench", "--smoke", "--run-dir", str(tmp_path), env=script_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "bench" / "bench.json").read_text())
    (r,) = results
    assert r["config"] == "plain-reference" and r["backend"] == "hf"
    assert r["steps_timed"] == 3 and r["warmup_steps_excluded"] == 1
    assert r["real_tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["n_params"] > 1e6
    assert len(r["losses"]) == 4 and all(l > 0 for l in r["losses"])
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert table.startswith("Device: CPU.") and "| plain-reference | 2 x 4 |" in table


def test_bench_refuses_the_gpu_run_without_a_gpu(tmp_path):
    proc = run_script("bench", "--run-dir", str(tmp_path), env=script_env(tmp_path))
    assert proc.returncode == 2 and "error: no CUDA GPU: the benchmark measures GPU training; use --smoke" in proc.stderr
