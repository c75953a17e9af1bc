"""bench/gpu_checks.sh is self-sufficient on a GPU machine without megatron-core or network: its install step puts
the wheels bench/fetch_gpu_wheels.sh fetched (a git-ignored folder) on PYTHONPATH, offline. Tested here on CPU with a
stand-in wheel built in the test (the real ones are for the GPU machines' Python 3.12)."""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_checks.sh")


def _record(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def stand_in_wheel(folder, version="0.99.0") -> str:
    """A minimal megatron-core wheel (py3-none-any) whose megatron.core says its version."""
    info = f"megatron_core-{version}.dist-info"
    files = {"megatron/core/__init__.py": f'__version__ = "{version}"\n'.encode(),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: megatron-core\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = os.path.join(folder, f"megatron_core-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "\n".join([_record(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]))
    return path


def test_install_step_puts_the_bundled_wheels_first_on_the_path_offline(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    stand_in_wheel(str(wheels))
    (wheels / "requirements.txt").write_text("megatron-core==0.99.0\n")
    target = tmp_path / "site"
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/unreachable", PIP_FIND_LINKS="")  # no index at all
    run = subprocess.run(["bash", SCRIPT, "--install", str(wheels), str(target)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    check = subprocess.run([sys.executable, "-c", "import megatron.core as m; print(m.__version__, m.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                           env=dict(os.environ, PYTHONPATH=str(target)))
    version, where = check.stdout.split()
    assert version == "0.99.0" and where.startswith(str(target))  # before the installed megatron-core


def test_install_step_without_the_wheels_says_how_to_fetch_them(tmp_path):
    run = subprocess.run(["bash", SCRIPT, "--install", str(tmp_path / "none"), str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "bash bench/fetch_gpu_wheels.sh" in run.stderr
    assert not (tmp_path / "site").exists()


def test_the_wheel_folder_is_ignored_and_fetched_for_python_312():
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/gpu_wheels/megatron_core-0.19.2.whl"], cwd=ROOT)
    assert ignored.returncode == 0
    fetch = open(os.path.join(ROOT, "bench", "fetch_gpu_wheels.sh")).read()
    assert "--python-version \"$py\"" in fetch and "PYTHON_VERSION:-3.12" in fetch and "--no-deps" in fetch
    assert "MEGATRON_CORE:-0.19.2" in fetch and "requirements.txt" in fetch
    checks = open(SCRIPT).read()
    assert "bench/fetch_gpu_wheels.sh" in checks and "--no-index --no-deps" in checks
