"""The data flags (``DataArguments``), apart from the training ones: ``vlmtune check-data`` takes them without
importing transformers' training arguments, accelerate or PEFT (seconds of a command that trains nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlmtune.data.boxes import FORMATS as BOX_FORMATS
from vlmtune.errors import ConfigError
from vlmtune.flags import check_fields, within


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "Training data: a JSON array or JSON lines file (LLaVA, ShareGPT or messages "
                                "records), a Parquet / Arrow file or a save_to_disk folder; or a mixture of several: "
                                "a.json:0.3,b.parquet:0.7 (weights: shares), a.json:500,b.json:200 (record counts), "
                                "a.json,b.json (all of each), drawn with --seed."})
    stage: Literal["sft", "cpt"] = field(
        default="sft",
        metadata={"help": "vlmtune train only. sft: conversations, the replies train. cpt: continued pre-training "
                  "on documents ({\"text\", \"image\" / \"video\"}, <image> / <video> tags where the media go), no "
                  "chat template, every text token trains."},
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths start from (default: the data file's)."}
    )
    video_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative video paths (and a video's frame files) start from "
                                "(default: image_folder)."}
    )
    data_format: Literal["llava", "sharegpt", "messages"] | None = field(
        default=None, metadata={"help": "Format of the data files (default: detected from each file's first "
                                "record): LLaVA, ShareGPT (LLaMA-Factory / ms-swift) or typed-part messages."},
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation data, same format (a mixture "
                                                                        "too)."})
    val_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the training records held out for evaluation (seeded; of each "
                              "file of a mixture).", **within(0, 1, high_open=True)}
    )
    max_seq_length: int = field(
        default=4096, metadata={"help": "Longest sequence in tokens, vision tokens included.", **within(1)}
    )
    strict_length: bool = field(
        default=False,
        metadata={"help": "Stop with an error when a record is over max_seq_length (default: skip it, reported)."},
    )
    label_mode: Literal["assistant", "last_assistant", "all"] = field(
        default="assistant",
        metadata={"help": "What trains: every assistant reply, the last one only, or all text (prompts too)."},
    )
    enable_thinking: bool | None = field(
        default=None,
        metadata={"help": "Passed to the chat template as enable_thinking (Qwen3.5: False puts an empty <think> "
                  "block in the prompt, so only the answer trains). Default: the template's own default. predict "
                  "uses the run's value."},
    )
    keep_earlier_reasoning: bool = field(
        default=False,
        metadata={"help": "Thinking templates drop the <think> reasoning of assistant turns before the last user "
                  "message; True keeps it there, written as in a last turn, so it trains too."},
    )
    image_min_pixels: int | None = field(
        default=None, metadata={"help": "Min pixels per image (default: the processor's).", **within(1)})
    image_max_pixels: int | None = field(
        default=None, metadata={"help": "Max pixels per image (default: the processor's).", **within(1)})
    image_resized_width: int | None = field(
        default=None, metadata={"help": "Resize every image to this width.", **within(1)})
    image_resized_height: int | None = field(
        default=None, metadata={"help": "Resize every image to this height.", **within(1)})
    video_min_pixels: int | None = field(default=None, metadata={"help": "Min pixels per video frame.", **within(1)})
    video_max_pixels: int | None = field(default=None, metadata={"help": "Max pixels per video frame.", **within(1)})
    fps: float | None = field(
        default=None, metadata={"help": "Frames sampled per second of a video file (e.g. 1.0); a video given "
                                "as a list of frames keeps every frame.", **within(0, low_open=True)})
    nframes: int | None = field(
        default=None, metadata={"help": "Frames sampled per video file (instead of fps).", **within(1)})
    video_min_frames: int | None = field(default=None, metadata={"help": "Fewest frames sampled per video.",
                                                                 **within(1)})
    video_max_frames: int | None = field(default=None, metadata={"help": "Most frames sampled per video.",
                                                                 **within(1)})
    allow_urls: bool = field(default=False, metadata={"help": "Accept http(s) URLs as media (fetched when read)."})
    box_format: Literal[BOX_FORMATS] | None = field(  # type: ignore[valid-type]
        default=None,
        metadata={"help": "Convention of the grounding boxes in the data (<|box_start|>(x1,y1),(x2,y2)<|box_end|>, "
                  "\"bbox_2d\" / \"point_2d\"); they are checked and rewritten in the model family's convention "
                  "for each image as the model sees it (EXIF applied, resized). A record's own \"box_format\" wins. "
                  "Default: boxes are used as written."},
    )
    deep_check: bool = field(
        default=False, metadata={"help": "Decode every image and video before training, not only the headers."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several records into one row up to max_seq_length, with no attention across them."},
    )

    def __post_init__(self):
        check_fields(self)
        if self.fps is not None and self.nframes is not None:
            raise ConfigError("--fps and --nframes are two ways to sample video frames: give one of them")
        if (self.image_resized_width is None) != (self.image_resized_height is None):
            raise ConfigError("--image_resized_width and --image_resized_height go together")

    def template_options(self) -> dict:
        """The chat-template switches the user set, as ``Conversation`` takes them (saved with a run)."""
        options = {"enable_thinking": self.enable_thinking} if self.enable_thinking is not None else {}
        if self.keep_earlier_reasoning:
            options["keep_earlier_reasoning"] = True
        return options

    def budget_overrides(self) -> dict:
        """The media budget fields the user set (None: the processor's default)."""
        return dict(
            image_min_pixels=self.image_min_pixels,
            image_max_pixels=self.image_max_pixels,
            image_resized_height=self.image_resized_height,
            image_resized_width=self.image_resized_width,
            video_min_pixels=self.video_min_pixels,
            video_max_pixels=self.video_max_pixels,
            fps=self.fps,
            nframes=self.nframes,
            video_min_frames=self.video_min_frames,
            video_max_frames=self.video_max_frames,
        )
