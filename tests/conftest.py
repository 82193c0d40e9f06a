"""Shared fixtures: the tiny models are built once per session in a private COGVX_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings

# Property tests search the space users live in; CI runs a bounded number of cases per property, and
# COGVX_PROPERTY_EXAMPLES=N (e.g. 200) searches further. No deadline: a case may launch a subprocess.
PROPERTY_EXAMPLES = int(os.environ.get("COGVX_PROPERTY_EXAMPLES", "0"))
settings.register_profile(
    "cogvx",
    max_examples=PROPERTY_EXAMPLES or 10,
    deadline=None,
    derandomize=not PROPERTY_EXAMPLES,  # CI: the same cases on every run; a deeper search explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("cogvx")

# The fixtures ``s3`` (moto's S3 server on localhost, and a bucket) and ``http_server`` (a static web server),
# for every test that asks for them; they import boto3 and moto only when one does.
pytest_plugins = ["tests.helpers.s3server"]


def property_examples(ci: int) -> int:
    """Cases for one property: ``ci`` by default, COGVX_PROPERTY_EXAMPLES when that is set."""
    return PROPERTY_EXAMPLES or ci


ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "examples" / "clips"
SEED_LAYOUT = ROOT / "examples" / "seed-layout"


@pytest.fixture(scope="session", autouse=True)
def cogvx_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("cogvx-home")
    previous = os.environ.get("COGVX_HOME")
    os.environ["COGVX_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("COGVX_HOME", None)
    else:
        os.environ["COGVX_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """The bundled clips preprocessed once with the tiny model (fp32, so tests compare exactly)."""
    from cogvx.preprocess.run import PreprocessConfig, run

    out = tmp_path_factory.mktemp("cache") / "shards"
    run(PreprocessConfig(data=CLIPS, output=out, model="tiny", dtype="fp32", workers=0))
    return out


@pytest.fixture
def clips_copy(tmp_path) -> Path:
    """A writable copy of the sample clips, for tests that add broken files."""
    target = tmp_path / "clips"
    shutil.copytree(CLIPS, target)
    return target


def run_launcher(command: list[str], timeout: float = 150, **kwargs) -> subprocess.CompletedProcess:
    """Run a multi-process launcher; on a hang, kill its whole process tree and fail with its output.

    torch's launcher may start its workers in sessions of their own, so killing the launcher alone
    would leave a hung rank holding the pipes, and the test waiting on them.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(process.pid)
        for proc in [*launcher.children(recursive=True), launcher]:
            proc.kill()
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"{' '.join(command[:8])} ... still ran after {timeout} s:\n{stdout[-2000:]}{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
