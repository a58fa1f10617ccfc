"""Offline spoken-digit generator: espeak-ng (from the ``espeakng-loader`` wheel) -> cached 16-bit WAVs.

Licensing: espeak-ng is GPL-3. It is loaded only inside a short-lived worker process that this module
starts (``python -I speech.py``, job on stdin); no moekit import path loads or links it, and this module
itself imports only the standard library. The generator is optional: training code just reads the WAVs.

Determinism: espeak-ng seeds its noise generators from the clock and keeps synthesis state between
utterances (the same word spoken twice in one process differs slightly). So each generation runs in a
fresh worker that speaks the clips in a fixed order, reseeding both generators before every clip from
the clip's description. Same arguments -> same manifest and byte-identical audio.

Cache layout: ``<cache_root>/<key>/{manifest.json, 00000.wav, ...}`` where ``key`` hashes the
arguments, the generator version and the espeakng-loader version; ``cache_root`` defaults to
``~/.cache/moekit/speech``. A directory is built under a temporary name and renamed into place, so a
crash or a concurrent run never leaves a half-written cache.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import wave
import zlib
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install espeakng-loader==0.2.4  (or: pip install 'moekit[data]')"
GENERATOR_VERSION = 2
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")


def voice_grid(accents: tuple[str, ...] = ACCENTS, variants: tuple[str, ...] = VARIANTS) -> tuple[str, ...]:
    """espeak voice names ``accent`` or ``accent+variant``, accent-major."""
    return tuple(a if not v else f"{a}+{v}" for a in accents for v in variants)


DEFAULT_VOICES = voice_grid()


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SpeechConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class SpeechConfig:
    """The clip grid: every word in every voice at every rate (words/min) and pitch (0..99)."""

    words: tuple[str, ...] = DIGIT_WORDS
    voices: tuple[str, ...] = DEFAULT_VOICES
    rates: tuple[int, ...] = (140, 185)
    pitches: tuple[int, ...] = (35, 65)

    def __post_init__(self) -> None:
        for name in ("words", "voices", "rates", "pitches"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                _fail(name, value, "must be a sequence")
            value = tuple(value)
            object.__setattr__(self, name, value)
            if not value or len(set(value)) != len(value):
                _fail(name, value, "must be non-empty without duplicates")
        if not all(isinstance(w, str) and w.strip() and "\0" not in w for w in self.words):
            _fail("words", self.words, "must be non-empty strings")
        if not all(isinstance(v, str) and v and v.count("+") <= 1 and " " not in v for v in self.voices):
            _fail("voices", self.voices, "must be espeak names 'accent' or 'accent+variant', e.g. 'en-us+m3'")
        if not all(isinstance(r, int) and 80 <= r <= 450 for r in self.rates):
            _fail("rates", self.rates, "must be integers in [80, 450] (words per minute)")
        if not all(isinstance(p, int) and 0 <= p <= 99 for p in self.pitches):
            _fail("pitches", self.pitches, "must be integers in [0, 99]")

    def clips(self) -> list[dict[str, Any]]:
        """The fixed generation order: word, then voice, then rate, then pitch."""
        grid = [
            {"word": w, "voice": v, "rate": r, "pitch": p}
            for w in self.words
            for v in self.voices
            for r in self.rates
            for p in self.pitches
        ]
        # espeak-ng's breath noise (e.g. the f2/f3 variants) draws from RNGs it seeds with the clock;
        # each clip reseeds them from its own description.
        return [
            {"file": f"{i:05d}.wav", **c, "seed": zlib.crc32(json.dumps(c, sort_keys=True).encode()) & 0x7FFFFFFF}
            for i, c in enumerate(grid)
        ]


def _loader_version() -> str:
    try:
        return metadata.version("espeakng-loader")
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(cfg: SpeechConfig) -> str:
    payload = {"config": asdict(cfg), "generator": GENERATOR_VERSION, "espeakng_loader": _loader_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "moekit" / "speech"


def espeak_paths() -> tuple[Path, Path]:
    """(shared library, espeak-ng-data dir) of the installed espeakng-loader wheel."""
    if importlib.util.find_spec("espeakng_loader") is None:
        raise ModuleNotFoundError(
            f"spoken digits need espeak-ng from the espeakng-loader package, which is not installed. "
            f"Run: {INSTALL_HINT}",
            name="espeakng_loader",
        )
    import espeakng_loader  # stdlib-only path helpers; does not load the library

    lib = Path(espeakng_loader.get_library_path())
    data = Path(espeakng_loader.get_data_path())
    if not lib.is_file():
        raise FileNotFoundError(f"espeak-ng library missing at {lib}; reinstall with: {INSTALL_HINT}")
    return lib, data


def check_voices(voices: tuple[str, ...], data_dir: Path) -> None:
    """Fail early on names espeak would silently replace by its default voice."""
    accents = {p.name.lower() for p in (data_dir / "lang").rglob("*") if p.is_file()}
    variants = {p.name.lower() for p in (data_dir / "voices" / "!v").iterdir() if p.is_file()}
    for voice in voices:
        accent, _, variant = voice.partition("+")
        if accent.lower() not in accents or (variant and variant.lower() not in variants):
            raise ValueError(
                f"SpeechConfig.voices: {voice!r} is unknown to espeak-ng; accents include {sorted(accents)[:40]}..., "
                f"variants: {sorted(variants)}"
            )


def _run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-I", str(Path(__file__).resolve())],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng worker failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the result is the last line


def generate_speech(
    cfg: SpeechConfig | None = None, cache_root: str | Path | None = None, timeout: float = 1800.0
) -> Path:
    """Synthesise ``cfg``'s clips once and return their cache directory (reused when already there)."""
    cfg = SpeechConfig() if cfg is None else cfg
    lib, data = espeak_paths()
    check_voices(cfg.voices, data)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / cache_key(cfg)
    if (final / "manifest.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        clips = cfg.clips()
        result = _run_worker({"library": str(lib), "data": str(data), "out_dir": str(tmp), "clips": clips}, timeout)
        rate = int(result["sample_rate"])
        for clip, n in zip(clips, result["num_samples"], strict=True):
            clip.update(sample_rate=rate, num_samples=n)
        manifest = {
            "generator_version": GENERATOR_VERSION,
            "espeakng_loader_version": _loader_version(),
            "config": asdict(cfg),
            "sample_rate": rate,
            "clips": clips,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_manifest(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "manifest.json").read_text())


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """(little-endian int16 mono PCM bytes, sample rate) of a WAV written by the worker."""
    with wave.open(str(path), "rb") as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        return f.readframes(f.getnframes()), f.getframerate()


# ---------------------------------------------------------------- worker (runs in its own process)
AUDIO_OUTPUT_SYNCHRONOUS = 2
INIT_DONT_EXIT = 0x8000  # report a missing data dir instead of calling exit()
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH = 1, 3
EE_OK = 0


def _worker_main() -> None:
    job = json.load(sys.stdin)
    lib = ctypes.CDLL(job["library"])
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    if not hasattr(lib, "espeak_ng_SetRandSeed"):
        sys.exit("this espeak-ng build lacks espeak_ng_SetRandSeed; deterministic audio needs espeakng-loader==0.2.4")
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    libc = ctypes.CDLL(None)  # the process's C library: espeak also calls rand()
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, job["data"].encode(), INIT_DONT_EXIT)
    if rate <= 0:
        sys.exit(f"espeak_Initialize failed ({rate}) with data dir {job['data']}")
    chunks: list[bytes] = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def on_audio(wav: Any, num_samples: int, events: Any) -> int:
        if wav and num_samples > 0:
            chunks.append(ctypes.string_at(wav, 2 * num_samples))
        return 0  # continue

    lib.espeak_SetSynthCallback(on_audio)
    out_dir, lengths = Path(job["out_dir"]), []
    for clip in job["clips"]:
        if lib.espeak_SetVoiceByName(clip["voice"].encode()) != EE_OK:
            sys.exit(f"espeak-ng has no voice {clip['voice']!r}")
        lib.espeak_SetParameter(PARAM_RATE, clip["rate"], 0)  # after the voice, which may reset them
        lib.espeak_SetParameter(PARAM_PITCH, clip["pitch"], 0)
        lib.espeak_ng_SetRandSeed(clip["seed"])
        libc.srand(clip["seed"])
        chunks.clear()
        text = clip["word"].encode() + b"\0"
        if lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != EE_OK:
            sys.exit(f"espeak_Synth failed on {clip}")
        lib.espeak_Synchronize()
        pcm = b"".join(chunks)
        if not pcm:
            sys.exit(f"espeak-ng produced no audio for {clip}")
        if sys.byteorder == "big":  # WAV is little-endian
            samples = array.array("h", pcm)
            samples.byteswap()
            pcm = samples.tobytes()
        with wave.open(str(out_dir / clip["file"]), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(pcm)
        lengths.append(len(pcm) // 2)
    lib.espeak_Terminate()
    print(json.dumps({"sample_rate": rate, "num_samples": lengths}))


if __name__ == "__main__":
    _worker_main()
