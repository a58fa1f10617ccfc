"""moekit.multimodal: image and audio encoders whose outputs are spliced into the core decoder.

The espeak-ng speech generator (GPL-3) runs only in a worker process started by ``generate_speech``;
importing this package never loads it.
"""

from moekit.multimodal.audio import AudioEncoder, LogMel, resample
from moekit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig, MultimodalConfig, ProjectorConfig
from moekit.multimodal.data import (
    DigitImages,
    SpokenDigits,
    default_eval_voices,
    load_mnist_5k,
    load_spoken_digits,
    split_images,
    split_speech,
)
from moekit.multimodal.image import ImageEncoder, build_image_transform
from moekit.multimodal.model import MultimodalLM, MultimodalReport
from moekit.multimodal.projector import Projector
from moekit.multimodal.sequence import (
    MODALITY_AUDIO,
    MODALITY_IMAGE,
    MODALITY_TEXT,
    AudioPart,
    ImagePart,
    Sample,
    TextPart,
    TokenLayout,
    build_batch,
    media_attention_mask,
    splice,
)
from moekit.multimodal.speech import DIGIT_WORDS, SpeechConfig, generate_speech, load_manifest, read_wav
from moekit.multimodal.tasks import TASKS, DigitTasks, DigitTasksConfig, load_digit_tasks

__all__ = [
    "DIGIT_WORDS",
    "MODALITY_AUDIO",
    "MODALITY_IMAGE",
    "MODALITY_TEXT",
    "TASKS",
    "AudioEncoder",
    "AudioEncoderConfig",
    "AudioPart",
    "DigitImages",
    "DigitTasks",
    "DigitTasksConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "ImagePart",
    "LogMel",
    "MultimodalConfig",
    "MultimodalLM",
    "MultimodalReport",
    "Projector",
    "ProjectorConfig",
    "Sample",
    "SpeechConfig",
    "SpokenDigits",
    "TextPart",
    "TokenLayout",
    "build_batch",
    "build_image_transform",
    "default_eval_voices",
    "generate_speech",
    "load_digit_tasks",
    "load_manifest",
    "load_mnist_5k",
    "load_spoken_digits",
    "media_attention_mask",
    "read_wav",
    "resample",
    "splice",
    "split_images",
    "split_speech",
]
