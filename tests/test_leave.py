"""How a stage process ends (cotune.errors.run_main and leave), in real subprocesses: the status, the last lines of
output through a pipe, the exit handlers, and a thread still at work."""
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

STAGE = textwrap.dedent("""
    import atexit, sys, threading, time
    from cotune.errors import UserError, run_main

    def main(argv):
        atexit.register(lambda: print("exit handler ran"))
        print("last line of the stage")  # a pipe buffers it: it must still come out
        if "--worker" in sys.argv:
            def work():
                time.sleep(1.0)
                print("worker finished", flush=True)
            threading.Thread(target=work).start()
        if "--fail" in sys.argv:
            raise UserError("RUN_DIR=/x: no such folder; create it")

    run_main(main)
""")


def run_stage(tmp_path, *flags):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    return subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("flags, status", [((), 0), (("--fail",), 2)])
def test_a_stage_leaves_with_its_status_its_output_and_its_exit_handlers(tmp_path, flags, status):
    proc = run_stage(tmp_path, *flags)
    assert proc.returncode == status
    assert proc.stdout.splitlines() == ["last line of the stage", "exit handler ran"]
    assert proc.stderr == ("error: RUN_DIR=/x: no such folder; create it\n" if status else "")


def test_a_thread_still_at_work_is_waited_for(tmp_path):
    proc = run_stage(tmp_path, "--worker")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["last line of the stage", "worker finished", "exit handler ran"]


def test_what_native_code_printed_comes_out_too(tmp_path):
    """C's stdio buffers a pipe's output too: printf'd text must not be lost by the quick exit."""
    script = tmp_path / "native.py"
    script.write_text(textwrap.dedent("""
        import ctypes
        from cotune.errors import run_main

        def main(argv):
            ctypes.CDLL(None).printf(b"from C\\n")

        run_main(main)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout == "from C\n"
