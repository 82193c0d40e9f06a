"""Preprocess compiles the VAE's encoder when it pays for itself in the run (``--compile`` / ``--no-compile`` decide
when given), and says in its summary whether it did and why.

Compiling costs about 53 s per shape with an empty compile cache and 5 s with a warm one, and saves about 0.5 s per
49x480x720 clip (BENCHMARKS.md section 9): with an empty cache a first experiment on 32 clips would lose about 37 s
to it. A stamp file beside the compiled kernels tells a later run that the cache is warm.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cogvx.pipeline import models
from cogvx.pipeline.speed import compiling
from cogvx.preprocess.run import PreprocessConfig, run
from tests.conftest import CLIPS, property_examples
from tests.helpers.commands import cogvx

GPU = torch.device("cuda")  # a device object only: nothing runs on it


@settings(max_examples=property_examples(40), deadline=None)
@given(
    clips=st.integers(0, 100_000),
    frames=st.sampled_from([1, 13, 49, 81]),
    size=st.sampled_from([(64, 96), (480, 720), (768, 1360)]),
    warm=st.booleans(),
)
def test_by_default_a_gpu_compiles_exactly_when_the_clips_save_more_than_the_compile_costs(clips, frames, size, warm):
    volume = frames * size[0] * size[1]
    choice = compiling.vae_compile_choice(None, GPU, clips, volume, warm)
    saved = clips * compiling.VAE_SAVED_S * volume / compiling.VAE_REFERENCE_VOLUME
    assert choice.on == (saved > compiling.VAE_COMPILE_S[warm])
    assert f"{clips} clips" in choice.why and ("warm" if warm else "empty") in choice.why
    # More clips never turn it off; a warm cache never makes it less worth it.
    assert not choice.on or compiling.vae_compile_choice(None, GPU, clips + 1, volume, warm).on
    assert not choice.on or compiling.vae_compile_choice(None, GPU, clips, volume, True).on
    # The flags decide alone; a CPU never compiles unless asked.
    assert compiling.vae_compile_choice(True, GPU, clips, volume, warm) == compiling.VaeCompile(True, "--compile")
    assert not compiling.vae_compile_choice(False, GPU, clips, volume, warm).on
    assert compiling.vae_compile_choice(None, torch.device("cpu"), clips, volume, warm) == compiling.VaeCompile(
        False, "no GPU"
    )


def test_the_break_even_points_are_the_measured_ones():
    """At 49x480x720: from 104 clips with an empty compile cache, from 10 with a warm one."""

    def first(warm: bool) -> int:
        volume = compiling.VAE_REFERENCE_VOLUME
        return next(n for n in range(1, 1000) if compiling.vae_compile_choice(None, GPU, n, volume, warm).on)

    assert (first(False), first(True)) == (104, 10)


def test_the_stamp_names_the_vae_shape_and_dtype_and_lives_with_the_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "kernels"))
    identity = models.ModelInfo.read("tiny").encoder_identity()
    stamp = functools.partial(compiling.vae_compile_stamp, device="cpu")
    one = stamp(identity, torch.bfloat16, (49, 480, 720))
    assert one.parent == tmp_path / "kernels" and one == stamp(dict(identity), torch.bfloat16, (49, 480, 720))
    others = {stamp(identity, torch.float32, (49, 480, 720)), stamp(identity, torch.bfloat16, (81, 768, 1360))}
    others.add(stamp(identity | {"vae_fingerprint": "another"}, torch.bfloat16, (49, 480, 720)))
    assert one not in others and len(others) == 3


def test_the_summary_says_whether_the_vae_was_compiled_and_why(tmp_path):
    done = cogvx("preprocess", "--data", str(CLIPS), "--output", str(tmp_path / "cache"), "--model", "tiny",
                 "--device", "cpu", "--workers", "0", cwd=tmp_path)  # fmt: skip
    assert done.code == 0, done.stderr[-3000:]
    assert "not compiled (no GPU)" in done.stderr
    done = cogvx("preprocess", "--data", str(CLIPS), "--output", str(tmp_path / "other"), "--model", "tiny",
                 "--device", "cpu", "--workers", "0", "--no-compile", cwd=tmp_path)  # fmt: skip
    assert done.code == 0 and "not compiled (--no-compile)" in done.stderr, done.stderr[-3000:]


def test_a_run_that_compiled_leaves_the_stamp_the_next_run_reads(tmp_path, monkeypatch):
    """``--compile`` on the CPU (the captured graphs run eagerly: Inductor takes minutes here): the run reports it,
    and once it has encoded, the stamp for its model, dtype and largest bucket is there."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(
        compiling, "compile_vae_encoder", functools.partial(compiling.compile_vae_encoder, backend="eager")
    )
    torch._dynamo.reset()
    cfg = PreprocessConfig(
        data=CLIPS, output=tmp_path / "cache", model="tiny", device="cpu", workers=0, compile_vae=True
    )
    result = run(cfg)
    assert (result.vae_compiled, result.vae_compile_why) == (True, "--compile") and result.encoded
    info = models.ModelInfo.read("tiny")
    spec = cfg.frame_spec(info.native_size, info.native_frames, info.frame_step)
    stamp = compiling.vae_compile_stamp(
        info.encoder_identity(), models.parse_dtype(cfg.dtype), spec.largest_window, "cpu"
    )
    assert stamp.is_file()
    assert [p.name for p in (tmp_path / "kernels").glob("cogvx-vae-*")] == [stamp.name]
